"""Importing into a real git + DVC project: versions, no-ops, growth, refusals, push failures, crashes."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from components.config import get_settings, load_params
from components.data import importer
from components.data.importer import import_data
from components.data.tracked import dataset_version, tracked_manifest
from components.data.versioning import DatasetRepo, head_commit
from components.errors import ConcurrentRunError, SourceError, ValidationFailed
from components.locks import exclusive
from tests.conftest import REPO_ROOT, make_imagefolder, write_image

pytestmark = pytest.mark.integration


def _run(settings, source: Path | str, **kwargs):
    return import_data(str(source), settings, load_params(settings.params_file), **kwargs)


def _snapshot(settings) -> dict[str, str]:
    """sha256 of every file of the dataset, its version files and the remote."""
    roots = [settings.data_dir, Path(settings.dvc_remote_url)]
    files = [f for r in roots if r.exists() for f in r.rglob("*") if f.is_file()]
    files += [settings.project_root / n for n in ("data.dvc", "splits.csv") if (settings.project_root / n).exists()]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


# An import in its own process that SIGKILLs itself: at "copy" when the first image's temporary file is written
# (before its rename), at "commit" when `git add` has staged the version files and `git commit` is about to run.
KILLED_IMPORT = """
import os, shutil, signal, sys
from components.config import get_settings, load_params
from components.data import importer, versioning

source, at = sys.argv[1:]
copyfile, git = shutil.copyfile, versioning.git

def copy_then_killed(src, dst, *args, **kwargs):
    copyfile(src, dst, *args, **kwargs)
    if str(dst).endswith(".tmp"):
        os.kill(os.getpid(), signal.SIGKILL)

def killed_at_commit(project, *args, **kwargs):
    if "commit" in args:
        os.kill(os.getpid(), signal.SIGKILL)
    return git(project, *args, **kwargs)

if at == "copy":
    shutil.copyfile = copy_then_killed
else:
    versioning.git = killed_at_commit
