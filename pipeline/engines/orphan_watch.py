"""A vLLM engine's processes die with the process that started them.

vLLM runs its engine core (and, with tensor parallelism, its workers) as child processes of the engine's
owner, a Ray actor. Ray kills an actor's children when it kills the actor, but not when the whole Ray
instance goes down under it (a command that started its own local instance, killed; Ctrl-C at a bad
moment): the engine core ran on, orphaned, holding its KV cache (7 GiB of RAM on a 24 GiB machine, or a
GPU's memory, which the next run's engine then could not get). vLLM's engine core does not watch its parent.

`watch` starts a small process, before the engine starts, that notes the owner's descendants every second
and kills them once the owner is gone; the owner stops it when it has shut its engine down itself. It runs
as a script (no package imports), so that it starts in a fraction of a second.

It also removes the shared-memory segments those processes had mapped (`/dev/shm/psm_*`, vLLM's message
queues between its engine core and workers): their owners unlink them when they close, and a killed engine
left them behind, one or two per interrupted run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time


def watch() -> subprocess.Popen:
    """Kill this process's descendants (those it has from now on) if it exits without `stop`ping the watcher,
    or, in a Ray worker, once its raylet is gone: the worker exits then too, but only once it notices (CI once
    found an engine core alive 30 s after its raylet was killed); Ray's own agents fate-share so with it."""
    raylet = os.environ.get("RAY_RAYLET_PID", "")  # set by Ray in its workers
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), str(os.getpid()), raylet],
                            stdin=subprocess.DEVNULL)


def stop(watcher: subprocess.Popen) -> None:
    watcher.kill()
    watcher.wait()


def _watch(owner: int, raylet_pid: int | None, every_s: float = 1.0) -> None:
    import psutil  # a vLLM requirement; psutil's kill checks that a pid still names the process it was

    try:
        raylet = psutil.Process(raylet_pid) if raylet_pid else None
    except psutil.Error:  # gone already: the owner's own end will do
        raylet = None

    def raylet_alive() -> bool:
        try:
            return raylet is None or (raylet.is_running() and raylet.status() != psutil.STATUS_ZOMBIE)
        except psutil.Error:
            return False

    seen: list = []
    segments: set[str] = set()
    # os.getppid() changes once the owner is gone: this process is handed to another parent
    while os.getppid() == owner and raylet_alive():
        try:
            seen = [p for p in psutil.Process(owner).children(recursive=True) if p.pid != os.getpid()]
        except psutil.Error:
            pass
        for process in seen:
            try:
                segments |= shared_memory_mapped_by(process.pid)
            except OSError:  # gone meanwhile
                pass
        time.sleep(every_s)
    for process in seen:
        try:
            process.kill()
        except psutil.Error:  # gone already
            pass
    for name in segments:
        try:
            os.unlink(f"/dev/shm/{name}")
        except OSError:  # unlinked by its owner already
            pass


def shared_memory_mapped_by(pid: int) -> set[str]:
    """Names of the `multiprocessing.shared_memory` segments (/dev/shm/psm_*) process `pid` maps (Linux;
    OSError where it has no /proc entry). Also used by VLLMEngine.close for an engine it stopped itself."""
    with open(f"/proc/{pid}/maps") as maps:
        paths = {line.split(maxsplit=5)[5].strip() for line in maps if "/dev/shm/psm_" in line}
    return {os.path.basename(path) for path in paths if os.path.exists(path)}  # not "... (deleted)"


if __name__ == "__main__":
    _watch(int(sys.argv[1]), int(sys.argv[2]) if sys.argv[2:] and sys.argv[2] else None)
