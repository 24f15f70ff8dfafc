"""Evaluation figures written as PNG files (matplotlib's Agg canvas, no pyplot state, no display needed)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from components.errors import UsageError
from components.evaluation.calibration import expected_calibration_error, reliability_bins

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)


def _new_figure(width: float, height: float) -> Figure:
    """A matplotlib Figure bound to an Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", bbox_inches="tight")
    log.info("wrote %s", path)
    return path


def confusion_matrix_png(cm: np.ndarray | list[list[int]], classes: list[str], path: Path) -> Path:
    """Confusion matrix (rows = true class) as a PNG: counts in the cells, colour = share of the true class."""
    counts = np.asarray(cm, dtype=np.int64)
    if counts.shape != (len(classes), len(classes)):
        raise UsageError(f"confusion matrix has shape {counts.shape} for {len(classes)} classes {classes}")
    rows = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    size = 2.0 + 0.7 * len(classes)
    figure = _new_figure(size + 1.0, size)
    axes = figure.add_subplot()
    image = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="share of true class")
    ticks = np.arange(len(classes))
    axes.set_xticks(ticks, classes, rotation=45, ha="right")
    axes.set_yticks(ticks, classes)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    for row in range(len(classes)):
        for column in range(len(classes)):
            axes.text(column, row, str(counts[row, column]), ha="center", va="center",
                      color="white" if shares[row, column] > 0.5 else "black", fontsize=9)
    axes.set_title(f"Confusion matrix ({int(counts.sum())} images)")
    return _save(figure, path)


def calibration_png(probs_before: np.ndarray, probs_after: np.ndarray, labels: np.ndarray, path: Path,
                    n_bins: int = 15) -> Path:
    """Reliability diagram of top-1 confidence before and after temperature scaling, with each ECE."""
    figure = _new_figure(6.0, 6.0)
    axes = figure.add_subplot()
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    for probs, name, colour in ((probs_before, "before", "tab:red"), (probs_after, "after", "tab:blue")):
        bins = reliability_bins(probs, labels, n_bins)
        filled = bins["count"] > 0
        ece = expected_calibration_error(probs, labels, n_bins)
        axes.plot(bins["confidence"][filled], bins["accuracy"][filled], marker="o", color=colour,
                  label=f"{name} temperature scaling (ECE {'n/a' if ece is None else f'{ece:.3f}'})")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    axes.set_xlabel("mean top-1 confidence in bin")
    axes.set_ylabel("accuracy in bin")
    axes.set_title("Reliability diagram")
    axes.legend(loc="upper left")
    return _save(figure, path)
