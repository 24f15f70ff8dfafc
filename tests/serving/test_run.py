"""`start_in_background` (the demo's service): a start interrupted before the service is ready (Ctrl-C, a
SIGTERM) stops the server it started. It runs in a session of its own, which a terminal's Ctrl-C never reaches:
left behind, it would hold the port and make the next demo fail."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from components.config import Settings
from components.signals import signal_handler
from tests.serving.conftest import free_port

# stands in for `python -m components.cli serve ...`: says who it is, then starts up for two minutes
SLOW_SERVER = '#!/bin/sh\necho $$ > "{pidfile}.tmp" && mv "{pidfile}.tmp" "{pidfile}"\nexec sleep 120\n'


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_an_interrupted_start_stops_the_server_it_started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from components.serving.run import start_in_background

    pidfile = tmp_path / "server.pid"
    server = tmp_path / "python"
    server.write_text(SLOW_SERVER.format(pidfile=pidfile))
    server.chmod(0o755)
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
        assert not _alive(int(pidfile.read_text())), "the interrupted start left its server running"
    finally:
        if pidfile.is_file() and _alive(int(pidfile.read_text())):
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
