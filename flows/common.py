"""Glue shared by the flows: run a `defectops` command in its own process, as DVC stages do."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence

from prefect import get_run_logger

from components.errors import DefectOpsError


def run_defectops(args: Sequence[str]) -> None:
    """Run `defectops ARGS` in a fresh process (clean of the flow engine's threads), streaming its output.

    Heavy steps (training) run this way: the same command as the DVC stage, and PyTorch's forked data-loader
    workers cannot start inside a Prefect task's process.
    """
    logger = get_run_logger()
    command = [sys.executable, "-m", "components.cli", *args]
    logger.info("running: defectops %s", " ".join(args))
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    last_error = ""
    assert process.stdout is not None
    for line in process.stdout:
        line = line.rstrip()
        if line.startswith("error: "):
            last_error = line.removeprefix("error: ")
        if line and "\r" not in line:
            logger.info(line)
    if process.wait() != 0:
        raise DefectOpsError(last_error or f"`defectops {' '.join(args)}` failed with exit code {process.returncode}")