settings = get_settings()
importer.import_data(source, settings, load_params(settings.params_file))
"""


def _killed_import(source: Path, at: str) -> None:
    """Run an import (of the project in DEFECTOPS_PROJECT) that `kill -9` stops at `at`."""
    killed = subprocess.run([sys.executable, "-c", KILLED_IMPORT, str(source), at], cwd=REPO_ROOT,
                            capture_output=True, text=True, check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]


def _git_out(settings, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=settings.project_root, capture_output=True, text=True,
                          check=True).stdout


def _git_log(settings) -> list[str]:
    out = subprocess.run(check=False, args=["git", "log", "--format=%s"], cwd=settings.project_root, capture_output=True, text=True)
    return out.stdout.split("\n")[:-1]


def test_first_import_versions_commits_and_pushes(project, tmp_path: Path) -> None:
    result = _run(project, make_imagefolder(tmp_path / "batch1", per_class=4))
    assert result.changed and result.added == 12 and result.pushed, result.push_message
    assert result.version.endswith(".dir") and result.version == dataset_version(project.project_root)
    assert sorted(p.name for p in (project.data_dir / "images").iterdir()) == ["dent", "normal", "scratch"]
    assert _git_log(project)[0].startswith(f"data: version {result.version}")
    tracked = subprocess.run(check=False, args=["git", "ls-files"], cwd=project.project_root, capture_output=True, text=True).stdout
    assert "data.dvc" in tracked and "splits.csv" in tracked and "data/" not in tracked
    assert any(Path(project.dvc_remote_url).rglob("*")), "files pushed to the local remote"
    stored = pd.read_parquet(result.report_dir / "manifest.parquet")
    assert len(stored) == 12 and (result.report_dir / "validation.json").is_file()
    assert not any(project.data_dir.rglob("*.parquet")), "nothing derived inside data/"


def test_same_images_again_is_a_no_op(project, tmp_path: Path) -> None:
    source = make_imagefolder(tmp_path / "batch1", per_class=4)
    first = _run(project, source)
    commits = _git_log(project)
    again = _run(project, source)
    assert not again.changed and again.version == first.version and again.skipped == 12
    assert _git_log(project) == commits


def test_a_fresh_clone_without_the_data_restores_the_same_version(project, tmp_path: Path) -> None:
    source = make_imagefolder(tmp_path / "batch1", per_class=4)
    first = _run(project, source)
    commits = _git_log(project)
    for gone in (project.data_dir, project.project_root / ".dvc" / "cache", Path(project.dvc_remote_url)):
        shutil.rmtree(gone)
    again = _run(project, source)
    assert again.restored and again.version == first.version and again.added == 12
    assert len(list((project.data_dir / "images").rglob("*.png"))) == 12
    assert _git_log(project) == commits, "the same version: nothing to commit"
    assert not _run(project, source).restored, "the next import of the same images is a plain no-op"


def test_a_new_month_adds_a_version_that_keeps_the_old_images(project, tmp_path: Path) -> None:
    first = _run(project, make_imagefolder(tmp_path / "m1", per_class=4))
    old_splits = pd.read_csv(project.splits_file).set_index("path")["split"]
    # same file names as last month, different pictures: kept side by side under a new name
    second = _run(project, make_imagefolder(tmp_path / "m2", per_class=4, seed=9))
    assert second.changed and second.previous_version == first.version and second.added == 12
    files = sorted(p.name for p in (project.data_dir / "images" / "dent").iterdir())
    assert len(files) == 8 and "img_000.png" in files
    new_splits = pd.read_csv(project.splits_file).set_index("path")["split"]
    assert new_splits.loc[old_splits.index].tolist() == old_splits.tolist(), "old images keep their split"
    assert len(_git_log(project)) >= 2


def test_masks_of_the_magnetic_tile_layout_are_kept_beside_never_as_images(project, tmp_path: Path) -> None:
    src = tmp_path / "mt"
    for c, label in enumerate(["dent", "normal", "scratch"]):
        for i in range(3):
            write_image(src / f"MT_{label}" / "Imgs" / f"exp1_num_{c * 1000 + i * 500}.jpg", c * 100 + i)
            write_image(src / f"MT_{label}" / "Imgs" / f"exp1_num_{c * 1000 + i * 500}.png", 7, mode="L")
    broken = src / "MT_dent" / "Imgs" / "exp1_num_500.png"
    good = broken.read_bytes()
    broken.write_bytes(b"garbage")  # training reads every mask: one that does not decode is refused up front
    with pytest.raises(ValidationFailed, match="the mask exp1_num_500.png: .* is not a readable image; replace"):
        _run(project, src)
    assert not project.data_dir.exists() or not any(project.data_dir.rglob("*.*")), "nothing copied"
    broken.write_bytes(good)
    result = _run(project, src)
    assert result.added == 9
    assert len(list((project.data_dir / "masks" / "dent").glob("*.png"))) == 3
    assert not list((project.data_dir / "images").rglob("*.png"))


@pytest.mark.parametrize("bad", ["truncated", "zero-byte", "text", "unknown-class", "label-conflict", "bomb"])
def test_a_bad_batch_is_refused_and_changes_nothing(project, tmp_path: Path, bad: str) -> None:
    _run(project, make_imagefolder(tmp_path / "m1", per_class=4))
    before, commits = _snapshot(project), _git_log(project)
    batch = make_imagefolder(tmp_path / "m2", per_class=3, seed=5)
    target = batch / "dent" / "bad.jpg"
    if bad == "truncated":
        write_image(target, 1, size=(64, 64), fmt="JPEG")
        target.write_bytes(target.read_bytes()[:300])
    elif bad == "zero-byte":
        target.write_bytes(b"")
    elif bad == "text":
        target.write_text("not an image")
    elif bad == "unknown-class":
        target = write_image(batch / "rust" / "bad.png", 3)
    elif bad == "label-conflict":
        shutil.copy(batch / "dent" / "img_000.png", batch / "scratch" / "bad.png")
        target = batch / "scratch" / "bad.png"
    else:
        params = yaml.safe_load(project.params_file.read_text())
        params["data"]["max_image_pixels"] = 5000
        project.params_file.write_text(yaml.safe_dump(params))
        target = write_image(batch / "dent" / "bad.png", 2, size=(100, 100))
    with pytest.raises(ValidationFailed) as caught:
        _run(project, batch)
    assert "nothing changed" in str(caught.value)
    caught.value.failures.append(str(caught.value))
    assert any(target.name in line for line in caught.value.failures), caught.value.failures
    assert _snapshot(project) == before and _git_log(project) == commits


def test_push_failure_keeps_the_version_and_the_next_run_pushes(project, tmp_path: Path, monkeypatch) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the remote folder should be")
    monkeypatch.setenv("DEFECTOPS_DVC_REMOTE", str(blocker / "remote"))
    down = get_settings()
    result = _run(down, make_imagefolder(tmp_path / "m1", per_class=4))
    assert result.changed and result.pushed is False and "next import" in result.push_message
    assert "\n" not in result.push_message and "\x1b" not in result.push_message, result.push_message
    assert dataset_version(down.project_root) == result.version
    assert DatasetRepo(down).unpushed_versions() == [result.version]
    monkeypatch.setenv("DEFECTOPS_DVC_REMOTE", str(tmp_path / "remote-back"))
    up = get_settings()
    again = _run(up, tmp_path / "m1")
    assert not again.changed and again.pushed, again.push_message
    assert DatasetRepo(up).unpushed_versions() == []
    assert any((tmp_path / "remote-back").rglob("*"))


def test_disk_full_while_copying_rolls_back(project, tmp_path: Path, monkeypatch) -> None:
    _run(project, make_imagefolder(tmp_path / "m1", per_class=4))
    before = _snapshot(project)
    calls = {"n": 0}
    real_copy = shutil.copyfile

    def filling_disk(src, dst, *a, **k):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_copy(src, dst, *a, **k)

    monkeypatch.setattr(importer.shutil, "copyfile", filling_disk)
    with pytest.raises(SourceError, match="disk full"):
        _run(project, make_imagefolder(tmp_path / "m2", per_class=4, seed=3))
    assert _snapshot(project) == before
    assert not list(project.data_dir.rglob(".*.tmp"))  # no partial copy left (components.files.replacing)


def test_a_source_rewritten_between_validation_and_copy_changes_nothing(project, tmp_path: Path,
                                                                       monkeypatch) -> None:
    """The copies in data/ are checked against the content validated: a source picture cut short after the
    suite passed (a camera share still writing) fails the import, rolled back, instead of a version holding a
    picture its own report calls readable."""
    _run(project, make_imagefolder(tmp_path / "m1", per_class=4))
    before = _snapshot(project)
    source = make_imagefolder(tmp_path / "m2", per_class=4, seed=3, prefix="new")
    victim = min(source.rglob("*.png"))
    whole = victim.read_bytes()
    real_check = importer._check_disk

    def validated_then_cut(settings, additions):
        victim.write_bytes(whole[: len(whole) // 2])
        return real_check(settings, additions)

    with monkeypatch.context() as patch:
        patch.setattr(importer, "_check_disk", validated_then_cut)
        with pytest.raises(SourceError, match=f"{victim.name}: changed while it was imported"):
            _run(project, source)
    assert _snapshot(project) == before and not importer.journal_path(project).exists()
    victim.write_bytes(whole)
    assert _run(project, source).added == 12


def test_an_import_killed_midway_is_rolled_back_by_the_next_command(project, tmp_path: Path) -> None:
    _run(project, make_imagefolder(tmp_path / "m1", per_class=4))
    before = _snapshot(project)
    # what a kill -9 leaves: some files copied, data.dvc rewritten, the journal still there
    stray = write_image(project.data_dir / "images" / "dent" / "half.png", 99)
    backups = {n: (project.project_root / n).read_text() for n in ("data.dvc", "splits.csv", ".gitignore")}
    (project.project_root / "data.dvc").write_text("outs: [{md5: deadbeef.dir, path: data}]\n")
    importer._write_journal(project, importer.Journal([str(stray.relative_to(project.project_root))], backups,
                                                      head=head_commit(project.project_root)))
    assert importer.recover(project)
    assert _snapshot(project) == before and not stray.exists()
    stale = project.staging_dir / "report-killed-while-validating"  # killed before the journal was written
    stale.mkdir(parents=True)
    _run(project, tmp_path / "m1")
    assert not stale.exists()


def test_an_import_killed_while_copying_leaves_no_temporary_file_behind(project, tmp_path: Path) -> None:
    _run(project, make_imagefolder(tmp_path / "m1", per_class=4))
    before = _snapshot(project)
    source = make_imagefolder(tmp_path / "m2", per_class=4, seed=3, prefix="new")
    _killed_import(source, "copy")
    assert list(project.data_dir.rglob(".*.tmp")), "killed with its temporary copy beside the image"
    assert importer.recover(project)
    assert _snapshot(project) == before and not list(project.data_dir.rglob(".*.tmp"))
    assert _run(project, source).added == 12, "the next import is not refused as 'modified'"


def test_an_import_killed_between_git_add_and_commit_leaves_nothing_staged(project, tmp_path: Path) -> None:
    _run(project, make_imagefolder(tmp_path / "m1", per_class=4))
    before, commits = _snapshot(project), _git_log(project)
    _killed_import(make_imagefolder(tmp_path / "m2", per_class=4, seed=3, prefix="new"), "commit")
    assert "data.dvc" in _git_out(project, "diff", "--cached", "--name-only"), "killed with the version staged"
    abandoned = dataset_version(project.project_root)
    assert (project.dataset_report_dir(abandoned) / "manifest.parquet").is_file(), "placed before the commit"
    assert importer.recover(project)
    assert not project.dataset_report_dir(abandoned).exists(), "no report of a version rolled back"
    assert _snapshot(project) == before and _git_log(project) == commits
    assert _git_out(project, "status", "--porcelain", "--", *importer.VERSION_FILES) == "", "index as before"


def test_nothing_reads_a_version_that_a_killed_import_left_uncommitted(project, tmp_path: Path) -> None:
    """Train, evaluate and register read the tracked dataset through tracked_manifest: a version left by an import
    killed before its commit (data/ and data.dvc agree) is rolled back first, never trained on."""
    first = _run(project, make_imagefolder(tmp_path / "m1", per_class=4))
    _killed_import(make_imagefolder(tmp_path / "m2", per_class=4, seed=3, prefix="new"), "commit")
    assert dataset_version(project.project_root) != first.version
    rows = tracked_manifest(project, load_params(project.params_file))
    assert len(rows) == 12 and dataset_version(project.project_root) == first.version
    assert not importer.journal_path(project).exists()
    project.ensure()
    with exclusive(project.locks_dir, "data", "a dataset import"), pytest.raises(ConcurrentRunError):
        importer.journal_path(project).write_text("{}")  # an import still running: never read its data/
        tracked_manifest(project, load_params(project.params_file))


def test_an_import_is_settled_only_in_its_own_checkout(project, tmp_path: Path) -> None:
    """An import's journal belongs to the checkout it copies into. Another checkout on the same state root (a
    Kubernetes Job's clone) reads its own data/ while that import copies, and never takes a killed one's
    journal for its own (rolling its own version files back to the other's, or leaving the other's half-made
    version to be read there); the import's own checkout rolls it back on its next command."""
    from components.config import Settings

    first = _run(project, make_imagefolder(tmp_path / "m1", per_class=4))
    params = load_params(project.params_file)
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(project.project_root), str(clone)], check=True)
    (clone / "params.yaml").write_text(project.params_file.read_text())
    other = Settings(project=clone, home=project.home_dir)
    assert len(tracked_manifest(other, params)) == 12, "the clone pulled its data/"
    _killed_import(make_imagefolder(tmp_path / "m2", per_class=4, seed=3, prefix="new"), "commit")
    assert importer.journal_path(project).is_file() and dataset_version(project.project_root) != first.version
    before = _snapshot(other)
    with exclusive(project.locks_dir, "data", "a dataset import"):  # as while that import still copies
        assert len(tracked_manifest(other, params)) == 12
    assert len(tracked_manifest(other, params)) == 12 and _snapshot(other) == before
    assert importer.journal_path(project).is_file(), "left for the checkout it belongs to"
    assert len(tracked_manifest(project, params)) == 12 and dataset_version(project.project_root) == first.version
    assert not importer.journal_path(project).exists()


