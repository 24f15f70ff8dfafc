"""The CLI's one-line errors where a library or the environment fails: DVC's lock and configuration, a bad
variable, a conflicted data.dvc, bad output paths, unreadable sources; and the data commands that must take the
data lock or settle an interrupted import before they answer. Real git + DVC projects, DVC never mocked."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from components.cli import app
from components.locks import exclusive
from tests.conftest import REPO_ROOT, make_imagefolder

runner = CliRunner()


def _one_line_error(result: Result, code: int) -> str:
    """The single `error:` line of a command that failed with `code`, not an exception escaping it."""
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), f"escaped: {result.exception!r}"
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


def _imported(tmp_path: Path) -> str:
    """Import a small ImageFolder through the CLI; returns the line naming the new version."""
    result = runner.invoke(app, ["data", "import", str(make_imagefolder(tmp_path / "batch1", per_class=4))])
    assert result.exit_code == 0, result.output
    return next(line for line in result.stdout.splitlines() if line.startswith("dataset version"))


def _version(line: str) -> str:
    return next(word for word in line.split() if word.endswith(".dir"))


# ------------------------------------------------------------------ DVC's own errors


@pytest.mark.integration
def test_dvcs_lock_held_by_another_operation_is_one_line(project, tmp_path: Path) -> None:
    import zc.lockfile

    _imported(tmp_path)
    held = zc.lockfile.LockFile(str(project.project_root / ".dvc" / "tmp" / "lock"))  # as a running `dvc` does
    try:
        status = runner.invoke(app, ["data", "status"])
    finally:
        held.close()
    line = _one_line_error(status, 1)
    assert "another DVC operation holds the lock" in line and "wait for it" in line
    assert runner.invoke(app, ["data", "status"]).exit_code == 0, "once the lock is free the command works"


def test_a_remote_url_dvc_refuses_names_the_variable(project, monkeypatch) -> None:
    monkeypatch.setenv("DEFECTOPS_DVC_REMOTE", "foo://bar")
    line = _one_line_error(runner.invoke(app, ["data", "push"]), 2)
    assert "DEFECTOPS_DVC_REMOTE=foo://bar" in line and "foo://" in line


def test_any_other_dvc_error_is_one_line_with_dvcs_reason(project) -> None:
    data = project.data_dir / "images" / "normal"
    data.mkdir(parents=True)
    (data / "a.png").write_bytes(b"x")
    runner.invoke(app, ["data", "push"])  # initialises DVC in the project
    (project.project_root / "data.dvc").write_text("bogus: 1\nouts:\n- md5: 0123.dir\n  path: data\n")
    line = _one_line_error(runner.invoke(app, ["data", "status"]), 1)
    assert line.startswith("error: DVC failed:") and "validation failed" in line and "bogus" in line


# ------------------------------------------------------------------ the environment and data.dvc


def test_a_bad_variable_is_one_line_naming_it_even_for_help(project, tmp_path: Path) -> None:
    workers = runner.invoke(app, ["train", "--help"], env={"DEFECTOPS_WORKERS": "abc"})
    line = _one_line_error(workers, 2)
    assert "DEFECTOPS_WORKERS='abc'" in line and "integer" in line
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    home = runner.invoke(app, ["data", "status"], env={"DEFECTOPS_HOME": str(blocker / "state")})
    line = _one_line_error(home, 2)
    assert "DEFECTOPS_HOME=" in line and f"{blocker} is a file" in line


def test_a_state_root_under_a_file_is_one_line_in_a_real_process(project, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = {**os.environ, "DEFECTOPS_HOME": str(blocker / "state"), "PYTHONPATH": str(REPO_ROOT)}
    for var in ("PREFECT_HOME", "BENTOML_HOME", "MPLCONFIGDIR"):  # so the callback makes its folders under it
        env.pop(var, None)
    done = subprocess.run([sys.executable, "-m", "components.cli", "data", "--help"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and "DEFECTOPS_HOME" in done.stderr


CONFLICTED = """\
<<<<<<< HEAD
outs:
- md5: 0123456789abcdef0123456789abcdef.dir
  path: data
=======
outs:
- md5: fedcba9876543210fedcba9876543210.dir
  path: data
