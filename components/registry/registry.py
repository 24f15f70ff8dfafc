"""The model registry: register a trained model as a candidate, gate it against the champion, approve or reject it.

A registration is one MLflow run (params, tags, per-epoch curves, golden-test figures, plots, the model) plus
one version of `defect-classifier` whose tags carry the figures, the gate outcome and the approval state.
Every figure is measured before the run starts (challenger and champion on the same golden test images),
so a registration either completes, with the `challenger` alias moved last, or leaves nothing behind: its
run ends FAILED and any version it created is deleted.

MLflow keeps no history of aliases, so `approve`, `reject`, `rollback` and each deployment write who/when/why
as version tags and append a line to `<home>/registry-audit.jsonl`. Only `approve` and `rollback`, a person's
commands, ever move `champion`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from components.config import Params, Settings
from components.data.tracked import usable_rows
from components.errors import DefectOpsError, ModelNotFound, UsageError
from components.files import file_sha256, write_text_atomic
from components.locks import exclusive
from components.registry.tracking import EXPERIMENT_NAME, MODEL_NAME, connect

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

    from components.evaluation.gate import GateResult
    from components.evaluation.runner import EvaluateParams
    from components.predictor import Predictor

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
TAG_VALUE_LIMIT = 5000  # the smallest tag column MLflow has (registered-model tags, VARCHAR(5000))
AUDIT_FILE = "registry-audit.jsonl"
SUMMARY_FIGURES = ("accuracy", "macro_f1", "defect_detection_rate", "false_alarm_rate", "review_rate",
                   "escape_rate", "auto_precision", "ece", "ece_uncalibrated", "latency_ms", "n_images")
VERSION_TAG_FIGURES = ("macro_f1", "defect_detection_rate", "escape_rate", "review_rate", "false_alarm_rate",
                       "accuracy")
_METRIC_KEY = re.compile(r"[^A-Za-z0-9_\-. /]")


@dataclass(frozen=True)
class RegisterResult:
    """What `register` did: the version, whether it is new, and the gate outcome."""

    version: str
    created: bool
    gate_passed: bool
    gate_reasons: list[str]
    compared_with: str
    approval_status: str
    run_id: str | None
    metrics: dict[str, float] = field(default_factory=dict)
    comparison_path: Path | None = None
    trend: str = ""

    @property
    def model_uri(self) -> str:
        return f"models:/{MODEL_NAME}/{self.version}"


# ------------------------------------------------------------------ small helpers


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _truncate(text: str, limit: int = TAG_VALUE_LIMIT) -> str:
    return text if len(text) <= limit else text[: limit - 15] + " …(truncated)"


HISTORY_TAG = "history"  # earlier approvals, rejections and roll-backs of the version, one per line, oldest first
APPROVAL_ENTRY = ("approved_by", "approved_at", "approval_note", "previous_champion", "approval_forced",
                  "overrode_rejection", "overrode_rollback")
REJECTION_ENTRY = ("rejected_by", "rejected_at", "rejected_reason")
ROLLBACK_ENTRY = ("rolled_back_by", "rolled_back_at", "rolled_back_reason")
RESTORE_ENTRY = ("restored_by", "restored_at", "restored_reason")


def _kept_history(tags: dict[str, str], entry: tuple[str, ...], what: str) -> dict[str, str]:
    """The `history` tag with the `what` entry these tags hold now added (nothing when they hold none), written
    before that entry's tags are overwritten: MLflow keeps no history of tags, and the audit file is one home's
    only. The oldest lines go first when the tag would pass its size limit."""
    fields = [f"{key}={tags[key]}" for key in entry if tags.get(key) not in (None, "", "none")]
    if not fields:
        return {}
    lines = [line for line in tags.get(HISTORY_TAG, "").split("\n") if line]
    line = " ".join(f"{what}: {'; '.join(fields)}".split())  # one line: notes and reasons may hold newlines
    if lines and lines[-1] == line:  # a rerun of a command that stopped after writing it
        return {}
    lines.append(line)
    while len("\n".join(lines)) > TAG_VALUE_LIMIT and len(lines) > 1:
        lines.pop(0)
    return {HISTORY_TAG: _truncate("\n".join(lines))}


def _tag(value: Any) -> str:
    """A tag value: figures with 6 significant digits, None as 'none'."""
    if value is None:
        return "none"
    if isinstance(value, float):
        return f"{value:.6g}"
    return _truncate(str(value))


def _flatten(prefix: str, value: Any) -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'prefix.a.b': 1}."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out.update(_flatten(f"{prefix}.{key}" if prefix else str(key), inner))
        return out
    return {prefix: value}


def _metric_name(text: str) -> str:
    return _METRIC_KEY.sub("_", text)


def flat_metrics(report: dict[str, Any], prefix: str = "test_") -> dict[str, float]:
    """The report's headline figures and per-class recall/F1 as MLflow metrics (undefined ones left out)."""
    out = {f"{prefix}{name}": float(report[name]) for name in SUMMARY_FIGURES if report.get(name) is not None}
    for name, figures in (report.get("per_class") or {}).items():
        for figure in ("recall", "f1", "precision"):
            if figures.get(figure) is not None:
                out[_metric_name(f"{prefix}{figure}_{name}")] = float(figures[figure])
    return out


def parse_version(version: str | int) -> str:
    """'3', 'v3' or 3 -> '3'; anything else is a usage error."""
    text = str(version).strip().lower().removeprefix("v")
    if not text.isdigit():
        raise UsageError(f"{version!r} is not a model version number; give one from `defectops models` (e.g. 3)")
    return str(int(text))


def _audit(settings: Settings, entry: dict[str, Any]) -> None:
    """Append one line to the registry audit trail (alias moves are not recorded by MLflow)."""
    settings.home_dir.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"at": _now(), "tracking_uri": settings.tracking_uri, "model": MODEL_NAME, **entry},
                      default=str)
    with (settings.home_dir / AUDIT_FILE).open("a") as handle:
        handle.write(line + "\n")


def golden_test_split(manifest: pd.DataFrame) -> pd.DataFrame:
    """The readable images of the tracked dataset's test split (it only ever grows)."""
    return usable_rows(manifest[manifest["split"] == "test"], "the golden test split")


class _Recording:
    """Delegates to a Predictor and keeps the logits of every forward pass, so plots need no second pass."""

    def __init__(self, predictor: Predictor) -> None:
        self._predictor = predictor
        self.logits: list[np.ndarray] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._predictor, name)

    def forward(self, batch: Any) -> tuple[np.ndarray, np.ndarray]:
        logits, embedding = self._predictor.forward(batch)
        self.logits.append(logits)
        return logits, embedding

    def all_logits(self) -> np.ndarray:
        return np.concatenate(self.logits)


