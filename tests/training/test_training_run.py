"""End-to-end training runs on the tiny dataset: outputs, resume, divergence, losses, offline weights."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from components.errors import UsageError
from components.training.loop import EpochRecord, TrainingDiverged
from components.training.train import HISTORY_COLUMNS, load_model_file, run_training
from components.training.transforms import preprocess

pytestmark = pytest.mark.slow


def _run(settings, raw, manifest, out_dir, **kwargs):
    return run_training(
        settings, raw, profile=None, out_dir=out_dir, manifest=manifest, progress=False, **kwargs
    )


def _interrupted_after_the_first_epoch(settings, raw, manifest, out_dir) -> None:
    """A run stopped by Ctrl-C once its first epoch is checkpointed."""

    def stop_after_first_epoch(record: EpochRecord) -> None:
        if record.epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(settings, raw, manifest, out_dir, callbacks=[stop_after_first_epoch])


@pytest.mark.parametrize("loss", ["weighted_ce", "focal"])
def test_training_run_writes_all_outputs(
    settings, raw_params, tiny_manifest, tmp_path, monkeypatch, caplog, loss
):
    monkeypatch.setenv(
        "TORCH_HOME", str(tmp_path / "empty-torch-home")
    )  # offline: no cached ImageNet weights
    raw = raw_params(loss=loss, weights="imagenet", attention=loss == "focal", sampler="class_balanced")
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="components.training.models"):
        result = _run(settings, raw, tiny_manifest, out)

    assert {p.name for p in out.iterdir()} == {"model.pt", "train_metrics.json", "history.csv"}
    assert any("ImageNet weights for resnet18 unavailable" in r.getMessage() for r in caplog.records)
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["profile"] == "cpu" and metrics["train_images_per_s"] > 0
    assert 0 <= metrics["best_val_macro_f1"] <= 1 and metrics["seconds"] > 0
    assert metrics["weights_used"].startswith("random-init (ImageNet weights unavailable")
    history = pd.read_csv(out / "history.csv")
    assert list(history.columns) == HISTORY_COLUMNS and history["epoch"].tolist() == [1, 2]
    assert metrics["threads"] == 1 and history["threads"].tolist() == [1.0, 1.0]  # the tests' profile: 1 thread
    assert not result.checkpoint_dir.exists(), "a finished run removes its checkpoint"

    model, meta = load_model_file(out / "model.pt")
    assert not model.training
    assert meta["classes"] == ["normal", "scratch", "spot"] and meta["normal_class"] == "normal"
    assert meta["image_size"] == 64 and meta["weights_used"] == metrics["weights_used"]
    assert meta["arch"]["attention"] is (loss == "focal") and "state_dict" not in meta
    rows = tiny_manifest[tiny_manifest["split"] == "test"]
    from components.data.images import decode

    batch = torch.stack([preprocess(decode(Path(f)).rgb, meta["image_size"]) for f in rows["file"][:4]])
    with torch.no_grad():
        logits, embedding = model.forward_with_embedding(batch)
    assert logits.shape == (4, 3) and embedding.shape == (4, meta["embedding_dim"]) == (4, 64)
    assert torch.allclose(model(batch), logits)


@pytest.mark.parametrize("options", [{}, {"mixup_alpha": 0.4}, {"sam_rho": 0.05}, {"supcon_weight": 0.5}],
                         ids=["plain", "mixup", "sam", "supcon"])
def test_resume_after_interruption_continues_from_checkpoint(
    settings, raw_params, tiny_manifest, tmp_path, options
):
    raw = raw_params(epochs=3, **options)  # with mixup: the blends repeat; with supcon: the projection resumes
    reference = _run(settings, raw, tiny_manifest, tmp_path / "uninterrupted")

    out = tmp_path / "interrupted"
    _interrupted_after_the_first_epoch(settings, raw, tiny_manifest, out)
    assert not (out / "model.pt").exists()
    assert (reference.checkpoint_dir / "last.pt").is_file(), "the interrupted run left its checkpoint"

    resumed = _run(settings, raw, tiny_manifest, out, resume=True)
    assert resumed.metrics["resumed_from_epoch"] == 1 and resumed.metrics["epochs"] == 3
    want = pd.read_csv(reference.history_path)
    got = pd.read_csv(resumed.history_path)
    cols = ["epoch", "train_loss", "val_loss", "val_macro_f1", "lr"]
    np.testing.assert_allclose(got[cols].to_numpy(), want[cols].to_numpy(), rtol=1e-4, atol=1e-6)


def test_a_resume_records_the_weights_its_run_started_from_and_keeps_its_precision(
    settings, raw_params, tiny_manifest, tmp_path, monkeypatch
):
    """ImageNet weights that turn up in the cache between the interruption and the resume do not rewrite how
    the run started (random init); a resume whose machine would run another precision is refused in one line."""
    import torchvision

    from components.training import loop
    from components.training.models import imagenet_weights_file

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    raw = raw_params(epochs=2, weights="imagenet")

    out = tmp_path / "out"
    _interrupted_after_the_first_epoch(settings, raw, tiny_manifest, out)
    cached = imagenet_weights_file("resnet18")
    cached.parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet18().state_dict(), cached)
    with monkeypatch.context() as patch:
        patch.setattr(loop, "resolve_precision", lambda precision, device: "bf16")  # another machine's `auto`
        with pytest.raises(UsageError, match="its epochs ran in fp32, this cpu would run bf16; resume it on the "
                                             "kind of machine it started on"):
            _run(settings, raw, tiny_manifest, out, resume=True)
    resumed = _run(settings, raw, tiny_manifest, out, resume=True)
    assert resumed.metrics["resumed_from_epoch"] == 1
    assert resumed.metrics["weights_used"].startswith("random-init (ImageNet weights unavailable")
    assert load_model_file(resumed.model_path)[1]["weights_used"] == resumed.metrics["weights_used"]


def test_same_seed_and_thread_count_rerun_bit_for_bit(settings, raw_params, tiny_manifest, tmp_path, caplog):
    def weights(seed: int, threads: int, name: str) -> tuple[dict, dict]:
        raw = raw_params(epochs=2, threads=threads)
        raw["train"]["seed"] = seed
        result = _run(settings, raw, tiny_manifest, tmp_path / name)
        return load_model_file(result.model_path)[0].state_dict(), result.metrics

    first, metrics = weights(42, 1, "first")
    again, _ = weights(42, 1, "again")
    assert metrics["threads"] == 1 and metrics["threads_per_epoch"] == [1.0, 1.0]
    assert all(torch.equal(first[k], again[k]) for k in first), "same seed and threads: the same weights"
    other, _ = weights(7, 1, "other-seed")
    assert not all(torch.equal(first[k], other[k]) for k in first), "the seed decides the run"

    with caplog.at_level(logging.INFO, logger="components.training.loop"):
        _, adaptive = weights(42, 0, "adaptive")
    assert adaptive["threads"] == "adaptive" and 1 <= adaptive["threads_per_epoch"][0] <= os.cpu_count()
    assert any("matches bit for bit only with a fixed `threads`" in r.getMessage() for r in caplog.records)


def test_distillation_learns_from_a_teacher_of_the_same_input_and_refuses_another(
    settings, raw_params, tiny_manifest, tmp_path, caplog
):
    teacher = _run(settings, raw_params(epochs=1), tiny_manifest, tmp_path / "teacher").model_path
    plain = _run(settings, raw_params(epochs=1), tiny_manifest, tmp_path / "plain")
    with caplog.at_level(logging.WARNING, logger="components.training.train"):
        taught = _run(settings, raw_params(epochs=1, distill_from=str(teacher), distill_weight=0.7), tiny_manifest,
                      tmp_path / "taught")
    assert taught.metrics["distilled_from"]["path"] == str(teacher) and plain.metrics["distilled_from"] is None
    assert load_model_file(taught.model_path)[1]["train_params"]["distill_from"] == str(teacher)
    losses = [pd.read_csv(r.history_path)["train_loss"].tolist() for r in (taught, plain)]
    assert losses[0] != losses[1], "the teacher is heard"
    assert taught.checkpoint_dir != plain.checkpoint_dir, "a taught run never resumes an untaught one"
    assert not [r for r in caplog.records if "was trained on other images" in r.getMessage()]

    fewer = tiny_manifest.drop(index=tiny_manifest.index[tiny_manifest["split"] == "train"][0])
    with caplog.at_level(logging.WARNING, logger="components.training.train"):
        _run(settings, raw_params(epochs=1, distill_from=str(teacher)), fewer, tmp_path / "other-images")
    assert any("was trained on other images" in r.getMessage() for r in caplog.records)

    with pytest.raises(UsageError, match="image_size 64 \\(this profile: 96\\); set distill_from to a model.pt"):
        _run(settings, raw_params(epochs=1, image_size=96, distill_from=str(teacher)), tiny_manifest,
             tmp_path / "other-size")
    with pytest.raises(UsageError, match="no such model file"):
        _run(settings, raw_params(distill_from=str(tmp_path / "missing.pt")), tiny_manifest, tmp_path / "none")
    assert not (tmp_path / "other-size" / "model.pt").exists() and not (tmp_path / "none").exists()


def test_nan_loss_raises_training_diverged_and_writes_no_model(settings, raw_params, tiny_manifest, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(TrainingDiverged, match="lower the learning rate"):
        _run(settings, raw_params(lr=1e30, warmup_epochs=0), tiny_manifest, out)
    assert not (out / "model.pt").exists()


def test_bf16_channels_last_run_on_cpu(settings, raw_params, tiny_manifest, tmp_path, caplog):
    # in-process: no loader workers (a process that ran a Prefect flow cannot fork them; the flows run
    # `defectops train` in a subprocess, and tests/integration/test_training_flow.py covers workers there)
    with caplog.at_level(logging.WARNING, logger="components.training.loop"):
        result = _run(
            settings,
            raw_params(epochs=1, precision="bf16", channels_last=True, num_workers=0, loss="ce", ema_decay=0.9),
            tiny_manifest,
            tmp_path / "out",
        )
    assert result.metrics["precision"] == "bf16" and result.model_path.is_file()
    # one epoch of a few steps is far too short for a 0.9 average: the run says so
    assert any("ema_decay 0.9 is too slow" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("options", [{"mixup_alpha": 0.4}, {"cutmix_alpha": 1.0},
                                    {"cutmix_alpha": 1.0, "cutmix_labels": "mask"}, {"mask_classes": True},
                                    {"fit": "pad"}],
                         ids=["mixup", "cutmix", "cutmix-by-mask", "class-per-cell", "aspect-kept"])
def test_mask_head_and_per_image_normalisation_train_and_reload(
    settings, raw_params, tiny_masked_manifest, tmp_path, options
):
    raw = raw_params(epochs=1, mask_head=True, mask_gate=True, mask_loss_weight=1.0, normalize="per_image",
                     **options)  # mixed pictures carry both pictures' masks
    raw["augment"]["paste"] = 1.0
    result = _run(settings, raw, tiny_masked_manifest, tmp_path / "out")
    model, meta = load_model_file(result.model_path)
    assert meta["arch"]["mask_head"] is True and meta["arch"]["mask_gate"] is True
    assert meta["arch"]["mask_classes"] is bool(options.get("mask_classes"))
    assert meta["classes"][meta["arch"]["normal_index"]] == meta["normal_class"]
    assert meta["normalization"] == {"kind": "per_image"}
    assert meta["fit"] == options.get("fit", "squash"), "the model file says how its pictures became square"
    assert meta["format_version"] == (2 if "fit" in options else 1), "a reader before `fit` refuses a padded model"
    from components.data.images import decode
    from components.training.transforms import model_transform

    file = tiny_masked_manifest["file"].iloc[0]
    x = model_transform(meta)(image=decode(Path(file)).rgb)["image"][None]
    assert abs(float(x.mean())) < 1e-3, "per-image standardisation is part of the model's preprocessing"
    with torch.no_grad():
        assert model.defect_map(x).shape == (1, 1, 4, 4)


@pytest.mark.parametrize("arch", ["convnet", "resnet18"])
def test_dense_design_trains_on_patches_refits_its_head_and_reloads(
    settings, raw_params, tiny_masked_manifest, tmp_path, arch
):
    raw = raw_params(arch=arch, design="dense", dense_stage=2, width=4, epochs=2, mask_loss_weight=1.0,
                     patch_size=32, head_refit_epochs=5, normalize="per_image")
    result = _run(settings, raw, tiny_masked_manifest, tmp_path / "out")
    refit = result.metrics["head_refit"]
    assert refit["n_train"] == 2 * int((tiny_masked_manifest["split"] == "train").sum()), "pictures and mirrors"
    better = refit["val_macro_f1_after"] > refit["val_macro_f1_before"] + 1e-9 or (
        abs(refit["val_macro_f1_after"] - refit["val_macro_f1_before"]) <= 1e-9
        and refit["val_loss_after"] < refit["val_loss_before"])
    assert refit["kept"] == better, "the refit head is kept exactly when validation prefers it"
    if refit["kept"]:  # the saved model is the refit one, and its figure is reported
        assert result.metrics["best_val_macro_f1"] == pytest.approx(refit["val_macro_f1_after"])
    model, meta = load_model_file(result.model_path)
    assert meta["arch"]["design"] == "dense" and meta["arch"]["name"] == arch
    from components.data.images import decode
    from components.training.transforms import model_transform

    files = tiny_masked_manifest["file"].iloc[:3]
    x = torch.stack([model_transform(meta)(image=decode(Path(f)).rgb)["image"] for f in files])
    with torch.no_grad():
        logits, embedding = model.forward_with_embedding(x)
        cells = model.defect_map(x)
    assert logits.shape == (3, 3) and embedding.shape == (3, 64)
    assert cells.shape == (3, 3, 8, 8) and torch.allclose(cells.sum(1), torch.ones(3, 8, 8), atol=1e-5)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores to give one up")
def test_adaptive_threads_are_rechecked_within_an_epoch(settings, raw_params, tiny_manifest, tmp_path,
                                                       monkeypatch, caplog):
    """Another job that starts mid-epoch (here: none right before the first epoch, then 5 runnable threads
    of others at every read) takes a core at the next re-check, not only at the next epoch."""
    from components.training import loop

    monkeypatch.setattr(loop, "THREADS_RECHECK_S", 0.0)
    monkeypatch.setattr(loop, "others_runnable_now", lambda: 0.0)
    reads = iter([None])  # nothing sampled yet before the first epoch, then 5 others on every read
    monkeypatch.setattr(loop.OthersLoad, "take", lambda self: next(reads, 5.0))
    before = torch.get_num_threads()
    try:
        with caplog.at_level(logging.INFO, logger="components.training.loop"):
            _run(settings, raw_params(epochs=1, threads=0, num_workers=0), tiny_manifest, tmp_path / "out")
    finally:
        torch.set_num_threads(before)
    changes = [r.getMessage() for r in caplog.records if "compute thread(s)" in r.getMessage()]
    assert changes[-1].startswith("epoch 1: 1 compute thread(s) (other processes: 5.0"), changes


def test_a_second_run_of_the_same_configuration_refuses_while_the_first_trains(settings, raw_params, tiny_manifest,
                                                                               tmp_path):
    """Both would share the checkpoint folder: the second, started afresh, would delete the first's weights."""
    from components.errors import ConcurrentRunError

    raw = raw_params(epochs=1)
    refused: list[str] = []

    def second_run(_record: EpochRecord) -> None:
        with pytest.raises(ConcurrentRunError, match="a training run of this configuration is already running") as e:
            _run(settings, raw, tiny_manifest, tmp_path / "second")
        refused.append(str(e.value))

    first = _run(settings, raw, tiny_manifest, tmp_path / "first", callbacks=[second_run])
    assert len(refused) == 1 and first.model_path.is_file() and not (tmp_path / "second" / "model.pt").exists()


