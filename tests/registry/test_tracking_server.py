"""The registry on a real MLflow tracking server, as the plant runs it (infra/docker-compose.yml): the basic-auth
app, artifacts proxied by the server to an S3 bucket (moto's S3 server standing in for MinIO), the accounts
infra/mlflow/create_users.py makes. The pipeline account
registers and approves, the serving account reads the champion and cannot write."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO_ROOT, S3_KEYS, s3_server
from tests.registry.conftest import LENIENT_GATE, make_train_dir, params_with_gate
from tests.serving.conftest import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ADMIN = ("admin", "admin-password-0123")
PIPELINE = ("pipeline", "pipeline-password-0123")
SERVING = ("serving", "serving-password-0123")


@dataclass
class TrackingServer:
    url: str
    s3: Any  # boto3 client of the artifact store
    log: Path


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrackingServer]:
    """`mlflow server --app-name basic-auth` on 127.0.0.1 (sqlite for tracking and accounts, artifacts in the S3
    bucket `mlflow` as in infra/docker-compose.yml), users created. Only the server holds S3 keys."""
    from components.serving.run import stop_background, wait_until_ready

    base = tmp_path_factory.mktemp("mlflow-server")
    ini = (REPO_ROOT / "infra" / "mlflow" / "basic_auth.ini").read_text()
    ini = ini.replace("sqlite:////var/lib/mlflow-auth/basic_auth.db", f"sqlite:///{base / 'basic_auth.db'}")
    (base / "basic_auth.ini").write_text(ini)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with s3_server("mlflow") as (endpoint, s3):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
        env.update({**S3_KEYS, "MLFLOW_S3_ENDPOINT_URL": endpoint,
                    "MLFLOW_AUTH_CONFIG_PATH": str(base / "basic_auth.ini"), "MLFLOW_AUTH_ADMIN_USERNAME": ADMIN[0],
                    "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN[1], "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-secret-key",
                    "HOME": str(base / "user-home")})
        log = base / "server.log"
        with log.open("ab") as sink:
            server = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--host", "127.0.0.1",
                 "--port", str(port), "--workers", "1", "--backend-store-uri", f"sqlite:///{base / 'mlflow.db'}",
                 "--artifacts-destination", "s3://mlflow/artifacts"],
                cwd=base, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_until_ready(server, f"{url}/health", log, timeout_s=120)
            users = {k: v for k, v in env.items() if not k.startswith("AWS_")}  # clients hold no S3 keys
            users.update(MLFLOW_TRACKING_URI=url, MLFLOW_TRACKING_USERNAME=ADMIN[0], MLFLOW_TRACKING_PASSWORD=ADMIN[1],
                         PIPELINE_USERNAME=PIPELINE[0], PIPELINE_PASSWORD=PIPELINE[1], SERVING_USERNAME=SERVING[0],
                         SERVING_PASSWORD=SERVING[1])
            for _ in range(2):  # idempotent: a second run changes nothing and does not fail
                made = subprocess.run([sys.executable, str(REPO_ROOT / "infra" / "mlflow" / "create_users.py")],
                                      env=users, capture_output=True, text=True, timeout=120, check=False)
                assert made.returncode == 0, made.stdout + made.stderr
            yield TrackingServer(url, s3, log)
        finally:
            stop_background(server, timeout_s=20)


def _as(monkeypatch: pytest.MonkeyPatch, server: TrackingServer, account: tuple[str, str]):
    """Settings of the shared tracked project, talking to `server` as `account`."""
    from components.config import get_settings

    for key in S3_KEYS:  # clients reach the artifacts through the server only
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", account[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", account[1])
    return get_settings()


def test_pipeline_registers_and_approves_serving_reads_and_cannot_write(
        tracking_server: TrackingServer, tracked_project: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from components.config import load_params
    from components.errors import DefectOpsError
    from components.registry.registry import (
        approve,
        audit_trail,
        list_versions,
        load_predictor,
        register,
        reject,
    )
    from components.serving.deployment import ensure_deployment, load_served

    monkeypatch.setenv("DEFECTOPS_PROJECT", str(tracked_project))
    monkeypatch.setenv("DEFECTOPS_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    pipeline = _as(monkeypatch, tracking_server, PIPELINE)
    gate = params_with_gate(pipeline, **LENIENT_GATE)
    first = register(pipeline, gate, make_train_dir(tmp_path / "train-1", seed=1))
    assert first.created and first.gate_passed and first.approval_status == "pending"
    # EDIT (what create_users.py grants) moves aliases but may not remove one: `challenger` stays, said so
    assert reject(pipeline, first.version, by="bob", reason="misses the cracks")["challenger_removed"] is False
    assert {row["version"]: row for row in list_versions(pipeline)}[first.version]["approval_status"] == "rejected"
    outcome = approve(pipeline, first.version, by="alice", note="the cracks were mislabelled", force=True)
    assert outcome["changed"] and outcome["challenger_removed"] is False
    [row] = list_versions(pipeline)
    assert sorted(row["aliases"]) == ["challenger", "champion"] and row["approval_status"] == "approved"
    assert [e["action"] for e in audit_trail(pipeline)] == ["register", "reject", "approve"]
    assert not (tmp_path / "home" / "mlflow").exists(), "nothing may go to the embedded store"
    stored = [o["Key"] for o in tracking_server.s3.list_objects_v2(Bucket="mlflow")["Contents"]]
    assert sum(key.endswith("/MLmodel") for key in stored) == 1, "the model's files live in the server's bucket"

    serving = _as(monkeypatch, tracking_server, SERVING)
    predictor = load_predictor(serving, "champion")
    assert predictor.model_version == f"defect-classifier/{first.version}"
    record, pinned = ensure_deployment(serving, load_params(serving.params_file))  # what `defectops serve` does
    assert pinned and record.model_uri == f"models:/defect-classifier/{first.version}"
    engine, _, _ = load_served(serving, record, 1_000_000)  # what the service does at start
    assert engine.model_version == f"defect-classifier/{first.version}"
    with pytest.raises(DefectOpsError, match="refused to register a model for the account serving: it needs EDIT"):
        register(serving, gate, make_train_dir(tmp_path / "train-3", seed=3))
    [row] = list_versions(serving)
    assert row["approval_status"] == "approved", "a refused registration leaves no version behind"
