"""The train stage: tracked dataset + params.yaml -> model.pt, train_metrics.json, history.csv.

Outputs in `out_dir`:
    model.pt             self-describing model file (see `save_model_file`), written last and atomically
    train_metrics.json   best val macro-F1, epochs, seconds, images/s, profile, precision, weights used
    history.csv          per epoch: epoch, train_loss, val_loss, val_macro_f1, val_accuracy, lr, seconds, ...
The checkpoint lives in `<home>/checkpoints/train-<fingerprint>/` (last.pt + best.pt, see loop.py): the
fingerprint hashes the profile, the augmentation, the classes and the exact training/validation images, so
`resume=True` picks up an interrupted run of the same configuration and never a different one. It is deleted
after a finished run unless `train.keep_checkpoint` is true.

Defect masks (`mask_head`): each training image's mask is found by `data.mask_file` (beside the image, or
`masks/<class>/<stem>.png` of the tracked layout); normal images without one count as all-zero masks, defect
images without one simply skip the mask loss.

model.pt (torch.save of a dict; read it with `load_model_file`, which uses weights_only loading):
    format, format_version           "defectops-classifier", 1 (2 when `fit` is not squash: see MODEL_FORMAT_VERSION)
    arch                              build_model's arguments: {name, design, dropout, hidden, ...}
    state_dict                        the best weights (EMA weights when EMA is on)
    classes, normal_class             class names in logit order, and the normal one
    image_size, normalization, fit    what `transforms.model_transform(meta)` needs to prepare an image
    embedding_dim                     size of `model.embed(x)` (the hidden layer)
    weights_used                      'imagenet:...', 'file:...' or 'random-init (...)'
    dataset_version, manifest_digest  DVC md5 of data/ (None: untracked folder), hash of the images + splits
    profile, train_params, augment_params, seed, metrics, created_at, torch_version
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch
from torch.utils.data import DataLoader

from components.config import Params, Settings
from components.errors import UsageError, one_line
from components.files import file_sha256, replacing, write_text_atomic
from components.locks import exclusive
from components.training.data import (
    EMPTY_MASK,
    ManifestDataset,
    balanced_sampler,
    class_counts,
    class_targets,
    mask_file,
)
from components.training.loop import EpochRecord, FitResult, LoopConfig, atomic_save, fit
from components.training.losses import build_loss
from components.training.models import Classifier, add_drop_path, build_model
from components.training.params import AugmentParams, ProfileParams, TrainParams, augment_params, train_params
from components.training.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    eval_transform,
    model_input,
    train_transform,
)

if TYPE_CHECKING:
    from components.data.tracked import TrackedData

log = logging.getLogger(__name__)

MODEL_FORMAT = "defectops-classifier"
MODEL_FORMAT_VERSION = 2  # 2: `fit` may be pad; a reader of version 1 would squash such a model's pictures
MODEL_FILE, METRICS_FILE, HISTORY_FILE = "model.pt", "train_metrics.json", "history.csv"
HISTORY_COLUMNS = [
    "epoch",
    "train_loss",
    "val_loss",
    "val_macro_f1",
    "val_accuracy",
    "lr",
    "seconds",
    "train_images_per_s",
    "data_wait_s",
    "threads",
]


@dataclass(frozen=True)
class TrainResult:
    """Where the outputs went and the headline numbers."""

    model_path: Path
    metrics_path: Path
    history_path: Path
    checkpoint_dir: Path
    metrics: dict[str, Any]

    @property
    def best_val_macro_f1(self) -> float:
        return float(self.metrics["best_val_macro_f1"])


def choose_profile(tp: TrainParams, requested: str | None = None) -> tuple[str, ProfileParams]:
    """The profile to train with: explicit > train.profile > 'gpu' with CUDA, else 'cpu'."""
    name = requested or tp.profile
    if name == "auto":
        name = "gpu" if torch.cuda.is_available() else "cpu"
    if name not in tp.profiles:
        raise UsageError(
            f"training profile {name!r} not in params.yaml train.profiles {sorted(tp.profiles)}; "
            "add it or pick one of those"
        )
    return name, tp.profiles[name]


def manifest_digest(frame: pd.DataFrame) -> str:
    """A short content hash of the images and splits a model was trained on."""
    lines = sorted(
        f"{p}\t{s}\t{sp}" for p, s, sp in zip(frame["path"], frame["sha256"], frame["split"], strict=True)
    )
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def _as_params(params: Params | dict) -> Params:
    if isinstance(params, Params):
        return params
    try:
        return Params.model_validate(params)
    except ValueError as exc:
        raise UsageError(f"invalid params: {str(exc).splitlines()[0]}; fix params.yaml") from exc


def training_digest(manifest: pd.DataFrame) -> str:
    """The manifest_digest a model trained on `manifest` records: of the usable train and val rows it reads."""
    return _rows_digest(_split_rows(manifest, "train"), _split_rows(manifest, "val"))


def _rows_digest(train_rows: pd.DataFrame, val_rows: pd.DataFrame) -> str:
    return manifest_digest(pd.concat([train_rows, val_rows]))


def _split_rows(manifest: pd.DataFrame, split: str) -> pd.DataFrame:
    from components.data.tracked import usable_rows

    return usable_rows(manifest[manifest["split"] == split], f"the dataset's '{split}' split")


def training_masks(rows: pd.DataFrame, normal_class: str) -> list[Path | str | None]:
    """Per row: its defect-mask file, EMPTY_MASK for a normal image without one, None when unknown."""
    masks: list[Path | str | None] = []
    for file, label in zip(rows["file"], rows["label"], strict=True):
        found = mask_file(Path(file))
        masks.append(found if found is not None else (EMPTY_MASK if label == normal_class else None))
    known = sum(m is not None for m in masks)
    log.info("defect masks known for %d of %d training images", known, len(masks))
    return masks


def build_loaders(
    train_rows: pd.DataFrame,
    val_rows: pd.DataFrame,
    classes: Sequence[str],
    prof: ProfileParams,
    aug: AugmentParams,
    seed: int,
    max_pixels: int,
    normal_class: str,
    progress: bool = False,
) -> tuple[DataLoader, DataLoader, list[int]]:
    """Training loader (augmented, shuffled or class-balanced) and validation loader (eval transform)."""
    train_targets = class_targets(train_rows, classes)
    masks = training_masks(train_rows, normal_class) if prof.uses_masks else None
    train_data = ManifestDataset(
        train_rows["file"].tolist(),
        train_targets,
        train_transform(aug, prof.image_size, prof.normalize, prof.fit),
        seed=seed,
        max_pixels=max_pixels,
        cache=prof.cache_images,
        masks=masks,
        paste=aug.paste,
        keep_defect=aug.keep_defect,
        normal_target=list(classes).index(normal_class),
        patch=prof.patch_size if prof.design == "dense" else None,
        patch_focus=prof.patch_focus,
    )
    val_data = ManifestDataset(
        val_rows["file"].tolist(),
        class_targets(val_rows, classes),
        eval_transform(prof.image_size, prof.normalize, prof.fit),
        max_pixels=max_pixels,
        cache=prof.cache_images,
    )
    train_data.preload(progress)
    val_data.preload(progress)
    generator = torch.Generator().manual_seed(seed)
    sampler = (
        balanced_sampler(train_targets, len(classes), prof.sampler_power, generator)
        if prof.sampler == "class_balanced"
        else None
    )
    common = {
        "num_workers": prof.num_workers,
        "pin_memory": torch.cuda.is_available(),
        "persistent_workers": False,
    }
    if prof.num_workers:
        common["prefetch_factor"] = 4
    train_loader = DataLoader(
        train_data,
        batch_size=prof.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        generator=generator,
        drop_last=len(train_data) > prof.batch_size,
        **common,
    )
    val_loader = DataLoader(val_data, batch_size=prof.batch_size * 2, shuffle=False, **common)
    return train_loader, val_loader, train_targets


def model_meta(
    model: Classifier,
    classes: Sequence[str],
    normal_class: str,
    image_size: int,
    normalize: str = "imagenet",
    fit: str = "squash",
    **provenance: Any,
) -> dict[str, Any]:
    """The metadata of a model file: format, architecture, classes, preprocessing, and `provenance` as given
    (weights_used, dataset_version, calibration, ...; see the module docstring)."""
    normalization = (
        {"kind": "imagenet", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
        if normalize == "imagenet"
        else {"kind": normalize}
    )
    return {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION if fit != "squash" else 1,  # older readers refuse what they'd misread
        "arch": model.architecture(),
        "classes": list(classes),
        "normal_class": normal_class,
        "image_size": image_size,
        "normalization": normalization,
        "fit": fit,
        "preprocess": "components.training.transforms.model_transform(meta)",
        "embedding_dim": model.embedding_dim,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "torch_version": str(torch.__version__),
        **provenance,
    }


def save_model_file(
    path: Path, model: Classifier, state: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    """Write the self-describing model file atomically (tmp + rename)."""
    atomic_save({**meta, "state_dict": {k: v.detach().cpu() for k, v in state.items()}}, path)


def _load_failure(exc: Exception) -> str:
    """Why torch.load refused a file, in a few words (its weights-only message is a paragraph about PyTorch
    2.6; the reason is one line inside it)."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        detail = next((line for line in text.split("WeightsUnpickler error:", 1)[1].splitlines() if line.strip()), "")
        return one_line(f"not a weights-only PyTorch file: {detail.strip()}", 160)
    return one_line(text.splitlines()[0], 160) if text.strip() else f"{type(exc).__name__}: empty or cut short?"


