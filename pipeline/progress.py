"""A log line every `compute.progress_every_s` while engine actors work through a stage: how far, how fast,
how long left.

Ray Data's progress bars are shown only with -v (a block of lines every few seconds in a log file), so without
it a stage that runs for hours on a cluster said nothing between its start and its end. The counts come from
the job's ledger (`pipeline/crash_isolation.py`), which every engine actor already tells when a batch's rows
are done and whether its engine is up.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from typing import Any, Iterator

log = logging.getLogger(__name__)

RATE_WINDOW = 5  # samples: the rate (and so the time left) follows the last few intervals, not the engine start


@contextlib.contextmanager
def progress_lines(ledger: Any, stage: str, unit: str, total: int, already_done: int = 0,
                   every_s: float = 60.0) -> Iterator[None]:
    """Log `stage`'s progress every `every_s` seconds (0 = never) while the block runs. `total` counts
    every row of the stage, `already_done` those finished before this run (a resume)."""
    if every_s <= 0 or total <= already_done:
        yield
        return
    stop = threading.Event()
    thread = threading.Thread(target=_report, args=(ledger, stage, unit, total, already_done, every_s, stop),
                              name=f"progress-{stage}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)


def _report(ledger: Any, stage: str, unit: str, total: int, already_done: int, every_s: float,
            stop: threading.Event) -> None:
    import ray

    start = time.monotonic()
    samples: deque[tuple[float, int]] = deque([(start, 0)], maxlen=RATE_WINDOW + 1)
    while not stop.wait(every_s):
        try:
            now_done, engines_up, summarized = ray.get(ledger.progress.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - a ledger that cannot answer costs a line, never the job
            log.debug("progress: the ledger did not answer", exc_info=True)
            continue
        samples.append((time.monotonic(), now_done))
        log.info("%s", progress_line(stage, unit, total, already_done, list(samples), engines_up, start,
                                     summarized))


def progress_line(stage: str, unit: str, total: int, already_done: int, samples: list[tuple[float, int]],
                  engines_up: int, start: float, summarized: int = 0) -> str:
    """`samples`: (monotonic time, rows finished by this run) pairs, oldest first, the newest being now;
    `summarized`: rows not finished whose candidates are written (a row is finished with its whole batch)."""
    if samples[0][1] == 0:  # the rate counts from the last sample before the first row was done, not the start
        samples = samples[max(i for i, (_, done) in enumerate(samples) if done == 0):]
    (t0, done0), (now, done_now) = samples[0], samples[-1]
    done = min(total, already_done + done_now)  # a batch redone after a crash is counted again
    line = f"{stage}: {done:,} of {total:,} {unit} ({100 * done / total:.1f}%) after {duration(now - start)}"
    if already_done:
        line += f" ({already_done:,} from an earlier run)"
    line += f"; {engines_up} engine{'' if engines_up == 1 else 's'} up"
    if summarized:
        line += f"; {summarized:,} more summarized"
    if done_now == 0:
        return line + (" (starting)" if engines_up == 0 else "")
    rate = (done_now - done0) / (now - t0) if now > t0 else 0.0
    if rate <= 0:
        return line + f"; none finished in the last {duration(now - t0)}"
    speed = f"{rate:.3g} {unit}/s" if rate >= 1 else f"{60 * rate:.3g} {unit}/min"
    return line + f"; {speed} over the last {duration(now - t0)}, about {duration((total - done) / rate)} left"


def duration(seconds: float) -> str:
    """1h02m, 5m00s, 42s."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"
