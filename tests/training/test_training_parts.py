"""Unit tests of the training parts: model builder, weights, transforms, dataset, losses, params."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from components.errors import UsageError
from components.training.data import EMPTY_MASK, ManifestDataset, balanced_sampler
from components.training.loop import (
    NONDETERMINISTIC,
    LoopConfig,
    Trainer,
    classification_metrics,
    cutmix,
    defect_label_weights,
    mixup,
    nondeterminism_logged_once,
    warmup_cosine,
)
from components.training.losses import (
    FocalLoss,
    build_loss,
    class_weights,
    distill_loss,
    mixed_loss,
    supcon_loss,
)
from components.training.models import add_drop_path, build_model, imagenet_weights_file
from components.training.params import AugmentParams, train_params
from components.training.train import profile_model
from components.training.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    detail_bands,
    eval_transform,
    log_detail_bands,
    pad_to_square,
    train_transform,
)


@pytest.mark.parametrize("attention", [False, True])
def test_model_logits_and_embedding_shapes(attention):
    model, used = build_model("resnet18", 4, dropout=0.2, hidden=32, attention=attention, weights=None)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    assert used == "random-init"
    assert model(x).shape == (2, 4) and model.embed(x).shape == (2, 32)


def test_an_unreadable_model_file_is_one_line_with_its_reason(tmp_path: Path) -> None:
    from components.training.train import load_model_file

    empty, junk = tmp_path / "empty.pt", tmp_path / "junk.pt"
    empty.write_bytes(b"")
    junk.write_bytes(bytes(range(256)) * 2)
    for path, reason in ((empty, "empty or cut short"), (junk, "not a weights-only PyTorch file")):
        with pytest.raises(UsageError, match="not a readable model file") as refused:
            load_model_file(path)
        assert reason in str(refused.value) and "\n" not in str(refused.value) and "PyTorch 2.6" not in str(refused.value)


@pytest.mark.parametrize("width", [0, 8])
def test_mask_head_and_gate_give_a_coarse_defect_map(width):
    model, _ = build_model("resnet18", 3, hidden=16, mask_head=True, mask_gate=True, mask_head_width=width)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    logits, defect = model.forward_train(x)
    assert logits.shape == (2, 3) and defect.shape == (2, 1, 4, 4)
    assert torch.allclose(model(x), logits) and torch.allclose(model.defect_map(x), torch.sigmoid(defect))
    with pytest.raises(UsageError, match="no defect-map head"):
        build_model("resnet18", 3)[0].defect_map(x)


def test_a_class_per_cell_defect_map_is_one_minus_the_normal_class():
    """With mask_classes the head names each cell's class; map and gate are the probability of any defect."""
    model, _ = build_model("resnet18", 4, hidden=16, mask_head=True, mask_gate=True, mask_classes=True,
                           normal_index=2)
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    logits, cells = model.forward_train(x)
    assert logits.shape == (2, 4) and cells.shape == (2, 4, 4, 4)
    defect = model.defect_map(x)
    assert torch.allclose(defect, 1 - torch.softmax(cells, dim=1)[:, 2:3])
    with torch.no_grad():  # a head sure that every cell is normal closes the gate: the pooled features vanish
        model.defect_head.weight.zero_()
        model.defect_head.bias.copy_(torch.tensor([0.0, 0.0, 30.0, 0.0]))
    assert model.defect_map(x).max() < 1e-6 and model.feature_map(x).abs().max() < 1e-6
    with pytest.raises(UsageError, match="normal_index 4"):
        build_model("resnet18", 4, mask_head=True, mask_classes=True, normal_index=4)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_output_stride_16_keeps_layer4_at_layer3s_resolution(arch):
    """Twice the cells each way in the last map, the same weights' shapes, the same defect map resolution."""
    x = torch.randn(1, 3, 96, 64)
    shapes = {}
    for stride in (32, 16):
        model, _ = build_model(arch, 3, hidden=16, attention=True, mask_head=True, mask_gate=True,
                               output_stride=stride)
        last, defect = model.eval()._stages(x)
        assert defect.shape[-2:] == (6, 4) and last.shape[-2:] == (96 // stride, 64 // stride)
        shapes[stride] = {k: v.shape for k, v in model.state_dict().items()}
    assert shapes[16] == shapes[32]
    with pytest.raises(UsageError, match="output_stride 8"):
        build_model(arch, 3, output_stride=8)


@pytest.mark.parametrize(("name", "options"), [
    ("resnet18", {}),
    ("resnet18", {"attention": True, "mask_head": True, "mask_gate": True, "dropout": 0.1}),
    ("resnet18", {"attention": True, "mask_head": True, "mask_gate": True, "output_stride": 16}),
    ("resnet18", {"mask_head": True, "mask_gate": True, "mask_head_width": 8}),
    ("resnet18", {"mask_head": True, "mask_gate": True, "mask_classes": True, "normal_index": 1}),
    ("resnet18", {"design": "dense", "dense_stage": 2}),
    ("resnet10", {"attention": True, "mask_head": True, "mask_gate": True}),
    ("resnet10", {"design": "dense", "dense_stage": 3}),
    ("convnet", {"design": "dense", "width": 8}),
])
def test_a_model_describes_its_own_architecture(name, options):
    """The model file's `arch` comes from the model itself, and rebuilds a network with the same parameters."""
    model, _ = build_model(name, 3, hidden=16, **options)
    arch = model.architecture()
    assert arch["name"] == name and arch["hidden"] == 16
    rebuilt, _ = build_model(arch.pop("name"), 3, **arch)
    assert rebuilt.architecture() == model.architecture()
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


@pytest.mark.parametrize(("name", "options", "stride"), [
    ("convnet", {"width": 4}, 8), ("resnet18", {"dense_stage": 2}, 8), ("resnet18", {"dense_stage": 3}, 16)])
def test_dense_design_names_a_class_for_every_cell(name, options, stride):
    model, used = build_model(name, 4, hidden=16, design="dense", **options)
    model.eval()
    x = torch.randn(2, 3, 64, 96)
    cells = model.defect_map(x)
    assert used == "random-init" and cells.shape == (2, 4, 64 // stride, 96 // stride)
    assert torch.allclose(cells.sum(1), torch.ones_like(cells[:, 0]), atol=1e-5)
    logits, embedding = model.forward_with_embedding(x)
    assert logits.shape == (2, 4) and embedding.shape == (2, 16) and torch.allclose(model(x), logits)
    train_logits, cell_logits = model.forward_train(x)
    assert torch.allclose(train_logits, logits) and cell_logits.shape == cells.shape
    train_logits.sum().backward()
    assert all(p.grad is None for p in model.trunk.parameters()), "the head's loss does not train the trunk"


def test_dense_evidence_follows_the_defect_cells():
    """A map with one confident defect cell scores that class's peak far above an all-normal map's."""
    from components.training.models import DenseDefectClassifier

    normal = torch.zeros(1, 3, 8, 8)
    normal[:, 0] = 6.0  # class 0 = normal everywhere
    defect = normal.clone()
    defect[0, 2, 3, 3], defect[0, 0, 3, 3] = 6.0, 0.0
    e_normal, e_defect = DenseDefectClassifier.evidence(normal), DenseDefectClassifier.evidence(defect)
    assert e_normal.shape == (1, 4 * 3)
    peak = slice(0, 3)
    assert e_defect[0, peak][2] > e_normal[0, peak][2] + 3
    assert torch.isfinite(e_defect).all() and torch.isfinite(e_normal).all()


def test_convnet_and_dense_options_are_checked():
    with pytest.raises(UsageError, match="set design: dense"):
        build_model("convnet", 3)
    with pytest.raises(UsageError, match="no pretrained weights"):
        build_model("convnet", 3, design="dense", weights="imagenet")
    def profile(**cpu):
        return {"train": {"profiles": {"cpu": cpu}}}

    with pytest.raises(UsageError, match="set design: dense"):
        train_params(profile(arch="convnet"))
    with pytest.raises(UsageError, match="exceeds image_size"):
        train_params(profile(arch="convnet", design="dense", image_size=64, patch_size=96))
    with pytest.raises(UsageError, match="belong to design: dense"):
        train_params(profile(patch_size=32))
    for option in ({"output_stride": 16}, {"mask_head_width": 32}, {"mask_classes": True}, {"supcon_weight": 0.5},
                   {"distill_from": "teacher.pt"}):
        with pytest.raises(UsageError, match=f"design: dense has no {next(iter(option))}; remove them or use design"):
            train_params(profile(design="dense", mask_loss_weight=1.0, **option))
    with pytest.raises(UsageError, match="design: dense has no attention, freeze_stages; remove them"):
        train_params(profile(design="dense", mask_loss_weight=1.0, attention=True, freeze_stages=2))
    with pytest.raises(UsageError, match="mask_loss_weight > 0"):
        train_params(profile(design="dense", mask_loss_weight=0))
    with pytest.raises(UsageError, match="set mixup_alpha: 0 and cutmix_alpha: 0 for design: dense or mask_classes"):
        train_params(profile(design="dense", mask_loss_weight=1.0, cutmix_alpha=1.0))
    with pytest.raises(UsageError, match="set mixup_alpha or cutmix_alpha to 0"):
        train_params(profile(mixup_alpha=0.4, cutmix_alpha=1.0))
    with pytest.raises(UsageError, match="set mask_head: true or cutmix_labels: area"):
        train_params(profile(cutmix_alpha=1.0, cutmix_labels="mask"))
    with pytest.raises(UsageError, match="mask_classes shapes the defect-map head; set mask_head: true"):
        train_params(profile(mask_classes=True))
    with pytest.raises(UsageError, match="set mixup_alpha: 0 and cutmix_alpha: 0 for design: dense or mask_classes"):
        train_params(profile(mask_head=True, mask_loss_weight=1.0, mask_classes=True, mixup_alpha=0.4))


def test_cell_class_loss_labels_defect_cells_with_the_image_class():
    from components.training.losses import cell_class_loss

    masks = torch.zeros(2, 32, 32)
    masks[0, :8, :8] = 1
    targets, known = torch.tensor([2, 0]), torch.tensor([1.0, 1.0])
    right = torch.full((2, 3, 4, 4), -5.0)
    right[:, 0] = 5.0  # normal everywhere ...
    right[0, 0, 0, 0], right[0, 2, 0, 0] = -5.0, 5.0  # ... but the defect cell is class 2
    wrong = right.clone()
    wrong[0, 2, 0, 0], wrong[0, 1, 0, 0] = -5.0, 5.0
    assert cell_class_loss(right, masks, known, targets, normal_index=0) < 0.01
    assert cell_class_loss(wrong, masks, known, targets, normal_index=0) > 1.0
    unknown = torch.tensor([0.0, 1.0])
    assert cell_class_loss(wrong, masks, unknown, targets, normal_index=0) < 0.01, "unknown masks are skipped"


def test_patches_sit_on_the_defect_as_often_as_asked_and_label_themselves(tmp_path):
    from components.training.data import patch_crop

    rng = np.random.default_rng(0)
    mask = np.zeros((64, 64), np.uint8)
    mask[50:54, 50:54] = 1
    on = [mask[y:y + 16, x:x + 16].any() for y, x in (patch_crop(mask, 16, 1.0, rng) for _ in range(50))]
    assert all(on), "focus 1: every patch holds the defect"
    anywhere = [mask[y:y + 16, x:x + 16].any() for y, x in (patch_crop(mask, 16, 0.0, rng) for _ in range(200))]
    assert 0 < sum(anywhere) < 60
    with pytest.raises(UsageError, match="exceeds the training picture"):
        patch_crop(mask, 80, 0.5, rng)

    image = np.full((64, 64), 120, np.uint8)
    Image.fromarray(image).save(tmp_path / "d.png")
    Image.fromarray(mask * 255).save(tmp_path / "d_mask.png")
    data = ManifestDataset([tmp_path / "d.png"] * 30, [1] * 30, eval_transform(64), seed=3,
                           masks=[tmp_path / "d_mask.png"] * 30, normal_target=0, patch=16, patch_focus=0.5)
    items = [data[i] for i in range(30)]
    assert all(x.shape == (3, 16, 16) and m.shape == (16, 16) for x, _, m, _ in items)
    assert {t for _, t, m, _ in items if m.any()} == {1} and {t for _, t, m, _ in items if not m.any()} == {0}
    assert [int(data[i][1]) for i in range(30)] == [int(t) for _, t, _, _ in items], "reproducible"


def test_freeze_stages_freezes_stem_and_first_stages():
    model, _ = build_model("resnet18", 3, freeze_stages=2)
    frozen = {n.split(".")[1] for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"conv1", "bn1", "layer1"}
    model.train()
    assert not model.backbone.layer1.training and model.backbone.layer2.training


def test_offline_imagenet_weights_warn_and_fall_back_to_random_init(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with caplog.at_level(logging.WARNING):
        _, used = build_model("resnet18", 3, weights="imagenet")
    assert used.startswith("random-init (ImageNet weights unavailable: resnet18-")
    assert "training from random initialisation" in caplog.text


def test_a_profile_meant_for_imagenet_weights_points_to_the_cpu_profile_without_them(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    prof = train_params({"train": {"profiles": {"p": {"arch": "resnet18", "weights": "imagenet"}}}}).profiles["p"]
    with caplog.at_level(logging.WARNING):
        profile_model(prof, 3, prof.weights)
    assert "(--profile cpu)" in caplog.text
    caplog.clear()
    profile_model(prof, 3, None)
    assert "--profile cpu" not in caplog.text


def test_imagenet_weights_come_from_the_torchvision_cache(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    reference = torchvision.models.resnet18()
    cached = imagenet_weights_file("resnet18")
    cached.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), cached)
    model, used = build_model("resnet18", 3, weights="imagenet")
    assert used == "imagenet:IMAGENET1K_V1"
    assert torch.equal(model.backbone.conv1.weight, reference.conv1.weight)


def test_resnet10_is_resnet18_with_one_block_a_stage_and_no_imagenet_weights(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    model, used = build_model("resnet10", 3, hidden=16, mask_head=True, mask_gate=True, weights="imagenet")
    assert used == "random-init (ImageNet weights unavailable: torchvision has no ImageNet weights for resnet10)"
    stages = [getattr(model.backbone, f"layer{i}") for i in range(1, 5)]
    assert [len(stage) for stage in stages] == [1, 1, 1, 1]
    reference = build_model("resnet18", 3, hidden=16, mask_head=True, mask_gate=True)[0]
    assert [stage[0].conv1.weight.shape for stage in stages] == [
        getattr(reference.backbone, f"layer{i}")[0].conv1.weight.shape for i in range(1, 5)]
    logits, defect = model.eval().forward_train(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 3) and defect.shape == (2, 1, 4, 4)
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(UsageError, match="do not fit resnet10"):
        build_model("resnet10", 3, weights=path)


def test_drop_path_skips_residual_blocks_in_training_only_and_leaves_the_model_file_alone():
    def profile(**fields):
        return train_params({"train": {"profiles": {"p": {"arch": "resnet18", "weights": None, **fields}}}}).profiles["p"]

    plain, dropped = profile_model(profile(), 3, None)[0], profile_model(profile(drop_path=0.5), 3, None)[0]
    assert plain.state_dict().keys() == dropped.state_dict().keys()
    for model in (plain, dropped):  # zero_init_residual starts every branch at zero: give them a say
        for module in model.modules():
            if hasattr(module, "bn2") and isinstance(module.bn2, torch.nn.BatchNorm2d):
                torch.nn.init.ones_(module.bn2.weight)
    dropped.load_state_dict(plain.state_dict())
    hooks = [h.rate for m in dropped.modules() for h in getattr(m, "_forward_hooks", {}).values()]
    assert hooks == pytest.approx([0.5 * k / 8 for k in range(1, 9)]), "the rate rises to drop_path at the last block"
    x = torch.randn(8, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(plain.eval()(x), dropped.eval()(x)), "inference is unchanged"
        assert not torch.allclose(plain.train()(x), dropped.train()(x)), "training skips blocks"
    with pytest.raises(UsageError, match="no residual blocks"):
        add_drop_path(build_model("convnet", 3, design="dense")[0], 0.1)


def test_weights_from_a_local_file_and_missing_file(tmp_path):
    import torchvision

    reference = torchvision.models.resnet18()
    path = tmp_path / "backbone.pth"
    torch.save(reference.state_dict(), path)
    model, used = build_model("resnet18", 5, weights=path)
    assert used == f"file:{path.resolve()}"
    assert torch.equal(model.backbone.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    with pytest.raises(UsageError, match="weights file not found"):
        build_model("resnet18", 5, weights=tmp_path / "nope.pth")
    with pytest.raises(UsageError, match="do not fit resnet34"):
        build_model("resnet34", 5, weights=path)
    reshaped = reference.state_dict()
    reshaped["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)  # a resnet50's names, its other shapes
    torch.save(reshaped, path)
    with pytest.raises(UsageError, match=r"do not fit resnet18 \(size mismatch for layer1.0.conv1.weight"):
        build_model("resnet18", 5, weights=path)


def test_transforms_map_uint8_rgb_to_normalised_chw_tensor():
    rgb = np.random.default_rng(0).integers(0, 256, (90, 140, 3), dtype=np.uint8)
    full = AugmentParams(noise=1.0, blur=1.0, affine=1.0, brightness_contrast=1.0, rotate90=1.0)
    for transform in (
        train_transform(full, 64),
        train_transform(AugmentParams(crop_scale=None), 64),
        eval_transform(64),
    ):
        out = transform(image=rgb)["image"]
        assert out.shape == (3, 64, 64) and out.dtype == torch.float32
        assert -5 < float(out.mean()) < 5
    assert torch.equal(eval_transform(64)(image=rgb)["image"], eval_transform(64)(image=rgb)["image"])


def test_detail_bands_keep_a_small_dark_spot_and_drop_the_lighting_gradient():
    """The picture's own band carries the gradient; the detail bands carry the spot, not the gradient."""
    ramp = np.tile(np.linspace(40, 200, 96, dtype=np.float32), (96, 1))
    picture = ramp.copy()
    picture[60:64, 30:34] -= 60  # a blowhole-sized dark spot
    bands = detail_bands(picture.astype(np.uint8))
    assert bands.shape == (96, 96, 3) and bands.dtype == np.float32
    assert np.allclose(bands.reshape(-1, 3).mean(axis=0), 0, atol=1e-4)
    assert np.allclose(bands.reshape(-1, 3).std(axis=0), 1, atol=1e-3)
    assert np.corrcoef(bands[..., 0].ravel(), ramp.ravel())[0, 1] > 0.9
    spot, above = (slice(60, 64), slice(30, 34)), (slice(24, 48), slice(24, 72))  # above: gradient only
    depth = [-float(bands[..., band][spot].min()) for band in range(3)]
    spread = [float(np.ptp(bands[..., band][above])) for band in range(3)]
    for band in (1, 2):
        assert depth[band] > 20 * spread[band], f"band {band}: the spot stands out, the gradient is gone"
    colour = np.repeat(picture.astype(np.uint8)[:, :, None], 3, axis=2)
    assert np.allclose(detail_bands(colour), bands, atol=1e-5), "a colour picture is taken grey"


def test_log_detail_bands_give_texture_the_same_contrast_under_a_lighting_gradient():
    """Under a lamp twice as bright on one side, plain detail doubles there; the log picture's does not."""
    texture = 1 + 0.15 * np.random.default_rng(0).standard_normal((96, 96)).astype(np.float32)
    light = np.tile(np.linspace(40, 200, 96, dtype=np.float32), (96, 1))
    picture = np.clip(texture * light, 0, 255).astype(np.uint8)
    plain, logged = detail_bands(picture), log_detail_bands(picture)
    assert logged.shape == (96, 96, 3) and np.allclose(logged.reshape(-1, 3).std(axis=0), 1, atol=1e-3)
    for band in (1, 2):
        ratio = [float(b[:, 56:88, band].std() / b[:, 8:40, band].std()) for b in (plain, logged)]
        assert ratio[0] > 1.7 and 0.85 < ratio[1] < 1.15, f"band {band}: bright/dark contrast {ratio}"


STILL = {"crop_scale": None, "hflip": 0, "vflip": 0, "rotate90": 0, "affine": 0, "brightness_contrast": 0}
"""Augmentation params with every other geometric and lighting step off, to see one step alone."""


def test_the_elastic_warp_reshapes_picture_and_mask_alike():
    picture = np.full((96, 96, 3), 50, np.uint8)
    picture[30:60, 20:70] = 200
    mask = np.zeros((96, 96), np.uint8)
    mask[30:60, 20:70] = 1
    for elastic in (0.0, 1.0):
        out = train_transform(AugmentParams(**STILL, elastic=elastic), 96, "per_image")(image=picture, mask=mask)
        image, warped = out["image"][0].numpy(), np.asarray(out["mask"]).astype(bool)
        moved = float((warped != mask.astype(bool)).mean())
        assert (moved > 0.005) if elastic else (moved == 0), f"elastic {elastic}: {moved:.4f} of the mask moved"
        assert float(((image > image.mean()) == warped).mean()) > 0.98, "the mask follows the picture"


def test_random_erasing_inpaints_rectangles_and_clears_the_mask_there():
    picture = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    mask = np.ones((96, 96), np.uint8)
    for erase in (0.0, 1.0):
        out = train_transform(AugmentParams(**STILL, erase=erase), 96, "per_image")(image=picture, mask=mask)
        image, kept = out["image"][0].numpy(), np.asarray(out["mask"]).astype(bool)
        if not erase:
            assert kept.all(), "no erasing: the mask is untouched"
            continue
        erased = ~kept
        assert 0.001 <= erased.mean() <= 3 * 0.16**2, f"{erased.mean():.4f} of the picture erased"
        assert image[erased].std() < 0.5 * image[kept].std(), "the erased rectangles are filled smoothly"


def test_the_gamma_change_bends_the_grey_levels_and_leaves_the_mask():
    ramp = np.repeat(np.linspace(0, 255, 64).astype(np.uint8)[None, :, None], 3, axis=2).repeat(64, axis=0)
    mask = np.zeros(ramp.shape[:2], np.uint8)
    mask[2:5, 10:20] = 1
    for gamma in (0.0, 1.0):
        augment = AugmentParams(**STILL, gamma=gamma, gamma_limit=(150, 150))
        out = train_transform(augment, 64, "imagenet")(image=ramp, mask=mask)
        grey = out["image"][0].numpy() * IMAGENET_STD[0] + IMAGENET_MEAN[0]  # back to 0..1
        expected = ramp[:, :, 0] / 255.0
        np.testing.assert_allclose(grey, expected**1.5 if gamma else expected, atol=0.01)
        np.testing.assert_array_equal(np.asarray(out["mask"]), mask)


def test_the_pad_fit_keeps_the_aspect_and_mirrors_the_surface_into_the_padding():
    wide = np.random.default_rng(0).integers(0, 256, (40, 100, 3), dtype=np.uint8)  # a 2.5:1 strip
    mask = np.zeros((40, 100), np.uint8)
    mask[10:30, 60:80] = 1
    out = train_transform(AugmentParams(**STILL), 50, "per_image", fit="pad")(image=wide, mask=mask)
    image, moved = out["image"][0].numpy(), np.asarray(out["mask"]).astype(bool)
    squashed = np.asarray(eval_transform(50, "per_image")(image=wide)["image"][0])
    assert image.shape == squashed.shape == (50, 50)
    # the 100 px side becomes 50, the 40 px side 20, centred in rows 15..34, the rest mirrored (reflect-101)
    np.testing.assert_array_equal(image[14], image[16])
    np.testing.assert_array_equal(image[35], image[33])
    np.testing.assert_array_equal(moved[15:35], cv2.resize(mask, (50, 20), interpolation=cv2.INTER_NEAREST).astype(bool))
    assert moved[20:30, 30:40].all() and not moved[:, :30].any(), "the mask keeps the picture's geometry"
    assert not np.allclose(image, squashed), "squash and pad differ on a strip"
    square = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    np.testing.assert_array_equal(pad_to_square(square, 32), cv2.resize(square, (32, 32), interpolation=cv2.INTER_AREA))


def test_dataset_reads_grey_and_colour_files_and_augments_reproducibly(tmp_path):
    grey, colour, rgba = tmp_path / "g.png", tmp_path / "c.jpg", tmp_path / "a.png"
    noise = np.random.default_rng(1).integers(0, 256, (40, 50), dtype=np.uint8)
    Image.fromarray(noise, "L").save(grey)
    Image.fromarray(np.full((40, 50, 3), (200, 20, 20), np.uint8), "RGB").save(colour)
    Image.fromarray(np.full((40, 50, 4), 90, np.uint8), "RGBA").save(rgba)
    data = ManifestDataset(
        [grey, colour, rgba], [0, 1, 2], train_transform(AugmentParams(), 32), seed=3, cache=True
    )
    data.preload()
    assert data.image(0).shape == (40, 50, 3) and data.image(0).dtype == np.uint8
    for i in range(3):
        image, target = data[i]
        assert image.shape == (3, 32, 32) and target == i
    assert torch.equal(data[1][0], data[1][0]), "same (seed, epoch, item) -> same augmentation"
    epoch0 = [data[0][0] for _ in range(2)]
    data.set_epoch(1)
    assert torch.equal(*epoch0) and not torch.equal(epoch0[0], data[0][0]), "a new epoch draws a new stream"
    colour_tensor = ManifestDataset([colour], [0], eval_transform(32))[0][0]
    assert not torch.allclose(colour_tensor[0], colour_tensor[1]), "colour channels are kept apart"


def test_balanced_sampler_evens_out_classes():
    targets = [0] * 90 + [1] * 10
    sampler = balanced_sampler(targets, 2, power=1.0, generator=torch.Generator().manual_seed(0))
    drawn = np.bincount(np.asarray(targets)[list(sampler)], minlength=2)
    assert 35 <= drawn[1] <= 65


def test_losses_weighted_ce_and_focal():
    counts = [80, 15, 5]
    weights = class_weights(counts, power=0.5)
    assert weights[2] > weights[1] > weights[0]
    assert float((weights * torch.tensor(counts, dtype=torch.float32)).sum() / sum(counts)) == pytest.approx(
        1.0
    )
    logits, target = torch.randn(16, 3), torch.randint(0, 3, (16,))
    plain = torch.nn.functional.cross_entropy(logits, target)
    assert FocalLoss(gamma=0.0)(logits, target) == pytest.approx(plain.item(), rel=1e-5)
    assert FocalLoss(gamma=2.0)(logits, target) < plain
    for kind in ("ce", "weighted_ce", "focal"):
        assert torch.isfinite(build_loss(kind, counts)(logits, target))
    with pytest.raises(ValueError, match="unknown loss"):
        build_loss("hinge", counts)


def test_mixup_blends_each_picture_with_another_of_the_batch_and_repeats_with_its_seed():
    images = torch.arange(6.0).view(6, 1, 1, 1).expand(6, 3, 4, 4).clone()
    blend, partner, lam = mixup(images, np.random.default_rng(3), alpha=0.4)
    assert sorted(partner.tolist()) == list(range(6)) and 0 < lam < 1
    for i in range(6):  # every pixel of picture i: lam * i + (1 - lam) * its partner's value
        assert torch.allclose(blend[i], torch.full((3, 4, 4), lam * i + (1 - lam) * int(partner[i])))
    again, partner_again, lam_again = mixup(images, np.random.default_rng(3), alpha=0.4)
    assert torch.equal(again, blend) and torch.equal(partner_again, partner) and lam_again == lam


def test_cutmix_pastes_one_box_of_the_partner_with_its_mask_and_weights_the_labels_by_area():
    images = torch.arange(6.0).view(6, 1, 1, 1).expand(6, 3, 16, 20).clone()
    masks = torch.zeros(6, 16, 20)
    masks[1] = 1.0  # picture 1 is all defect
    mixed, mixed_masks, partner, lam = cutmix(images, masks, np.random.default_rng(5), alpha=1.0)
    assert sorted(partner.tolist()) == list(range(6)) and 0 < lam < 1
    for i in range(6):
        own = mixed[i] == i
        taken = mixed[i] == int(partner[i])
        if int(partner[i]) != i:
            assert torch.all(own | taken) and own.float().mean() == pytest.approx(lam)
        box = taken[0].nonzero()  # one rectangle, the same in every channel and in the mask
        rows, cols = box[:, 0], box[:, 1]
        assert len(box) == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert torch.equal(mixed_masks[i] == 1.0, taken[0] if int(partner[i]) == 1 else
                           (own[0] if i == 1 else torch.zeros_like(own[0])))
    assert masks.sum() == 16 * 20, "the batch's own masks are left as they were"
    again = cutmix(images, masks, np.random.default_rng(5), alpha=1.0)
    assert torch.equal(again[0], mixed) and torch.equal(again[2], partner) and again[3] == lam


def test_cutmix_by_mask_weighs_each_label_by_the_defect_left_in_view():
    # pictures of 8x8 columns, the box the left half (columns 0-3, so 0.5 of the area left)
    masks = torch.zeros(7, 8, 8)
    masks[0, :, 0:6] = 1.0  # a defect, two thirds of it in the box
    masks[1, :, 6:8] = 1.0  # a defect, none of it in the box
    masks[5, :, 0:2] = 1.0  # a defect, all of it in the box; 2, 3 and 6 are normal, 4's mask is unknown
    known = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0])
    in_box = torch.zeros(8, 8)
    in_box[:, 0:4] = 1.0
    cases = [  # (picture, partner, weight of the picture's own label)
        (0, 1, 1.0),  # a third of its defect left; none of the partner's pasted in
        (1, 2, 1.0),  # its defect all left; the normal partner counts only where no defect shows
        (2, 3, 0.5),  # normal with normal: by area
        (3, 5, 0.0),  # normal, with the partner's whole defect pasted in: the partner's class
        (4, 0, 0.5 / (0.5 + 2 / 3)),  # unknown mask, by area, against two thirds of picture 0's defect
        (5, 1, 0.5),  # its defect hidden, the partner's not pasted: nothing in view to weigh, by area
        (6, 0, 0.5 * (1 - 2 / 3) / (0.5 * (1 - 2 / 3) + 2 / 3)),  # normal where no pasted defect shows
    ]
    partner = torch.tensor([p for _, p, _ in cases])
    lam = defect_label_weights(masks, known, partner, in_box, lam=0.5)
    assert lam.tolist() == pytest.approx([w for *_, w in cases], abs=1e-6)


def test_cutmix_by_mask_returns_a_weight_per_picture_and_mixed_loss_matches_the_batch_weight():
    images = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 8, 8).clone()
    masks = torch.zeros(4, 8, 8)
    masks[1, 2:4, 2:4] = 1.0
    by_area = cutmix(images, masks, np.random.default_rng(5), alpha=1.0)
    by_mask = cutmix(images, masks, np.random.default_rng(5), alpha=1.0, known=torch.ones(4))
    assert torch.equal(by_area[0], by_mask[0]) and torch.equal(by_area[1], by_mask[1])
    assert isinstance(by_area[3], float) and by_mask[3].shape == (4,)
    logits, target, other = torch.randn(4, 3), torch.tensor([0, 1, 2, 1]), torch.tensor([2, 0, 1, 1])
    for kind in ("ce", "weighted_ce", "focal"):
        criterion = build_loss(kind, [5, 2, 1], label_smoothing=0.1)
        one = mixed_loss(criterion, logits, target, other, 0.3)
        assert float(one) == pytest.approx(float(criterion(logits, target) * 0.3 + criterion(logits, other) * 0.7))
        assert float(mixed_loss(criterion, logits, target, other, torch.full((4,), 0.3))) == pytest.approx(float(one))
        shifted = mixed_loss(criterion, logits, target, other, torch.tensor([1.0, 1.0, 1.0, 0.0]))
        assert float(shifted) != pytest.approx(float(one))


def test_supervised_contrastive_loss_follows_its_definition_and_rewards_classes_that_cluster():
    torch.manual_seed(0)
    z, labels = torch.randn(7, 5), torch.tensor([0, 0, 1, 1, 1, 2, 0])  # class 2 has no partner: not an anchor
    unit = torch.nn.functional.normalize(z, dim=1)
    terms = []
    for i in range(7):
        others = [a for a in range(7) if a != i]
        partners = [p for p in others if labels[p] == labels[i]]
        if partners:
            denominator = torch.logsumexp(torch.stack([unit[i] @ unit[a] / 0.5 for a in others]), 0)
            terms.append(-torch.stack([unit[i] @ unit[p] / 0.5 - denominator for p in partners]).mean())
    assert float(supcon_loss(z, labels, temperature=0.5)) == pytest.approx(float(torch.stack(terms).mean()), rel=1e-5)

    directions = torch.eye(5)[labels] * 3 + 0.1 * torch.randn(7, 5)  # each class its own direction
    clustered = supcon_loss(directions, labels, temperature=0.1)
    assert float(clustered) < float(supcon_loss(directions, labels[torch.tensor([2, 5, 0, 6, 1, 3, 4])], 0.1))
    lonely = torch.randn(3, 5, requires_grad=True)
    loss = supcon_loss(lonely, torch.tensor([0, 1, 2]))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(lonely.grad, torch.zeros(3, 5)), "no partners: nothing to pull"


def test_distillation_loss_follows_its_definition_and_pulls_the_student_to_the_teacher():
    torch.manual_seed(0)
    student, teacher = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3)
    p_teacher = torch.softmax(teacher / 2.0, 1)
    by_hand = (p_teacher * (p_teacher.log() - torch.log_softmax(student / 2.0, 1))).sum(1).mean() * 4.0
    loss = distill_loss(student, teacher, temperature=2.0)
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert float(distill_loss(teacher, teacher)) == pytest.approx(0.0, abs=1e-6), "agreeing: nothing to learn"
    loss.backward()
    moved = student.detach() - 0.5 * student.grad
    assert float(distill_loss(moved, teacher, 2.0)) < loss.item(), "a step down its gradient nears the teacher"


def test_sharpness_aware_gradient_is_taken_uphill_and_the_weights_come_back():
    torch.manual_seed(0)
    model, shifted = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    cfg = LoopConfig(epochs=1, lr=0.1, sam_rho=0.05, precision="fp32", channels_last=False)
    trainer = Trainer(model, loader, loader, torch.nn.CrossEntropyLoss(), cfg, torch.device("cpu"), None)
    weights = [p.detach().clone() for p in model.parameters()]
    torch.nn.functional.cross_entropy(model(x), y).backward()
    first = [p.grad.clone() for p in model.parameters()]
    trainer._sharpness_aware_gradient(lambda: torch.nn.functional.cross_entropy(model(x), y))

    norm = torch.sqrt(sum((g**2).sum() for g in first))
    with torch.no_grad():  # the same layer moved 0.05 along the unit gradient
        for q, w, g in zip(shifted.parameters(), weights, first):
            q.copy_(w + 0.05 * g / norm)
    torch.nn.functional.cross_entropy(shifted(x), y).backward()
    for p, q, w, g in zip(model.parameters(), shifted.parameters(), weights, first):
        assert torch.allclose(p, w, atol=1e-7), "the weights are back where they were"
        assert torch.allclose(p.grad, q.grad, atol=1e-6), "the gradient is the one at the moved weights"
        assert not torch.allclose(p.grad, g, atol=1e-4)


def test_warmup_cosine_schedule():
    factor = warmup_cosine(total_steps=100, warmup_steps=10)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0) and factor(100) == pytest.approx(0.01)


def test_nondeterministic_kernel_warnings_are_logged_once_a_run_and_others_pass(caplog):
    message = f"adaptive_max_pool2d_backward_cuda {NONDETERMINISTIC}, but you set 'warn_only=True'"
    seen: set[str] = set()

    def epoch() -> None:
        with nondeterminism_logged_once(seen):
            warnings.resetwarnings()  # what a library in the loop may do: Python forgets what it showed
            for _step in range(4):
                warnings.warn(message, UserWarning, stacklevel=1)
            warnings.warn("other", DeprecationWarning, stacklevel=1)

    with caplog.at_level(logging.WARNING, logger="components.training.loop"):
        for _epoch in range(3):
            with pytest.warns(DeprecationWarning, match="other"):
                epoch()
    logged = [r.getMessage() for r in caplog.records]
    assert logged == [f"adaptive_max_pool2d_backward_cuda {NONDETERMINISTIC} (logged once a run)"]


def test_bad_train_params_name_the_key(raw_params):
    raw = raw_params()
    raw["train"]["profiles"]["cpu"]["arch"] = "vgg16"
    with pytest.raises(UsageError, match="params.yaml `train`"):
        train_params(raw)
    with pytest.raises(UsageError, match="no `train` section"):
        train_params({})


def test_load_model_file_rejects_missing_and_foreign_files(tmp_path):
    from components.training.train import load_model_file

    with pytest.raises(UsageError, match="model file not found"):
        load_model_file(tmp_path / "model.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(UsageError, match="not a defectops model file"):
        load_model_file(Path(tmp_path / "other.pt"))
    torch.save({"format": "defectops-classifier", "format_version": 99}, tmp_path / "future.pt")
    with pytest.raises(UsageError, match="model format 99 is newer than this code .*; upgrade defectops"):
        load_model_file(tmp_path / "future.pt")


def test_mask_files_are_found_in_both_layouts(tmp_path):
    from components.training.data import mask_file

    beside = tmp_path / "MT_Crack" / "Imgs"
    beside.mkdir(parents=True)
    (beside / "a.jpg").write_bytes(b"x")
    (beside / "a.png").write_bytes(b"x")
    tracked = tmp_path / "data"
    (tracked / "images" / "Crack").mkdir(parents=True)
    (tracked / "masks" / "Crack").mkdir(parents=True)
    (tracked / "images" / "Crack" / "b.jpg").write_bytes(b"x")
    (tracked / "masks" / "Crack" / "b.png").write_bytes(b"x")
    (tracked / "images" / "Crack" / "c.png").write_bytes(b"x")
    assert mask_file(beside / "a.jpg") == beside / "a.png"
    assert mask_file(tracked / "images" / "Crack" / "b.jpg") == tracked / "masks" / "Crack" / "b.png"
    assert mask_file(tracked / "images" / "Crack" / "c.png") is None


def test_masks_follow_the_image_through_augmentation(tmp_path):

    image = np.zeros((40, 40), np.uint8)
    image[:, :10] = 255  # bright band on the left, masked as the defect
    Image.fromarray(image, "L").save(tmp_path / "d.png")
    Image.fromarray(image, "L").save(tmp_path / "d_mask.png")
    flip_only = AugmentParams(
        crop_scale=None, hflip=1.0, vflip=0, rotate90=0, affine=0, brightness_contrast=0
    )
    data = ManifestDataset(
        [tmp_path / "d.png"] * 3,
        [1, 0, 1],
        train_transform(flip_only, 40, "per_image"),
        seed=0,
        masks=[tmp_path / "d_mask.png", EMPTY_MASK, None],
    )
    x, target, mask, known = data[0]
    assert target == 1 and known == 1.0 and mask.shape == (40, 40)
    assert mask[:, -10:].all() and not mask[:, :-10].any(), "flipped together with the image"
    assert bool((x[0][mask.bool()] > 0).all())
    assert data[1][2].sum() == 0 and data[1][3] == 1.0 and data[2][3] == 0.0


@pytest.mark.parametrize("normalize", ["imagenet", "per_image", "detail_bands", "log_detail_bands"])
def test_grayscale_items_are_augmented_in_one_channel_with_the_numbers_of_three(tmp_path, normalize):
    """A grayscale picture goes through augmentation (paste included) in one channel and comes out as the same
    (3, S, S) tensor as the same picture stored as RGB."""
    rng = np.random.default_rng(5)
    files: dict[str, list] = {"L": [], "RGB": []}
    masks = []
    for i in range(6):
        grey = rng.integers(60, 200, (48 + 4 * i, 64), dtype=np.uint8)
        grey[10:20, 10:25] = 5
        mask = np.zeros_like(grey)
        mask[10:20, 10:25] = 255
        Image.fromarray(mask, "L").save(tmp_path / f"m{i}.png")
        masks.append(tmp_path / f"m{i}.png" if i < 4 else EMPTY_MASK)
        for mode, paths in files.items():
            paths.append(tmp_path / f"{mode}{i}.png")
            Image.fromarray(grey, "L").convert(mode).save(paths[-1])
    items = {}
    for mode, paths in files.items():
        data = ManifestDataset(paths, [1, 1, 1, 1, 0, 0], train_transform(AugmentParams(), 40, normalize),
                               seed=7, cache=True, masks=masks, paste=1.0, normal_target=0, keep_defect=0.5)
        assert data.pixels(0).ndim == (2 if mode == "L" else 3)
        items[mode] = [data[i] for i in range(len(data))]
    for grey_item, rgb_item in zip(items["L"], items["RGB"], strict=True):
        assert grey_item[0].shape == (3, 40, 40) and grey_item[0].is_contiguous()
        assert torch.allclose(grey_item[0], rgb_item[0], atol=1e-4)
        assert torch.equal(grey_item[2], rgb_item[2]) and grey_item[1:2] == rgb_item[1:2]


@pytest.mark.parametrize("keep", [0.0, 0.5])
def test_keep_defect_redraws_crops_that_cut_the_defect_out(tmp_path, keep):
    image = np.full((64, 64), 120, np.uint8)
    image[:10, 20:30] = 10  # a chip on the top edge, as a Break is
    mask = np.zeros_like(image)
    mask[:10, 20:30] = 255
    Image.fromarray(image, "L").save(tmp_path / "d.png")
    Image.fromarray(mask, "L").save(tmp_path / "d_mask.png")
    crop_only = AugmentParams(
        crop_scale=(0.5, 0.6), hflip=0, vflip=0, rotate90=0, affine=0, brightness_contrast=0, keep_defect=keep
    )
    data = ManifestDataset(
        [tmp_path / "d.png"] * 40,
        [1] * 40,
        train_transform(crop_only, 64, "per_image"),
        seed=0,
        masks=[tmp_path / "d_mask.png"] * 40,
        keep_defect=keep,
        keep_tries=30,
    )
    kept = [float(data[i][2].mean()) / float((mask > 0).mean()) for i in range(len(data))]
    if keep:
        assert min(kept) >= keep, "every sample shows at least that share of its defect"
        again = [float(data[i][2].mean()) / float((mask > 0).mean()) for i in range(len(data))]
        assert again == kept, "re-drawing stays reproducible"
    else:
        assert sum(k == 0 for k in kept) >= 10, "without it, crops often cut the chip out"


def test_defect_map_loss_ignores_unknown_masks():
    from components.training.losses import defect_map_loss

    logits = torch.full((2, 1, 4, 4), -4.0)
    masks = torch.zeros(2, 32, 32)
    masks[0, :8, :8] = 1
    known = torch.tensor([1.0, 0.0])
    hit = defect_map_loss(logits, masks, known)
    logits[0, 0, 0, 0] = 4.0
    assert defect_map_loss(logits, masks, known) < hit
    assert defect_map_loss(logits, masks, torch.zeros(2)) == 0


def test_paste_defect_moves_the_defect_onto_a_normal_background():
    from components.training.data import paste_defect

    rng = np.random.default_rng(0)
    source = np.full((60, 80, 3), 100, np.uint8)
    source[20:30, 30:40] = 10  # dark defect
    mask = np.zeros((60, 80), np.uint8)
    mask[20:30, 30:40] = 1
    background = rng.integers(170, 190, (90, 120, 3)).astype(np.uint8)  # brighter, other size
    out = paste_defect(source, mask, background)
    assert out.shape == source.shape and out.dtype == np.uint8
    assert out[25, 35].mean() < out[5, 5].mean() - 50, "the defect stays darker than its new surroundings"
    assert 160 <= out[5, 5].mean() <= 200, "away from the defect the pixels are the background's"


def test_a_core_is_given_up_only_to_others_that_keep_most_of_one_busy(monkeypatch):
    from components.training import cores

    monkeypatch.setattr(cores.os, "sched_getaffinity", lambda _pid: {0, 1})
    assert cores.free_cores_threads(0.0) == 2
    assert cores.free_cores_threads(0.5) == 2, "half a core busy elsewhere: keep both"
    assert cores.free_cores_threads(0.8) == 1, "another busy process: one core is left"
    assert cores.free_cores_threads(3.0) == 1, "never fewer than one thread"


def test_others_are_the_kernels_runnable_count_minus_our_threads_and_children(tmp_path, monkeypatch):
    """/proc laid out as Linux does: 4 runnable in all, 3 of them ours (one a loader worker's thread)."""
    from components.training import cores

    def task(pid: str, tid: str, state: str, children: str = "") -> None:
        folder = tmp_path / pid / "task" / tid
        folder.mkdir(parents=True)
        (folder / "stat").write_text(f"{tid} (python (main)) {state} 1 1 1 0 -1\n")
        (folder / "children").write_text(children)

    monkeypatch.setattr(cores, "PROC", tmp_path)
    (tmp_path / "loadavg").write_text("2.61 2.40 2.02 4/181 4242\n")
    task("self", "100", "R", "200 ")
    task("self", "101", "R")
    task("self", "102", "S")
    task("200", "200", "R")
    task("200", "201", "S")
    assert cores.runnable_threads() == 3
    assert cores.others_runnable() == 1.0
    assert cores.others_runnable_now(samples=3, interval_s=0) == 1.0
    (tmp_path / "loadavg").unlink()
    assert cores.others_runnable() is None
    assert cores.others_runnable_now(samples=3, interval_s=0) == 0.0, "no /proc: no evidence of others"


BUSY = "import time\nend = time.monotonic() + 20\nwhile time.monotonic() < end: pass"


def _others_mean(seconds: float = 1.5) -> float:
    import time

    from components.training.cores import OthersLoad

    with OthersLoad(interval_s=0.05) as load:
        time.sleep(seconds)
        mean = load.take()
    assert mean is not None, "sampled from the real /proc"
    return mean


@pytest.mark.skipif(not Path("/proc/loadavg").is_file(), reason="needs Linux's /proc")
def test_a_busy_process_elsewhere_counts_as_another_and_our_own_busy_child_does_not():
    """Real processes: one orphaned (not ours, as another job would be) and one child of ours (a loader
    worker), each spinning on a core for up to 20 s; the sampler sees the first and not the second."""
    import signal
    import subprocess
    import sys

    before = _others_mean()
    if before > len(os.sched_getaffinity(0)) - 1.5:
        pytest.skip(f"needs a free core: other processes keep {before:.1f} threads runnable")
    child = subprocess.Popen([sys.executable, "-c", BUSY])
    try:
        with_child = _others_mean()
    finally:
        child.kill()
        child.wait()
    spawn = f"{sys.executable} -c '{BUSY}' >/dev/null 2>&1 & echo $!"
    orphan = int(subprocess.run(["sh", "-c", spawn], capture_output=True, text=True, check=True).stdout)
    try:
        with_orphan = _others_mean()
    finally:
        os.kill(orphan, signal.SIGKILL)
    after = _others_mean()
    # the two measured side by side, and the child against the quieter machine's higher reading: background
    # noise that comes and goes between the samples must not decide the outcome
    assert with_orphan - with_child >= 0.7, (before, with_child, with_orphan, after)
    assert with_child - max(before, after) < 0.5, (before, with_child, with_orphan, after)


def test_every_committed_profile_averages_over_a_few_epochs_not_the_whole_run() -> None:
    """The gpu profile once had ema_decay 0.999: over its 60 epochs of 24 steps on the committed split the average
    kept 24% of the first step's weights, and on a GPU its model called every image normal."""
    from components.config import PACKAGE_ROOT, load_params
    from components.training.loop import EMA_MAX_START_SHARE, ema_start_share

    assert ema_start_share(0.999, 1440) > 0.2 and ema_start_share(0.99, 1440) < 1e-5
    train_images = sum(line.endswith(",train") for line in (PACKAGE_ROOT / "splits.csv").read_text().splitlines())
    profiles = train_params(load_params(PACKAGE_ROOT / "params.yaml")).profiles
    checked = 0
    for name, profile in profiles.items():
        if profile.ema_decay:
            steps = profile.epochs * (train_images // profile.batch_size)
            assert ema_start_share(profile.ema_decay, steps) <= EMA_MAX_START_SHARE, name
            checked += 1
    assert checked >= 2, "the gpu and cpu profiles both average their weights"


def test_training_macro_f1_is_evaluations() -> None:
    """Validation macro-F1 (early stopping, the kept epoch) means what the golden-test one means: a class only
    predicted counts at F1 0 in both."""
    from components.evaluation.metrics import evaluate_predictions

    targets = np.array([0, 0, 1, 1])
    logits = np.eye(3)[[0, 0, 1, 2]] * 5.0  # the last image called class 2, which the labels never have
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    report = evaluate_predictions(probs, targets, ["a", "b", "c"], "a", 0.5, n_boot=0)
    assert classification_metrics(targets, logits)["macro_f1"] == pytest.approx(report["macro_f1"]) == pytest.approx(5 / 9)
