"""The drift check: reference vs a production-log window, written as summary.json, drift.html and quality.md.

Everything goes to `<reports>/drift/<UTC timestamp>/`; `log_to_mlflow` copies a folder into an MLflow run and
`artifact_markdown` gives the text of a Prefect markdown artifact linking it.
"""

from __future__ import annotations

import itertools
import json
import logging
import shutil
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from components.config import Params, Settings
from components.drift.baseline import prediction_reference
from components.drift.current import Current, read_current
from components.drift.detect import NOT_ENOUGH, Comparison, compare, not_enough_data
from components.drift.params import DriftParams, drift_params
from components.drift.quality import QUALITY_FILE, quality_report
from components.drift.reference import load_reference, model_version_of
from components.drift.window import Window, resolve_window
from components.files import write_text_atomic

log = logging.getLogger(__name__)

SUMMARY_FILE, HTML_FILE = "summary.json", "drift.html"
PARTIAL_SUFFIX = ".partial"
EXIT_DRIFT = 3


@dataclass(frozen=True)
class DriftCheck:
    """The outcome of one drift check and the folder holding its reports."""

    summary: dict[str, Any]
    report_dir: Path

    @property
    def drift(self) -> bool:
        return bool(self.summary["drift"])

    @property
    def exit_code(self) -> int:
        """0 no drift (or not enough data), 3 drift."""
        return EXIT_DRIFT if self.drift else 0


def _reserve_report_dir(settings: Settings, now: datetime) -> tuple[Path, Path]:
    """(folder, partial): a report folder name that no other check holds, and the folder the reports are written
    in until all are there (`<folder>.partial`, renamed to `folder` at the end). Making `partial` is the
    reservation, so two checks started in the same second (the daily flow and a person) get two names."""
    base = settings.reports_dir / "drift" / now.strftime("%Y%m%dT%H%M%SZ")
    base.parent.mkdir(parents=True, exist_ok=True)
    for n in itertools.count(1):
        folder = base if n == 1 else base.with_name(f"{base.name}-{n}")
        partial = folder.with_name(folder.name + PARTIAL_SUFFIX)
        if folder.exists():
            continue
        try:
            partial.mkdir()
        except FileExistsError:
            continue
        if not folder.exists():  # a check that held `partial` may have finished in between
            return folder, partial
        partial.rmdir()
    raise AssertionError("unreachable")


def _mlflow_run_active() -> bool:
    """True when this process has an active MLflow run (without importing MLflow when it is not loaded)."""
    mlflow = sys.modules.get("mlflow")
    return bool(mlflow is not None and mlflow.active_run() is not None)


def served_model(settings: Settings) -> str:
    """The model the service serves: the deployment record's pinned URI, or `champion` while nothing is deployed.
    Not `champion` itself: between an approval and its promotion (or while a promotion fails) it names a model
    that answered none of the logged predictions."""
    from components.serving.deployment import read_record

    record = read_record(settings)
    return record.model_uri if record is not None else "champion"


def run_drift_check(settings: Settings, params: Params, model: str | None = None, since: str | None = None,
                    until: str | None = None, window: Window | None = None, predictor: Any = None,
                    to_mlflow: bool | None = None, rebuild_reference: bool = False) -> DriftCheck:
    """Compare a window of the production log with the reference of the tracked dataset and `model` (default: the
    one served, `served_model`)."""
    drift = drift_params(params)
    window = window or resolve_window(since, until, drift.window_days)
    started = datetime.now(UTC)
    settings.ensure()
    current = read_current(settings.prod_log_dir, window)
    base = {"window": window.as_dict(), "skipped_lines": current.skipped_lines, "log_files": current.log_files,
            "created_at": started.isoformat(timespec="seconds")}
    if current.n < drift.min_current:  # no model or reference needed to say so
        comparison = not_enough_data(current.n, drift, None if settings.prod_log_dir.is_dir() else (
            f"not enough production data: there is no production log at {settings.prod_log_dir}; nothing was "
            f"served with this state root yet, or DEFECTOPS_HOME ({settings.home_dir}) is not the service's"))
        model_version = dataset_version = reference_info = None
    else:
        if predictor is None:
            from components.registry.registry import load_predictor

            predictor = load_predictor(settings, model or served_model(settings),
                                       max_pixels=params.data.max_image_pixels)
        reference = load_reference(settings, params, predictor, drift, rebuild=rebuild_reference)
        answers = prediction_reference(settings, reference.frame, drift, reference.model_version, window)
        comparison = compare(answers.frame, answers.window(current.frame), drift, reference.model_version,
                             params.profile.normal_class)
        model_version, dataset_version = reference.model_version, reference.dataset_version
        reference_info = {"path": str(reference.path) if reference.path else None, "cached": reference.cached,
                          "predictions": answers.info, **({"note": reference.note} if reference.note else {})}
    summary = {**comparison.summary, **base, "model_version": model_version or
               (model_version_of(predictor) if predictor is not None else None),
               "dataset_version": dataset_version, "reference": reference_info}
    folder = _write_reports(settings, started, summary, comparison, current, window, params)
    _log_outcome(summary, drift)
    if to_mlflow or (to_mlflow is None and _mlflow_run_active()):
        summary["mlflow_run_id"] = log_to_mlflow(folder, settings)
        if summary["mlflow_run_id"]:
            write_summary(summary, folder)
    return DriftCheck(summary, folder)


