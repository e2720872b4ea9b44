"""Model resolution: the embedded model's folder, a remote folder fetched, other paths as given, a missing
local path named; a model's own context length, as vLLM reads it."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.config import ConfigError
from pipeline.models import (REMOTE_CACHE_KEEP_S, cap_at_context, check_model_here, context_length, embedded_model_dir,
                             model_version, resolve_model_path)


def test_embedded_local_and_hub_paths(tiny_model, tmp_path, monkeypatch):
    assert resolve_model_path("embedded") == str(embedded_model_dir())
    assert (embedded_model_dir() / "model.safetensors").exists()
    assert resolve_model_path(tiny_model) == tiny_model
    monkeypatch.chdir(tiny_model)
    assert resolve_model_path("./") == "./"  # a relative path stays as given
    home = tmp_path / "home"
    shutil.copytree(tiny_model, home / "models" / "m")
    monkeypatch.setenv("HOME", str(home))
    assert resolve_model_path("~/models/m") == str(home / "models" / "m")
    assert resolve_model_path("deepseek-ai/deepseek-coder-6.7b-instruct") == "deepseek-ai/deepseek-coder-6.7b-instruct"


@pytest.mark.parametrize("path", ["/no/such/model", "./no-such-model", "~/no-such-model-here", "runs/one/model"])
def test_a_missing_local_path_is_named_not_taken_for_a_hub_id(path):
    with pytest.raises(ConfigError, match=f"model.path: {path} does not exist on "):
        resolve_model_path(path)


def test_a_remote_model_folder_is_fetched_once_per_version(tiny_model, tmp_path, monkeypatch):
    """A model folder behind a URI (here file://, the same pyarrow path as s3://, which tests/test_s3.py
    runs end to end) is copied into the node's cache; a rewritten folder is fetched again."""
    from transformers import AutoConfig, AutoTokenizer

    monkeypatch.setenv("INVERSE_INSTRUCT_HOME", str(tmp_path / "cache"))
    remote = tmp_path / "bucket" / "run" / "model"
    shutil.copytree(tiny_model, remote)
    first = resolve_model_path(f"file://{remote}")
    assert Path(first).parent == tmp_path / "cache" / "models" / "remote" and Path(first).name.startswith("model-")
    assert sorted(p.name for p in Path(first).iterdir()) == sorted(p.name for p in remote.iterdir())
    assert AutoConfig.from_pretrained(first).num_hidden_layers == 2
    marker = Path(first) / "fetched-here"
    marker.touch()
    assert resolve_model_path(f"file://{remote}/") == first and marker.exists()  # reused, not copied again

    (remote / "config.json").write_text((remote / "config.json").read_text().replace('"num_hidden_layers": 2',
                                                                                    '"num_hidden_layers": 1'))
    second = resolve_model_path(f"file://{remote}")
    assert second != first and AutoConfig.from_pretrained(second).num_hidden_layers == 1

    # A driver that only needs the tokenizer does not fetch the weights.
    light = Path(resolve_model_path(f"file://{remote}", weights=False))
    assert light.name.endswith("-no-weights") and not list(light.glob("*.safetensors"))
    assert AutoTokenizer.from_pretrained(light)("def f(): pass")["input_ids"]
    assert not list((tmp_path / "cache" / "models" / "remote").glob(".tmp-*"))  # no half copies left

    # A copy that no run has resolved for a week is deleted at the next fetch on this node; one in use stays.
    week_ago = time.time() - REMOTE_CACHE_KEEP_S - 60
    os.utime(first, (week_ago, week_ago))
    assert resolve_model_path(f"file://{remote}") == second
    assert not Path(first).exists() and Path(second).exists() and light.exists()


def test_a_model_folder_without_its_config_or_tokenizer_is_named(tiny_model, tmp_path, capsys):
    """Weights copied without the tokenizer (or a folder of something else): one ConfigError naming what is
    missing, instead of each engine actor's loader tracebacks (515 lines from `evaluate` before)."""
    weights_only = tmp_path / "weights-only"
    weights_only.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(Path(tiny_model) / name, weights_only / name)
    with pytest.raises(ConfigError, match=r"model.path: .*weights-only has no tokenizer \(tokenizer.json, "):
        resolve_model_path(str(weights_only))
    (weights_only / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"weights-only has no config.json at its top"):
        resolve_model_path(str(weights_only))
    # The drivers of generate, evaluate and loop check a folder they see before any actor starts: one line, exit 2.
    shutil.copy(Path(tiny_model) / "config.json", weights_only / "config.json")
    for job in ("generate", "evaluate"):
        assert main([job, "--model", str(weights_only), "--output", str(tmp_path / job)]) == 2
        assert "weights-only has no tokenizer" in capsys.readouterr().err
        assert not (tmp_path / job).exists()  # before any work: no output folder made
    for elsewhere in ("embedded", "/on/the/workers/only", "s3://bucket/model"):
        check_model_here(elsewhere)  # not seen here: checked where it is loaded
    remote = tmp_path / "bucket" / "model"
    shutil.copytree(tiny_model, remote, ignore=shutil.ignore_patterns("tokenizer*", "vocab*", "merges*"))
    with pytest.raises(ConfigError, match=r"model.path: file://.*/bucket/model has no tokenizer"):
        resolve_model_path(f"file://{remote}")