def test_a_journal_an_earlier_defectops_left_in_the_state_root_is_named_not_ignored(project, tmp_path: Path) -> None:
    """Which checkout an old journal (under the shared state root) belongs to is unknown: every read and import
    refuses in one line saying where to move it; moved there, the next command rolls the import back."""
    from components.errors import UsageError

    first = _run(project, make_imagefolder(tmp_path / "m1", per_class=4))
    params = load_params(project.params_file)
    _killed_import(make_imagefolder(tmp_path / "m2", per_class=4, seed=3, prefix="new"), "commit")
    legacy = importer.legacy_journal_path(project)
    importer.journal_path(project).replace(legacy)  # where an import killed before the upgrade left it
    with pytest.raises(UsageError, match="an import an earlier defectops left unfinished; move it to "
                                         "<checkout>/.dvc/tmp/defectops-import-journal.json"):
        tracked_manifest(project, params)
    with pytest.raises(UsageError, match="left unfinished"):
        _run(project, make_imagefolder(tmp_path / "m3", per_class=4, seed=5, prefix="more"))
    assert legacy.is_file() and dataset_version(project.project_root) != first.version, "nothing touched"
    legacy.replace(importer.journal_path(project))
    assert len(tracked_manifest(project, params)) == 12 and dataset_version(project.project_root) == first.version


