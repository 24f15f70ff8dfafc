"""The one predictor: image in (bytes, path, PIL, array), calibrated class probabilities and a decision out.

Evaluation, the behavioural tests and the BentoML service all call it, so the image conversion rule
(components.data.images.decode), the eval transform (components.training.transforms.preprocess), the
temperature and the review threshold stored with the model are applied in exactly one place.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from components.data.images import DEFAULT_MAX_PIXELS, decode
from components.evaluation.decision import decide

log = logging.getLogger(__name__)

ImageInput = bytes | Path | Image.Image | np.ndarray


@dataclass(frozen=True)
class Prediction:
    """One image's answer, in the terms the line uses."""

    defect_type: str
    confidence: float
    probabilities: dict[str, float]
    decision: str  # accept | reject | review
    embedding: list[float] | None = None

    def as_dict(self) -> dict[str, Any]:
        out = {"defect_type": self.defect_type, "confidence": self.confidence,
               "probabilities": self.probabilities, "decision": self.decision}
        return out


class Predictor:
    """A loaded model with its calibration (temperature) and review threshold."""

    streams = 1  # forward passes that may run at once, each on its own share of the cores (`forward(stream=)`)

    def __init__(self, model: Any, meta: dict[str, Any], device: str | None = None, precision: str = "fp32",
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        import torch

        from components.training.transforms import model_input

        self.meta = meta
        self.classes: list[str] = list(meta["classes"])
        self.normal_class: str = meta["normal_class"]
        self.image_size, self.normalization, self.fit = model_input(meta)
        calibration = meta.get("calibration") or {}
        self.temperature = float(calibration.get("temperature", 1.0))
        self.threshold = float(calibration.get("threshold", 0.5))
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.precision = precision
        self.max_pixels = max_pixels
        self.model = model.eval().to(self.device, memory_format=torch.channels_last)

    @classmethod
    def from_file(cls, path: Path | str, **kwargs: Any) -> Predictor:
        """A predictor for a model.pt written by `defectops train`."""
        from components.training.train import load_model_file

        model, meta = load_model_file(path)
        return cls(model, meta, **kwargs)

    def prepare(self, image: ImageInput) -> Any:
        """The model's input tensor for one image; bad input raises ImageError."""
        from components.training.transforms import preprocess

        pixels = image if isinstance(image, np.ndarray) else decode(image, self.max_pixels).pixels
        return preprocess(pixels, self.image_size, self.normalization, self.fit)  # the model file's own transform

    def forward(self, batch: Any, stream: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Raw logits and embeddings of a prepared (N, 3, S, S) batch (one stream here: `stream` is ignored)."""
        import torch

        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        batch = batch.to(self.device, memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            logits, embedding = self.model.forward_with_embedding(batch)
        return logits.float().cpu().numpy(), embedding.float().cpu().numpy()

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Temperature-scaled softmax."""
        from components.evaluation.calibration import softmax

        return softmax(logits, self.temperature)

    def predict_tensors(self, batch: Any, with_embedding: bool = False, stream: int | None = None) -> list[Prediction]:
        logits, embedding = self.forward(batch, stream)
        probs = self.probabilities(logits)
        decisions = decide(probs, self.classes, self.normal_class, self.threshold)
        top = probs.argmax(axis=1)
        return [Prediction(self.classes[k], float(p[k]), {c: float(v) for c, v in zip(self.classes, p, strict=True)},
                           str(d), embedding[i].tolist() if with_embedding else None)
                for i, (k, p, d) in enumerate(zip(top, probs, decisions, strict=True))]

    def predict(self, images: Sequence[ImageInput], with_embedding: bool = False) -> list[Prediction]:
        """Predictions for a batch of images (any mix of bytes, paths, PIL images, RGB arrays)."""
        import torch

        if not images:
            return []
        return self.predict_tensors(torch.stack([self.prepare(i) for i in images]), with_embedding)
