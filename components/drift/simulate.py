"""Production-log records made from images, field for field as the service writes them, and camera changes.

For the drift benchmark, the tests and demos: they need a production log without running the service.
The record layout follows `components.serving.service.DefectClassifier._record`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from components.data.images import DecodedImage
from components.drift.reference import model_version_of
from components.serving.predlog import append_line, compact_embedding, day_file


def lighting_change(rgb: np.ndarray, gain: float = 1.0, offset: float = 0.0, contrast: float = 1.0) -> np.ndarray:
    """The image under other lighting: contrast scaled about its mean, then brightness * gain + offset."""
    pixels = rgb.astype(np.float32)
    mean = float(pixels.mean())
    pixels = ((pixels - mean) * contrast + mean) * gain + offset
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def focus_loss(rgb: np.ndarray, sigma: float = 1.5) -> np.ndarray:
    """The image out of focus: a Gaussian blur of `sigma` pixels."""
    import cv2

    return cv2.GaussianBlur(rgb, (0, 0), sigma)


def sensor_noise(rgb: np.ndarray, std: float = 8.0, seed: int | None = None) -> np.ndarray:
    """The image with Gaussian sensor noise of `std` grey levels (the same on every channel).

    The noise is seeded by the image's pixel sum unless `seed` is given: repeatable, and not one pattern for all.
    """
    rng = np.random.default_rng(int(rgb.sum(dtype=np.int64)) if seed is None else seed)
    noise = rng.normal(0.0, std, rgb.shape[:2])[:, :, None]
    return np.clip(np.rint(rgb.astype(np.float32) + noise), 0, 255).astype(np.uint8)


def image_facts(rgb: np.ndarray) -> dict[str, Any]:
    """The image facts the service logs for a decoded RGB image."""
    return DecodedImage(rgb, width=int(rgb.shape[1]), height=int(rgb.shape[0]), mode="RGB", channels=3).facts()


def log_records(predictor: Any, images: Sequence[np.ndarray], stamps: Sequence[datetime],
                metadata: dict[str, str] | None = None, batch_size: int = 32) -> list[dict[str, Any]]:
    """One production-log record per RGB image, predicted by `predictor`, stamped with `stamps` (UTC)."""
    import torch

    if len(images) != len(stamps):
        raise ValueError(f"{len(images)} images but {len(stamps)} timestamps; give one timestamp per image")
    records: list[dict[str, Any]] = []
    version = model_version_of(predictor)
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        began = time.perf_counter()
        predictions = predictor.predict_tensors(torch.stack([predictor.prepare(rgb) for rgb in chunk]),
                                                with_embedding=True)
        latency_ms = round((time.perf_counter() - began) * 1000 / len(chunk), 2)
        for rgb, prediction, stamp in zip(chunk, predictions, stamps[start:start + batch_size], strict=True):
            records.append({
                "timestamp": stamp.isoformat(timespec="milliseconds"), "request_id": uuid.uuid4().hex,
                "endpoint": "predict", "model_version": version, "fast_path": "fp32",
                "defect_type": prediction.defect_type, "confidence": prediction.confidence,
                "decision": prediction.decision, "threshold": predictor.threshold,
                "probabilities": prediction.probabilities, "latency_ms": latency_ms, **image_facts(rgb),
                "embedding": [round(float(v), 5) for v in compact_embedding(prediction.embedding)],
                "metadata": dict(metadata or {"line": "line-1", "camera": "cam-1"}),
            })
    return records


def restamp(records: Sequence[dict[str, Any]], stamps: Sequence[datetime]) -> list[dict[str, Any]]:
    """Copies of records with new timestamps and request ids (to reuse one set of predictions in many windows)."""
    return [{**record, "timestamp": stamp.isoformat(timespec="milliseconds"), "request_id": uuid.uuid4().hex}
            for record, stamp in zip(records, stamps, strict=True)]


def write_log(folder: Path, records: Sequence[dict[str, Any]]) -> list[Path]:
    """Append records to the production log's day files, as the service's writer does; returns the files."""
    files: list[Path] = []
    for record in records:
        path = day_file(folder, datetime.fromisoformat(record["timestamp"]))
        append_line(path, record)
        if path not in files:
            files.append(path)
    return files
