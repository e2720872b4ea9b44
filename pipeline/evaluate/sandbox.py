"""Isolated execution of model-written programs: one fresh process per program.

Each program runs in its own Python process (sandbox_child.py) that:
- lives in a throwaway temporary working directory (deleted afterwards), with HOME/TMPDIR pointing into it
  and an environment of a few fixed variables;
- is cut off from the network: its own unprivileged user + network namespace (`unshare` via ctypes) where
  the kernel permits it (isolation `namespace`), otherwise an audit hook that refuses sockets, new processes
  and ctypes (isolation `audit`: weaker, the hook lives in the interpreter the program runs in);
- has resource limits: address space (RLIMIT_AS), CPU seconds (RLIMIT_CPU), file size (RLIMIT_FSIZE),
  no core dumps;
- is its own process group (new session), killed as a whole with SIGKILL at the wall-clock timeout,
  and once more after it exits, so that nothing it forked outlives it.

What this is for: keeping a wrong, slow, greedy or network-happy program from hurting the job or the
machine. It is not a defence against a deliberately malicious program (use containers/VMs for that).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import signal
import site
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import SandboxConfig

CHILD = Path(__file__).resolve().parent / "sandbox_child.py"
# Failure kinds (counted in the summary): the program's own outcome, then what the parent saw.
REASONS = ("passed", "assertion", "error", "syntax", "exit", "timeout", "memory", "crash", "sandbox")


@dataclass(frozen=True)
class Outcome:
    passed: bool
    reason: str  # one of REASONS ("passed" when passed)
    detail: str  # exception text, signal, stderr tail
    seconds: float  # wall time of the process, start to exit or kill
    isolation: str  # "namespace" | "audit" | "unknown" (died before it said); + " (no memory limit)" where refused


def run_program(program: str, cfg: SandboxConfig) -> Outcome:
    """Run `program` (Python source) in a fresh sandboxed process; passed = it ran to the end."""
    work = Path(tempfile.mkdtemp(prefix="ii-sandbox-"))
    read_end, write_end = os.pipe()
    try:
        (work / "program.py").write_text(program, encoding="utf-8")
        settings = {"status_fd": write_end, "isolation": cfg.isolation,
                    "memory_bytes": cfg.memory_mb * 2**20, "cpu_seconds": max(1, math.ceil(cfg.timeout_s)),
                    "file_bytes": cfg.max_file_mb * 2**20, "site_packages": site.getsitepackages()}
        env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8",
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        with open(work / "stderr", "wb") as stderr:
            start = time.perf_counter()
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", str(CHILD), json.dumps(settings)], cwd=work, env=env,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                pass_fds=(write_end,), start_new_session=True,  # setsid: its own process group to kill
            )
            os.close(write_end)
            write_end = -1
            try:
                proc.wait(timeout=cfg.timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            _kill_group(proc)
            seconds = time.perf_counter() - start
        status = _read_status(read_end)
        tail = (work / "stderr").read_bytes()[-2000:].decode("utf-8", "replace")
        return _classify(status, proc.returncode, timed_out, tail, seconds, cfg.timeout_s)
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)
        shutil.rmtree(work, ignore_errors=True)


def run_many(programs: list[str], cfg: SandboxConfig, workers: int | None = None) -> list[Outcome]:
    """Programs in parallel (threads that each wait on one process), results in input order."""
    workers = workers or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda p: run_program(p, cfg), programs))


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the program's whole process group (also after a normal exit: stray grandchildren)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _read_status(fd: int) -> dict[str, Any]:
    """Merge the JSON lines the child wrote. Non-blocking: a forked grandchild that escaped the group
    might still hold the pipe open, and we must not wait for it."""
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
    data = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    status: dict[str, Any] = {}
    for line in data.decode("utf-8", "replace").splitlines():
        try:
            status.update(json.loads(line))
        except json.JSONDecodeError:
            pass
    return status


def _classify(status: dict[str, Any], returncode: int, timed_out: bool, stderr: str, seconds: float,
              timeout_s: float) -> Outcome:
    isolation = status.get("isolation", "unknown")
    refused = status.get("limits_refused")  # by the system (macOS: no address-space limit); ran without them
    if refused:
        isolation += f" (no {' / '.join(refused)} limit{'s' if len(refused) > 1 else ''})"
    reason = status.get("reason")
    detail = status.get("detail", "")
    if reason is not None:  # the program finished (or the sandbox refused to start)
        pass
    elif timed_out:
        reason, detail = "timeout", f"killed after {timeout_s:g}s wall time"
    elif returncode == -signal.SIGXCPU:
        reason, detail = "timeout", "CPU time limit (SIGXCPU)"
    elif "MemoryError" in stderr or "Cannot allocate memory" in stderr or "bad_alloc" in stderr:
        reason, detail = "memory", stderr[-500:]  # died allocating, before it could report
    elif returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else str(-returncode)
        reason, detail = "crash", f"killed by signal {name}; {stderr[-300:]}"
    else:
        # os._exit() from the program, or a crash of the interpreter: the tests did not run to the end.
        reason, detail = "exit", f"exit code {returncode} before the tests finished; {stderr[-300:]}"
    return Outcome(reason == "passed", reason, detail, round(seconds, 4), isolation)
