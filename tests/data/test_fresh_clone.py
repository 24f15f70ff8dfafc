"""A fresh clone (a Kubernetes training Job's git_clone, a colleague's checkout) has data.dvc but no data/: the
committed version comes from the remote, a local folder or S3 (a real S3 protocol server on 127.0.0.1)."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from components.config import get_settings, load_params
from components.data.importer import import_data
from components.data.tracked import dataset_version, tracked_manifest
from components.errors import UsageError
from tests.conftest import S3_KEYS, make_imagefolder, s3_server
from tests.data.interrupting import terminated_while_moving_files

pytestmark = pytest.mark.integration


def _digests(folder: Path) -> dict[str, str]:
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file()}


def _clone(settings, tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch, remote: str):
    """Clone the project (code, data.dvc, splits.csv; no data/, no DVC cache) with its own state root."""
    clone = tmp_path / name
    root = str(settings.project_root)
    subprocess.run(["git", "-C", root, "add", "-A"], check=True)  # params.yaml, as a real project has it
    subprocess.run(["git", "-C", root, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "project",
                    "--allow-empty"], check=True)
    subprocess.run(["git", "clone", "-q", root, str(clone)], check=True)
    monkeypatch.setenv("DEFECTOPS_PROJECT", str(clone))
    monkeypatch.setenv("DEFECTOPS_HOME", str(tmp_path / f"{name}-home"))
    monkeypatch.setenv("DEFECTOPS_DVC_REMOTE", remote)
    cloned = get_settings()
    assert not cloned.data_dir.exists() and dataset_version(clone) == dataset_version(settings.project_root)
    return cloned


def test_a_fresh_clone_pulls_the_committed_version_and_a_wrong_remote_is_one_line(
        project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from components.cli import app

    imported = import_data(str(make_imagefolder(tmp_path / "batch", per_class=4)), project,
                           load_params(project.params_file))
    assert imported.pushed, imported.push_message
    original = _digests(project.data_dir / "images")
    committed = tracked_manifest(project, load_params(project.params_file))
    splits = sorted(zip(committed["path"], committed["split"]))

    clone = _clone(project, tmp_path, "clone", monkeypatch, project.dvc_remote_url)
    rows = tracked_manifest(clone, load_params(clone.params_file))  # what train, register and evaluate call
    assert len(rows) == 12 and sorted(zip(rows["path"], rows["split"])) == splits
    assert _digests(clone.data_dir / "images") == original

    # data/ must hold what data.dvc names, or a model would record one version and learn another
    edited = next((clone.data_dir / "images" / "dent").iterdir())
    edited.write_bytes(b"edited by hand")
    with pytest.raises(UsageError, match=f"does not hold the committed dataset version {imported.version} "
                                         r"\(modified\); `defectops data pull --force`"):
        tracked_manifest(clone, load_params(clone.params_file))
    with pytest.raises(UsageError, match="does not hold the committed dataset version"):  # nor is it extended
        import_data(str(make_imagefolder(tmp_path / "more", per_class=4, seed=9)), clone,
                    load_params(clone.params_file))
    assert dataset_version(clone.project_root) == imported.version
    runner = CliRunner()
    assert "data pull --force" in runner.invoke(app, ["data", "status"]).output
    pulled = runner.invoke(app, ["data", "pull", "--force"])
    assert pulled.exit_code == 0 and f"dataset version {imported.version}: 12 images" in pulled.output, pulled.output
    assert _digests(clone.data_dir / "images") == original

    lost = _clone(project, tmp_path, "lost", monkeypatch, str(tmp_path / "empty-remote"))
    with pytest.raises(UsageError, match=f"version {imported.version} could not be brought into") as refused:
        tracked_manifest(lost, load_params(lost.params_file))
    assert "empty-remote" in str(refused.value) and "\n" not in str(refused.value)
    assert "Missing cache files: md5: " in str(refused.value), "DVC's reason, in the one line"
    assert "\x1b" not in str(refused.value), "no terminal colour codes"
    assert not lost.data_dir.exists(), "no partial dataset left to train on"

    monkeypatch.setenv("DEFECTOPS_DVC_REMOTE_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(UsageError, match="not an s3:// URL"):
        tracked_manifest(get_settings(), load_params(lost.params_file))


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch):
    """The S3 server with bucket `defectops`, configured as infra/ configures MinIO."""
    with s3_server("defectops") as (endpoint, client):
        for key, value in S3_KEYS.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("DEFECTOPS_DVC_REMOTE_ENDPOINT", endpoint)
        yield client


def test_the_s3_remote_takes_a_version_and_gives_it_to_a_fresh_clone(
        project, s3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from components.cli import app

    monkeypatch.setenv("DEFECTOPS_DVC_REMOTE", "s3://defectops/dvc")
    settings = get_settings()
    imported = import_data(str(make_imagefolder(tmp_path / "batch", per_class=4)), settings,
                           load_params(settings.params_file))
    assert imported.pushed and "s3://defectops/dvc" in imported.push_message, imported.push_message
    stored = [o["Key"] for o in s3.list_objects_v2(Bucket="defectops", Prefix="dvc/")["Contents"]]
    assert len(stored) == 12 + 1, stored  # every image and the .dir listing

    clone = _clone(settings, tmp_path, "clone", monkeypatch, "s3://defectops/dvc")
    pulled = CliRunner().invoke(app, ["data", "pull"])
    assert pulled.exit_code == 0, pulled.output
    assert f"dataset version {imported.version}: 12 images" in pulled.output
    assert _digests(clone.data_dir / "images") == _digests(settings.data_dir / "images")


def test_an_import_into_a_clone_that_cannot_pull_the_committed_version_is_refused(
        project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh clone with a wrong remote: a new version made of the new images alone would drop every committed
    image, the golden test split with them. Refused, nothing changed; only a source that holds exactly the
    committed version may put it back."""
    from components.cli import app

    first = make_imagefolder(tmp_path / "m1", per_class=4)
    imported = import_data(str(first), project, load_params(project.params_file))
    lost = _clone(project, tmp_path, "lost", monkeypatch, str(tmp_path / "empty-remote"))
    root = lost.project_root

    def state() -> tuple[str, str, str, str]:
        show = subprocess.run(["git", "log", "--format=%H", "-1"], cwd=root, capture_output=True, text=True,
                              check=True)
        status = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True,
                                check=True)
        return (root / "data.dvc").read_text(), (root / "splits.csv").read_text(), show.stdout, status.stdout

    before = state()
    refused = CliRunner().invoke(app, ["data", "import", str(make_imagefolder(tmp_path / "m2", per_class=4, seed=9,
                                                                              prefix="new"))])
    assert refused.exit_code != 0, refused.output
    message = refused.output.strip()
    assert "\n" not in message and f"version {imported.version} could not be brought into" in message, message
    assert "refused, nothing changed" in message and "12 committed images" in message, message
    assert "DEFECTOPS_DVC_REMOTE" in message and "`defectops data pull`" in message, message
    assert state() == before and not (lost.data_dir / "images").exists()

    # the committed file names with other pictures: still not the committed version
    with pytest.raises(UsageError, match="refused, nothing changed: the committed dataset version"):
        import_data(str(make_imagefolder(tmp_path / "m3", per_class=4, seed=9)), lost, load_params(lost.params_file))
    assert state() == before and not any(lost.data_dir.rglob("*.png"))

    restored = import_data(str(first), lost, load_params(lost.params_file))  # exactly the committed version
    assert restored.restored and restored.version == imported.version and state() == before