def _write_reports(settings: Settings, started: datetime, summary: dict[str, Any], comparison: Comparison,
                   current: Current, window: Window, params: Params) -> Path:
    """summary.json, drift.html and quality.md with its charts, in a report folder that appears only complete:
    an interrupted check (Ctrl-C, SIGTERM, an error) leaves no folder behind (a killed one, a `.partial`)."""
    folder, partial = _reserve_report_dir(settings, started)
    try:
        files: dict[str, Any] = {"summary": str(folder / SUMMARY_FILE)}
        if comparison.snapshot is not None:
            comparison.snapshot.save_html(str(partial / HTML_FILE))
            files["html"] = str(folder / HTML_FILE)
        quality = quality_report(current.frame, window, partial, params.profile.normal_class,
                                 summary["model_version"])
        files["quality"] = str(folder / quality.markdown.name)
        files["charts"] = [str(folder / p.name) for p in quality.charts]
        summary.update(report_dir=str(folder), quality=quality.figures, files=files)
        write_summary(summary, partial)
        partial.rename(folder)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return folder


def write_summary(summary: dict[str, Any], folder: Path) -> Path:
    """Write summary.json (atomically) into the report folder."""
    return write_text_atomic(folder / SUMMARY_FILE, json.dumps(summary, indent=2, default=str))


def _log_outcome(summary: dict[str, Any], params: DriftParams) -> None:
    if summary["status"] == NOT_ENOUGH:
        return  # detect.not_enough_data has warned
    embedding = summary.get("embedding_drift") or {}
    log.info("drift check %s: %s (dataset drift %s, share %.2f, threshold %.2f; drifted %s; column alarm %s; "
             "embedding %s %s)", summary["window"]["since"], summary["status"], summary["dataset_drift"],
             summary["drift_share"], params.drift_share, summary["drifted_columns"] or "none",
             summary.get("column_alarm") or "none", embedding.get("method", "-"),
             f"{embedding['score']:.3f}" if embedding else "not computed")


def _metrics(summary: dict[str, Any]) -> dict[str, float]:
    out = {"drift_detected": float(summary["drift"]), "drift_n_current": float(summary.get("n_current") or 0),
           "drift_skipped_lines": float(summary.get("skipped_lines") or 0)}
    if summary.get("drift_share") is not None:
        out["drift_share"] = float(summary["drift_share"])
        out["drift_dataset_drift"] = float(summary["dataset_drift"])
        out["drift_column_alarm"] = float(bool(summary.get("column_alarm")))
    for column, verdict in (summary.get("columns") or {}).items():
        out[f"drift_score_{column}"] = float(verdict["score"])
    if summary.get("embedding_drift"):
        out["drift_embedding_score"] = float(summary["embedding_drift"]["score"])
        out["drift_embedding_drifted"] = float(summary["embedding_drift"]["drifted"])
    quality = summary.get("quality") or {}
    for name in ("review_rate", "defect_rate", "confidence_mean", "latency_p50_ms", "latency_p99_ms"):
        if quality.get(name) is not None:
            out[f"quality_{name}"] = float(quality[name])
    return out


def log_to_mlflow(summary_dir: Path, settings: Settings) -> str | None:
    """Log a drift report folder (summary figures as metrics, files as artifacts) to MLflow; best effort.

    Into the active run when there is one, else into a new `drift-<folder>` run of the defectops experiment.
    Returns the run id, or None (with a warning) when MLflow is not usable.
    """
    try:
        import mlflow

        summary = json.loads((summary_dir / SUMMARY_FILE).read_text())
        active = mlflow.active_run()
        if active is None:
            from components.registry.tracking import connect

            connect(settings)
            context: Any = mlflow.start_run(run_name=f"drift-{summary_dir.name}",
                                            tags={"defectops.kind": "drift", "drift.status": summary["status"]})
        else:
            context = nullcontext(active)
        with context as run:
            mlflow.log_metrics(_metrics(summary))
            mlflow.set_tags({"drift.window": f"{summary['window']['since']}..{summary['window']['until']}",
                             "drift.model_version": str(summary.get("model_version")),
                             "drift.dataset_version": str(summary.get("dataset_version")),
                             "drift.prediction_reference": str(_answers_reference(summary).get("source"))})
            mlflow.log_artifacts(str(summary_dir), artifact_path=f"drift/{summary_dir.name}")
            run_id = run.info.run_id
        log.info("drift report logged to MLflow run %s", run_id)
        return run_id
    except Exception as exc:  # noqa: BLE001 - best effort: the report is on disk whatever MLflow does
        detail = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        log.warning("drift report not logged to MLflow (%s); it stays in %s", detail, summary_dir)
        return None


