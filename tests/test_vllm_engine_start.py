"""How a vLLM engine start fails: with a message that names its cause, not a traceback that hides it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pipeline.config import ModelConfig

pytestmark = pytest.mark.vllm


def test_a_context_length_vllm_refuses_is_a_config_error_naming_the_key(tiny_model, monkeypatch):
    """Our cap at the model's own length follows vLLM's rule (tests/test_models.py); should the two ever
    differ, vLLM's refusal (raised before any engine process starts) names the config key, not a traceback."""
    pytest.importorskip("vllm")
    from pipeline.config import ConfigError
    from pipeline.engines import vllm_engine

    monkeypatch.setattr(vllm_engine, "usable_context", lambda cfg, _: cfg.max_model_len)  # the cap missed
    cfg = ModelConfig(dtype="float32", max_model_len=8192)  # the tiny model's length is 4096
    with pytest.raises(ConfigError, match=r"model.max_model_len=8192: vLLM will not run this model with it: "
                                          r".*greater than the derived max_model_len"):
        vllm_engine.VLLMEngine(cfg, tiny_model)


def test_an_engine_that_does_not_start_ends_the_command_with_its_root_cause(tiny_model, tmp_path):
    """vLLM's own error for a failed start is "Engine core initialization failed. See root cause above."; the
    cause is in the engine core's traceback, 500 log lines up. The command's last line names it (here: no
    memory left for the KV cache), exit code 1. In its own process: it stops its Ray instance."""
    pytest.importorskip("vllm")
    run = subprocess.run([sys.executable, "-m", "pipeline.cli", "evaluate", "--model", tiny_model, "--limit", "1",
                          "--output", str(tmp_path / "out"), "--set", "model.dtype=float32",
                          "--set", "model.cpu_memory_utilization=0.00001"],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert run.returncode == 1, run.stderr[-2000:]
    last = run.stderr.rstrip().splitlines()[-1]
    assert last.startswith("error: vLLM's engine did not start: ") and last.endswith(" (in an engine actor)"), last
    assert "kv cache" in last.lower(), last
