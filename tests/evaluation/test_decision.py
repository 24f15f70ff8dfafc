"""The accept / reject / review rule and threshold tuning on validation."""

from __future__ import annotations

import numpy as np
import pytest

from components.errors import UsageError
from components.evaluation.decision import decide, tune_threshold
from components.evaluation.metrics import evaluate_predictions

CLASSES = ["crack", "normal", "scratch"]


def test_decide_on_boundary_confidences() -> None:
    probs = np.array([
        [0.125, 0.75, 0.125],     # normal at exactly the threshold -> accept
        [0.75, 0.125, 0.125],     # defect at exactly the threshold -> reject
        [0.126, 0.749, 0.125],    # normal just below -> review
        [0.125, 0.126, 0.749],    # defect just below -> review
        [0.0, 1.0, 0.0],
        [0.0, 0.0, 1.0],
    ])
    assert decide(probs, CLASSES, "normal", 0.75).tolist() == [
        "accept", "reject", "review", "review", "accept", "reject"]


def test_decide_threshold_zero_and_one() -> None:
    probs = np.array([[0.2, 0.5, 0.3], [0.4, 0.3, 0.3]])
    assert decide(probs, CLASSES, "normal", 0.0).tolist() == ["accept", "reject"]
    assert decide(probs, CLASSES, "normal", 1.0).tolist() == ["review", "review"]


@pytest.mark.parametrize(("probs", "normal", "threshold"), [
    (np.array([[0.5, 0.5]]), "normal", 0.5),                     # wrong column count
    (np.array([[0.2, 0.5, 0.3]]), "free", 0.5),                  # unknown normal class
    (np.array([[0.2, 0.5, 0.3]]), "normal", 1.5),                # threshold out of range
    (np.array([[2.0, -1.0, 0.5]]), "normal", 0.5),               # logits, not probabilities
    (np.array([[np.nan, 0.5, 0.5]]), "normal", 0.5),
])
def test_decide_rejects_bad_input(probs: np.ndarray, normal: str, threshold: float) -> None:
    with pytest.raises(UsageError):
        decide(probs, CLASSES, normal, threshold)


def _validation_set(wrong_confidences: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """18 images right at the normal-vs-defect level with confidences 0.70..0.87, plus wrong ones."""
    classes_defect_normal = []
    labels = []
    for index, confidence in enumerate(np.round(np.linspace(0.70, 0.87, 18), 2)):
        top = index % 2  # alternate defect (0) / normal (1), predicted right
        row = [1 - confidence, confidence] if top == 1 else [confidence, 1 - confidence]
        classes_defect_normal.append(row)
        labels.append(top)
    for confidence in wrong_confidences:  # predicted normal, truly a defect: an escape if accepted
        classes_defect_normal.append([1 - confidence, confidence])
        labels.append(0)
    return np.array(classes_defect_normal), np.array(labels)


def test_tune_threshold_meets_reachable_target() -> None:
    probs, labels = _validation_set([0.60, 0.65])
    result = tune_threshold(probs, labels, ["defect", "normal"], "normal", 0.995, 0.15)
    assert result["met"] is True
    assert result["threshold"] == pytest.approx(0.70)  # lowest threshold sending both errors to review
    assert result["auto_precision"] == 1.0
    assert result["review_rate"] == pytest.approx(2 / 20)
    # the threshold reproduces the same figures through the shared decision rule
    report = evaluate_predictions(probs, labels, ["defect", "normal"], "normal", result["threshold"], n_boot=0)
    assert report["review_rate"] == pytest.approx(result["review_rate"])
    assert report["auto_precision"] == pytest.approx(result["auto_precision"])


def test_tune_threshold_reports_target_beyond_review_budget() -> None:
    probs, labels = _validation_set([0.60, 0.65])
    result = tune_threshold(probs, labels, ["defect", "normal"], "normal", 0.995, max_review_rate=0.05)
    assert result["met"] is False
    assert result["threshold_for_target"] == pytest.approx(0.70)
    assert result["review_rate_for_target"] == pytest.approx(0.10)
    assert result["threshold"] == pytest.approx(0.65)  # best auto precision with at most 1 of 20 reviewed
    assert result["review_rate"] == pytest.approx(0.05)
    assert result["auto_precision"] == pytest.approx(18 / 19)
    assert "review_rate 0.1000 > 0.05" in result["reason"]


def test_tune_threshold_reports_unreachable_target() -> None:
    probs, labels = _validation_set([0.95])  # the most confident image is wrong
    result = tune_threshold(probs, labels, ["defect", "normal"], "normal", 0.995, 0.15)
    assert result["met"] is False
    assert result["threshold_for_target"] is None
    assert "no threshold reaches" in result["reason"]
    assert result["review_rate"] <= 0.15


def test_tune_threshold_rejects_empty_validation() -> None:
    with pytest.raises(UsageError):
        tune_threshold(np.zeros((0, 2)), np.zeros(0, dtype=int), ["defect", "normal"], "normal")