def test_a_manifest_read_beside_an_import_is_refused_not_mixed(project, tmp_path: Path, monkeypatch) -> None:
    """tracked_manifest reads data/ without the data lock (two trainings may read at once): an import that
    committed a version, or was still copying, while the rows were read makes the read fail, rather than rows of
    one version go out beside data.dvc's next one. Read again afterwards, the rows are whole."""
    from components.data import tracked

    first = _run(project, make_imagefolder(tmp_path / "m1", per_class=4))
    params = load_params(project.params_file)
    real_read = tracked.committed_manifest
    during: list = []

    def read_while(*args, **kwargs):
        rows = real_read(*args, **kwargs)
        if during:
            during.pop()()
        return rows

    monkeypatch.setattr(tracked, "committed_manifest", read_while)
    during.append(lambda: _run(project, make_imagefolder(tmp_path / "m2", per_class=4, seed=3, prefix="new")))
    with pytest.raises(ConcurrentRunError, match="changed while it was read"):
        tracked_manifest(project, params)
    second = dataset_version(project.project_root)
    assert second != first.version and len(tracked_manifest(project, params)) == 24

    during.append(lambda: _killed_import(make_imagefolder(tmp_path / "m3", per_class=4, seed=5, prefix="more"),
                                         "copy"))
    with pytest.raises(ConcurrentRunError, match="changed while it was read"):
        tracked_manifest(project, params)
    assert len(tracked_manifest(project, params)) == 24, "the killed import is rolled back first"
    assert dataset_version(project.project_root) == second

    # one that starts copying after the dead ones are settled but before the read: its journal is there already
    real_problem = tracked.workspace_problem

    def import_starts(settings):
        _killed_import(make_imagefolder(tmp_path / "m4", per_class=4, seed=7, prefix="late"), "copy")
        return real_problem(settings)

    monkeypatch.setattr(tracked, "workspace_problem", import_starts)
    with pytest.raises(ConcurrentRunError, match="changed while it was read"):
        tracked_manifest(project, params)
    monkeypatch.setattr(tracked, "workspace_problem", real_problem)
    read = tracked.tracked_data(project, params)
    assert len(read.manifest) == 24 and read.version == second


