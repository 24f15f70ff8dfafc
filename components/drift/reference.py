"""The drift reference: the training data's image statistics plus the model's answers on held-out images.

Image statistics (width, height, brightness, contrast, sharpness) come from the tracked dataset's manifest,
rows of `drift.reference_splits` (train + val): the manifest computes them with
`components.data.images.image_stats`, as the service does for every production image. The model's predicted
class, confidence and compact embedding (`components.serving.predlog.compact_embedding`, the production log's
own projection) are added for the `drift.prediction_split` rows (val) only: the model has not trained on them,
so their confidence and embeddings look like production's; train rows leave those columns empty. Each row
keeps its capture group, for the embedding check's capture-group null (`components.drift.detect.group_null`).

Building it runs the model, so it is cached per (dataset version, model version) as Parquet under
`<reports>/drift/reference/`; the daily check then only reads it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from components.config import Params, Settings
from components.drift.params import IMAGE_COLUMNS, DriftParams
from components.errors import UsageError
from components.files import replacing, write_text_atomic
from components.serving.predlog import COMPACT_DIMS, compact_embedding

log = logging.getLogger(__name__)

REFERENCE_FORMAT = 2  # bump when the reference's columns or their meaning change
BASELINE_SPLIT = "production"  # the `split` of a production baseline's rows (components/drift/baseline.py)
EMBEDDING_PREFIX = "emb_"


def embedding_columns(dims: int = COMPACT_DIMS) -> list[str]:
    """Column names of the compact embedding in reference and current frames."""
    return [f"{EMBEDDING_PREFIX}{k}" for k in range(dims)]


def model_version_of(predictor: Any) -> str:
    """The label the service writes as `model_version` (defect-classifier/N or file:<path>)."""
    return str(getattr(predictor, "model_version", None) or predictor.meta.get("model_version") or "unknown")


@dataclass(frozen=True)
class Reference:
    """The reference frame and where it came from."""

    frame: pd.DataFrame
    dataset_version: str
    model_version: str
    path: Path | None
    cached: bool
    note: str | None = None  # why it is not of the dataset version the model was trained on

    @property
    def n_images(self) -> int:
        return len(self.frame)

    @property
    def n_predictions(self) -> int:
        return int(self.frame["predicted_class"].notna().sum())

    def embeddings(self) -> pd.DataFrame:
        """The compact embeddings of the rows the model predicted."""
        rows = self.frame[self.frame["predicted_class"].notna()]
        return rows[embedding_columns()].astype("float64").reset_index(drop=True)


def predict_files(predictor: Any, files: list[str], batch_size: int) -> pd.DataFrame:
    """Predicted class, confidence and compact embedding of image files, as the service logs them."""
    from components.evaluation.runner import infer

    logits, embeddings, _ = infer(predictor, files, batch_size)
    probs = predictor.probabilities(logits)
    top = probs.argmax(axis=1)
    compact = compact_embedding(embeddings)
    frame = pd.DataFrame({"predicted_class": [predictor.classes[k] for k in top],
                          "confidence": probs[np.arange(len(top)), top].astype("float64")})
    return pd.concat([frame, pd.DataFrame(compact.astype("float64"), columns=embedding_columns(compact.shape[1]))],
                     axis=1)


def build_reference(manifest: pd.DataFrame, predictor: Any, params: DriftParams) -> pd.DataFrame:
    """Reference frame from a manifest (split, image statistics, file) and a model."""
    rows = manifest[manifest["split"].isin(params.reference_splits)]
    if "readable" in rows:
        rows = rows[rows["readable"] == True]  # a column of bools and None
    if rows.empty:
        raise UsageError(f"the dataset has no readable images in splits {params.reference_splits}; import data "
                         "first or fix drift.reference_splits")
    frame = rows[["path", "split", *(["group"] if "group" in rows else []), *IMAGE_COLUMNS]].reset_index(drop=True)
    frame[list(IMAGE_COLUMNS)] = frame[list(IMAGE_COLUMNS)].astype("float64")
    held_out = frame.index[frame["split"] == params.prediction_split]
    if len(held_out) == 0:
        raise UsageError(f"the dataset has no {params.prediction_split} images for the model to predict; "
                         "fix drift.prediction_split")
    files = rows["file"].iloc[held_out].astype(str).tolist()
    log.info("drift reference: %d images' statistics, predicting %d %s images with %s", len(frame), len(files),
             params.prediction_split, model_version_of(predictor))
    predicted = predict_files(predictor, files, params.batch_size)
    predicted.index = held_out
    frame = frame.join(predicted)
    frame["predicted_class"] = frame["predicted_class"].astype("object")
    return frame


def file_slug(text: str) -> str:
    """Text as a short file-name part: runs of other characters become one dash."""
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:40] or "model"


def _model_identity(predictor: Any) -> str:
    """The model version, plus size and mtime for a model file (a path can be overwritten by a new model)."""
    version = model_version_of(predictor)
    if version.startswith("file:"):
        path = Path(version.removeprefix("file:"))
        if path.is_file():
            stat = path.stat()
            return f"{version}|{stat.st_size}|{stat.st_mtime_ns}"
    return version


def reference_path(settings: Settings, dataset_version: str, predictor: Any, params: DriftParams) -> Path:
    """Where the reference for this dataset version, model and reference params is cached."""
    identity = json.dumps([REFERENCE_FORMAT, dataset_version, _model_identity(predictor), params.reference_splits,
                           params.prediction_split, COMPACT_DIMS])
    digest = hashlib.sha256(identity.encode()).hexdigest()[:10]
    name = f"{dataset_version.removesuffix('.dir')[:12]}-{file_slug(model_version_of(predictor))}-{digest}"
    return settings.reports_dir / "drift" / "reference" / f"{name}.parquet"


def _manifest_digest(manifest: pd.DataFrame) -> str:
    column = manifest["sha256"] if "sha256" in manifest else manifest["path"]
    text = "\n".join(sorted(f"{p}:{s}" for p, s in zip(manifest["path"], column, strict=True)))
    return "untracked-" + hashlib.sha256(text.encode()).hexdigest()[:12]


def _trained_on(predictor: Any) -> str | None:
    return (getattr(predictor, "meta", None) or {}).get("dataset_version")


def _rows_the_model_knew(settings: Settings, tracked: Any, predictor: Any) -> tuple[pd.DataFrame, str, str | None]:
    """The tracked rows of the dataset version the model was trained on, that version, and None; or, when they
    cannot be picked out, the tracked version's rows, that version and a note saying so. After a monthly import
    the tracked version also holds last month's production images, which would hide their drift."""
    from components.data.tracked import version_images
    from components.training.train import training_digest

    manifest, version, trained_on = tracked.manifest, tracked.version, _trained_on(predictor)
    if not trained_on or trained_on == version:
        return manifest, version, None
    held = version_images(settings, trained_on)
    if held is None:
        why = "no commit of this clone records that version (nor of its remote's history, where fetched)"
    else:
        rows = manifest[manifest["path"].isin(held)].reset_index(drop=True)
        recorded = predictor.meta.get("manifest_digest")
        if recorded is None or training_digest(rows) == recorded:
            log.info("drift reference: the %d images of dataset version %s, which %s was trained on (data/ holds "
                     "%s)", len(rows), trained_on, model_version_of(predictor), version)
            return rows, trained_on, None
        why = "its images here are not the ones it was trained on"
    note = (f"the model was trained on dataset version {trained_on}, but {why}: the reference is the tracked "
            f"version {version}, which may hold images the model never saw")
    log.warning("drift reference: %s", note)
    return manifest, version, note


