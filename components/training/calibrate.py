"""The train stage's last step: fit temperature and review threshold on validation, store them in model.pt."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from components.config import Params, Settings

log = logging.getLogger(__name__)


def store_calibration(model_path: Path, calibration: dict[str, Any]) -> None:
    """Rewrite model.pt with its calibration, atomically."""
    from components.training.loop import atomic_save

    blob = torch.load(model_path, map_location="cpu", weights_only=True)
    blob["calibration"] = calibration
    atomic_save(blob, model_path)


def train_and_calibrate(settings: Settings, params: Params, profile: str | None, resume: bool,
                        out_dir: Path) -> dict[str, Any]:
    """`defectops train`: train, then calibrate on the val split; model.pt carries temperature and threshold."""
    from components.data.tracked import tracked_manifest
    from components.evaluation.runner import calibrate, evaluate_params
    from components.predictor import Predictor
    from components.training.train import run_training

    result = run_training(settings, params, profile=profile, resume=resume, out_dir=out_dir)
    manifest = tracked_manifest(settings, params)
    predictor = Predictor.from_file(result.model_path, device="cpu")
    calibration = calibrate(predictor, manifest[manifest["split"] == "val"], evaluate_params(params))
    store_calibration(result.model_path, calibration)
    (out_dir / "calibration.json").write_text(json.dumps(calibration, indent=2) + "\n")
    return {"model_path": result.model_path, "calibration": calibration, **result.metrics}
