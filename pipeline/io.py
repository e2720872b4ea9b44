"""Reading a corpus: a Ray Dataset of rows with deterministic ids.

The files of a corpus are listed on the driver and parsed by Ray tasks, one file per task
(`pipeline/records.py`: one file's records -> rows, a record that cannot be used kept as a row with its
reason); a saved or hub HF dataset goes through the same row check. Paths may be local or `s3://...`
(anything pyarrow.fs understands).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray
from ray.data.expressions import col

from pipeline.config import EMBEDDED_CORPUS, ConfigError, InputConfig
from pipeline.records import COMPRESSED, parse_file, to_row

DATA_DIR = Path(__file__).resolve().parent / "data"  # package data: also in a wheel install
EMBEDDED_CORPUS_PATH = DATA_DIR / "evol-codealpaca-2k.json"
log = logging.getLogger(__name__)

_SUFFIX_FORMAT = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}


# ---------------------------------------------------------------- reading


def read_corpus(cfg: InputConfig, path_key: str = "input.path") -> ray.data.Dataset:
    """The corpus as rows of `pipeline.records.ROW_COLUMNS`; `cfg.limit` keeps the first N rows in source order. An input that
    cannot be read at all is a ConfigError naming `path_key` (the config key the path came from)."""
    path = _corpus_path(cfg, path_key)
    fmt = cfg.format
    if fmt == "hf" or (fmt == "auto" and _is_hf_dataset(path)):
        return _read_hf(path, cfg, path_key)
    fs, root = pafs.FileSystem.from_uri(as_uri(path))
    files = _list_files(fs, root, fmt, path_key)
    tasks = [
        {"uri": _join_uri(path, root, f.path), "source": _relative(root, f.path), "format": fmt_, "rank": rank}
        for rank, (f, fmt_) in enumerate(files)
    ]
    ds = ray.data.from_items(tasks, override_num_blocks=max(1, len(tasks)))
    ds = ds.flat_map(parse_file, fn_kwargs={"cfg": cfg}, **on_this_node(path))
    if cfg.limit is not None and len(tasks) > 1:
        # Each file stops at `limit` rows; the global first-N also needs the earlier files' counts.
        ds = ds.materialize()
        counts = {r["rank"]: r["count()"] for r in ds.groupby("rank").count().take_all()}
        # Files before the first one cut short are kept whole, later ones dropped.
        left = cfg.limit
        for rank in sorted(counts):
            if counts[rank] > left:
                ds = ds.filter(expr=(col("rank") < rank) | ((col("rank") == rank) & (col("source_index") < left)))
                break
            left -= counts[rank]
    return ds.drop_columns(["rank"])


def input_version(cfg: InputConfig) -> str | None:
    """A stamp of the files `cfg` reads as they are now (names, sizes, modification times), to tell that they
    changed since a run read them: a file added to the input folder, one replaced. None where it is not
    checked (a hub dataset) or cannot be listed (reading it says why)."""
    try:
        listed = _input_files(cfg, "input.path")
    except (ConfigError, OSError, ValueError):
        return None
    if listed is None:
        return None
    root, files = listed
    listing = sorted((_relative(root, i.path), i.size, i.mtime_ns) for i in files)
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]


def check_input(cfg: InputConfig, path_key: str = "input.path") -> None:
    """Refuse, before a job writes anything, an input that cannot be read: a path that does not exist, a
    folder without corpus files, an unfinished generate output (ConfigError naming `path_key`). A hub
    dataset, or a store that cannot be listed now, is left to the reader."""
    try:
        _input_files(cfg, path_key)
    except ConfigError:
        raise
    except (OSError, ValueError):
        pass


def _input_files(cfg: InputConfig, path_key: str) -> tuple[str, list[pafs.FileInfo]] | None:
    """The folder and files `cfg` reads (a saved HF dataset: all of its files); None for a hub dataset."""
    path = _corpus_path(cfg, path_key, quiet=True)
    if cfg.format == "hf" or (cfg.format == "auto" and _is_hf_dataset(path)):
        if not Path(path).is_dir():
            return None
        fs, root = pafs.LocalFileSystem(), str(Path(path).resolve())
        return root, [i for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
                      if i.type == pafs.FileType.File]
    fs, root = pafs.FileSystem.from_uri(as_uri(path))
    return root, [info for info, _ in _list_files(fs, root, cfg.format, path_key, quiet=True)]


def _corpus_path(cfg: InputConfig, path_key: str, quiet: bool = False) -> str:
    """The path to read: the bundled corpus for `embedded`, a generate output's `selected/`, or as given."""
    if cfg.path == EMBEDDED_CORPUS:
        return str(EMBEDDED_CORPUS_PATH)
    return _selected_if_generate_output(cfg.path, path_key, quiet)


def _read_hf(name: str, cfg: InputConfig, path_key: str) -> ray.data.Dataset:
    import datasets

    if Path(name).is_dir():
        hf = datasets.load_from_disk(name)
        if isinstance(hf, datasets.DatasetDict):
            if cfg.split not in hf:
                split_key = f"{path_key.removesuffix('.path')}.split" if path_key.endswith(".path") else "input.split"
                raise ConfigError(f"{path_key}: {name} has no {cfg.split!r} split (it has {sorted(hf)}; "
                                  f"{split_key} chooses one)")
            hf = hf[cfg.split]
    else:
        try:
            hf = datasets.load_dataset(name, split=cfg.split)
        except Exception as err:  # most often a mistyped local path, taken for a hub name: say both
            raise ConfigError(f"{path_key}: {name!r} is no local file or folder, and as a hub dataset: "
                              f"{type(err).__name__}: {err}") from err
    if cfg.limit is not None:
        hf = hf.select(range(min(cfg.limit, len(hf))))
    hf = hf.add_column("__index", list(range(len(hf))))
    source = f"{Path(name).name if Path(name).is_dir() else name}:{cfg.split}"
    ds = ray.data.from_huggingface(hf)
    return ds.map(lambda r: to_row({k: v for k, v in r.items() if k != "__index"}, source, r["__index"], cfg))