# ------------------------------------------------------------------ loading models


def resolve_model_uri(model: str) -> str:
    """Shorthands to URIs: 'champion' -> models:/defect-classifier@champion, '3'/'v3' -> .../3; paths unchanged."""
    text = model.strip()
    if text in (CHAMPION, CHALLENGER):
        return f"models:/{MODEL_NAME}@{text}"
    if re.fullmatch(r"v?\d+", text) and not Path(text).exists():
        return f"models:/{MODEL_NAME}/{parse_version(text)}"
    return text


def not_found(exc: BaseException) -> bool:
    """Whether an MLflow error says the registry has no such model, version or alias (an unknown alias is
    INVALID_PARAMETER_VALUE): the registry answered. Anything else (server gone, 5xx, database locked) is a
    failure to report as such, never to read as "nothing registered"."""
    return getattr(exc, "error_code", None) in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def registry_failed(exc: BaseException, what: str, uri: str) -> DefectOpsError:
    """An MLflow failure that is not a 'not found', as one line naming the fix."""
    problem = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return DefectOpsError(f"the MLflow registry at {uri} failed to {what} ({problem}); check that it is up "
                          "(`defectops models`) and run the command again")


def _version_of(client: MlflowClient, uri: str) -> tuple[str, str]:
    """(registered model name, version) for models:/NAME@alias or models:/NAME/N."""
    from mlflow.exceptions import MlflowException

    body = uri.removeprefix("models:/")
    try:
        if "@" in body:
            name, alias = body.split("@", 1)
            return name, str(client.get_model_version_by_alias(name, alias).version)
        name, _, version = body.rpartition("/")
        if not name or not version.isdigit():
            raise UsageError(f"{uri}: not a model URI; use models:/{MODEL_NAME}@champion, "
                             f"models:/{MODEL_NAME}/3 or a model.pt path")
        client.get_model_version(name, version)
        return name, version
    except MlflowException as exc:
        if not not_found(exc):
            raise registry_failed(exc, f"look up {uri}", client.tracking_uri) from exc
        if "@" in body:
            raise ModelNotFound(f"{uri}: no version of {body.split('@')[0]} has alias {body.split('@')[1]!r}; "
                                "list them with `defectops models` (approve one to make it champion)") from exc
        raise ModelNotFound(f"{uri}: model version not found in {client.tracking_uri}; list versions with "
                            "`defectops models`") from exc


def load_predictor(settings: Settings, model_uri: str, **kwargs: Any) -> Predictor:
    """A Predictor for a registered model (models:/NAME@alias, models:/NAME/N, models:/m-<id>) or a model.pt."""
    from components.predictor import Predictor

    uri = resolve_model_uri(model_uri)
    if not uri.startswith("models:/"):
        path = Path(uri).expanduser()
        path = path / "model.pt" if path.is_dir() else path
        predictor = Predictor.from_file(path, **kwargs)
        predictor.meta["model_version"] = f"file:{path.resolve()}"
        predictor.model_version = predictor.meta["model_version"]  # type: ignore[attr-defined]
        return predictor

    import mlflow

    client = connect(settings)
    body = uri.removeprefix("models:/")
    if re.fullmatch(r"m-[0-9a-f]+", body):
        pinned, label = uri, body
    else:
        name, version = _version_of(client, uri)
        pinned, label = f"models:/{name}/{version}", f"{name}/{version}"
    try:
        module = mlflow.pytorch.load_model(pinned, map_location="cpu")
        metadata = mlflow.models.get_model_info(pinned).metadata or {}
    except Exception as exc:  # missing artifacts, unpickling and download errors
        detail = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        raise DefectOpsError(f"{uri}: could not load the model ({detail}); check the artifact store or "
                             "register the model again") from exc
    meta = metadata.get("defectops")
    if not isinstance(meta, dict) or "classes" not in meta:
        raise DefectOpsError(f"{uri}: no 'defectops' metadata (classes, calibration); register models with "
                             "`defectops register`")
    meta = {**meta, "model_version": label, "model_uri": pinned, "requested_uri": uri}
    predictor = Predictor(module, meta, **kwargs)
    predictor.model_version = label  # type: ignore[attr-defined]
    log.info("loaded %s (%s) from the registry", label, uri)
    return predictor


# ------------------------------------------------------------------ register


def _read_train_dir(train_dir: Path) -> tuple[Any, dict[str, Any], dict[str, Any], pd.DataFrame, Path]:
    from components.training.train import HISTORY_FILE, METRICS_FILE, MODEL_FILE, load_model_file

    model_path, metrics_path, history_path = (train_dir / n for n in (MODEL_FILE, METRICS_FILE, HISTORY_FILE))
    for path in (model_path, metrics_path, history_path):
        if not path.is_file():
            raise UsageError(f"{path}: not found; run `defectops train --out {train_dir}` first or give "
                             "--train-dir")
    model, meta = load_model_file(model_path)
    if not isinstance(meta.get("calibration"), dict) or "temperature" not in meta["calibration"]:
        raise UsageError(f"{model_path}: the model is not calibrated (no temperature/threshold); "
                         "`defectops train` calibrates it on validation, run it again")
    try:
        json.dumps(meta, allow_nan=True)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{model_path}: its metadata is not plain data ({exc}); retrain with "
                         "`defectops train`") from exc
    try:
        train_metrics = json.loads(metrics_path.read_text())
        history = pd.read_csv(history_path)
    except (ValueError, OSError) as exc:
        raise UsageError(f"{train_dir}: unreadable training outputs ({exc}); run `defectops train` again") from exc
    return model, meta, train_metrics, history, model_path


def _failed_registration(version: ModelVersion) -> bool:
    """A version left by a registration that failed and could not be deleted (see `_undo_registration`), or
    that was killed before it was complete (`registration` stays `incomplete` until the alias has moved)."""
    return (version.tags or {}).get("registration") in ("failed", "incomplete")


