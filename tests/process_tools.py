"""Helpers for the tests that kill a running job (a driver and the local Ray instance it started)."""

from __future__ import annotations

import os
import signal
import subprocess
import time


def kill_session(leader: subprocess.Popen, timeout_s: float = 60) -> None:
    """SIGKILL a command started with `start_new_session=True` and every process of its session: the local
    Ray instance its driver started, and Ray's workers, which each run in a process group of their own, so
    that `killpg` alone left them running a moment (a Train controller once registered a checkpoint after
    the kill). Returns once none of them runs."""
    import psutil

    def running() -> list[psutil.Process]:
        found = []
        for process in psutil.process_iter():
            try:
                if os.getsid(process.pid) == leader.pid and process.status() != psutil.STATUS_ZOMBIE:
                    found.append(process)
            except (OSError, psutil.Error):  # gone meanwhile
                pass
        return found

    deadline = time.monotonic() + timeout_s
    while (left := running()) and time.monotonic() < deadline:
        for process in left:
            try:
                process.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
        leader.poll()  # reap the driver (our child); the others are reaped by their new parent
        time.sleep(0.1)
    leader.wait()
    assert not running(), f"processes of the killed session {leader.pid} still run"
