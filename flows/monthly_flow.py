"""Prefect flows of the monthly loop: retraining (drift on last month -> ingest -> train-challenger) and the
daily drift check that may start retraining early. Thin over components/ and the other flows.

Rolling an approved champion into the running service is flows/promotion_flow.py's `promote_approved`.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.exceptions import MissingContextError

from components.config import get_settings, load_params
from components.errors import one_line
from components.files import write_text_atomic
from flows.data_flow import ingest_dataset
from flows.training_flow import train_challenger

LAST_RETRAINING = "last-retraining.json"


@task(name="drift-check")
def drift_task(window: str, days: int | None = None, timezone: str = "UTC") -> dict:
    """Drift of the production log (`previous_month` in `timezone`, or the last `days` days, by default
    params.yaml's drift.window_days) against the reference of the model served (the champion before the first
    deployment)."""
    from components.drift.check import artifact_markdown, run_drift_check
    from components.drift.params import drift_params
    from components.drift.window import last_days, previous_month
    from components.errors import ModelNotFound

    settings = get_settings()
    params = load_params(settings.params_file)
    days = days or drift_params(params).window_days
    span = previous_month(timezone=timezone) if window == "previous_month" else last_days(days, timezone=timezone)
    try:
        check = run_drift_check(settings, params, window=span)
    except ModelNotFound as exc:  # no champion yet: reported, not a failure of the loop; any other error fails
        get_run_logger().warning("drift check skipped: %s", exc)
        return {"status": "skipped", "reason": str(exc), "drift": False}
    create_markdown_artifact(key="drift-check", markdown=artifact_markdown(check.summary),
                             description="Production drift vs the training reference")
    keys = ("status", "drift", "dataset_drift", "drifted_columns", "n_current", "skipped_lines")
    return {**{k: check.summary.get(k) for k in keys}, "report_dir": str(check.report_dir)}


@task(name="import-reviewed")
def reviewed_task(labels: str) -> None:
    """Reviewed images (labels CSV) become labelled data through the normal import."""
    from flows.common import run_defectops

    run_defectops(["review", "import", "--labels", labels])


def _logger() -> logging.Logger | logging.LoggerAdapter:
    """The flow run's logger inside a run (so the Prefect UI shows it), else this module's."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


def _record_retraining(summary: dict) -> None:
    """Write last-retraining.json in one rename: a run killed mid-write leaves the previous record."""
    path = get_settings().state_dir / LAST_RETRAINING
    write_text_atomic(path, json.dumps({"at": datetime.now(UTC).isoformat(timespec="seconds"),
                                        "dataset_version": summary.get("dataset_version"),
                                        "version": (summary.get("registered") or {}).get("version")}))


def last_retraining() -> dict | None:
    """When the loop last trained, and on which dataset version; None when never. An unreadable record counts
    as none (with a warning): the cooldown is skipped once, and the next retraining rewrites the file."""
    path = get_settings().state_dir / LAST_RETRAINING
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        if datetime.fromisoformat(record["at"]).tzinfo is None:
            raise ValueError(f"'at' {record['at']!r} has no timezone")
    except (OSError, ValueError, TypeError, KeyError) as exc:
        _logger().warning("%s is unreadable (%s): counted as no retraining yet; the next retraining rewrites it",
                          path, one_line(repr(exc) if isinstance(exc, KeyError) else exc))
        return None
    return record


@flow(name="monthly-retraining", log_prints=True)
def monthly_retraining(new_data: str | None = None, reviewed_labels: str | None = None,
                       profile: str | None = None, force: bool = False, timezone: str = "UTC") -> dict:
    """Check last month's drift, ingest reviewed and new data, version + validate it, train and gate a
    challenger, request approval. Re-running on the same data version registers nothing new unless forced;
    a second run while one is going refuses; a failed step leaves the champion and the service untouched.
    `timezone` is the schedule's (prefect.yaml passes it): last month is the plant's calendar month.

    Drift comes first: its reference is the dataset version the served model was trained on, picked out of data/
    through git; a shallow clone after the imports could only use the new version, which holds last month's own
    reviewed images and would hide their drift."""
    from components.locks import exclusive

    settings = get_settings().ensure()
    with exclusive(settings.locks_dir, "monthly", "a monthly retraining run"):
        drift = drift_task("previous_month", timezone=timezone)
        if reviewed_labels:
            reviewed_task(reviewed_labels)
        dataset = ingest_dataset(source=new_data) if new_data else None
        trained = train_challenger(profile=profile, force=force)
        summary = {"ingested": dataset, "drift_previous_month": drift, **trained}
        _record_retraining(summary)
    return summary


@flow(name="drift-check", log_prints=True)
def drift_check(window_days: int | None = None, trigger_retraining: bool = True, cooldown_days: int = 7,
                timezone: str = "UTC") -> dict:
    """Daily: drift on the last `window_days` (default: params.yaml's drift.window_days); on drift, retrain
    early at most once per cooldown and only when labelled data arrived since the last training (else: the
    review queue needs labelling). `timezone` is the plant's, for its days and the retraining's "last month"."""
    from components.data.tracked import dataset_version

    logger = get_run_logger()
    drift = drift_task("last_days", window_days, timezone=timezone)
    outcome = {"drift": drift, "action": "none"}
    if not drift.get("drift") or not trigger_retraining:
        return outcome
    last = last_retraining()
    current = dataset_version(get_settings().project_root)
    if last and datetime.fromisoformat(last["at"]) > datetime.now(UTC) - timedelta(days=cooldown_days):
        outcome["action"] = f"cooldown: last retraining {last['at']} is within {cooldown_days} days"
    elif last and last.get("dataset_version") == current:
        outcome["action"] = "drift, but no labelled data since the last training: label the review queue"
    else:
        outcome["action"] = "retraining early"
        outcome["retraining"] = monthly_retraining(timezone=timezone)
    logger.info("drift check: %s", outcome["action"])
    return outcome
