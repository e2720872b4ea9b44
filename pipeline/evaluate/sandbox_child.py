"""Runs INSIDE the sandbox process: isolate, limit, then execute one untrusted program.

Started by pipeline/evaluate/sandbox.py as `python -I -S sandbox_child.py SETTINGS_JSON` with the throwaway
directory as cwd (holding program.py) and a status pipe as file descriptor `status_fd`. Stdlib only, and
no import of our package: under `-I` the script's folder is not on sys.path, so the program cannot import
our code either.

Order matters: user+network namespaces need a single-threaded process (true right after start), and the
resource limits must be in place before the first line of the program runs.

Status lines (JSON) on the pipe: first `{"isolation": ..., "limits_refused": [...]}`, then `{"reason": ...}`
once the program has finished. A process that dies or is killed before the second line is classified by the parent.
"""

from __future__ import annotations

import builtins
import ctypes
import json
import os
import resource
import sys

_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
# Audit events refused by the fallback guard: network access, and new processes/native code
# (a child process or a ctypes call would not be bound by this process's audit hook).
_BLOCKED = ("socket.connect", "socket.sendto", "socket.sendmsg", "socket.bind", "socket.getaddrinfo",
            "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
            "os.forkpty", "pty.spawn", "ctypes.dlopen", "ctypes.dlsym")


def enter_namespaces() -> str | None:
    """Own user + network namespace: the only interface is a downed loopback. None if refused."""
    unshare = getattr(ctypes.CDLL(None, use_errno=True), "unshare", None)
    if unshare is None:  # not Linux (macOS): no namespaces at all; `auto` falls back to the audit guard
        return f"no unshare() in the C library of {sys.platform}"
    uid, gid = os.getuid(), os.getgid()
    if unshare(_CLONE_NEWUSER | _CLONE_NEWNET) != 0:
        return os.strerror(ctypes.get_errno())
    # Map our ids onto themselves, so the program keeps exactly the file access it had (without a map
    # it would run as `nobody` and could not use its own working directory).
    try:
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    except OSError:
        pass  # still network-isolated; only the file ownership view differs
    return None


def set_limits(settings: dict) -> list[str]:
    """Set the resource limits; returns the names of those the system refused. macOS refuses an address-space
    limit (EINVAL, which Python reports as ValueError): the program then runs without one, and says so,
    rather than every program failing before it starts."""
    memory, cpu, file_bytes = settings["memory_bytes"], settings["cpu_seconds"], settings["file_bytes"]
    refused = []
    for name, limit, values in (("memory", resource.RLIMIT_AS, (memory, memory)),
                                ("CPU time", resource.RLIMIT_CPU, (cpu, cpu + 1)),  # SIGXCPU at the soft limit
                                ("file size", resource.RLIMIT_FSIZE, (file_bytes, file_bytes)),
                                ("core size", resource.RLIMIT_CORE, (0, 0))):
        try:
            resource.setrlimit(limit, values)
        except (ValueError, OSError):
            refused.append(name)
    return refused


def _audit_guard(event: str, args: tuple) -> None:
    if event.startswith(_BLOCKED):
        raise PermissionError(f"blocked by the evaluation sandbox: {event}")


def main() -> None:
    settings = json.loads(sys.argv[1])
    # Started with -S (no .pth processing: a third of the start-up time); the parent's site-packages stay
    # importable (a solution may use numpy), our own editable install (a .pth) does not.
    sys.path.extend(p for p in settings["site_packages"] if p not in sys.path)
    builtins.exit = builtins.quit = sys.exit  # normally added by site
    status = settings["status_fd"]
    os.set_inheritable(status, False)  # the program's own subprocesses must not see it

    isolation = "none"
    if settings["isolation"] in ("auto", "namespace"):
        refused = enter_namespaces()
        if refused is None:
            isolation = "namespace"
        elif settings["isolation"] == "namespace":
            os.write(status, (json.dumps({"isolation": "none", "reason": "sandbox",
                                          "detail": f"unshare(CLONE_NEWUSER|CLONE_NEWNET) refused: {refused}"})
                              + "\n").encode())
            os._exit(3)
    if isolation == "none":  # auto without namespaces, or audit asked for explicitly
        sys.addaudithook(_audit_guard)
        isolation = "audit"
    refused_limits = set_limits(settings)
    os.write(status, (json.dumps({"isolation": isolation, "limits_refused": refused_limits}) + "\n").encode())

    with open("program.py", encoding="utf-8") as f:
        source = f.read()
    memory_error = (json.dumps({"reason": "memory"}) + "\n").encode()  # built before the program runs
    try:
        code = compile(source, "program.py", "exec")
    except (SyntaxError, ValueError) as err:  # ValueError: a NUL byte in the source
        _report(status, "syntax", err)
        os._exit(0)
    try:
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
    except MemoryError:
        os.write(status, memory_error)  # there may be no memory left to format anything
    except AssertionError as err:
        _report(status, "assertion", err)
    except TimeoutError as err:  # a per-test time limit of the program's own (EvalPlus suites) ran out
        _report(status, "timeout", err)
    except SystemExit as err:  # exit() before the tests finished is not a pass, whatever its code
        _report(status, "exit", f"SystemExit({err.code!r})")
    except BaseException as err:  # noqa: BLE001 - any other failure of the program is its result
        _report(status, "error", err)
    else:
        _report(status, "passed", "")
    os._exit(0)  # skip interpreter teardown: the program's atexit handlers and __del__ do not count


def _report(status: int, reason: str, detail: object) -> None:
    if isinstance(detail, BaseException):
        detail = f"{type(detail).__name__}: {detail}"
    os.write(status, (json.dumps({"reason": reason, "detail": str(detail)[:500]}) + "\n").encode())


if __name__ == "__main__":
    main()
