"""Prefect flow: deploy the approved champion into the running service when it is not deployed yet.

Scheduled every few minutes (prefect.yaml), so an engineer's approval reaches the line without anyone
running a command. Thin over components/serving/promotion.py. No champion yet: nothing to do (not a failure);
a champion without the approval tags (an alias moved in the MLflow UI only): the run fails, saying so. A
champion the service refused (its run failed) is skipped with a warning until it is approved anew (a new
approved_at), or until the flow is run with `force=true` once the cause is fixed.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from components.config import get_settings, load_params


@task(name="promote-champion")
def promote_task(by: str, service_url: str | None, bento: bool, force: bool = False) -> dict:
    """Parity, Bento, deployment record, hot swap, tags (components.serving.promotion.promote)."""
    from components.serving.deployment import NotApproved, NothingToServe
    from components.serving.promotion import RefusedBefore, promote

    settings = get_settings().ensure()
    try:
        return promote(settings, load_params(settings.params_file), by, service_url, bento=bento,
                       force=force).as_dict()
    except NotApproved:
        raise
    except NothingToServe as exc:  # no champion yet: the normal state before the first approval
        get_run_logger().info("nothing to promote: %s", exc)
        return {"changed": False, "service": "nothing approved", "reason": str(exc)}
    except RefusedBefore as exc:  # the run that was refused failed already; failing every 5 minutes adds nothing
        get_run_logger().warning("%s", exc)
        return {"changed": False, "service": "skipped", "reason": str(exc)}


def deployment_markdown(result: dict) -> str:
    """What was deployed, where, and how to go back."""
    return "\n".join([
        f"# Deployed `{result['model_version']}`", "",
        f"* replaced: {result['previous'] or 'nothing'}",
        f"* engine: {result['fast_path']}; Bento: `{result['bento'] or 'not built'}`",
        f"* service at {result['service_url']}: {result['service']}"
        + (f" on {result['replicas']} replica(s)" if result.get("replicas") else ""),
        f"* took {result['seconds']:.0f} s"
        + (" (completed the tags and audit line of a deployment an earlier run left unrecorded)"
           if result.get("completed") else ""), "",
        "To go back: `defectops rollback --by <your name> --reason \"...\"`",
    ])


@flow(name="promote-approved", log_prints=True)
def promote_approved(by: str = "promote-approved flow", service_url: str | None = None, bento: bool = True,
                     force: bool = False) -> dict:
    """Roll the approved champion into the service (hot swap) and record the deployment; `force` retries a
    champion the service refused before."""
    result = promote_task(by, service_url, bento, force)
    if result.get("changed"):
        create_markdown_artifact(key="deployment", markdown=deployment_markdown(result),
                                 description="The model version rolled into the line's service")
        get_run_logger().info("deployed %s (%s)", result["model_version"], result["service"])
    return result
