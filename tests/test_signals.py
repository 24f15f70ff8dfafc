"""components.signals: a handler set for a block is put back after it; a signal held back during a block is
raised again once it ends.

Each case runs in a fresh interpreter, as a product command gets its signals in a process of its own. (Late in
the suite, any signal raised inside pytest's own process used to kill it with SIGSEGV: OpenVINO Cores freed in
the order they were made had left the main thread's alternate signal stack on unmapped memory. Engines now share
one Core, `components.serving.engines.openvino_core`, and test_parity.py has that case.)"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.conftest import REPO_ROOT


def _run(body: str) -> None:
    script = "import signal\nfrom components.signals import held_back, signal_handler\n" + textwrap.dedent(body)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_block_handler_is_put_back() -> None:
    _run("""
        seen = []
        before = signal.getsignal(signal.SIGUSR1)
        with signal_handler(lambda signum, _frame: seen.append(signum), signal.SIGUSR1):
            signal.raise_signal(signal.SIGUSR1)
        assert seen == [signal.SIGUSR1] and signal.getsignal(signal.SIGUSR1) == before, (seen, before)
    """)


def test_a_held_back_signal_is_raised_again_after_the_block() -> None:
    _run("""
        seen = []
        with signal_handler(lambda _signum, _frame: seen.append("handled"), signal.SIGUSR1):
            with held_back(signal.SIGUSR1):
                signal.raise_signal(signal.SIGUSR1)
                seen.append("block went on")  # the block was not cut short ...
            assert seen == ["block went on", "handled"], seen  # ... and the handler around it got the signal
    """)
