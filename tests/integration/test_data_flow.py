"""The ingest flow under a real Prefect server, and the DVC pipeline under a real `dvc repro`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import REPO_ROOT, make_imagefolder

pytestmark = pytest.mark.integration


def test_ingest_flow_versions_and_reports(project, tmp_path: Path, prefect_server) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.states import StateType

    from flows.data_flow import ingest_dataset

    source = make_imagefolder(tmp_path / "batch", per_class=4)
    state = ingest_dataset(source=str(source), return_state=True)
    assert state.type == StateType.COMPLETED
    summary = state.result()
    assert summary["changed"] and summary["added"] == 12 and summary["pushed"]
    again = ingest_dataset(source=str(source))
    assert not again["changed"] and again["dataset_version"] == summary["dataset_version"]
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["dataset-version"])))
    assert any(summary["dataset_version"] in (a.data or "") for a in artifacts)


def test_ingest_flow_fails_cleanly_on_bad_data(project, tmp_path: Path, prefect_server) -> None:
    from prefect.states import StateType

    from flows.data_flow import ingest_dataset

    source = make_imagefolder(tmp_path / "batch", per_class=4)
    (source / "dent" / "broken.jpg").write_text("not a jpeg")
    state = ingest_dataset(source=str(source), return_state=True)
    assert state.type == StateType.FAILED and "broken.jpg" in str(state.message) + str(state.data)
    assert not (project.data_dir / "images").exists()


def test_dvc_repro_runs_the_manifest_and_validation_stages(project, tmp_path: Path) -> None:
    from components.config import load_params
    from components.data.importer import import_data

    root = project.project_root
    import_data(str(make_imagefolder(tmp_path / "batch", per_class=4)), project, load_params(project.params_file))
    shutil.copy(REPO_ROOT / "dvc.yaml", root / "dvc.yaml")
    shutil.copytree(REPO_ROOT / "components", root / "components",
                    ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    dvc = [str(Path(sys.executable).parent / "dvc")]
    run = subprocess.run([*dvc, "repro", "validate"], cwd=root, env=env, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    manifest = pd.read_parquet(root / "artifacts" / "manifest.parquet")
    assert len(manifest) == 12 and set(manifest["split"]) <= {"train", "val", "test"}
    assert (root / "artifacts" / "validation.json").is_file()
    again = subprocess.run([*dvc, "status", "validate"], cwd=root, env=env, capture_output=True, text=True, check=False)
    assert "up to date" in again.stdout, again.stdout
