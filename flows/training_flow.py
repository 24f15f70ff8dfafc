"""Prefect flow: validate the tracked data, train a challenger, register it with the gate vs the champion,
and ask an ML engineer to approve. Thin over components/; nothing here moves `champion`."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from components.config import get_settings, load_params
from flows.common import run_defectops


@task(name="validate-tracked-data")
def validate_task() -> str:
    """The tracked dataset must pass its suite before anything trains."""
    from components.data.tracked import tracked_data
    from components.errors import ValidationFailed
    from components.validation.suite import validate_manifest

    settings = get_settings()
    params = load_params(settings.params_file)
    tracked = tracked_data(settings, params)
    version = tracked.version or "untracked"
    report = validate_manifest(tracked.manifest, params.profile, params.validate_, None,
                               settings.dataset_report_dir(version))
    if not report.success:
        raise ValidationFailed(f"dataset {version} fails validation, not training on it: {report.failures[0]}",
                               report.failures[1:])
    return version


@task(name="already-trained", retries=2, retry_delay_seconds=10)
def already_trained_task(profile: str | None) -> dict | None:
    """A registered version trained from the same data and params (then training is skipped unless forced)."""
    from components.registry.registry import find_trained
    from components.training.calibrate import training_fingerprint

    settings = get_settings()
    found = find_trained(settings, training_fingerprint(settings, load_params(settings.params_file), profile))
    return _registered(found) if found else None


def _registered(result) -> dict:
    return {"version": result.version, "created": result.created, "gate_passed": result.gate_passed,
            "gate_reasons": result.gate_reasons, "compared_with": result.compared_with,
            "approval_status": result.approval_status, "metrics": result.metrics,
            "comparison_path": str(result.comparison_path) if result.comparison_path else None}


@task(name="train-and-calibrate")
def train_task(profile: str | None, resume: bool, out_dir: str) -> dict:
    """`defectops train` (train, early stop on val, calibrate on val) in its own process; a NaN loss fails here."""
    import json

    args = ["train", "--out", out_dir, *(["--profile", profile] if profile else []), *(["--resume"] if resume else [])]
    run_defectops(args)
    metrics = json.loads((Path(out_dir) / "train_metrics.json").read_text())
    calibration = json.loads((Path(out_dir) / "calibration.json").read_text())
    return {**{k: metrics.get(k) for k in ("best_val_macro_f1", "epochs", "seconds", "profile")},
            "calibration": calibration}


@task(name="register-and-gate", retries=2, retry_delay_seconds=10)
def register_task(out_dir: str, force: bool) -> dict:
    """Register the model as `challenger` and judge it against the champion (retried: the registry may be away)."""
    from prefect.runtime import task_run

    from components.registry.registry import register

    settings = get_settings()
    # its retries share the task run id: a forced registration retried after it created the version returns it
    origin = f"prefect task run {task_run.get_id()}" if task_run.get_id() else None
    return _registered(register(settings, load_params(settings.params_file), Path(out_dir), force=force,
                                origin=origin))


def approval_markdown(registered: dict, dataset_version: str) -> str:
    """The approval request: the comparison, and exactly how a person approves or rejects."""
    version = registered["version"]
    state = "waiting for approval" if registered["gate_passed"] else "gate FAILED"
    lines = [f"# Challenger `defect-classifier` v{version}: {state}", "",
             f"* dataset version: `{dataset_version}`",
             f"* compared with: {registered['compared_with']}",
             f"* comparison report: `{registered['comparison_path']}`", "", "## Gate", ""]
    lines += [f"* {reason}" for reason in registered["gate_reasons"]]
    if registered["gate_passed"]:
        cli = (f"* CLI: `defectops approve {version} --by <your name> --note \"<why>\"` "
               f"(or `defectops reject {version} --by <name> --reason \"...\"`)")
        ui = (f"* MLflow UI: Models > defect-classifier > Version {version} > Aliases > add `champion`, "
              "then run `defectops approve` to record who and why (MLflow keeps no alias history).")
        lines += ["", "## How to approve (an ML engineer, never the pipeline)", "", cli, ui]
    return "\n".join(lines)


@flow(name="train-challenger", log_prints=True)
def train_challenger(profile: str | None = None, resume: bool = False, force: bool = False,
                     out_dir: str = "artifacts/train") -> dict:
    """Validate, train, register, compare, and request approval."""
    logger = get_run_logger()
    settings = get_settings()
    target = Path(out_dir) if Path(out_dir).is_absolute() else settings.project_root / out_dir
    dataset_version = validate_task()
    existing = None if force else already_trained_task(profile)
    if existing is not None:
        logger.info("v%s was already trained from this data and these params; not training again (force=True "
                    "to retrain)", existing["version"])
        return {"dataset_version": dataset_version, "training": None, "registered": existing, "skipped": True}
    trained = train_task(profile, resume, str(target))
    registered = register_task(str(target), force)
    create_markdown_artifact(key="approval-request", markdown=approval_markdown(registered, dataset_version),
                             description="Champion/challenger comparison and how to approve")
    logger.info("challenger v%s: gate %s", registered["version"], "passed" if registered["gate_passed"] else "FAILED")
    return {"dataset_version": dataset_version, "training": trained, "registered": registered, "skipped": False}
