"""The per-worker training loop that Ray Train runs on every worker (CPU/gloo or GPU/nccl).

Each pass of the mix schedule is its own Ray dataset (`phase0`, `phase1`, ...), streamed to the workers
with `get_dataset_shard(...).iter_torch_batches`. A step accumulates micro batches up to the global batch;
the loss is the mean over every trained token of the global batch (not a mean of per-worker means).

Checkpoints (through `ray.train.report`) hold the weights (only the adapters with LoRA), the optimizer
and LR schedule, and where the run was: phase, steps done in it, loss history. A resumed worker skips the
micro batches that the checkpoint's steps already consumed in the current phase; the shards are a function
of the data alone (Ray Data `preserve_order`, set by the trainer), so those are exactly the rows it trained.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

from pipeline.config import ConfigError
from pipeline.models import resolve_model_path
from pipeline.progress import duration
from pipeline.train.data import Collate

# A logger, not print: Ray Train V2 turns a worker's print into a log record AND, where Ray wraps stdout,
# the plain print as well, so every printed line showed twice.
log = logging.getLogger(__name__)
PEFT_MISSING = ("lora.enabled: peft is not installed on this machine (pip install 'inverse-instruct[train]'; in a "
                "clone: bash scripts/setup.sh), or set lora.enabled: false to train all weights")

# Measured dense bf16 peak of one H100/H200 (the spec sheet's 989 TFLOP/s is not reachable).
PEAK_FLOPS = {"H100": 790e12, "H200": 790e12}


@dataclass
class LoopConfig:
    """Everything a worker needs, as plain values (sent to every worker by Ray Train)."""

    model_path: str
    phases: list[list[str]]
    planned_steps: list[int]
    accum: int
    micro_batch_size: int
    pad_id: int
    packing: bool
    lr: float
    warmup_steps: int
    lr_schedule: str
    optimizer: str
    weight_decay: float
    max_grad_norm: float | None
    max_steps: int | None
    checkpoint_every: int
    strategy: str
    bf16: bool
    gradient_checkpointing: bool
    attn_implementation: str
    trust_remote_code: bool
    lora: dict[str, Any] | None
    peak_flops: float | None
    model_output: str
    save_dtype: str
    seed: int
    verbose: bool = False  # -v: Ray Train's own INFO lines too


@dataclass
class TrainState:
    step: int = 0
    phase: int = 0
    phase_step: int = 0
    tokens: int = 0  # input tokens (not padding) through forward+backward, all workers
    label_tokens: int = 0
    seconds: float = 0.0  # time in training steps: forward, backward, optimizer (not checkpoint saves)
    data_seconds: float = 0.0  # time waiting for each step's batches (Ray Data: shuffle, split, transfer)
    history: list[dict[str, Any]] = field(default_factory=list)
    sessions: list[dict[str, Any]] = field(default_factory=list)  # one per (re)start: where it began
    done: bool = False


def quiet_ray_train_reports() -> None:
    """Ray Train logs each worker's every report ("Reporting training result 3: TrainingReport(...)", one long
    line per worker per checkpoint) at INFO, under a logger named by its file's path, which its LoggingConfig
    (trainer.ray_train_logging) does not reach."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: its lines stay
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_loop(config: dict[str, Any]) -> None:
    c = LoopConfig(**config)
    if not c.verbose:
        quiet_ray_train_reports()
    c.model_path = resolve_model_path(c.model_path)  # on this worker's node (embedded, s3://: its own cache)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(c.seed)
    model, n_params = build_model(c, device)
    optimizer, scheduler = build_optimizer(c, model)
    state = TrainState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = load_checkpoint(Path(folder), model, optimizer, scheduler, lora=c.lora is not None)
    peak = c.peak_flops or _default_peak_flops(device)
    before = state.sessions[-1].get("world_size", world) if state.sessions else world
    if rank == 0 and before != world and state.phase_step:
        # Each worker's shard depends on the worker count: the skip-ahead below no longer lands on the rows
        # the checkpoint's run trained (the step count stays right).
        log.warning(f"[train] resuming pass {state.phase} at its step {state.phase_step} with {world} workers; the "
                    f"checkpoint's run had {before}: the rest of the pass comes from a new "
                    f"split of its rows, so some of its rows may be trained twice and others not at all")
    state.sessions.append({"start_step": state.step, "start_phase": state.phase, "world_size": world,
                           "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"})
    if rank == 0:
        log.info(f"[train] start at step {state.step} (phase {state.phase}, step {state.phase_step} in it); "
                 f"plan {c.planned_steps} steps per phase; {n_params / 1e6:.1f}M params")
    total = sum(c.planned_steps) if c.max_steps is None else min(sum(c.planned_steps), c.max_steps)
    session_start, session_first_step = time.perf_counter(), state.step  # for the time left (data, checkpoints too)
    collate = Collate(pad_id=c.pad_id, packed=c.packing)
    while state.phase < len(c.phases) and not state.done:
        shard = ray.train.get_dataset_shard(f"phase{state.phase}")
        batches = iter(shard.iter_torch_batches(batch_size=c.micro_batch_size, collate_fn=collate))
        for _ in islice(batches, state.phase_step * c.accum):  # consumed before the checkpoint
            pass
        waited_from = time.perf_counter()
        while state.step < total and (micro := list(islice(batches, c.accum))):
            t0 = time.perf_counter()
            state.data_seconds += t0 - waited_from
            loss, grad_norm, tokens, label_tokens = train_step(c, model, optimizer, micro, device, world)
            scheduler.step()
            state.seconds += time.perf_counter() - t0
            state.step, state.phase_step = state.step + 1, state.phase_step + 1
            state.tokens += tokens
            state.label_tokens += label_tokens
            # Throughput as the run gets it: a step's time includes waiting for its data (a data-bound run
            # shows as such, and `data_seconds` says by how much), not checkpoint saves.
            busy = max(state.seconds + state.data_seconds, 1e-9)
            tps = state.tokens / busy
            mfu = 6 * n_params * tps / (peak * world) if peak else None
            entry = {"step": state.step, "phase": state.phase, "loss": loss, "grad_norm": grad_norm,
                     "lr": scheduler.get_last_lr()[0], "tokens": state.tokens, "seconds": round(state.seconds, 3),
                     "data_seconds": round(state.data_seconds, 3), "tokens_per_s": round(tps, 1), "mfu": mfu,
                     "data": batch_digest(micro)}
            state.history.append(entry)
            if rank == 0:
                per_step = (time.perf_counter() - session_start) / (state.step - session_first_step)
                log.info(f"[train] step {state.step}/{total} phase {state.phase} loss {loss:.4f} "
                         f"lr {entry['lr']:.2e} tokens/s {tps:,.0f} ({state.data_seconds / busy:.0%} waiting for data) "
                         f"MFU {'null' if mfu is None else f'{mfu:.3f}'} "
                         f"eta {duration(per_step * (total - state.step))} data {entry['data']}")
            # Not at the last step: the final checkpoint below is written right after it, and a second copy
            # of the same state costs a full write (a 7B model's optimizer state is ~80 GB) and pushes an
            # older checkpoint out of `num_to_keep`.
            if state.step % c.checkpoint_every == 0 and state.step < total:
                save_checkpoint(c, model, optimizer, scheduler, state, rank)
            waited_from = time.perf_counter()
        if state.step >= total:
            state.done = True
        else:
            state.phase, state.phase_step = state.phase + 1, 0
    state.done = True
    # Checkpoint first: merging LoRA adapters for the final model removes them from the training model.
    save_checkpoint(c, model, optimizer, scheduler, state, rank, final=True)
    save_final_model(c, model, rank)


