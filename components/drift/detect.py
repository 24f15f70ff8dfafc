"""The drift decision: an Evidently data drift report over image statistics and predictions, plus embedding drift.

Rule: **drift = dataset drift OR a column alarm OR embedding drift**, where
- dataset drift is Evidently's own verdict: at least `drift.drift_share` of `drift.columns` drifted (as a count:
  3 of 7 stays 3 when columns are left out, `share_for_count`), each column judged by its Evidently test (fixed
  methods from params, so the verdict does not switch between p-values and distances with the sample size; a
  column the reference holds constant is compared as a category, `constant_columns`);
- a column alarm is one column whose distance reaches `drift.column_alarm_factor` times its threshold: sensor
  noise or focus loss moves sharpness far (6-12 times its threshold) and little else, below the share;
- embedding drift is Evidently's embedding drift method (`drift.embedding.method`) called directly on the compact
  embeddings (the EmbeddingsDrift metric would also run a slow t-SNE for its plot), on a seeded sample of at most
  `drift.embedding.max_current` current embeddings: Evidently's bootstrap draws samples sized by the ratio of the
  two sets, so a month of records against ~160 reference embeddings would otherwise lose almost all its power.
  With `drift.embedding.bootstrap`, the null is by default built over capture groups (`group_null`), not over
  single images as Evidently's own bootstrap does: the reference holds several exposures of each spot, and new
  spots differ from the reference's spots by more than its images differ from each other.
Predictions and embeddings are compared only for production records of the reference's model version (another
model's embeddings live in another space); image statistics use every record. The reference's answers are the
validation split's or, once the model has served its first weeks, those weeks' (`components/drift/baseline.py`);
the embeddings are always val's, of the parts called normal only by default (`drift.embedding.classes`).
Fewer than `drift.min_current` records is "not enough production data": reported, never drift.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from components.drift.params import CATEGORICAL_COLUMNS, PREDICTION_COLUMNS, DriftParams
from components.drift.reference import BASELINE_SPLIT, embedding_columns

log = logging.getLogger(__name__)

RULE = "drift = dataset_drift OR column_alarm OR embedding_drift.drifted"
DISTANCE_METHODS = frozenset({"wasserstein", "jensenshannon", "hellinger", "kl_div", "psi", "ed"})  # score >= threshold
NOT_ENOUGH = "not_enough_data"
MIN_REFERENCE_EMBEDDINGS = 10
MIN_REFERENCE_GROUPS = 4  # fewer hold too little spread between spots to resample
N_BOOTSTRAP = 100  # draws of the null, as Evidently's own bootstrap


@dataclass
class Comparison:
    """The machine-readable result and the Evidently snapshot it came from (None when nothing was compared)."""

    summary: dict[str, Any]
    snapshot: Any = None

    @property
    def drift(self) -> bool:
        return bool(self.summary["drift"])


def _status(value: Any) -> str:
    return str(getattr(value, "value", value)).upper()


def snapshot_summary(snapshot: Any) -> dict[str, Any]:
    """Dataset drift, drift share and per-column verdicts from a DataDriftPreset snapshot run with tests."""
    data = snapshot.dict()
    status = {t["metric_config"]["metric_id"]: _status(t["status"]) for t in data["tests"]}
    columns: dict[str, dict[str, Any]] = {}
    share = count = threshold = None
    dataset_test = None
    for metric in data["metrics"]:
        config = metric["config"]
        if config["type"].endswith("ValueDrift"):
            columns[config["column"]] = {"method": config.get("method"), "threshold": config.get("threshold"),
                                         "score": float(metric["value"]),
                                         "drifted": status.get(metric["id"]) == "FAIL"}
        elif config["type"].endswith("DriftedColumnsCount"):
            share, count = float(metric["value"]["share"]), int(metric["value"]["count"])
            threshold, dataset_test = float(config["drift_share"]), status.get(metric["id"])
    if share is None:
        raise RuntimeError("the Evidently snapshot has no DriftedColumnsCount metric; run it with DataDriftPreset")
    return {"dataset_drift": dataset_test == "FAIL" if dataset_test else share >= threshold,
            "drift_share": share, "drift_share_threshold": threshold, "n_drifted_columns": count,
            "drifted_columns": [c for c, v in columns.items() if v["drifted"]], "columns": columns}


def column_alarms(columns: dict[str, dict[str, Any]], factor: float | None) -> list[str]:
    """Columns whose distance reaches `factor` times their threshold (p-value tests are never alarms)."""
    if factor is None:
        return []
    return [c for c, v in columns.items() if v["method"] in DISTANCE_METHODS and v["threshold"]
            and v["score"] >= factor * float(v["threshold"])]


def embedding_method(params: DriftParams) -> Any:
    """The configured Evidently embedding drift method object."""
    from evidently.metrics.embeddings import (
        DistanceDriftMethod,
        MMDDriftMethod,
        ModelDriftMethod,
        RatioDriftMethod,
    )

    spec = params.embedding
    options: dict[str, Any] = {"pca_components": spec.pca_components}
    if spec.threshold is not None:
        options["threshold"] = spec.threshold
    if spec.method in ("model", "distance", "mmd"):
        options.update(bootstrap=spec.bootstrap, quantile_probability=spec.quantile_probability)
    kind = {"model": ModelDriftMethod, "distance": DistanceDriftMethod, "ratio": RatioDriftMethod,
            "mmd": MMDDriftMethod}[spec.method]
    return kind(**options)


def by_group(params: DriftParams) -> bool:
    """Whether the embedding check's null is built over capture groups (`group_null`)."""
    return params.embedding.bootstrap and params.embedding.bootstrap_unit == "capture_group"


