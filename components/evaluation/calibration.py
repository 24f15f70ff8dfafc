"""Calibration: temperature-scaled softmax, fitting the temperature on validation, expected calibration error."""

from __future__ import annotations

import logging

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax
from scipy.special import softmax as _softmax

from components.errors import UsageError
from components.evaluation.decision import check_labels, check_probs

log = logging.getLogger(__name__)

MIN_TEMPERATURE = 0.05
MAX_TEMPERATURE = 20.0


def _check_logits(logits: np.ndarray) -> np.ndarray:
    array = np.asarray(logits, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] < 2:
        raise UsageError(f"logits must be a 2-D (images, classes) array with 2+ classes, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise UsageError("logits contain NaN or infinity; check the model outputs")
    return array


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Class probabilities (N, C) from logits divided by `temperature`."""
    if not temperature > 0:
        raise UsageError(f"temperature must be positive, got {temperature}")
    return _softmax(_check_logits(logits) / temperature, axis=1)


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the labels under softmax(logits / temperature)."""
    array = _check_logits(logits)
    targets = check_labels(labels, array.shape[0], array.shape[1])
    return float(-log_softmax(array / temperature, axis=1)[np.arange(array.shape[0]), targets].mean())


def fit_temperature(logits_val: np.ndarray, labels_val: np.ndarray) -> float:
    """The temperature minimising validation NLL, clamped to [MIN_TEMPERATURE, MAX_TEMPERATURE]; 1 when every
    validation image is right (no optimum: the NLL falls without end as the temperature falls)."""
    logits = _check_logits(logits_val)
    labels = check_labels(labels_val, logits.shape[0], logits.shape[1])
    if logits.shape[0] == 0:
        raise UsageError("cannot fit a temperature on an empty validation set")
    rows = np.arange(logits.shape[0])
    if np.array_equal(logits.argmax(axis=1), labels):
        log.warning("every one of the %d validation images is classified correctly: the validation NLL keeps falling "
                    "as the temperature falls, so it has no optimum and would sharpen every confidence to 1.0; "
                    "kept temperature 1 (the model's own probabilities). A larger or harder validation split "
                    "calibrates", logits.shape[0])
        return 1.0

    def nll(log_t: float) -> float:
        return float(-log_softmax(logits / np.exp(log_t), axis=1)[rows, labels].mean())

    bounds = (np.log(MIN_TEMPERATURE), np.log(MAX_TEMPERATURE))
    found = minimize_scalar(nll, bounds=bounds, method="bounded", options={"xatol": 1e-5})
    temperature = float(np.clip(np.exp(found.x), MIN_TEMPERATURE, MAX_TEMPERATURE))
    if not found.success or np.isclose(temperature, [MIN_TEMPERATURE, MAX_TEMPERATURE], rtol=1e-3).any():
        log.warning("temperature %.4g is at the edge of [%g, %g]: the validation set may be too small or "
                    "degenerate (all correct with huge margins)", temperature, MIN_TEMPERATURE, MAX_TEMPERATURE)
    log.info("temperature %.4f: validation NLL %.4f -> %.4f", temperature, nll(0.0), nll(np.log(temperature)))
    return temperature


def reliability_bins(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Per equal-width confidence bin: edges, image count, mean top-1 confidence and accuracy (NaN if empty)."""
    array = check_probs(probs)
    targets = check_labels(labels, array.shape[0], array.shape[1])
    if n_bins < 1:
        raise UsageError(f"n_bins must be at least 1, got {n_bins}")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    confidence = array.max(axis=1)
    hit = (array.argmax(axis=1) == targets).astype(np.float64)
    index = np.digitize(confidence, edges[1:-1], right=True)  # bin b holds (edges[b], edges[b+1]]
    count = np.bincount(index, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(index, weights=confidence, minlength=n_bins) / count
        accuracy = np.bincount(index, weights=hit, minlength=n_bins) / count
    return {"edges": edges, "count": count, "confidence": mean_confidence, "accuracy": accuracy}


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float | None:
    """Top-1 ECE: image-weighted mean |accuracy - confidence| over equal-width bins (None when no images)."""
    bins = reliability_bins(probs, labels, n_bins)
    total = bins["count"].sum()
    if total == 0:
        return None
    filled = bins["count"] > 0
    gaps = np.abs(bins["accuracy"][filled] - bins["confidence"][filled])
    return float((gaps * bins["count"][filled]).sum() / total)
