"""`start_in_background` (the demo's service): a start interrupted before the service is ready (Ctrl-C, a
SIGTERM) stops the server it started. It runs in a session of its own, which a terminal's Ctrl-C never reaches:
left behind, it would hold the port and make the next demo fail."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, alive, kill_leftover, sleeping_python
from tests.serving.conftest import free_port

# the caller: a process of its own, as `defectops demo` is, so the Ctrl-C reaches a fresh interpreter (Python's
# own handler: a background job, as CI may be, would otherwise inherit SIGINT ignored), not pytest's process
CALLER = textwrap.dedent("""
    import signal, sys
    from pathlib import Path

    signal.signal(signal.SIGINT, signal.default_int_handler)
    from components.config import Settings
    from components.serving.run import start_in_background
    from components.signals import sigterm_as_interrupt

    stand_in, folder, port = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    sys.executable = stand_in  # the service it starts: the sleeping stand-in
    try:
        with sigterm_as_interrupt():  # as the CLI does: a SIGTERM unwinds like Ctrl-C
            start_in_background(Settings(project=folder, home=folder / "home"), port, folder / "serve.log",
                                timeout_s=90)
    except KeyboardInterrupt:
        sys.exit(130)
""")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_an_interrupted_start_stops_the_server_it_started(tmp_path: Path, sig: signal.Signals) -> None:
    server, pidfile = sleeping_python(tmp_path)  # stands in for `python -m components.cli serve ...`
    caller = subprocess.Popen([sys.executable, "-c", CALLER, str(server), str(tmp_path), str(free_port())],
                              cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not pidfile.is_file() and caller.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert pidfile.is_file(), f"the stand-in server never started: {caller.communicate(timeout=30)[0]}"
        caller.send_signal(sig)  # while it waits for /readyz
        output = caller.communicate(timeout=90)[0]
        assert caller.returncode == 130, output
        assert not alive(int(pidfile.read_text())), "the interrupted start left its server running"
    finally:
        caller.kill()
        kill_leftover(pidfile)
