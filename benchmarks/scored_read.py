"""Reading `_work/scored/` back: Ray Data's V1 Parquet reader (`pipeline.output.read_parquet`) against V2.

    .venv/bin/python -m benchmarks.scored_read [--snippets 81396] [--batch-sizes 8,64] [--timeout-s 300]

The `inverse` stage writes one file per batch (the unit of resume), so a paper-scale run leaves thousands of
small files, which `select` reads back as one dataset. Writes `--snippets` synthetic scored rows (K = 10
instructions of ~200 characters, ~600 characters of code each) as files of one batch each, then reads them
with each reader in a fresh process on a 2-CPU local Ray instance (a read still running after `--timeout-s`
is stopped, its Ray instance shut down, and reported with `read_s` empty). Prints one JSON line per
(batch size, reader), then a table.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import emit, table

READ = """
import os, sys, time, ray
sys.path.insert(0, {root!r})
from pipeline.inverse import SCORED_SCHEMA
from pipeline.output import read_parquet
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
ray.data.DataContext.get_current().enable_progress_bars = False
read = read_parquet if {reader!r} == "v1" else ray.data.read_parquet
t0 = time.perf_counter()

def run():
    ds = read({folder!r}, schema=SCORED_SCHEMA).materialize()
    print("READ", ds.count(), ds.num_blocks(), time.perf_counter() - t0, flush=True)

import threading
reading = threading.Thread(target=run, daemon=True)
reading.start()
reading.join({timeout_s})
ray.shutdown()  # also when the read still runs: the local instance and its workers go with it
os._exit(0)
"""


def write_scored(folder: Path, snippets: int, batch_size: int) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.inverse import SCORED_SCHEMA

    folder.mkdir(parents=True)
    files = 0
    for start in range(0, snippets, batch_size):
        n = min(batch_size, snippets - start)
        rows = [{"id": f"{start + i:012x}", "source": "corpus.jsonl", "source_index": start + i,
                 "code": f"def f_{start + i}(x):\n" + "    x = x + 1\n" * 40, "lang": "python",
                 "instructions": [f"Write a python function number {k} that adds one to x, forty times. " * 3
                                  for k in range(10)],
                 "scores": [k / 10 for k in range(10)], "reason": None, "detail": None} for i in range(n)]
        pq.write_table(pa.Table.from_pylist(rows, schema=SCORED_SCHEMA), folder / f"{files:08d}.parquet")
        files += 1
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--snippets", type=int, default=81396)  # the bundled corpus x57 after preprocess
    parser.add_argument("--batch-sizes", default="8,64")
    parser.add_argument("--timeout-s", type=float, default=300)
    args = parser.parse_args()
    root = str(Path(__file__).resolve().parent.parent)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for batch_size in (int(b) for b in args.batch_sizes.split(",")):
            folder = Path(tmp) / f"scored-{batch_size}"
            files = write_scored(folder, args.snippets, batch_size)
            for reader in ("v1", "v2"):
                script = READ.format(root=root, reader=reader, folder=str(folder), timeout_s=args.timeout_s)
                t0 = time.perf_counter()
                done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
                line = next((s for s in done.stdout.splitlines() if s.startswith("READ ")), None)
                result = {"benchmark": "scored_read", "reader": reader, "batch_size": batch_size, "files": files,
                          "snippets": args.snippets, "process_s": round(time.perf_counter() - t0, 1)}
                if line:
                    _, rows, blocks, seconds = line.split()
                    result.update(rows=int(rows), blocks=int(blocks), read_s=round(float(seconds), 1))
                else:
                    result.update(rows=None, blocks=None, read_s=None, stopped_at_s=args.timeout_s)
                emit(result)
                results.append(result)
    print(table(results, ["batch_size", "files", "reader", "rows", "blocks", "read_s", "process_s"]))


if __name__ == "__main__":
    main()
