"""Registry fixtures: one tiny tracked dataset per session, a fresh sqlite MLflow per test, tiny model files."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT, TEST_CLASSES, git_init, make_imagefolder

IMAGE_SIZE = 32  # the smallest size the models accept: keeps every forward pass and input example tiny
LENIENT_GATE = {"min_macro_f1": 0.0, "min_defect_detection_rate": 0.0, "max_false_alarm_rate": 1.0}


def project_params(root: Path) -> dict:
    """params.yaml of the tiny project (as the `project` fixture writes it), with a cheap `evaluate` section."""
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["data"]["dataset"] = "tiny"
    params["datasets"]["tiny"] = {"normal_class": "normal", "classes": TEST_CLASSES, "grouping": {"rule": "image"}}
    params["validate"]["min_images_per_class"] = 3
    params["validate"]["max_class_shift_kl"] = 0.5
    params["evaluate"] = {"n_boot": 20, "batch_size": 16}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return params


def params_with_gate(settings, **gate: float):
    """The project's Params with these gate rules (absolute minimums etc.)."""
    from components.config import Params

    raw = yaml.safe_load(settings.params_file.read_text())
    raw["evaluate"] = {**raw.get("evaluate", {}), "gate": gate}
    return Params.model_validate(raw)


@pytest.fixture(scope="session")
def tracked_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git + DVC project holding 10 images per class, imported once for the whole session."""
    from components.config import Settings, load_params
    from components.data.importer import import_data

    base = tmp_path_factory.mktemp("registry-project")
    root = base / "project"
    root.mkdir()
    git_init(root)
    project_params(root)
    settings = Settings(project=root, home=base / "import-home")
    source = make_imagefolder(base / "source", per_class=10)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(base)
        import_data(str(source), settings, load_params(settings.params_file), commit_changes=True, push=False)
    return root


@pytest.fixture(scope="session")
def empty_mlflow_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow sqlite database with its tables created once (creating them takes seconds)."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


def fresh_home(home: Path, template: Path) -> Path:
    """A state root whose embedded MLflow store starts empty."""
    (home / "mlflow").mkdir(parents=True, exist_ok=True)
    shutil.copy(template, home / "mlflow" / "mlflow.db")
    return home


@pytest.fixture
def registry_project(tracked_project: Path, empty_mlflow_db: Path, tmp_path: Path,
                     monkeypatch: pytest.MonkeyPatch):
    """Settings of the shared tracked project with a fresh state root and an empty embedded MLflow store."""
    from components.config import get_settings

    monkeypatch.setenv("DEFECTOPS_PROJECT", str(tracked_project))
    monkeypatch.setenv("DEFECTOPS_HOME", str(fresh_home(tmp_path / "home", empty_mlflow_db)))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    return get_settings()


def make_train_dir(out: Path, logits_bias: list[float] | None = None, seed: int = 0,
                   calibration: dict | None = None, extra_meta: dict | None = None,
                   dataset_version: str | None = None) -> Path:
    """model.pt + train_metrics.json + history.csv as `defectops train` writes them, for a tiny resnet18.

    `logits_bias` makes a constant predictor (zero last layer, this bias): [5, 0, 0] always says 'dent'.
    """
    import torch

    from components.training.models import build_model
    from components.training.train import model_meta, save_model_file

    torch.manual_seed(seed)
    model, weights_used = build_model("resnet18", len(TEST_CLASSES), dropout=0.0, hidden=8, weights=None)
    if logits_bias is not None:
        with torch.no_grad():
            model.classifier[1].weight.zero_()
            model.classifier[1].bias.copy_(torch.tensor(logits_bias))
    model.eval()
    meta = model_meta(
        model, TEST_CLASSES, "normal", IMAGE_SIZE, weights_used=weights_used, dataset_version=dataset_version,
        manifest_digest="test", profile="tiny",
        train_params={"arch": "resnet18", "image_size": IMAGE_SIZE, "epochs": 2, "lr": 0.01},
        augment_params={"hflip": 0.5}, seed=seed, metrics={"best_val_macro_f1": 0.5, "best_epoch": 2, "epochs": 2},
        created_at="2026-01-01T00:00:00+00:00",
        calibration=calibration or {"temperature": 1.0, "threshold": 0.5, "target_met": False, "n_val": 4},
        **(extra_meta or {}),
    )
    out.mkdir(parents=True, exist_ok=True)
    save_model_file(out / "model.pt", model, model.state_dict(), meta)
    (out / "train_metrics.json").write_text(json.dumps({"best_val_macro_f1": 0.5, "epochs": 2, "seconds": 1.5,
                                                        "profile": "tiny", "weights_used": weights_used}))
    (out / "history.csv").write_text("epoch,train_loss,val_loss,val_macro_f1,val_accuracy,lr,seconds\n"
                                     "1,1.2,1.1,0.3,0.4,0.01,0.7\n2,0.9,1.0,0.5,0.6,0.005,0.8\n")
    return out


@pytest.fixture(scope="module")
def registered(tracked_project: Path, empty_mlflow_db: Path,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    """One model registered (lenient gate, no champion) into its own store: (settings, train_dir, result)."""
    from components.config import Settings
    from components.registry.registry import register

    base = tmp_path_factory.mktemp("registered")
    train_dir = make_train_dir(base / "train", seed=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)  # before Settings reads it: earlier tests leave it set
        settings = Settings(project=tracked_project, home=fresh_home(base / "home", empty_mlflow_db))
        mp.chdir(base)
        result = register(settings, params_with_gate(settings, **LENIENT_GATE), train_dir)
    yield settings, train_dir, result