def _drop_cut_off(client: MlflowClient, settings: Settings, manifest_digest: str, model_sha256: str) -> None:
    """Delete what an earlier registration of this model and dataset left when it was killed (`kill -9`, an OOM
    kill: no clean-up ran) before it was complete: the version, its logged model, its comparison; its run ends
    FAILED. The caller holds the registry lock, so no registration of this home is still under way."""
    cut_off = client.search_model_versions(f"name='{MODEL_NAME}' and tag.model_sha256='{model_sha256}' "
                                           f"and tag.manifest_digest='{manifest_digest}' "
                                           "and tag.registration='incomplete'")
    decided = {held for alias, held in _aliases(client).items() if alias != CHALLENGER}
    for version in cut_off:
        tags = version.tags or {}
        if str(version.version) in decided or tags.get("approval_status") in ("approved", "rolled_back") \
                or tags.get("deployed_at"):  # a person acted on it since (the UI): never deleted here
            log.warning("%s version %s was cut off before its registration was complete, but a person has made "
                        "it champion, approved or deployed it since: left as it is", MODEL_NAME, version.version)
            continue
        log.warning("an earlier registration of this model was cut off before it was complete (%s version %s, "
                    "run %s): removing what it left, then registering again", MODEL_NAME, version.version,
                    version.run_id)
        run = client.get_run(version.run_id)
        logged = client.search_logged_models([run.info.experiment_id],
                                             filter_string=f"source_run_id = '{version.run_id}'")
        _undo_registration(client, version.run_id, None, _comparison_path(settings, str(version.version)))
        try:  # deleting a logged model needs MANAGE, which a plant's pipeline account may lack
            for model in logged:
                client.delete_logged_model(model.model_id)
        except Exception:  # noqa: BLE001 - the version is gone or tagged failed; the model is only unused
            log.warning("could not delete the logged model of cut-off run %s; an MLflow admin can", version.run_id)
        if run.info.status == "RUNNING":
            client.set_terminated(version.run_id, "FAILED")


def _existing_version(client: MlflowClient, manifest_digest: str, model_sha256: str,
                      origin: str | None = None) -> ModelVersion | None:
    """The latest version of this model file on this dataset (registered from `origin`, when given)."""
    found = client.search_model_versions(f"name='{MODEL_NAME}' and tag.model_sha256='{model_sha256}' "
                                         f"and tag.manifest_digest='{manifest_digest}'")
    found = [v for v in found if not _failed_registration(v)
             and (origin is None or (v.tags or {}).get("origin") == origin)]
    return max(found, key=lambda v: int(v.version)) if found else None


def _result_from_version(client: MlflowClient, version: ModelVersion, settings: Settings) -> RegisterResult:
    tags = version.tags or {}
    metrics = {}
    for name in VERSION_TAG_FIGURES:
        try:
            metrics[f"test_{name}"] = float(tags[name])
        except (KeyError, ValueError):
            continue
    path = settings.reports_dir / "comparisons" / f"v{version.version}.md"
    return RegisterResult(
        version=str(version.version), created=False, gate_passed=tags.get("gate_status") == "passed",
        gate_reasons=[r for r in tags.get("gate_reasons", "").split("\n") if r],
        compared_with=tags.get("compared_with", "none"), approval_status=tags.get("approval_status", "unknown"),
        run_id=version.run_id, metrics=metrics, comparison_path=path if path.is_file() else None)


def _champion_version(client: MlflowClient) -> str | None:
    return _aliases(client).get(CHAMPION)


@dataclass
class _Evaluation:
    """One model's figures on the golden test split, with the logits behind them."""

    report: dict[str, Any]
    logits: np.ndarray
    predictor: Any


def _evaluate(predictor: Predictor, rows: pd.DataFrame, params: EvaluateParams,
              model_version: str | None) -> _Evaluation:
    from components.evaluation.runner import evaluate_rows

    recording = _Recording(predictor)
    report = evaluate_rows(recording, rows, params, model_version)
    return _Evaluation(report, recording.all_logits(), predictor)


def _gate(settings: Settings, client: MlflowClient, challenger: _Evaluation, rows: pd.DataFrame,
          params: EvaluateParams, max_pixels: int) -> tuple[GateResult, _Evaluation | None, str]:
    """Compare with the champion re-evaluated on the same rows (absolute minimums when there is none)."""
    from components.evaluation.gate import GateResult, compare

    champion_version = _champion_version(client)
    if champion_version is None:
        return compare(challenger.report, None, params.gate), None, "none"
    try:
        predictor = load_predictor(settings, f"models:/{MODEL_NAME}/{champion_version}", max_pixels=max_pixels)
        champion = _evaluate(predictor, rows, params, f"{MODEL_NAME}/{champion_version}")
    except Exception as exc:  # noqa: BLE001 - a champion that cannot be re-evaluated fails the gate, loudly
        detail = f"{type(exc).__name__}: {exc}".splitlines()[0][:400]
        log.warning("champion v%s could not be evaluated on the golden test split: %s", champion_version, detail)
        reason = (f"champion v{champion_version} could not be evaluated on the golden test split ({detail}): "
                  "FAILED (approve with --force and a --note if replacing it is intended)")
        check = {"name": "champion_evaluated", "passed": False, "status": "FAILED", "challenger": None,
                 "bound": None, "message": reason}
        return GateResult(passed=False, reasons=[reason], checks=[check]), None, champion_version
    return compare(challenger.report, champion.report, params.gate), champion, champion_version


def _first_version_test_paths(settings: Settings) -> tuple[str | None, set[str] | None, str]:
    """The first dataset version and its test images (from git history of data.dvc and splits.csv)."""
    import io

    from components.data.versioning import git

    project = settings.project_root
    revs = git(project, "log", "--reverse", "--format=%H", "--", "data.dvc", check=False).stdout.split()
    if not revs:
        return None, None, "skipped: no committed dataset version in git history"
    shown = git(project, "show", f"{revs[0]}:splits.csv", check=False)
    if shown.returncode != 0:
        return None, None, "skipped: the first dataset commit has no splits.csv"
    dvc = git(project, "show", f"{revs[0]}:data.dvc", check=False).stdout
    import yaml

    outs = (yaml.safe_load(dvc) or {}).get("outs") or [{}]
    table = pd.read_csv(io.StringIO(shown.stdout), dtype=str)
    return outs[0].get("md5"), set(table.loc[table["split"] == "test", "path"]), ""


