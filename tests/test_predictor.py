"""The predictor applies the model file's own eval transform (size and normalisation), nothing else."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from components.predictor import Predictor
from components.training.models import build_model
from components.training.transforms import preprocess


@pytest.mark.parametrize("kind", ["imagenet", "per_image", "detail_bands", "log_detail_bands"])
def test_prepare_uses_the_models_normalisation(kind: str) -> None:
    model, _ = build_model("resnet18", 3, hidden=16, weights=None)
    meta = {"classes": ["dent", "normal", "scratch"], "normal_class": "normal", "image_size": 32,
            "normalization": {"kind": kind}}
    rgb = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    prepared = Predictor(model, meta, device="cpu").prepare(rgb)
    assert torch.equal(prepared, preprocess(rgb, 32, kind))
    other = "imagenet" if kind == "per_image" else "per_image"
    assert not torch.equal(prepared, preprocess(rgb, 32, other))
    assert prepared.is_contiguous(), "a strided tensor makes the batch's torch.stack a slow parallel copy"


def test_prepare_uses_the_models_fit() -> None:
    model, _ = build_model("resnet18", 3, hidden=16, weights=None)
    meta = {"classes": ["dent", "normal", "scratch"], "normal_class": "normal", "image_size": 32,
            "normalization": {"kind": "per_image"}}
    rgb = np.random.default_rng(0).integers(0, 255, (20, 50, 3), dtype=np.uint8)
    squashed = Predictor(model, meta, device="cpu").prepare(rgb)  # model files from before `fit`: squashed
    padded = Predictor(model, {**meta, "fit": "pad"}, device="cpu").prepare(rgb)
    assert torch.equal(squashed, preprocess(rgb, 32, "per_image", "squash"))
    assert torch.equal(padded, preprocess(rgb, 32, "per_image", "pad"))
    assert not torch.equal(squashed, padded)


@pytest.mark.parametrize("kind", ["imagenet", "per_image", "detail_bands", "log_detail_bands"])
@pytest.mark.parametrize(("size", "fit"), [(64, "squash"), (224, "squash"), (224, "pad")])
def test_a_grayscale_image_is_prepared_in_one_channel_to_the_same_numbers(kind: str, size: int, fit: str,
                                                                         magnetic_tile) -> None:
    """The serving path prepares grayscale originals in one channel; it must equal the three-channel eval transform."""
    from components.data.images import decode

    files = sorted(magnetic_tile.glob("MT_*/Imgs/*.jpg"))[::97][:8]
    assert files, "no Magnetic Tile images"
    for file in files:
        decoded = decode(file)
        assert decoded.gray is not None, f"{file.name} is a grayscale JPEG"
        one, three = preprocess(decoded.gray, size, kind, fit), preprocess(decoded.rgb, size, kind, fit)
        assert one.shape == three.shape == (3, size, size) and one.dtype == three.dtype and one.is_contiguous()
        torch.testing.assert_close(one, three, rtol=1e-5, atol=1e-5)
