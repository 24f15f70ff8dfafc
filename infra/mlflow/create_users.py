"""One-shot (compose service `mlflow-users`): the accounts the project uses on the basic-auth MLflow server.

Run as the admin (MLFLOW_TRACKING_USERNAME/PASSWORD). Idempotent: existing users keep their passwords.

* the pipeline user (PIPELINE_USERNAME): trains and registers; gets EDIT on `defect-classifier`, which the
  registry needs to add versions and tags. EDIT also allows moving an alias: MLflow cannot separate the two,
  which is why serving only pins a champion that carries the approval tags `defectops approve` writes.
  Removing an alias needs MANAGE (it would also allow granting permissions), so `challenger` stays on an
  approved or rejected version until the next registration moves it.
* the serving user (SERVING_USERNAME): reads the pinned version (default_permission READ is enough).

Approvers get their own accounts and EDIT on the model; see infra/README.md.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException, RestException
from mlflow.server import get_app_client

MODEL_NAME = "defect-classifier"
log = logging.getLogger("mlflow-users")


MIN_PASSWORD_CHARS = 12  # the basic-auth app refuses shorter passwords


def _env(name: str, secret: bool = False) -> str:
    value = os.environ.get(name, "").strip()
    if not value:
        sys.exit(f"{name} is not set; set it in infra/.env (see infra/.env.example)")
    if secret and len(value) < MIN_PASSWORD_CHARS:
        sys.exit(f"{name} has {len(value)} characters; MLflow's basic-auth app needs at least "
                 f"{MIN_PASSWORD_CHARS}: set a longer one in infra/.env")
    return value


def wait_for_server(auth, admin: str, seconds: int = 120) -> None:
    """Until the auth API answers the admin (the healthcheck passes a moment before the auth tables do)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            auth.get_user(admin)
            return
        except RestException:
            raise  # the server answered: wrong admin credentials, say so
        except MlflowException as exc:
            if time.monotonic() > deadline:
                raise
            log.info("MLflow not answering yet (%s); retrying", str(exc).splitlines()[0])
            time.sleep(2)


def ensure_user(auth, username: str, password: str) -> None:
    """Create the user unless it exists (an existing user's password is left alone)."""
    try:
        auth.get_user(username)
        log.info("user %s exists; left unchanged", username)
    except RestException:
        auth.create_user(username, password)
        log.info("user %s created", username)


def ensure_model(client: MlflowClient) -> None:
    """Create the registered model as admin, so its permissions are granted here, not taken by the first writer."""
    try:
        client.get_registered_model(MODEL_NAME)
    except MlflowException:
        client.create_registered_model(MODEL_NAME, description="The line's visual defect classifier (defectops).")
        log.info("registered model %s created", MODEL_NAME)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    tracking_uri = _env("MLFLOW_TRACKING_URI")
    pipeline_user, pipeline_password = _env("PIPELINE_USERNAME"), _env("PIPELINE_PASSWORD", secret=True)
    serving_user, serving_password = _env("SERVING_USERNAME"), _env("SERVING_PASSWORD", secret=True)
    auth = get_app_client("basic-auth", tracking_uri=tracking_uri)
    wait_for_server(auth, _env("MLFLOW_TRACKING_USERNAME"))
    ensure_user(auth, pipeline_user, pipeline_password)
    ensure_user(auth, serving_user, serving_password)
    ensure_model(MlflowClient(tracking_uri))
    try:
        auth.grant_user_permission(pipeline_user, "registered_model", MODEL_NAME, "EDIT")
    except RestException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    log.info("%s: EDIT on %s; %s: READ (default)", pipeline_user, MODEL_NAME, serving_user)


if __name__ == "__main__":
    main()
