"""The engine stages' progress lines: what they say at each point of a run."""

from __future__ import annotations

import logging
import time

import pytest
import ray

from pipeline.crash_isolation import CrashLedger, start_ledger
from pipeline.progress import duration, progress_line, progress_lines


def test_durations_read_as_a_person_writes_them():
    assert [duration(s) for s in (0, 42.4, 60, 300, 3599, 3600, 3720, 90000)] == [
        "0s", "42s", "1m00s", "5m00s", "59m59s", "1h00m", "1h02m", "25h00m"]


def test_a_line_before_any_row_is_done_says_whether_the_engines_are_up():
    assert progress_line("inverse", "snippets", 42, 0, [(0, 0), (60, 0)], 0, 0) == (
        "inverse: 0 of 42 snippets (0.0%) after 1m00s; 0 engines up (starting)")
    assert progress_line("inverse", "snippets", 42, 0, [(0, 0), (60, 0)], 1, 0) == (
        "inverse: 0 of 42 snippets (0.0%) after 1m00s; 1 engine up")


def test_the_rate_and_time_left_follow_the_recent_samples():
    # 5 minutes of engine start, then 10 snippets/s: the window holds only the last 2 minutes.
    samples = [(300, 0), (360, 600), (420, 1200)]
    assert progress_line("inverse", "snippets", 37200, 0, samples, 2, 0) == (
        "inverse: 1,200 of 37,200 snippets (3.2%) after 7m00s; 2 engines up; "
        "10 snippets/s over the last 2m00s, about 1h00m left")
    # Early on the window still holds the engine start: the rate counts from the last minute with none done
    # (the demo said "0.0333 snippets/s over the last 4m00s, about 9m01s left" here: 3 minutes were the start).
    samples = [(0, 0), (60, 0), (120, 0), (180, 0), (240, 8)]
    assert progress_line("inverse", "snippets", 26, 0, samples, 1, 0) == (
        "inverse: 8 of 26 snippets (30.8%) after 4m00s; 1 engine up; "
        "8 snippets/min over the last 1m00s, about 2m15s left")


def test_a_resumed_run_counts_the_earlier_rows_and_never_passes_the_total():
    line = progress_line("inverse", "snippets", 100, 40, [(0, 0), (30, 30)], 1, 0)
    assert line.startswith("inverse: 70 of 100 snippets (70.0%) after 30s (40 from an earlier run); 1 engine up; "
                           "1 snippets/s over the last 30s, about 30s left")
    # A batch redone after an engine crash is counted twice by the ledger.
    assert progress_line("evaluate", "completions", 10, 0, [(0, 0), (5, 12)], 1, 0).startswith(
        "evaluate: 10 of 10 completions (100.0%)")


def test_a_stalled_stage_says_so():
    assert progress_line("inverse", "snippets", 100, 0, [(0, 10), (60, 10)], 1, 0).endswith(
        "1 engine up; none finished in the last 1m00s")


def test_the_ledger_counts_rows_done_including_rejected_ones():
    ledger = CrashLedger()
    ledger.engine_opened("p1")
    ledger.begin("p1", ["a", "b"])
    assert ledger.progress() == (0, 1, 0)
    ledger.summarized_now(["a"])  # its candidates are written; its batch is not done
    assert ledger.progress() == (0, 1, 1)
    ledger.end("p1", ["a", "b"])
    ledger.end("p1", ["convicted"])  # rejected without a run: done all the same
    assert ledger.progress() == (3, 1, 0)
    ledger.summarized_now(["a"])  # told late, after its batch was done: not counted again
    ledger.begin("p2", ["c"])
    ledger.summarized_now(["c"])
    ledger.examine(["c"])  # handed out again (p2 died): it starts over
    assert ledger.progress() == (3, 1, 0)


def test_snippets_summarized_but_not_done_are_said():
    assert progress_line("inverse", "snippets", 18, 0, [(0, 0), (240, 0)], 1, 0, summarized=11) == (
        "inverse: 0 of 18 snippets (0.0%) after 4m00s; 1 engine up; 11 more summarized")


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "pipeline.progress"]


def _wait_for_line(caplog, prefix: str, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not any(line.startswith(prefix) for line in _lines(caplog)):
        assert time.monotonic() < deadline, (prefix, _lines(caplog))
        time.sleep(0.02)


def test_lines_are_logged_while_the_block_runs_and_stop_with_it(ray_local, caplog):
    caplog.set_level(logging.INFO, logger="pipeline.progress")
    ledger = start_ledger()  # the real ledger actor, told what engine actors tell it
    try:
        with progress_lines(ledger, "inverse", "snippets", 4, every_s=0.05):
            _wait_for_line(caplog, "inverse: 0 of 4 snippets (0.0%)")
            assert _lines(caplog)[0].endswith("0 engines up (starting)")
            ray.get([ledger.engine_opened.remote("p1"), ledger.end.remote("p1", ["a", "b"])])
            _wait_for_line(caplog, "inverse: 2 of 4 snippets (50.0%)")
            ray.get(ledger.end.remote("p1", ["c", "d"]))
            _wait_for_line(caplog, "inverse: 4 of 4 snippets (100.0%)")
        count = len(_lines(caplog))
        time.sleep(0.3)
        assert len(_lines(caplog)) == count  # stopped with the block
        assert any("1 engine up; " in line and "snippets/s over the last" in line for line in _lines(caplog))
    finally:
        ray.kill(ledger)


@pytest.mark.parametrize("every_s, total, done", [(0, 10, 0), (0.05, 10, 10)])
def test_no_lines_when_turned_off_or_nothing_is_left(ray_local, caplog, every_s, total, done):
    caplog.set_level(logging.INFO, logger="pipeline.progress")
    with progress_lines(None, "inverse", "snippets", total, done, every_s=every_s):
        time.sleep(0.3)
    assert not _lines(caplog)
