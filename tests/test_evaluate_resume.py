"""`evaluate` started again on the same --output after a stop: it keeps the results written so far, evaluates
only the rest, and never mixes the results of two configs or two models in one summary."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.config import ConfigError, EvaluateConfig, load_config
from pipeline.evaluate.run import RESULT_SCHEMA, RESULTS_SO_FAR, STARTED, _earlier_results, evaluate
from pipeline.output import OutputDir
from tests.process_tools import kill_session
from tests.test_generate import _cli_env


def _config(output: Path, model: str = "embedded", **overrides: object) -> EvaluateConfig:
    return load_config(overrides={"output": str(output), "model.path": model, "model.engine": "transformers",
                                  **overrides}, schema=EvaluateConfig)


def _results(task_ids: list[str]) -> pa.Table:
    return pa.Table.from_pylist([{"index": i, "task_id": t, "completion": f"return {i}", "solution": f"return {i}",
                                  "passed": i % 2 == 0, "reason": "passed" if i % 2 == 0 else "assertion",
                                  "detail": "", "seconds": 0.1, "generation_s": 0.5, "engine_load_s": None,
                                  "prompt_format": "chat", "isolation": "audit"}
                                 for i, t in enumerate(task_ids)], schema=RESULT_SCHEMA)


def _stopped_run(cfg: EvaluateConfig, task_ids: list[str]) -> OutputDir:
    """What a run stopped after one batch leaves: its config and that batch's results."""
    out = OutputDir(cfg.output)
    assert _earlier_results(out, cfg, overwrite=False, replace_stale=False) == []  # a new folder: nothing
    out.write_parquet(f"{RESULTS_SO_FAR}/a.parquet", _results(task_ids))
    return out


def test_the_same_config_gets_the_results_of_the_stopped_run(tmp_path):
    cfg = _config(tmp_path / "out")
    out = _stopped_run(cfg, ["HumanEval/0", "HumanEval/1"])
    (tmp_path / "out" / RESULTS_SO_FAR / "b.parquet").write_bytes(b"PAR1 cut short")  # a killed writer's file
    # Another limit, batch size, engine memory or progress interval does not change a problem's result.
    same = _config(tmp_path / "out", **{"benchmark.limit": 5, "compute.batch_size": 2,
                                        "model.cpu_memory_utilization": 0.2, "compute.progress_every_s": 0})
    rows = _earlier_results(out, same, overwrite=False, replace_stale=False)
    assert [(r["task_id"], r["completion"], r["passed"]) for r in rows] == [
        ("HumanEval/0", "return 0", True), ("HumanEval/1", "return 1", False)]
    assert not (tmp_path / "out" / RESULTS_SO_FAR / "b.parquet").exists()


def test_another_config_is_refused_unless_asked_to_replace_it(tmp_path):
    out = _stopped_run(_config(tmp_path / "out"), ["HumanEval/0"])
    changed = _config(tmp_path / "out", **{"generation.max_new_tokens": 64, "sandbox.timeout_s": 3.0})
    with pytest.raises(ConfigError) as refused:
        _earlier_results(out, changed, overwrite=False, replace_stale=False)
    assert str(refused.value) == (
        f"output {out.uri} holds part of an evaluation of another config (generation.max_new_tokens: "
        f"512 -> 64; sandbox.timeout_s: 10.0 -> 3.0); use a new --output, or --overwrite to start afresh")
    assert out.read_tables(RESULTS_SO_FAR)  # a refusal keeps the work
    # loop's way (replace what does not match), and --overwrite: start afresh, this config recorded.
    for overwrite, replace_stale in ((False, True), (True, False)):
        out.write_parquet(f"{RESULTS_SO_FAR}/a.parquet", _results(["HumanEval/0"]))
        assert _earlier_results(out, changed, overwrite, replace_stale) == []
        assert not out.read_tables(RESULTS_SO_FAR)
        assert out.read_json(STARTED)["config"]["generation"]["max_new_tokens"] == 64