def load_model_file(path: Path | str) -> tuple[Classifier, dict[str, Any]]:
    """The model (eval mode, CPU) and its metadata from a model.pt written by `run_training`."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: model file not found; train one with `defectops train` or give its path")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UsageError(f"{path}: not a readable model file ({_load_failure(exc)}); retrain or re-download it") \
            from exc
    if not isinstance(blob, dict) or blob.get("format") != MODEL_FORMAT:
        raise UsageError(
            f"{path}: not a defectops model file (no format '{MODEL_FORMAT}'); use run_training's model.pt"
        )
    if blob.get("format_version", 0) > MODEL_FORMAT_VERSION:
        raise UsageError(
            f"{path}: model format {blob['format_version']} is newer than this code "
            f"({MODEL_FORMAT_VERSION}); upgrade defectops"
        )
    arch = dict(blob["arch"])
    model, _ = build_model(arch.pop("name"), len(blob["classes"]), weights=None, **arch)
    model.load_state_dict(blob["state_dict"])
    model.eval()
    meta = {k: v for k, v in blob.items() if k != "state_dict"}
    return model, meta


def training_seed(params: Params) -> int:
    """The seed a run trains with: `train.seed`, else `base.seed`."""
    tp = train_params(params)
    return tp.seed if tp.seed is not None else params.base.seed


def finish_run(params: Params, checkpoint_dir: Path) -> None:
    """A finished run's checkpoint folder goes, unless `train.keep_checkpoint`."""
    if not train_params(params).keep_checkpoint:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)


