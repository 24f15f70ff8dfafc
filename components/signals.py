"""Signals as exceptions: a SIGTERM (a `kill`, a container stop, a CI timeout) unwinds like Ctrl-C, so every
`except BaseException` / `finally` that removes half-written work runs for it too."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def raise_interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


@contextmanager
def signal_handler(handler: Any, *signals: signal.Signals) -> Iterator[None]:
    """Handle `signals` with `handler` inside the block (main thread only; elsewhere a no-op)."""
    if not in_main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            if old is not None:  # None: a handler installed outside Python, which Python cannot put back
                signal.signal(sig, old)


@contextmanager
def held_back(*signals: signal.Signals) -> Iterator[None]:
    """Inside the block, `signals` wait; on leaving it, each that arrived is raised again, now under the handlers
    around the block. A step such as starting a child and naming it cannot be cut between its two halves.
    (Main thread only; elsewhere signals are not delivered to this thread anyway.)"""
    arrived: list[int] = []
    try:
        with signal_handler(lambda signum, _frame: arrived.append(signum), *signals):
            yield
    finally:
        for signum in arrived:
            signal.raise_signal(signum)


def sigterm_as_interrupt() -> contextlib.AbstractContextManager[None]:
    """Inside the block, SIGTERM raises KeyboardInterrupt (Python's default for it is to die on the spot)."""
    return signal_handler(raise_interrupt, signal.SIGTERM)