def batch_digest(micro: list[dict[str, Any]]) -> str:
    """A short hash of the sequence ids this worker trained in one step (rank 0's goes into the history):
    equal digests mean a resumed run trained exactly the rows an uninterrupted one would have."""
    return hashlib.sha256("\x00".join(i for m in micro for i in m["ids"]).encode()).hexdigest()[:12]


def _default_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None  # CPU: MFU is null unless compute.peak_flops is set
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


def train_step(c: LoopConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               micro: list[dict[str, Any]], device: torch.device, world: int) -> tuple[float, float, int, int]:
    counts = torch.tensor([sum(int((m["labels"][:, 1:] != -100).sum()) for m in micro),
                           sum(m["num_tokens"] for m in micro)], dtype=torch.float64, device=device)
    local_loss = torch.zeros((), dtype=torch.float64, device=device)  # NCCL reduces device tensors only
    dist.all_reduce(counts)  # trained tokens of the whole global batch: the loss denominator
    # Gradients are averaged over workers, so each worker divides its sum by (global count / world).
    denominator = max(float(counts[0]), 1.0) / world
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=c.bf16 and c.strategy == "ddp")
    for i, m in enumerate(micro):
        last = i == len(micro) - 1
        with _sync_gradients(model, last), autocast:
            inputs = {k: v.to(device) for k, v in m.items() if isinstance(v, torch.Tensor)}
            loss = model(**inputs, num_items_in_batch=denominator, use_cache=False).loss
        loss.backward()
        local_loss += loss.detach().double()
    grad_norm = float("nan")
    if c.max_grad_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], c.max_grad_norm)
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    dist.all_reduce(local_loss)
    return float(local_loss) / world, grad_norm, int(counts[1]), int(counts[0])


