"""Model resolution: the embedded model's folder, other paths as given, a missing local path named."""

from __future__ import annotations

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


@pytest.mark.parametrize("path", ["/no/such/model", "./no-such-model", "~/no-such-model-here"])
def test_a_missing_local_path_is_named_not_taken_for_a_hub_id(path):
    with pytest.raises(ConfigError, match=f"model.path: {path} does not exist on "):
        resolve_model_path(path)
