"""Capture groups and the train/val/test split: deterministic, stratified, stable as the data grows.

Images of one capture (the exposures of one spot) form a group, and a group never spans two splits.
Splits already given to images are kept for ever (they are committed in `splits.csv` next to `data.dvc`):
only groups with no assigned image are placed, per class, in the split furthest below its target share,
in an order fixed by a hash of the seed and the group key. So adding a month of images never moves an
old image, the golden test split only grows, and every class gets images in every split it can fill.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import Counter, defaultdict
from pathlib import Path

import pandas as pd

from components.config import GroupingParams, SplitParams
from components.files import replacing

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def _stem(relpath: str) -> str:
    return Path(relpath).stem


def group_keys(paths: list[str], labels: list[str], rule: GroupingParams) -> list[str]:
    """The capture group of each image, per the configured rule (one group per image by default)."""
    if rule.rule == "image":
        return list(paths)
    if rule.rule == "pattern":
        regex = re.compile(rule.pattern or "")
        keys = []
        for path, label in zip(paths, labels, strict=True):
            match = regex.search(_stem(path))
            keys.append(f"{label}/{match.group(1) if match and match.groups() else match.group(0)}" if match
                        else path)
        return keys
    number = re.compile(rule.number_pattern)
    exposure = re.compile(rule.exposure_pattern) if rule.exposure_pattern else None
    keys = list(paths)
    by_label: dict[str, list[tuple[int, int, int | None]]] = defaultdict(list)
    for index, (path, label) in enumerate(zip(paths, labels, strict=True)):
        stem = _stem(path)
        match = number.search(stem)
        if match:
            found = exposure.search(stem) if exposure else None
            by_label[label].append((int(match.group(1)), index, int(found.group(1)) if found else None))
    for label, numbered in by_label.items():
        numbered.sort()
        start, previous, previous_exposure = None, None, None
        for n, index, exp in numbered:
            # a spot's exposures come in rising order: a longer pause between two of them is still one spot
            rising = exp is not None and previous_exposure is not None and exp > previous_exposure
            if previous is None or n - previous > (rule.max_gap_rising if rising else rule.max_gap):
                start = n
            keys[index] = f"{label}/capture-{start}"
            previous, previous_exposure = n, exp
    return keys


def _order(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def _assigned(value: object) -> str | None:
    """A committed split, or None for none: a missing row, or a blank cell (read back as NaN or "")."""
    return value if isinstance(value, str) and value.strip() else None


def assign_splits(frame: pd.DataFrame, fractions: SplitParams, seed: int,
                  previous: dict[str, str] | None = None) -> pd.Series:
    """Split of each row of `frame` (columns path, label, group), keeping every split already in `previous`."""
    previous = previous or {}
    targets = fractions.as_dict()
    paths, labels, groups = frame["path"].tolist(), frame["label"].tolist(), frame["group"].tolist()
    split: list[str | None] = [_assigned(previous.get(p)) for p in paths]
    members: dict[str, list[int]] = defaultdict(list)
    for i, group in enumerate(groups):
        members[group].append(i)
    # a new image joins the split its capture group already has
    for rows in members.values():
        known = [split[i] for i in rows if split[i] is not None]
        if known and len(known) < len(rows):
            fill = Counter(known).most_common(1)[0][0]
            for i in rows:
                split[i] = split[i] or fill
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        by_label[label].append(i)
    for label in sorted(by_label):
        rows = by_label[label]
        have = Counter(split[i] for i in rows if split[i] is not None)
        fresh: dict[str, list[int]] = defaultdict(list)
        for i in rows:
            if split[i] is None:
                fresh[groups[i]].append(i)
        for group in sorted(fresh, key=lambda g: _order(seed, str(g))):
            deficits = {s: targets[s] * len(rows) - have[s] for s in SPLITS}
            chosen = max(SPLITS, key=lambda s: (deficits[s], -SPLITS.index(s)))
            for i in fresh[group]:
                split[i] = chosen
            have[chosen] += len(fresh[group])
    _warn_split_groups(members, split)
    return pd.Series(split, index=frame.index, dtype=object)


def _warn_split_groups(members: dict[str, list[int]], split: list[str | None]) -> None:
    """Committed splits are never moved, so a group that the grouping rule joined after its images were split
    (a rule change) can sit in two splits: the same spot trained on and scored. Say so, with the fix."""
    spans = {group: sorted({str(split[i]) for i in rows}) for group, rows in members.items()}
    crossing = sorted(group for group, splits in spans.items() if len(splits) > 1)
    if crossing:
        log.warning("%d capture group(s) span two splits in splits.csv, e.g. %s (%s): one spot is trained on and "
                    "scored; move their images into one split in splits.csv and commit it", len(crossing),
                    crossing[0], ", ".join(spans[crossing[0]]))


def read_splits(path: Path) -> dict[str, str]:
    """The committed split of each tracked image (empty when none is committed yet); a blank cell is no split,
    and its image is placed like a new one."""
    if not path.is_file():
        return {}
    table = pd.read_csv(path, dtype=str, keep_default_na=False)  # "" for a blank cell, not NaN
    return {image: split for image, split in zip(table["path"], table["split"], strict=True) if _assigned(split)}


def write_splits(frame: pd.DataFrame, path: Path) -> None:
    """Write path/group/split, sorted, atomically (it is committed next to data.dvc)."""
    with replacing(path) as tmp:
        frame[["path", "group", "split"]].sort_values("path").to_csv(tmp, index=False)