def group_null(method: Any, reference_emb: pd.DataFrame, groups: pd.Series, n_current: int,
               quantile: float, n_draws: int = N_BOOTSTRAP) -> float:
    """The `quantile` of the method's score between two resamples of the reference, drawn by capture group.

    Each draw resamples the reference's capture groups with replacement twice, whole groups at a time: once to
    the reference's size, once to the window's, and scores the method between the two. So the null holds both
    samples' spread between spots, as a window of new parts compared with the reference does. (Evidently's own
    bootstrap resamples single images, and from two parts of the reference only.)
    """
    reference_emb = reference_emb.reset_index(drop=True)
    members = [np.flatnonzero(groups.to_numpy() == g) for g in pd.unique(groups)]
    rng = np.random.default_rng(0)

    def resample(size: int) -> pd.DataFrame:
        picked: list[np.ndarray] = []
        taken = 0
        while taken < size:
            picked.append(members[rng.integers(len(members))])
            taken += len(picked[-1])
        return reference_emb.iloc[np.concatenate(picked)].reset_index(drop=True)

    scores = [float(method(resample(n_current), resample(len(reference_emb)))[0]) for _ in range(n_draws)]
    return float(np.quantile(scores, quantile))


def embedding_drift(reference_emb: pd.DataFrame, current_emb: pd.DataFrame, params: DriftParams,
                    groups: pd.Series) -> dict[str, Any]:
    """Embedding drift by the configured method: {method, score, threshold, drifted}.

    `groups` are the reference rows' capture groups, for the capture-group null of `group_null`.
    """
    spec = params.embedding
    grouped = by_group(params)
    method = embedding_method(params.model_copy(update={"embedding": spec.model_copy(update={"bootstrap": False})})
                              if grouped else params)
    n_window = len(current_emb)
    limit = spec.max_current
    if limit and n_window > limit:
        current_emb = current_emb.sample(limit, random_state=0)
    reference_emb = reference_emb.reset_index(drop=True)
    # the methods add a column to their inputs: give them copies
    score, drifted, name = method(current_emb.reset_index(drop=True).copy(), reference_emb.copy())
    threshold = None if spec.bootstrap else getattr(method, "threshold", None)
    n_groups = None
    if grouped:
        groups = groups.reset_index(drop=True)
        n_groups = int(groups.nunique())
        threshold = group_null(method, reference_emb, groups, len(current_emb), spec.quantile_probability)
        drifted = score > threshold
    return {"method": name, "score": float(score), "threshold": threshold, "bootstrap": spec.bootstrap,
            "bootstrap_unit": spec.bootstrap_unit if spec.bootstrap else None, "n_reference_groups": n_groups,
            "drifted": bool(drifted), "n_reference": len(reference_emb), "n_current": len(current_emb),
            "n_window": n_window}


