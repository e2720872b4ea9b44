"""One input file's records, validated into rows (`pipeline/io.py` lists the files and runs this per file).

A row is `id` = hash(source, position), `source`, `source_index`, then either `instruction` and `response`
or, for a record that cannot be used, `reason` and `detail`: a malformed JSON line, a missing field, a
non-string, bytes that are neither UTF-8 nor BOM-marked UTF-16. A damaged file (truncated, not what its
suffix says) gives its readable rows and one `unreadable file` row for the rest. So nothing is lost silently.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import itertools
import json
import logging
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.config import InputConfig

log = logging.getLogger(__name__)

ROW_COLUMNS = ("id", "source", "source_index", "instruction", "response", "reason", "detail")
# JSON and JSONL may be compressed: the file's suffix (any case) -> the pyarrow codec that decompresses it.
COMPRESSED = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd", ".lz4": "lz4"}


def row_id(source: str, index: int) -> str:
    return hashlib.sha256(f"{source}\x00{index}".encode()).hexdigest()[:20]


def parse_file(task: dict[str, Any], cfg: InputConfig) -> Iterator[dict[str, Any]]:
    """One Ray task: the rows of one file (`task`: its uri, source name, format and rank in the listing),
    the first `cfg.limit` at most."""
    fs, path = pafs.FileSystem.from_uri(task["uri"])
    source, limit = task["source"], cfg.limit
    if task["format"] == "parquet":
        records = _parquet_records(fs, path, cfg)
    else:
        records = _json_records(fs, path, task["format"] == "jsonl", cfg)
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


def _unreadable_file(err: Exception, rows_read: int) -> Unreadable:
    """The row that stands for the rest of a damaged file (truncated, not what its suffix says)."""
    return Unreadable("unreadable file", f"{type(err).__name__}: {str(err)[:300]}; the file's rows from "
                                         f"{rows_read} on are lost")


def _json_records(fs: pafs.FileSystem, path: str, lines: bool, cfg: InputConfig) -> Iterator[Any]:
    with fs.open_input_file(path) as f:  # a failed read (the network) raises: Ray retries the task
        data: bytes | Unreadable = f.read()
    codec = COMPRESSED.get(Path(path).suffix.lower())
    if codec is not None:
        try:  # decompressed in memory, so that a damaged file is told apart from a failed read
            data = pa.CompressedInputStream(pa.BufferReader(data), codec).read()
        except (OSError, pa.ArrowException) as err:
            yield _unreadable_file(err, 0)
            return
    data = _as_utf8(data)
    if isinstance(data, Unreadable):
        yield data
    else:
        yield from _jsonl_records(data) if lines else _json_array_records(data, cfg, Path(path).name)


def _jsonl_records(data: bytes) -> Iterator[Any]:
    # One line at a time: a list of all the lines would hold a second copy of a large file (300 MB of JSONL
    # took a 705 MB peak to parse that way, 373 MB now). Blank lines are not records (most JSON Lines writers and
    # readers allow them): skipped, not counted.
    for number, line in enumerate(io.BytesIO(data), start=1):
        if not line.strip():
            continue
        # surrogateescape keeps undecodable bytes as lone surrogates; to_row rejects those rows.
        text = line.decode("utf-8", "surrogateescape")
        try:
            yield json.loads(text)
        except json.JSONDecodeError as err:
            yield Unreadable("malformed json", f"line {number}: {_message(err)} at column {err.colno}")


def _message(err: json.JSONDecodeError) -> str:
    return err.msg.removesuffix(" at")  # "Invalid control character at": the position follows


def _json_array_records(data: bytes, cfg: InputConfig, name: str = "") -> Iterator[Any]:
    text = data.decode("utf-8", "surrogateescape")
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as err:
        # Not one JSON document: maybe JSON Lines under a .json name (common); else one bad row.
        if text.lstrip().startswith("{"):
            yield from _jsonl_records(data)
            return
        yield Unreadable("malformed json", f"{_message(err)} at line {err.lineno} column {err.colno}")
        return
    one_record = isinstance(parsed, dict) and (cfg.instruction_field in parsed or cfg.messages_field in parsed)
    if one_record or (isinstance(parsed, dict) and not any(isinstance(v, list) for v in parsed.values())):
        parsed = [parsed]
    elif isinstance(parsed, dict):  # {"data": [...]}-style wrapper: take the first list
        lists = [key for key, value in parsed.items() if isinstance(value, list)]
        if len(lists) > 1:  # {"train": [...], "test": [...]}: say which rows are read, and which are not
            log.warning("%s: a JSON object of several lists: the rows of %r are read, those of %s are not",
                        name, lists[0], ", ".join(map(repr, lists[1:])))
        parsed = parsed[lists[0]]
    if not isinstance(parsed, list):
        yield Unreadable("malformed json", f"expected an array of objects, got {type(parsed).__name__}")
        return
    yield from parsed


def _parquet_records(fs: pafs.FileSystem, path: str, cfg: InputConfig) -> Iterator[Any]:
    """A Parquet file's records, streamed (a `limit` reads only the first row groups). If that fails, the file
    is read again into memory, which tells a failed read (raised: Ray retries the task) from a damaged file
    (its rows up to the damage, then one row saying where the rest was lost)."""
    done = 0
    try:
        with fs.open_input_file(path) as f:
            for record in _parquet_rows(f, cfg):
                yield record
                done += 1
        return
    except (OSError, pa.ArrowException) as err:
        log.warning("%s: %s: %s; reading it again from memory", path, type(err).__name__, err)
    with fs.open_input_file(path) as f:
        data = pa.BufferReader(f.read())
    try:
        for record in itertools.islice(_parquet_rows(data, cfg), done, None):
            yield record
            done += 1
    except (OSError, pa.ArrowException) as err:
        yield _unreadable_file(err, done)


def _parquet_rows(source: Any, cfg: InputConfig) -> Iterator[dict[str, Any] | Unreadable]:
    """Records with only the columns a row is made of (a corpus may carry large ones it does not need)."""
    parquet = pq.ParquetFile(source)
    names = parquet.schema_arrow.names
    fields = (cfg.instruction_field, *cfg.response_fields, cfg.messages_field, cfg.context_field)
    wanted = [c for c in dict.fromkeys(fields) if c in names]
    if not wanted:  # no field of a row: each row is rejected as missing its instruction
        missing = Unreadable("missing field: instruction", f"no `{cfg.instruction_field}` column in the file (nor a "
                                                           f"response or chat one); its columns: {_names(names)}")
        yield from (missing for _ in range(parquet.metadata.num_rows))
        return
    # Row group by row group: a damaged one loses only its rows and those after it.
    batches = (batch for group in range(parquet.num_row_groups)
               for batch in parquet.iter_batches(batch_size=1024, row_groups=[group], columns=wanted))
    for batch in batches:
        columns = {name: _decoded(batch.column(name)) for name in wanted}
        for i in range(batch.num_rows):
            record = {name: values[i] for name, values in columns.items()}
            bad = next((name for name, value in record.items() if value is _UNDECODABLE), None)
            yield record if bad is None else Unreadable("non-utf8 text", f"`{bad}` has invalid UTF-8")


_UNDECODABLE = object()  # a nested value (a chat) that holds invalid UTF-8


def _decoded(column: pa.Array) -> list[Any]:
    """A column's values, text decoded here rather than by pyarrow: a string column may hold invalid UTF-8 (Arrow
    does not check what it reads), and some writers store text as plain binary. Undecodable bytes are kept as
    lone surrogates, which `to_row` rejects as `non-utf8 text`, as for JSON."""
    if any(is_text(column.type) for is_text in (pa.types.is_string, pa.types.is_large_string,
                                                 pa.types.is_binary, pa.types.is_large_binary)):
        return [None if v is None else v.decode("utf-8", "surrogateescape")
                for v in column.cast(pa.large_binary()).to_pylist()]
    try:
        return column.to_pylist()
    except UnicodeDecodeError:  # inside nested values: only the rows that hold it are lost
        return [_as_py_or_undecodable(value) for value in column]


def _as_py_or_undecodable(value: pa.Scalar) -> Any:
    try:
        return value.as_py()
    except UnicodeDecodeError:
        return _UNDECODABLE


def to_row(record: Any, source: str, index: int, cfg: InputConfig) -> dict[str, Any]:
    """Validate one record into a row; problems become `reason`/`detail`, never exceptions."""
    row = {"id": row_id(source, index), "source": source, "source_index": index,
           "instruction": None, "response": None, "reason": None, "detail": None}
    if isinstance(record, Unreadable):
        return {**row, "reason": record.reason, "detail": record.detail}
    if not isinstance(record, dict):
        return {**row, "reason": "malformed row", "detail": f"expected an object, got {type(record).__name__}"}
    # A null field counts as absent: Parquet and HF datasets that merge corpora give every row every column, so
    # a chat row has `instruction: null`, and a row of the `output` corpus has `response: null`.
    given = record  # its fields are named when one is missing
    if record.get(cfg.instruction_field) is None and isinstance(record.get(cfg.messages_field), list):
        record = _first_exchange(record[cfg.messages_field], cfg)
        if isinstance(record, Unreadable):
            return {**row, "reason": record.reason, "detail": record.detail}
    response_field = next((f for f in cfg.response_fields if record.get(f) is not None), None)
    for field, name in ((cfg.instruction_field, "instruction"), (response_field, "response")):
        if field is None or record.get(field) is None:
            wanted = cfg.instruction_field if name == "instruction" else " or ".join(cfg.response_fields)
            return {**row, "reason": f"missing field: {name}",
                    "detail": f"no `{wanted}` in the row (or null); its fields: "
                              f"{_names([k for k, v in given.items() if v is not None])}"}
        value = record[field]
        if not isinstance(value, str):
            return {**row, "reason": f"not a string: {name}", "detail": f"`{field}` is {type(value).__name__}"}
        bad = _first_surrogate(value)
        if bad is not None:
            return {**row, "reason": "non-utf8 text", "detail": f"`{field}` has invalid UTF-8 at char {bad}"}
        row[name] = value
    context = _context(record, cfg)
    if isinstance(context, Unreadable):
        return {**row, "instruction": None, "response": None, "reason": context.reason, "detail": context.detail}
    if context:
        row["instruction"] = f"{row['instruction'].rstrip()}\n\n{context}"
    return row


def _context(record: dict[str, Any], cfg: InputConfig) -> str | Unreadable:
    """The row's Alpaca-style `input` (part of its instruction), '' if it has none."""
    field = cfg.context_field
    value = record.get(field) if field not in (None, cfg.instruction_field, *cfg.response_fields) else None
    if not isinstance(value, str):  # absent, null, or a field of another kind that shares the name (test inputs)
        return ""
    bad = _first_surrogate(value)
    if bad is not None:
        return Unreadable("non-utf8 text", f"`{field}` has invalid UTF-8 at char {bad}")
    return value.strip("\n") if value.strip() else ""


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


def _names(fields: list[str], most: int = 12) -> str:
    """A row's field names for a message, the first `most` of them."""
    listed = ", ".join(f"`{f}`" for f in fields[:most]) or "none"
    return listed + (f" and {len(fields) - most} more" if len(fields) > most else "")


def _first_surrogate(text: str) -> int | None:
    """Position of the first lone surrogate (an undecodable byte kept by surrogateescape), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return err.start
    return None
