"""`inverse-instruct train`: build the data passes, run the Ray Train `TorchTrainer`, write the report.

Output folder (local or s3://):
  checkpoints/   Ray Train run (`step_*` folders, the checkpoint manager's state); re-running the same
                 command resumes from the latest checkpoint (Ray Train V2 restores a run by name), and once
                 the run has finished it is not redone: its manifest is returned (--overwrite starts afresh)
  model/         the final model: a plain Hugging Face folder (LoRA merged in), loadable by vLLM and transformers
  manifest.json  config, versions, data counts (rows dropped, by reason), steps, throughput, restarts
  report.md, loss.png
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import threading
import warnings
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")  # before ray.train is imported: the V2 API only

import ray
import ray.data
from ray.train import CheckpointConfig, DataConfig, FailureConfig, Result, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pipeline import manifest as manifest_lib
from pipeline.config import ConfigError, InputConfig, TrainComputeConfig, TrainConfig, config_changes, to_dict
from pipeline.config.generate import inside
from pipeline.io import check_input, generate_version, input_version, read_corpus
from pipeline.output import OutputDir, folder_holds
from pipeline.models import cap_at_context, check_model_here, model_version, resolve_model_path, stamps_differ
from pipeline.train.data import KEPT, mix_schedule, pack_batch, resolve_prompt_format, tokenize_batch
from pipeline.train.loop import PEFT_MISSING, LoopConfig, train_loop
from pipeline.train.report import write_report

log = logging.getLogger("pipeline.train")
RUN_NAME = "checkpoints"


def train(cfg: TrainConfig, verbose: bool = False, overwrite: bool = False) -> dict[str, Any]:
    from transformers import AutoConfig, AutoTokenizer

    from pipeline.ray_setup import check_fits, check_installed, start_ray

    check_model_here(cfg.model.path)
    phases = plan_phases(cfg)
    sources = sorted({s for p in phases for s in p})
    if not folder_holds(cfg.output, "report.md"):  # not a finished run: every source is read (and tokenized)
        for name in sources:  # so a mistyped path is refused now, not minutes later
            check_input(source_input(cfg, name), source_path_key(name))
    out = OutputDir(cfg.output)
    claim_output(out, cfg, overwrite)
    finished = None if overwrite else finished_run(out)
    if finished is not None:
        log.info("train: %s holds this config's finished run; not redone (--overwrite starts afresh)", out.uri)
        return finished
    start_ray(cfg.compute.ray_address, verbose)
    check_fits(worker_resources(cfg.compute), cfg.compute.num_workers, "training workers",
               "compute.num_workers / use_gpu / cpus_per_worker / resources_per_worker")
    if cfg.lora.enabled:
        check_installed("peft", PEFT_MISSING)
    # Resolved here for the driver's tokenizer (and a missing path's error); the workers get `model.path` as
    # given and resolve it on their nodes, where `embedded` and `s3://` have their own node's cache.
    model_path = resolve_model_path(cfg.model.path, weights=False)
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    prompt_format = resolve_prompt_format(tokenizer, cfg.model.prompt_format)
    max_length = cap_at_context(cfg.data.max_length, "data.max_length", AutoConfig.from_pretrained(
        model_path, trust_remote_code=cfg.model.trust_remote_code))
    log.info("train: %d passes over the data: %s", len(phases), [" + ".join(p) for p in phases])

    data: dict[str, ray.data.Dataset] = {}
    counts: dict[str, dict[str, Any]] = {}
    with ordered_data():  # the datasets keep the setting; later jobs in this process do not inherit it
        for name in sources:
            data[name], counts[name] = prepare_source(cfg, name, prompt_format, max_length)
            log.info("train: %s: %s", name, json.dumps(counts[name], sort_keys=True))
        world, micro = cfg.compute.num_workers, cfg.optim.micro_batch_size
        accum = cfg.optim.global_batch_size // (micro * world)
        planned = [steps_per_pass(sum(counts[s]["sequences"] for s in p), world, micro, accum) for p in phases]
        check_plan(phases, planned, counts, world, max_length)
        datasets = {f"phase{i}": phase_dataset(cfg, i, [data[s] for s in p]) for i, p in enumerate(phases)}
    use_gpu = cfg.compute.use_gpu
    bf16 = cfg.compute.dtype == "bfloat16" or (cfg.compute.dtype == "auto" and use_gpu)
    save_dtype = cfg.checkpoint.save_dtype if cfg.checkpoint.save_dtype != "auto" else ("bfloat16" if use_gpu else "float32")
    loop = LoopConfig(
        model_path=cfg.model.path, phases=[list(p) for p in phases], planned_steps=planned, accum=accum,
        micro_batch_size=micro, pad_id=_pad_id(tokenizer), packing=cfg.data.packing, lr=cfg.optim.lr,
        warmup_steps=cfg.optim.warmup_steps, lr_schedule=cfg.optim.lr_schedule, optimizer=cfg.optim.name,
        weight_decay=cfg.optim.weight_decay, max_grad_norm=cfg.optim.max_grad_norm, max_steps=cfg.optim.max_steps,
        checkpoint_every=cfg.checkpoint.every_steps, strategy=cfg.compute.strategy, bf16=bf16,
        gradient_checkpointing=cfg.model.gradient_checkpointing, attn_implementation=cfg.model.attn_implementation,
        trust_remote_code=cfg.model.trust_remote_code, lora=to_dict(cfg.lora) if cfg.lora.enabled else None,
        peak_flops=cfg.compute.peak_flops, model_output=out.sub("model"), save_dtype=save_dtype, seed=cfg.data.seed,
        verbose=verbose)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=asdict(loop),
        scaling_config=ScalingConfig(num_workers=world, use_gpu=use_gpu,
                                     resources_per_worker=worker_resources(cfg.compute)),
        run_config=RunConfig(name=RUN_NAME, storage_path=out.uri,
                             failure_config=FailureConfig(max_failures=cfg.checkpoint.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.num_to_keep),
                             **ray_train_logging(verbose)),
        datasets=datasets,
        dataset_config=ingest_config(),
    )
    result = fit_keeping_ctrl_c(trainer)
    state = _read_state(result.checkpoint)
    manifest = build_manifest(cfg, prompt_format, max_length, phases, planned, counts, state, out)
    out.write_json("manifest.json", manifest)
    write_report(out, manifest, state["history"])
    return manifest


def fit_keeping_ctrl_c(trainer: TorchTrainer) -> Result:
    """`trainer.fit()` in a helper thread. Called in the main thread, fit installs Ray Train's own Ctrl-C
    handler: it aborts the run, after which the process exits 1 without a word, and it stays installed after
    fit (a Ctrl-C during the loop's later evaluations went to it). In another thread fit installs none, so
    Ctrl-C stays the command's: `interrupted`, exit 130, and the same command resumes from the last
    checkpoint Ray Train registered (as after any other stop)."""
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # noqa: BLE001 - handed to the caller as it is
            outcome["error"] = err

    thread = threading.Thread(target=fit, name="train-fit", daemon=True)  # daemon: Ctrl-C does not wait for it
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.5)  # bounded: the main thread takes Ctrl-C at once on every platform
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def ray_train_logging(verbose: bool) -> dict[str, Any]:
    """RunConfig's arguments for Ray Train's own INFO lines (each worker group start, report and checkpoint:
    20 lines for an 18-step demo run): shown only with -v, as Ray's are elsewhere. Ray 2.60's LoggingConfig;
    an older Ray (the GPU recipe's 2.58) has none and shows them."""
    config = getattr(ray.train, "LoggingConfig", None)
    return {} if verbose or config is None else {"logging_config": config(log_level="WARNING")}


def worker_resources(compute: TrainComputeConfig) -> dict[str, float]:
    """What one training worker asks Ray for."""
    return {"CPU": compute.cpus_per_worker, **compute.resources_per_worker, **({"GPU": 1} if compute.use_gpu else {})}


@contextlib.contextmanager
def ordered_data() -> Iterator[None]:
    """Ray Data `preserve_order` for the datasets created inside: packing groups rows by batch, so the
    training sequences (and a resumed run's skip-ahead) are only reproducible if blocks keep their order
    instead of arriving as tasks finish."""
    ctx = ray.data.DataContext.get_current()
    before, ctx.execution_options.preserve_order = ctx.execution_options.preserve_order, True
    try:
        yield
    finally:
        ctx.execution_options.preserve_order = before


def ingest_config() -> DataConfig:
    """Ray Train's default ingest, made deterministic: with `preserve_order`, `streaming_split` hands out
    blocks by a fixed rule (not by worker speed or locality), so every worker's shard depends only on the
    data and a resumed run's skip-ahead lands exactly where the checkpoint left off."""
    with warnings.catch_warnings():  # Ray's own default passes `exclude_resources`, deprecated in Ray 2.60
        warnings.filterwarnings("ignore", message=r".*`ExecutionOptions.exclude_resources` is deprecated")
        options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return DataConfig(execution_options=options)


def claim_output(out: OutputDir, cfg: TrainConfig, overwrite: bool) -> None:
    """Resume only a run of the same config: Ray Train restores the latest checkpoint by run name, and a
    finished run would otherwise hand back its old model for a new config. `overwrite` starts afresh.
    A folder whose run never reached training (say a mistyped data path failed it) is simply taken."""
    keys = {k: v for k, v in to_dict(cfg).items() if k not in ("output", "compute", "checkpoint")}
    keys["data"]["original"] = to_dict(cfg.data.original_input())  # unset = `embedded`: the same run
    fingerprint = hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]
    # Pairs from a generate output change under the same path when its select stage runs again (a loop
    # rerun with another select config): the run trained on the old ones is not this one either.
    version = generate_version(str(cfg.data.generated)) if cfg.data.generated else None
    # Pairs from a folder of files that no generate run wrote: a stamp of those files, as for the original corpus.
    pairs = input_version(source_input(cfg, "generated")) if cfg.data.generated and version is None else None
    if pairs is not None and inside(cfg.output, str(cfg.data.generated)):
        raise ConfigError(f"output ({cfg.output}) is inside data.generated ({cfg.data.generated}): this run's JSON "
                          f"files would be read as pairs by the next run on them; write the output elsewhere")
    base = model_version(cfg.model.path)  # a base model trained again into its folder is another run too
    original = input_version(cfg.data.original_input())  # so is a corpus whose files changed under its path
    previous = out.read_json("train_config.json")
    changed: list[str] = []  # what makes the folder's run another one, for the refusal
    if previous is not None:
        if previous["fingerprint"] != fingerprint:
            diff = config_changes(previous["config"], keys) if "config" in previous else []
            changed.append(f"another config ({'; '.join(diff)})" if diff else "another config")
        if previous.get("generated_version", version) != version:
            changed.append("other generated pairs (the generate run of data.generated selected them again since)")
        if stamps_differ(previous.get("model_version"), base):
            changed.append("another model at model.path (its files changed since)")
        if stamps_differ(previous.get("generated_files_version"), pairs):
            changed.append("other generated pairs (the files of data.generated changed since)")
        if stamps_differ(previous.get("original_version"), original):
            changed.append("another original corpus (the files of data.original changed since)")
    if previous is not None and (overwrite or changed):
        if not overwrite and (out.exists(RUN_NAME) or out.exists("model")):
            raise ConfigError(f"{out.uri} holds a training run of {' and of '.join(changed)}; use a new --output, "
                              f"or --overwrite to start it afresh")
        for name in (RUN_NAME, "model", "manifest.json", "report.md", "loss.png"):
            out.remove(name)
    out.write_json("train_config.json", {"fingerprint": fingerprint, "config": keys, "generated_version": version,
                                         "generated_files_version": pairs, "model_version": base,
                                         "original_version": original})


def finished_run(out: OutputDir) -> dict[str, Any] | None:
    """The manifest of the run this folder finished, or None. After `claim_output` a folder holds only this
    config's run; its manifest, model and report are written once training is over."""
    if not (out.exists("model") and out.exists("report.md")):
        return None
    return out.read_json("manifest.json")


def plan_phases(cfg: TrainConfig) -> list[tuple[str, ...]]:
    """The mix schedule, without the generated source when none is given."""
    have = {"original"} | ({"generated"} if cfg.data.generated else set())
    phases = mix_schedule(cfg.data.schedule, cfg.data.generated_epochs, cfg.data.original_epochs)
    return [kept for p in phases if (kept := tuple(s for s in p if s in have))]


def source_input(cfg: TrainConfig, name: str) -> InputConfig:
    if name == "generated":  # `selected/` of generate: Parquet with instruction/response columns
        return InputConfig(path=str(cfg.data.generated), response_fields=["response"])  # all of them: the point
    return cfg.data.original_input()


def source_path_key(name: str) -> str:
    """The config key a source's path comes from, for the messages about it."""
    return "data.original.path" if name == "original" else "data.generated"


def prepare_source(cfg: TrainConfig, name: str, prompt_format: str,
                   max_length: int) -> tuple[ray.data.Dataset, dict[str, Any]]:
    """Read -> tokenize -> pack (sequences of up to `max_length` tokens), in Ray Data, materialized once and
    reused by every pass over it."""
    tokenized = read_corpus(source_input(cfg, name), path_key=source_path_key(name)).map_batches(
        tokenize_batch, batch_format="pyarrow", batch_size=256,
        fn_kwargs={"model_path": cfg.model.path, "prompt_format": prompt_format, "max_length": max_length,
                   "trust_remote_code": cfg.model.trust_remote_code}).materialize()
    statuses = {r["status"]: r["count()"] for r in tokenized.groupby("status").count().take_all()}
    packed = tokenized.map_batches(pack_batch, batch_format="pyarrow", batch_size=1024,
                                   fn_kwargs={"max_length": max_length, "packing": cfg.data.packing}
                                   ).materialize()
    rows = sum(statuses.values())
    kept = sum(n for s, n in statuses.items() if s in KEPT)
    tokens = tokenized.sum("n_tokens") if rows else 0
    return packed, {"rows": rows, "examples": kept, "dropped": rows - kept, "by_status": statuses,
                    "tokens": int(tokens or 0), "sequences": packed.count()}


def phase_dataset(cfg: TrainConfig, index: int, parts: list[ray.data.Dataset]) -> ray.data.Dataset:
    ds = parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])
    # A seed per pass: every epoch sees its own order, and a resumed run sees the same one.
    return ds.random_shuffle(seed=cfg.data.seed + index) if cfg.data.shuffle else ds


