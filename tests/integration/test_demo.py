"""The main command end to end on small data: retrain, approve only past the gate, promote, serve, drift, stop."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import make_imagefolder
from tests.integration.test_training_flow import TINY_PROFILE
from tests.serving.conftest import free_port

pytestmark = pytest.mark.integration


def _demo_params(settings, gate: dict) -> None:
    """The tiny training profile; gate minimums as given (these tests check the loop, not model quality)."""
    params = yaml.safe_load(settings.params_file.read_text())
    params["train"]["profile"] = "tiny"
    params["train"]["profiles"]["tiny"] = TINY_PROFILE
    params["evaluate"]["n_boot"] = 50
    params["evaluate"]["gate"].update(gate)
    params["drift"]["min_current"] = 5
    params["serve"]["parity"]["images"] = 20
    settings.params_file.write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.slow
def test_demo_runs_the_whole_loop_and_stops_the_service(project, tmp_path: Path, prefect_server) -> None:
    from components.registry.tracking import MODEL_NAME, connect
    from components.serving.deployment import read_record
    from flows.demo_flow import DEMO_USER, run_demo

    _demo_params(project, {"min_macro_f1": 0.0, "min_defect_detection_rate": 0.0, "max_false_alarm_rate": 1.0})
    port, lines = free_port(), []
    outcome = run_demo(project, project.params_file, str(make_imagefolder(tmp_path / "data", per_class=12)),
                       None, port, keep_serving=False, images=50, echo=lines.append)

    version = outcome["approved"]
    champion = connect(project).get_model_version_by_alias(MODEL_NAME, "champion")
    assert str(champion.version) == version and champion.tags["approved_by"] == DEMO_USER
    assert champion.tags["deployment_status"] == "serving"
    assert read_record(project).model_version == f"{MODEL_NAME}/{version}"
    for name in ("clean", "shifted"):
        sent = outcome["sent"][name]
        assert sent["images"] > 0 and sent["fail_safe"] == 0, sent
        assert sum(sent["decisions"].values()) == sent["images"]
        assert outcome["drift"][name]["n"] == sent["images"]
        assert (Path(outcome["drift"][name]["report_dir"]) / "summary.json").is_file()
    assert any(line.startswith("[7/7] stopping the service") for line in lines)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)


@pytest.mark.slow
def test_demo_stops_at_a_failed_gate_with_the_reasons(project, tmp_path: Path, prefect_server) -> None:
    from components.registry.tracking import MODEL_NAME, connect
    from components.serving.deployment import read_record
    from flows.demo_flow import GateFailed, run_demo

    _demo_params(project, {"min_macro_f1": 1.0, "min_defect_detection_rate": 1.0, "max_false_alarm_rate": 0.0})
    lines: list[str] = []
    with pytest.raises(GateFailed, match="did not pass the gate, so the demo approves nothing"):
        run_demo(project, project.params_file, str(make_imagefolder(tmp_path / "data", per_class=6)), None,
                 free_port(), keep_serving=False, images=10, echo=lines.append)
    assert any("FAILED" in line for line in lines), lines
    assert "champion" not in connect(project).get_registered_model(MODEL_NAME).aliases
    assert read_record(project) is None
