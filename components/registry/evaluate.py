"""`defectops evaluate`: any model (registered or a model.pt) on any labelled folder, without importing it."""

from __future__ import annotations

import logging
from typing import Any

from components.config import Params, Settings
from components.errors import UsageError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test", "all")


def evaluate_model(settings: Settings, params: Params, model: str, data: str | None = None,
                   split: str | None = None) -> dict[str, Any]:
    """Figures of `model` on a folder/archive (all images by default) or on the tracked dataset (test split)."""
    from components.data.sources import open_source
    from components.data.tracked import manifest_of, tracked_data, usable_rows
    from components.evaluation.runner import evaluate_params, evaluate_rows
    from components.registry.registry import load_predictor

    split = split or ("all" if data else "test")
    if split not in SPLITS:
        raise UsageError(f"--split {split!r} is not one of {', '.join(SPLITS)}")
    settings.ensure()
    predictor = load_predictor(settings, model, max_pixels=params.data.max_image_pixels)
    eval_params = evaluate_params(params)
    if data is None:
        tracked = tracked_data(settings, params)
        manifest, what = tracked.manifest, f"tracked dataset {tracked.version}"
        rows = manifest if split == "all" else manifest[manifest["split"] == split]
        report = evaluate_rows(predictor, usable_rows(rows, f"the {split} split of the {what}"), eval_params,
                               predictor.model_version)
        tracked.still_there(settings)
    else:
        with open_source(data, settings.staging_dir) as root:
            manifest = manifest_of(root, settings, params)
            rows = manifest if split == "all" else manifest[manifest["split"] == split]
            report = evaluate_rows(predictor, usable_rows(rows, f"{data} ({split})", refuse_unreadable=True),
                                   eval_params,
                                   predictor.model_version)
        what = str(data)
    report.update({"data": what, "split": split, "model": model, "model_uri": predictor.meta.get("model_uri"),
                   "model_classes": predictor.classes})
    return report

