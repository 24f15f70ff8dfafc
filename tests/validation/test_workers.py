"""Manifest workers start in a clean process: a caller that has run OpenCV's thread pool (training augments,
serving decodes) used to hang its forked workers at their first OpenCV call, about one run in three."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO_ROOT, write_image

CALLER = """
import sys
from pathlib import Path

import cv2
import numpy as np

from components.validation.manifest import inspect

if __name__ == "__main__":
    files = [Path(line) for line in Path(sys.argv[1]).read_text().split()]
    cv2.setNumThreads(2)
    image = np.random.default_rng(0).integers(0, 255, (4000, 4000), dtype=np.uint8)
    for _ in range(10):
        cv2.GaussianBlur(image, (31, 31), 0)  # OpenCV's thread pool now runs in this process
        assert len(inspect(files, 40_000_000, None, workers=2)) == len(files)
    print("done", flush=True)
"""


def test_workers_do_not_hang_after_the_caller_used_opencv_threads(tmp_path: Path) -> None:
    files = [write_image(tmp_path / "images" / f"{i:03d}.png", i) for i in range(100)]  # > 2 chunks: a pool
    listing = tmp_path / "files.txt"
    listing.write_text("\n".join(map(str, files)))
    script = tmp_path / "caller.py"
    script.write_text(CALLER)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    caller = subprocess.Popen([sys.executable, str(script), str(listing)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = caller.communicate(timeout=120)
    except subprocess.TimeoutExpired as exc:
        os.killpg(caller.pid, signal.SIGKILL)  # the caller and its hung workers
        caller.communicate()
        raise AssertionError("a manifest worker hung after the caller used OpenCV's thread pool") from exc
    assert caller.returncode == 0 and "done" in out, err[-2000:]