def _trend(settings: Settings, rows: pd.DataFrame, challenger: _Evaluation,
           champion: _Evaluation | None) -> tuple[str, dict[str, float]]:
    """Figures on the first dataset version's test images (a subset of today's), from the logits in hand."""
    from components.evaluation.calibration import softmax
    from components.evaluation.metrics import evaluate_predictions
    from components.evaluation.runner import label_indices

    version, paths, why = _first_version_test_paths(settings)
    if paths is None:
        return f"Trend on the first dataset version's test split {why}.", {}
    mask = rows["path"].isin(paths).to_numpy()
    if not mask.any():
        return "Trend on the first dataset version's test split skipped: none of its images are here.", {}
    if mask.all():
        return (f"Trend: the golden test split has not grown since the first dataset version ({version}); "
                "the figures above are that trend."), {}
    title = f"## Trend on the first dataset version's test split ({version}, {int(mask.sum())} of {len(rows)} images)"
    lines = [title, "", "| model | macro F1 | defect detection | false alarms | escape |", "|---|---|---|---|---|"]
    metrics: dict[str, float] = {}
    for name, ev in (("challenger", challenger), ("champion", champion)):
        if ev is None:
            continue
        p = ev.predictor
        labels = label_indices(rows[mask], p.classes)
        probs = softmax(ev.logits[mask], p.temperature)
        sub = evaluate_predictions(probs, labels, p.classes, p.normal_class, p.threshold, n_boot=0)
        cells = [sub.get(k) for k in ("macro_f1", "defect_detection_rate", "false_alarm_rate", "escape_rate")]
        lines.append(f"| {name} | " + " | ".join("n/a" if c is None else f"{c:.3f}" for c in cells) + " |")
        if name == "challenger":
            metrics = {k.replace("test_", "first_test_"): v for k, v in flat_metrics(sub).items()
                       if not k.startswith(("test_recall_", "test_f1_", "test_precision_"))}
    return "\n".join(lines), metrics


def _pip_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for package in ("torch", "torchvision", "numpy", "pillow", "mlflow"):
        try:
            out.append(f"{package}=={version(package).split('+')[0]}")
        except PackageNotFoundError:
            out.append(package)
    return out


