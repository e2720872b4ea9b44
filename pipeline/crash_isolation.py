"""Find the snippet that kills the engine, reject it, and let the rest of the run go on.

Used by both engine-actor jobs: `generate` (rows = snippets) and `evaluate` (rows = benchmark problems).

An engine that dies (a CUDA error on one odd prompt, a segfault in a kernel) takes its actor down; Ray
restarts the actor and retries the batches it held (`restart_actor_if_engine_dead`). If one snippet kills
every engine it reaches, that alone would use up `compute.max_actor_restarts` and fail the whole job. So:

- A `CrashLedger` (one small Ray actor per job stage) knows which snippets each actor process has in
  its engine. A snippet that is handed out again while still marked in flight in another process was in
  that process when it died: the ledger notes the crash and how many snippets were in flight with it.
- An actor asks the ledger before a batch: snippets never in a crash run as usual, together; a snippet
  that was in a crash runs again ALONE (no other batch of that actor in its engine meanwhile); a snippet
  that has been in two crashes, the last one alone in its engine, is rejected ("engine crash") without
  another try.

The ledger also counts the rows done (and those with their candidates written) and knows which actors have
their engine up, for the driver's sake: its progress lines (pipeline/progress.py), and its exit: Ray retires
a stage's actors in the background once its work is done, and a driver that ends first takes the local Ray
instance down with them, before they have closed their engines (vLLM's engine core leaves its shared memory
in /dev/shm then). So `job_ledger` waits, bounded, until every engine is closed.

One poisonous snippet costs two actor restarts. The price of a crash that no snippet caused (a spot node
taken back, the OOM killer) is that the snippets in flight run again one at a time, slower but with the
same results; only a second unrelated crash during exactly one of those solo runs would reject a good one.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from typing import Any, Callable, Iterator

import pyarrow as pa

log = logging.getLogger(__name__)

REASON = "engine crash"


def convicted(crash_sizes: list[int]) -> bool:
    """Given the snippets in flight at each crash a snippet was in: did it kill the engine by itself?
    One crash alone is not enough: the OOM killer may strike a batch of one."""
    return len(crash_sizes) >= 2 and crash_sizes[-1] == 1


class CrashLedger:
    """Plain bookkeeping (a Ray actor in a run, see `start_ledger`); every method is cheap."""

    def __init__(self) -> None:
        self.in_flight: dict[str, set[str]] = {}  # process -> snippet ids in its engine (frozen once it dies)
        self.holder: dict[str, str] = {}  # snippet id -> the process it is in flight in
        self.crashes: dict[str, list[int]] = {}  # snippet id -> snippets in flight at each crash it was in
        self.dead: set[str] = set()
        self.rejected: set[str] = set()
        self.engines_up: set[str] = set()  # processes whose engine is open
        self.finished = 0  # rows done (scored, or rejected here), for the driver's progress lines
        self.summarized: set[str] = set()  # in flight, with their candidates written (generate's step 2 done)

    def examine(self, ids: list[str]) -> dict[str, list[int]]:
        """The crash history of each snippet about to run. A snippet still in flight elsewhere is being
        retried: Ray Data hands a batch out again only after the actor holding it died."""
        self.summarized.difference_update(ids)  # handed out again: they start over
        for i in ids:
            process = self.holder.pop(i, None)
            if process is not None:
                self.dead.add(process)
                self.crashes.setdefault(i, []).append(len(self.in_flight[process]))
        history = {i: self.crashes[i] for i in ids if i in self.crashes}
        self.rejected.update(i for i, sizes in history.items() if convicted(sizes))
        return history

    def begin(self, process: str, ids: list[str]) -> None:
        self.in_flight.setdefault(process, set()).update(ids)
        self.holder.update((i, process) for i in ids)

    def summarized_now(self, ids: list[str]) -> None:
        self.summarized.update(i for i in ids if i in self.holder)  # (a late report after `end` is dropped)

    def end(self, process: str, ids: list[str]) -> None:
        self.finished += len(ids)
        self.summarized.difference_update(ids)
        for i in ids:
            self.in_flight.get(process, set()).discard(i)
            if self.holder.get(i) == process:
                del self.holder[i]

    def engine_opened(self, process: str) -> None:
        self.engines_up.add(process)

    def engine_closed(self, process: str) -> None:
        self.engines_up.discard(process)

    def engines_open(self) -> int:
        """Engines still to be closed; a process known to have died has nothing left to close."""
        return len(self.engines_up - self.dead)

    def progress(self) -> tuple[int, int, int]:
        """(rows done, engines up, rows in flight with their candidates written): see pipeline/progress.py."""
        return self.finished, self.engines_open(), len(self.summarized)

    def summary(self) -> dict[str, int]:
        """For the run manifest."""
        return {"actor_deaths": len(self.dead), "in_flight_at_deaths": len(self.crashes),
                "rejected": len(self.rejected)}


def start_ledger() -> Any:
    """The ledger as a Ray actor owned by the driver (it ends with the job). No CPU reserved: it only
    answers a few calls per batch. Restarted if its node goes; it then starts with an empty ledger."""
    import ray

    return ray.remote(CrashLedger).options(num_cpus=0, max_restarts=-1, max_task_retries=-1).remote()


@contextlib.contextmanager
def job_ledger(close_timeout_s: float = 60) -> Iterator[Any]:
    """A ledger for one job's engine actors, stopped when the job's Ray Data work is over (or failed).
    When the work succeeded, first waits (at most `close_timeout_s`) until the retired actors have
    closed their engines."""
    import ray

    ledger = start_ledger()
    try:
        yield ledger
        wait_for_engines_closed(ledger, close_timeout_s)
    finally:
        ray.kill(ledger)


def wait_for_engines_closed(ledger: Any, timeout_s: float) -> None:
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            left = ray.get(ledger.engines_open.remote(), timeout=max(1.0, deadline - time.monotonic()))
        except Exception:  # noqa: BLE001 - a ledger that cannot answer costs only the wait, never the job
            log.warning("crash ledger: engines_open failed; not waiting for the engines to close", exc_info=True)
            return
        if not left:
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    log.warning("%d engine actor(s) had not closed their engine %.0f s after the stage's work ended; going on "
                "without them (what their engines leave, such as vLLM's shared memory in /dev/shm, may stay)",
                left, timeout_s)


class EngineTurns:
    """Who may have work in the actor's engine: any number of shared turns (ordinary batches) or one
    exclusive turn (a snippet that was in a crash). A waiting exclusive turn goes before new shared ones."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive and not self._waiting)
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            self._cond.wait_for(lambda: not self._exclusive and not self._shared)
            self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


