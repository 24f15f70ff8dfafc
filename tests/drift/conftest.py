"""Drift fixtures: a tracked-layout project of small part images, a tiny model, production-log records."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.conftest import TEST_CLASSES

IMAGE_SIZE = 32
PER_CLASS = 80
DARKER = {"gain": 0.6}  # the lighting change: the lamp over the line loses 40% of its light


def part_rgb(seed: int) -> np.ndarray:
    """A small grey part under the line's light: textured, with a dark blob, of varying size and exposure."""
    rng = np.random.default_rng(seed)
    height, width = int(rng.integers(48, 72)), int(rng.integers(56, 88))
    base = float(np.clip(rng.normal(120, 25), 50, 200))
    pixels = base + rng.normal(0, rng.uniform(12, 30), (height, width))
    y, x = int(rng.integers(8, height - 8)), int(rng.integers(8, width - 8))
    pixels[y - 4:y + 4, x - 4:x + 4] -= rng.uniform(20, 60)
    return np.repeat(np.clip(pixels, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)


@pytest.fixture(scope="session")
def part_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """images/<class>/*.png: PER_CLASS part images per class, written once per session."""
    root = tmp_path_factory.mktemp("drift-parts")
    for c, label in enumerate(TEST_CLASSES):
        folder = root / "images" / label
        folder.mkdir(parents=True)
        for i in range(PER_CLASS):
            Image.fromarray(part_rgb(c * 1000 + i)).save(folder / f"part_{i:03d}.png")
    return root / "images"


@pytest.fixture(scope="session")
def drift_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded random-init resnet18 at 32 px: arbitrary but fixed answers, embeddings that see the light."""
    import torch

    from components.training.models import build_model
    from components.training.train import model_meta, save_model_file

    torch.manual_seed(0)
    model, _ = build_model("resnet18", len(TEST_CLASSES), dropout=0.0, hidden=64, weights=None)
    meta = model_meta(model, TEST_CLASSES, "normal", IMAGE_SIZE, created_at="2025-01-01T00:00:00+00:00",
                      calibration={"temperature": 1.0, "threshold": 0.5})
    path = tmp_path_factory.mktemp("drift-model") / "model.pt"
    save_model_file(path, model.eval(), model.state_dict(), meta)
    return path


@pytest.fixture
def drift_project(project, part_images: Path, monkeypatch: pytest.MonkeyPatch):
    """The `project` with its data/images (a tracked layout and version) and a `drift` section in params."""
    import shutil

    shutil.copytree(part_images, project.data_dir / "images")
    (project.project_root / "data.dvc").write_text(yaml.safe_dump(
        {"outs": [{"md5": "0123456789abcdef0123456789abcdef.dir", "path": "data"}]}))
    (project.project_root / "pyproject.toml").write_text("[project]\nname = 'plant'\n")
    params_file = project.project_root / "params.yaml"
    params = yaml.safe_load(params_file.read_text())
    params["drift"]["embedding"]["enabled"] = True  # the check under test, whatever the committed default
    # every answered image: the random test model calls too few parts normal for the normal-only default
    # (test_the_embedding_check_of_normal_parts_ignores_the_class_mix covers that one)
    params["drift"]["embedding"]["classes"] = "all"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.setenv("DEFECTOPS_WORKERS", "1")
    return project


def production_records(settings, model: Path, seeds: range, shift: dict[str, float] | None = None,
                       end: datetime | None = None) -> list[dict]:
    """Production-log records of new part images (optionally under a lighting change), one a minute to `end`."""
    from components.drift.simulate import lighting_change, log_records
    from components.registry.registry import load_predictor

    predictor = load_predictor(settings, str(model))
    images = [part_rgb(seed) for seed in seeds]
    if shift:
        images = [lighting_change(rgb, **shift) for rgb in images]
    end = end or datetime.now(UTC) - timedelta(hours=1)
    stamps = [end - timedelta(minutes=10 * i) for i in range(len(images))][::-1]
    return log_records(predictor, images, stamps)
