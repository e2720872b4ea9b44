"""One file's records -> rows: every format, bad rows kept as rows with reasons, damaged files."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import InputConfig
from pipeline.io import read_corpus
from pipeline.records import row_id

GOOD = {"instruction": "Add numbers.", "response": "```python\nprint(1 + 2)\n```"}


def bad_rows_jsonl(path):
    """One row per kind of bad input, between good rows."""
    lines = [
        json.dumps(GOOD).encode(),
        b'{"instruction": "broken", "response": ',  # malformed JSON
        json.dumps({"instruction": "no response field"}).encode(),  # missing field
        json.dumps({"instruction": "list response", "response": ["a", "b"]}).encode(),  # non-string
        json.dumps({"instruction": "empty", "response": ""}).encode(),  # empty response
        b'{"instruction": "bad bytes \xff\xfe", "response": "x = 1"}',  # non-UTF-8
        json.dumps({"instruction": "giant", "response": "```python\n" + "x = 1\n" * 5000 + "```"}).encode(),
        json.dumps({"instruction": "spelled output", "output": "```sql\nSELECT 1;\n```"}).encode(),
        b"[1, 2]",  # not an object
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def rows_of(ds):
    return sorted(ds.take_all(), key=lambda r: (r["source"], r["source_index"]))


def test_jsonl_bad_rows_become_rows_with_reasons(ray_local, tmp_path):
    rows = rows_of(read_corpus(InputConfig(path=str(bad_rows_jsonl(tmp_path / "bad.jsonl")))))
    reasons = [r["reason"] for r in rows]
    assert reasons == [None, "malformed json", "missing field: response", "not a string: response", None,
                       "non-utf8 text", None, None, "malformed row"]
    assert rows[1]["detail"].startswith("line 2:")
    assert rows[7]["response"].startswith("```sql")  # `output` is the other accepted spelling
    assert [r["source_index"] for r in rows] == list(range(9))
    assert rows[0]["id"] == row_id("bad.jsonl", 0)


def test_a_json_error_reads_as_one_sentence():
    from pipeline.records import _json_array_records, _jsonl_records

    bad = b'{"instruction": "a tab\tinside"}'  # a raw control character in a string
    assert next(_jsonl_records(b"\n" + bad)).detail == "line 2: Invalid control character at column 23"
    assert next(_json_array_records(b"[" + bad + b"]", InputConfig())).detail == (
        "Invalid control character at line 1 column 24")


def test_chat_rows_give_their_first_exchange(ray_local, tmp_path):
    """Chat-format corpora (OpenAI/HF `messages`, ShareGPT `conversations` of {from, value}), mixed with plain rows."""
    system, user, answer = {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add."}, \
        {"role": "assistant", "content": "```python\nx = 1 + 1\n```"}
    rows = [{"messages": [system, user, answer, {"role": "user", "content": "More."}, answer]},
            {"instruction": "Sub.", "output": "x = 1 - 1"},
            {"messages": [system, user]},
            {"messages": [answer, user]},
            {"messages": [system]},
            {"messages": [user, {"role": "assistant", "content": [{"type": "text", "text": "x"}]}]}]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = [(r["instruction"], r["response"], r["reason"], r["detail"])
           for r in rows_of(read_corpus(InputConfig(path=str(tmp_path / "chat.jsonl"))))]
    assert got == [
        ("Add.", "```python\nx = 1 + 1\n```", None, None),
        ("Sub.", "x = 1 - 1", None, None),
        (None, None, "missing field: response", "`messages` has no assistant turn right after its first user turn"),
        (None, None, "missing field: response", "`messages` has no assistant turn right after its first user turn"),
        (None, None, "missing field: instruction", "`messages` has no user turn"),
        ("Add.", None, "not a string: response", "`response` is list"),  # what was read is kept
    ]
    share_gpt = {"conversations": [{"from": "human", "value": "Add."}, {"from": "GPT", "value": "x = 2"}]}
    (tmp_path / "sharegpt.json").write_text(json.dumps(share_gpt))  # one chat as a whole file: not a wrapper
    cfg = InputConfig(path=str(tmp_path / "sharegpt.json"), messages_field="conversations")
    assert [(r["instruction"], r["response"]) for r in rows_of(read_corpus(cfg))] == [("Add.", "x = 2")]


def test_a_null_field_counts_as_absent(ray_local, tmp_path):
    """Corpora merged into one Parquet table (or HF dataset) give every row every column: a chat row has a null
    `instruction`, a row of the corpus that spelled its reply `output` has a null `response`. Those rows are
    read from the fields they do have; a row whose only reply is null misses it."""
    code = "```python\nx = 1\n```"
    chat = [{"role": "user", "content": "Add."}, {"role": "assistant", "content": code}]
    table = pa.table({
        "instruction": ["Plain.", "Spelled output.", None, None, "Null reply."],
        "response": [code, None, None, code, None],
        "output": [None, code, None, None, None],
        "messages": [None, None, chat, None, None],
    })
    pq.write_table(table, tmp_path / "merged.parquet")
    got = [(r["instruction"], r["response"], r["reason"], r["detail"])
           for r in rows_of(read_corpus(InputConfig(path=str(tmp_path / "merged.parquet"))))]
    assert got == [
        ("Plain.", code, None, None),
        ("Spelled output.", code, None, None),
        ("Add.", code, None, None),
        (None, None, "missing field: instruction", "no `instruction` in the row (or null); its fields: `response`"),
        ("Null reply.", None, "missing field: response",
         "no `response or output` in the row (or null); its fields: `instruction`"),
    ]


def test_a_json_wrapper_object_gives_its_first_list(caplog):
    """{"data": [...]} is read as its list; of several lists ({"train": ..., "test": ...}) the first is read,
    and a warning names the ones that are not."""
    from pipeline.records import _json_array_records

    cfg = InputConfig()
    assert list(_json_array_records(json.dumps({"version": 2, "data": [GOOD]}).encode(), cfg)) == [GOOD]
    assert not caplog.records
    with caplog.at_level("WARNING"):
        rows = list(_json_array_records(json.dumps({"train": [GOOD, GOOD], "test": [GOOD]}).encode(), cfg))
    assert rows == [GOOD, GOOD]
    assert "the rows of 'train' are read, those of 'test' are not" in caplog.text


def test_windows_encodings_and_blank_lines(ray_local, tmp_path):
    """A UTF-8 byte-order mark (Notepad) and UTF-16 (PowerShell 5's `>`) are read; blank lines and CRLF
    endings are not rows; a UTF-16 file with a broken character is one row with the reason."""
    line = json.dumps({**GOOD, "instruction": "Add numbers ✓"})
    files = {
        "bom.jsonl": b"\xef\xbb\xbf" + f"{line}\r\n\r\n{line}\r\n".encode(),
        "utf16.jsonl": f"{line}\n\n{line}\n".encode("utf-16"),
        "bom.json": b"\xef\xbb\xbf" + json.dumps([GOOD]).encode(),
        "broken16.jsonl": "\ufeff".encode("utf-16-le") + line.encode("utf-16-le") + b"\x00\xd8",
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    rows = {name: rows_of(read_corpus(InputConfig(path=str(tmp_path / name)))) for name in files}
    for name in ("bom.jsonl", "utf16.jsonl"):
        assert [(r["instruction"], r["reason"], r["source_index"]) for r in rows[name]] == [
            ("Add numbers ✓", None, 0), ("Add numbers ✓", None, 1)], name
    assert [r["instruction"] for r in rows["bom.json"]] == ["Add numbers."]
    assert [(r["reason"], r["detail"]) for r in rows["broken16.jsonl"]] == [
        ("non-utf8 text", f"UTF-16 file (byte-order mark), invalid at byte {2 + 2 * len(line)}")]


def test_compressed_json_and_jsonl(ray_local, tmp_path):
    """`.jsonl.gz` (how corpora are often shipped), `.json.bz2`, `.jsonl.zst` are read like the plain files."""
    folder = tmp_path / "zipped"
    folder.mkdir()
    for name, text in (("a.jsonl.gz", json.dumps(GOOD) + "\n" + json.dumps(GOOD)), ("b.json.bz2", json.dumps([GOOD])),
                       ("c.jsonl.zst", json.dumps(GOOD))):
        with pa.output_stream(str(folder / name)) as out:  # compressed by the suffix
            out.write(text.encode())
    rows = rows_of(read_corpus(InputConfig(path=str(folder))))
    assert [(r["source"], r["source_index"], r["reason"]) for r in rows] == [
        ("a.jsonl.gz", 0, None), ("a.jsonl.gz", 1, None), ("b.json.bz2", 0, None), ("c.jsonl.zst", 0, None)]
    assert {r["response"] for r in rows} == {GOOD["response"]}


def test_parquet_text_is_checked_like_json_text(ray_local, tmp_path):
    """Parquet text is decoded by the reader, not by pyarrow: invalid UTF-8 in a string column (Arrow does not
    validate what it reads) or in chat turns rejects its row, text stored as plain binary (some writers do)
    is read, and columns a row is not made of are not read at all."""
    code = b"```python\nprint(1)\n```"
    instructions = pa.array([b"Add.", b"bad \xff here", b"Sub.", b"Mul."], pa.binary())
    responses = pa.array([code, code, b"\xfe" + code, code], pa.binary())
    other = pa.array([b"\xff"] * 4, pa.binary()).view(pa.string())  # unused, and not even readable
    folder = tmp_path / "pq"
    folder.mkdir()
    pq.write_table(pa.table({"instruction": instructions, "response": responses, "meta": other}), folder / "a-binary.parquet")
    pq.write_table(pa.table({"instruction": instructions.view(pa.string()), "response": responses.view(pa.string()),
                             "meta": other}), folder / "b-string.parquet")
    turn = pa.struct([("role", pa.string()), ("content", pa.string())])
    chats = pa.array([[{"role": "user", "content": "Add."}, {"role": "assistant", "content": code.decode()}],
                      [{"role": "user", "content": "Add."}, {"role": "assistant", "content": "PLACEHOLDER"}]],
                     pa.list_(turn))
    # the second chat's reply becomes invalid UTF-8 (same length, so the offsets stay right)
    raw = chats.flatten().field("content")
    contents = pa.array([v.encode() for v in raw.to_pylist()[:-1]] + [b"\xffLACEHOLDER"], pa.binary()).view(pa.string())
    chats = pa.ListArray.from_arrays(chats.offsets, pa.StructArray.from_arrays(
        [chats.flatten().field("role"), contents], fields=list(turn)))
    pq.write_table(pa.table({"messages": chats}), folder / "c-chat.parquet")
    rows = rows_of(read_corpus(InputConfig(path=str(folder))))
    assert [(r["source"], r["reason"]) for r in rows] == [
        *[(name, reason) for name in ("a-binary.parquet", "b-string.parquet")
          for reason in (None, "non-utf8 text", "non-utf8 text", None)],
        ("c-chat.parquet", None), ("c-chat.parquet", "non-utf8 text")]
    assert rows[0]["instruction"] == "Add." and rows[0]["response"] == code.decode()
    assert rows[1]["detail"] == "`instruction` has invalid UTF-8 at char 4"


def test_a_corrupt_file_is_one_rejected_row_and_the_other_files_are_read(ray_local, tmp_path):
    """A truncated download, a file that is not what its suffix says, a Parquet file with a damaged page: the
    rows read before the damage stand, one row (`unreadable file`) says where the rest was lost, the job goes on."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a-good.jsonl").write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n")
    with pa.output_stream(str(folder / "b-cut.jsonl.gz")) as out:
        out.write((json.dumps(GOOD) + "\n").encode() * 500)
    data = (folder / "b-cut.jsonl.gz").read_bytes()
    (folder / "b-cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    (folder / "c-not.parquet").write_text("not parquet")
    table = pa.table({"instruction": [f"i{i}" for i in range(40)], "response": ["print(1)"] * 40})
    pq.write_table(table, folder / "d-damaged.parquet", row_group_size=10)
    offset = pq.ParquetFile(folder / "d-damaged.parquet").metadata.row_group(2).column(1).data_page_offset
    with open(folder / "d-damaged.parquet", "r+b") as f:  # the third row group's page header: garbage
        f.seek(offset)
        f.write(b"\xff" * 16)
    rows = rows_of(read_corpus(InputConfig(path=str(folder))))
    by_file = {name: [(r["source_index"], r["reason"]) for r in rows if r["source"] == name]
               for name in ("a-good.jsonl", "b-cut.jsonl.gz", "c-not.parquet", "d-damaged.parquet")}
    assert by_file["a-good.jsonl"] == [(0, None), (1, None)]
    assert by_file["b-cut.jsonl.gz"] == [(0, "unreadable file")]
    assert by_file["c-not.parquet"] == [(0, "unreadable file")]
    assert by_file["d-damaged.parquet"] == [(i, None) for i in range(20)] + [(20, "unreadable file")]
    lost = next(r for r in rows if r["source"] == "d-damaged.parquet" and r["reason"])
    assert "rows from 20 on" in lost["detail"]


def test_an_alpaca_input_field_is_part_of_the_instruction(ray_local, tmp_path):
    """CodeAlpaca-style rows (`instruction`, `input`, `output`) keep the code to edit or the data to use in
    `input`: read with the instruction after a blank line (training on the instruction alone would ask about
    code that is not there). Empty, null or not text (another kind of field of that name): the instruction
    alone; an `input`/`output` corpus (input as the instruction field) is not read twice."""
    code = "```python\nx = 1\n```"
    rows = [{"instruction": "Fix the bug in this code.\n", "input": "def f(:\n    pass\n", "output": code},
            {"instruction": "Print one.", "input": "", "output": code},
            {"instruction": "Print two.", "input": None, "output": code},
            {"instruction": "Print three.", "input": ["a"], "output": code}]
    path = tmp_path / "alpaca.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = [(r["instruction"], r["reason"], r["detail"]) for r in rows_of(read_corpus(InputConfig(path=str(path))))]
    assert got == [("Fix the bug in this code.\n\ndef f(:\n    pass", None, None),
                   ("Print one.", None, None), ("Print two.", None, None), ("Print three.", None, None)]
    off = rows_of(read_corpus(InputConfig(path=str(path), context_field=None)))
    assert [r["instruction"] for r in off] == ["Fix the bug in this code.\n", "Print one.", "Print two.",
                                              "Print three."]

    pq.write_table(pa.table({"input": ["Add one to x."], "output": [code]}), tmp_path / "io.parquet")
    (row,) = rows_of(read_corpus(InputConfig(path=str(tmp_path / "io.parquet"), instruction_field="input")))
    assert (row["instruction"], row["response"]) == ("Add one to x.", code)
