"""Readers (corpus -> Ray Dataset of rows with deterministic ids), output folders and the manifest.

Every input row gets `source` (file path relative to the input root, or the dataset name) and
`source_index` (its position there) and `id` = hash(source, source_index). A row that cannot be read
(malformed JSON line, missing field, non-string, bytes that are neither UTF-8 nor BOM-marked UTF-16) is
still a row: it carries `reason` and `detail` instead of text, so that nothing is lost silently.

Paths may be local or `s3://...` (anything pyarrow.fs understands); the files are listed on the driver
and parsed by Ray tasks, one file per task.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from ray.data.expressions import col

from pipeline.config import EMBEDDED_CORPUS, ConfigError, InputConfig

DATA_DIR = Path(__file__).resolve().parent / "data"  # package data: also in a wheel install
EMBEDDED_CORPUS_PATH = DATA_DIR / "evol-codealpaca-2k.json"
log = logging.getLogger(__name__)

ROW_COLUMNS = ("id", "source", "source_index", "instruction", "response", "reason", "detail")
_SUFFIX_FORMAT = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
# JSON and JSONL may be compressed: pyarrow's open_input_stream decompresses these by the file's suffix.
_COMPRESSED = (".gz", ".bz2", ".zst", ".lz4")


def row_id(source: str, index: int) -> str:
    return hashlib.sha256(f"{source}\x00{index}".encode()).hexdigest()[:20]


# ---------------------------------------------------------------- reading


def read_corpus(cfg: InputConfig, path_key: str = "input.path") -> ray.data.Dataset:
    """The corpus as rows of ROW_COLUMNS; `cfg.limit` keeps the first N rows in source order. An input that
    cannot be read at all is a ConfigError naming `path_key` (the config key the path came from)."""
    path = str(EMBEDDED_CORPUS_PATH) if cfg.path == EMBEDDED_CORPUS else _selected_if_generate_output(cfg.path, path_key)
    fmt = cfg.format
    if fmt == "hf" or (fmt == "auto" and _is_hf_dataset(path)):
        return _read_hf(path, cfg, path_key)
    fs, root = pafs.FileSystem.from_uri(as_uri(path))
    files = _list_files(fs, root, fmt, path_key)
    tasks = [
        {"uri": _join_uri(path, root, f), "source": _relative(root, f), "format": fmt_, "rank": rank}
        for rank, (f, fmt_) in enumerate(files)
    ]
    ds = ray.data.from_items(tasks, override_num_blocks=max(1, len(tasks)))
    ds = ds.flat_map(_parse_file, fn_kwargs={"cfg": cfg})
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


def _parse_file(task: dict[str, Any], cfg: InputConfig) -> Iterator[dict[str, Any]]:
    fs, path = pafs.FileSystem.from_uri(task["uri"])
    source, limit = task["source"], cfg.limit
    if task["format"] == "parquet":
        records: Iterator[Any] = _parquet_records(fs, path)
    else:
        with fs.open_input_stream(path) as stream:
            data = _as_utf8(stream.read())
        if isinstance(data, Unreadable):
            records = iter([data])
        else:
            records = _jsonl_records(data) if task["format"] == "jsonl" else _json_array_records(data, cfg)
    for index, record in enumerate(records):
        if limit is not None and index >= limit:
            break
        yield {**to_row(record, source, index, cfg), "rank": task["rank"]}


class Unreadable:
    """A record that could not be parsed at all (kept so that its position still yields a row)."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason, self.detail = reason, detail


def _as_utf8(data: bytes) -> bytes | Unreadable:
    """The file's bytes as UTF-8 without a byte-order mark. Windows tools write a UTF-8 BOM (Notepad) or
    UTF-16 (PowerShell 5's `>`); `json` refuses the first and reads the second as garbage."""
    if data.startswith(codecs.BOM_UTF8):
        return data[len(codecs.BOM_UTF8):]
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return data.decode("utf-16").encode("utf-8")
        except UnicodeError as err:  # a bad pair breaks the whole decode: one row says so
            return Unreadable("non-utf8 text", f"UTF-16 file (byte-order mark), invalid at byte {err.start}")
    return data


