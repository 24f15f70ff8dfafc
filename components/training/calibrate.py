"""The train stage's last step: fit temperature and review threshold on validation, store them in model.pt."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from components.config import Params, Settings

log = logging.getLogger(__name__)


def store_calibration(model_path: Path, calibration: dict[str, Any], fingerprint: str | None = None) -> None:
    """Rewrite model.pt with its calibration (and training fingerprint), atomically."""
    from components.training.loop import atomic_save

    blob = torch.load(model_path, map_location="cpu", weights_only=True)
    blob["calibration"] = calibration
    if fingerprint:
        blob["training_fingerprint"] = fingerprint
    atomic_save(blob, model_path)


def training_fingerprint(settings: Settings, params: Params, profile: str | None) -> str:
    """What makes a training run the same run: the exact images and splits, the profile, augmentation, seed and
    review-rule targets. The monthly flow skips training when a registered version already has it."""
    import hashlib

    from components.data.tracked import tracked_manifest
    from components.evaluation.runner import evaluate_params
    from components.training.params import augment_params, train_params
    from components.training.train import choose_profile, manifest_digest

    name, prof = choose_profile(train_params(params), profile)
    ev = evaluate_params(params)
    payload = {"data": manifest_digest(tracked_manifest(settings, params)), "profile": name,
               "train": prof.model_dump(mode="json", exclude={"num_workers", "threads"}),
               "augment": augment_params(params).model_dump(mode="json"), "seed": params.base.seed,
               "review_rule": [ev.target_auto_precision, ev.max_review_rate]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


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
    store_calibration(result.model_path, calibration, training_fingerprint(settings, params, profile))
    (out_dir / "calibration.json").write_text(json.dumps(calibration, indent=2) + "\n")
    return {"model_path": result.model_path, "calibration": calibration, **result.metrics}