def test_a_kill_between_the_best_weights_and_last_pt_keeps_them_in_step(settings, raw_params, tiny_manifest,
                                                                         tmp_path, monkeypatch):
    """Epoch 2's better weights wait beside best.pt until last.pt records epoch 2: killed in between, best.pt is
    still epoch 1's, as last.pt says, and the resumed run trains epoch 2 again."""
    from components.training.loop import Trainer

    raw = raw_params(epochs=2, keep="last")  # every epoch is the kept one
    real = Trainer.save_checkpoint

    def killed_at_epoch_2(self) -> None:
        if self.epoch == 2:
            raise KeyboardInterrupt
        real(self)

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "save_checkpoint", killed_at_epoch_2)
        with pytest.raises(KeyboardInterrupt):
            _run(settings, raw, tiny_manifest, tmp_path / "out")
    [folder] = (settings.home_dir / "checkpoints").iterdir()
    last = torch.load(folder / "last.pt", map_location="cpu", weights_only=False)
    best = torch.load(folder / "best.pt", map_location="cpu", weights_only=True)
    pending = torch.load(folder / "best.pending-2.pt", map_location="cpu", weights_only=True)
    assert last["epoch"] == last["best_epoch"] == 1
    assert any(not torch.equal(best[k], pending[k]) for k in best if best[k].is_floating_point())

    resumed = _run(settings, raw, tiny_manifest, tmp_path / "out", resume=True)
    assert resumed.metrics["resumed_from_epoch"] == 1 and resumed.metrics["best_epoch"] == 2
    assert not folder.exists()
