"""components.signals: a handler set for a block is put back after it; a signal held back during a block is
raised again once it ends."""

from __future__ import annotations

import signal

from components.signals import held_back, signal_handler


def test_a_block_handler_is_put_back() -> None:
    seen: list[int] = []
    before = signal.getsignal(signal.SIGUSR1)
    with signal_handler(lambda signum, _frame: seen.append(signum), signal.SIGUSR1):
        signal.raise_signal(signal.SIGUSR1)
    assert seen == [signal.SIGUSR1] and signal.getsignal(signal.SIGUSR1) == before


def test_a_held_back_signal_is_raised_again_after_the_block() -> None:
    seen: list[str] = []
    with signal_handler(lambda _signum, _frame: seen.append("handled"), signal.SIGUSR1):
        with held_back(signal.SIGUSR1):
            signal.raise_signal(signal.SIGUSR1)
            seen.append("block went on")  # the block was not cut short ...
        assert seen == ["block went on", "handled"]  # ... and the signal reached the handler around it after
