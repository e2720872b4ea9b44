"""A run's output folder (local or `s3://...`, through pyarrow filesystems): markers, manifests, Parquet
tables, the check that every node of a cluster sees it, and reading its own Parquet folders back."""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipeline.config import ConfigError
from pipeline.io import as_uri

log = logging.getLogger(__name__)


def output_seen_here(output: str, marker: str, token: str) -> str | None:
    """None if this node reads `marker` (a file the driver has just written in the output folder) with `token` in
    it; else the complaint. A node that does not see the folder would write its part of the results where no one
    reads them: Ray Data writes from whichever node a task runs on."""
    try:
        fs, path = pafs.FileSystem.from_uri(as_uri(marker))
        with fs.open_input_stream(path) as f:
            if token in f.read().decode("utf-8", "replace"):
                return None
        why = "it holds another run's files"
    except (OSError, ValueError) as err:
        why = f"{type(err).__name__}: {err}"
    return (f"output: {output} is not visible from node {ray.util.get_node_ip_address()} ({why}); on a cluster "
            f"of several nodes the output must be on storage that every node shares: s3://... or a shared "
            f"filesystem (NFS, EFS)")


def check_output_seen_here(output: str, marker: str, token: str) -> None:
    problem = output_seen_here(output, marker, token)
    if problem:
        raise ConfigError(problem)


def check_output_seen_everywhere(output: str, marker: str, token: str) -> None:
    """`check_output_seen_here` on every node of the cluster now, for a local output folder (one tiny task per
    node). Nodes that join later are checked by the engine actors they start (see InverseInstruct)."""
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    if "://" in output or len(nodes) < 2:
        return
    probe = ray.remote(num_cpus=0, max_retries=0)(output_seen_here)
    asked = [(node, probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
              .remote(output, marker, token)) for node in nodes]
    for node, answer in asked:
        try:
            problem = ray.get(answer)
        except (ray.exceptions.TaskUnschedulableError, ray.exceptions.NodeDiedError,
                ray.exceptions.WorkerCrashedError):  # it left the cluster since (an idle node scaled down)
            log.info("node %s left the cluster during the output check", node)
            continue
        if problem:
            raise ConfigError(problem)


def folder_holds(uri: str, name: str) -> bool:
    """Whether folder `uri` (local or `s3://...`) holds `name`, without making the folder as `OutputDir` does;
    False where it cannot be looked into."""
    try:
        fs, root = pafs.FileSystem.from_uri(as_uri(uri))
        return fs.get_file_info(f"{root.rstrip('/')}/{name}").type != pafs.FileType.NotFound
    except (OSError, ValueError):
        return False


def read_parquet(paths: str | list[str], **kwargs: Any) -> ray.data.Dataset:
    """`ray.data.read_parquet` through Ray Data's V1 Parquet reader, for the folders a run writes itself.

    A run's `_work/scored/` holds one small file per batch: 10,175 files for 81K snippets in batches of 8.
    The V2 reader (Ray 2.60's default) starts one thread per file in each read task; there it ran
    two tasks of ~4,000 threads each, still reading after 10 minutes on 2 cores, and packed 1,272 files
    (batches of 64) into 2 blocks in 29 s. V1 reads them in 23 s and 7 s, as 200 blocks. Set for this call
    only: the flag is read where the read is planned.
    """
    context = ray.data.DataContext.get_current()
    before = getattr(context, "use_datasource_v2", None)  # absent where V1 is the only reader
    if before is None:
        return ray.data.read_parquet(paths, **kwargs)
    context.use_datasource_v2 = False
    try:
        return ray.data.read_parquet(paths, **kwargs)
    finally:
        context.use_datasource_v2 = before


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

    def write_parquet(self, name: str, table: pa.Table) -> None:
        """One Parquet file; a file cut short by a killed writer is what `read_tables` deletes."""
        parent = f"{self.root}/{name}".rpartition("/")[0]
        self.fs.create_dir(parent, recursive=True)
        with self.fs.open_output_stream(f"{self.root}/{name}") as f:
            pq.write_table(table, f)

    def read_tables(self, name: str, columns: list[str] | None = None) -> list[pa.Table]:
        """The readable Parquet files of a folder; a file cut short by a killed writer is deleted.

        The files are read 16 at a time: `_work/scored/` holds one file per batch, and in S3 each is a few
        requests' latency (1,272 files from a local S3 server: 13.7 s one by one, 10.5 s so)."""
        def read(path: str) -> pa.Table | None:
            try:
                with self.fs.open_input_file(path) as f:
                    return pq.read_table(f, columns=columns)
            except (pa.ArrowInvalid, OSError):
                self.fs.delete_file(path)
                return None

        with ThreadPoolExecutor(max_workers=16) as pool:
            return [t for t in pool.map(read, self.parquet_files(name)) if t is not None]

    def read_ids(self, name: str) -> set[str]:
        """Ids in the readable Parquet files of a folder (see `read_tables`)."""
        return {i for t in self.read_tables(name, ["id"]) for i in t.column("id").to_pylist()}
