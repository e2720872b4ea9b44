"""Model resolution: the embedded model's folder, a remote folder fetched, other paths as given, a missing
local path named."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipeline.config import ConfigError
from pipeline.models import embedded_model_dir, resolve_model_path


def test_embedded_local_and_hub_paths(tmp_path, monkeypatch):
    assert resolve_model_path("embedded") == str(embedded_model_dir())
    assert (embedded_model_dir() / "model.safetensors").exists()
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("./") == "./"  # a relative path stays as given
    home = tmp_path / "home"
    (home / "models" / "m").mkdir(parents=True)
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