def _answers_reference(summary: dict[str, Any]) -> dict[str, Any]:
    """summary.json's `reference.predictions`: where the window's answers were compared with ({} when none)."""
    return (summary.get("reference") or {}).get("predictions") or {}


def describe_answers(summary: dict[str, Any]) -> str:
    """What the window's answers were compared with: 'the production baseline of ...' or 'the val split: why'."""
    info = _answers_reference(summary)
    if info.get("source") == "production":
        return (f"the production baseline of {info['model_version']} ({info['n']} records, "
                f"{info['since']} .. {info['until']})")
    return f"the {info.get('split', 'validation')} split" + (f" ({info['why']})" if info.get("why") else "")


def describe_embedding(emb: dict[str, Any]) -> str:
    """'distance, score 0.829 against 1.042 (a bootstrap null over 27 capture groups)' from an embedding verdict."""
    text = f"{emb['method']}, score {emb['score']:.3f}"
    if emb.get("threshold") is not None:
        text += f" against {emb['threshold']:.3f}"
    if emb.get("n_reference_groups"):
        text += f" (a bootstrap null over {emb['n_reference_groups']} capture groups)"
    elif emb.get("bootstrap"):
        text += " (Evidently's bootstrap null over single images)"
    if emb.get("classes") not in (None, "all"):
        text += f"; images called {emb['classes']}"
    return text


def describe_column_alarm(summary: dict[str, Any]) -> str:
    """'sharpness (a column at 4x its threshold is drift alone)', 'none (...)' or 'off (...)'."""
    factor = summary.get("column_alarm_factor")
    if factor is None:
        return "off (drift.column_alarm_factor)"
    alarms = summary.get("column_alarm") or []
    return f"{', '.join(alarms) or 'none'} (a column at {factor:g}x its threshold is drift alone)"


def artifact_markdown(summary: dict[str, Any]) -> str:
    """Markdown for a Prefect artifact: the verdict, the figures, and links to the reports."""
    verdict = {"drift": "DRIFT DETECTED", "no_drift": "no drift", NOT_ENOUGH: "not enough production data"}
    window = summary["window"]
    lines = [f"## Drift check: {verdict.get(summary['status'], summary['status'])}", "",
             (f"Window {window['since']} .. {window['until']} (UTC): {summary.get('n_current', 0)} predictions, "
              f"{summary.get('skipped_lines', 0)} torn/invalid log lines skipped; model "
              f"{summary.get('model_version') or '-'}, rule `{summary.get('rule')}`."), ""]
    if summary["status"] == NOT_ENOUGH:
        lines += [summary.get("message", ""), ""]
    else:
        lines += [(f"Dataset drift: **{summary['dataset_drift']}** ({summary['drift_share']:.2f} of columns "
                   f"drifted; threshold {summary.get('drift_share_threshold')})"), "",
                  "| column | method | score | threshold | drifted |", "|---|---|---|---|---|"]
        lines += [f"| {c} | {v['method']} | {v['score']:.3f} | {v['threshold']} | {'**yes**' if v['drifted'] else 'no'} |"
                  for c, v in summary["columns"].items()]
        lines += ["", f"Column alarm: {describe_column_alarm(summary)}"]
        emb = summary.get("embedding_drift")
        lines += ["", f"Embedding drift: {'**drifted**' if emb['drifted'] else 'not drifted'} "
                  f"({describe_embedding(emb)})" if emb else "Embedding drift: not computed"]
        lines += ["", f"Answers compared with {describe_answers(summary)}."]
    files = summary.get("files") or {}
    links = [f"[{name}]({Path(files[key]).resolve().as_uri()})" for key, name in
             (("html", "Evidently report"), ("quality", "plant quality report"), ("summary", "summary.json"))
             if files.get(key)]
    lines += ["", "Reports: " + " · ".join(links)]
    if summary.get("mlflow_run_id"):
        lines.append(f"MLflow run: `{summary['mlflow_run_id']}`")
    return "\n".join(lines) + "\n"


__all__ = ["EXIT_DRIFT", "HTML_FILE", "QUALITY_FILE", "SUMMARY_FILE", "DriftCheck", "artifact_markdown",
           "describe_answers", "describe_embedding", "log_to_mlflow", "run_drift_check", "write_summary"]
