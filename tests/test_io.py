"""Reading a corpus (files, limits, HF datasets, generate outputs as input) and the output folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import ConfigError, InputConfig
from pipeline.io import _is_hf_dataset, input_version, read_corpus
from tests.test_records import GOOD, rows_of


def test_json_array_and_limit(ray_local, tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([GOOD, {**GOOD, "instruction": "second"}, {**GOOD, "instruction": "third"}]))
    rows = rows_of(read_corpus(InputConfig(path=str(path), limit=2)))
    assert [r["instruction"] for r in rows] == ["Add numbers.", "second"]


def test_folder_of_parquet_files_limit_counts_in_source_order(ray_local, tmp_path):
    folder = tmp_path / "pq"
    folder.mkdir()
    for part in range(3):
        table = pa.table({"instruction": [f"p{part}-{i}" for i in range(4)], "output": ["print(1)"] * 4})
        pq.write_table(table, folder / f"part-{part}.parquet")
    rows = rows_of(read_corpus(InputConfig(path=str(folder), limit=6)))
    assert [r["instruction"] for r in rows] == ["p0-0", "p0-1", "p0-2", "p0-3", "p1-0", "p1-1"]
    assert {r["source"] for r in rows} == {"part-0.parquet", "part-1.parquet"}


def test_saved_hf_dataset(ray_local, tmp_path):
    import datasets

    datasets.Dataset.from_list([GOOD, {"instruction": "x", "response": None}]).save_to_disk(tmp_path / "hf")
    rows = rows_of(read_corpus(InputConfig(path=str(tmp_path / "hf"))))
    assert [r["reason"] for r in rows] == [None, "missing field: response"]  # null = absent
    assert rows[0]["source"] == "hf:train"
    datasets.DatasetDict({"test": datasets.Dataset.from_list([GOOD])}).save_to_disk(tmp_path / "hf_dict")
    with pytest.raises(ConfigError, match=r"input.path: .*hf_dict has no 'train' split \(it has \['test'\]; input.split"):
        read_corpus(InputConfig(path=str(tmp_path / "hf_dict")))
    assert rows_of(read_corpus(InputConfig(path=str(tmp_path / "hf_dict"), split="test")))[0]["source"] == "hf_dict:test"


def test_the_input_version_changes_with_the_files_read_and_only_with_them(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.jsonl").write_text(json.dumps(GOOD) + "\n")
    cfg = InputConfig(path=str(folder))
    first = input_version(cfg)
    assert first is not None and input_version(cfg) == first
    (folder / "_SUCCESS").write_text("")  # not read: no change
    (folder / "notes.txt").write_text("not a corpus file")
    assert input_version(cfg) == first
    (folder / "b.jsonl").write_text(json.dumps(GOOD) + "\n")  # one more file
    second = input_version(cfg)
    assert second != first
    (folder / "b.jsonl").write_text(json.dumps({**GOOD, "instruction": "replaced"}) + "\n")
    assert input_version(cfg) not in (first, second)
    # The file alone reads as the folder that held only it did (the same rows, with the same ids).
    assert input_version(InputConfig(path=str(folder / "a.jsonl"))) == first
    assert input_version(InputConfig()) is not None  # the bundled corpus
    # Not checked: a hub dataset name, an input that is not there (reading it says so).
    assert input_version(InputConfig(path="someone/some-dataset")) is None
    assert input_version(InputConfig(path=str(tmp_path / "missing.jsonl"))) is None


def test_embedded_corpus_ids_are_stable(ray_local):
    a = rows_of(read_corpus(InputConfig(limit=5)))
    b = rows_of(read_corpus(InputConfig(limit=5)))
    assert [r["id"] for r in a] == [r["id"] for r in b]
    assert len({r["id"] for r in a}) == 5 and a[0]["source"] == "evol-codealpaca-2k.json"


def test_missing_input_is_a_clear_error(ray_local, tmp_path):
    with pytest.raises(ConfigError, match="input.path"):
        read_corpus(InputConfig(path=str(tmp_path / "nope.jsonl")))


def test_a_name_that_is_neither_a_path_nor_a_hub_dataset_is_a_clear_error():
    # Offline (as here and in CI), the hub answers at once instead of after its retries.
    code = ("from pipeline.config import InputConfig; from pipeline.io import read_corpus; "
            "read_corpus(InputConfig(path='mydata'))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert "ConfigError: input.path: 'mydata' is no local file or folder, and as a hub dataset:" in run.stderr


@pytest.mark.parametrize("path, hub", [("mydata", True), ("org/data-v1.5", True), ("data.jsonl", False),
                                       ("corpus/part.json.gz", False), ("./mydata", False), ("runs/one/selected", False),
                                       ("~/mydata", False), ("s3://bucket/data", False)])
def test_which_missing_names_are_taken_for_hub_datasets(path, hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # none of them exists here
    assert _is_hf_dataset(path) is hub


def test_hidden_and_bookkeeping_entries_of_a_folder_are_skipped(ray_local, tmp_path):
    row = '{"instruction": "Add.", "output": "```python\\nx = 1\\n```"}\n'
    for name in ("data/part-0.jsonl", "data/_SUCCESS.jsonl", "data/.hidden.jsonl", "data/_temporary/0/part-0.jsonl",
                 "data/.ipynb_checkpoints/part-0.jsonl", "data/sub/part-1.jsonl"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(row)
    rows = rows_of(read_corpus(InputConfig(path=str(tmp_path / "data"))))
    assert sorted(r["source"] for r in rows) == ["part-0.jsonl", "sub/part-1.jsonl"]


def test_files_of_other_kinds_in_a_folder_are_named_not_skipped_silently(ray_local, tmp_path, caplog):
    """A README.md or a .csv beside the JSONL files was left out without a word (until 2026-12-07)."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "part-0.jsonl").write_text('{"instruction": "Add.", "output": "```python\\nx = 1\\n```"}\n')
    for name in ("README.md", "more.csv"):
        (tmp_path / "data" / name).write_text("instruction,output\n")
    rows = rows_of(read_corpus(InputConfig(path=str(tmp_path / "data"))))
    assert [r["source"] for r in rows] == ["part-0.jsonl"]
    assert (f"input.path: 2 file(s) under {tmp_path / 'data'} are not .json, .jsonl or .parquet and are not read: "
            "README.md, more.csv") in caplog.text