def _read_while(monkeypatch, action) -> None:
    """The next read of the tracked rows runs `action` once, after the rows are built."""
    from components.data import tracked

    real_read = tracked.committed_manifest

    def read_while(*args, **kwargs):
        rows = real_read(*args, **kwargs)
        monkeypatch.setattr(tracked, "committed_manifest", real_read)
        action()
        return rows

    monkeypatch.setattr(tracked, "committed_manifest", read_while)


def test_a_read_beside_an_import_rolled_back_within_it_or_a_pull_is_refused(project, tmp_path: Path,
                                                                           monkeypatch) -> None:
    """An import that copies and is rolled back (an error) while the rows are read, and a pull that brings the
    committed pictures back over a changed data/, leave data.dvc naming the version it named: the read still
    fails (the roll-back rewrote splits.csv; the pull is counted), since its rows came from a changing data/."""
    from components.data.tracked import restore_data

    _run(project, make_imagefolder(tmp_path / "m1", per_class=4))
    params = load_params(project.params_file)

    def import_fails_after_its_copy():
        real_add = DatasetRepo.add

        def add_fails(self):
            raise OSError(errno.EIO, "the disk went away")

        monkeypatch.setattr(DatasetRepo, "add", add_fails)
        with pytest.raises(OSError, match="disk went away"):
            _run(project, make_imagefolder(tmp_path / "m2", per_class=4, seed=3, prefix="new"))
        monkeypatch.setattr(DatasetRepo, "add", real_add)

    before = _snapshot(project)
    _read_while(monkeypatch, import_fails_after_its_copy)
    with pytest.raises(ConcurrentRunError, match="changed while it was read"):
        tracked_manifest(project, params)
    assert _snapshot(project) == before, "the failed import was rolled back"

    victim = next((project.data_dir / "images").rglob("*.png"))

    def pull_over_a_changed_data():
        victim.write_bytes(b"edited by hand")
        restore_data(project, force=True)

    _read_while(monkeypatch, pull_over_a_changed_data)
    with pytest.raises(ConcurrentRunError, match="changed while it was read"):
        tracked_manifest(project, params)
    assert _snapshot(project) == before
    assert len(tracked_manifest(project, params)) == 12


