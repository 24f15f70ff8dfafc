"""Champion / challenger gate and its markdown report."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from components.evaluation.gate import GateRules, compare, comparison_markdown
from components.evaluation.metrics import evaluate_predictions

CLASSES = ["crack", "normal", "scratch"]


def _report(macro_f1: float, detection: float, false_alarms: float, recalls: tuple[float, float, float],
            n_images: int = 100, **extra: float) -> dict:
    """A hand-made evaluate_predictions-shaped report."""
    return {
        "n_images": n_images, "classes": CLASSES, "normal_class": "normal", "threshold": 0.8,
        "macro_f1": macro_f1, "accuracy": macro_f1, "defect_detection_rate": detection,
        "false_alarm_rate": false_alarms, "review_rate": 0.1, "escape_rate": 0.01, "auto_precision": 0.99,
        "ece": 0.02,
        "per_class": {name: {"recall": recall, "support": 10} for name, recall in zip(CLASSES, recalls)},
        **extra,
    }


def test_no_champion_passes_on_absolute_minimums() -> None:
    result = compare(_report(0.91, 0.95, 0.05, (0.9, 0.95, 0.9)), None, GateRules())
    assert result.passed
    assert result.reasons == [
        "macro_f1 0.910 >= 0.600 (no champion): ok",
        "defect_detection_rate 0.950 >= 0.800 (no champion): ok",
        "false_alarm_rate 0.050 <= 0.200 (no champion): ok",
    ]


def test_no_champion_fails_on_false_alarms_and_missing_figures() -> None:
    result = compare(_report(0.91, None, 0.35, (0.9, 0.95, 0.9)), None, GateRules())  # type: ignore[arg-type]
    assert not result.passed
    failed = [check["name"] for check in result.checks if not check["passed"]]
    assert failed == ["defect_detection_rate", "false_alarm_rate"]
    assert result.reasons[2] == "false_alarm_rate 0.350 <= 0.200 (no champion): FAILED"


def test_challenger_beating_champion_passes() -> None:
    champion = _report(0.88, 0.93, 0.05, (0.85, 0.95, 0.9))
    challenger = _report(0.91, 0.95, 0.06, (0.82, 0.95, 0.92))  # crack recall drops 0.03 < 0.05
    result = compare(challenger, champion, GateRules())
    assert result.passed, result.reasons
    assert "macro_f1 0.910 >= champion 0.880 + 0.000: ok" in result.reasons
    assert "recall[crack] 0.820 >= champion 0.850 - 0.050: ok" in result.reasons
    assert result.reasons[-1] == "defect_detection_rate 0.950 >= champion 0.930 + 0.000: ok"


def test_challenger_fails_on_recall_drop_and_gain() -> None:
    champion = _report(0.88, 0.93, 0.05, (0.90, 0.95, 0.9))
    challenger = _report(0.89, 0.92, 0.05, (0.80, 0.95, 0.9))
    result = compare(challenger, champion, GateRules(min_macro_f1_gain=0.02))
    assert not result.passed
    failed = {check["name"] for check in result.checks if not check["passed"]}
    assert failed == {"macro_f1", "recall[crack]", "defect_detection_rate"}
    assert "macro_f1 0.890 >= champion 0.880 + 0.020: FAILED" in result.reasons


def test_bounds_tolerate_floating_point() -> None:
    champion = _report(0.85, 0.9, 0.05, (0.9, 0.9, 0.9))
    challenger = _report(0.90, 0.9, 0.05, (0.85, 0.9, 0.9))
    assert compare(challenger, champion, GateRules(min_macro_f1_gain=0.05)).passed


def test_different_test_sets_fail() -> None:
    champion = _report(0.88, 0.93, 0.05, (0.9, 0.9, 0.9), n_images=90)
    challenger = _report(0.91, 0.95, 0.05, (0.9, 0.9, 0.9), n_images=100)
    result = compare(challenger, champion, GateRules())
    assert not result.passed
    assert result.checks[0]["name"] == "same_test_set" and not result.checks[0]["passed"]
    assert "re-evaluate the champion" in result.reasons[0]


def test_as_many_other_images_fail() -> None:
    champion = {**_report(0.88, 0.93, 0.05, (0.9, 0.9, 0.9)), "image_paths_digest": "a1"}
    challenger = {**_report(0.91, 0.95, 0.05, (0.9, 0.9, 0.9)), "image_paths_digest": "b2"}
    result = compare(challenger, champion, GateRules())
    assert not result.passed and result.checks[0]["name"] == "same_test_set" and not result.checks[0]["passed"]
    assert "images (other images), same classes: FAILED" in result.reasons[0]
    assert compare({**challenger, "image_paths_digest": "a1"}, champion, GateRules()).passed


def test_latency_rule() -> None:
    rules = GateRules(max_latency_ms=50)
    good = _report(0.91, 0.95, 0.05, (0.9, 0.9, 0.9), latency_ms=20.0)
    slow = _report(0.91, 0.95, 0.05, (0.9, 0.9, 0.9), latency_ms=80.0)
    unmeasured = _report(0.91, 0.95, 0.05, (0.9, 0.9, 0.9))
    assert compare(good, None, rules).passed
    assert compare(slow, good, rules).reasons[-1] == "latency_ms 80.0 <= 50.0: FAILED"
    assert "not measured" in compare(unmeasured, None, rules).reasons[-1]
    assert len(compare(unmeasured, None, GateRules()).checks) == 3  # no latency rule, no check


def test_rules_reject_unknown_keys() -> None:
    with pytest.raises(ValidationError):
        GateRules(min_macro_f1_gian=0.1)  # type: ignore[call-arg]


def test_markdown_on_real_reports() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 120)
    groups = [f"g{i // 4}" for i in range(120)]

    def model(strength: float) -> np.ndarray:
        probs = rng.dirichlet([1, 1, 1], size=120)
        probs[np.arange(120), labels] += strength
        return probs / probs.sum(axis=1, keepdims=True)

    champion = evaluate_predictions(model(1.0), labels, CLASSES, "normal", 0.7, groups, n_boot=100)
    challenger = evaluate_predictions(model(3.0), labels, CLASSES, "normal", 0.7, groups, n_boot=100)
    challenger["latency_ms"] = 12.5
    result = compare(challenger, champion, GateRules())
    text = comparison_markdown(challenger, champion, result, "v7", "v6")
    assert "| figure | challenger v7 | champion v6 | change |" in text
    low, high = challenger["intervals"]["macro_f1"].values()
    assert f"| macro F1 | {challenger['macro_f1']:.3f} [{low:.3f}, {high:.3f}] |" in text
    assert "| latency (ms) | 12.5 | n/a | — |" in text
    assert result.passed and "## Gate: PASSED" in text  # a far stronger challenger
    assert all(f"- {reason}" in text for reason in result.reasons)
    assert "resampling whole capture groups within each class (30 groups)." in text
    assert "Warning" not in text  # reports without a recorded review rule say nothing about it

    alone = comparison_markdown(challenger, None, compare(challenger, None, GateRules()), "v1")
    assert "champion (none)" in alone and "(no champion)" in alone


def test_markdown_warns_when_the_review_threshold_missed_its_target_or_was_never_tuned() -> None:
    """The gate judges figures, not the review rule's tuning: a threshold that missed its validation target
    (or a model never calibrated) must be visible to the engineer who approves."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 60)
    probs = rng.dirichlet([1, 1, 1], size=60)
    report = evaluate_predictions(probs, labels, CLASSES, "normal", 0.7, [f"g{i}" for i in range(60)], n_boot=20)
    missed = {**report, "review_rule": {"target_auto_precision": 0.995, "max_review_rate": 0.15, "target_met": False,
                                        "reason": "auto_precision 0.97 at most within the review budget"}}
    never = {**report, "review_rule": None}
    met = {**report, "review_rule": {**missed["review_rule"], "target_met": True}}

    def text(challenger):
        return comparison_markdown(challenger, None, compare(challenger, None, GateRules()), "v3")

    assert ("**Warning:** v3's review threshold missed its validation target (auto precision 0.995 within review "
            "rate 0.150): auto_precision 0.97 at most within the review budget.") in text(missed)
    assert "**Warning:** v3 has no stored calibration" in text(never)
    assert "Warning" not in text(met)
    assert "resampling images (every capture group is one image)." in text(met)
