"""A snippet that kills every engine it reaches is found, rejected with its reason, and the run goes on.

The ledger and the turns are checked as plain objects; `CrashIsolation` against a real ledger actor, with
"death" played by a score function that raises before the batch ends; and `generate` and `evaluate` end
to end, where an actor process really exits (as a segfault in a kernel would end it) whenever a poisonous
row reaches its engine, and Ray restarts it.
"""

from __future__ import annotations

import json
import os
import threading
import time

import pyarrow as pa
import pytest
import ray

from pipeline.config import load_config
from pipeline.crash_isolation import REASON, CrashIsolation, CrashLedger, EngineTurns, job_ledger, start_ledger
from tests.test_generate import read, tiny_overrides


def test_the_ledger_notes_a_crash_when_a_snippet_in_flight_is_handed_out_again():
    ledger = CrashLedger()
    assert ledger.examine(["a", "b", "c"]) == {}
    ledger.begin("p1", ["a", "b"])
    ledger.begin("p1", ["c"])  # a second batch of the same actor
    ledger.end("p1", ["c"])  # finished: not in the crash
    assert ledger.examine(["a", "b", "c"]) == {"a": [2], "b": [2]}  # p1 died with 2 snippets in flight
    ledger.begin("p2", ["a"])  # run alone, and p2 dies too
    assert ledger.examine(["a"]) == {"a": [2, 1]}
    ledger.begin("p3", ["b"])
    ledger.end("p3", ["b"])  # run alone, finished
    assert ledger.examine(["b"]) == {"b": [2]}
    assert ledger.summary() == {"actor_deaths": 2, "in_flight_at_deaths": 2, "rejected": 1}


def test_one_crash_alone_is_not_enough_to_reject_a_snippet():
    """A batch of one killed by the OOM killer: its snippet runs again (alone), and is rejected only if
    the engine dies with it a second time."""
    ledger = CrashLedger()
    ledger.examine(["x"])
    ledger.begin("p1", ["x"])
    assert ledger.examine(["x"]) == {"x": [1]} and ledger.summary()["rejected"] == 0
    ledger.begin("p2", ["x"])
    assert ledger.examine(["x"]) == {"x": [1, 1]} and ledger.summary()["rejected"] == 1


def test_the_ledger_counts_engines_open_until_closed_or_their_process_died():
    ledger = CrashLedger()
    for process in ("p1", "p2", "p3"):
        ledger.engine_opened(process)
    ledger.engine_closed("p1")
    ledger.begin("p2", ["a"])
    ledger.examine(["a"])  # handed out again: p2 died with it in flight, and its engine with it
    assert ledger.engines_open() == 1
    ledger.engine_closed("p3")
    assert ledger.engines_open() == 0


def test_the_wait_for_engines_to_close_is_bounded(ray_local, caplog):
    """An actor lost without a word (its node gone) must not hold the driver: it waits at most the bound."""
    t0 = time.monotonic()
    with job_ledger(close_timeout_s=2) as ledger:
        ray.get(ledger.engine_opened.remote("never closes"))
    assert 2 <= time.monotonic() - t0 < 30
    assert "1 engine actor(s) had not closed their engine 2 s after" in caplog.text


def test_an_exclusive_turn_waits_for_shared_ones_and_goes_before_new_ones():
    turns, events = EngineTurns(), []
    first_in = threading.Event()

    def shared(name: str, hold: float, started: threading.Event | None = None) -> None:
        with turns.shared():
            events.append(f"{name} in")
            if started:
                started.set()
            time.sleep(hold)
            events.append(f"{name} out")

    def exclusive() -> None:
        with turns.exclusive():
            events.append("solo in")
            time.sleep(0.05)
            events.append("solo out")

    threads = [threading.Thread(target=shared, args=("one", 0.5, first_in))]
    threads[0].start()
    first_in.wait()
    threads.append(threading.Thread(target=exclusive))
    threads[1].start()
    deadline = time.monotonic() + 10
    while not turns._waiting and "solo in" not in events and time.monotonic() < deadline:
        time.sleep(0.01)  # until the exclusive turn waits (on a busy machine it may take a while)
    threads.append(threading.Thread(target=shared, args=("two", 0.0)))
    threads[2].start()
    for t in threads:
        t.join(5)
    assert events == ["one in", "one out", "solo in", "solo out", "two in", "two out"]


def _batch(ids: list[str]) -> pa.Table:
    return pa.table({"id": ids, "code": [f"code of {i}" for i in ids]})


class Died(Exception):
    """Plays an actor's death: the batch raises before it ends, so the ledger still has it in flight."""


