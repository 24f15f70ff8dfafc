"""components.signals: a handler set for a block is put back after it; a signal held back during a block is
raised again once it ends."""

from __future__ import annotations

import signal

import pytest

from components.signals import held_back, signal_handler


def test_a_block_handler_is_put_back() -> None:
    seen: list[int] = []
    before = signal.getsignal(signal.SIGUSR1)
    with signal_handler(lambda signum, _frame: seen.append(signum), signal.SIGUSR1):
        signal.raise_signal(signal.SIGUSR1)
    assert seen == [signal.SIGUSR1] and signal.getsignal(signal.SIGUSR1) == before


def test_a_held_back_signal_is_raised_again_after_the_block() -> None:
    # Python's own Ctrl-C handler around it: a background job (CI run with `&`) starts with SIGINT ignored
    with signal_handler(signal.default_int_handler, signal.SIGINT):
        with pytest.raises(KeyboardInterrupt), held_back(signal.SIGINT):
            signal.raise_signal(signal.SIGINT)
            reached = True  # the block was not cut short
        assert reached and signal.getsignal(signal.SIGINT) is signal.default_int_handler
