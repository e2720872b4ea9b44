"""Starting several vLLM engines on one GPU (a fractional `compute.num_gpus_per_actor`).

vLLM sizes its KV cache from the GPU's free memory, measured around a profiling run: another engine loading
meanwhile makes that measure wrong, or trips vLLM's "Error in memory profiling" check. So the FIRST engine on
a GPU set starts alone, under a file lock per GPU set (the CUDA_VISIBLE_DEVICES that Ray gives the actor) on
the node, and leaves the KV cache size it got next to the lock. Later engines with the same settings in the
same Ray job pass that size as `kv_cache_memory_bytes`, with which vLLM skips the measurement, and start all
at once: four engines on an H100 started one after another took 233 s, ~55 s each (2026-11-24).
A later start that fails with the measured size is retried alone with vLLM's own measurement.
vLLM's own "startup plan" (VLLM_ENABLE_STARTUP_PLAN, 0.26+) reuses a measured size across boots only where
the GPU has as much free memory as when it was measured, which is never true for the second engine on a GPU.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

log = logging.getLogger(__name__)
_KEEP_MEASURED_S = 24 * 3600


def start_sharing_gpu(make: Callable[[dict], Any], kwargs: dict, devices: str | None = None,
                      scope: str | None = None) -> Any:
    """`make(kwargs)` (a `vllm.LLM`), the first start per GPU set measured alone, the later ones together."""
    devices = devices if devices is not None else os.environ.get("CUDA_VISIBLE_DEVICES", "all")
    scope = scope if scope is not None else _ray_job_id()
    measured = _measured_path(devices, kwargs, scope) if scope else None
    with one_start_per_gpu(devices):
        first = _read(measured)
        if first is None:
            llm = make(kwargs)
            if measured is not None:
                _write(measured, llm)
            return llm
    kv_bytes, blocks = first
    log.info("starting beside other engines on GPU %s with the KV cache the first one measured (%.2f GiB)",
             devices, kv_bytes / 2**30)
    try:
        llm = make({**kwargs, "kv_cache_memory_bytes": kv_bytes})
    except Exception as error:  # noqa: BLE001 - any failure: the measured start below is the safe way
        log.warning("engine start with the measured KV cache size failed (%s); starting alone", error)
        with one_start_per_gpu(devices):
            return make(kwargs)
    if _blocks(llm) != blocks:
        log.warning("KV cache of %s blocks where the first engine on GPU %s has %s", _blocks(llm), devices, blocks)
    return llm


def kv_cache_bytes(llm: Any) -> int | None:
    """The bytes of KV cache this engine got: `num_gpu_blocks` blocks of K and V for every layer.

    None where that simple layout does not hold (MLA, hybrid or attention-free models, a quantized or
    otherwise explicit KV cache dtype): such engines keep starting one at a time."""
    import torch

    config = llm.llm_engine.vllm_config  # num_gpu_blocks and block_size as the engine core reported them
    model, cache, parallel = config.model_config, config.cache_config, config.parallel_config
    if (not cache.num_gpu_blocks or cache.cache_dtype != "auto" or model.use_mla or model.is_hybrid
            or model.is_attention_free):
        return None
    per_block_per_layer = (2 * cache.block_size * model.get_num_kv_heads(parallel) * model.get_head_size()
                           * torch.empty((), dtype=model.dtype).element_size())
    return cache.num_gpu_blocks * per_block_per_layer * model.get_num_layers(parallel)


@contextmanager
def one_start_per_gpu(devices: str) -> Iterator[None]:
    """A file lock per GPU set on this node; released when its process dies."""
    with open(_lock_dir() / f"inverse-instruct-vllm-start-gpu-{_safe(devices)}.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            t0 = time.perf_counter()
            log.info("another vLLM engine is starting on GPU %s; this one waits its turn", devices)
            fcntl.flock(lock, fcntl.LOCK_EX)
            log.info("waited %.0f s for GPU %s", time.perf_counter() - t0, devices)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _measured_path(devices: str, kwargs: dict, scope: str) -> Path:
    """Per GPU set, engine settings and Ray job: another job or other settings measure for themselves."""
    key = hashlib.sha256(json.dumps([scope, kwargs], sort_keys=True, default=str).encode()).hexdigest()[:16]
    return _lock_dir() / f"inverse-instruct-vllm-kv-gpu-{_safe(devices)}-{key}.json"


def _write(path: Path, llm: Any) -> None:
    """Leave the first engine's KV cache size for the others; on any trouble they measure for themselves.
    Sizes recorded by jobs over a day ago are deleted: a long-lived node would otherwise keep one per job."""
    try:
        if kv_bytes := kv_cache_bytes(llm):
            path.write_text(json.dumps({"kv_cache_memory_bytes": kv_bytes, "blocks": _blocks(llm)}))
    except Exception as error:  # noqa: BLE001 - another vLLM's config layout, a full disk: not worth a failed start
        log.warning("could not record the KV cache size for other engines on this GPU: %s", error)
    for old in path.parent.glob("inverse-instruct-vllm-kv-gpu-*.json"):
        try:  # a restart reading one meanwhile finds none and measures alone: slower, never wrong
            if time.time() - old.stat().st_mtime > _KEEP_MEASURED_S:
                old.unlink()
        except OSError:
            pass


def _read(path: Path | None) -> tuple[int, int] | None:
    """(KV cache bytes, blocks) of the first engine, or None."""
    try:
        first = json.loads(path.read_text()) if path else None
        return (int(first["kv_cache_memory_bytes"]), int(first["blocks"])) if first else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _blocks(llm: Any) -> int:
    return llm.llm_engine.vllm_config.cache_config.num_gpu_blocks


def _ray_job_id() -> str:
    """The Ray job this process belongs to, or "" outside Ray (then every start measures, one at a time)."""
    try:
        import ray

        return ray.get_runtime_context().get_job_id() if ray.is_initialized() else ""
    except Exception:  # noqa: BLE001 - no Ray, or no job: measure
        return ""


def _lock_dir() -> Path:
    return Path(tempfile.gettempdir())


def _safe(devices: str) -> str:
    return devices.replace(",", "_") or "none"