def test_a_pull_over_files_that_only_data_holds_names_the_force_fix_and_keeps_them(project, tmp_path: Path) -> None:
    """An extra or edited file in data/ is neither in the committed version nor in DVC's cache: `data pull`
    keeps it and says that `--force` discards it (the remote is fine, so its settings are not the fix)."""
    from components.cli import app

    import_data(str(make_imagefolder(tmp_path / "batch", per_class=4)), project, load_params(project.params_file))
    original = _digests(project.data_dir / "images")
    extra = project.data_dir / "images" / "dent" / "extra.png"
    extra.write_bytes(b"someone's file")

    refused = CliRunner().invoke(app, ["data", "pull"])
    message = refused.output.strip().splitlines()[-1]
    assert refused.exit_code == 2 and message.startswith("error: "), refused.output
    assert "`defectops data pull --force`" in message and "data/images/dent/extra.png" in message, message
    assert "DEFECTOPS_DVC_REMOTE" not in message, message
    assert extra.read_bytes() == b"someone's file", "nothing lost"

    pulled = CliRunner().invoke(app, ["data", "pull", "--force"])
    assert pulled.exit_code == 0, pulled.output
    assert _digests(project.data_dir / "images") == original


def test_a_pull_into_a_fresh_clone_stopped_by_sigterm_leaves_no_partial_data(
        project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C or SIGTERM while `data pull` writes data/ in a fresh clone: no partial data/ is left to pass for the
    dataset; the next pull brings the whole version."""
    imported = import_data(str(make_imagefolder(tmp_path / "batch", per_class=4)), project,
                           load_params(project.params_file))
    clone = _clone(project, tmp_path, "clone", monkeypatch, project.dvc_remote_url)

    stopped = terminated_while_moving_files(clone.data_dir, "data", "pull", after=3)
    assert stopped.returncode == 130, stopped.stdout + stopped.stderr
    assert not clone.data_dir.exists(), sorted(_digests(clone.data_dir))

    from components.cli import app

    pulled = CliRunner().invoke(app, ["data", "pull"])
    assert pulled.exit_code == 0 and f"dataset version {imported.version}: 12 images" in pulled.output, pulled.output
    assert _digests(clone.data_dir / "images") == _digests(project.data_dir / "images")
