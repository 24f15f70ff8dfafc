"""`start_in_background` (the demo's service): a start interrupted before the service is ready (Ctrl-C, a
SIGTERM) stops the server it started. It runs in a session of its own, which a terminal's Ctrl-C never reaches:
left behind, it would hold the port and make the next demo fail."""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from components.config import Settings
from components.signals import signal_handler
from tests.conftest import alive, kill_leftover, sleeping_python
from tests.serving.conftest import free_port


def test_an_interrupted_start_stops_the_server_it_started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from components.serving.run import start_in_background

    server, pidfile = sleeping_python(tmp_path)  # stands in for `python -m components.cli serve ...`
    monkeypatch.setattr(sys, "executable", str(server))

    def interrupt_once_started() -> None:
        deadline = time.monotonic() + 60
        while not pidfile.is_file() and time.monotonic() < deadline:
            time.sleep(0.1)
        # Ctrl-C: KeyboardInterrupt in the main thread, waiting for /readyz
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    canceller = threading.Thread(target=interrupt_once_started)
    canceller.start()
    # Python's own Ctrl-C handler, as in a terminal: a shell starts a background job (CI run with `&`) with SIGINT
    # ignored, and Python then keeps it ignored
    try:
        with signal_handler(signal.default_int_handler, signal.SIGINT), pytest.raises(KeyboardInterrupt):
            start_in_background(Settings(project=tmp_path, home=tmp_path / "home"), free_port(),
                                tmp_path / "serve.log", timeout_s=90)
        canceller.join()
        assert not alive(int(pidfile.read_text())), "the interrupted start left its server running"
    finally:
        kill_leftover(pidfile)
