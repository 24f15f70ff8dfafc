"""Typed `drift` section of params.yaml: the window, the minimum sample, and the drift tests and thresholds."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from components.config import Params
from components.errors import UsageError

IMAGE_COLUMNS = ("brightness", "contrast", "sharpness", "width", "height")
PREDICTION_COLUMNS = ("predicted_class", "confidence")
NUMERICAL_COLUMNS = ("brightness", "contrast", "sharpness", "width", "height", "confidence")
CATEGORICAL_COLUMNS = ("predicted_class",)
KNOWN_COLUMNS = IMAGE_COLUMNS + PREDICTION_COLUMNS


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EmbeddingDriftParams(_Section):
    """Drift of the compact image embeddings, by one of Evidently's embedding drift methods called directly."""

    method: Literal["model", "distance", "ratio", "mmd"] = Field(
        "model", description="model = ROC AUC of a domain classifier; distance = distance of the mean embeddings")
    threshold: float | None = Field(None, gt=0, description="drift when the score passes it (method's default "
                                    "when null: model 0.55, distance 0.2, ratio 0.2, mmd 0.015)")
    bootstrap: bool = Field(False, description="model/distance/mmd: compare against a bootstrap null instead of "
                            "the fixed threshold")
    bootstrap_unit: Literal["capture_group", "image"] = Field(
        "capture_group", description="capture_group = resample the reference's capture groups whole, so the "
        "null holds the spread between spots; image = Evidently's own bootstrap over single images (with several "
        "exposures of a spot in the reference it takes any new spots for drift)")
    quantile_probability: float = Field(0.95, gt=0, lt=1, description="bootstrap: the null quantile to pass")
    pca_components: int | None = Field(None, ge=1, description="reduce the embeddings first (null = no)")
    max_current: int | None = Field(150, ge=10, description="compare a seeded sample of at most this many "
                                    "current embeddings, so the test's power and its bootstrap null do not "
                                    "change with the window's length (null = all)")
    classes: Literal["normal", "all"] = Field(
        "normal", description="normal = compare the embeddings of images the model called normal only, on both "
        "sides, so the check does not follow the line's class mix (a mostly-normal line against val's ~71%); "
        "all = every answered image")
    enabled: bool = True


class DriftParams(_Section):
    """What the drift check compares, over which window, and when it calls drift."""

    window_days: int = Field(30, ge=1, description="daily check: the last N days of the production log")
    min_current: int = Field(50, ge=1, description="fewer production records in the window: 'not enough "
                             "production data', which is not drift")
    columns: list[str] = Field(list(KNOWN_COLUMNS), description="columns of the Evidently data drift report")
    num_method: str = Field("wasserstein", description="Evidently stat test for numerical columns (fixed, so the "
                            "verdict does not flip between p-values and distances with the sample size)")
    num_threshold: float = Field(0.1, gt=0, description="drift when the normed Wasserstein distance >= this")
    cat_method: str = Field("jensenshannon", description="Evidently stat test for categorical columns")
    cat_threshold: float = Field(0.1, gt=0, description="drift when the Jensen-Shannon distance >= this")
    per_column_method: dict[str, str] = Field({}, description="overrides per column")
    per_column_threshold: dict[str, float] = Field({}, description="overrides per column")
    drift_share: float = Field(0.5, gt=0, le=1, description="dataset drift when at least this share of the "
                               "columns drifted")
    column_alarm_factor: float | None = Field(None, gt=1, description="a column whose drift distance reaches this "
                                              "many times its threshold is drift on its own, whatever the share "
                                              "(a camera's noise or focus moves one column far); distance methods "
                                              "only; null = off")
    embedding: EmbeddingDriftParams = EmbeddingDriftParams()
    reference_splits: list[Literal["train", "val", "test"]] = Field(
        ["train", "val"], description="manifest splits whose image statistics form the reference")
    prediction_split: Literal["train", "val", "test"] = Field(
        "val", description="split the model predicts for the reference (held out from training, so its "
        "confidence and embeddings look like production's)")
    batch_size: int = Field(32, ge=1, description="images per forward pass when building the reference")
    prediction_reference: Literal["production", "validation"] = Field(
        "production", description="what the model's answers (predicted class, confidence) are compared with: "
        "production = its first baseline_days on the line after its deployment, once they are over by the window's "
        "end (until then, and without a deployment record, the validation split); validation = always the "
        "prediction_split, whose class mix is the dataset's, not the line's (embeddings: always val's)")
    baseline_days: int = Field(14, ge=1, description="production: days after the deployment that form the "
                               "model's production baseline")
    baseline_max: int = Field(5000, ge=10, description="production: a seeded sample of at most this many of the "
                              "baseline's answers, so reading and testing against it does not grow with the "
                              "line's rate (it is cached per model and deployment)")

    @model_validator(mode="after")
    def _known_columns(self) -> DriftParams:
        unknown = sorted(set(self.columns) - set(KNOWN_COLUMNS))
        if unknown:
            raise ValueError(f"drift.columns {unknown} unknown; choose from {list(KNOWN_COLUMNS)}")
        if not self.columns:
            raise ValueError("drift.columns is empty; list at least one of " + ", ".join(KNOWN_COLUMNS))
        if self.prediction_split not in self.reference_splits:
            raise ValueError(f"drift.prediction_split {self.prediction_split!r} must be one of "
                             f"drift.reference_splits {self.reference_splits}")
        return self


def drift_params(raw: Params | dict[str, Any] | None) -> DriftParams:
    """The validated `drift` section (defaults where it is missing)."""
    if isinstance(raw, Params):
        value = (raw.model_extra or {}).get("drift")
    elif isinstance(raw, dict):
        value = raw.get("drift")
    else:
        value = None
    try:
        return DriftParams.model_validate(value or {})
    except ValueError as exc:
        lines = str(exc).splitlines()
        detail = " ".join(line.strip() for line in lines[1:3]) or lines[0]
        raise UsageError(f"params.yaml `drift`: {detail}; fix that key (see components/drift/params.py)") from exc
