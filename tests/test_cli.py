"""The CLI in-process (Typer's runner): help, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
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


def test_unwritable_json_and_missing_manifest_are_one_line_usage_errors(project, tmp_path: Path) -> None:
    source = make_imagefolder(tmp_path / "src", per_class=4)
    folder = runner.invoke(app, ["data", "validate", str(source), "--json", str(tmp_path)])
    assert folder.exit_code == 2 and "is a folder; give a file path" in folder.output
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    below_a_file = runner.invoke(app, ["data", "validate", str(source), "--json", str(blocked / "out.json")])
    assert below_a_file.exit_code == 2 and "cannot create" in below_a_file.output
    missing = runner.invoke(app, ["data", "validate", "--manifest", str(tmp_path / "none.parquet")])
    assert missing.exit_code == 2 and "no such manifest" in missing.output
    not_parquet = runner.invoke(app, ["data", "validate", "--manifest", str(blocked)])
    assert not_parquet.exit_code == 2 and "not a readable Parquet manifest" in not_parquet.output
    for result in (folder, below_a_file, missing, not_parquet):
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_demo_and_synth_refuse_bad_arguments_before_any_work(project, tmp_path: Path) -> None:
    nowhere = runner.invoke(app, ["demo", "--source", str(tmp_path / "nope")])
    assert nowhere.exit_code == 2 and "no such file or folder" in nowhere.output
    assert len(nowhere.output.strip().splitlines()) == 1, "refused before a Prefect server starts"
    none = runner.invoke(app, ["data", "synth", str(tmp_path / "synth"), "--count", "0"])
    assert none.exit_code == 2 and "count" in none.output and not (tmp_path / "synth").exists()


def test_a_sigterm_unwinds_a_command_like_ctrl_c(tmp_path: Path) -> None:
    """`kill PID` (a container stop, a CI timeout) runs the command's clean-up, then exits 130 in one line.
    In a process of its own: the signal goes to the whole process."""
    import subprocess
    import sys
    import textwrap

    marker = tmp_path / "cleaned"
    script = tmp_path / "long_command.py"
    script.write_text(textwrap.dedent("""
        import os, signal, sys, time
        from pathlib import Path

        import typer

        from components.cli import friendly

        @friendly
        def long_command():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(30)
            finally:
                Path(sys.argv[1]).write_text("half-written work removed")

        try:
            long_command()
        except typer.Exit as stopped:
            sys.exit(stopped.exit_code)
    """))
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(script), str(marker)], cwd=root, capture_output=True, text=True,
                          timeout=120, check=False, env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip() == "error: interrupted; nothing half-written was kept, run the command again"
    assert marker.read_text() == "half-written work removed"


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


def test_approve_force_help_names_everything_it_overrides() -> None:
    result = runner.invoke(app, ["approve", "--help"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.replace("│", " ").split())
    for overridden in ("gate failed", "stale", "rejected", "rolled the version back", "--note"):
        assert overridden in text, overridden
