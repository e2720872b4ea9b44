"""How a command stops: the first Ctrl-C or SIGTERM raises KeyboardInterrupt in the main thread (the command
then says `interrupted` / `terminated` and exits with the shell's code); later ones are ignored."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM (`timeout`, a batch scheduler's cancel, `ray job stop`, a Kubernetes pod deleted): the command
    stops as on Ctrl-C, with the shell's code for it (143). Before 2026-12-07 Ray's handler printed a C++ stack
    dump and exited with code 15, saying nothing of why."""


def stopped(stop: KeyboardInterrupt) -> tuple[str, int]:
    """What a stopped command says, and the shell's exit code for it: Ctrl-C 130, SIGTERM 143."""
    return ("terminated", 143) if isinstance(stop, Terminated) else ("interrupted", 130)


_STOP_SIGNALS = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}  # -> Python's default


def _stop(signum: int, frame: Any) -> None:
    """The first Ctrl-C (or SIGTERM) stops the command; later ones are ignored: users press it twice, and a second
    one broke what the first set going halfway (Ray's shutdown at exit: a traceback, and the local instance's
    dashboard and runtime-env agents left running; `submit`: the request that stops the job on the cluster)."""
    for sig in _STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt


@contextlib.contextmanager
def stop_once() -> Iterator[None]:
    # Only for signals with Python's default meaning: a shell's background job ignores Ctrl-C, and so do we then.
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    ours = [sig for sig, default in _STOP_SIGNALS.items() if signal.getsignal(sig) is default]
    for sig in ours:
        signal.signal(sig, _stop)
    try:
        yield
    finally:  # in-process callers (tests) get them back; after a stop they stay ignored until the exit
        for sig in ours:
            if signal.getsignal(sig) is _stop:
                signal.signal(sig, _STOP_SIGNALS[sig])