def test_a_generate_output_folder_reads_as_its_selected_pairs(ray_local, tmp_path):
    """Read whole, a generate output would add its snippets/ (the original pairs) to the selected ones."""
    run = tmp_path / "gen"
    for folder, instruction in (("selected", "New."), ("snippets", "Original.")):
        (run / folder).mkdir(parents=True)
        pq.write_table(pa.table({"id": ["a"], "instruction": [instruction], "response": ["x = 1"]}),
                       run / folder / "part-0.parquet")
    (run / "_stages").mkdir()
    with pytest.raises(ConfigError, match="data.generated: .* is a generate output that has not finished"):
        read_corpus(InputConfig(path=str(run)), path_key="data.generated")
    (run / "_stages" / "select.json").write_text("{}")
    for path in (str(run), f"{run}/", f"{run}/selected"):
        assert [r["instruction"] for r in rows_of(read_corpus(InputConfig(path=path)))] == ["New."]


MULTI_NODE = """
import json, sys
import ray
from ray.cluster_utils import Cluster
import pipeline.io
from pipeline.config import ConfigError, InputConfig
from pipeline.io import read_corpus
from pipeline.output import check_output_seen_everywhere

parse_file = pipeline.io.parse_file


def parse_file_and_say_where(task, cfg):  # each row says which node parsed it
    for row in parse_file(task, cfg):
        yield {**row, "node": ray.get_runtime_context().get_node_id()}


if __name__ == "__main__":
    folder, marker = sys.argv[1:]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=2)  # a second node, with more free CPUs than the driver's
        ray.init(address=cluster.address, logging_level="ERROR")
        ray.data.DataContext.get_current().enable_progress_bars = False
        pipeline.io.parse_file = parse_file_and_say_where
        driver = ray.get_runtime_context().get_node_id()
        parsed = [row["node"] == driver for row in read_corpus(InputConfig(path=folder)).take_all()]
        check_output_seen_everywhere("out", marker, "run-1")  # both nodes see it
        try:
            check_output_seen_everywhere("out", marker, "run-2")  # another run's marker
            missed = None
        except ConfigError as err:
            missed = str(err)
        # A node that leaves between the listing and the check (an idle node scaled down) is passed over.
        leaving = cluster.add_node(num_cpus=1)
        listed = ray.nodes()
        cluster.remove_node(leaving)
        ray.nodes = lambda: listed
        check_output_seen_everywhere("out", marker, "run-1")
        print(json.dumps({"parsed_on_driver": parsed, "missed": missed, "listed": len(listed)}))
    finally:
        ray.shutdown()
        cluster.shutdown()
"""


def test_local_input_is_read_on_the_driver_node_and_every_node_must_see_the_output(tmp_path):
    """On a cluster of several nodes a plain local path is one node's disk. The input's files are parsed by
    tasks on the driver's node (before, Ray Data spread them: 2 or 3 of the 4 ran on the other node here), and a
    local output folder must be visible from every node, since Ray Data writes from wherever a task runs."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    for part in range(4):
        (folder / f"part-{part}.jsonl").write_text(json.dumps(GOOD) + "\n")
    marker = tmp_path / "started.json"
    marker.write_text(json.dumps({"token": "run-1"}))
    (tmp_path / "multi_node.py").write_text(MULTI_NODE)
    # Ray records the cluster it starts as the machine's current one (`ray.init()` would then connect to it):
    # whatever happens to the subprocess, the record is put back as it was.
    from ray._common.utils import get_ray_address_file

    address_file = Path(get_ray_address_file(None))
    before = address_file.read_text() if address_file.exists() else None
    try:
        run = subprocess.run([sys.executable, str(tmp_path / "multi_node.py"), str(folder), str(marker)],
                             capture_output=True, text=True, timeout=300,
                             env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    finally:
        if before is None:
            address_file.unlink(missing_ok=True)
        else:
            address_file.write_text(before)
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    assert lines, run.stderr[-3000:]
    result = json.loads(lines[-1])
    assert result["parsed_on_driver"] == [True] * 4 and result["listed"] == 3
    assert "output: out is not visible from node" in result["missed"]
    assert "it holds another run's files" in result["missed"] and "s3://" in result["missed"]
