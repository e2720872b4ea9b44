"""The run's output folder: OutputDir, the check that every node sees it, reading its Parquet folders back."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import ConfigError
from pipeline.output import OutputDir, check_output_seen_here, folder_holds, output_seen_here, read_parquet


def test_an_output_that_cannot_be_a_folder_is_a_config_error(tmp_path):
    (tmp_path / "a-file").write_text("x")
    for bad in (tmp_path / "a-file", tmp_path / "a-file" / "run"):
        with pytest.raises(ConfigError, match=f"output: cannot use {bad} as the output folder"):
            OutputDir(str(bad))


def test_output_dir_deletes_files_cut_short(tmp_path):
    out = OutputDir(str(tmp_path / "run"))
    folder = tmp_path / "run" / "part"
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"id": ["a", "b"]}), folder / "good.parquet")
    (folder / "cut.parquet").write_bytes(b"PAR1 truncated")
    assert out.read_ids("part") == {"a", "b"}
    assert not (folder / "cut.parquet").exists()
    out.write_json("_stages/x.json", {"n": 1})
    assert out.read_json("_stages/x.json") == {"n": 1}


def test_an_output_marker_a_node_cannot_read_is_a_config_error(tmp_path):
    marker = tmp_path / "started.json"
    marker.write_text(json.dumps({"token": "run-1"}))
    assert output_seen_here("out", str(marker), "run-1") is None
    with pytest.raises(ConfigError, match=r"output: out is not visible from node .*FileNotFoundError"):
        check_output_seen_here("out", str(tmp_path / "missing.json"), "run-1")


def test_a_folder_of_many_small_files_is_read_with_the_v1_reader(ray_local, tmp_path):
    """`_work/scored/` holds one small file per batch. Ray Data's V2 Parquet reader (Ray 2.60's default)
    starts one thread per file in a read task and packs small files into a couple of blocks: 1,272 files
    became 2 blocks in 27 s, 10,175 files were still being read after 4 minutes (benchmarks/scored_read.py).
    `read_parquet` reads them with the V1 reader (7 s and 23 s, 200 blocks each), and leaves the caller's
    context as it was."""
    import ray

    for i in range(600):
        pq.write_table(pa.table({"id": [f"{i}-{j}" for j in range(8)], "k": list(range(8))}),
                       tmp_path / f"{i:05d}.parquet")
    context = ray.data.DataContext.get_current()
    before = context.use_datasource_v2
    ds = read_parquet(str(tmp_path), columns=["id"]).materialize()
    assert ds.count() == 4800
    assert "ReadParquet" in ds.stats() and "ReadFilesParquetV2" not in ds.stats()
    assert sorted(ds.to_pandas()["id"]) == sorted(f"{i}-{j}" for i in range(600) for j in range(8))
    assert context.use_datasource_v2 == before


def test_folder_holds_looks_without_making_the_folder(tmp_path):
    assert not folder_holds(str(tmp_path / "run"), "_stages/preprocess.json")
    assert not (tmp_path / "run").exists()
    OutputDir(str(tmp_path / "run")).write_json("_stages/preprocess.json", {})
    assert folder_holds(str(tmp_path / "run"), "_stages/preprocess.json")
    assert not folder_holds(str(tmp_path / "run"), "_stages/select.json")
