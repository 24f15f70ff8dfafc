"""Run a `defectops` command in its own process and SIGTERM it (what `kill` or a container stop sends; the CLI
takes it as Ctrl-C) while DVC is moving files into a folder: a push into the remote, a pull into data/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT

# DVC writes each file beside its target and renames it into place (os.replace for a push to a local remote,
# os.rename for a checkout into data/): the `after`-th rename into `into` sends the signal, once.
SIGTERM_WHILE_MOVING_FILES = """
import os, signal, sys
from pathlib import Path
from components.cli import app

into, after, args = Path(sys.argv[1]).resolve(), int(sys.argv[2]), sys.argv[3:]
renames = {"left": after}

def terminating(rename):
    def moved(src, dst, *more, **kwargs):
        rename(src, dst, *more, **kwargs)
        if renames["left"] > 0 and Path(os.fspath(dst)).resolve().is_relative_to(into):
            renames["left"] -= 1
            if renames["left"] == 0:
                os.kill(os.getpid(), signal.SIGTERM)
    return moved

os.replace, os.rename = terminating(os.replace), terminating(os.rename)
app(args, prog_name="defectops")
"""


def terminated_while_moving_files(into: Path, *command: str, after: int = 1) -> subprocess.CompletedProcess:
    """`defectops COMMAND...` (in the project of DEFECTOPS_PROJECT), SIGTERMed once `after` files reached `into`."""
    return subprocess.run([sys.executable, "-c", SIGTERM_WHILE_MOVING_FILES, str(into), str(after), *command],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
