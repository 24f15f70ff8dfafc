"""The promote-approved flow under a real Prefect server: quiet with nothing approved, failing on a UI-only alias."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.serving.conftest import make_tiny_model, register_model_file

pytestmark = pytest.mark.integration


def test_nothing_approved_yet_is_not_a_failure(project, prefect_server) -> None:
    from flows.promotion_flow import promote_approved

    project.ensure()
    result = promote_approved(bento=False)
    assert result["changed"] is False and result["service"] == "nothing approved"
    assert "no defect-classifier@champion" in result["reason"] and "defectops approve" in result["reason"]


def test_a_champion_moved_without_approval_fails_the_run(project, tmp_path: Path, prefect_server) -> None:
    from prefect.states import StateType

    from components.registry.tracking import MODEL_NAME, connect
    from components.serving.deployment import read_record
    from flows.promotion_flow import promote_approved

    version = register_model_file(project, make_tiny_model(tmp_path / "model.pt"),
                                  {"gate_status": "passed", "approval_status": "pending"})
    connect(project).set_registered_model_alias(MODEL_NAME, "champion", version)  # a click in the MLflow UI
    state = promote_approved(bento=False, return_state=True)
    assert state.type == StateType.FAILED
    assert f"version {version} holds 'champion' but its approval_status is 'pending'" in state.message
    assert read_record(project) is None
