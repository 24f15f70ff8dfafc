"""Which dataset versions are on the DVC remote: each new version is recorded as unpushed until the remote holds
it, whatever stops its push (a dead remote, Ctrl-C or SIGTERM, `--no-push`), and `data push` sends each one from
its own commit, never claiming a version it could not push."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from components.config import get_settings, load_params
from components.data.importer import import_data
from components.data.tracked import dataset_version
from components.data.versioning import DatasetRepo
from tests.conftest import make_imagefolder
from tests.data.interrupting import terminated_while_moving_files

pytestmark = pytest.mark.integration

runner = CliRunner()


def _run(settings, source: Path, **kwargs):
    return import_data(str(source), settings, load_params(settings.params_file), **kwargs)


def _cli(*args: str):
    from components.cli import app

    return runner.invoke(app, list(args))


def _files(folder: Path) -> set[str]:
    return {str(f.relative_to(folder)) for f in folder.rglob("*") if f.is_file()} if folder.is_dir() else set()


def _not_on_remote(settings) -> set[str]:
    """Objects of DVC's cache here (every version imported here) that the remote lacks."""
    cache = _files(settings.project_root / ".dvc" / "cache" / "files")
    assert cache, "nothing in DVC's cache"
    return cache - _files(Path(settings.dvc_remote_url) / "files")


def _dir_object(version: str) -> str:
    return f"md5/{version[:2]}/{version[2:]}"


def _remote_down(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the remote folder should be")
    monkeypatch.setenv("DEFECTOPS_DVC_REMOTE", str(blocker / "remote"))
    return get_settings()


def _git(settings, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=settings.project_root,
                          capture_output=True, text=True, check=True).stdout


def test_a_sigterm_during_the_push_keeps_the_version_unpushed(project, tmp_path: Path) -> None:
    """Ctrl-C or SIGTERM while `dvc push` runs, in an import and in `data push`: the version stays recorded as
    unpushed (data status lists it), and the next `data push` sends it."""
    remote = Path(project.dvc_remote_url)
    stopped = terminated_while_moving_files(remote, "data", "import", str(make_imagefolder(tmp_path / "m1",
                                                                                            per_class=4)))
    assert stopped.returncode == 130, stopped.stdout + stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1].startswith("error: interrupted"), stopped.stderr
    version = dataset_version(project.project_root)
    assert version and _not_on_remote(project), "stopped before the remote had every file"
    assert DatasetRepo(project).unpushed_versions() == [version], "the version whose push was cut off is listed"
    assert f"unpushed versions: {version}" in _cli("data", "status").output

    stopped = terminated_while_moving_files(remote, "data", "push")
    assert stopped.returncode == 130, stopped.stdout + stopped.stderr
    assert DatasetRepo(project).unpushed_versions() == [version], "still listed after an interrupted `data push`"

    pushed = _cli("data", "push")
    assert pushed.exit_code == 0 and "pushed to" in pushed.output, pushed.output
    assert not _not_on_remote(project) and DatasetRepo(project).unpushed_versions() == []
    assert "nothing to push" in _cli("data", "push").output


def test_a_version_imported_with_no_push_waits_for_data_push(project, tmp_path: Path) -> None:
    imported = _cli("data", "import", str(make_imagefolder(tmp_path / "m1", per_class=4)), "--no-push")
    assert imported.exit_code == 0, imported.output
    assert "not pushed (--no-push): `defectops data push` sends it" in imported.output
    version = dataset_version(project.project_root)
    recorded = json.loads((project.state_dir / "unpushed.json").read_text())
    assert recorded == {version: _git(project, "rev-parse", "HEAD").strip()}, "listed with its commit"
    assert f"unpushed versions: {version}" in _cli("data", "status").output
    assert _not_on_remote(project)

    pushed = _cli("data", "push")
    assert pushed.exit_code == 0 and "pushed to" in pushed.output, pushed.output
    assert not _not_on_remote(project) and DatasetRepo(project).unpushed_versions() == []


def test_data_push_sends_an_earlier_version_from_its_own_commit(
        project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A version whose push failed, then the workspace moved to another version (a person took the dataset back
    a version): `data push` pushes the pending one from its commit, not whatever data.dvc names now."""
    first = _run(project, make_imagefolder(tmp_path / "m1", per_class=4))
    assert first.pushed, first.push_message
    second = _run(_remote_down(tmp_path, monkeypatch), make_imagefolder(tmp_path / "m2", per_class=4, seed=3))
    assert second.pushed is False and second.committed
    monkeypatch.delenv("DEFECTOPS_DVC_REMOTE")  # the remote is back
    _git(project, "checkout", first.committed, "--", "data.dvc", "splits.csv")
    assert _cli("data", "pull", "--force").exit_code == 0
    assert dataset_version(project.project_root) == first.version
    assert _dir_object(second.version) in _not_on_remote(project)

    pushed = _cli("data", "push")
    assert pushed.exit_code == 0, pushed.output
    assert not _not_on_remote(project), "every image of the earlier version is on the remote"
    assert DatasetRepo(project).unpushed_versions() == []


def test_an_uncommitted_version_data_dvc_no_longer_names_is_never_claimed_pushed(
        project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Imported with --no-commit while the remote was down, then data.dvc was put back: nothing names that
    version, so `data push` keeps it listed and says why; once a commit names it, `data push` sends it."""
    first = _run(project, make_imagefolder(tmp_path / "m1", per_class=4))
    second = _run(_remote_down(tmp_path, monkeypatch), make_imagefolder(tmp_path / "m2", per_class=4, seed=3),
                  commit_changes=False)
    assert second.pushed is False and second.committed is None
    monkeypatch.delenv("DEFECTOPS_DVC_REMOTE")
    _git(project, "stash")
    assert dataset_version(project.project_root) == first.version

    refused = _cli("data", "push")
    message = refused.output.strip().splitlines()[-1]
    assert refused.exit_code != 0 and message.startswith("error: "), refused.output
    assert f"dataset version {second.version} not pushed: it was imported with --no-commit" in message, message
    assert "`git stash pop`" in message and "`defectops data push`" in message, message
    assert DatasetRepo(project).unpushed_versions() == [second.version]
    assert _dir_object(second.version) in _not_on_remote(project)

    _git(project, "stash", "pop")  # its data.dvc back, committed by hand; then a third version, remote down again
    _git(project, "commit", "-q", "-m", "data: the version imported with --no-commit", "--", "data.dvc", "splits.csv")
    third = _run(_remote_down(tmp_path, monkeypatch), make_imagefolder(tmp_path / "m3", per_class=4, seed=5))
    assert DatasetRepo(project).unpushed_versions() == [second.version, third.version]
    monkeypatch.delenv("DEFECTOPS_DVC_REMOTE")
    pushed = _cli("data", "push")
    assert pushed.exit_code == 0, pushed.output
    assert not _not_on_remote(project) and DatasetRepo(project).unpushed_versions() == []


def test_an_uncommitted_import_rolled_back_leaves_no_unpushed_entry(
        project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C just after a --no-commit import recorded its version: the import is rolled back, and so is the record
    (nothing names that version any more)."""
    first = _run(project, make_imagefolder(tmp_path / "m1", per_class=4))
    record = DatasetRepo.mark_unpushed

    def recorded_then_interrupted(self, *args, **kwargs):
        record(self, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(DatasetRepo, "mark_unpushed", recorded_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(project, make_imagefolder(tmp_path / "m2", per_class=4, seed=3), commit_changes=False)
    assert dataset_version(project.project_root) == first.version
    assert DatasetRepo(project).unpushed_versions() == []
