"""The training loop: AdamW + warmup/cosine, mixed precision, early stop on val macro-F1, checkpoints, resume.

The loop knows nothing about files of images or params.yaml: it gets a model, two loaders, a loss and a
`LoopConfig`, and returns the best weights with the per-epoch history. `train.py` wires it to the project.

Checkpoint folder (written after every epoch, atomically):
    last.pt   model, optimiser, scheduler, grad scaler, EMA, epoch, best score, early-stop counter, history,
              RNG states (python, numpy, torch, CUDA) and the config fingerprint it belongs to
    best.pt   the best weights so far (the EMA weights when EMA is on)
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from components.errors import DefectOpsError, UsageError
from components.files import replacing
from components.training.cores import OthersLoad, free_cores_threads, others_runnable_now
from components.training.losses import (
    cell_class_loss,
    defect_map_loss,
    distill_loss,
    mixed_loss,
    projection_head,
    supcon_loss,
)

Mix = float | torch.Tensor  # a mixed picture's weight of its own label: one for the batch, or one each

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
# Adaptive compute threads are re-checked this often within an epoch, not only between epochs: two trainings
# started together each read the other as idle (both still starting up) and ran a first epoch of 2+2 threads
# on 2 cores.
THREADS_RECHECK_S = 10.0
# torch's warning for a kernel without a deterministic implementation (warn_only=True), e.g. a CUDA backward
NONDETERMINISTIC = "does not have a deterministic implementation"


class TrainingDiverged(DefectOpsError):
    """The loss became NaN or infinite; nothing is written as the final model."""


@dataclass(frozen=True)
class LoopConfig:
    """What the loop needs to know; built from a profile by `train.py`."""

    epochs: int
    lr: float
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    min_epochs: int = 0
    patience: int = 8
    keep: str = "best"  # best: the epoch with the best val macro-F1 (early stopping); last: the final epoch
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    channels_last: bool = True
    ema_decay: float | None = None
    mask_loss_weight: float = 0.0  # > 0: train the defect-map head on batches that carry masks
    mask_pos_weight: float = 5.0
    mixup_alpha: float = 0.0  # > 0: blend pairs of training pictures, weights ~ Beta(alpha, alpha)
    mixup_prob: float = 1.0  # share of the batches blended
    cutmix_alpha: float = 0.0  # > 0: a box of another picture pasted in, its area share ~ Beta(alpha, alpha)
    cutmix_prob: float = 1.0  # share of the batches mixed so
    cutmix_labels: str = "area"  # area: labels weighted by the box's area; mask: by the defects left in view
    sam_rho: float = 0.0  # > 0: sharpness-aware minimisation, the gradient taken this far uphill (2 passes a step)
    supcon_weight: float = 0.0  # > 0: add a supervised contrastive loss on the pooled features (unmixed batches)
    supcon_temperature: float = 0.1
    distill_weight: float = 0.5  # with a teacher (fit's `teacher`): its share of the class loss
    distill_temperature: float = 2.0
    normal_index: int = 0  # the normal class: what a cell without defect pixels is (dense design, mask_classes)
    max_minutes: float | None = None
    threads: int = 0  # CPU compute threads; 0 = adapt to the free cores before every epoch
    seed: int = 42
    deterministic: bool = True
    progress: bool = True
    fingerprint: str = ""  # identifies the run a checkpoint belongs to
    started_from: str = ""  # the weights the run started from (kept in the checkpoint: a resume records the run's)


@dataclass
class EpochRecord:
    """One row of history.csv."""

    epoch: int
    train_loss: float
    val_loss: float
    val_macro_f1: float
    val_accuracy: float
    lr: float
    seconds: float
    train_images_per_s: float
    data_wait_s: float
    threads: float = 0.0  # CPU compute threads, averaged over the steps (0: a checkpoint from before the column)

    def summary(self, epochs: int) -> str:
        """The progress line of this epoch."""
        return (f"epoch {self.epoch}/{epochs}  train_loss {self.train_loss:.4f}  val_loss {self.val_loss:.4f}  "
                f"val_macro_f1 {self.val_macro_f1:.4f}  val_acc {self.val_accuracy:.4f}  lr {self.lr:.2e}  "
                f"{self.seconds:.1f} s  {self.train_images_per_s:.1f} img/s")


class EpochTrain(NamedTuple):
    """What one training epoch reports."""

    loss: float  # mean over the pictures
    lr: float  # at the end of the epoch
    images_per_s: float  # in the steps, without waiting for data
    data_wait_s: float
    threads: float  # CPU compute threads, averaged over the steps


@dataclass
class FitResult:
    """The best weights and how training went."""

    best_state: dict[str, torch.Tensor]
    best_epoch: int
    best_val_macro_f1: float
    best_val_loss: float
    history: list[EpochRecord] = field(default_factory=list)
    stopped: str = "max epochs"
    precision: str = "fp32"
    device: str = "cpu"
    resumed_from_epoch: int = 0
    started_from: str = ""  # the weights the run started from, as its first epoch found them

    @property
    def epochs_run(self) -> int:
        return len(self.history)

    @property
    def seconds(self) -> float:
        return float(sum(r.seconds for r in self.history))

    @property
    def train_images_per_s(self) -> float:
        rates = [r.train_images_per_s for r in self.history if r.train_images_per_s > 0]
        return float(np.median(rates)) if rates else 0.0

    @property
    def threads_per_epoch(self) -> list[float]:
        """The fewest and most compute threads an epoch averaged."""
        return list(_threads_range(self.history))


def _threads_range(history: Sequence[EpochRecord]) -> tuple[float, float]:
    threads = [r.threads for r in history if r.threads > 0] or [0.0]
    return round(min(threads), 2), round(max(threads), 2)


# ------------------------------------------------------------------ hardware


def cpu_supports_bf16() -> bool:
    """Whether this CPU has native bf16 arithmetic (AVX-512 BF16 or AMX), where bf16 autocast pays off."""
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(torch.cpu, probe, None)
        try:
            if check is not None and check():
                return True
        except RuntimeError:
            continue
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_precision(requested: str, device: torch.device) -> str:
    """The precision to run: 'auto' is fp16 on CUDA, bf16 on CPUs with native bf16, else fp32."""
    if requested == "auto":
        if device.type == "cuda":
            return "fp16"
        return "bf16" if device.type == "cpu" and cpu_supports_bf16() else "fp32"
    if requested == "bf16" and device.type == "cpu" and not cpu_supports_bf16():
        log.warning("bf16 requested on a CPU without native bf16: expect it to be slower than fp32")
    if requested == "fp16" and device.type == "cpu":
        log.warning("fp16 autocast on CPU is slow and unscaled; using bf16/fp32 is better (precision: auto)")
    return requested


def autocast(device: torch.device, precision: str) -> Any:
    """The autocast context for a precision (a no-op for fp32)."""
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed python, numpy and torch; optionally ask for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


@contextmanager
def nondeterminism_logged_once(seen: set[str]) -> Iterator[None]:
    """Log each of torch's "no deterministic implementation" warnings once a run; pass other warnings on.

    Left to Python they repeat every epoch: its memory of warnings already shown is cleared whenever anything
    changes the warning filters, which libraries in the loop do. `seen` holds the messages already logged.
    """
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            yield
    finally:
        for w in caught:
            text = str(w.message)
            if NONDETERMINISTIC not in text:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            elif text not in seen:
                seen.add(text)
                log.warning("%s (logged once a run)", text.split(", but you set")[0])


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------ schedule, metrics, io


def warmup_cosine(total_steps: int, warmup_steps: int, floor: float = 0.01) -> Callable[[int], float]:
    """LR multiplier: linear warmup to 1, then cosine down to `floor`."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def classification_metrics(targets: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """Cross-entropy, macro-F1 and accuracy. Macro-F1 averages over the classes present in `targets` or
    predicted, as evaluation's does (components/evaluation/metrics.py): a class only predicted counts at 0."""
    from sklearn.metrics import f1_score

    predictions = logits.argmax(axis=1)
    labels = sorted(set(targets.tolist()) | set(predictions.tolist()))
    loss = F.cross_entropy(torch.as_tensor(logits, dtype=torch.float32), torch.as_tensor(targets)).item()
    return {
        "loss": float(loss),
        "macro_f1": float(f1_score(targets, predictions, labels=labels, average="macro", zero_division=0)),
        "accuracy": float((predictions == targets).mean()),
    }


