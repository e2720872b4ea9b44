"""`inverse-instruct submit`: run a `ray_jobs/` entrypoint on a Ray cluster through the Jobs API.

The same as `ray job submit --working-dir . -- python -m ray_jobs.JOB ...`, with the runtime_env taken from
a small config (SubmitConfig) and an exit status a script can use: the job's logs are streamed to stdout,
and the command returns 0 only if the job SUCCEEDED. Ctrl-C stops the job on the cluster.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from ray.job_submission import JobStatus, JobSubmissionClient

from pipeline.config import RuntimeEnvConfig, SubmitConfig
from pipeline.stopping import stopped

RAY_JOBS = Path(__file__).resolve().parent.parent / "ray_jobs"
JOBS = sorted(p.stem for p in RAY_JOBS.glob("*.py") if p.stem != "__init__")
"""One thin entrypoint per job: `python -m ray_jobs.<job>` (generate, train, evaluate, loop)."""


def entrypoint(job: str, job_args: list[str]) -> str:
    if job not in JOBS:
        raise ValueError(f"unknown job {job!r} (known: {', '.join(JOBS)})")
    return shlex.join(["python", "-m", f"ray_jobs.{job}", *job_args])


def runtime_env(cfg: RuntimeEnvConfig) -> dict[str, Any]:
    """Ray runtime_env: the working dir (minus excludes), extra pip packages, env vars."""
    local = "://" not in cfg.working_dir  # else a packaged URI (s3://.../pkg.zip) Ray downloads itself
    env: dict[str, Any] = {
        "working_dir": str(Path(cfg.working_dir).resolve()) if local else cfg.working_dir,
        # The driver's stdout is a file on the cluster: unbuffered, so streamed logs arrive as they are written.
        "env_vars": {"PYTHONUNBUFFERED": "1", **cfg.env_vars},
    }
    if local and cfg.excludes:
        env["excludes"] = list(cfg.excludes)
    if cfg.pip:
        env["pip"] = list(cfg.pip)
    return env


def client(address: str | None) -> JobSubmissionClient:
    if address:
        # Ray's client lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override an explicit address; here the
        # explicit one wins (a stale RAY_ADDRESS=auto from another shell must not redirect a submission).
        for var in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
            os.environ.pop(var, None)
    return JobSubmissionClient(address)


def submit(job: str, job_args: list[str], cfg: SubmitConfig, wait: bool = True,
           out: TextIO = sys.stdout) -> int:
    """Submit, stream the logs until the job ends, return 0 if it SUCCEEDED (1 otherwise, 130 on Ctrl-C, 143 on
    SIGTERM)."""
    jobs = client(cfg.address)
    command = entrypoint(job, job_args)
    t0 = time.perf_counter()
    job_id = jobs.submit_job(entrypoint=command, runtime_env=runtime_env(cfg.runtime_env),
                             metadata={"job": job})
    _note(f"submitted {job_id}: {command}")
    if not wait:
        _note(f"follow it with: ray job logs --address {jobs.get_address()} --follow {job_id}")
        return 0
    try:
        status = follow_logs(jobs, job_id, out)
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM (pipeline.stopping.Terminated): the job stops too
        word, code = stopped(stop)
        _note(f"{word}: stopping {job_id}")
        jobs.stop_job(job_id)
        return code
    info = jobs.get_job_info(job_id)
    _note(f"{job_id} {status.value} after {time.perf_counter() - t0:.1f}s" +
          (f": {info.message}" if status != JobStatus.SUCCEEDED and info.message else ""))
    return 0 if status == JobStatus.SUCCEEDED else 1


def follow_logs(jobs: JobSubmissionClient, job_id: str, out: TextIO) -> JobStatus:
    """Stream the job's logs until it ends; returns its final status.

    The websocket stream ends when the job does; if it breaks or ends early (a proxy without websockets),
    the rest is polled from where the stream stopped, so nothing is printed twice or lost."""
    printed = 0

    async def tail() -> None:
        nonlocal printed
        async for chunk in jobs.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()
            printed += len(chunk)

    try:
        asyncio.run(tail())
    except Exception as err:  # noqa: BLE001 - any transport problem: fall back to polling
        _note(f"log streaming unavailable ({type(err).__name__}: {err}); polling instead")
    while True:
        status = jobs.get_job_status(job_id)  # before reading the logs: a terminal job's logs are complete
        logs = jobs.get_job_logs(job_id)
        out.write(logs[printed:])
        out.flush()
        printed = max(printed, len(logs))
        if status.is_terminal():
            return status
        time.sleep(1)


def _note(text: str) -> None:
    print(f"[submit] {text}", file=sys.stderr, flush=True)