def _log_run_contents(run_id: str, meta: dict[str, Any], train_metrics: dict[str, Any], history: pd.DataFrame,
                      tags: dict[str, str], challenger: _Evaluation, rows: pd.DataFrame, train_dir: Path,
                      trend_metrics: dict[str, float]) -> None:
    """Params, tags, the per-epoch curves, the golden-test figures, the plots and the training outputs."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from components.evaluation.calibration import softmax
    from components.evaluation.plots import calibration_png, confusion_matrix_png
    from components.evaluation.runner import label_indices

    params = {"arch": meta["arch"].get("name"), "image_size": meta["image_size"], "profile": meta.get("profile"),
              "seed": meta.get("seed"), "classes": ",".join(meta["classes"]), "normal_class": meta["normal_class"],
              **_flatten("arch", meta["arch"]), **_flatten("train", meta.get("train_params") or {}),
              **_flatten("augment", meta.get("augment_params") or {}),
              **_flatten("calibration", {k: v for k, v in meta["calibration"].items() if not isinstance(v, dict)})}
    mlflow.log_params({k: _truncate(str(v), 6000) for k, v in params.items()})
    mlflow.set_tags(tags)
    stamp = int(datetime.now(UTC).timestamp() * 1000)
    curves = [Metric(_metric_name(column), float(value), stamp, int(row["epoch"]))
              for _, row in history.iterrows() for column, value in row.items()
              if column != "epoch" and pd.notna(value)]
    client = MlflowClient()
    for start in range(0, len(curves), 1000):
        client.log_batch(run_id, metrics=curves[start:start + 1000])
    scalars = {f"train_{k}": float(v) for k, v in train_metrics.items()
               if isinstance(v, int | float) and not isinstance(v, bool)}
    mlflow.log_metrics({**scalars, **flat_metrics(challenger.report), **trend_metrics})
    mlflow.log_artifact(str(train_dir / "train_metrics.json"), artifact_path="training")
    mlflow.log_artifact(str(train_dir / "history.csv"), artifact_path="training")
    p = challenger.predictor
    report = challenger.report
    mlflow.log_dict({"per_class": report["per_class"], "classes": report["classes"],
                     "confusion_matrix": report["confusion_matrix"], "counts": report.get("counts")},
                    "evaluation/per_class.json")
    with tempfile.TemporaryDirectory(prefix="defectops-plots-") as tmp:
        confusion_matrix_png(report["confusion_matrix"], report["classes"], Path(tmp) / "confusion_matrix.png")
        labels = label_indices(rows, p.classes)
        calibration_png(softmax(challenger.logits, 1.0), softmax(challenger.logits, p.temperature), labels,
                        Path(tmp) / "calibration_test.png")
        mlflow.log_artifacts(tmp, artifact_path="plots")


# pickle is chosen on purpose (pt2 pins the batch size); pip is not in the venv, the requirements are explicit
_EXPECTED_WARNINGS = ("mlflow.pytorch", "mlflow.utils.environment", "mlflow.utils.requirements_utils")


@contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Raise these loggers to ERROR for the duration (warnings about choices made on purpose)."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _log_model(model: Any, meta: dict[str, Any]) -> Any:
    """The module (pickle, explicit requirements) with a batch-2 example so any batch size loads back."""
    import mlflow
    import torch
    from mlflow.models import infer_signature

    model = model.cpu().eval()  # evaluation may have moved it to the GPU
    example = torch.zeros(2, 3, meta["image_size"], meta["image_size"])  # mean-grey images: small JSON
    with torch.inference_mode():
        output = model(example)
    signature = infer_signature(example.numpy(), output.numpy())
    with _quiet(*_EXPECTED_WARNINGS):
        return mlflow.pytorch.log_model(model, name="model", serialization_format="pickle",
                                        pip_requirements=_pip_requirements(), signature=signature,
                                        input_example=example.numpy(), metadata={"defectops": meta})


def _comparison_path(settings: Settings, version: str) -> Path:
    return settings.reports_dir / "comparisons" / f"v{version}.md"


def _write_comparison(settings: Settings, version: str, markdown: str) -> Path:
    return write_text_atomic(_comparison_path(settings, version), markdown)


def register(settings: Settings, params: Params, train_dir: Path, force: bool = False,
             origin: str | None = None) -> RegisterResult:
    """Evaluate a trained model on the golden test split, log and register it, gate it, make it `challenger`.

    `force` registers the same model and dataset again; `origin` (e.g. a Prefect task run, the same for its
    retries) is tagged on the version, so a retry of a forced registration that got as far as the version
    returns it instead of registering the model twice.
    """
    with _registry_errors("register a model", settings.tracking_uri):
        return _register(settings, params, train_dir, force, origin)


def _register(settings: Settings, params: Params, train_dir: Path, force: bool,
              origin: str | None = None) -> RegisterResult:
    import mlflow

    from components.data.tracked import tracked_data
    from components.data.versioning import head_commit
    from components.evaluation.gate import comparison_markdown
    from components.evaluation.runner import evaluate_params
    from components.predictor import Predictor
    from components.training.train import manifest_digest

    settings.ensure()
    train_dir = Path(train_dir)
    model, meta, train_metrics, history, model_path = _read_train_dir(train_dir)
    client = connect(settings)  # an unreachable server fails here, before any slow work
    model_sha256 = file_sha256(model_path)
    tracked = tracked_data(settings, params)  # the golden split and the version it is, read together
    manifest, data_version = tracked.manifest, tracked.version
    trained_on = meta.get("dataset_version")
    if trained_on and trained_on != data_version:
        raise UsageError(
            f"{model_path}: trained on dataset version {trained_on}, but this checkout holds {data_version}: its "
            "golden-test figures would not compare with the champion's, and the test split may hold pictures it "
            f"trained on; check out the commit whose data.dvc names {trained_on} (then `defectops data pull`), "
            "or train again on this version")
    digest = manifest_digest(manifest)
    rows = golden_test_split(manifest)
    eval_params = evaluate_params(params)

    with exclusive(settings.locks_dir, "registry", "a model registration or approval"):
        _drop_cut_off(client, settings, digest, model_sha256)
        if not force:
            existing = _existing_version(client, digest, model_sha256)
        else:  # forced: only what this same registration (a retry of it) created already
            existing = _existing_version(client, digest, model_sha256, origin) if origin else None
        if existing is not None:
            log.info("%s is already registered as version %s (same model file and dataset); nothing to do",
                     model_path, existing.version)
            return _result_from_version(client, existing, settings)

        max_pixels = params.data.max_image_pixels  # the plant's limit, as training and serving decode
        challenger = _evaluate(Predictor(model, meta, max_pixels=max_pixels), rows, eval_params, None)
        gate, champion, compared_with = _gate(settings, client, challenger, rows, eval_params, max_pixels)
        trend_text, trend_metrics = _trend(settings, rows, challenger, champion)
        run_tags = {"dataset_version": _tag(data_version), "git_commit": _tag(head_commit(settings.project_root)),
                    "trained_on_dataset_version": trained_on or "untracked folder",
                    "weights_used": _tag(meta.get("weights_used")), "manifest_digest": digest,
                    "train_manifest_digest": _tag(meta.get("manifest_digest")), "model_sha256": model_sha256,
                    "train_dir": str(train_dir.resolve()), "n_test_images": str(len(rows))}
        status = "passed" if gate.passed else "failed"
        calibration = meta["calibration"]
        version_tags = {
            **{k: run_tags[k] for k in ("dataset_version", "trained_on_dataset_version", "git_commit",
                                        "weights_used", "manifest_digest", "model_sha256", "n_test_images")},
            "threshold": _tag(float(calibration["threshold"])),
            "temperature": _tag(float(calibration["temperature"])),
            **{name: _tag(challenger.report.get(name)) for name in VERSION_TAG_FIGURES},
            "gate_status": status, "gate_reasons": _truncate("\n".join(gate.reasons)),
            "compared_with": compared_with, "approval_status": "pending" if gate.passed else "not-eligible",
            "training_fingerprint": _tag(meta.get("training_fingerprint")),
            **({"origin": _truncate(origin)} if origin else {}),
            "registration": "incomplete",  # until the alias has moved: a kill before leaves it to _drop_cut_off
        }

        tracked.still_there(settings)  # the golden pictures both models just read: nothing registered otherwise
        version: str | None = None
        logged_model_id: str | None = None
        comparison_path: Path | None = None
        run_name = f"register-{meta.get('profile', 'model')}-{model_sha256[:8]}"
        with mlflow.start_run(run_name=run_name) as run:
            try:
                _log_run_contents(run.info.run_id, meta, train_metrics, history, run_tags, challenger, rows,
                                  train_dir, trend_metrics)
                info = _log_model(model, meta)
                logged_model_id = info.model_id
                version_tags["run_id"] = run.info.run_id
                registered = mlflow.register_model(info.model_uri, MODEL_NAME, tags=version_tags)
                version = str(registered.version)
                challenger.report["model_version"] = f"{MODEL_NAME}/{version}"
                mlflow.log_dict(challenger.report, "evaluation/test_report.json")
                markdown = comparison_markdown(challenger.report, champion.report if champion else None, gate,
                                               f"v{version}", f"v{compared_with}" if compared_with != "none"
                                               else None)
                markdown += "\n" + trend_text + "\n"
                mlflow.log_text(markdown, "evaluation/comparison.md")
                comparison_path = _write_comparison(settings, version, markdown)
                mlflow.set_tags({"registered_version": version, "gate_status": status})
                client.set_registered_model_alias(MODEL_NAME, CHALLENGER, version)
                client.set_model_version_tag(MODEL_NAME, version, "registration", "complete")
                version_tags["registration"] = "complete"
            except BaseException:
                _undo_registration(client, run.info.run_id, logged_model_id, comparison_path)
                raise

    log.info("registered %s version %s (gate %s vs %s); it is now %s", MODEL_NAME, version, status,
             compared_with, CHALLENGER)
    _audit(settings, {"action": "register", "version": version, "run_id": run.info.run_id, "gate_status": status,
                      "compared_with": compared_with, "model_sha256": model_sha256, "manifest_digest": digest})
    return RegisterResult(version=version, created=True, gate_passed=gate.passed, gate_reasons=gate.reasons,
                          compared_with=compared_with, approval_status=version_tags["approval_status"],
                          run_id=run.info.run_id, metrics=flat_metrics(challenger.report),
                          comparison_path=comparison_path, trend=trend_text)


def _undo_registration(client: MlflowClient, run_id: str, logged_model_id: str | None,
                       comparison_path: Path | None) -> None:
    """Delete what a failed registration created (the run itself ends FAILED when the exception leaves it)."""
    try:
        created = client.search_model_versions(f"name='{MODEL_NAME}' and run_id='{run_id}'")
    except Exception:
        log.exception("registration failed and its model versions could not be listed; check `defectops models` "
                      "for a version of run %s and delete it", run_id)
        created = []
    for version in created:
        try:
            client.delete_model_version(MODEL_NAME, str(version.version))
            log.warning("registration failed: deleted %s version %s", MODEL_NAME, version.version)
        except Exception:  # keep the original error; make what is left behind inert and say so
            log.exception("registration failed and %s version %s could not be deleted (deleting needs MANAGE "
                          "on the model); it is tagged registration=failed and cannot be approved without "
                          "--force; an MLflow admin can delete it", MODEL_NAME, version.version)
            try:
                for key, value in (("registration", "failed"), ("gate_status", "failed"),
                                   ("approval_status", "not-eligible")):
                    client.set_model_version_tag(MODEL_NAME, str(version.version), key, value)
            except Exception:  # noqa: BLE001 - the log line above already says what to do
                log.warning("could not tag %s version %s as a failed registration either", MODEL_NAME,
                            version.version)
    if logged_model_id is not None:
        try:
            client.delete_logged_model(logged_model_id)
        except Exception:  # noqa: BLE001 - best effort: the version is already gone
            log.warning("could not delete logged model %s of the failed registration", logged_model_id)
    if comparison_path is not None:
        comparison_path.unlink(missing_ok=True)


# ------------------------------------------------------------------ approve / reject / list


def _get_version(client: MlflowClient, version: str) -> ModelVersion:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(MODEL_NAME, version)
    except MlflowException as exc:
        if not not_found(exc):
            raise
        raise ModelNotFound(f"{MODEL_NAME} version {version} does not exist; list versions with "
                             "`defectops models`") from exc


def _aliases(client: MlflowClient) -> dict[str, str]:
    """alias -> version of the registered model (empty when nothing is registered yet).

    Any other registry error raises: read as "no champion", a failed call would let `reject` take the champion
    or the gate judge a challenger against the fixed minimums instead of the champion.
    """
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(MODEL_NAME)
    except MlflowException as exc:
        if not_found(exc):
            return {}
        raise
    return {alias: str(v) for alias, v in model.aliases.items()}


def _failed_reasons(tags: dict[str, str]) -> str:
    reasons = [r for r in tags.get("gate_reasons", "").split("\n") if "FAILED" in r]
    return "; ".join(reasons) or tags.get("gate_reasons", "") or "no gate result recorded"


def _refused(exc: BaseException) -> bool:
    """Whether MLflow refused the call for lack of permission (403 from the basic-auth server)."""
    return getattr(exc, "error_code", None) == "PERMISSION_DENIED"


@contextmanager
def _registry_errors(action: str, uri: str) -> Iterator[None]:
    """MLflow's errors as one line naming the fix: a refusal by the server's access control names the account;
    any other failure (server gone, 5xx, database locked) says to run the command again, which is safe: a
    registration leaves nothing behind, and `approve` completes an approval that stopped half-way."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        if _refused(exc):
            account = os.environ.get("MLFLOW_TRACKING_USERNAME") or "(none: MLFLOW_TRACKING_USERNAME is not set)"
            raise DefectOpsError(f"the MLflow server refused to {action} for the account {account}: it needs EDIT "
                                 f"on the registered model {MODEL_NAME} and the experiment {EXPERIMENT_NAME} "
                                 "(infra/README.md, MLflow accounts)") from exc
        raise registry_failed(exc, action, uri) from exc


