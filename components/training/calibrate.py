"""The train stage's last step: fit temperature and review threshold on validation, store them in model.pt."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from components.config import Params, Settings
from components.files import write_text_atomic

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

CALIBRATION_FILE = "calibration.json"
UNCALIBRATED_FILE = ".model.uncalibrated.pt"  # the trained model until calibration is stored in it


def store_calibration(model_path: Path, calibration: dict[str, Any], fingerprint: str | None = None) -> None:
    """Rewrite model.pt with its calibration (and training fingerprint), atomically."""
    from components.training.loop import atomic_save

    blob = torch.load(model_path, map_location="cpu", weights_only=True)
    blob["calibration"] = calibration
    if fingerprint:
        blob["training_fingerprint"] = fingerprint
    atomic_save(blob, model_path)


def training_fingerprint(settings: Settings, params: Params, profile: str | None,
                         manifest: pd.DataFrame | None = None) -> str:
    """What makes a training run the same run: the exact images and splits (of `manifest`, by default the tracked
    dataset's), the classes and which is normal, the profile, augmentation, seed and review-rule targets. The monthly flow skips training when a
    registered version already has it."""
    import hashlib

    from components.data.tracked import tracked_manifest
    from components.evaluation.runner import evaluate_params
    from components.training.params import augment_params, train_params
    from components.training.train import choose_profile, manifest_digest, training_seed

    name, prof = choose_profile(train_params(params), profile)
    ev = evaluate_params(params)
    manifest = tracked_manifest(settings, params) if manifest is None else manifest
    payload = {"data": manifest_digest(manifest), "profile": name,
               "classes": list(params.profile.classes), "normal_class": params.profile.normal_class,
               "train": prof.model_dump(mode="json", exclude={"num_workers", "threads", "cache_images"}),
               "augment": augment_params(params).model_dump(mode="json"),
               "seed": training_seed(params),
               "review_rule": [ev.target_auto_precision, ev.max_review_rate]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def train_and_calibrate(settings: Settings, params: Params, profile: str | None, resume: bool,
                        out_dir: Path) -> dict[str, Any]:
    """`defectops train`: train, then calibrate on the val split; model.pt carries temperature and threshold.

    model.pt appears only calibrated, in one rename: the earlier model.pt and calibration.json go once the new
    run's metrics are written, and the checkpoint stays until calibration is done, so an interruption at any
    point leaves no model that looks final and `--resume` continues (after the last epoch, it only writes and
    calibrates the model).
    """
    from components.data.tracked import tracked_data, usable_rows
    from components.evaluation.runner import calibrate, evaluate_params
    from components.predictor import Predictor
    from components.training.train import MODEL_FILE, finish_run, run_training

    model_path, calibration_path = out_dir / MODEL_FILE, out_dir / CALIBRATION_FILE
    tracked = tracked_data(settings, params, progress=True)  # one read for training, calibration and fingerprint
    result = run_training(settings, params, profile=profile, resume=resume, out_dir=out_dir,
                          model_file=UNCALIBRATED_FILE, finish=False, tracked=tracked)
    # the new run's metrics are written: an earlier model.pt beside them would look like theirs
    model_path.unlink(missing_ok=True)
    calibration_path.unlink(missing_ok=True)
    manifest = tracked.manifest
    predictor = Predictor.from_file(result.model_path, device="cpu", max_pixels=params.data.max_image_pixels)
    # the rows training validated on (unreadable ones skipped as there), decoded under the same pixel limit
    val_rows = usable_rows(manifest[manifest["split"] == "val"], "the dataset's 'val' split")
    calibration = calibrate(predictor, val_rows, evaluate_params(params))
    tracked.still_there(settings)  # val's pictures were read again just now
    store_calibration(result.model_path, calibration, training_fingerprint(settings, params, profile, manifest))
    write_text_atomic(calibration_path, json.dumps(calibration, indent=2) + "\n")
    os.replace(result.model_path, model_path)
    finish_run(params, result.checkpoint_dir)
    return {"model_path": model_path, "calibration": calibration, **result.metrics}
