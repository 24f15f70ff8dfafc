"""The CLI in-process (Typer's runner): help, exit codes, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from components.cli import app
from tests.conftest import make_imagefolder

runner = CliRunner()


def test_help_lists_the_verbs() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "data" in result.output and "demo" in result.output
    result = runner.invoke(app, ["data", "--help"])
    for verb in ("import", "validate", "manifest", "synth", "push", "status"):
        assert verb in result.output


def test_validate_a_source_passes_then_fails_with_exit_codes(project, tmp_path: Path) -> None:
    source = make_imagefolder(tmp_path / "src", per_class=4)
    out = tmp_path / "result.json"
    ok = runner.invoke(app, ["data", "validate", str(source), "--json", str(out)])
    assert ok.exit_code == 0, ok.output
    assert json.loads(out.read_text())["success"] is True
    (source / "scratch" / "cut.jpg").write_bytes(b"")
    bad = runner.invoke(app, ["data", "validate", str(source)])
    assert bad.exit_code == 1
    assert "cut.jpg" in bad.output and "error:" in bad.output


def test_usage_errors_exit_2_without_traceback(project, tmp_path: Path) -> None:
    missing = runner.invoke(app, ["data", "validate", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "no such file or folder" in missing.output
    assert "Traceback" not in missing.output
    no_data = runner.invoke(app, ["data", "validate"])
    assert no_data.exit_code == 2 and "defectops data import" in no_data.output


@pytest.mark.integration
def test_import_prints_the_version_then_a_no_op(project, tmp_path: Path) -> None:
    source = make_imagefolder(tmp_path / "src", per_class=4)
    first = runner.invoke(app, ["data", "import", str(source)])
    assert first.exit_code == 0, first.output
    assert "dataset version" in first.output and ".dir" in first.output
    again = runner.invoke(app, ["data", "import", str(source)])
    assert again.exit_code == 0 and "nothing new" in again.output
    status = runner.invoke(app, ["data", "status"])
    assert status.exit_code == 0 and "unpushed versions: none" in status.output


def test_library_homes_are_created_under_the_state_root(project, monkeypatch) -> None:
    monkeypatch.delenv("PREFECT_HOME", raising=False)
    monkeypatch.delenv("BENTOML_HOME", raising=False)
    result = runner.invoke(app, ["data", "status"])
    assert result.exit_code == 0, result.output
    assert (project.home_dir / "prefect").is_dir() and (project.home_dir / "bentoml").is_dir()
