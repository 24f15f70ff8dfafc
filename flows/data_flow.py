"""Prefect flow: import new images, validate them with the tracked ones, version with DVC (thin over components)."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from components.config import get_settings, load_params


@task(name="import-validate-version")
def import_task(source: str, commit: bool, push: bool) -> dict:
    """Validate SOURCE with the tracked images, then add, version, commit and push it."""
    from components.data.importer import import_data

    settings = get_settings()
    result = import_data(source, settings, load_params(settings.params_file), commit_changes=commit, push=push)
    return {
        "dataset_version": result.version, "previous_version": result.previous_version, "changed": result.changed,
        "added": result.added, "already_tracked": result.skipped, "committed": result.committed,
        "pushed": result.pushed, "push_message": result.push_message,
        "report_dir": str(result.report_dir) if result.report_dir else None, "images_per_class": result.counts,
    }


@flow(name="ingest-dataset", log_prints=True)
def ingest_dataset(source: str, commit: bool = True, push: bool = True) -> dict:
    """Import, validate and version a dataset; usable alone or as a subflow of the monthly retraining."""
    logger = get_run_logger()
    summary = import_task(source, commit, push)
    state = "new version" if summary["changed"] else "unchanged"
    logger.info("dataset %s: %s", state, summary["dataset_version"])
    rows = "\n".join(f"| {k} | {v} |" for k, v in summary["images_per_class"].items())
    create_markdown_artifact(
        key="dataset-version",
        markdown=(f"# Dataset {summary['dataset_version']} ({state})\n\n* source: `{source}`\n"
                  f"* added: {summary['added']}, already tracked: {summary['already_tracked']}\n"
                  f"* pushed: {summary['pushed']} {summary['push_message']}\n"
                  f"* validation report: `{summary['report_dir']}`\n\n| class | images |\n|---|---|\n{rows}\n"),
        description="Dataset version recorded by the ingest flow",
    )
    return summary
