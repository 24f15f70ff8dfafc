"""The accept / reject / review rule applied to each image, and the choice of its confidence threshold.

One rule, shared by evaluation and serving: the top-1 class decides what the image is, its probability
decides whether the line may act on it without a person. `accept` (pass the part) when the top-1 class is
the normal class with confidence >= threshold, `reject` when it is a defect class with confidence >=
threshold, `review` (send to a person) otherwise. A confidence exactly equal to the threshold is decided
automatically.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from components.errors import UsageError

log = logging.getLogger(__name__)

ACCEPT, REJECT, REVIEW = "accept", "reject", "review"
DECISIONS = (ACCEPT, REJECT, REVIEW)

_SUM_TOLERANCE = 1e-3


def check_probs(probs: np.ndarray, classes: list[str] | None = None) -> np.ndarray:
    """`probs` as a float (N, C) array of class probabilities; anything else is a UsageError."""
    array = np.asarray(probs, dtype=np.float64)
    if array.ndim != 2:
        raise UsageError(f"probabilities must be a 2-D (images, classes) array, got shape {array.shape}")
    if classes is not None and array.shape[1] != len(classes):
        raise UsageError(f"probabilities have {array.shape[1]} columns but there are {len(classes)} classes "
                         f"{classes}; pass the class list the model was trained with")
    if not np.all(np.isfinite(array)):
        raise UsageError("probabilities contain NaN or infinity; check the model outputs")
    if array.size and (array.min() < 0 or np.abs(array.sum(axis=1) - 1).max() > _SUM_TOLERANCE):
        raise UsageError("probability rows must be non-negative and sum to 1; "
                         "pass softmax(logits, temperature), not raw logits")
    return array


def check_labels(labels: np.ndarray, n_images: int, n_classes: int) -> np.ndarray:
    """`labels` as an int (N,) array of class indices in [0, n_classes); anything else is a UsageError."""
    array = np.asarray(labels)
    if array.ndim != 1 or array.shape[0] != n_images:
        raise UsageError(f"labels must be a 1-D array of {n_images} class indices, got shape {array.shape}")
    if array.size and (array.dtype.kind not in "iuf" or (array.dtype.kind == "f" and np.any(array % 1))):
        raise UsageError("labels must be integer class indices, not names or scores; map names with "
                         "classes.index(name)")
    array = array.astype(np.int64)
    if array.size and (array.min() < 0 or array.max() >= n_classes):
        raise UsageError(f"labels must lie in [0, {n_classes}); got {array.min()}..{array.max()}")
    return array


def normal_index(classes: list[str], normal_class: str) -> int:
    """Column of the normal class; a UsageError when it is missing or there is no defect class."""
    if normal_class not in classes:
        raise UsageError(f"normal class {normal_class!r} is not one of the classes {classes}")
    if len(classes) < 2:
        raise UsageError(f"need the normal class and at least one defect class, got {classes}")
    return classes.index(normal_class)


def check_threshold(threshold: float) -> float:
    """`threshold` as a float in [0, 1]; anything else is a UsageError."""
    if not 0.0 <= threshold <= 1.0:
        raise UsageError(f"threshold must lie in [0, 1], got {threshold}")
    return float(threshold)


def decision_codes(probs: np.ndarray, normal: int, threshold: float) -> np.ndarray:
    """Indices into DECISIONS (0 accept, 1 reject, 2 review) for already checked probabilities."""
    top = probs.argmax(axis=1)
    confident = probs.max(axis=1) >= threshold
    codes = np.full(probs.shape[0], 2, dtype=np.int64)
    codes[confident & (top == normal)] = 0
    codes[confident & (top != normal)] = 1
    return codes


def decide(probs: np.ndarray, classes: list[str], normal_class: str, threshold: float) -> np.ndarray:
    """The decision for each image: 'accept', 'reject' or 'review' (see the module docstring)."""
    array = check_probs(probs, classes)
    codes = decision_codes(array, normal_index(classes, normal_class), check_threshold(threshold))
    return np.array(DECISIONS)[codes]


def tune_threshold(probs_val: np.ndarray, labels_val: np.ndarray, classes: list[str], normal_class: str,
                   target_auto_precision: float = 0.995, max_review_rate: float = 0.15) -> dict[str, Any]:
    """The lowest threshold on validation that meets the auto-precision target within the review budget.

    Pass temperature-scaled validation probabilities. Auto precision is the share of automatic decisions
    (accept, reject) that are right at the normal-vs-defect level; raising the threshold sends more images
    to review. Candidate thresholds are the distinct top-1 confidences on validation: each one is the
    conservative (highest) end of the interval of thresholds that make the same decisions.

    * Met: the lowest candidate with auto_precision >= target and review_rate <= max_review_rate, so the
      fewest images go to a person. `met` is True.
    * Not met (the target is unreachable, or reachable only by reviewing more than allowed): the review
      budget is treated as a hard capacity limit, so the choice is the candidate with the highest auto
      precision among those within the budget (the lowest such on ties). `met` is False, `reason` says
      why, and `threshold_for_target` / `review_rate_for_target` give the threshold that would meet the
      target ignoring the budget (None when no threshold does).
    """
    probs = check_probs(probs_val, classes)
    labels = check_labels(labels_val, probs.shape[0], len(classes))
    normal = normal_index(classes, normal_class)
    if probs.shape[0] == 0:
        raise UsageError("cannot tune a threshold on an empty validation set")
    if not 0.0 < target_auto_precision <= 1.0 or not 0.0 <= max_review_rate <= 1.0:
        raise UsageError(f"target_auto_precision must be in (0, 1] and max_review_rate in [0, 1], got "
                         f"{target_auto_precision} and {max_review_rate}")
    n = probs.shape[0]
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == normal) == (labels == normal)

    order = np.argsort(confidence, kind="stable")
    sorted_conf, sorted_correct = confidence[order], correct[order]
    candidates = np.unique(sorted_conf)
    first = np.searchsorted(sorted_conf, candidates, side="left")  # images below a candidate go to review
    correct_before = np.concatenate([[0], np.cumsum(sorted_correct)])
    n_auto = n - first
    auto_precision = (correct_before[-1] - correct_before[first]) / n_auto
    review_rate = first / n

    meets_target = auto_precision >= target_auto_precision
    within_budget = review_rate <= max_review_rate + 1e-12
    both = np.flatnonzero(meets_target & within_budget)
    target_only = np.flatnonzero(meets_target)
    result: dict[str, Any] = {
        "target_auto_precision": float(target_auto_precision),
        "max_review_rate": float(max_review_rate),
        "threshold_for_target": float(candidates[target_only[0]]) if target_only.size else None,
        "review_rate_for_target": float(review_rate[target_only[0]]) if target_only.size else None,
    }
    if both.size:
        pick, met = both[0], True
        reason = (f"auto_precision {auto_precision[pick]:.4f} >= {target_auto_precision} with review_rate "
                  f"{review_rate[pick]:.4f} <= {max_review_rate}")
    else:
        budget = np.flatnonzero(within_budget)  # never empty: the lowest candidate reviews nothing
        pick, met = budget[np.argmax(auto_precision[budget])], False
        if target_only.size:
            why = (f"reaching auto_precision {target_auto_precision} needs threshold "
                   f"{candidates[target_only[0]]:.4f} with review_rate {review_rate[target_only[0]]:.4f} "
                   f"> {max_review_rate}")
        else:
            why = (f"no threshold reaches auto_precision {target_auto_precision} on validation "
                   f"(best {auto_precision.max():.4f})")
        reason = (f"{why}; chose the best auto_precision within the review budget: "
                  f"{auto_precision[pick]:.4f} at review_rate {review_rate[pick]:.4f}")
        log.warning("threshold target not met: %s", reason)
    result.update(threshold=float(candidates[pick]), auto_precision=float(auto_precision[pick]),
                  review_rate=float(review_rate[pick]), met=met, reason=reason)
    log.info("threshold %.4f: auto_precision %.4f, review_rate %.4f (met=%s)", result["threshold"],
             result["auto_precision"], result["review_rate"], met)
    return result