UNREAD = "read: missing field"  # a row without the field names a source is read by


def check_plan(phases: list[tuple[str, ...]], planned: list[int], counts: dict[str, dict[str, Any]], world: int,
               max_length: int) -> None:
    """A run without a single step is refused: its "tuned" model would be the base model, handed on to an
    evaluation as if trained. A pass without a step (a source whose rows were all dropped) is a warning.
    A pass has no step when it has fewer sequences than workers: Ray Train's equal split gives each none.
    A source none of whose rows has the fields it is read by is refused too: its field names are not configured."""
    for source, c in counts.items():
        if c["rows"] and sum(n for why, n in c["by_status"].items() if why.startswith(UNREAD)) == c["rows"]:
            keys = ("data.original.instruction_field / response_fields / messages_field" if source == "original"
                    else "data.generated, a generate output's selected/ (instruction, response)")
            raise ConfigError(f"train: {source}: none of its {c['rows']} rows has the fields it is read by "
                              f"({', '.join(f'{why} {n}' for why, n in sorted(c['by_status'].items()))}); see {keys}")
    empty = [i for i, n in enumerate(planned) if n == 0]
    if not empty:
        return

    def told(source: str) -> str:
        c = counts[source]
        dropped = ", ".join(f"{why} {n}" for why, n in sorted(c["by_status"].items()) if why not in KEPT)
        return f"{source}: {c['rows']} rows -> {c['sequences']} sequences" + (f" (dropped: {dropped})" if dropped else "")

    sources = sorted({s for i in empty for s in phases[i]})
    why = (f"{'; '.join(told(s) for s in sources)}; a pass needs at least {world} sequence(s), one per worker "
           f"(compute.num_workers={world}); data.max_length={max_length}")
    if len(empty) == len(planned):
        raise ConfigError(f"train: nothing to train: {why}")
    log.warning("train: pass(es) %s have no step: %s", [" + ".join(phases[i]) for i in empty], why)