def _jsonl_records(data: bytes) -> Iterator[Any]:
    # Blank lines are not records (most JSON Lines writers and readers allow them): skipped, not counted.
    lines = [(number, line) for number, line in enumerate(data.split(b"\n"), start=1) if line.strip()]
    for number, line in lines:
        # surrogateescape keeps undecodable bytes as lone surrogates; to_row rejects those rows.
        text = line.decode("utf-8", "surrogateescape")
        try:
            yield json.loads(text)
        except json.JSONDecodeError as err:
            yield Unreadable("malformed json", f"line {number}: {err.msg} at column {err.colno}")


def _json_array_records(data: bytes, cfg: InputConfig) -> Iterator[Any]:
    text = data.decode("utf-8", "surrogateescape")
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as err:
        # Not one JSON document: maybe JSON Lines under a .json name (common); else one bad row.
        if text.lstrip().startswith("{"):
            yield from _jsonl_records(data)
            return
        yield Unreadable("malformed json", f"{err.msg} at line {err.lineno} column {err.colno}")
        return
    one_record = isinstance(parsed, dict) and (cfg.instruction_field in parsed or cfg.messages_field in parsed)
    if one_record or (isinstance(parsed, dict) and not any(isinstance(v, list) for v in parsed.values())):
        parsed = [parsed]
    elif isinstance(parsed, dict):  # {"data": [...]}-style wrapper: take the first list
        parsed = next(v for v in parsed.values() if isinstance(v, list))
    if not isinstance(parsed, list):
        yield Unreadable("malformed json", f"expected an array of objects, got {type(parsed).__name__}")
        return
    yield from parsed


def _parquet_records(fs: pafs.FileSystem, path: str) -> Iterator[Any]:
    with fs.open_input_file(path) as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=1024):
            yield from batch.to_pylist()


def to_row(record: Any, source: str, index: int, cfg: InputConfig) -> dict[str, Any]:
    """Validate one record into a row; problems become `reason`/`detail`, never exceptions."""
    row = {"id": row_id(source, index), "source": source, "source_index": index,
           "instruction": None, "response": None, "reason": None, "detail": None}
    if isinstance(record, Unreadable):
        return {**row, "reason": record.reason, "detail": record.detail}
    if not isinstance(record, dict):
        return {**row, "reason": "malformed row", "detail": f"expected an object, got {type(record).__name__}"}
    if cfg.instruction_field not in record and isinstance(record.get(cfg.messages_field), list):
        record = _first_exchange(record[cfg.messages_field], cfg)
        if isinstance(record, Unreadable):
            return {**row, "reason": record.reason, "detail": record.detail}
    response_field = next((f for f in cfg.response_fields if f in record), None)
    for field, name in ((cfg.instruction_field, "instruction"), (response_field, "response")):
        if field is None or field not in record:
            wanted = cfg.instruction_field if name == "instruction" else " or ".join(cfg.response_fields)
            return {**row, "reason": f"missing field: {name}", "detail": f"no `{wanted}` in the row"}
        value = record[field]
        if not isinstance(value, str):
            return {**row, "reason": f"not a string: {name}", "detail": f"`{field}` is {type(value).__name__}"}
        bad = _first_surrogate(value)
        if bad is not None:
            return {**row, "reason": "non-utf8 text", "detail": f"`{field}` has invalid UTF-8 at char {bad}"}
        row[name] = value
    return row


_USER, _ASSISTANT = ("user", "human"), ("assistant", "gpt")


def _first_exchange(messages: list[Any], cfg: InputConfig) -> dict[str, Any] | Unreadable:
    """A chat's first user turn and the assistant turn right after it, as a record with the configured fields."""
    turns = [(str(m.get("role", m.get("from"))).lower(), m.get("content", m.get("value")))
             for m in messages if isinstance(m, dict)]
    first_user = next((i for i, (role, _) in enumerate(turns) if role in _USER), None)
    where = f"`{cfg.messages_field}`"
    if first_user is None:
        return Unreadable("missing field: instruction", f"{where} has no user turn")
    if first_user + 1 == len(turns) or turns[first_user + 1][0] not in _ASSISTANT:
        return Unreadable("missing field: response", f"{where} has no assistant turn right after its first user turn")
    return {cfg.instruction_field: turns[first_user][1], cfg.response_fields[0]: turns[first_user + 1][1]}