def test_isolation_runs_crash_suspects_alone_and_rejects_the_one_that_crashes_alone(ray_local):
    ledger, batch = start_ledger(), _batch(["a", "b", "poison", "d"])
    calls: list[list[str]] = []

    def score(part: pa.Table) -> pa.Table:
        ids = part.column("id").to_pylist()
        calls.append(ids)
        if "poison" in ids:
            raise Died
        return part.append_column("result", pa.array([f"scored {i}" for i in ids]))

    def reject(part: pa.Table, details: list[str]) -> pa.Table:
        return part.append_column("result", pa.array([f"{REASON}: {d}" for d in details]))

    with pytest.raises(Died):  # process 1: the batch runs together and dies
        CrashIsolation(ledger).run(batch, score, reject)
    assert calls == [["a", "b", "poison", "d"]]

    calls.clear()
    with pytest.raises(Died):  # process 2: every snippet of the batch was in the crash, so each runs alone
        CrashIsolation(ledger).run(batch, score, reject)
    assert calls == [["a"], ["b"], ["poison"]]

    calls.clear()  # process 3: the poison is not run again; a, b are done; d still needs its solo run
    out = CrashIsolation(ledger).run(batch, score, reject)
    # a and b finished in process 2, but their rows were lost with it: they run again, still alone
    assert calls == [["a"], ["b"], ["d"]]
    assert out.column("id").to_pylist() == ["a", "b", "poison", "d"]  # the batch's order
    results = out.column("result").to_pylist()
    assert results[0] == "scored a" and results[3] == "scored d"
    assert results[2].startswith(f"{REASON}: the engine died 2 times")

    calls.clear()  # a later batch without crash suspects runs together again
    CrashIsolation(ledger).run(_batch(["e", "f"]), score, reject)
    assert calls == [["e", "f"]]
    assert ray.get(ledger.summary.remote()) == {
        "actor_deaths": 2, "in_flight_at_deaths": 4, "rejected": 1}


@pytest.mark.slow
def test_a_snippet_that_kills_every_engine_is_rejected_and_the_run_completes(
        ray_local, tiny_model, corpus, tmp_path, monkeypatch):
    import pipeline.generate
    from pipeline.generate import generate
    from pipeline.inverse import InverseInstruct

    class PoisonedEngine(InverseInstruct):  # defined here: Ray pickles it by value into the actor
        def _score(self, batch):
            if any("# POISON" in code for code in batch.column("code").to_pylist()):
                os._exit(1)  # the whole actor process goes, as with a segfault in a kernel
            return super()._score(batch)

    monkeypatch.setattr(pipeline.generate, "InverseInstruct", PoisonedEngine)
    folder = tmp_path / "input"
    folder.mkdir()
    rows = [r for r in corpus if "```python" in r["output"]][:7]  # each makes a snippet
    rows.insert(3, {"instruction": "x", "output": "```python\n# POISON\nprint('kills every engine')\n```"})
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    # One batch of all 8: the first death has them all in flight, so each runs alone until the poison
    # dies alone; the snippets after it in the batch then still need their solo run.
    manifest = generate(load_config(overrides=tiny_overrides(tiny_model, folder, out, **{"compute.batch_size": 8})))

    assert manifest["all_rows_accounted_for"]
    assert manifest["engine_crashes"] == {"actor_deaths": 2, "in_flight_at_deaths": 8, "rejected": 1}
    c = manifest["counts"]
    assert c["rejected_by_stage_and_reason"].get(f"inverse/{REASON}") == 1
    crashed = [r for r in read(out / "rejected", ["id"]) if r["reason"] == REASON]
    assert [r["source_index"] for r in crashed] == [3]
    scored = read(out / "_work" / "scored", ["id"])
    assert len(scored) == c["snippets"]
    assert all(len(r["scores"]) == 3 for r in scored if r["reason"] is None)


@pytest.mark.slow
def test_a_prompt_that_kills_every_engine_fails_its_problem_not_the_evaluation(
        ray_local, tiny_model, tmp_path, monkeypatch):
    import pipeline.evaluate.run
    from pipeline.config import EvaluateConfig
    from pipeline.evaluate.run import Completer, evaluate

    class PoisonedEngine(Completer):  # defined here: Ray pickles it by value into the actor
        def _complete_batch(self, batch):
            if "HumanEval/1" in batch.column("task_id").to_pylist():
                os._exit(1)
            return super()._complete_batch(batch)

    monkeypatch.setattr(pipeline.evaluate.run, "Completer", PoisonedEngine)
    out = tmp_path / "eval"
    summary = evaluate(load_config(overrides={
        "model.path": tiny_model, "model.engine": "transformers", "benchmark.limit": 4,
        "generation.max_new_tokens": 8, "compute.batch_size": 2, "output": str(out)}, schema=EvaluateConfig))

    assert summary["engine_crashes"] == {"actor_deaths": 2, "in_flight_at_deaths": 2, "rejected": 1}
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["task_id"] for r in results] == [f"HumanEval/{i}" for i in range(4)]
    crashed = [r["task_id"] for r in results if r["reason"] == REASON]
    assert crashed == ["HumanEval/1"] and not results[1]["passed"]
    assert summary["counts"]["problems"] == 4 and summary["counts"]["by_reason"][REASON] == 1