def test_images_read_after_the_rows_are_checked_against_a_pull_since(project, tmp_path: Path) -> None:
    """A command that reads the pictures after the rows (training's calibration, an evaluation) fails when a pull
    changed or removed pictures of data/ since. Pulls that change nothing, only add pictures, or are refused let
    it pass, as does an import (it only adds), and so does a pull into another checkout of the same state root
    (a Kubernetes Job's clone)."""
    from components.config import Settings
    from components.data.tracked import restore_data, tracked_data
    from components.errors import PicturesChanged, UsageError

    root = project.project_root
    _run(project, make_imagefolder(tmp_path / "m1", per_class=4))
    _run(project, make_imagefolder(tmp_path / "m2", per_class=4, seed=3, prefix="new"))
    params = load_params(project.params_file)
    subprocess.run(["git", "checkout", "HEAD~1", "--", "data.dvc", "splits.csv"], cwd=root, check=True)
    restore_data(project)  # back to the first version: the second one's pictures go
    read = tracked_data(project, params)
    assert len(read.manifest) == 12
    restore_data(project)  # data/ holds the committed version already
    subprocess.run(["git", "checkout", "HEAD", "--", "data.dvc", "splits.csv"], cwd=root, check=True)
    restore_data(project)  # the newer version: it only adds pictures
    _run(project, make_imagefolder(tmp_path / "m3", per_class=4, seed=5, prefix="more"))
    stray = project.data_dir / "images" / "normal" / "stray.png"
    stray.write_bytes(b"a file in neither the version nor the cache")
    with pytest.raises(UsageError, match="would lose them"):
        restore_data(project)  # refused before it touches anything
    stray.unlink()
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(root), str(clone)], check=True)
    (clone / "params.yaml").write_text(project.params_file.read_text())
    other = Settings(project=clone, home=project.home_dir)
    assert len(tracked_data(other, params).manifest) == 36, "the clone pulled its data/ from the cache"
    subprocess.run(["git", "-C", str(clone), "checkout", "-q", "HEAD~1", "--", "data.dvc", "splits.csv"], check=True)
    restore_data(other)  # the clone's pictures go
    read.still_there(project)

    newer = tracked_data(project, params)
    subprocess.run(["git", "checkout", "HEAD~1", "--", "data.dvc", "splits.csv"], cwd=root, check=True)
    restore_data(project)  # a version without the third import's pictures
    with pytest.raises(PicturesChanged, match="a `data pull` changed or removed pictures in data/ while this "
                                              "command read them; run it again once the pull is done"):
        newer.still_there(project)
    subprocess.run(["git", "checkout", "HEAD", "--", "data.dvc", "splits.csv"], cwd=root, check=True)
    restore_data(project)
    newest = tracked_data(project, params)
    next((project.data_dir / "images").rglob("*.png")).write_bytes(b"edited by hand")
    restore_data(project, force=True)  # the same version, one picture put back
    with pytest.raises(PicturesChanged):
        newest.still_there(project)