@torch.no_grad()
def predict(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    precision: str = "fp32",
    channels_last: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Logits and targets over a loader, in loader order."""
    was_training = model.training
    model.eval()
    logits, targets = [], []
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for batch in loader:
        images, labels = batch[0], batch[1]
        images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        with autocast(device, precision):
            out = model(images)
        logits.append(out.float().cpu())
        targets.append(torch.as_tensor(labels))
    model.train(was_training)
    return torch.cat(logits).numpy(), torch.cat(targets).numpy()


def mask_loss(defect_logits: torch.Tensor, masks: torch.Tensor, known: torch.Tensor, labels: torch.Tensor,
              cfg: LoopConfig) -> torch.Tensor:
    """The weighted loss on the masks: per-cell classes (dense design, mask_classes) or a binary defect map."""
    if defect_logits.shape[1] > 1:
        loss = cell_class_loss(defect_logits, masks, known, labels, cfg.normal_index, cfg.mask_pos_weight)
    else:
        loss = defect_map_loss(defect_logits, masks, known, cfg.mask_pos_weight)
    return cfg.mask_loss_weight * loss


def mixup(images: torch.Tensor, rng: np.random.Generator, alpha: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Each picture blended with another of the batch (Zhang et al. 2018): the blend, the partner, its weight.

    The loss is then lam * loss(labels) + (1 - lam) * loss(labels[partner]).
    """
    lam = float(rng.beta(alpha, alpha))
    partner = _partners(images, rng)
    return lam * images + (1 - lam) * images[partner], partner, lam


def cutmix(images: torch.Tensor, masks: torch.Tensor | None, rng: np.random.Generator, alpha: float,
           known: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, Mix]:
    """Each picture with a box of another of the batch pasted in (Yun et al. 2019), the box's mask with it.

    The box's area share is drawn from Beta(alpha, alpha) and clipped to the picture. The returned weight of
    each picture's own label is, without `known`, the share of the picture left (one number for the batch);
    with `known` (which masks are known), the share by the defects in view (`defect_label_weights`).
    The loss is lam * loss(labels) + (1 - lam) * loss(labels[partner]).
    """
    height, width = images.shape[-2:]
    share = float(rng.beta(alpha, alpha))
    box_h, box_w = round(height * np.sqrt(share)), round(width * np.sqrt(share))
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    top, bottom = max(cy - box_h // 2, 0), min(cy + box_h - box_h // 2, height)
    left, right = max(cx - box_w // 2, 0), min(cx + box_w - box_w // 2, width)
    partner = _partners(images, rng)
    mixed = images.clone()
    mixed[..., top:bottom, left:right] = images[..., top:bottom, left:right][partner]
    lam = 1.0 - (bottom - top) * (right - left) / (height * width)
    if masks is None:
        return mixed, None, partner, lam
    if known is not None:
        in_box = torch.zeros_like(masks[0])
        in_box[top:bottom, left:right] = 1.0
        lam = defect_label_weights(masks, known, partner, in_box, lam)
    masks = masks.clone()
    masks[..., top:bottom, left:right] = masks[..., top:bottom, left:right][partner]
    return mixed, masks, partner, lam


def defect_label_weights(masks: torch.Tensor, known: torch.Tensor, partner: torch.Tensor,
                         in_box: torch.Tensor, lam: float) -> torch.Tensor:
    """Each cut-mixed picture's weight of its own label, from the defects in view (the partner's: 1 minus it).

    Like SnapMix (Huang et al. 2021) with the true masks in place of class activation maps: a defect
    picture's label weighs the share of its defect mask in view (its own outside the box, the partner's
    inside it). A normal picture's label weighs its area in view times the share of the other's defect that
    is not: a part that shows a defect is not normal. A picture whose mask is unknown weighs by area, and so
    does a pair with nothing in view to weigh (each one's defect hidden).
    """
    total, boxed = masks.sum(dim=(-2, -1)), (masks * in_box).sum(dim=(-2, -1))
    defect, normal = (known > 0) & (total > 0), (known > 0) & (total == 0)
    share = (total - boxed) / total.clamp(min=1e-6)
    own = torch.where(defect, share, lam)
    other = torch.where(defect[partner], 1 - share[partner], 1 - lam)
    own_defect_shown, other_defect_shown = torch.where(defect, own, 0.0), torch.where(defect[partner], other, 0.0)
    own = torch.where(normal, own * (1 - other_defect_shown), own)
    other = torch.where(normal[partner], other * (1 - own_defect_shown), other)
    weight = own + other
    return torch.where(weight > 1e-6, own / weight.clamp(min=1e-6), lam)


def _partners(images: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """A random permutation of the batch: each picture's mixing partner."""
    return torch.as_tensor(rng.permutation(images.shape[0]), device=images.device)


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file, then rename over `path`."""
    with replacing(path) as tmp:
        torch.save(obj, tmp)


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}


# ------------------------------------------------------------------ the loop


class Trainer:
    """State of one fit; split out so checkpointing and resume read plainly."""

    def __init__(
        self,
        model: nn.Module,
        train_loader: DataLoader,
        val_loader: DataLoader,
        criterion: nn.Module,
        cfg: LoopConfig,
        device: torch.device,
        checkpoint_dir: Path | None,
        teacher: nn.Module | None = None,
    ) -> None:
        self.cfg, self.device, self.checkpoint_dir = cfg, device, checkpoint_dir
        self.precision = resolve_precision(cfg.precision, device)
        self.started_from = cfg.started_from
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        self.model = model.to(device, memory_format=self.memory_format)
        self.criterion = criterion.to(device)
        self.train_loader, self.val_loader = train_loader, val_loader
        self.teacher = None  # knowledge distillation: fixed, in eval mode, not in the optimiser or checkpoint
        if teacher is not None:
            self.teacher = teacher.to(device, memory_format=self.memory_format).eval().requires_grad_(False)
        self.projection = None
        if cfg.supcon_weight > 0:
            if not hasattr(model, "forward_contrast"):
                raise UsageError(f"supcon_weight needs pooled features; {type(model).__name__} has none "
                                 "(use design: global)")
            self.projection = projection_head(model.feature_dim).to(device)
        params = [p for p in model.parameters() if p.requires_grad]
        if self.projection is not None:
            params += list(self.projection.parameters())
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr,
            fused=device.type == "cuda" or None,
        )
        steps = max(1, len(train_loader))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(cfg.epochs * steps, round(cfg.warmup_epochs * steps))
        )
        self.scaler = torch.amp.GradScaler(
            device.type, enabled=self.precision == "fp16" and device.type == "cuda"
        )
        self.ema = None
        if cfg.ema_decay:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            self.ema = AveragedModel(
                model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True
            )
            warn_slow_ema(cfg.ema_decay, cfg.epochs, steps)
        self.use_masks = cfg.mask_loss_weight > 0 and hasattr(model, "forward_train")
        self.others_load: OthersLoad | None = None  # sampled through the epochs when threads adapt (fit)
        self._threads_checked = 0.0
        self.epoch = 0
        self.best_f1, self.best_loss, self.best_epoch, self.bad_epochs = -1.0, math.inf, 0, 0
        self.history: list[EpochRecord] = []
        self.stopped: str | None = None

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    # -- checkpoint
    def _last(self) -> Path | None:
        return self.checkpoint_dir / "last.pt" if self.checkpoint_dir else None

    def _best(self) -> Path | None:
        return self.checkpoint_dir / "best.pt" if self.checkpoint_dir else None

    def _pending_best(self, epoch: int) -> Path:
        """An epoch's better weights, until last.pt (which records that epoch as the best) is written too."""
        return self.checkpoint_dir / f"best.pending-{epoch}.pt"

    def save_best(self) -> None:
        """This epoch's weights as the best: they replace best.pt once save_checkpoint has written last.pt, so a
        kill in between never leaves a best.pt newer than the best epoch last.pt records."""
        atomic_save(self.eval_model.state_dict(), self._pending_best(self.epoch))

    def _settle_best(self, best_epoch: int) -> None:
        """The pending best of `best_epoch` becomes best.pt; a pending best of any other epoch (killed before its
        last.pt) is dropped: that epoch is trained again."""
        for pending in self.checkpoint_dir.glob("best.pending-*.pt"):
            if pending.name == self._pending_best(best_epoch).name:
                os.replace(pending, self._best())
            else:
                pending.unlink(missing_ok=True)

    def save_checkpoint(self) -> None:
        if not self.checkpoint_dir:
            return
        state = {
            "format": CHECKPOINT_FORMAT,
            "fingerprint": self.cfg.fingerprint,
            "started_from": self.started_from,
            "precision": self.precision,
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "projection": self.projection.state_dict() if self.projection is not None else None,
            "best_f1": self.best_f1,
            "best_loss": self.best_loss,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "stopped": self.stopped,
            "history": [asdict(r) for r in self.history],
            "rng": _rng_state(),
        }
        atomic_save(state, self._last())
        self._settle_best(self.best_epoch)

    def load_checkpoint(self) -> bool:
        last = self._last()
        if last is None or not last.is_file():
            return False
        try:
            state = torch.load(last, map_location=self.device, weights_only=False)
        except Exception as exc:
            raise UsageError(f"{last}: unreadable checkpoint ({exc}); delete it to start afresh") from exc
        if state.get("format") != CHECKPOINT_FORMAT or state.get("fingerprint") != self.cfg.fingerprint:
            raise UsageError(
                f"{last}: checkpoint belongs to a different run configuration; delete {last.parent} "
                "or train without resume"
            )
        if state.get("precision", self.precision) != self.precision:  # `auto` resolves by the device found
            raise UsageError(
                f"{last}: its epochs ran in {state['precision']}, this {self.device.type} would run {self.precision}; "
                "resume it on the kind of machine it started on, or train without --resume"
            )
        self.started_from = state.get("started_from") or self.started_from
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        if self.projection is not None:
            self.projection.load_state_dict(state["projection"])
        self.epoch, self.best_f1, self.best_loss = state["epoch"], state["best_f1"], state["best_loss"]
        self.best_epoch, self.bad_epochs, self.stopped = (
            state["best_epoch"],
            state["bad_epochs"],
            state["stopped"],
        )
        self.history = [EpochRecord(**r) for r in state["history"]]
        _set_rng_state(state["rng"])
        self._settle_best(self.best_epoch)
        log.info(
            "resumed from %s after epoch %d (best val macro-F1 %.4f at epoch %d)",
            last,
            self.epoch,
            self.best_f1,
            self.best_epoch,
        )
        return True

    # -- one epoch
    def _set_threads(self, epoch: int) -> None:
        """Compute threads from here on: the configured count, or the cores other processes left free since
        the last check (re-checked every THREADS_RECHECK_S of training; before the first epoch, right now)."""
        others = None
        if self.cfg.threads:
            threads = self.cfg.threads
        else:
            others = self.others_load.take() if self.others_load else None
            others = others_runnable_now() if others is None else others
            threads = free_cores_threads(others)
        self._threads_checked = time.perf_counter()
        if threads != torch.get_num_threads():
            busy = "" if others is None else f" (other processes: {others:.1f} threads runnable on average)"
            log.info("epoch %d: %d compute thread(s)%s", epoch, threads, busy)
            torch.set_num_threads(threads)

    def _reseed_loader(self, epoch: int) -> None:
        """Make each epoch's order and augmentation a function of (seed, epoch), so a resume replays it."""
        loader = self.train_loader
        if hasattr(loader.dataset, "set_epoch"):
            loader.dataset.set_epoch(epoch)
        for generator in (getattr(loader, "generator", None), getattr(loader.sampler, "generator", None)):
            if generator is not None:
                generator.manual_seed(self.cfg.seed * 1_000_003 + epoch)

    def train_epoch(self) -> EpochTrain:
        """One pass over the training loader."""
        from tqdm import tqdm

        epoch = self.epoch + 1
        self._reseed_loader(epoch)
        mix_rng = np.random.default_rng([self.cfg.seed, epoch])
        if self.device.type == "cpu":
            self._set_threads(epoch)
        self.model.train()
        total_loss, seen, step_time, wait, thread_steps = 0.0, 0, 0.0, 0.0, 0
        bar = tqdm(
            total=len(self.train_loader),
            desc=f"epoch {epoch}/{self.cfg.epochs}",
            unit="batch",
            leave=False,
            disable=None if self.cfg.progress else True,
            dynamic_ncols=True,
        )
        tick = time.perf_counter()
        for step, batch in enumerate(self.train_loader):
            ready = time.perf_counter()
            wait += ready - tick
            thread_steps += torch.get_num_threads()
            images = batch[0].to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
            labels = torch.as_tensor(batch[1]).to(self.device, non_blocking=True)
            partner, lam, masks = None, 1.0, None
            mask, known = (t.to(self.device, non_blocking=True) for t in batch[2:4]) if len(batch) == 4 else (None, None)
            if self.cfg.mixup_alpha > 0 and mix_rng.random() < self.cfg.mixup_prob:
                images, partner, lam = mixup(images, mix_rng, self.cfg.mixup_alpha)
                if mask is not None:  # a blend shows both pictures' defects (fainter)
                    mask = torch.maximum(mask, mask[partner])
            elif self.cfg.cutmix_alpha > 0 and mix_rng.random() < self.cfg.cutmix_prob:
                images, mask, partner, lam = cutmix(images, mask, mix_rng, self.cfg.cutmix_alpha,
                                                    known if self.cfg.cutmix_labels == "mask" else None)
            if mask is not None:
                if partner is not None:  # a mixed picture's mask is known where both pictures' are
                    known = known * known[partner]
                masks = (mask, known)
            loss = self._loss(images, labels, masks, partner, lam)
            if not torch.isfinite(loss):
                bar.close()
                where = f" (last good checkpoint: {self._last()})" if self.checkpoint_dir else ""
                raise TrainingDiverged(
                    f"training diverged: loss became {loss.item()} at epoch {epoch}, step {step + 1}{where}; "
                    f"lower the learning rate (lr={self.cfg.lr:g}) or set precision: fp32 in the train "
                    "profile, then train again"
                )
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if self.cfg.sam_rho > 0:
                self._sharpness_aware_gradient(partial(self._loss, images, labels, masks, partner, lam))
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update_parameters(self.model)
            value = loss.item()
            tick = time.perf_counter()
            if self.others_load and tick - self._threads_checked >= THREADS_RECHECK_S:
                self._set_threads(epoch)
            step_time += tick - ready
            total_loss += value * len(labels)
            seen += len(labels)
            bar.update(1)
            bar.set_postfix(
                loss=f"{total_loss / seen:.4f}",
                lr=f"{self.scheduler.get_last_lr()[0]:.2e}",
                img_s=f"{seen / max(step_time, 1e-9):.1f}",
                refresh=False,
            )
        bar.close()
        if seen == 0:
            raise UsageError(
                "the training loader yielded no batches; add training images or lower batch_size"
            )
        return EpochTrain(total_loss / seen, self.scheduler.get_last_lr()[0], seen / max(step_time, 1e-9), wait,
                          thread_steps / (step + 1))

    def _loss(self, images: torch.Tensor, labels: torch.Tensor,
              masks: tuple[torch.Tensor, torch.Tensor] | None, partner: torch.Tensor | None,
              lam: Mix) -> torch.Tensor:
        """The batch's loss: classes (mixed with the partners' when blended), plus the defect map's, plus the
        contrastive one on batches that were not mixed."""
        contrast = self.projection is not None and partner is None
        pooled = None
        with autocast(self.device, self.precision):
            if contrast:
                logits, defect_logits, pooled = self.model.forward_contrast(images)
                defect_logits = defect_logits if self.use_masks else None
            elif self.use_masks:
                logits, defect_logits = self.model.forward_train(images)
            else:
                logits, defect_logits = self.model(images), None
        if partner is None:
            loss = self.criterion(logits.float(), labels)
        else:
            loss = mixed_loss(self.criterion, logits.float(), labels, labels[partner], lam)
        if self.teacher is not None:  # the teacher sees the same (augmented, mixed) pictures
            with torch.no_grad(), autocast(self.device, self.precision):
                taught = self.teacher(images)
            weight = self.cfg.distill_weight
            loss = (1 - weight) * loss + weight * distill_loss(logits, taught, self.cfg.distill_temperature)
        if defect_logits is not None and masks is not None:
            loss = loss + mask_loss(defect_logits, *masks, labels, self.cfg)
        if pooled is not None:
            embeddings = self.projection(pooled.float())
            loss = loss + self.cfg.supcon_weight * supcon_loss(embeddings, labels, self.cfg.supcon_temperature)
        return loss

    def _sharpness_aware_gradient(self, loss_fn: Callable[[], torch.Tensor]) -> None:
        """SAM (Foret et al. 2021): replace the gradient by the one at the weights moved sam_rho along it.

        The move is along the unit gradient, so a loss scale (fp16) does not change it.
        """
        params = [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        with torch.no_grad():
            norm = torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in params]))
            if not torch.isfinite(norm) or norm == 0:
                return  # an overflowed fp16 step: the scaler skips it anyway
            shifts = [p.grad * (self.cfg.sam_rho / norm) for p in params]
            for p, shift in zip(params, shifts, strict=True):
                p.add_(shift)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss_fn()).backward()
        with torch.no_grad():
            for p, shift in zip(params, shifts, strict=True):
                p.sub_(shift)

    def validate(self) -> dict[str, float]:
        logits, targets = predict(
            self.eval_model, self.val_loader, self.device, self.precision, self.cfg.channels_last
        )
        if not np.isfinite(logits).all():
            raise TrainingDiverged(
                f"training diverged: validation logits are not finite after epoch {self.epoch}; "
                "lower the learning rate "
                f"(lr={self.cfg.lr:g}) or set precision: fp32"
            )
        return classification_metrics(targets, logits)

    def improved(self, metrics: dict[str, float]) -> bool:
        """Better macro-F1, or equal macro-F1 with a lower validation loss."""
        f1, loss = metrics["macro_f1"], metrics["loss"]
        return f1 > self.best_f1 + 1e-9 or (abs(f1 - self.best_f1) <= 1e-9 and loss < self.best_loss)


EMA_MAX_START_SHARE = 0.01  # of the first step's weights, left in the average at the end of a run


def ema_start_share(decay: float, steps: int) -> float:
    """Share of the first step's weights still in the exponential average after `steps` updates (the first
    update copies the model)."""
    return decay ** max(0, steps - 1)


def warn_slow_ema(decay: float, epochs: int, steps_per_epoch: int) -> None:
    """Warn when the average would still carry much of the (near-initial) first weights after the whole run.

    Seen on a GPU: the gpu profile's 0.999 over 60 epochs of 24 steps kept 24% of the first step's weights,
    and the averaged model, the one validated and kept, answered `normal` for every image.
    """
    steps = epochs * steps_per_epoch
    share = ema_start_share(decay, steps)
    if share > EMA_MAX_START_SHARE:
        log.warning(
            "ema_decay %g is too slow for %d steps (%d epochs of %d): the averaged weights, which are validated "
            "and kept, would still hold %.0f%% of the first step's; use at most %.4f (train.profiles.*.ema_decay)",
            decay, steps, epochs, steps_per_epoch, 100 * share, EMA_MAX_START_SHARE ** (1 / max(1, steps - 1)),
        )


def fit(
    model: nn.Module,
    train_loader: DataLoader,
    val_loader: DataLoader,
    criterion: nn.Module,
    cfg: LoopConfig,
    device: torch.device | str | None = None,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    callbacks: Sequence[Callable[[EpochRecord], None]] = (),
    teacher: nn.Module | None = None,
    checks: Sequence[Callable[[], None]] = (),
) -> FitResult:
    """Train with early stopping on validation macro-F1; returns the best weights and the history. With a
    `teacher`, the class loss is partly its softened probabilities on the same pictures (cfg.distill_*).
    `checks` run after each epoch's validation, before anything of that epoch is saved: one that raises stops
    the fit with the checkpoint at the epoch before (`callbacks` run once the epoch is saved)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    seed_everything(cfg.seed, cfg.deterministic)
    trainer = Trainer(model, train_loader, val_loader, criterion, cfg, device, checkpoint_dir, teacher)
    resumed = trainer.load_checkpoint() if resume else False
    if resume and not resumed:
        log.info("no checkpoint to resume in %s: starting afresh", checkpoint_dir)
    if not resumed and checkpoint_dir is not None:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        for stale in (trainer._best(), trainer._last(), *checkpoint_dir.glob("best.pending-*.pt")):
            stale.unlink(missing_ok=True)
    start_epoch = trainer.epoch
    best_state: dict[str, torch.Tensor] | None = None
    log.info(
        "training on %s, precision %s, channels_last %s, %d train / %d val images, up to %d epochs",
        device,
        trainer.precision,
        cfg.channels_last,
        len(train_loader.dataset),
        len(val_loader.dataset),
        cfg.epochs,
    )
    spent = sum(r.seconds for r in trainer.history)
    adapt_threads = device.type == "cpu" and not cfg.threads
    nondeterministic_logged: set[str] = set()
    with OthersLoad() if adapt_threads else nullcontext() as others_load:
        trainer.others_load = others_load
        while trainer.stopped is None and trainer.epoch < cfg.epochs:
            began = time.perf_counter()
            with nondeterminism_logged_once(nondeterministic_logged):
                epoch_train = trainer.train_epoch()
            trainer.epoch += 1
            metrics = trainer.validate()
            for check in checks:
                check()
            if trainer.improved(metrics) or cfg.keep == "last":
                trainer.best_f1, trainer.best_loss, trainer.best_epoch = (
                    metrics["macro_f1"],
                    metrics["loss"],
                    trainer.epoch,
                )
                trainer.bad_epochs = 0
                if checkpoint_dir is not None:
                    trainer.save_best()
                else:
                    best_state = _cpu_state(trainer.eval_model)
            else:
                trainer.bad_epochs += 1
            seconds = time.perf_counter() - began
            spent += seconds
            record = EpochRecord(
                trainer.epoch, epoch_train.loss, metrics["loss"], metrics["macro_f1"], metrics["accuracy"],
                epoch_train.lr, seconds, epoch_train.images_per_s, epoch_train.data_wait_s, epoch_train.threads,
            )
            trainer.history.append(record)
            if trainer.epoch >= max(cfg.min_epochs, 1) and trainer.bad_epochs >= cfg.patience:
                trainer.stopped = f"early stop: no better val macro-F1 for {cfg.patience} epochs"
            elif cfg.max_minutes and spent >= cfg.max_minutes * 60 and trainer.epoch < cfg.epochs:
                trainer.stopped = f"time budget of {cfg.max_minutes:g} min reached"
            best = "  *best*" if cfg.keep == "best" and trainer.best_epoch == trainer.epoch else ""
            log.info("%s%s", record.summary(cfg.epochs), best)
            trainer.save_checkpoint()
            for callback in callbacks:
                callback(record)
    if checkpoint_dir is not None:
        best_file = trainer._best()
        if not best_file.is_file():
            raise UsageError(
                f"{best_file}: no best weights in the checkpoint; delete {checkpoint_dir} and train again"
            )
        best_state = torch.load(best_file, map_location="cpu", weights_only=True)
    elif best_state is None:
        best_state = _cpu_state(trainer.eval_model)
    best_state = {k.removeprefix("module."): v for k, v in best_state.items() if k != "n_averaged"}
    if trainer.stopped:
        log.info("stopped after epoch %d: %s", trainer.epoch, trainer.stopped)
    if adapt_threads:
        low, high = _threads_range(trainer.history)
        log.info("compute threads followed the machine's load (%.3g-%.3g per epoch): another thread count sums in "
                 "another order, so a rerun with this seed matches bit for bit only with a fixed `threads` in the "
                 "profile", low, high)
    return FitResult(
        best_state=best_state,
        best_epoch=trainer.best_epoch,
        best_val_macro_f1=trainer.best_f1,
        best_val_loss=trainer.best_loss,
        history=trainer.history,
        stopped=trainer.stopped or "max epochs",
        precision=trainer.precision,
        device=str(device),
        resumed_from_epoch=start_epoch,
        started_from=trainer.started_from,
    )