def _first_surrogate(text: str) -> int | None:
    """Position of the first lone surrogate (an undecodable byte kept by surrogateescape), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return err.start
    return None


def _read_hf(name: str, cfg: InputConfig, path_key: str) -> ray.data.Dataset:
    import datasets

    if Path(name).is_dir():
        hf = datasets.load_from_disk(name)
        if isinstance(hf, datasets.DatasetDict):
            if cfg.split not in hf:
                raise ConfigError(f"{path_key}: {name} has no {cfg.split!r} split (it has {sorted(hf)}; "
                                  f"input.split chooses one)")
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


def _selected_if_generate_output(path: str, path_key: str) -> str:
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
    log.info("%s: a generate output; reading its pairs, %s", path_key, selected)
    return selected


def _list_files(fs: pafs.FileSystem, root: str, fmt: str, path_key: str) -> list[tuple[str, str]]:
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
    files = []
    for i in sorted(candidates, key=lambda i: i.path):
        kind = fmt if fmt != "auto" else _format_of(i.path)
        if kind is not None:
            files.append((i.path, kind))
    if not files:
        raise ConfigError(f"{path_key}: no .json, .jsonl (also {', '.join(_COMPRESSED)}) or .parquet files under {root}")
    return files


def _format_of(path: str) -> str | None:
    name = Path(path).name.lower()
    compressed = name.endswith(_COMPRESSED)
    kind = _SUFFIX_FORMAT.get(Path(name.rsplit(".", 1)[0] if compressed else name).suffix)
    return None if compressed and kind == "parquet" else kind  # Parquet compresses inside the file


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


# ---------------------------------------------------------------- output folder


class OutputDir:
    """A run's output folder, local or `s3://...`, through pyarrow filesystems."""

    def __init__(self, uri: str) -> None:
        self.uri = uri.rstrip("/") if "://" in uri else str(Path(uri).resolve())
        try:
            self.fs, self.root = pafs.FileSystem.from_uri(self.uri)
            self.fs.create_dir(self.root, recursive=True)
        except (OSError, ValueError) as e:  # a file of that name, no permission, a bad scheme, no bucket
            raise ConfigError(f"output: cannot use {uri} as the output folder: {e}") from e

    def sub(self, name: str) -> str:
        """URI of a subfolder (what Ray Data readers and writers take)."""
        return f"{self.uri}/{name}"

    def exists(self, name: str) -> bool:
        return self.fs.get_file_info(f"{self.root}/{name}").type != pafs.FileType.NotFound

    def remove(self, name: str) -> None:
        info = self.fs.get_file_info(f"{self.root}/{name}")
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(f"{self.root}/{name}")
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(f"{self.root}/{name}")

    def parquet_files(self, name: str) -> list[str]:
        if not self.exists(name):
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(f"{self.root}/{name}", recursive=True))
        return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))

    def ensure_parquet(self, name: str, schema: pa.Schema) -> None:
        """Give a folder that received no rows one empty file, so that readers find a table, not nothing."""
        if not self.parquet_files(name):
            self.fs.create_dir(f"{self.root}/{name}", recursive=True)
            with self.fs.open_output_stream(f"{self.root}/{name}/empty.parquet") as f:
                pq.write_table(schema.empty_table(), f)

    def read_json(self, name: str) -> dict[str, Any] | None:
        if not self.exists(name):
            return None
        with self.fs.open_input_stream(f"{self.root}/{name}") as f:
            return json.loads(f.read().decode())

    def write_json(self, name: str, obj: dict[str, Any]) -> None:
        # Write then move, so that a reader never sees half a manifest or marker.
        final = f"{self.root}/{name}"
        parent, _, base = final.rpartition("/")
        self.fs.create_dir(parent, recursive=True)
        tmp = f"{parent}/.{base}.tmp"
        with self.fs.open_output_stream(tmp) as f:
            f.write(json.dumps(obj, indent=2, sort_keys=True, default=str).encode())
        self.fs.move(tmp, final)

    def write_text(self, name: str, text: str) -> None:
        self.fs.create_dir(self.root, recursive=True)
        with self.fs.open_output_stream(f"{self.root}/{name}") as f:
            f.write(text.encode())

    def read_ids(self, name: str) -> set[str]:
        """Ids in the readable Parquet files of a folder; a file cut short by a killed writer is deleted."""
        ids: set[str] = set()
        for path in self.parquet_files(name):
            try:
                with self.fs.open_input_file(path) as f:
                    ids.update(pq.read_table(f, columns=["id"]).column("id").to_pylist())
            except (pa.ArrowInvalid, OSError):
                self.fs.delete_file(path)
        return ids
