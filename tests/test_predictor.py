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


@pytest.mark.parametrize("kind", ["imagenet", "per_image", "detail_bands", "log_detail_bands"])
@pytest.mark.parametrize("size", [64, 224])
def test_a_grayscale_image_is_prepared_in_one_channel_to_the_same_numbers(kind: str, size: int,
                                                                         magnetic_tile) -> None:
    """The serving path prepares grayscale originals in one channel; it must equal the three-channel eval transform."""
    from components.data.images import decode

    files = sorted(magnetic_tile.glob("MT_*/Imgs/*.jpg"))[::97][:8]
    assert files, "no Magnetic Tile images"
    for file in files:
        decoded = decode(file)
        assert decoded.gray is not None, f"{file.name} is a grayscale JPEG"
        one, three = preprocess(decoded.gray, size, kind), preprocess(decoded.rgb, size, kind)
        assert one.shape == three.shape == (3, size, size) and one.dtype == three.dtype and one.is_contiguous()
        torch.testing.assert_close(one, three, rtol=1e-5, atol=1e-5)
