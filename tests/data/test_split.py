"""Splits: stratified, grouped by capture, deterministic, and stable as the data grows."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from components.config import GroupingParams, SplitParams
from components.data.split import SPLITS, assign_splits, group_keys, read_splits

FRACTIONS = SplitParams()


def _frame(paths: list[str], labels: list[str], rule: GroupingParams) -> pd.DataFrame:
    return pd.DataFrame({"path": paths, "label": labels, "group": group_keys(paths, labels, rule)})


def _magnetic_like(n_spots: int, label: str, start: int = 0) -> tuple[list[str], list[str]]:
    paths = [f"images/{label}/exp{e}_num_{start + spot * 1000 + e * 20}.jpg"
             for spot in range(n_spots) for e in range(1, 7)]
    return paths, [label] * len(paths)


def test_capture_gap_groups_the_exposures_of_one_spot() -> None:
    paths, labels = _magnetic_like(3, "Crack")
    keys = group_keys(paths, labels, GroupingParams(rule="capture_gap", max_gap=300))
    assert len(set(keys)) == 3 and keys[:6] == [keys[0]] * 6


def test_pattern_rule_and_per_image_default() -> None:
    paths = ["images/a/partA_cam1.png", "images/a/partA_cam2.png", "images/a/partB_cam1.png"]
    keys = group_keys(paths, ["a"] * 3, GroupingParams(rule="pattern", pattern=r"^(part\w)_"))
    assert keys[0] == keys[1] != keys[2]
    assert group_keys(paths, ["a"] * 3, GroupingParams()) == paths


def test_no_group_crosses_splits_and_every_class_is_in_every_split() -> None:
    paths, labels = [], []
    for label, spots in {"Free": 60, "Crack": 8, "Fray": 5}.items():
        p, lab = _magnetic_like(spots, label)
        paths += p
        labels += lab
    frame = _frame(paths, labels, GroupingParams(rule="capture_gap"))
    frame["split"] = assign_splits(frame, FRACTIONS, seed=1)
    assert (frame.groupby("group")["split"].nunique() == 1).all()
    for label, rows in frame.groupby("label"):
        assert set(rows["split"]) == {"train", "val", "test"}, label
    shares = frame[frame.label == "Free"]["split"].value_counts(normalize=True)
    assert abs(shares["train"] - 0.70) < 0.05 and abs(shares["test"] - 0.15) < 0.05


def test_deterministic_and_stable_when_images_are_added() -> None:
    rule = GroupingParams(rule="capture_gap")
    paths, labels = _magnetic_like(20, "Free")
    first = _frame(paths, labels, rule)
    first["split"] = assign_splits(first, FRACTIONS, seed=7)
    again = _frame(paths, labels, rule)
    assert assign_splits(again, FRACTIONS, seed=7).tolist() == first["split"].tolist()
    # a month later: new spots, and one more exposure of an old spot
    more, more_labels = _magnetic_like(15, "Free", start=100_000)
    grown = _frame(paths + more + ["images/Free/exp0_num_5.jpg"], labels + more_labels + ["Free"], rule)
    grown["split"] = assign_splits(grown, FRACTIONS, seed=7, previous=dict(zip(first.path, first.split)))
    old = grown.set_index("path").loc[first.path, "split"]
    assert old.tolist() == first["split"].tolist(), "no existing image moved"
    joined = grown.set_index("path").loc["images/Free/exp0_num_5.jpg", "split"]
    assert joined == first.set_index("path").loc[paths[0], "split"], "a new exposure joins its capture's split"
    assert (grown.groupby("group")["split"].nunique() == 1).all()


def test_a_longer_pause_within_rising_exposures_is_still_one_spot() -> None:
    # one Fray spot of the real data: exposures 1-3, a pause of 325, exposures 4-6; then exp1 430 later: a new spot
    numbers = {1: 136254, 2: 136286, 3: 136351, 4: 136676, 5: 136716, 6: 136770}
    paths = [f"images/Fray/exp{e}_num_{n}.jpg" for e, n in numbers.items()] + ["images/Fray/exp1_num_137200.jpg"]
    labels = ["Fray"] * len(paths)
    plain = group_keys(paths, labels, GroupingParams(rule="capture_gap", max_gap=300))
    assert len(set(plain[:6])) == 2, "the gap rule alone cuts the spot in two"
    aware = GroupingParams(rule="capture_gap", max_gap=300, exposure_pattern=r"exp(\d+)_", max_gap_rising=600)
    keys = group_keys(paths, labels, aware)
    assert set(keys[:6]) == {"Fray/capture-136254"} and keys[6] != keys[0], "exp1 after exp6 is a new spot"
    # without rising exposures, the plain gap still separates: a pause of 325 before a lower exposure index
    falling = ["images/Fray/exp4_num_1000.jpg", "images/Fray/exp2_num_1325.jpg"]
    assert len(set(group_keys(falling, ["Fray"] * 2, aware))) == 2


def test_a_group_joined_after_its_images_were_split_is_reported(caplog) -> None:
    paths, labels = _magnetic_like(1, "Fray")
    frame = _frame(paths, labels, GroupingParams(rule="capture_gap"))
    previous = {p: ("train" if i < 3 else "val") for i, p in enumerate(paths)}
    with caplog.at_level("WARNING", logger="components.data.split"):
        split = assign_splits(frame, FRACTIONS, seed=1, previous=previous)
    assert split.tolist() == [previous[p] for p in paths], "committed splits are never moved"
    assert "1 capture group(s) span two splits" in caplog.text and "Fray/capture-20" in caplog.text


def test_a_blank_split_in_splits_csv_is_not_an_assigned_one(tmp_path: Path) -> None:
    paths = [f"images/dent/img_{i}.png" for i in range(6)]
    frame = _frame(paths, ["dent"] * 6, GroupingParams())
    committed = tmp_path / "splits.csv"
    committed.write_text("path,group,split\n" + "".join(f"{p},{p},{'train' if i else ''}\n"
                                                         for i, p in enumerate(paths)))
    for previous in (read_splits(committed), {p: float("nan") if i == 0 else "train" for i, p in enumerate(paths)}):
        split = assign_splits(frame, FRACTIONS, seed=1, previous=previous)
        assert split.tolist()[1:] == ["train"] * 5, "committed splits are kept"
        assert split.tolist()[0] in SPLITS, "the blank one is placed like a new image"
