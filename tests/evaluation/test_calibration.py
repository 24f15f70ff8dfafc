"""Temperature scaling and expected calibration error."""

from __future__ import annotations

import numpy as np
import pytest

from components.errors import UsageError
from components.evaluation.calibration import (
    MAX_TEMPERATURE,
    MIN_TEMPERATURE,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    softmax,
)


def _overconfident(temperature: float, n: int = 4000, n_classes: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Logits `temperature` times sharper than the calibrated ones the labels were drawn from."""
    rng = np.random.default_rng(0)
    calibrated = rng.normal(scale=2.0, size=(n, n_classes))
    probs = softmax(calibrated)
    labels = (rng.random((n, 1)) > probs.cumsum(axis=1)).sum(axis=1)
    return calibrated * temperature, labels


def test_softmax_rows_sum_to_one_and_temperature_flattens() -> None:
    logits = np.array([[2.0, 0.0, -1.0]])
    sharp, flat = softmax(logits), softmax(logits, temperature=4.0)
    assert sharp.sum() == pytest.approx(1.0)
    assert flat.max() < sharp.max()
    with pytest.raises(UsageError):
        softmax(logits, temperature=0.0)


def test_fit_temperature_recovers_known_temperature_and_lowers_ece() -> None:
    logits, labels = _overconfident(3.0)
    temperature = fit_temperature(logits, labels)
    assert temperature == pytest.approx(3.0, rel=0.1)
    assert negative_log_likelihood(logits, labels, temperature) < negative_log_likelihood(logits, labels)
    before = expected_calibration_error(softmax(logits), labels)
    after = expected_calibration_error(softmax(logits, temperature), labels)
    assert after < before / 2


def test_fit_temperature_stays_in_range() -> None:
    nearly = np.array([[5.0, 0.0], [0.0, 5.0]] * 10 + [[0.5, 0.0]])  # one wrong, with a small margin
    assert MIN_TEMPERATURE <= fit_temperature(nearly, np.array([0, 1] * 10 + [1])) < 1.0  # sharpens, clamped
    rng = np.random.default_rng(0)
    noise = rng.normal(scale=10.0, size=(200, 3))  # labels unrelated to the logits: flatten all the way
    assert fit_temperature(noise, rng.integers(0, 3, 200)) == pytest.approx(MAX_TEMPERATURE, rel=1e-3)


def test_a_validation_set_without_a_mistake_keeps_the_models_own_probabilities(caplog) -> None:
    """All right, with margins: the NLL falls without end as T falls; the bounded search used to stop anywhere
    near 0.05-0.12 and turn every confidence into 1.0 (the review rule then never reviews anything)."""
    separable = np.array([[5.0, 0.0], [0.0, 5.0]] * 10)
    with caplog.at_level("WARNING"):
        assert fit_temperature(separable, np.array([0, 1] * 10)) == 1.0
    assert "has no optimum" in caplog.text


def test_fit_temperature_accepts_plain_lists() -> None:
    assert fit_temperature([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], [0, 1, 1]) > 0


def test_ece_by_hand() -> None:
    # two images at confidence 0.9 (one right), one at 0.6 (right): |0.5-0.9|*2/3 + |1-0.6|*1/3
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6]])
    labels = np.array([0, 1, 1])
    assert expected_calibration_error(probs, labels, n_bins=10) == pytest.approx(0.4)
    perfect = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(perfect, np.array([0, 1])) == pytest.approx(0.0)