>>>>>>> origin/main
"""


def test_a_data_dvc_with_merge_conflict_markers_is_one_line(project) -> None:
    (project.project_root / "data.dvc").write_text(CONFLICTED)
    for command in (["data", "status"], ["data", "pull"], ["data", "manifest"]):
        line = _one_line_error(runner.invoke(app, command), 2)
        assert "data.dvc is not valid YAML" in line and "merge conflict" in line and "git checkout" in line
    (project.project_root / "data.dvc").write_text("- not\n- a DVC record\n")
    line = _one_line_error(runner.invoke(app, ["data", "status"]), 2)
    assert "does not read as DVC's record of data/" in line


# ------------------------------------------------------------------ data commands


@pytest.mark.integration
def test_manifest_out_is_checked_first_and_written_whole(project, tmp_path: Path, monkeypatch) -> None:
    import pandas as pd

    _imported(tmp_path)
    folder = _one_line_error(runner.invoke(app, ["data", "manifest", "--out", str(tmp_path)]), 2)
    assert "is a folder; give a file path" in folder
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    under = _one_line_error(runner.invoke(app, ["data", "manifest", "--out", str(blocker / "m.parquet")]), 2)
    assert "cannot create" in under and "is a file" in under

    out = tmp_path / "manifest.parquet"
    assert runner.invoke(app, ["data", "manifest", "--out", str(out)]).exit_code == 0
    before = out.read_bytes()

    def half_then_interrupted(self, path, *args, **kwargs):
        Path(path).write_bytes(b"PAR1 half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(pd.DataFrame, "to_parquet", half_then_interrupted)
    _one_line_error(runner.invoke(app, ["data", "manifest", "--out", str(out)]), 130)
    assert out.read_bytes() == before, "the previous manifest stands"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".manifest")) == []


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_validate_an_unreadable_source_is_a_usage_error_not_a_failure(project, tmp_path: Path) -> None:
    archive = tmp_path / "batch.zip"
    archive.write_text("not a zip")
    assert "not a .zip" in _one_line_error(runner.invoke(app, ["data", "validate", str(archive)]), 2)
    url = f"http://127.0.0.1:{_closed_port()}/batch.zip"
    assert "unreachable" in _one_line_error(runner.invoke(app, ["data", "validate", url]), 2)


def test_validate_refuses_a_source_and_a_manifest_together(project, tmp_path: Path) -> None:
    source = make_imagefolder(tmp_path / "src", per_class=4)
    both = runner.invoke(app, ["data", "validate", str(source), "--manifest", str(tmp_path / "m.parquet")])
    assert "not both" in _one_line_error(both, 2)


def test_data_push_waits_for_the_data_lock(project) -> None:
    with exclusive(project.locks_dir, "data", "a dataset import"):
        line = _one_line_error(runner.invoke(app, ["data", "push"]), 1)
    assert "already running" in line and f"pid {os.getpid()}" in line
    assert runner.invoke(app, ["data", "push"]).exit_code == 0


@pytest.mark.integration
def test_review_import_says_when_its_push_failed(project, tmp_path: Path, monkeypatch) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the remote folder should be")
    monkeypatch.setenv("DEFECTOPS_DVC_REMOTE", str(blocker / "remote"))
    reviewed = make_imagefolder(tmp_path / "reviewed", per_class=4)
    result = runner.invoke(app, ["review", "import", "--folder", str(reviewed)])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: push to")]
    assert len(warnings) == 1 and "defectops data push" in warnings[0], result.output


# An import in its own process that `kill -9` stops when `git add` has staged data.dvc and splits.csv and
# `git commit` is about to run: the journal is left behind, the version it made is not committed.
KILLED_AT_COMMIT = """
import os, signal, sys
from components.config import get_settings, load_params
from components.data import importer, versioning

git = versioning.git

def killed_at_commit(project, *args, **kwargs):
    if "commit" in args:
        os.kill(os.getpid(), signal.SIGKILL)
    return git(project, *args, **kwargs)

versioning.git = killed_at_commit
settings = get_settings()
importer.import_data(sys.argv[1], settings, load_params(settings.params_file))
"""


@pytest.mark.integration
def test_pull_settles_an_interrupted_import_before_naming_the_version(project, tmp_path: Path) -> None:
    committed = _version(_imported(tmp_path))
    killed = subprocess.run([sys.executable, "-c", KILLED_AT_COMMIT,
                             str(make_imagefolder(tmp_path / "batch2", per_class=3, seed=7))],
                            cwd=REPO_ROOT, capture_output=True, text=True, check=False,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert killed.returncode == -9, killed.stderr[-2000:]
    pulled = runner.invoke(app, ["data", "pull"])
    assert pulled.exit_code == 0, pulled.output
    assert f"dataset version {committed}: 12 images" in pulled.stdout, "the version the next command sees"
    status = runner.invoke(app, ["data", "status"])
    assert status.exit_code == 0 and f"dataset version: {committed}" in status.stdout, status.output