def _sync_gradients(model: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """All-reduce gradients only on the last micro batch of a step."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) and not sync:
        return model.no_sync()
    return contextlib.nullcontext()


def build_model(c: LoopConfig, device: torch.device) -> tuple[torch.nn.Module, int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(c.model_path, dtype=torch.float32, trust_remote_code=c.trust_remote_code,
                                                 attn_implementation=c.attn_implementation)
    n_params = sum(p.numel() for p in model.parameters())
    if c.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if c.lora is not None:
        try:
            import peft  # only when asked: GPU images may lack it
        except ModuleNotFoundError as err:
            if err.name != "peft":
                raise
            raise ConfigError(PEFT_MISSING) from err

        targets = c.lora["target_modules"]
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=c.lora["r"], lora_alpha=c.lora["alpha"], lora_dropout=c.lora["dropout"], task_type="CAUSAL_LM",
            target_modules=targets[0] if targets == ["all-linear"] else targets))
    if c.strategy == "fsdp2":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        model.to(device)
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if c.bf16 else None
        layer_classes = set(getattr(model, "_no_split_modules", None) or [])
        for module in model.modules():  # one shard group per decoder layer, then the rest
            if type(module).__name__ in layer_classes:
                fully_shard(module, mp_policy=policy or MixedPrecisionPolicy())
        fully_shard(model, mp_policy=policy or MixedPrecisionPolicy())
        return model, n_params
    # DDP (or nothing for one worker); moves the model to this worker's device.
    return ray.train.torch.prepare_model(model, parallel_strategy="ddp"), n_params


def build_optimizer(c: LoopConfig, model: torch.nn.Module) -> tuple[torch.optim.Optimizer, Any]:
    from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup
    from transformers.optimization import Adafactor

    params = [p for p in model.parameters() if p.requires_grad]
    if c.optimizer == "adafactor":  # as HF Trainer's `--optim adafactor` (the paper's): fixed lr, no scaling
        optimizer = Adafactor(params, lr=c.lr, weight_decay=c.weight_decay, scale_parameter=False,
                              relative_step=False, warmup_init=False)
    else:
        optimizer = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
    total = sum(c.planned_steps) if c.max_steps is None else min(sum(c.planned_steps), c.max_steps)
    if c.lr_schedule == "linear":
        return optimizer, get_linear_schedule_with_warmup(optimizer, c.warmup_steps, max(total, 1))
    return optimizer, get_constant_schedule_with_warmup(optimizer, c.warmup_steps)


def _options(c: LoopConfig, full: bool = True) -> StateDictOptions:
    return StateDictOptions(full_state_dict=full, cpu_offload=True, ignore_frozen_params=c.lora is not None)


def save_checkpoint(c: LoopConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    state: TrainState, rank: int, final: bool = False) -> None:
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_options(c))  # collective under FSDP2
    metrics = {"step": state.step, "phase": state.phase, "done": state.done,
               "loss": state.history[-1]["loss"] if state.history else None}
    name = f"step_{state.step:06d}" + (f"_final_{len(state.sessions)}" if final else "")
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            torch.save(model_sd, f"{tmp}/model.pt")
            torch.save(optim_sd, f"{tmp}/optimizer.pt")
            torch.save(scheduler.state_dict(), f"{tmp}/scheduler.pt")
            Path(tmp, "state.json").write_text(json.dumps(asdict(state)))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)


def load_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    lora: bool) -> TrainState:
    model_sd = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    optim_sd = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=False)
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                   options=StateDictOptions(full_state_dict=True, strict=not lora))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=False))
    return TrainState(**json.loads((folder / "state.json").read_text()))


def save_final_model(c: LoopConfig, model: torch.nn.Module, rank: int) -> None:
    """A plain Hugging Face folder (LoRA merged in) that vLLM and transformers both load."""
    from transformers import AutoTokenizer

    full_sd = None if c.lora else get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                                      cpu_offload=True))
    if rank != 0:
        return
    dtype = torch.bfloat16 if c.save_dtype == "bfloat16" else torch.float32
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    with tempfile.TemporaryDirectory() as tmp:
        if c.lora is not None:
            merged = inner.merge_and_unload()
            merged.to(dtype=dtype).save_pretrained(tmp)
        else:
            inner.save_pretrained(tmp, state_dict={k: v.to(dtype) for k, v in full_sd.items()})
        AutoTokenizer.from_pretrained(c.model_path, trust_remote_code=c.trust_remote_code).save_pretrained(tmp)
        _publish(tmp, c.model_output)


def _publish(local: str, uri: str) -> None:
    """Replace the folder at `uri` (local or s3://) by the local folder."""
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(uri)
    if fs.get_file_info(root).type != pafs.FileType.NotFound:
        fs.delete_dir(root)
    fs.create_dir(root, recursive=True)
    pafs.copy_files(local, root, destination_filesystem=fs)
