"""`evaluate` end to end through Ray Data (engine actor pool -> sandbox tasks) with the tiny random model."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.config import EvaluateConfig, load_config
from pipeline.evaluate.benchmarks import load_problems
from pipeline.evaluate.run import evaluate

RESULT_KEYS = {"task_id", "passed", "reason", "detail", "seconds", "isolation", "completion", "generation_s"}
REASONS = {"passed", "assertion", "error", "syntax", "exit", "timeout", "memory", "crash"}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_outputs(out: Path, benchmark: str, n: int) -> dict:
    task_ids = [p.task_id for p in load_problems(benchmark, limit=n)]
    samples, results = read_jsonl(out / "samples.jsonl"), read_jsonl(out / "results.jsonl")
    summary = json.loads((out / "summary.json").read_text())
    assert [s["task_id"] for s in samples] == task_ids and all(set(s) == {"task_id", "solution"} for s in samples)
    assert [r["task_id"] for r in results] == task_ids and all(set(r) == RESULT_KEYS for r in results)
    assert all(isinstance(s["solution"], str) for s in samples)
    assert all(r["reason"] in REASONS and r["passed"] == (r["reason"] == "passed") for r in results)
    assert all(r["isolation"] in ("namespace", "audit") and r["seconds"] > 0 for r in results)
    c = summary["counts"]
    assert (summary["benchmark"], c["problems"]) == (benchmark, n)
    assert c["passed"] + c["failed"] == n and sum(c["by_reason"].values()) == n
    assert summary["pass@1"] == c["passed"] / n
    assert summary["sandbox_isolation"] and set(summary["sandbox_isolation"]) <= {"namespace", "audit"}
    assert summary["engine"] == "transformers" and summary["prompt_format"] == "chat"
    assert summary["versions"]["ray"] and summary["config"]["benchmark"]["name"] == benchmark
    assert set(summary["seconds"]) == {"wall", "engine_load", "generation", "execution"}
    assert summary["seconds"]["engine_load"] > 0 and summary["seconds"]["generation"] > 0
    assert summary["engine_crashes"] == {"actor_deaths": 0, "in_flight_at_deaths": 0, "rejected": 0}
    return summary


@pytest.mark.slow
def test_evaluate_humaneval_from_the_command_line(tiny_model, ray_local, tmp_path, caplog):
    out = tmp_path / "he"
    argv = ["evaluate", "--model", tiny_model, "--benchmark", "humaneval", "--limit", "4", "--engine",
            "transformers", "--output", str(out), "--set", "generation.max_new_tokens=24",
            "--set", "compute.batch_size=2", "--set", "compute.progress_every_s=0.2"]
    assert main(argv) == 0
    check_outputs(out, "humaneval", 4)
    progress = [r.getMessage() for r in caplog.records if r.name == "pipeline.progress"]
    assert progress and all(re.match(r"evaluate: [0-4] of 4 completions \(", line) for line in progress), progress
    assert main(argv) == 2  # a finished evaluation is not overwritten by accident
    assert main([*argv, "--overwrite", "--limit", "2"]) == 0
    check_outputs(out, "humaneval", 2)


@pytest.mark.slow
def test_evaluate_mbpp(tiny_model, ray_local, tmp_path):
    cfg = load_config(overrides={"model.path": tiny_model, "model.engine": "transformers", "benchmark.name": "mbpp",
                                 "benchmark.limit": 3, "generation.max_new_tokens": 16,
                                 "output": str(tmp_path / "mbpp")}, schema=EvaluateConfig)
    summary = evaluate(cfg)
    assert check_outputs(tmp_path / "mbpp", "mbpp", 3) == json.loads(json.dumps(summary, default=str))


def test_config_errors_are_reported_before_any_work(capsys, tmp_path):
    assert main(["evaluate", "--set", "sandbox.timeout=3", "--output", str(tmp_path)]) == 2
    assert "sandbox.timeout: unknown config key (did you mean `timeout_s`?)" in capsys.readouterr().err
    assert main(["evaluate", "--set", "benchmark.plus_path=/data/HumanEvalPlus.jsonl", "--output", str(tmp_path)]) == 2
    assert "benchmark.plus_path: cannot read /data/HumanEvalPlus.jsonl" in capsys.readouterr().err
    assert main(["loop", "--set", "benchmarks=[humaneval,mbpp]", "--set",
                 "evaluate.benchmark.plus_path=/data/HumanEvalPlus.jsonl", "--output", str(tmp_path)]) == 2
    assert "evaluate.benchmark.plus_path: one EvalPlus file holds one benchmark" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_evaluate_with_evalplus_tests(tiny_model, ray_local, tmp_path, evalplus_files):
    out = tmp_path / "he-plus"
    assert main(["evaluate", "--model", tiny_model, "--benchmark", "humaneval", "--engine", "transformers",
                 "--output", str(out), "--plus-path", str(evalplus_files["humaneval"]),
                 "--set", "generation.max_new_tokens=16"]) == 0
    results, summary = read_jsonl(out / "results.jsonl"), json.loads((out / "summary.json").read_text())
    assert [r["task_id"] for r in results] == ["HumanEval/0", "HumanEval/2", "HumanEval/32"]  # the file's problems
    plus_keys = {"plus_passed", "plus_reason", "plus_detail", "plus_seconds"}
    assert all(set(r) == RESULT_KEYS | plus_keys for r in results)
    assert all(r["plus_reason"] in REASONS and r["plus_seconds"] > 0 for r in results)
    assert all(r["plus_passed"] == (r["passed"] and r["plus_reason"] == "passed") for r in results)
    c = summary["counts"]
    assert summary["pass@1"] == c["passed"] / 3 and summary["pass@1_plus"] == c["plus"]["passed"] / 3
    assert sum(c["plus"]["by_reason"].values()) == 3 and "EvalPlus" in summary["benchmark_source"]
    assert summary["config"]["benchmark"]["plus_timeout_s"] == 60.0


def test_a_config_error_raised_in_an_engine_actor_is_reported_as_one(tmp_path):
    """A model path missing on the node of an engine actor (or an output folder it does not see) is found where
    the actor starts, and Ray hands the driver only the text of its error: the command still ends with the
    message and exit code 2 of a config error, not a traceback. In its own process: it stops its Ray instance.
    The driver is made to pass the path on, as a cluster's driver does with a path only its nodes may have (on
    its own instance it refuses a missing one itself: test_ray_setup)."""
    args = ["evaluate", "--model", str(tmp_path / "missing"), "--engine", "transformers", "--limit", "1",
            "--output", str(tmp_path / "out")]
    as_on_a_cluster = ("import sys; import pipeline.ray_setup as r; r.check_model_here = lambda path, only_node: None; "
                       f"from pipeline.cli import main; sys.exit(main({args!r}))")
    run = subprocess.run([sys.executable, "-c", as_on_a_cluster], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stderr.rstrip().splitlines()[-1] == (
        f"error: model.path: {tmp_path / 'missing'} does not exist on {socket.gethostname()} (in an engine actor)")