def _remove_challenger(client: MlflowClient, version: str) -> bool:
    """Take `challenger` off `version`; False when the account may not (MLflow counts it as a deletion: MANAGE)."""
    from mlflow.exceptions import MlflowException

    try:
        client.delete_registered_model_alias(MODEL_NAME, CHALLENGER)
        return True
    except MlflowException as exc:
        if not _refused(exc):
            raise
        log.warning("'%s' stays on version %s: removing an alias needs MANAGE on %s, which this account does not "
                    "have (EDIT is enough for everything else); the next registration moves it", CHALLENGER,
                    version, MODEL_NAME)
        return False


# approval_status values that a person set against a version: approving it over them needs --force and a note
_VETOES = {  # status: (in words, who, when, why, the tag that records the override)
    "rejected": ("rejected", "rejected_by", "rejected_at", "rejected_reason", "overrode_rejection"),
    "rolled_back": ("rolled back", "rolled_back_by", "rolled_back_at", "rolled_back_reason", "overrode_rollback"),
}


def approve(settings: Settings, version: str | int, by: str, note: str | None = None,
            force: bool = False) -> dict[str, Any]:
    """Make a version whose gate passed against the current champion the champion; `force` (with a note as the
    reason) overrides the gate, a stale comparison, a rejection or a rollback.

    A version a person already made champion in the MLflow UI gets the approval recorded (tags, audit line),
    which promotion requires; the alias stays where the click put it. An approval that stopped after the alias
    moved (registry down, Ctrl-C) is completed by running it again.
    """
    version = parse_version(version)
    if not by.strip():
        raise UsageError("--by is empty; say who approves (name or e-mail)")
    if force and not (note and note.strip()):
        raise UsageError("--force needs --note giving the reason for overriding the gate")
    client = connect(settings)
    with _registry_errors(f"approve version {version}", settings.tracking_uri), \
            exclusive(settings.locks_dir, "registry", "a model registration or approval"):
        tags = dict(_get_version(client, version).tags or {})
        aliases = _aliases(client)
        previous = aliases.get(CHAMPION)
        # the alias moved in the MLflow UI already: record the approval, since that click left no tags
        moved_in_ui = previous == version
        if moved_in_ui and champion_approval_problem(tags) is None:
            if _approval_recorded(settings, version, tags["approved_at"]):
                log.info("version %s is already the approved champion; nothing to do", version)
                return {"version": version, "previous_champion": previous, "changed": False}
            log.warning("version %s is the approved champion (approved by %s at %s) but this home's audit trail "
                        "has no line for it: the approval stopped after the alias moved; completing it", version,
                        tags["approved_by"], tags["approved_at"])
            entry = _finish_approval(settings, client, version, tags, aliases, {"completed_by": by})
            return {"version": version, "previous_champion": entry["previous_champion"], "changed": True,
                    "forced": entry["forced"], "challenger_removed": entry["challenger_removed"]}
        gate_status, approval = tags.get("gate_status"), tags.get("approval_status")
        if tags.get("registration") == "incomplete":  # even with --force: registering it again completes it
            _refuse_unless_eligible(version, tags, None)
        if not force:
            _refuse_unless_eligible(version, tags, None if moved_in_ui else previous)
        if moved_in_ui:  # MLflow keeps no history of alias moves: which version the click replaced is lost
            previous = "unknown (alias moved in the MLflow UI)"
        overrode = {}
        if approval in _VETOES:  # only with --force: the veto stays on record beside the approval
            what, who, when, why, key = _VETOES[approval]
            overrode[key] = _truncate(f"{what} by {tags.get(who, '?')} at {tags.get(when, '?')}: {tags.get(why, '')}")
            log.warning("version %s was %s; approved over it with --force (%s)", version, overrode[key], note)
        new_tags = {**_kept_history(tags, APPROVAL_ENTRY, "earlier approval"),
                    "approved_by": by, "approved_at": _now(), "approval_note": _truncate(note or ""),
                    "previous_champion": previous or "none", "approval_forced": str(force).lower(),
                    # an earlier approval's override, now in the history, is not this one's
                    **{key: "none" for key in ("overrode_rejection", "overrode_rollback")
                       if tags.get(key, "none") != "none"}, **overrode,
                    # a former champion approved again is no longer replaced
                    **({"replaced_by": "none"} if tags.get("replaced_by", "none") != "none" else {}),
                    "approval_status": "approved"}  # last: a version is approved only once every tag is there
        with _tags_restored_on_failure(client, version, tags, new_tags):
            for key, value in new_tags.items():
                client.set_model_version_tag(MODEL_NAME, version, key, value)
            if not moved_in_ui:
                client.set_registered_model_alias(MODEL_NAME, CHAMPION, version)
        entry = _finish_approval(settings, client, version, {**tags, **new_tags}, aliases,
                                 {"gate_status": gate_status, **overrode})
    log.info("version %s is now the champion (was %s), approved by %s", version, previous or "none", by)
    return {"version": version, "previous_champion": previous, "changed": True, "forced": force,
            "challenger_removed": entry["challenger_removed"]}


