"""The GPU benchmarks' shared parts, and every benchmark script at least starts (CI has no GPU to run them;
a session with the H100 has no time to debug them)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.common import SHAPES, build_model, forced_length, load_snippets, spearman

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p.stem for p in (REPO / "benchmarks").glob("*.py") if p.stem not in ("__init__", "common"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_benchmark_script_imports_and_explains_itself(script):
    done = subprocess.run([sys.executable, "-m", f"benchmarks.{script}", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout


@pytest.mark.parametrize("name, billions", [("qwen2-1.5b", 1.39), ("llama-6.7b", 6.88)])
def test_random_weight_shapes_have_the_size_they_claim(name, billions, tmp_path):
    # The embedded model's 49,152-token vocabulary (its tokenizer is reused) makes them a little smaller than
    # Qwen2.5-1.5B (151,936) and a little larger than deepseek-coder-6.7b (32,256).
    model = build_model(name, tmp_path)
    assert model.load_format == "dummy" and not model.real
    assert model.params / 1e9 == pytest.approx(billions, abs=0.01)
    assert SHAPES[name]["model_type"] in (tmp_path / name / "config.json").read_text()
    assert (tmp_path / name / "tokenizer.json").exists()


def test_forced_lengths_follow_the_snippet_not_the_call():
    lengths = [10, 20, 30, 40, 50]
    ids = [f"bench:{i}" for i in range(200)]
    first = [forced_length(i, lengths) for i in ids]
    assert first == [forced_length(i, lengths) for i in ids]  # every variant forces the same length
    assert set(first) == set(lengths)  # ... drawn from the whole measured distribution


def test_spearman_gives_tied_scores_their_average_rank():
    assert spearman([0.1, 0.2, 0.3], [0.3, 0.2, 0.1]) == pytest.approx(-1.0)
    assert spearman([0.5, 0.5, 0.9], [0.5, 0.5, 0.9]) == pytest.approx(1.0)
    # ties averaged: ranks (0.5, 0.5, 2) vs (0, 1, 2) -> rho = 0.866, not 1.0 as with arbitrary tie order
    assert spearman([0.5, 0.5, 0.9], [0.1, 0.2, 0.3]) == pytest.approx(0.8660254, rel=1e-6)


def test_benchmark_snippets_are_distinct_real_code_with_stable_ids():
    snippets = load_snippets(20)
    assert len({s["code"] for s in snippets}) == 20
    assert all(s["code"].strip() and s["id"] == f"bench:{s['source_index']}" for s in snippets)
    assert [s["id"] for s in load_snippets(5)] == [s["id"] for s in snippets[:5]]


def test_every_step_of_the_gpu_plan_parses_with_its_script():
    """A typo in a step's arguments would cost a step of a scarce GPU session: catch it here."""
    import importlib

    from benchmarks.run_gpu import MODEL_NAMES, PLAN

    for part, module, args, _ in PLAN:
        parsed = importlib.import_module(f"benchmarks.{module}").parser().parse_args(args)
        assert getattr(parsed, "model", MODEL_NAMES[part]) == MODEL_NAMES[part], (part, args)