def test_a_hub_id_this_machine_cannot_fetch_is_named_before_any_work(tmp_path, monkeypatch, capsys):
    """An unreachable hub (or a mistyped id) failed every engine actor in turn, 543 lines of hub-client tracebacks
    (generate) or one long traceback (train); now one line and exit 2 from each command, before any work. A hub
    id in this machine's Hugging Face cache passes without a network call."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no retries against a missing network
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ConfigError, match=r"model.path: owner/no-such-model is not a folder on .*, and the Hugging "
                                          r"Face hub does not give it here \(\w+: .*\); give the model's local folder"):
        check_model_here("owner/no-such-model")
    for job in ("generate", "evaluate", "train"):
        assert main([job, "--model", "owner/no-such-model", "--output", str(tmp_path / job)]) == 2
        assert "model.path: owner/no-such-model is not a folder on" in capsys.readouterr().err
        assert not (tmp_path / job).exists()
    with pytest.raises(ConfigError, match=r"model.path: not a repo id! is not a folder"):
        check_model_here("not a repo id!")
    snapshot = tmp_path / "hub" / "models--owner--cached-model" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    check_model_here("owner/cached-model")


def test_a_remote_path_that_is_not_a_model_folder_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("INVERSE_INSTRUCT_HOME", str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match="model.path: file://.*/nothing does not exist or is empty"):
        resolve_model_path(f"file://{tmp_path}/nothing")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "part-0.parquet").write_bytes(b"x")
    with pytest.raises(ConfigError, match="has no config.json at its top"):
        resolve_model_path(f"file://{tmp_path}/data")
    with pytest.raises(ConfigError, match="model.path: cannot list nosuchscheme://"):
        resolve_model_path("nosuchscheme://bucket/model")


def test_context_length_is_the_one_vllm_derives(tiny_model, tmp_path):
    """The context length our engines cap `model.max_model_len` at is vLLM's own (vLLM refuses to start
    above it): asked of vLLM's argument parsing (no engine start) for config shapes of real code models."""
    pytest.importorskip("vllm")
    from transformers import AutoConfig, GPT2Config, LlamaConfig, Qwen2Config
    from vllm.engine.arg_utils import EngineArgs

    shapes = {
        "llama 2k (phi-1 / TinyLlama size)": LlamaConfig(max_position_embeddings=2048),
        "linear RoPE x4 (deepseek-coder)": LlamaConfig(max_position_embeddings=16384,
                                                       rope_scaling={"type": "linear", "factor": 4.0}),
        "llama3 RoPE (already scaled)": LlamaConfig(max_position_embeddings=131072, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}),
        "dynamic RoPE x2": Qwen2Config(max_position_embeddings=4096, rope_scaling={"type": "dynamic", "factor": 2.0}),
        "gpt2 (n_positions)": GPT2Config(n_positions=1024),
    }
    for name, config in shapes.items():
        folder = tmp_path / name.split()[0]
        config.save_pretrained(folder)
        for file in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(Path(tiny_model) / file, folder / file)
        vllm_length = EngineArgs(model=str(folder), max_model_len=None).create_model_config().max_model_len
        assert context_length(AutoConfig.from_pretrained(folder))[0] == vllm_length, name
    assert context_length(LlamaConfig(max_position_embeddings=2048)) == (2048, "max_position_embeddings")


def test_a_config_without_a_length_key_has_no_context_length():
    from transformers import PretrainedConfig

    assert context_length(PretrainedConfig()) is None


def test_a_length_past_the_models_context_is_capped_with_a_warning(caplog):
    from transformers import GPT2Config

    assert cap_at_context(128, "data.max_length", GPT2Config(n_positions=1024)) == 128
    assert cap_at_context(2048, "data.max_length", GPT2Config(n_positions=1024)) == 1024
    assert "data.max_length=2048 is more than this model's context length, 1024" in caplog.text


def test_model_version_tells_weights_trained_again_from_a_copy(tiny_model, tmp_path):
    """Another model saved into the same folder (same names and sizes) has another version; a copy with
    new file times has the same one; a hub id has none (nothing here to read)."""
    import os

    import torch
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder, copy_function=shutil.copyfile)
    before = model_version(str(folder))
    assert before == model_version(tiny_model)  # a copy, file times not kept
    os.utime(folder / "config.json", (1, 1))
    (folder / ".cache").mkdir()
    (folder / ".cache" / "download.metadata").write_text("etag, time")
    assert model_version(str(folder)) == before  # file times and hidden entries are not the model
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    model.save_pretrained(folder)
    assert (folder / "model.safetensors").stat().st_size == (Path(tiny_model) / "model.safetensors").stat().st_size
    assert model_version(str(folder)) != before
    assert model_version("deepseek-ai/deepseek-coder-6.7b-instruct") is None
    assert model_version("embedded").startswith("embedded ")