Score = Callable[[pa.Table], pa.Table]
Reject = Callable[[pa.Table, list[str]], pa.Table]  # (rows, detail per row) -> output rows with REASON


class CrashIsolation:
    """One per engine actor: runs its batches through the ledger as described above. `id_column` names
    each row uniquely within the run (snippets: `id`; benchmark problems: `task_id`).

    Made once the actor's engine is up, which it tells the ledger; `engine_closed` says it is closed."""

    def __init__(self, ledger: Any, id_column: str = "id") -> None:
        self.ledger, self.id_column = ledger, id_column
        self.process = uuid.uuid4().hex  # a restarted actor is a new process with a new id
        self.turns = EngineTurns()
        self._ask("engine_opened", self.process)

    def engine_closed(self) -> None:
        # Quiet: when the job failed (or the driver's wait ran out) the ledger is gone already, and a
        # retired actor has nothing to say about that.
        self._ask("engine_closed", self.process, timeout_s=10, failure_level=logging.DEBUG)

    def summarized(self, row_id: str) -> None:
        """Row `row_id` has its candidates written (its judging, or the rest of its batch, is still to come):
        for the progress lines, which otherwise move only when a whole batch is done (minutes on a laptop).
        Never waited for: called on the engine's own loop thread (one small call per snippet)."""
        try:
            self.ledger.summarized_now.remote([row_id])
        except Exception:  # noqa: BLE001 - a progress count is never worth a batch
            log.debug("crash ledger: summarized_now failed", exc_info=True)

    def run(self, batch: pa.Table, score: Score, reject: Reject) -> pa.Table:
        ids = batch.column(self.id_column).to_pylist()
        history = self._ask("examine", ids) or {}
        guilty = [r for r, i in enumerate(ids) if convicted(history.get(i, []))]
        suspects = [r for r, i in enumerate(ids) if i in history and r not in guilty]
        ordinary = [r for r, i in enumerate(ids) if i not in history]
        if history:
            log.warning("%d row(s) of this batch were in an engine that died: %d run alone, %d rejected",
                        len(history), len(suspects), len(guilty))
        parts: list[tuple[list[int], pa.Table]] = []
        if guilty:
            details = [f"the engine died {len(history[ids[r]])} times with this snippet in flight, the last "
                       "time with no other snippet; not tried again" for r in guilty]
            parts.append((guilty, reject(batch.take(guilty), details)))
            self._ask("end", self.process, [ids[r] for r in guilty])  # done: counted in the progress lines
        if ordinary:
            parts.append((ordinary, self._turn(batch, ordinary, score, self.turns.shared)))
        for r in suspects:
            parts.append(([r], self._turn(batch, [r], score, self.turns.exclusive)))
        rows = [r for part_rows, _ in parts for r in part_rows]
        table = pa.concat_tables([t for _, t in parts])
        return table.take(sorted(range(len(rows)), key=rows.__getitem__))  # the batch's order

    def _turn(self, batch: pa.Table, rows: list[int], score: Score,
              turn: Callable[[], contextlib.AbstractContextManager]) -> pa.Table:
        part = batch.take(rows)
        ids = part.column(self.id_column).to_pylist()
        with turn():
            self._ask("begin", self.process, ids)
            out = score(part)
            self._ask("end", self.process, ids)
        return out

    def _ask(self, method: str, *args: Any, timeout_s: float = 60, failure_level: int = logging.WARNING) -> Any:
        """Best effort: a ledger that cannot be reached costs only the isolation, never the batch."""
        import ray

        try:
            return ray.get(getattr(self.ledger, method).remote(*args), timeout=timeout_s)
        except ray.exceptions.ActorDiedError:  # the driver stopped it (the ledger restarts otherwise): the
            # job is over (interrupted, failed) and this actor about to go; its batch's result goes nowhere
            log.debug("crash ledger: gone (the job is over); %s not recorded", method)
            return None
        except Exception:  # noqa: BLE001
            log.log(failure_level, "crash ledger: %s failed; going on without it for this call", method,
                    exc_info=True)
            return None