def test_another_model_at_the_same_path_is_refused(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights of the first training")
    out = _stopped_run(_config(tmp_path / "out", str(model)), ["HumanEval/0"])
    (model / "model.safetensors").write_bytes(b"weights of a second training")  # trained again, same folder
    with pytest.raises(ConfigError, match=r"of another model at model.path \(its files changed since\)"):
        _earlier_results(out, _config(tmp_path / "out", str(model)), overwrite=False, replace_stale=False)


def test_a_finished_evaluation_is_not_replaced_by_accident(tmp_path):
    cfg = _config(tmp_path / "out")
    out = _stopped_run(cfg, ["HumanEval/0"])
    out.write_json("summary.json", {"pass@1": 0.5})
    with pytest.raises(ConfigError, match="already holds an evaluation"):
        _earlier_results(out, cfg, overwrite=False, replace_stale=True)
    assert _earlier_results(out, cfg, overwrite=True, replace_stale=False) == []
    assert not out.exists("summary.json") and not out.read_tables(RESULTS_SO_FAR)


@pytest.mark.slow
def test_a_run_stopped_after_its_last_batch_only_writes_the_files(tiny_model, ray_local, tmp_path):
    """Stopped between its last batch and summary.json: nothing is left to generate, so no engine starts; each
    problem counts once."""
    cfg = _config(tmp_path / "out", tiny_model, **{"benchmark.limit": 3})
    out = _stopped_run(cfg, ["HumanEval/2", "HumanEval/0"])
    for name in ("b", "c"):  # two runs at once on one folder: HumanEval/1 written by both
        out.write_parquet(f"{RESULTS_SO_FAR}/{name}.parquet", _results(["HumanEval/1"]))
    summary = evaluate(cfg)
    assert summary["resumed_from"] == 3 and summary["counts"]["problems"] == 3
    assert summary["engine_crashes"]["actor_deaths"] == 0 and summary["seconds"]["engine_load"] == 0
    results = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [(r["task_id"], r["completion"]) for r in results] == [  # in the benchmark's order
        ("HumanEval/0", "return 1"), ("HumanEval/1", "return 0"), ("HumanEval/2", "return 0")]
    assert not (tmp_path / "out" / "_work").exists()


def _evaluate_cli(model: str, output: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "evaluate", "--model", model, "--engine", "transformers",
            "--limit", "16", "--output", str(output), "--set", "generation.max_new_tokens=48",
            "--set", "compute.batch_size=1"]


@pytest.mark.slow
def test_a_killed_evaluation_resumes_where_it_stopped(tiny_model, tmp_path):
    env = _cli_env()
    full = tmp_path / "full"  # reference: an uninterrupted run
    subprocess.run(_evaluate_cli(tiny_model, full), env=env, check=True, capture_output=True, timeout=600)

    cut = tmp_path / "cut"
    proc = subprocess.Popen(_evaluate_cli(tiny_model, cut), env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    # Three files: the last may be cut short by the kill (and then deleted), two are whole.
    while time.time() < deadline and len(list(cut.glob(f"{RESULTS_SO_FAR}/*.parquet"))) < 3 and proc.poll() is None:
        time.sleep(0.1)
    assert proc.poll() is None, "the run finished before it could be stopped"
    kill_session(proc)  # the driver, the local Ray instance it started, Ray's workers
    assert not (cut / "summary.json").exists()

    done = subprocess.run(_evaluate_cli(tiny_model, cut), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((cut / "summary.json").read_text())
    assert 2 <= summary["resumed_from"] < 16 and summary["counts"]["problems"] == 16
    assert "from an earlier run) in " in done.stdout and "resuming in" in done.stderr
    assert not (cut / "_work").exists()
    for name in ("samples.jsonl", "results.jsonl"):  # what the uninterrupted run wrote, but the timings
        kept = [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "generation_s")}
                for line in (cut / name).read_text().splitlines()]
        assert kept == [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "generation_s")}
                        for line in (full / name).read_text().splitlines()], name
