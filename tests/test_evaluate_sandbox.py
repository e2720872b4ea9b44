"""The evaluation sandbox: limits, kills, no network, and a verdict for every way a program can end."""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import SandboxConfig
from pipeline.evaluate.sandbox import run_many, run_program


def namespaces_permitted() -> bool:
    return run_program("pass", SandboxConfig(isolation="namespace")).isolation == "namespace"


def test_infinite_loop_is_killed_as_timeout_and_the_next_program_runs():
    cfg = SandboxConfig(timeout_s=1.0)
    t0 = time.perf_counter()
    busy, idle, fine = run_many(["while True:\n    pass", "import time\ntime.sleep(300)", "assert 1 + 1 == 2"], cfg,
                                workers=3)
    assert time.perf_counter() - t0 < 10
    assert (busy.passed, busy.reason) == (False, "timeout") and busy.seconds < 5
    assert (idle.passed, idle.reason) == (False, "timeout") and idle.seconds < 5
    assert fine.passed and fine.reason == "passed"


@pytest.mark.parametrize("bomb", [
    "x = bytearray(10 ** 10)",  # one huge allocation
    "chunks = []\nwhile True:\n    chunks.append(bytearray(10 ** 6))",  # growth until the limit
])
def test_memory_bomb_is_a_memory_failure(bomb):
    outcome = run_program(bomb, SandboxConfig(memory_mb=256, timeout_s=20))
    assert (outcome.passed, outcome.reason) == (False, "memory")
    assert run_program("x = bytearray(10 ** 6)", SandboxConfig(memory_mb=256)).passed  # under the limit: fine


def test_children_of_a_killed_program_die_with_it(tmp_path: Path):
    if not namespaces_permitted():
        pytest.skip("the audit-hook fallback refuses subprocesses altogether")
    pid_file = tmp_path / "pid"
    program = (f"import subprocess, time\np = subprocess.Popen(['sleep', '300'])\n"
               f"open({str(pid_file)!r}, 'w').write(str(p.pid))\ntime.sleep(300)")
    outcome = run_program(program, SandboxConfig(timeout_s=2.0, isolation="namespace"))
    assert outcome.reason == "timeout"
    pid = int(pid_file.read_text())
    state = Path(f"/proc/{pid}/status")

    def alive() -> bool:
        try:
            return "\nState:\tZ" not in state.read_text()  # a zombie is dead, just unreaped
        except OSError:
            return False

    # SIGKILL was sent to the group when run_program returned; on a loaded machine the kernel may take a
    # moment to finish the child, so give it a few seconds (a survivor would sleep for 300 s).
    deadline = time.monotonic() + 5
    while alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive()


@pytest.mark.parametrize("isolation", ["auto", "namespace", "audit"])
def test_a_sandboxed_program_cannot_open_a_network_connection(isolation):
    if isolation == "namespace" and not namespaces_permitted():
        pytest.skip("unprivileged user+network namespaces are not permitted here")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        socket.create_connection(("127.0.0.1", port), timeout=2).close()  # reachable from outside the sandbox
        server.accept()[0].close()
        program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).close()"
        outcome = run_program(program, SandboxConfig(isolation=isolation))
        server.setblocking(False)
        with pytest.raises(BlockingIOError):  # and nothing from inside it got through
            server.accept()
    assert not outcome.passed and outcome.reason == "error"
    assert "unreachable" in outcome.detail.lower() or "blocked by the evaluation sandbox" in outcome.detail
    expected = {"auto": {"namespace", "audit"}, "namespace": {"namespace"}, "audit": {"audit"}}[isolation]
    assert outcome.isolation in expected


@pytest.mark.parametrize("source, reason", [
    ("assert sorted([3, 1]) == [1, 3]", "passed"),
    ("assert 1 == 2, 'wrong'", "assertion"),
    ("raise ValueError('boom')", "error"),
    ("def f(:\n    pass", "syntax"),
    ("exit(0)", "exit"),  # leaving early is not passing, whatever the exit code
    ("import os\nos._exit(0)", "exit"),
    ("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)", "crash"),
    ("import pipeline", "error"),  # our own package is not importable from inside
])
def test_every_ending_has_a_verdict(source, reason):
    outcome = run_program(source, SandboxConfig())
    assert outcome.reason == reason and outcome.passed == (reason == "passed")


def test_each_program_gets_a_fresh_working_directory_that_is_deleted(tmp_path: Path):
    report = tmp_path / "cwd"
    program = (f"import os\nassert not os.path.exists('left.txt')\nopen('left.txt', 'w').write('x')\n"
               f"open({str(report)!r}, 'a').write(os.getcwd() + '\\n')")
    first, second = (run_program(program, SandboxConfig()) for _ in range(2))
    assert first.passed and second.passed  # the second does not see the first one's file
    dirs = report.read_text().split()
    assert len(set(dirs)) == 2 and not any(Path(d).exists() for d in dirs)


def test_a_c_library_without_unshare_is_a_refusal_not_a_crash(monkeypatch):
    # macOS: libc has no unshare(); `auto` must fall back to the audit guard there, not fail every program.
    from pipeline.evaluate import sandbox_child

    class NoUnshare:  # what ctypes.CDLL(None) is on a system without the symbol: the lookup raises
        def __getattr__(self, name: str):
            raise AttributeError(f"dlsym(RTLD_DEFAULT, {name}): symbol not found")

    monkeypatch.setattr(sandbox_child.ctypes, "CDLL", lambda *a, **k: NoUnshare())
    assert sandbox_child.enter_namespaces() == f"no unshare() in the C library of {sys.platform}"


def test_a_limit_the_system_refuses_is_skipped_and_named(monkeypatch):
    # macOS refuses RLIMIT_AS (EINVAL -> ValueError): the program runs without it, the verdict says so.
    from pipeline.evaluate import sandbox_child
    from pipeline.evaluate.sandbox import _classify

    set_here = []

    def setrlimit(limit, values):
        if limit == sandbox_child.resource.RLIMIT_AS:
            raise ValueError("current limit exceeds maximum limit")
        set_here.append(limit)

    monkeypatch.setattr(sandbox_child.resource, "setrlimit", setrlimit)
    refused = sandbox_child.set_limits({"memory_bytes": 2**30, "cpu_seconds": 10, "file_bytes": 2**20})
    assert refused == ["memory"] and len(set_here) == 3  # the others are still set
    outcome = _classify({"isolation": "audit", "limits_refused": refused, "reason": "passed"}, 0, False, "", 0.1, 10)
    assert outcome.passed and outcome.isolation == "audit (no memory limit)"
    assert _classify({"isolation": "namespace", "limits_refused": [], "reason": "passed"}, 0, False, "", 0.1,
                     10).isolation == "namespace"