@contextmanager
def _threads_restored(threads: int) -> Iterator[None]:
    """Put torch's compute thread count back afterwards (the loop adapts it to the machine's load)."""
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _fingerprint(
    prof: ProfileParams, aug: AugmentParams, classes: Sequence[str], normal_class: str, digest: str, seed: int,
    teacher: Teacher | None = None,
) -> str:
    payload = {
        # what changes the numbers: not how the pictures are held (cache_images) or how many threads sum them
        "profile": prof.model_dump(mode="json", exclude={"num_workers", "max_minutes", "threads", "cache_images"}),
        "augment": aug.model_dump(mode="json"),
        "classes": list(classes),
        "normal_class": normal_class,
        "data": digest,
        "seed": seed,
    }
    if teacher is not None:  # another file at the same path is another run
        payload["teacher"] = teacher.digest
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Teacher:
    """Knowledge distillation's teacher: a trained model file (`distill_from`)."""

    model: torch.nn.Module
    path: Path
    digest: str  # of the file's bytes


def load_teacher(prof: ProfileParams, classes: Sequence[str], digest: str) -> Teacher | None:
    """The profile's `distill_from` model, refused unless it sees the same pictures as the model trained;
    `digest` is this run's training and validation images' (a teacher trained on others gets a warning)."""
    if not prof.distill_from:
        return None
    path = Path(prof.distill_from).expanduser()
    fix = "set distill_from to a model.pt trained on the same classes and input, or to null"
    if not path.is_file():
        raise UsageError(f"distill_from {path}: no such model file; {fix}")
    model, meta = load_model_file(path)
    mismatched = [
        f"{name} {got!r} (this profile: {want!r})"
        for name, got, want in zip(("classes", "image_size", "normalize", "fit"),
                                   (list(meta["classes"]), *model_input(meta)),
                                   (list(classes), prof.image_size, prof.normalize, prof.fit), strict=True)
        if got != want
    ]
    if mismatched:
        raise UsageError(f"distill_from {path}: the teacher was trained on other input: {'; '.join(mismatched)}; "
                         f"{fix}")
    if meta.get("manifest_digest") != digest:
        log.warning("distill_from %s was trained on other images (manifest %s, this run's %s): if it saw this run's "
                    "val or test pictures, their figures flatter the model; use a teacher trained on this split",
                    path, meta.get("manifest_digest"), digest)
    log.info("distilling from %s (%s, trained on %s): its softened probabilities take %.0f%% of the class loss",
             path, meta["arch"]["name"], meta.get("dataset_version") or meta.get("manifest_digest"),
             100 * prof.distill_weight)
    return Teacher(model, path, file_sha256(path)[:16])


