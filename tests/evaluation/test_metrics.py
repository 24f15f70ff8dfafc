"""evaluate_predictions: exact figures on hand-made probabilities, empty denominators, bootstrap intervals."""

from __future__ import annotations

import json

import numpy as np
import pytest

from components.errors import UsageError
from components.evaluation.metrics import INTERVAL_FIGURES, evaluate_predictions

CLASSES = ["crack", "normal", "scratch"]
CRACK, NORMAL, SCRATCH = range(3)

# threshold 0.8; comment: true class -> top-1 (confidence) -> decision
HAND_PROBS = np.array([
    [0.05, 0.90, 0.05],  # normal  -> normal  0.90 -> accept (right)
    [0.10, 0.70, 0.20],  # normal  -> normal  0.70 -> review
    [0.85, 0.10, 0.05],  # normal  -> crack   0.85 -> reject (false alarm)
    [0.05, 0.90, 0.05],  # normal  -> normal  0.90 -> accept (right)
    [0.90, 0.05, 0.05],  # crack   -> crack   0.90 -> reject (right, detected)
    [0.10, 0.30, 0.60],  # crack   -> scratch 0.60 -> review (detected: any defect class counts)
    [0.10, 0.85, 0.05],  # crack   -> normal  0.85 -> accept (escape)
    [0.20, 0.10, 0.70],  # scratch -> scratch 0.70 -> review (detected)
    [0.10, 0.60, 0.30],  # scratch -> normal  0.60 -> review (missed)
    [0.05, 0.05, 0.90],  # scratch -> scratch 0.90 -> reject (right, detected)
])
HAND_LABELS = np.array([NORMAL] * 4 + [CRACK] * 3 + [SCRATCH] * 3)


def _hand_report(**kwargs: object) -> dict:
    return evaluate_predictions(HAND_PROBS, HAND_LABELS, CLASSES, "normal", 0.8, **kwargs)


def test_plant_figures_match_hand_counts() -> None:
    report = _hand_report(n_boot=0)
    assert report["n_images"] == 10
    assert report["defect_detection_rate"] == pytest.approx(4 / 6)
    assert report["false_alarm_rate"] == pytest.approx(1 / 4)
    assert report["review_rate"] == pytest.approx(4 / 10)
    assert report["escape_rate"] == pytest.approx(1 / 6)
    assert report["auto_precision"] == pytest.approx(4 / 6)
    assert report["counts"] == {"normal": 4, "defective": 6, "accept": 3, "reject": 3, "review": 4,
                                "escaped": 1}


def test_classification_figures_match_hand_counts() -> None:
    report = _hand_report(n_boot=0)
    assert report["confusion_matrix"] == [[1, 1, 1], [1, 3, 0], [0, 1, 2]]
    assert report["accuracy"] == pytest.approx(6 / 10)
    assert report["per_class"]["crack"] == pytest.approx(
        {"precision": 1 / 2, "recall": 1 / 3, "f1": 0.4, "support": 3})
    assert report["per_class"]["normal"] == pytest.approx(
        {"precision": 3 / 5, "recall": 3 / 4, "f1": 2 / 3, "support": 4})
    assert report["macro_f1"] == pytest.approx((0.4 + 2 / 3 + 2 / 3) / 3)


def test_report_is_strict_json() -> None:
    report = _hand_report(n_boot=50)
    assert json.loads(json.dumps(report, allow_nan=False)) == report


def test_empty_denominators_give_none() -> None:
    only_normal = np.array([[0.1, 0.9, 0.0], [0.2, 0.7, 0.1]])
    report = evaluate_predictions(only_normal, np.array([NORMAL, NORMAL]), CLASSES, "normal", 0.95, n_boot=20)
    assert report["defect_detection_rate"] is None
    assert report["escape_rate"] is None
    assert report["auto_precision"] is None  # everything went to review
    assert report["review_rate"] == 1.0
    assert report["false_alarm_rate"] == 0.0
    assert report["per_class"]["crack"] == {"precision": None, "recall": None, "f1": None, "support": 0}
    assert report["intervals"]["defect_detection_rate"] is None
    assert report["intervals"]["auto_precision"] is None
    json.dumps(report, allow_nan=False)

    only_defects = np.array([[0.9, 0.1, 0.0]])
    report = evaluate_predictions(only_defects, np.array([CRACK]), CLASSES, "normal", 0.5, n_boot=0)
    assert report["false_alarm_rate"] is None
    assert report["defect_detection_rate"] == 1.0


def test_rejects_bad_input() -> None:
    with pytest.raises(UsageError):
        evaluate_predictions(HAND_PROBS, HAND_LABELS[:-1], CLASSES, "normal", 0.8)
    with pytest.raises(UsageError):
        evaluate_predictions(HAND_PROBS, HAND_LABELS, CLASSES, "normal", 0.8, groups=["a"])
    with pytest.raises(UsageError):
        evaluate_predictions(np.zeros((0, 3)), np.zeros(0, dtype=int), CLASSES, "normal", 0.8)


