"""The MLflow connection: the embedded sqlite store by default, a tracking server when MLFLOW_TRACKING_URI says so.

`connect` is the only place that sets the tracking URI; it makes sure the `defectops` experiment exists (its
artifacts under the state root for a local store) and fails fast, with a message saying what to do, when a
server does not answer, instead of letting MLflow's own HTTP retries run for minutes.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from components.config import Settings
from components.errors import DefectOpsError

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

MODEL_NAME = "defect-classifier"
EXPERIMENT_NAME = "defectops"
REACH_ATTEMPTS = 3
REACH_TIMEOUT_S = 3.0
REACH_BACKOFF_S = 0.5  # 0.5 s, then 1 s between attempts


def is_remote(uri: str) -> bool:
    """True for a tracking server (http/https/databricks), False for a local sqlite/file store."""
    return urlparse(uri).scheme in {"http", "https", "databricks"}


def _local_artifact_location(settings: Settings) -> str:
    folder = settings.mlflow_dir / "artifacts"
    folder.mkdir(parents=True, exist_ok=True)
    return folder.as_uri()


def check_reachable(uri: str, attempts: int = REACH_ATTEMPTS) -> None:
    """GET <server>/health a few times with a short backoff; DefectOpsError when it never answers."""
    import httpx

    if urlparse(uri).scheme not in {"http", "https"}:
        return
    health = uri.rstrip("/") + "/health"
    problem = "no answer"
    for attempt in range(1, attempts + 1):
        try:
            response = httpx.get(health, timeout=REACH_TIMEOUT_S)
            if response.status_code < 500:
                return
            problem = f"HTTP {response.status_code} from /health"
        except httpx.HTTPError as exc:
            problem = f"{type(exc).__name__}: {exc}".splitlines()[0]
        log.debug("MLflow server %s not reachable (attempt %d/%d): %s", uri, attempt, attempts, problem)
        if attempt < attempts:
            time.sleep(REACH_BACKOFF_S * 2 ** (attempt - 1))
    raise DefectOpsError(f"MLflow tracking server at {uri} is unreachable ({problem}); start it or unset "
                         "MLFLOW_TRACKING_URI to use the embedded store")


def _ensure_experiment(client: MlflowClient, settings: Settings, uri: str) -> str:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(EXPERIMENT_NAME)
    if experiment is not None:
        return experiment.experiment_id
    location = None if is_remote(uri) else _local_artifact_location(settings)
    try:
        return client.create_experiment(EXPERIMENT_NAME, artifact_location=location)
    except MlflowException:  # created by a concurrent process in between
        experiment = client.get_experiment_by_name(EXPERIMENT_NAME)
        if experiment is None:
            raise
        return experiment.experiment_id


def connect(settings: Settings) -> MlflowClient:
    """Point MLflow at the configured store, ensure the `defectops` experiment, and return a client."""
    import mlflow
    from mlflow import MlflowClient

    uri = settings.tracking_uri
    if not is_remote(uri):
        settings.mlflow_dir.mkdir(parents=True, exist_ok=True)
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        experiment_id = _ensure_experiment(client, settings, uri)
    except DefectOpsError:
        raise
    except Exception as exc:  # database, network and permission errors all mean 'not usable'
        detail = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        raise DefectOpsError(f"MLflow tracking store {uri} is not usable ({detail}); fix it or unset "
                             "MLFLOW_TRACKING_URI to use the embedded store") from exc
    mlflow.set_experiment(experiment_id=experiment_id)
    log.debug("MLflow tracking %s, experiment %s (%s)", uri, EXPERIMENT_NAME, experiment_id)
    return client
