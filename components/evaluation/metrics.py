"""Classification and plant figures of a model on labelled images, with bootstrap intervals by capture group.

Plant figures (normal-vs-defect level; `decision` holds the accept / reject / review rule):
    defect_detection_rate  defective images whose top-1 class is any defect class / defective images
    false_alarm_rate       normal images whose top-1 class is a defect class / normal images
    review_rate            images decided `review` / all images
    escape_rate            defective images decided `accept` / defective images
    auto_precision         `accept` on normal plus `reject` on defective images / accept and reject decisions
A figure whose denominator is empty is None. Every figure is a ratio of per-image counts, so the bootstrap
sums per-group counts under resampled group multiplicities: whole capture groups are drawn with replacement,
within their class (a group's most common label). Each replicate so holds as many groups of each class as the
test split does, and its macro-F1 averages over the same classes as the point figure: a rare class's few
groups cannot drop out of a replicate (a missed class's, lifting it; a found class's that the model still
predicts elsewhere, scoring it 0). The intervals are conditional on the class mix: a class with one group
adds no spread of its own.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from components.errors import UsageError
from components.evaluation.calibration import expected_calibration_error
from components.evaluation.decision import (
    ACCEPT,
    REJECT,
    REVIEW,
    check_labels,
    check_probs,
    check_threshold,
    decision_codes,
    normal_index,
)

log = logging.getLogger(__name__)

PLANT_FIGURES = ("defect_detection_rate", "false_alarm_rate", "review_rate", "escape_rate", "auto_precision")
INTERVAL_FIGURES = ("accuracy", "macro_f1", *PLANT_FIGURES)
CONFIDENCE_LEVEL = 0.95
_BOOT_CHUNK = 250

# extra per-image counts after the C*C confusion cells
_REVIEW, _ESCAPE, _AUTO, _AUTO_RIGHT = range(4)
_N_EXTRA = 4


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, NaN where the denominator is zero."""
    num, den = np.asarray(numerator, dtype=np.float64), np.asarray(denominator, dtype=np.float64)
    return np.divide(num, den, out=np.full(np.broadcast(num, den).shape, np.nan), where=den > 0)


def _confusion(counts: np.ndarray, n_classes: int) -> np.ndarray:
    return np.atleast_2d(counts)[:, :n_classes * n_classes].reshape(-1, n_classes, n_classes)


def _present(counts: np.ndarray, n_classes: int) -> np.ndarray:
    """The classes macro-F1 averages over (C,): those with images or predictions in these summed counts."""
    cm = _confusion(counts, n_classes)[0]
    return (cm.sum(axis=0) + cm.sum(axis=1)) > 0


