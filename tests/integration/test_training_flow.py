"""The train-challenger flow under a real Prefect server: register + gate + approval request, and clean failures."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from components.config import load_params
from components.data.importer import import_data
from components.errors import PicturesChanged
from tests.conftest import make_imagefolder

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TINY_PROFILE = {"arch": "resnet18", "weights": None, "image_size": 48, "batch_size": 8, "epochs": 2, "patience": 5,
                "lr": 1e-3, "warmup_epochs": 0, "hidden": 32, "dropout": 0.1, "num_workers": 1,
                "precision": "fp32", "channels_last": False, "threads": 1}


def _tracked_project(settings, tmp_path: Path, **profile) -> None:
    params = yaml.safe_load(settings.params_file.read_text())
    params["train"]["profile"] = "tiny"
    params["train"]["profiles"]["tiny"] = {**TINY_PROFILE, **profile}
    params["evaluate"]["n_boot"] = 50
    settings.params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    import_data(str(make_imagefolder(tmp_path / "batch", per_class=8)), settings, load_params(settings.params_file))


def _versions(settings) -> list:
    from components.registry.registry import list_versions

    return list_versions(settings)


def test_flow_registers_a_challenger_and_asks_for_approval(project, tmp_path: Path, prefect_server) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.training_flow import train_challenger

    _tracked_project(project, tmp_path)
    out = train_challenger(out_dir=str(tmp_path / "train"))
    registered = out["registered"]
    assert registered["created"] and registered["compared_with"] in (None, "none")
    versions = _versions(project)
    assert len(versions) == 1 and "challenger" in versions[0]["aliases"]
    assert "champion" not in versions[0]["aliases"], "nothing but a person moves champion"
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["approval-request"])))
    assert any(f"v{registered['version']}" in (a.data or "") for a in artifacts)
    # the same data and model again: no duplicate version
    again = train_challenger(out_dir=str(tmp_path / "train"))
    assert again["skipped"] and len(_versions(project)) == 1 and not again["registered"]["created"]


def test_nan_divergence_registers_nothing(project, tmp_path: Path, prefect_server) -> None:
    from prefect.states import StateType

    from flows.training_flow import train_challenger

    _tracked_project(project, tmp_path, lr=1e30)
    state = train_challenger(out_dir=str(tmp_path / "train"), return_state=True)
    assert state.type == StateType.FAILED and "diverged" in state.message.lower()
    assert not (tmp_path / "train" / "model.pt").exists()


def test_invalid_data_stops_before_training(project, tmp_path: Path, prefect_server) -> None:
    from prefect.states import StateType

    from components.data.versioning import DatasetRepo
    from flows.training_flow import train_challenger

    _tracked_project(project, tmp_path)
    (project.data_dir / "images" / "dent" / "img_000.png").write_bytes(b"")
    DatasetRepo(project).add()  # the committed version (data.dvc) holds the broken image
    state = train_challenger(out_dir=str(tmp_path / "train"), return_state=True)
    assert state.type == StateType.FAILED and "img_000.png" in state.message
    assert not (tmp_path / "train").exists()


def test_unreachable_registry_retries_then_fails_cleanly(project, tmp_path: Path, prefect_server,
                                                          monkeypatch) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.states import StateType

    from flows import training_flow

    _tracked_project(project, tmp_path)
    for name in ("already_trained_task", "register_task"):
        monkeypatch.setattr(training_flow, name, getattr(training_flow, name).with_options(retry_delay_seconds=0))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    state = training_flow.train_challenger(out_dir=str(tmp_path / "train"), return_state=True)
    assert state.type == StateType.FAILED and "unreachable" in state.message
    deadline = time.monotonic() + 30  # the server records task-run states from events, a moment after the run
    while True:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
        checked = [run for run in runs if run.name.startswith("already-trained")]
        if (checked and checked[0].run_count == 3) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len(checked) == 1 and checked[0].run_count == 3, "tried once and retried twice before the flow failed"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert _versions(project) == [], "nothing fell back to the embedded store"


def _pull_over_an_edit(settings) -> None:
    """A `data pull --force` that puts back a picture edited by hand: it changes a picture of data/."""
    from components.data.tracked import restore_data

    next((settings.data_dir / "images").rglob("*.png")).write_bytes(b"edited by hand")
    restore_data(settings, force=True)


@pytest.mark.parametrize(("cached", "by_hand"), [(True, False), (False, False), (False, True)],
                         ids=["decoded-first", "read-every-epoch", "edited-by-hand"])
def test_a_pull_while_training_reads_the_pictures_stops_it_before_any_output(
        project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cached: bool, by_hand: bool) -> None:
    """Training decodes every picture before its first epoch (`cache_images`), else reads them every epoch: a pull
    that changes one meanwhile, or an edit by hand, stops it before it writes a model. An epoch that read a
    changed picture is not checkpointed: the checkpoint keeps the epochs before it, and with the committed
    pictures back (the same fingerprint) `--resume` carries on from them."""
    import torch

    from components.data.tracked import restore_data
    from components.training import loop, train
    from components.training.calibrate import train_and_calibrate

    _tracked_project(project, tmp_path, num_workers=0, cache_images=cached)
    params = load_params(project.params_file)
    out = tmp_path / "train"
    real_build, real_validate = train.build_loaders, loop.Trainer.validate
    edit = next((project.data_dir / "images").rglob("*.png"))

    def build_beside_a_pull(*args, **kwargs):
        loaders = real_build(*args, **kwargs)
        _pull_over_an_edit(project)
        return loaders

    def validate_beside_a_change(trainer):
        if trainer.epoch == 2:  # the second epoch reads the pictures while one changes
            edit.write_bytes(edit.read_bytes()[:-1]) if by_hand else _pull_over_an_edit(project)
        return real_validate(trainer)

    with monkeypatch.context() as patch:
        if cached:
            patch.setattr(train, "build_loaders", build_beside_a_pull)
        else:
            patch.setattr(loop.Trainer, "validate", validate_beside_a_change)
        with pytest.raises(PicturesChanged, match="edited by hand" if by_hand else "a `data pull` changed"):
            train_and_calibrate(project, params, None, False, out)
    assert not list(out.glob("*.pt")) and not (out / "train_metrics.json").exists()
    checkpoints = [d for d in (project.home_dir / "checkpoints").glob("*") if any(d.iterdir())]
    if cached:
        assert checkpoints == [], "no epoch ran"
        return
    assert len(checkpoints) == 1 and sorted(f.name for f in checkpoints[0].iterdir()) == ["best.pt", "last.pt"]
    assert torch.load(checkpoints[0] / "last.pt", weights_only=False)["epoch"] == 1, "the epoch on changed pictures"
    restore_data(project, force=True)  # the committed pictures back (a no-op after the pull)
    metrics = train_and_calibrate(project, params, None, True, out)
    assert (out / "model.pt").is_file() and metrics["resumed_from_epoch"] == 1 and metrics["epochs"] == 2


def test_an_interruption_during_calibration_leaves_no_model_and_resume_finishes_it(
        project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """model.pt appears only calibrated; the checkpoint stays until then, so --resume only calibrates. A pull
    that changes data/ while calibration reads val's pictures fails it the same way."""
    import torch

    from components.evaluation import runner
    from components.training.calibrate import UNCALIBRATED_FILE, train_and_calibrate, training_fingerprint

    _tracked_project(project, tmp_path, num_workers=0)  # in this process: no loader workers forked from pytest
    params = load_params(project.params_file)
    out = tmp_path / "train"
    out.mkdir()
    (out / "model.pt").write_bytes(b"an earlier run's model, which the new run's metrics would sit beside")

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(runner, "calibrate", interrupted)
        with pytest.raises(KeyboardInterrupt):
            train_and_calibrate(project, params, None, False, out)
    assert not (out / "model.pt").exists() and not (out / "calibration.json").exists()
    assert (out / UNCALIBRATED_FILE).is_file()
    checkpoints = list((project.home_dir / "checkpoints").iterdir())
    assert len(checkpoints) == 1 and (checkpoints[0] / "last.pt").is_file()

    real_calibrate = runner.calibrate

    def calibrate_beside_a_pull(*args, **kwargs):  # val's pictures are read while a pull changes data/
        _pull_over_an_edit(project)
        return real_calibrate(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(runner, "calibrate", calibrate_beside_a_pull)
        with pytest.raises(PicturesChanged, match="a `data pull` changed or removed pictures in data/"):
            train_and_calibrate(project, params, None, True, out)
    assert not (out / "model.pt").exists() and (checkpoints[0] / "last.pt").is_file()

    done = train_and_calibrate(project, params, None, True, out)
    assert done["resumed_from_epoch"] == done["epochs"] == 2, "resumed after the last epoch: nothing retrained"
    blob = torch.load(out / "model.pt", map_location="cpu", weights_only=True)
    assert blob["calibration"] == done["calibration"] and (out / "calibration.json").is_file()
    assert not (out / UNCALIBRATED_FILE).exists() and not checkpoints[0].exists()
    # the seed training uses is part of what makes a run the same run
    seeds = [training_fingerprint(project, load_params(project.params_file, [f"train.seed={s}"]), None)
             for s in (1, 2)]
    assert seeds[0] != seeds[1]

    def fingerprint(*overrides: str) -> str:
        return training_fingerprint(project, load_params(project.params_file, list(overrides)), None)

    assert fingerprint() != fingerprint("datasets.tiny.normal_class=dent"), "what a normal part is changes the run"
    assert fingerprint() == fingerprint("train.profiles.tiny.cache_images=false"), "where the pictures are held not"