def steps_per_pass(sequences: int, world: int, micro: int, accum: int) -> int:
    """Optimizer steps of one pass: Ray Train splits a dataset into equal shards (the remainder is dropped)."""
    return math.ceil(math.ceil((sequences // world) / micro) / accum)


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad if pad is not None else 0)


def _read_state(checkpoint: Any) -> dict[str, Any]:
    if checkpoint is None:
        raise RuntimeError("the training run reported no checkpoint")
    with checkpoint.as_directory() as folder:
        return json.loads((Path(folder) / "state.json").read_text())


def build_manifest(cfg: TrainConfig, prompt_format: str, max_length: int, phases: list[tuple[str, ...]],
                   planned: list[int], counts: dict[str, Any], state: dict[str, Any], out: OutputDir) -> dict[str, Any]:
    history = state["history"]
    waited = state["data_seconds"]  # the final checkpoint's TrainState (0 in one resumed from before it was kept)
    seconds = state["seconds"] + waited  # the steps' time, waiting for data included
    return {
        "config": to_dict(cfg),
        "versions": manifest_lib.versions(),
        "model": cfg.model.path,
        "prompt_format": prompt_format,
        "max_length": max_length,  # data.max_length, or the model's context length if that is less
        "phases": [" + ".join(p) for p in phases],
        "planned_steps": planned,
        "steps": state["step"],
        "steps_per_phase": [sum(1 for h in history if h["phase"] == i) for i in range(len(phases))],
        "data": counts,
        "sources": {"generated": cfg.data.generated, "original": cfg.data.original_input().path},
        "throughput": {"tokens": state["tokens"], "label_tokens": state["label_tokens"],
                       "train_seconds": round(seconds, 2), "data_wait_seconds": round(waited, 2),
                       "tokens_per_s": round(state["tokens"] / seconds, 1) if seconds else None,
                       "mfu": history[-1]["mfu"] if history else None},
        "loss": {"first": history[0]["loss"] if history else None, "last": history[-1]["loss"] if history else None},
        "sessions": state["sessions"],
        "resumed_from_step": [s["start_step"] for s in state["sessions"][1:]],
        "outputs": {"model": out.sub("model"), "checkpoints": out.sub(RUN_NAME), "report": out.sub("report.md")},
        "finished_at": datetime.now(timezone.utc).isoformat(),  # the model's version (loop: is an evaluation newer)
    }
