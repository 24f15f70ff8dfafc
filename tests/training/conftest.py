"""Fixtures for the training tests: a tiny dataset (grey PNGs and colour JPEGs) made once per session."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageDraw

from components.config import Params, Settings

CLASSES = ["normal", "scratch", "spot"]
PER_CLASS = 12
SIZE = 48


def _texture(rng: np.random.Generator) -> np.ndarray:
    base = rng.integers(90, 150)
    return np.clip(base + rng.normal(0, 12, (SIZE, SIZE)), 0, 255).astype(np.uint8)


def _draw(label: str, rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    """A textured tile with the class's defect drawn on it, and the defect's mask."""
    image = Image.fromarray(_texture(rng), mode="L")
    mask = Image.new("L", image.size, 0)
    if label == "scratch":
        x0, y0 = (int(v) for v in rng.integers(4, 20, 2))
        line = [(x0, y0), (x0 + 24, y0 + 20)]
        ImageDraw.Draw(image).line(line, fill=int(rng.integers(0, 30)), width=3)
        ImageDraw.Draw(mask).line(line, fill=255, width=3)
    elif label == "spot":
        cx, cy = (int(v) for v in rng.integers(12, 36, 2))
        box = [cx - 6, cy - 6, cx + 6, cy + 6]
        ImageDraw.Draw(image).ellipse(box, fill=int(rng.integers(220, 256)))
        ImageDraw.Draw(mask).ellipse(box, fill=255)
    return image, mask


def _write_tiny(root: Path, with_masks: bool) -> None:
    rng = np.random.default_rng(0)
    images = root / "images" if with_masks else root
    for label in CLASSES:
        (images / label).mkdir(parents=True)
        if with_masks and label != "normal":
            (root / "masks" / label).mkdir(parents=True)
        for i in range(PER_CLASS):
            image, mask = _draw(label, rng)
            name = f"{label}_{i:02d}"
            if i % 2:
                tint = np.stack([np.asarray(image)] * 3, axis=2).astype(np.int16) + np.array([12, 0, -12])
                Image.fromarray(np.clip(tint, 0, 255).astype(np.uint8), "RGB").save(
                    images / label / f"{name}.jpg", quality=95
                )
            else:
                image.save(images / label / f"{name}.png")
            if with_masks and label != "normal" and i != 0:  # one defect image without a mask: "unknown"
                mask.save(root / "masks" / label / f"{name}.png")


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ImageFolder <root>/<class>/*.png|jpg: even items are greyscale PNGs, odd items colour JPEGs."""
    root = tmp_path_factory.mktemp("tiny-imagefolder")
    _write_tiny(root, with_masks=False)
    return root


@pytest.fixture(scope="session")
def tiny_masked_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same images in our tracked layout: images/<class>/, defect masks in masks/<class>/<stem>.png."""
    root = tmp_path_factory.mktemp("tiny-tracked")
    _write_tiny(root, with_masks=True)
    return root


def tiny_raw_params(**profile: Any) -> dict[str, Any]:
    """params.yaml content for the tiny dataset; keyword arguments override the cpu profile."""
    cpu = {
        "arch": "resnet18",
        "weights": None,
        "image_size": 64,
        "batch_size": 8,
        "epochs": 2,
        "patience": 5,
        "lr": 1e-3,
        "warmup_epochs": 0,
        "hidden": 64,
        "dropout": 0.1,
        "num_workers": 0,
        "precision": "fp32",
        "channels_last": False,
        "threads": 1,
    }
    cpu.update(profile)
    return {
        "base": {"seed": 7},
        "data": {"dataset": "tiny", "split": {"train": 0.5, "val": 0.25, "test": 0.25}},
        "datasets": {"tiny": {"normal_class": "normal", "classes": CLASSES, "grouping": {"rule": "image"}}},
        "augment": {"crop_scale": [0.8, 1.0], "affine": 0.3, "noise": 0.2, "blur": 0.2},
        "train": {
            "profile": "cpu",
            "profiles": {"cpu": copy.deepcopy(cpu), "gpu": {**cpu, "arch": "resnet18"}},
        },
    }


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings whose home (checkpoints, caches) is a fresh temporary folder."""
    return Settings(project=tmp_path, home=tmp_path / "home", workers=1)


def _manifest(root: Path, tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    from components.data.tracked import manifest_of

    home = tmp_path_factory.mktemp("manifest-home")
    settings = Settings(project=home, home=home, workers=1)
    return manifest_of(root, settings, Params.model_validate(tiny_raw_params()))


@pytest.fixture(scope="session")
def tiny_manifest(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """The tiny dataset's manifest with train/val/test splits."""
    return _manifest(tiny_dataset, tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_masked_manifest(tiny_masked_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """Manifest of the tiny dataset in the tracked layout (with masks)."""
    return _manifest(tiny_masked_dataset, tmp_path_factory)


@pytest.fixture
def raw_params() -> Any:
    """Factory: params for the tiny dataset with cpu-profile overrides, e.g. raw_params(loss='focal')."""
    return tiny_raw_params