def _is_hf_dataset(path: str) -> bool:
    """A folder written by `datasets.save_to_disk`, or a name that can only mean a hub dataset (a missing
    `data.jsonl` is a local file that is not there)."""
    local = Path(path)
    if local.is_dir():
        return any((local / marker).exists() for marker in ("dataset_info.json", "dataset_dict.json", "state.json"))
    return "://" not in path and not local.exists() and not looks_local(path) and _format_of(path) is None


def looks_local(path: str) -> bool:
    """A path that cannot be a hub id (`name` or `owner/name`, never starting with `.`): one that starts
    with `/`, `.` or `~`, or has more than one `/`. Either kind of name is only taken for a hub id if no
    local file or folder has it."""
    return path.startswith(("/", ".", "~")) or path.count("/") > 1


def _selected_if_generate_output(path: str, path_key: str, quiet: bool = False) -> str:
    """`path` as given, or its `selected/` if it is a `generate` output folder: read whole, its snippets/
    would add the ORIGINAL pairs to the generated ones (as `train --generated`, or a second round's input)."""
    try:
        fs, root = pafs.FileSystem.from_uri(as_uri(path))
        is_run = fs.get_file_info(f"{root}/_stages").type == pafs.FileType.Directory
    except (OSError, ValueError):
        return path  # not a folder we can look into: the reader says what is wrong with it
    if not is_run:
        return path
    if fs.get_file_info(f"{root}/_stages/select.json").type != pafs.FileType.File:
        raise ConfigError(f"{path_key}: {path} is a generate output that has not finished (no "
                          f"_stages/select.json); run that generate command to its end first")
    selected = f"{path.rstrip('/')}/selected"
    if not quiet:
        log.info("%s: a generate output; reading its pairs, %s", path_key, selected)
    return selected


def generate_version(path: str) -> str | None:
    """When the generate run that `path` is (or whose `selected/` it is) last finished its select stage, or None
    for other data: pairs read from there change only when that stage runs again (a changed select config)."""
    run = as_uri(path).rstrip("/")
    run = run[: -len("/selected")] if run.endswith("/selected") else run
    try:
        fs, root = pafs.FileSystem.from_uri(run)
        with fs.open_input_stream(f"{root}/_stages/select.json") as f:
            return str(json.loads(f.read())["finished_at"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _list_files(fs: pafs.FileSystem, root: str, fmt: str, path_key: str,
                quiet: bool = False) -> list[tuple[pafs.FileInfo, str]]:
    """The corpus files under `root` (or `root` itself), in order, each with its format. Files of other kinds in
    a folder (a README.md, a .csv) are not read, and named in a warning (`quiet`: not)."""
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(f"{path_key}: {root} does not exist")
    if info.type == pafs.FileType.File:
        candidates = [info]
    else:
        # Hidden or bookkeeping entries (`.ipynb_checkpoints/`, Spark's `_temporary/`, `_SUCCESS`) are skipped,
        # files and folders alike.
        candidates = [i for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
                      if i.type == pafs.FileType.File
                      and not any(part.startswith((".", "_")) for part in Path(_relative(root, i.path)).parts)]
    files, others = [], []
    for i in sorted(candidates, key=lambda i: i.path):
        kind = fmt if fmt != "auto" else _format_of(i.path)
        if kind is not None:
            files.append((i, kind))
        else:
            others.append(_relative(root, i.path))
    if files and others and not quiet:
        log.warning("%s: %d file(s) under %s are not .json, .jsonl or .parquet and are not read: %s%s", path_key,
                    len(others), root, ", ".join(others[:5]), ", ..." if len(others) > 5 else "")
    if not files:
        raise ConfigError(f"{path_key}: no .json, .jsonl (also {', '.join(COMPRESSED)}) or .parquet files under {root}")
    return files


def _format_of(path: str) -> str | None:
    name = Path(path).name.lower()
    compressed = name.endswith(tuple(COMPRESSED))
    kind = _SUFFIX_FORMAT.get(Path(name.rsplit(".", 1)[0] if compressed else name).suffix)
    return None if compressed and kind == "parquet" else kind  # Parquet compresses inside the file


def on_this_node(path: str) -> dict[str, Any]:
    """Options for the Ray tasks that read a local `path`: run them on this (the driver's) node. On a cluster of
    several nodes a task elsewhere would not find the file, unless the path is on a filesystem they share."""
    if "://" in path:
        return {}
    return {"label_selector": {"ray.io/node-id": ray.get_runtime_context().get_node_id()}}


def as_uri(path: str) -> str:
    """What pyarrow.fs.FileSystem.from_uri takes: a URI as is, a local path made absolute."""
    return path if "://" in path else str(Path(path).resolve())


def _join_uri(original: str, root: str, file_path: str) -> str:
    if "://" not in original:
        return file_path
    scheme = original.split("://", 1)[0]
    query = "?" + original.split("?", 1)[1] if "?" in original else ""
    return f"{scheme}://{file_path}{query}"


def _relative(root: str, file_path: str) -> str:
    rel = os.path.relpath(file_path, root)
    return Path(file_path).name if rel == "." else rel
