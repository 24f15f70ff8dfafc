"""What the service serves: the pinned deployment record; refusal when nothing approved exists."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from components.cli import app
from components.config import Settings, load_params
from components.errors import DefectOpsError
from components.serving.deployment import (
    NothingToServe,
    approved_champion,
    ensure_deployment,
    load_served,
    read_record,
    record_path,
)
from tests.serving.conftest import (
    APPROVED,
    PROBES,
    probe_png,
    register_model_file,
    serving_env,
    write_probe_images,
)

pytestmark = pytest.mark.integration


def test_serve_refuses_to_start_when_nothing_is_approved(plant: Settings) -> None:
    result = CliRunner().invoke(app, ["serve", "--port", "1"])
    assert result.exit_code == 1
    assert "nothing approved to serve" in result.output and "defectops approve" in result.output
    assert "Traceback" not in result.output and read_record(plant) is None


@pytest.mark.slow
def test_the_service_itself_stops_without_a_deployment_record(plant: Settings) -> None:
    """`bentoml serve` started directly (no `defectops serve` check) exits instead of restarting forever."""
    command = [sys.executable, "-m", "bentoml", "serve", "components.serving.service:DefectClassifier",
               "--host", "127.0.0.1", "--port", "1"]
    process = subprocess.Popen(command, env=serving_env(plant.project_root, plant.home_dir), cwd=plant.project_root,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise AssertionError("the service kept running without a deployment record") from None
    assert b"nothing approved to serve" in output


def test_a_corrupt_record_is_a_clear_error(plant: Settings) -> None:
    record_path(plant).parent.mkdir(parents=True)
    record_path(plant).write_text("{not json")
    with pytest.raises(DefectOpsError, match="unreadable deployment record"):
        read_record(plant)


@pytest.mark.slow
def test_serve_pins_the_approved_champion_and_alias_moves_change_nothing(plant: Settings, tiny_model: Path,
                                                                          tmp_path: Path) -> None:
    from components.registry.tracking import MODEL_NAME, connect
    from tests.serving.conftest import make_tiny_model

    params = load_params(plant.params_file)
    first = register_model_file(plant, tiny_model, {"approval_status": "pending"})
    second = register_model_file(plant, make_tiny_model(tmp_path / "v2" / "model.pt", threshold=0.6, seed=1),
                       APPROVED)
    client = connect(plant)
    client.set_registered_model_alias(MODEL_NAME, "champion", first)
    with pytest.raises(NothingToServe, match=f"version {first} holds 'champion' but its approval_status is 'pending'"):
        approved_champion(plant)

    client.set_model_version_tag(MODEL_NAME, first, "approval_status", "approved")
    with pytest.raises(NothingToServe, match="lacks the approval tags approved_by, approved_at"):
        approved_champion(plant)  # an alias and a status set by hand are not an approval
    client.set_model_version_tag(MODEL_NAME, first, "approved_by", "qa")
    client.set_model_version_tag(MODEL_NAME, first, "approved_at", "2026-11-23T08:00:00+00:00")
    write_probe_images(plant)
    record, created = ensure_deployment(plant, params)
    assert created and record.model_uri == f"models:/{MODEL_NAME}/{first}"
    assert record.model_version == f"{MODEL_NAME}/{first}" and record.threshold == pytest.approx(0.8)
    assert record.fast_path == "onnxruntime" and record.parity["passed"] and record.parity["n_images"] == 3

    client.set_registered_model_alias(MODEL_NAME, "champion", second)  # the alias moves ...
    again, created = ensure_deployment(plant, params)
    assert not created and again == record  # ... the record does not
    served, _, engine = load_served(plant, again, params.data.max_image_pixels)  # what a restart loads
    assert served.model_version == f"{MODEL_NAME}/{first}" and engine == "onnxruntime"
    assert served.predict([probe_png("dark")])[0].decision == PROBES["dark"][1]
    # a replica on another kind of CPU, where the engine would run a precision parity never checked: fp32
    elsewhere = again.model_copy(update={"parity": {**again.parity, "precision": "bf16"}})
    served, _, engine = load_served(plant, elsewhere, params.data.max_image_pixels)
    assert engine == "fp32" and served.predict([probe_png("dark")])[0].decision == PROBES["dark"][1]
