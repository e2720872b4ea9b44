"""The first Ctrl-C or SIGTERM stops a command; later ones are ignored; the handlers are put back after it.
(The commands stopped for real: test_generate's `test_a_stopped_run_stops_cleanly`, test_submit, test_train_trainer.)"""

from __future__ import annotations

import os
import signal
import time

import pytest

from pipeline.stopping import Terminated, stop_once, stopped


@pytest.fixture(autouse=True)
def python_defaults():
    """Python's own handlers, as a command starts with (an in-process Ray instance of another test set its own
    SIGTERM handler; `start_ray` keeps ours there)."""
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    for s, handler in before.items():
        signal.signal(s, handler)


def _signal_self(sig: int) -> None:
    os.kill(os.getpid(), sig)
    time.sleep(0.2)  # Python runs the handler in the main thread between bytecodes


@pytest.mark.parametrize("sig, said", [(signal.SIGINT, ("interrupted", 130)), (signal.SIGTERM, ("terminated", 143))])
def test_the_first_signal_stops_and_a_second_is_ignored(sig, said):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(KeyboardInterrupt) as stop:
        with stop_once():
            _signal_self(sig)
    assert stopped(stop.value) == said and isinstance(stop.value, Terminated) == (sig == signal.SIGTERM)
    assert {s: signal.getsignal(s) for s in before} == {s: signal.SIG_IGN for s in before}  # until the exit
    _signal_self(signal.SIGINT)  # ignored: nothing raised


def test_without_a_stop_the_default_handlers_come_back():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with stop_once():
        assert signal.getsignal(signal.SIGINT) is not before[signal.SIGINT]
    assert {s: signal.getsignal(s) for s in before} == before