def _definition(columns: list[str], categorical: set[str]) -> Any:
    from evidently import DataDefinition

    return DataDefinition(numerical_columns=[c for c in columns if c not in categorical],
                          categorical_columns=[c for c in columns if c in categorical])


def constant_columns(reference: pd.DataFrame, columns: list[str]) -> list[str]:
    """Numerical columns holding one value throughout the reference (a fixed-resolution camera's width/height).

    A distance normed by the reference's spread has none to norm by there (Evidently floors it at 0.001): one
    image of another size in a window would score 10x the threshold. These columns are compared as categories
    instead (`drift.cat_method` and `cat_threshold`): a share of other values, so a camera swap still drifts.
    """
    return [c for c in columns if c not in CATEGORICAL_COLUMNS and reference[c].dropna().nunique() == 1]


def share_for_count(params: DriftParams, n_compared: int) -> float:
    """Evidently's drift share for the report's `n_compared` columns that keeps `drift.drift_share` a share of
    `drift.columns`: when columns are left out (a new champion's first days), the number of drifted columns
    needed stays the same (3 of 7 -> 3 of 5), not the share (which would need only 2 of 5)."""
    return min(1.0, params.drift_share * len(params.columns) / n_compared)


def data_drift_report(reference: pd.DataFrame, current: pd.DataFrame, columns: list[str],
                      params: DriftParams) -> Any:
    """Run the Evidently DataDriftPreset (with tests) over these columns; returns the snapshot."""
    from evidently import Dataset, Report
    from evidently.presets import DataDriftPreset

    constant = constant_columns(reference, columns)
    definition = _definition(columns, {*CATEGORICAL_COLUMNS, *constant})
    per_method = {c: m for c, m in params.per_column_method.items() if c in columns}
    per_threshold = {c: t for c, t in params.per_column_threshold.items() if c in columns}
    for column in constant:
        per_method[column], per_threshold[column] = params.cat_method, params.cat_threshold
    preset = DataDriftPreset(columns=columns, num_method=params.num_method, num_threshold=params.num_threshold,
                             cat_method=params.cat_method, cat_threshold=params.cat_threshold,
                             per_column_method=per_method or None, per_column_threshold=per_threshold or None,
                             drift_share=share_for_count(params, len(columns)))
    report = Report([preset], include_tests=True)
    return report.run(current_data=Dataset.from_pandas(current[columns].copy(), data_definition=definition),
                      reference_data=Dataset.from_pandas(reference[columns].copy(), data_definition=definition))


def not_enough_data(n_current: int, params: DriftParams, message: str | None = None, **extra: Any) -> Comparison:
    """The result for a window with too few production records: a warning, not drift."""
    message = message or (f"not enough production data: {n_current} records in the window, at least "
                          f"{params.min_current} needed (drift.min_current); widen the window with --since or "
                          "wait for more predictions")
    log.warning(message)
    return Comparison({"status": NOT_ENOUGH, "drift": False, "message": message, "rule": RULE,
                       "dataset_drift": False, "drift_share": None, "drift_share_threshold": params.drift_share,
                       "n_drifted_columns": 0, "drifted_columns": [], "columns": {}, "column_alarm": [],
                       "column_alarm_factor": params.column_alarm_factor, "embedding_drift": None,
                       "n_reference": None, "n_reference_predictions": None, "n_current": n_current,
                       "columns_skipped": {}, "notes": [], **extra})


