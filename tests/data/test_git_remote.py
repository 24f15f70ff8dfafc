"""Dataset commits reach the team's git server (DEFECTOPS_GIT_REMOTE), after their images reach the DVC remote:
a fresh clone then trains on the new version. A dead or moved-on git remote keeps the commit and says so."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from components.config import get_settings, load_params
from components.data.importer import import_data
from components.data.tracked import dataset_version
from components.data.versioning import DatasetRepo
from tests.conftest import make_imagefolder

pytestmark = pytest.mark.integration


def _git(folder: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, check=True).stdout.strip()


def _import(settings, tmp_path: Path, name: str, seed: int):
    return import_data(str(make_imagefolder(tmp_path / name, per_class=4, seed=seed)), settings,
                       load_params(settings.params_file))


@pytest.fixture
def with_origin(project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The project with a bare repository as its `origin` (the team's git server) and DEFECTOPS_GIT_REMOTE=origin."""
    origin = tmp_path / "origin.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], check=True)
    _git(project.project_root, "remote", "add", "origin", str(origin))
    monkeypatch.setenv("DEFECTOPS_GIT_REMOTE", "origin")
    return get_settings(), origin


def test_a_new_version_is_pushed_to_the_git_remote_after_its_images(with_origin, tmp_path: Path) -> None:
    settings, origin = with_origin
    result = _import(settings, tmp_path, "batch1", seed=1)
    assert result.pushed and "main pushed to git remote origin" in result.push_message, result.push_message
    assert _git(origin, "rev-parse", "main") == result.committed
    clone = tmp_path / "colleague"
    subprocess.run(["git", "clone", "-q", str(origin), str(clone)], check=True)
    assert dataset_version(clone) == result.version and (clone / "splits.csv").is_file()


def test_an_unreachable_git_remote_keeps_the_commit_and_data_push_retries(
        with_origin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from components.cli import app

    settings, origin = with_origin
    _git(settings.project_root, "remote", "set-url", "origin", str(tmp_path / "gone.git"))
    result = _import(settings, tmp_path, "batch1", seed=1)
    assert result.changed and result.committed and result.pushed is False
    assert "git push to origin (main) failed" in result.push_message and "\n" not in result.push_message
    assert _git(settings.project_root, "rev-parse", "HEAD") == result.committed, "the version stands locally"
    assert DatasetRepo(settings).unpushed_commits() == "origin"
    status = CliRunner().invoke(app, ["data", "status"])
    assert "not yet pushed to git remote origin" in status.output, status.output

    _git(settings.project_root, "remote", "set-url", "origin", str(origin))
    pushed = CliRunner().invoke(app, ["data", "push"])
    assert pushed.exit_code == 0 and "main pushed to git remote origin" in pushed.output, pushed.output
    assert _git(origin, "rev-parse", "main") == result.committed
    assert DatasetRepo(settings).unpushed_commits() is None


def test_a_git_remote_that_moved_on_is_named_with_the_command_that_fixes_it(with_origin, tmp_path: Path) -> None:
    settings, origin = with_origin
    first = _import(settings, tmp_path, "batch1", seed=1)
    assert first.pushed, first.push_message
    other = tmp_path / "other"  # someone pushes code meanwhile
    subprocess.run(["git", "clone", "-q", str(origin), str(other)], check=True)
    (other / "NOTES.md").write_text("code change\n")
    _git(other, "add", "NOTES.md")
    _git(other, "-c", "user.name=o", "-c", "user.email=o@o", "commit", "-q", "-m", "code")
    _git(other, "push", "-q", "origin", "main")

    second = _import(settings, tmp_path, "batch2", seed=2)
    assert second.changed and second.pushed is False
    assert "rejected" in second.push_message and "git pull --rebase origin main" in second.push_message
    _git(settings.project_root, "-c", "user.name=t", "-c", "user.email=t@t", "pull", "-q", "--rebase", "origin", "main")
    assert DatasetRepo(settings).retry_pending().pushed
    assert second.version in _git(origin, "show", "main:data.dvc")