def _figures(counts: np.ndarray, n_classes: int, normal: int,
             present: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Accuracy, macro F1 and the plant figures of each row of summed per-image counts (B, C*C + 4). Macro F1
    averages over `present` (default: each row's classes with images or predictions); a bootstrap passes the
    point figure's, so that a replicate without a class's one stray prediction does not drop that class."""
    cells = n_classes * n_classes
    cm = _confusion(counts, n_classes)
    extra = counts[:, cells:]
    defect = np.array([c for c in range(n_classes) if c != normal])
    n = cm.sum(axis=(1, 2))
    tp = np.diagonal(cm, axis1=1, axis2=2)
    predicted, support = cm.sum(axis=1), cm.sum(axis=2)
    present = (predicted + support) > 0 if present is None else np.broadcast_to(present, predicted.shape)
    f1 = _ratio(2 * tp, predicted + support)  # = harmonic mean of precision and recall, 0 when tp = 0
    # a class of the point figure that a replicate drew neither image nor prediction of scores 0 there, as a
    # class the model missed does (its F1 is 0/0)
    macro_f1 = _ratio(np.where(present, np.nan_to_num(f1, nan=0.0), 0).sum(axis=1), present.sum(axis=1))
    defective = cm[:, defect, :].sum(axis=(1, 2))
    return {
        "accuracy": _ratio(tp.sum(axis=1), n),
        "macro_f1": macro_f1,
        "defect_detection_rate": _ratio(cm[:, defect][:, :, defect].sum(axis=(1, 2)), defective),
        "false_alarm_rate": _ratio(cm[:, normal, defect].sum(axis=1), cm[:, normal, :].sum(axis=1)),
        "review_rate": _ratio(extra[:, _REVIEW], n),
        "escape_rate": _ratio(extra[:, _ESCAPE], defective),
        "auto_precision": _ratio(extra[:, _AUTO_RIGHT], extra[:, _AUTO]),
    }


def _as_float(value: float) -> float | None:
    """A JSON-safe float: None for NaN or infinity."""
    value = float(value)
    return value if math.isfinite(value) else None


def _per_class(cm: np.ndarray, classes: list[str]) -> dict[str, dict[str, Any]]:
    """Precision, recall, F1 and support of each class (None where undefined)."""
    tp, predicted, support = np.diagonal(cm), cm.sum(axis=0), cm.sum(axis=1)
    report = {}
    for index, name in enumerate(classes):
        present = predicted[index] + support[index] > 0
        report[name] = {
            "precision": _as_float(tp[index] / predicted[index]) if predicted[index] else None,
            "recall": _as_float(tp[index] / support[index]) if support[index] else None,
            "f1": _as_float(2 * tp[index] / (predicted[index] + support[index])) if present else None,
            "support": int(support[index]),
        }
    return report


def _group_ids(groups: list[str] | None, n_images: int) -> np.ndarray:
    if groups is None:
        return np.arange(n_images)
    if len(groups) != n_images:
        raise UsageError(f"groups has {len(groups)} entries for {n_images} images; give one group key per image")
    return np.unique(np.asarray(groups, dtype=str), return_inverse=True)[1].reshape(-1)


def _strata(group_counts: np.ndarray, n_classes: int) -> list[np.ndarray]:
    """The groups of each class, a group counted in the class most of its images carry."""
    support = group_counts[:, : n_classes * n_classes].reshape(-1, n_classes, n_classes).sum(axis=2)
    group_class = support.argmax(axis=1)
    return [np.flatnonzero(group_class == c) for c in np.unique(group_class)]


def bootstrap_intervals(group_counts: np.ndarray, n_classes: int, normal: int, n_boot: int, seed: int,
                        level: float = CONFIDENCE_LEVEL) -> dict[str, dict[str, float] | None]:
    """Percentile intervals of each figure, resampling rows of per-group counts (G, F) with replacement
    within each class's groups (stratified: every replicate keeps the split's number of groups per class).

    Replicates where a figure is undefined (e.g. everything drawn went to review) are left out of its
    interval; a figure undefined in every replicate gets None.
    """
    n_groups = group_counts.shape[0]
    if n_boot <= 0 or n_groups == 0:
        return {name: None for name in INTERVAL_FIGURES}
    strata = _strata(group_counts, n_classes)
    present = _present(group_counts.sum(axis=0), n_classes)
    rng = np.random.default_rng(seed)
    replicates: dict[str, list[np.ndarray]] = {name: [] for name in INTERVAL_FIGURES}
    for start in range(0, n_boot, _BOOT_CHUNK):
        size = min(_BOOT_CHUNK, n_boot - start)
        drawn = np.concatenate([members[rng.integers(0, len(members), size=(size, len(members)))]
                                for members in strata], axis=1)
        offsets = (np.arange(size)[:, None] * n_groups + drawn).ravel()
        weights = np.bincount(offsets, minlength=size * n_groups).reshape(size, n_groups).astype(np.float64)
        for name, values in _figures(weights @ group_counts, n_classes, normal, present).items():
            replicates[name].append(values)
    tail = 100 * (1 - level) / 2
    intervals: dict[str, dict[str, float] | None] = {}
    for name in INTERVAL_FIGURES:
        values = np.concatenate(replicates[name])
        values = values[np.isfinite(values)]
        if values.size == 0:
            intervals[name] = None
            continue
        low, high = np.percentile(values, [tail, 100 - tail])
        intervals[name] = {"low": float(low), "high": float(high)}
    return intervals


def evaluate_predictions(probs: np.ndarray, labels: np.ndarray, classes: list[str], normal_class: str,
                         threshold: float, groups: list[str] | None = None, n_boot: int = 1000,
                         seed: int = 0) -> dict[str, Any]:
    """A JSON-serialisable report of classification and plant figures, with 95% bootstrap intervals.

    `groups` holds the capture group of each image (intervals resample whole groups within their class);
    None resamples single images within their class. `n_boot=0` skips the intervals.
    """
    probs = check_probs(probs, classes)
    labels = check_labels(labels, probs.shape[0], len(classes))
    normal = normal_index(classes, normal_class)
    threshold = check_threshold(threshold)
    n_images, n_classes = probs.shape
    if n_images == 0:
        raise UsageError("no images to evaluate; check that the golden test split is not empty")
    group_ids = _group_ids(groups, n_images)

    predicted = probs.argmax(axis=1)
    codes = decision_codes(probs, normal, threshold)
    is_defective = labels != normal
    auto = codes != 2
    auto_right = auto & ((codes == 1) == is_defective)
    per_image = np.zeros((n_images, n_classes * n_classes + _N_EXTRA))
    per_image[np.arange(n_images), labels * n_classes + predicted] = 1
    extra = per_image[:, n_classes * n_classes:]
    extra[:, _REVIEW] = codes == 2
    extra[:, _ESCAPE] = is_defective & (codes == 0)
    extra[:, _AUTO] = auto
    extra[:, _AUTO_RIGHT] = auto_right
    n_groups = int(group_ids.max()) + 1
    group_counts = np.zeros((n_groups, per_image.shape[1]))
    np.add.at(group_counts, group_ids, per_image)

    totals = per_image.sum(axis=0, keepdims=True)
    point = {name: _as_float(values[0]) for name, values in _figures(totals, n_classes, normal).items()}
    cm = totals[0, : n_classes * n_classes].reshape(n_classes, n_classes).astype(np.int64)
    report: dict[str, Any] = {
        "n_images": int(n_images),
        "classes": list(classes),
        "normal_class": normal_class,
        "threshold": threshold,
        "accuracy": point["accuracy"],
        "macro_f1": point["macro_f1"],
        **{name: point[name] for name in PLANT_FIGURES},
        "ece": expected_calibration_error(probs, labels),
        "per_class": _per_class(cm, classes),
        "confusion_matrix": cm.tolist(),
        "counts": {
            "normal": int((~is_defective).sum()),
            "defective": int(is_defective.sum()),
            ACCEPT: int((codes == 0).sum()),
            REJECT: int((codes == 1).sum()),
            REVIEW: int((codes == 2).sum()),
            "escaped": int((is_defective & (codes == 0)).sum()),
        },
        "intervals": bootstrap_intervals(group_counts, n_classes, normal, n_boot, seed),
        "bootstrap": {"n_boot": int(max(n_boot, 0)), "level": CONFIDENCE_LEVEL, "seed": int(seed),
                      "unit": "image" if groups is None else "group", "n_units": n_groups},
    }
    log.info("evaluated %d images: accuracy %s, macro_f1 %s, detection %s, false alarms %s, review %s",
             n_images, point["accuracy"], point["macro_f1"], point["defect_detection_rate"],
             point["false_alarm_rate"], point["review_rate"])
    return report