def test_a_pull_under_way_or_killed_is_not_read(project, tmp_path: Path, monkeypatch) -> None:
    """A pull marks data/ while it writes there: a read that finds the mark at its end fails, as does a command
    checking pictures it read earlier; a read that finds it at its start fails at once naming the lock's holder,
    or, when the pull was killed, clears the mark and counts that pull as one that changed pictures (what it did
    is unknown)."""
    from components.data import tracked
    from components.errors import PicturesChanged

    _run(project, make_imagefolder(tmp_path / "m1", per_class=4))
    params = load_params(project.params_file)
    marker = tracked.checkout_file(project, tracked.PULLING)
    earlier = tracked.tracked_data(project, params)
    _read_while(monkeypatch, lambda: marker.write_text("a pull began writing"))
    with pytest.raises(ConcurrentRunError, match="changed while it was read"):
        tracked_manifest(project, params)
    with pytest.raises(PicturesChanged):
        earlier.still_there(project)  # the pull is still writing
    with exclusive(project.locks_dir, "data", "a dataset import, pull or push"), \
            pytest.raises(ConcurrentRunError, match="already running"):
        tracked_manifest(project, params)  # the pull still holds the lock
    assert marker.exists()
    assert len(tracked_manifest(project, params)) == 12 and not marker.exists(), "a killed pull's mark goes"
    with pytest.raises(PicturesChanged):
        earlier.still_there(project)  # the killed pull may have changed what it read