def _write_outputs(out_dir: Path, metrics: dict[str, Any], history: list[EpochRecord]) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    history_path, metrics_path = out_dir / HISTORY_FILE, out_dir / METRICS_FILE
    with replacing(history_path) as tmp:
        pd.DataFrame([asdict(r) for r in history], columns=HISTORY_COLUMNS).to_csv(
            tmp, index=False, float_format="%.6g"
        )
    write_text_atomic(metrics_path, json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return metrics_path, history_path


def _refit_head(model: Classifier, result: FitResult, train_rows: pd.DataFrame, val_loader: DataLoader,
                classes: Sequence[str], prof: ProfileParams, criterion: torch.nn.Module, seed: int,
                max_pixels: int) -> dict[str, Any]:
    """The dense design's head, trained again on the evidence of whole training pictures (see head.py)."""
    from components.training.head import evidence, refit_head

    model.load_state_dict(result.best_state)
    device = torch.device(result.device)
    pictures = ManifestDataset(train_rows["file"].tolist(), class_targets(train_rows, classes),
                               eval_transform(prof.image_size, prof.normalize, prof.fit), max_pixels=max_pixels)
    loader = DataLoader(pictures, batch_size=prof.batch_size * 2, shuffle=False, num_workers=prof.num_workers)
    train = evidence(model, loader, device, result.precision, mirrored=True)
    val = evidence(model, val_loader, device, result.precision)
    model.cpu()
    return refit_head(model, train, val, criterion.cpu(), prof.head_refit_epochs, seed=seed)


def profile_model(prof: ProfileParams, num_classes: int, weights: str | None,
                  allow_download: bool = False, normal_index: int = 0) -> tuple[Classifier, str]:
    """The profile's network (and which weights initialised it); seed torch first for a reproducible init."""
    model, weights_used = build_model(
        prof.arch, num_classes, prof.dropout, prof.hidden, prof.attention, prof.freeze_stages, weights,
        allow_download=allow_download, mask_head=prof.mask_head, mask_gate=prof.mask_gate, design=prof.design,
        dense_stage=prof.dense_stage, width=prof.width, output_stride=prof.output_stride,
        mask_head_width=prof.mask_head_width, mask_classes=prof.mask_classes, normal_index=normal_index)
    if prof.drop_path:
        add_drop_path(model, prof.drop_path)
    if weights_used.startswith("random-init (ImageNet"):
        log.warning("this profile (%s, lr %g) is set up to fine-tune ImageNet weights; from random initialisation "
                    "the `gpu` profile trained worse models than the `cpu` profile on the same GPU "
                    "(docs/model-quality.md): provide the weights, or train with a profile made for random "
                    "initialisation (--profile cpu)", prof.arch, prof.lr)
    return model, weights_used


def profile_loss(prof: ProfileParams, counts: Sequence[int]) -> torch.nn.Module:
    """The profile's classification loss, weighted by the training class counts."""
    return build_loss(prof.loss, counts, prof.class_weight_power, prof.focal_gamma, prof.label_smoothing)


def loop_config(prof: ProfileParams, seed: int, deterministic: bool, normal_index: int = 0,
                **overrides: Any) -> LoopConfig:
    """The training loop's settings from a profile; `overrides` replace single fields (e.g. epochs, threads)."""
    # every loop setting the profile names comes from it; the rest from the run
    values = {f.name: getattr(prof, f.name) for f in fields(LoopConfig) if f.name in ProfileParams.model_fields}
    values.update(mask_loss_weight=prof.mask_loss_weight if prof.uses_masks else 0.0,
                  normal_index=normal_index, seed=seed, deterministic=deterministic)
    return LoopConfig(**{**values, **overrides})


def run_training(
    settings: Settings,
    params: Params | dict,
    profile: str | None = None,
    resume: bool = False,
    out_dir: Path | None = None,
    manifest: pd.DataFrame | None = None,
    callbacks: Sequence[Callable[[EpochRecord], None]] = (),
    progress: bool = True,
    model_file: str = MODEL_FILE,
    finish: bool = True,
    tracked: TrackedData | None = None,
) -> TrainResult:
    """Train on the 'train' split, early-stop on 'val', write `model_file`, train_metrics.json and history.csv.

    The rows come from `manifest` (a folder's, recorded as no dataset version), else `tracked` (the tracked
    dataset as a caller read it), else the tracked dataset read now. With `finish`, the run ends here: its
    checkpoint folder goes (`finish_run`). A caller with more to do (calibration) passes False and calls
    `finish_run` once that is done too. Two runs of one configuration share that folder, so the second refuses
    while the first runs.
    """
    started = time.perf_counter()
    params = _as_params(params)
    tp, aug = train_params(params), augment_params(params)
    profile_name, prof = choose_profile(tp, profile)
    seed = training_seed(params)
    out_dir = Path(out_dir or settings.home_dir / "train")
    dataset_version = None
    if manifest is None:
        from components.data.tracked import tracked_data

        tracked = tracked or tracked_data(settings, params, progress=progress)
        manifest, dataset_version = tracked.manifest, tracked.version
    else:
        tracked = None
    classes, normal = list(params.profile.classes), params.profile.normal_class
    train_rows, val_rows = _split_rows(manifest, "train"), _split_rows(manifest, "val")
    digest = _rows_digest(train_rows, val_rows)  # what training_digest(manifest) gives, without reading them twice
    teacher = load_teacher(prof, classes, digest)
    fingerprint = _fingerprint(prof, aug, classes, normal, digest, seed, teacher)
    checkpoint_dir = settings.home_dir / "checkpoints" / f"train-{fingerprint}"
    log.info(
        "profile %r: %s at %d px, %d train / %d val images; checkpoints in %s",
        profile_name,
        prof.arch,
        prof.image_size,
        len(train_rows),
        len(val_rows),
        checkpoint_dir,
    )

    train_loader, val_loader, train_targets = build_loaders(
        train_rows, val_rows, classes, prof, aug, seed, params.data.max_image_pixels, normal, progress
    )
    if tracked is not None and prof.cache_images:
        tracked.still_there(settings)  # every picture is decoded now: a later pull cannot change what trains
    counts = class_counts(train_targets, len(classes))
    for name, count in zip(classes, counts, strict=True):
        if count == 0:
            log.warning("class %r has no training images: the model cannot learn it", name)
    torch.manual_seed(seed)  # model initialisation is part of the seeded run
    normal_index = classes.index(normal)  # params check that the normal class is one of the classes
    model, weights_used = profile_model(prof, len(classes), prof.weights, tp.download_weights, normal_index)
    criterion = profile_loss(prof, counts)
    cfg = loop_config(prof, seed, tp.deterministic, normal_index, progress=progress, fingerprint=fingerprint,
                      started_from=weights_used)
    threads_before = torch.get_num_threads()
    # every epoch reads the pictures from data/ again: one that read changed pictures is not saved (the checkpoint
    # keeps the epochs before it, on the pictures a `--resume` with the same fingerprint finds)
    checks = [lambda: tracked.still_there(settings)] if tracked is not None and not prof.cache_images else []
    with exclusive(settings.locks_dir, f"train-{fingerprint}", "a training run of this configuration"), \
            _threads_restored(threads_before):
        result: FitResult = fit(
            model,
            train_loader,
            val_loader,
            criterion,
            cfg,
            checkpoint_dir=checkpoint_dir,
            resume=resume,
            callbacks=callbacks,
            teacher=teacher.model if teacher else None,
            checks=checks,
        )
        if result.started_from and result.started_from != weights_used:
            log.warning("the resumed run started from %s (this machine would now start from %s): recorded as %s",
                        result.started_from, weights_used, result.started_from)
            weights_used = result.started_from
        head_refit = None
        if prof.design == "dense" and prof.head_refit_epochs:
            head_refit = _refit_head(model, result, train_rows, val_loader, classes, prof, criterion, seed,
                                     params.data.max_image_pixels)
            if tracked is not None:
                tracked.still_there(settings)  # the refit read the training pictures from data/ again

    seconds_total = time.perf_counter() - started
    metrics = {
        "best_val_macro_f1": (head_refit["val_macro_f1_after"] if head_refit and head_refit["kept"]
                              else result.best_val_macro_f1),  # the saved model's
        "best_val_loss": result.best_val_loss,
        "best_epoch": result.best_epoch,
        "epochs": result.epochs_run,
        "stopped": result.stopped,
        "train_seconds": round(result.seconds, 2),
        "seconds": round(seconds_total, 2),
        "train_images_per_s": round(result.train_images_per_s, 2),
        "profile": profile_name,
        "arch": prof.arch,
        "image_size": prof.image_size,
        "precision": result.precision,
        "device": result.device,
        "weights_used": weights_used,
        "distilled_from": {"path": str(teacher.path), "sha256": teacher.digest} if teacher else None,
        "dataset_version": dataset_version,
        "manifest_digest": digest,
        "n_train": len(train_rows),
        "n_val": len(val_rows),
        "resumed_from_epoch": result.resumed_from_epoch,
        "head_refit": head_refit,
        # CPU compute threads; a fixed count reruns bit for bit on the same machine, "adaptive" follows the load
        "threads": prof.threads or ("adaptive" if result.device == "cpu" else torch.get_num_threads()),
        "threads_per_epoch": result.threads_per_epoch,
        "cpu_count": os.cpu_count(),
    }
    metrics_path, history_path = _write_outputs(out_dir, metrics, result.history)
    meta = model_meta(
        model,
        classes,
        normal,
        prof.image_size,
        prof.normalize,
        prof.fit,
        weights_used=weights_used,
        dataset_version=dataset_version,
        manifest_digest=digest,
        profile=profile_name,
        train_params=prof.model_dump(mode="json"),
        augment_params=aug.model_dump(mode="json"),
        seed=seed,
        metrics={k: metrics[k] for k in ("best_val_macro_f1", "best_epoch", "epochs")},
    )
    model_path = out_dir / model_file
    save_model_file(model_path, model, model.state_dict() if head_refit else result.best_state, meta)
    log.info(
        "wrote %s (val macro-F1 %.4f, epoch %d%s, %.0f s)",
        model_path,
        metrics["best_val_macro_f1"],
        result.best_epoch,
        " and the refit head" if head_refit and head_refit["kept"] else "",
        seconds_total,
    )
    if finish:
        finish_run(params, checkpoint_dir)
    return TrainResult(model_path, metrics_path, history_path, checkpoint_dir, metrics)