def compare(reference: pd.DataFrame, current: pd.DataFrame, params: DriftParams,
            model_version: str | None = None, normal_class: str | None = None) -> Comparison:
    """Compare a production window with the reference; see the module docstring for the rule.

    Rows of a production baseline (split BASELINE_SPLIT) are the only answers the columns are compared with;
    the embedding check always uses the held-out images' (val), of the normal class only when
    `drift.embedding.classes` is `normal` and `normal_class` is given.
    """
    n_current = len(current)
    baseline = (reference["split"] == BASELINE_SPLIT) if "split" in reference \
        else pd.Series(False, index=reference.index)
    embedded = reference.loc[~baseline & reference["predicted_class"].notna()].dropna(subset=embedding_columns())
    if baseline.any():
        reference = reference.copy()
        reference.loc[~baseline, list(PREDICTION_COLUMNS)] = None
    n_images = int((~baseline).sum())
    counts = {"n_reference": n_images, "n_reference_predictions": int(reference["predicted_class"].notna().sum())}
    if n_current < params.min_current:
        return not_enough_data(n_current, params, **counts)
    current = current.copy()
    same_model = (current["model_version"] == model_version) if model_version and "model_version" in current \
        else pd.Series(True, index=current.index)
    notes: list[str] = []
    n_model = int(same_model.sum())
    if n_model < n_current:
        others = sorted(current.loc[~same_model, "model_version"].dropna().astype(str).unique())[:5]
        notes.append(f"{n_current - n_model} records come from other model versions ({', '.join(others)}); "
                     f"predictions and embeddings are compared for {model_version} only")
        current.loc[~same_model, list(PREDICTION_COLUMNS)] = None
        current.loc[~same_model, embedding_columns()] = float("nan")
    columns, skipped = [], {}
    for column in params.columns:
        have = int(current[column].notna().sum()) if column in current else 0
        if column in PREDICTION_COLUMNS and have < params.min_current:
            skipped[column] = f"{have} records of {model_version} (fewer than drift.min_current)"
        elif have < params.min_current:
            skipped[column] = f"{have} records carry it (fewer than drift.min_current)"
        elif int(reference[column].notna().sum()) == 0:
            skipped[column] = "the reference has no values"
        else:
            columns.append(column)
    if skipped:
        notes.append("columns left out: " + "; ".join(f"{c}: {why}" for c, why in skipped.items()))
    if not columns:
        return not_enough_data(n_current, params, "not enough production data: no column of drift.columns has "
                               f"{params.min_current} values in the window's {n_current} records; "
                               "check the log format or drift.columns", **counts, notes=notes)
    snapshot = data_drift_report(reference, current, columns, params)
    summary = snapshot_summary(snapshot)
    ref_rows, cur_rows = embedded, current.loc[same_model]
    normal_only = params.embedding.classes == "normal" and normal_class is not None
    if normal_only:  # like with like: independent of the class mix
        ref_rows = ref_rows[ref_rows["predicted_class"] == normal_class]
        cur_rows = cur_rows[cur_rows["predicted_class"] == normal_class]
    ref_emb = ref_rows[embedding_columns()].astype("float64")
    ref_groups = ref_rows["group"] if "group" in ref_rows else pd.Series(range(len(ref_rows)), index=ref_rows.index)
    cur_emb = cur_rows[embedding_columns()].dropna().astype("float64")
    if not params.embedding.enabled:
        embedding = None
    elif len(cur_emb) < params.min_current or len(ref_emb) < MIN_REFERENCE_EMBEDDINGS:
        embedding = None
        notes.append(f"embedding drift not computed: {len(cur_emb)} current and {len(ref_emb)} reference "
                     "embeddings")
    elif (n_groups := ref_groups.nunique()) < MIN_REFERENCE_GROUPS and by_group(params):
        embedding = None
        notes.append(f"embedding drift not computed: the reference's {len(ref_emb)} embeddings come from "
                     f"{n_groups} capture groups, at least {MIN_REFERENCE_GROUPS} needed for the capture-group null "
                     "(drift.embedding.bootstrap_unit)")
    else:
        embedding = {**embedding_drift(ref_emb, cur_emb, params, ref_groups),
                     "classes": normal_class if normal_only else "all"}
    alarms = column_alarms(summary["columns"], params.column_alarm_factor)
    drift = bool(summary["dataset_drift"] or alarms or (embedding and embedding["drifted"]))
    for note in notes:
        log.warning(note)
    return Comparison({"status": "drift" if drift else "no_drift", "drift": drift, "rule": RULE, **summary,
                       "column_alarm": alarms, "column_alarm_factor": params.column_alarm_factor,
                       "embedding_drift": embedding, **counts, "n_current": n_current,
                       "n_current_model": n_model, "columns_skipped": skipped, "notes": notes}, snapshot)