@contextmanager
def _tags_restored_on_failure(client: MlflowClient, version: str, before: dict[str, str],
                              written: dict[str, str]) -> Iterator[None]:
    """Put `written`'s tags back as they were `before` when the block fails (registry gone, Ctrl-C): a decision
    that did not happen must not stay half on the version, nor be taken for an earlier one by a rerun
    (`history`). The status first, so the version stops counting as decided at once."""
    try:
        yield
    except BaseException:
        keys = sorted(written, key=lambda key: key != "approval_status")
        try:
            for key in keys:
                if key in before:
                    client.set_model_version_tag(MODEL_NAME, version, key, before[key])
                else:
                    client.delete_model_version_tag(MODEL_NAME, version, key)
        except Exception:  # noqa: BLE001 - the original error says what failed; this one only adds to it
            log.warning("could not put back the tags of version %s as they were; check them in `defectops models`",
                        version)
        raise


def _refuse_unless_eligible(version: str, tags: dict[str, str], champion: str | None) -> None:
    """Without --force, a version is approved only if its gate passed against the champion it would replace
    and no person rejected it or rolled it back."""
    if tags.get("registration") in ("failed", "incomplete"):
        raise DefectOpsError(f"version {version} is what a failed or cut-off registration left behind (registration="
                             f"{tags['registration']}: an MLflow admin can delete it); register the model again "
                             "with `defectops register`")
    if tags.get("gate_status") != "passed":
        raise DefectOpsError(f"version {version} did not pass the gate ({_failed_reasons(tags)}); register a "
                             "better model, or approve with --force and a --note giving the reason")
    compared_with = tags.get("compared_with", "none")
    if champion is not None and compared_with != champion:
        against = f"champion v{compared_with}" if compared_with != "none" else "the fixed minimums (no champion)"
        raise DefectOpsError(f"version {version} was gated against {against}, but the champion is now v{champion}; "
                             "register it again (`defectops register --force`) to gate it against the current "
                             "champion, or approve with --force and a --note")
    veto = _VETOES.get(tags.get("approval_status", ""))
    if veto:
        what, who, _, why, _ = veto
        raise DefectOpsError(f"version {version} was {what} by {tags.get(who, '?')} ({tags.get(why, '')}); "
                             "register a new model, or approve with --force and a --note")


def _approval_recorded(settings: Settings, version: str, approved_at: str) -> bool:
    """Whether this home's audit trail has the line of the approval tagged `approved_at` (written after it)."""
    return any(e.get("action") == "approve" and str(e.get("version")) == version and str(e.get("at", "")) >= approved_at
               for e in audit_trail(settings))


def _finish_approval(settings: Settings, client: MlflowClient, version: str, tags: dict[str, str],
                     aliases: dict[str, str], extra: dict[str, Any]) -> dict[str, Any]:
    """What follows the alias move, from the version's approval tags alone, so that a rerun can complete it:
    the replaced champion tagged, `challenger` taken off, the audit line. Returns that line."""
    previous = tags["previous_champion"]
    if previous.isdigit() and previous != version:
        client.set_model_version_tag(MODEL_NAME, previous, "replaced_by", version)
        client.set_model_version_tag(MODEL_NAME, previous, "replaced_at", tags["approved_at"])
    entry = {"action": "approve", "version": version, "by": tags["approved_by"],
             "note": tags.get("approval_note") or None, "approved_at": tags["approved_at"],
             "previous_champion": None if previous == "none" else previous,
             "forced": tags.get("approval_forced") == "true",
             "challenger_removed": aliases.get(CHALLENGER) == version and _remove_challenger(client, version),
             "alias_moved_in_ui": previous.startswith("unknown"), **extra}
    _audit(settings, entry)
    return entry


def _require_who_and_why(action: str, by: str, reason: str) -> None:
    """The audit trail needs both: a blank --by or --reason is a usage error naming the one(s) missing."""
    missing = [flag for flag, value in (("--by (who)", by), ("--reason (why)", reason)) if not value.strip()]
    if missing:
        raise UsageError(f"{action} needs {' and '.join(missing)}; {'it was' if len(missing) == 1 else 'both were'} "
                         "given empty")


def reject(settings: Settings, version: str | int, by: str, reason: str) -> dict[str, Any]:
    """Mark a candidate rejected (tags + audit line) and take `challenger` off it; never touches `champion`."""
    version = parse_version(version)
    _require_who_and_why("reject", by, reason)
    client = connect(settings)
    with _registry_errors(f"reject version {version}", settings.tracking_uri), \
            exclusive(settings.locks_dir, "registry", "a model registration or approval"):
        tags = dict(_get_version(client, version).tags or {})
        aliases = _aliases(client)
        if aliases.get(CHAMPION) == version:
            raise DefectOpsError(f"version {version} is the champion; approve another version first (e.g. the "
                                 "previous champion) and then reject this one")
        rejection = {**_kept_history(tags, REJECTION_ENTRY, "earlier rejection"),
                     "rejected_by": by, "rejected_at": _now(), "rejected_reason": _truncate(reason),
                     "approval_status": "rejected"}
        with _tags_restored_on_failure(client, version, tags, rejection):
            for key, value in rejection.items():
                client.set_model_version_tag(MODEL_NAME, version, key, value)
        removed = aliases.get(CHALLENGER) == version and _remove_challenger(client, version)
    _audit(settings, {"action": "reject", "version": version, "by": by, "reason": reason,
                      "challenger_removed": removed})
    log.info("version %s rejected by %s: %s", version, by, reason)
    return {"version": version, "challenger_removed": removed}