def test_an_import_interrupted_after_its_commit_is_kept(project, tmp_path: Path, monkeypatch) -> None:
    """Ctrl-C or SIGTERM between the git commit and the journal's removal: the version is whole, so it stays;
    rolling its files back would leave HEAD naming a dataset the workspace no longer holds."""
    first = _run(project, make_imagefolder(tmp_path / "m1", per_class=4))
    real_commit = importer.commit

    def commit_then_interrupted(*args, **kwargs):
        real_commit(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(importer, "commit", commit_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(project, make_imagefolder(tmp_path / "m2", per_class=4, seed=3))
    root = project.project_root
    version = dataset_version(root)
    assert version != first.version and "data: version " + version in _git_log(project)[0]
    shown = subprocess.run(["git", "show", "HEAD:data.dvc"], cwd=root, capture_output=True, text=True, check=True)
    assert shown.stdout == (root / "data.dvc").read_text()
    status = subprocess.run(["git", "status", "--porcelain", "--", "data.dvc", "splits.csv"], cwd=root,
                            capture_output=True, text=True, check=True).stdout
    assert status == "" and not importer.journal_path(project).exists()
    assert len(list((project.data_dir / "images").rglob("*.png"))) == 2 * len(list((tmp_path / "m1").rglob("*.png")))
    assert DatasetRepo(project).unpushed_versions() == [version], "the push it did not reach is pending"
    report = project.dataset_report_dir(version)
    assert (report / "manifest.parquet").is_file() and (report / "validation.json").is_file(), "its report kept"
    assert not list(project.staging_dir.glob("report-*")), "its staged validation report is removed"
    assert not importer.recover(project)


def test_two_imports_at_once_refuse(project, tmp_path: Path) -> None:
    project.ensure()
    holder = f"pid {os.getpid()} on {socket.gethostname()}"  # Jobs on other nodes share the lock folder
    with exclusive(project.locks_dir, "data", "a dataset import"), pytest.raises(ConcurrentRunError, match=holder):
        _run(project, make_imagefolder(tmp_path / "m1", per_class=4))
    from typer.testing import CliRunner

    from components.cli import app

    with exclusive(project.locks_dir, "data", "a dataset import"):  # its journal must not be "recovered" under it
        validating = CliRunner().invoke(app, ["data", "validate"])
    assert validating.exit_code != 0 and f"a dataset import, pull or push is already running ({holder})" in validating.output


def test_no_commit_and_fallback_identity(project, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(tmp_path / "empty-gitconfig"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    result = _run(project, make_imagefolder(tmp_path / "m1", per_class=4), commit_changes=False)
    assert result.committed is None
    status = subprocess.run(check=False, args=["git", "status", "--porcelain"], cwd=project.project_root, capture_output=True,
                            text=True).stdout
    assert "data.dvc" in status
    committed = _run(project, make_imagefolder(tmp_path / "m2", per_class=4, seed=4))
    author = subprocess.run(check=False, args=["git", "log", "-1", "--format=%an <%ae>"], cwd=project.project_root,
                            capture_output=True, text=True).stdout.strip()
    assert committed.committed and author == "defectops <defectops@localhost>"


@pytest.mark.realdata
def test_magnetic_tile_import_groups_captures_and_validates(project, magnetic_tile: Path, monkeypatch) -> None:
    params = yaml.safe_load(project.params_file.read_text())
    params["data"]["dataset"] = "magnetic-tile"
    params["validate"]["min_images_per_class"] = 10
    project.params_file.write_text(yaml.safe_dump(params))
    result = _run(project, magnetic_tile)
    assert result.added == 1071 and result.counts["Free"] == 756 and result.counts["Fray"] == 26
    manifest = pd.read_parquet(result.report_dir / "manifest.parquet")
    assert (manifest.groupby("group")["split"].nunique() == 1).all(), "a capture group crosses splits"
    for label, rows in manifest.groupby("label"):
        assert set(rows["split"]) == {"train", "val", "test"}, label
    assert len(list((project.data_dir / "masks").rglob("*.png"))) == 1071
    assert json.loads((result.report_dir / "validation.json").read_text())["success"] is True


def test_an_image_whose_stem_is_taken_gets_its_own_name_and_mask(tmp_path: Path) -> None:
    """a.jpg is tracked; a new a.bmp of the same class would share masks/<class>/a.png: it is renamed."""
    from components.data.importer import plan_additions
    from components.data.layout import LabelledImage

    old = LabelledImage(tmp_path / "src" / "exp1_num_5.jpg", "Crack", tmp_path / "src" / "exp1_num_5.png")
    new = LabelledImage(tmp_path / "new" / "exp1_num_5.bmp", "Crack", tmp_path / "new" / "exp1_num_5.png")
    other = LabelledImage(tmp_path / "new" / "exp1_num_6.bmp", "Crack")
    [renamed, kept], skipped = plan_additions([old], ["a" * 64], [new, other], ["b" * 64, "c" * 64])
    assert skipped == 0 and renamed.relpath == "images/Crack/exp1_num_5-bbbbbbbb.bmp"
    assert renamed.mask_relpath == "masks/Crack/exp1_num_5-bbbbbbbb.png" != old.mask_relpath
    assert kept.relpath == "images/Crack/exp1_num_6.bmp"
