"""flows.common.run_defectops under a real Prefect flow run: a SIGTERM to the flow-run process (what a cancelled
run gets) stops the `defectops` child too, so a rerun never trains beside a leftover one."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from components.signals import signal_handler
from tests.conftest import alive, kill_leftover, sleeping_python

pytestmark = pytest.mark.integration

class _SignalledAsItStarts(subprocess.Popen):
    """Popen whose caller gets SIGTERM the moment the child is up, before `Popen(...)` has even returned: the
    narrowest window a cancelled run's signal can land in."""

    pidfile: Path

    def __init__(self, args, *rest, **kwargs) -> None:
        super().__init__(args, *rest, **kwargs)
        if args[0] == str(self.pidfile.with_name("python")):  # the stand-in, not another process
            _wait_for(self.pidfile)
            signal.raise_signal(signal.SIGTERM)  # to this (the main) thread


def _wait_for(pidfile: Path) -> None:
    deadline = time.monotonic() + 60
    while not pidfile.is_file() and time.monotonic() < deadline:
        time.sleep(0.1)


@pytest.mark.parametrize("case", ["obeys-sigterm", "ignores-sigterm", "signalled-as-it-starts"])
def test_a_terminated_flow_run_stops_its_defectops_child(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         prefect_server, case: str) -> None:
    from prefect import flow, task
    from prefect.exceptions import TerminationSignal

    import flows.common
    from flows.common import run_defectops

    # stands in for `python -m components.cli train ...`
    child, pidfile = sleeping_python(tmp_path, ignores_sigterm=case == "ignores-sigterm")
    monkeypatch.setattr(flows.common, "STOP_GRACE_S", 1.0)

    @task
    def train() -> None:
        run_defectops(["train"])

    @flow
    def training() -> None:
        train()

    def cancel_once_started() -> None:
        _wait_for(pidfile)
        # Prefect's handler raises TerminationSignal in the main thread; the signal goes to that thread alone,
        # so no other thread of pytest's has a system call broken by it
        signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)

    if case == "signalled-as-it-starts":
        monkeypatch.setattr(_SignalledAsItStarts, "pidfile", pidfile, raising=False)
        monkeypatch.setattr(subprocess, "Popen", _SignalledAsItStarts)
        canceller = threading.Thread(target=lambda: None)
    else:
        canceller = threading.Thread(target=cancel_once_started)
    passed_on: list[int] = []  # Prefect hands the signal on to the handler it replaced: record it, don't die
    monkeypatch.setattr(sys, "executable", str(child))
    started = time.monotonic()
    try:
        with signal_handler(lambda signum, _frame: passed_on.append(signum), signal.SIGTERM):
            canceller.start()
            with pytest.raises(TerminationSignal):
                training()
            canceller.join()
        seconds = time.monotonic() - started
        pid = int(pidfile.read_text())
        assert not alive(pid), "the defectops child outlived its cancelled flow run"
        assert seconds < 60, "the flow run ended only when its child did"
        assert passed_on == [signal.SIGTERM]
    finally:
        kill_leftover(pidfile)