APPROVAL_TAGS = ("approval_status", "approved_by", "approved_at")


def approval_problem(tags: dict[str, str]) -> str | None:
    """Why a version does not count as approved (None when it does): the tags `approve` writes must be there.

    An alias moved in the MLflow UI alone leaves them out; `defectops approve` records who and when.
    """
    status = tags.get("approval_status")
    if status and status != "approved":
        return f"its approval_status is {status!r}"
    missing = [key for key in APPROVAL_TAGS if not tags.get(key)]
    if missing:
        return f"it lacks the approval tags {', '.join(missing)} that `defectops approve` writes"
    return None


def champion_approval_problem(tags: dict[str, str]) -> str | None:
    """Why the version `champion` names does not count as approved as champion (None when it does):
    `approval_problem`'s reasons, or an approval another one has replaced since, when the alias was moved back
    onto it in the MLflow UI: that click left no tags, and its old approval was for another time."""
    problem = approval_problem(tags)
    replaced_by = tags.get("replaced_by", "none")
    if problem is None and replaced_by != "none":
        return (f"its approval of {tags.get('approved_at', '?')} was replaced by version {replaced_by}'s (the "
                "alias was moved back onto it in the MLflow UI?)")
    return problem


def record_deployment(settings: Settings, version: str, by: str, details: dict[str, Any],
                      previous: str | None) -> str:
    """Tag `version` as the deployed one (who, when, how) and `previous` as retired; one audit line. Returns when."""
    at = _now()
    client = connect(settings)
    tags = {"deployed_at": at, "deployed_by": by, "deployment_status": "serving",
            **{f"deployed_{key}": _tag(value) for key, value in details.items()}}
    for key, value in tags.items():
        client.set_model_version_tag(MODEL_NAME, version, key, value)
    if previous and previous != version:
        client.set_model_version_tag(MODEL_NAME, previous, "deployment_status", "retired")
        client.set_model_version_tag(MODEL_NAME, previous, "retired_at", at)
    _audit(settings, {"action": "deploy", "version": version, "by": by, "previous_deployed": previous, **details})
    return at


def deployed_history(settings: Settings) -> list[str]:
    """Versions in the order they were deployed (from the audit trail), oldest first."""
    return [str(e["version"]) for e in audit_trail(settings) if e.get("action") == "deploy"]


def rollback(settings: Settings, current: str, by: str, reason: str) -> dict[str, Any]:
    """Move `champion` from the deployed `current` back to the version deployed before it; tags + audit line.

    The target is the latest earlier deployment that is still approved (not itself rolled back or rejected).
    """
    _require_who_and_why("rollback", by, reason)
    client = connect(settings)
    with exclusive(settings.locks_dir, "registry", "a model registration or approval"):
        target = None
        for candidate in reversed(deployed_history(settings)):
            if candidate == current:
                continue
            try:
                tags = dict(_get_version(client, candidate).tags or {})
            except ModelNotFound:  # deleted since it was deployed: an earlier one may still serve
                log.info("version %s, deployed before, no longer exists: not a rollback target", candidate)
                continue
            if approval_problem(tags) is None:
                target = candidate
                break
        if target is None:
            raise DefectOpsError(f"no earlier approved deployment to roll back to from version {current}; approve "
                                 "the version to serve with `defectops approve N --by NAME`, then promote it")
        at, current_tags = _now(), dict(_get_version(client, current).tags or {})
        rolled_back = {**_kept_history(current_tags, ROLLBACK_ENTRY, "earlier roll-back"),
                       "rolled_back_by": by, "rolled_back_at": at, "rolled_back_reason": _truncate(reason),
                       "approval_status": "rolled_back"}
        with _tags_restored_on_failure(client, current, current_tags, rolled_back):
            for key, value in rolled_back.items():
                client.set_model_version_tag(MODEL_NAME, current, key, value)
            client.set_registered_model_alias(MODEL_NAME, CHAMPION, target)
        for key, value in {**_kept_history(tags, RESTORE_ENTRY, "earlier restore"),
                           "restored_by": by, "restored_at": at, "restored_reason": _truncate(reason),
                           "replaced_by": "none"}.items():
            client.set_model_version_tag(MODEL_NAME, target, key, value)
    _audit(settings, {"action": "rollback", "from_version": current, "version": target, "by": by,
                      "reason": reason})
    log.info("champion rolled back from %s to %s by %s: %s", current, target, by, reason)
    return {"from_version": current, "version": target}


def _as_float(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "none") else None
    except ValueError:
        return None


def find_trained(settings: Settings, fingerprint: str) -> RegisterResult | None:
    """The registered version trained from exactly this data and these params, if there is one."""
    client = connect(settings)
    found = client.search_model_versions(f"name='{MODEL_NAME}' and tag.training_fingerprint='{fingerprint}'")
    live = [v for v in found if v.tags.get("approval_status") != "rejected" and not _failed_registration(v)]
    return _result_from_version(client, max(live, key=lambda v: int(v.version)), settings) if live else None


def list_versions(settings: Settings) -> list[dict[str, Any]]:
    """Every version of the model, newest first, with its aliases, gate and approval state and key figures."""
    client = connect(settings)
    aliases: dict[str, list[str]] = {}
    for alias, version in _aliases(client).items():
        aliases.setdefault(version, []).append(alias)
    versions = client.search_model_versions(f"name='{MODEL_NAME}'")
    rows = []
    for v in sorted(versions, key=lambda v: int(v.version), reverse=True):
        tags = v.tags or {}
        rows.append({
            "version": str(v.version), "aliases": sorted(aliases.get(str(v.version), [])),
            "created": datetime.fromtimestamp(v.creation_timestamp / 1000, UTC).isoformat(timespec="seconds"),
            "dataset_version": tags.get("dataset_version"), "gate_status": tags.get("gate_status"),
            "approval_status": (f"registration {tags['registration']}" if _failed_registration(v)
                                else tags.get("approval_status")),
            **{name: _as_float(tags.get(name)) for name in ("macro_f1", "defect_detection_rate", "escape_rate",
                                                            "review_rate", "false_alarm_rate")},
            "approved_by": tags.get("approved_by"), "run_id": v.run_id,
        })
    return rows


def audit_trail(settings: Settings) -> list[dict[str, Any]]:
    """The lines of the registry audit file (oldest first)."""
    path = settings.home_dir / AUDIT_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

