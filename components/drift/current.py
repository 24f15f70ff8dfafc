"""The current data: one window of the production log as a frame with the reference's columns."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from components.drift.reference import embedding_columns
from components.drift.window import Window
from components.serving.predlog import COMPACT_DIMS, read_log

log = logging.getLogger(__name__)

NUMERIC_FIELDS = ("brightness", "contrast", "sharpness", "width", "height", "confidence", "latency_ms", "threshold")
TEXT_FIELDS = ("request_id", "model_version", "decision")


@dataclass(frozen=True)
class Current:
    """The production records of a window and what reading them cost."""

    frame: pd.DataFrame
    skipped_lines: int
    log_files: int
    window: Window

    @property
    def n(self) -> int:
        return len(self.frame)


def _embedding(value: Any) -> list[float]:
    if isinstance(value, list | tuple) and len(value) == COMPACT_DIMS:
        try:
            return [float(v) for v in value]
        except (TypeError, ValueError):
            pass
    return [np.nan] * COMPACT_DIMS


def _text(value: Any) -> str | None:
    """A log field meant as text; anything else (a list, a dict, a number) counts as missing."""
    return value if isinstance(value, str) else None


def _label(value: Any) -> str | None:
    """A line or camera name: text or a number (camera 3), as text; anything else counts as missing."""
    return str(value) if isinstance(value, str | int | float) and not isinstance(value, bool) else None


def _metadata(record: dict[str, Any]) -> dict[str, Any]:
    metadata = record.get("metadata")
    return metadata if isinstance(metadata, dict) else {}


def current_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """Production-log records as a frame: timestamp (UTC), predicted_class, image statistics, emb_* columns."""
    columns = ["timestamp", "predicted_class", *TEXT_FIELDS, *NUMERIC_FIELDS, "line", "camera", *embedding_columns()]
    if not records:
        return pd.DataFrame(columns=columns)
    frame = pd.DataFrame({
        "timestamp": pd.to_datetime([r.get("timestamp") for r in records], utc=True, errors="coerce", format="ISO8601"),
        "predicted_class": pd.Series([_text(r.get("defect_type")) for r in records], dtype="object"),
        **{name: pd.Series([_text(r.get(name)) for r in records], dtype="object") for name in TEXT_FIELDS},
        **{name: pd.to_numeric(pd.Series([r.get(name) for r in records], dtype="object"), errors="coerce")
           .astype("float64") for name in NUMERIC_FIELDS},
        **{name: pd.Series([_label(_metadata(r).get(name)) for r in records], dtype="object")
           for name in ("line", "camera")},
    })
    embeddings = pd.DataFrame([_embedding(r.get("embedding")) for r in records], columns=embedding_columns())
    return pd.concat([frame, embeddings], axis=1)[columns]


def read_current(folder: Path, window: Window) -> Current:
    """The production log's records in the window; torn or invalid lines are skipped and counted."""
    read = read_log(folder, window.since, window.until)
    frame = current_frame(read.records)
    log.info("production log %s: %d records in %s from %d files (%d lines skipped)", folder, len(frame),
             window.label, len(read.files), read.skipped)
    return Current(frame, read.skipped, len(read.files), window)