def load_reference(settings: Settings, params: Params, predictor: Any, drift: DriftParams,
                   rebuild: bool = False) -> Reference:
    """The cached reference for the dataset version the model was trained on (else the tracked one) and this
    model, built (and cached) when missing."""
    from components.data.tracked import dataset_version, tracked_data, tracked_manifest

    version = dataset_version(settings.project_root)
    manifest = None
    if version is None:  # an untracked data/ folder: key the cache by its content
        manifest = tracked_manifest(settings, params)
        version = _manifest_digest(manifest)
    else:
        version = _trained_on(predictor) or version
    path = reference_path(settings, version, predictor, drift)
    model_version = model_version_of(predictor)
    if path.is_file() and not rebuild:
        try:
            frame = pd.read_parquet(path)
            log.info("drift reference from cache %s (%d images)", path, len(frame))
            return Reference(frame, version, model_version, path, cached=True)
        except (OSError, ValueError) as exc:  # a torn or foreign file: build it again
            log.warning("drift reference %s unreadable (%s); building it again", path, exc)
    tracked, note = None, None
    if manifest is None:
        tracked = tracked_data(settings, params)  # the version it is: an import may have committed since
        manifest, version, note = _rows_the_model_knew(settings, tracked, predictor)
        path = reference_path(settings, version, predictor, drift)
    frame = build_reference(manifest, predictor, drift)
    if tracked is not None:
        tracked.still_there(settings)  # before the cache keeps what the pictures gave
    if note is None:  # a stand-in is built again next time: a later commit may name the model's version
        with replacing(path) as tmp:
            frame.to_parquet(tmp, index=False)
        write_text_atomic(path.with_suffix(".json"), json.dumps({
            "dataset_version": version, "model_version": model_version, "created_at": datetime.now(UTC).isoformat(),
            "n_images": len(frame), "n_predictions": int(frame["predicted_class"].notna().sum()),
            "reference_splits": drift.reference_splits, "prediction_split": drift.prediction_split}, indent=2))
        log.info("drift reference cached at %s", path)
    return Reference(frame, version, model_version, path if note is None else None, cached=False, note=note)
