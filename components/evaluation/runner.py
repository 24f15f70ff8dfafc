"""Run a model over manifest rows: calibrate on validation, evaluate on the golden test split or any folder."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from components.errors import UsageError
from components.evaluation.calibration import expected_calibration_error, fit_temperature, softmax
from components.evaluation.decision import tune_threshold
from components.evaluation.gate import GateRules
from components.evaluation.metrics import evaluate_predictions

log = logging.getLogger(__name__)


class EvaluateParams(BaseModel):
    """params.yaml `evaluate`: the review rule's target, the intervals, and the champion/challenger gate."""

    model_config = ConfigDict(extra="forbid")
    target_auto_precision: float = Field(0.995, description="tune the threshold for this auto_precision on val")
    max_review_rate: float = Field(0.15, description="...while sending at most this share of parts to review")
    n_boot: int = Field(1000, description="bootstrap resamples (over capture groups) for the 95% intervals")
    batch_size: int = 32
    gate: GateRules = GateRules()


def evaluate_params(raw: Any) -> EvaluateParams:
    """The `evaluate` section of params (a Params object or a plain dict)."""
    section = getattr(raw, "model_extra", None) or {}
    section = section.get("evaluate") if section else (raw.get("evaluate") if isinstance(raw, dict) else None)
    return EvaluateParams.model_validate(section or {})


def label_indices(rows: pd.DataFrame, classes: list[str]) -> np.ndarray:
    """Class indices of the rows' labels; a folder named in another case (`blowhole`) is the model's class."""
    index = {c: i for i, c in enumerate(classes)}
    by_case = {c.casefold(): i for i, c in enumerate(classes)}
    if len(by_case) == len(classes):
        for label in sorted(set(rows["label"]) - set(classes)):
            if label.casefold() in by_case:
                index[label] = by_case[label.casefold()]
                log.info("data class %r read as the model's class %r", label, classes[index[label]])
    unknown = sorted(set(rows["label"]) - set(index))
    if unknown:
        raise UsageError(f"the data has classes {unknown} that the model does not know ({classes}); "
                         "evaluate on data of the model's classes")
    return np.array([index[label] for label in rows["label"]], dtype=np.int64)


def infer(predictor: Any, files: list[str], batch_size: int = 32) -> tuple[np.ndarray, np.ndarray, float]:
    """Logits and embeddings of image files, and the mean model time per image in ms."""
    import torch

    logits, embeddings, model_seconds = [], [], 0.0
    with ThreadPoolExecutor(max_workers=2) as pool:
        for start in range(0, len(files), batch_size):
            chunk = [Path(f) for f in files[start:start + batch_size]]
            batch = torch.stack(list(pool.map(predictor.prepare, chunk)))
            began = time.perf_counter()
            out, emb = predictor.forward(batch)
            model_seconds += time.perf_counter() - began
            logits.append(out)
            embeddings.append(emb)
    if not logits:
        raise UsageError("no images to run the model on")
    return np.concatenate(logits), np.concatenate(embeddings), 1000 * model_seconds / len(files)


def calibrate(predictor: Any, val_rows: pd.DataFrame, params: EvaluateParams) -> dict[str, Any]:
    """Fit the temperature and tune the review threshold on validation; returns what to store with the model."""
    labels = label_indices(val_rows, predictor.classes)
    logits, _, _ = infer(predictor, val_rows["file"].tolist(), params.batch_size)
    before = softmax(logits, 1.0)
    temperature = fit_temperature(logits, labels)
    after = softmax(logits, temperature)
    tuned = tune_threshold(after, labels, predictor.classes, predictor.normal_class,
                           params.target_auto_precision, params.max_review_rate)
    calibration = {
        "temperature": float(temperature), "threshold": float(tuned["threshold"]),
        "target_auto_precision": params.target_auto_precision, "max_review_rate": params.max_review_rate,
        "val_auto_precision": tuned["auto_precision"], "val_review_rate": tuned["review_rate"],
        "target_met": bool(tuned["met"]), "reason": tuned["reason"], "n_val": len(val_rows),
        "val_ece_before": expected_calibration_error(before, labels),
        "val_ece_after": expected_calibration_error(after, labels),
    }
    log.info("calibration on %d val images: T=%.3f, threshold %.4f (auto_precision %s, review %s)",
             len(val_rows), temperature, calibration["threshold"], tuned["auto_precision"], tuned["review_rate"])
    return calibration


def evaluate_rows(predictor: Any, rows: pd.DataFrame, params: EvaluateParams,
                  model_version: str | None = None) -> dict[str, Any]:
    """All figures for the model on these images (calibrated probabilities, the stored threshold)."""
    labels = label_indices(rows, predictor.classes)
    logits, _, latency_ms = infer(predictor, rows["file"].tolist(), params.batch_size)
    probs = predictor.probabilities(logits)
    groups = rows["group"].tolist() if "group" in rows else None
    report = evaluate_predictions(probs, labels, predictor.classes, predictor.normal_class, predictor.threshold,
                                  groups=groups, n_boot=params.n_boot, seed=0)
    report["ece_uncalibrated"] = expected_calibration_error(softmax(logits, 1.0), labels)
    report["temperature"] = predictor.temperature
    stored = predictor.meta.get("calibration") or {}
    if not stored:
        log.warning("%s has no stored calibration: evaluated with temperature 1 and decision threshold 0.5, not "
                    "tuned on validation", model_version or "the model")
    report["review_rule"] = {key: stored.get(key) for key in ("target_auto_precision", "max_review_rate",
                                                               "val_auto_precision", "val_review_rate",
                                                               "target_met", "reason")} if stored else None
    report["latency_ms"] = latency_ms
    report["model_version"] = model_version
    report["image_paths_digest"] = _digest(rows["path"] if "path" in rows else rows["file"])
    return report


def _digest(paths: pd.Series) -> str:
    import hashlib

    return hashlib.sha256("\n".join(sorted(map(str, paths))).encode()).hexdigest()[:16]
