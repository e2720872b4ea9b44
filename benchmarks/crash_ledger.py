"""What the crash ledger costs a batch: `CrashIsolation.run` around a score function that does nothing.

    .venv/bin/python -m benchmarks.crash_ledger [--batch-sizes 8,64,256,1024] [--batches 50]

Every batch of `generate`'s `inverse` stage (and of `evaluate`) asks the ledger actor three times
(examine, begin, end; see pipeline/crash_isolation.py). This measures that overhead on a local Ray
instance, with the real ledger actor and id-sized strings, for batches that never crashed (the usual
case). Median and p90 over `--batches` batches per size. Prints one JSON line per size, then a table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from benchmarks.common import device_name, emit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default="8,64,256,1024")
    parser.add_argument("--batches", type=int, default=50)
    args = parser.parse_args()

    import pyarrow as pa
    import ray

    from pipeline.crash_isolation import CrashIsolation, start_ledger

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    isolation = CrashIsolation(start_ledger())
    for size in (int(s) for s in args.batch_sizes.split(",")):
        times = []
        for b in range(args.batches):
            ids = [f"{size}-{b}-{i:05d}-" + "0" * 24 for i in range(size)]  # id-sized strings
            batch = pa.table({"id": ids})
            t0 = time.perf_counter()
            isolation.run(batch, lambda part: part, lambda part, details: part)
            times.append(time.perf_counter() - t0)
        times.sort()
        emit({"benchmark": "crash_ledger", "device": device_name(), "batch_size": size, "batches": args.batches,
              "median_ms": round(1000 * statistics.median(times), 2),
              "p90_ms": round(1000 * times[int(0.9 * (len(times) - 1))], 2)})
    ray.shutdown()


if __name__ == "__main__":
    main()
