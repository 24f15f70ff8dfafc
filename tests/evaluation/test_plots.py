"""Evaluation plots are written as PNG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from components.errors import UsageError
from components.evaluation.calibration import softmax
from components.evaluation.plots import calibration_png, confusion_matrix_png

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_confusion_matrix_png(tmp_path: Path) -> None:
    path = confusion_matrix_png([[5, 1, 0], [2, 7, 1], [0, 0, 0]], ["crack", "normal", "scratch"],
                                tmp_path / "reports" / "cm.png")
    assert path.read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(UsageError):
        confusion_matrix_png([[1, 2], [3, 4]], ["a", "b", "c"], tmp_path / "bad.png")


def test_calibration_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=4.0, size=(200, 4))
    labels = rng.integers(0, 4, 200)
    path = calibration_png(softmax(logits), softmax(logits, 3.0), labels, tmp_path / "calibration.png")
    assert path.read_bytes().startswith(PNG_MAGIC)
