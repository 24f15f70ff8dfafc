"""Glue shared by the flows: run a `defectops` command in its own process, as DVC stages do."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from logging import Logger, LoggerAdapter

from prefect import get_run_logger

from components.errors import DefectOpsError
from components.signals import held_back, signal_handler

STOP_GRACE_S = 10.0  # a child that got SIGTERM cleans up (nothing half-written is kept); then SIGKILL


def run_defectops(args: Sequence[str]) -> None:
    """Run `defectops ARGS` in a fresh process (clean of the flow engine's threads), streaming its output.

    Heavy steps (training) run this way: the same command as the DVC stage, and PyTorch's forked data-loader
    workers cannot start inside a Prefect task's process. When waiting ends by an exception (a cancelled flow
    run's SIGTERM, Ctrl-C), the child is stopped before it propagates: it never trains on behind a rerun.
    """
    logger = get_run_logger()
    command = [sys.executable, "-m", "components.cli", *args]
    logger.info("running: defectops %s", " ".join(args))
    process: subprocess.Popen | None = None
    last_error = ""
    try:
        with held_back(signal.SIGTERM, signal.SIGINT):  # no interrupt between the child starting and `process`
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert process.stdout is not None
        for line in process.stdout:
            line = line.rstrip()
            if line.startswith("error: "):
                last_error = line.removeprefix("error: ")
            if line and "\r" not in line:
                logger.info(line)
        process.wait()
    except BaseException:
        if process is not None:
            _stop(process, logger)
        raise
    if process.returncode != 0:
        raise DefectOpsError(last_error or f"`defectops {' '.join(args)}` failed with exit code {process.returncode}")


def _stop(process: subprocess.Popen, logger: Logger | LoggerAdapter) -> None:
    """SIGTERM the child, SIGKILL it after STOP_GRACE_S; a further SIGTERM or Ctrl-C cannot cut this short."""
    with signal_handler(signal.SIG_IGN, signal.SIGTERM, signal.SIGINT):
        if process.poll() is None:
            logger.warning("stopping `defectops` (pid %d): its flow run was interrupted", process.pid)
            process.terminate()
            try:
                process.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                logger.warning("`defectops` (pid %d) did not stop within %.0f s; killing it", process.pid,
                               STOP_GRACE_S)
                process.kill()
                process.wait()
        if process.stdout is not None:
            process.stdout.close()