def test_intervals_contain_point_and_are_deterministic() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, 300)
    probs = rng.dirichlet([1, 1, 1], size=300)
    probs[np.arange(300), labels] += rng.uniform(0, 2, 300)  # a weak but real classifier
    probs /= probs.sum(axis=1, keepdims=True)
    first = evaluate_predictions(probs, labels, CLASSES, "normal", 0.6, n_boot=300, seed=7)
    again = evaluate_predictions(probs, labels, CLASSES, "normal", 0.6, n_boot=300, seed=7)
    other = evaluate_predictions(probs, labels, CLASSES, "normal", 0.6, n_boot=300, seed=8)
    assert first["intervals"] == again["intervals"]
    assert first["intervals"] != other["intervals"]
    for name in INTERVAL_FIGURES:
        interval = first["intervals"][name]
        assert interval["low"] <= first[name] <= interval["high"], name
        assert interval["low"] < interval["high"], name


def test_group_resampling_widens_intervals_for_correlated_captures() -> None:
    # 20 captures of 10 exposures: a capture is either all right or all wrong
    n_groups, per_group = 20, 10
    group_right = np.arange(n_groups) % 2 == 0
    labels = np.repeat(np.where(np.arange(n_groups) % 3 == 0, NORMAL, CRACK), per_group)
    right = np.repeat(group_right, per_group)
    predicted = np.where(right, labels, np.where(labels == NORMAL, SCRATCH, NORMAL))
    probs = np.full((n_groups * per_group, 3), 0.05)
    probs[np.arange(len(labels)), predicted] = 0.9
    groups = [f"capture-{g}" for g in np.repeat(np.arange(n_groups), per_group)]

    by_image = evaluate_predictions(probs, labels, CLASSES, "normal", 0.8, groups=None, n_boot=500)
    by_group = evaluate_predictions(probs, labels, CLASSES, "normal", 0.8, groups=groups, n_boot=500)
    assert by_image["accuracy"] == by_group["accuracy"] == 0.5
    assert by_group["bootstrap"] == {"n_boot": 500, "level": 0.95, "seed": 0, "unit": "group", "n_units": 20}

    def width(report: dict) -> float:
        return report["intervals"]["accuracy"]["high"] - report["intervals"]["accuracy"]["low"]

    assert width(by_group) > 2 * width(by_image)
    # accuracy of a group resample moves in steps of whole captures
    assert by_group["intervals"]["accuracy"]["low"] * n_groups == pytest.approx(
        round(by_group["intervals"]["accuracy"]["low"] * n_groups), abs=1e-9)


def test_labels_in_another_case_are_the_models_classes_and_unknown_ones_are_refused() -> None:
    import pandas as pd

    from components.evaluation.runner import label_indices

    rows = pd.DataFrame({"label": ["Crack", "NORMAL", "scratch", "crack"]})
    assert label_indices(rows, ["Crack", "normal", "Scratch"]).tolist() == [CRACK, NORMAL, SCRATCH, CRACK]
    with pytest.raises(UsageError, match=r"classes \['dent'\] that the model does not know"):
        label_indices(pd.DataFrame({"label": ["crack", "dent"]}), CLASSES)
    with pytest.raises(UsageError, match="does not know"):  # two classes differing only in case: no guessing
        label_indices(pd.DataFrame({"label": ["CRACK"]}), ["crack", "Crack"])


def test_every_replicate_keeps_each_class_so_a_missed_rare_class_cannot_drop_out() -> None:
    # ten right captures of normal and of crack, and one scratch capture, always called crack: a replicate
    # drawn without that capture (a third of them, unstratified) would score macro-F1 1.0 on two classes
    n_groups, per_group = 21, 3
    group_labels = np.array([NORMAL] * 10 + [CRACK] * 10 + [SCRATCH])
    labels = np.repeat(group_labels, per_group)
    predicted = np.where(labels == SCRATCH, CRACK, labels)
    probs = np.full((len(labels), 3), 0.05)
    probs[np.arange(len(labels)), predicted] = 0.9
    groups = [f"capture-{g}" for g in np.repeat(np.arange(n_groups), per_group)]

    report = evaluate_predictions(probs, labels, CLASSES, "normal", 0.8, groups=groups, n_boot=400)
    assert report["macro_f1"] == pytest.approx((1 + 2 * 30 / 63 + 0) / 3)
    # scratch's F1 is 0 and crack's precision 30/33 in every replicate: the figure cannot move
    assert report["intervals"]["macro_f1"] == pytest.approx({"low": report["macro_f1"], "high": report["macro_f1"]})
    assert report["intervals"]["defect_detection_rate"] == {"low": 1.0, "high": 1.0}


def test_a_class_only_predicted_stays_in_every_replicates_macro_f1() -> None:
    """A folder without scratch images, and one normal image called scratch: the point figure averages scratch's
    F1 of 0 in; a replicate that does not draw that image must too, or its macro-F1 jumps to the two other
    classes' alone (the interval reached 1.0 above a point figure of 0.64)."""
    labels = np.array([NORMAL] * 20 + [CRACK] * 20)
    probs = np.full((40, 3), 0.05)
    probs[np.arange(40), labels] = 0.9
    probs[0] = [0.05, 0.05, 0.9]  # normal called scratch
    probs[21] = [0.05, 0.9, 0.05]  # crack called normal

    report = evaluate_predictions(probs, labels, CLASSES, "normal", 0.8, groups=[f"g{i}" for i in range(40)],
                                  n_boot=1000)
    interval = report["intervals"]["macro_f1"]
    assert report["per_class"]["scratch"]["support"] == 0
    assert interval["low"] <= report["macro_f1"] < interval["high"] < 0.7, "scratch's 0 averaged in every time"
