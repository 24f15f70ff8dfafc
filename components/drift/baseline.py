"""What a model's answers are compared with: its first weeks on the line (its production baseline), or the
validation split.

The validation split holds the dataset's class mix (Magnetic Tile: about 71% normal), a real line its own (most
parts normal), so against validation `predicted_class` drifts in every window of a healthy line (README "Drift"
has the measured rates). With `drift.prediction_reference: production`, once the deployed model has served
`drift.baseline_days` after its deployment (by the window's end), the model's answers of those days replace the
validation split's as the reference of the prediction columns (predicted class, confidence); where the window
reaches back into those days, its answers from then are left out (they would be compared with themselves). The
image statistics stay compared with the training images (a line that slowly darkens is still drift, whatever
the baseline saw), and the embeddings with val's, of the parts called normal only (`drift.embedding.classes`),
which does not depend on the class mix and keeps the null over val's capture groups.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd

from components.config import Settings
from components.drift.current import current_frame
from components.drift.params import PREDICTION_COLUMNS, DriftParams
from components.drift.reference import BASELINE_SPLIT, file_slug
from components.drift.window import Window
from components.errors import DefectOpsError
from components.files import replacing
from components.serving.predlog import read_log

log = logging.getLogger(__name__)

BASELINE_FORMAT = 3  # bump when the cached baseline's columns change


@dataclass(frozen=True)
class PredictionReference:
    """The reference frame to compare with, where its answers come from (summary.json's
    `reference.predictions`), and from when on the window's answers count (None: all of them)."""

    frame: pd.DataFrame
    info: dict[str, Any]
    answers_from: datetime | None = None

    def window(self, current: pd.DataFrame) -> pd.DataFrame:
        """The window's records, with the answers logged before `answers_from` left out: a window that reaches
        back into the baseline's days would otherwise be compared partly with itself."""
        if self.answers_from is None:
            return current
        early = current["timestamp"] < self.answers_from
        if not early.any():
            return current
        current = current.copy()
        current.loc[early, list(PREDICTION_COLUMNS)] = None
        return current


def deployed_at(settings: Settings, model_version: str) -> datetime | str:
    """When `model_version` was deployed on this state root, or why that is not known."""
    from components.serving.deployment import read_record

    try:
        record = read_record(settings)
    except (DefectOpsError, OSError) as exc:  # an unreadable record: no baseline, but still a drift check
        return f"the deployment record is unreadable ({exc})"
    if record is None:
        return f"no deployment is recorded under {settings.state_dir}"
    if record.model_version != model_version:
        return f"the deployment record names {record.model_version}, not {model_version}"
    try:
        stamp = datetime.fromisoformat(record.deployed_at)
    except ValueError:  # a record edited by hand
        return f"the deployment record's deployed_at {record.deployed_at!r} is not an ISO time"
    return stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)  # the service writes UTC


def baseline_path(settings: Settings, params: DriftParams, model_version: str, start: datetime) -> Path:
    """Where the baseline of this model and deployment is cached (it no longer changes once it is used)."""
    identity = json.dumps([BASELINE_FORMAT, model_version, start.isoformat(), params.baseline_days,
                           params.baseline_max])
    digest = hashlib.sha256(identity.encode()).hexdigest()[:10]
    return settings.reports_dir / "drift" / "baseline" / f"{file_slug(model_version)}-{digest}.parquet"


def baseline_answers(settings: Settings, params: DriftParams, model_version: str, start: datetime,
                     end: datetime) -> pd.DataFrame:
    """The model's answers (class and confidence) logged in [start, end): a seeded sample of at most
    `baseline_max`, read from the cache or, the first time, from the production log."""
    path = baseline_path(settings, params, model_version, start)
    if path.is_file():
        try:
            return pd.read_parquet(path)
        except (OSError, ValueError) as exc:  # a torn or foreign file: read the log again
            log.warning("drift baseline %s unreadable (%s); reading the production log again", path, exc)
    frame = current_frame(read_log(settings.prod_log_dir, start, end).records)
    frame = frame[(frame["model_version"] == model_version) & frame["predicted_class"].notna()]
    if len(frame) > params.baseline_max:
        frame = frame.sample(n=params.baseline_max, random_state=0).sort_index()
    answers = frame[list(PREDICTION_COLUMNS)].reset_index(drop=True)
    if len(answers) >= params.min_current:
        with replacing(path) as tmp:
            answers.to_parquet(tmp, index=False)
    return answers


def with_baseline(reference: pd.DataFrame, answers: pd.DataFrame) -> pd.DataFrame:
    """The reference with the baseline's answers as rows of their own (split BASELINE_SPLIT, no image statistics,
    no embeddings): `detect.compare` compares the prediction columns with those rows only."""
    baseline = pd.DataFrame({"split": BASELINE_SPLIT, **{c: answers[c].to_numpy() for c in PREDICTION_COLUMNS}})
    return pd.concat([reference, baseline], ignore_index=True)


def prediction_reference(settings: Settings, reference: pd.DataFrame, params: DriftParams, model_version: str,
                         window: Window) -> PredictionReference:
    """The reference whose answers the window's are compared with (see the module docstring)."""
    validation = {"source": "validation", "split": params.prediction_split}
    if params.prediction_reference == "validation":
        return PredictionReference(reference, validation)
    start = deployed_at(settings, model_version)
    if isinstance(start, str):
        why = start
    elif (end := start + timedelta(days=params.baseline_days)) > window.until:
        why = (f"the production baseline of {model_version} (its first {params.baseline_days} days from "
               f"{start.isoformat(timespec='seconds')}) is not over by the window's end")
    else:
        answers = baseline_answers(settings, params, model_version, start, end)
        if len(answers) >= params.min_current:
            info = {"source": "production", "model_version": model_version, "n": len(answers),
                    "since": start.isoformat(timespec="seconds"), "until": end.isoformat(timespec="seconds")}
            answers_from = end if end > window.since else None
            if answers_from:
                info["window_answers_from"] = info["until"]
            log.info("answers compared with the production baseline of %s: %d records, %s .. %s", model_version,
                     len(answers), info["since"], info["until"])
            return PredictionReference(with_baseline(reference, answers), info, answers_from)
        why = (f"the production baseline of {model_version} holds {len(answers)} answers, fewer than "
               f"drift.min_current ({params.min_current})")
    log.info("answers compared with the %s split: %s", params.prediction_split, why)
    return PredictionReference(reference, {**validation, "why": why})
