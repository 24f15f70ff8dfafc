"""Losses for imbalanced classes (class-weighted cross-entropy, focal loss) and the auxiliary ones: defect maps,
supervised contrastive."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def class_weights(counts: Sequence[int] | np.ndarray, power: float = 0.5) -> torch.Tensor:
    """Weight of each class = (its share of the items)^-power, scaled to a count-weighted mean of 1."""
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    share = np.where(present, counts / max(counts.sum(), 1.0), 1.0)
    weights = np.where(present, share**-power, 0.0)
    mean = (weights * counts).sum() / max(counts.sum(), 1.0)
    return torch.as_tensor(weights / (mean or 1.0), dtype=torch.float32)


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017): cross-entropy scaled by (1 - p_true)^gamma, optional class weights."""

    def __init__(
        self, gamma: float = 2.0, weight: torch.Tensor | None = None, label_smoothing: float = 0.0
    ) -> None:
        super().__init__()
        self.gamma = gamma
        self.label_smoothing = label_smoothing
        self.register_buffer("weight", weight if weight is not None else None, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss, weight = self.items(logits, target)
        return loss.sum() / weight.sum().clamp(min=1e-12)

    def items(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each item's weighted loss and its weight: the loss is the first's sum over the second's."""
        log_p = F.log_softmax(logits.float(), dim=1)
        ce = F.nll_loss(log_p, target, reduction="none")
        if self.label_smoothing:
            ce = (1 - self.label_smoothing) * ce - self.label_smoothing * log_p.mean(dim=1)
        p_true = log_p.gather(1, target[:, None]).squeeze(1).exp()
        loss = (1 - p_true).clamp(min=0).pow(self.gamma) * ce
        weight = self.weight[target] if self.weight is not None else torch.ones_like(loss)
        return loss * weight, weight


def build_loss(
    kind: str,
    counts: Sequence[int] | np.ndarray,
    power: float = 0.5,
    gamma: float = 2.0,
    label_smoothing: float = 0.0,
) -> nn.Module:
    """'ce' (plain), 'weighted_ce' (class-weighted) or 'focal' (class-weighted when power > 0)."""
    weight = class_weights(counts, power) if power > 0 else None
    if kind == "ce":
        return nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    if kind == "weighted_ce":
        return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
    if kind == "focal":
        return FocalLoss(gamma=gamma, weight=weight, label_smoothing=label_smoothing)
    raise ValueError(f"unknown loss {kind!r}; use 'ce', 'weighted_ce' or 'focal'")


def item_losses(criterion: nn.Module, logits: torch.Tensor, target: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each item's weighted loss under a `build_loss` criterion and its class weight (sum over sum = the loss)."""
    if isinstance(criterion, FocalLoss):
        return criterion.items(logits, target)
    if isinstance(criterion, nn.CrossEntropyLoss):
        loss = F.cross_entropy(logits.float(), target, weight=criterion.weight, reduction="none",
                               label_smoothing=criterion.label_smoothing)
        return loss, (criterion.weight[target] if criterion.weight is not None else torch.ones_like(loss))
    raise TypeError(f"no per-item form of {type(criterion).__name__}; use a criterion from build_loss")


def mixed_loss(criterion: nn.Module, logits: torch.Tensor, target: torch.Tensor, other: torch.Tensor,
               lam: float | torch.Tensor) -> torch.Tensor:
    """lam * criterion(target) + (1 - lam) * criterion(other), for mixed pictures; `lam` one or one per item."""
    if not isinstance(lam, torch.Tensor):
        return lam * criterion(logits, target) + (1 - lam) * criterion(logits, other)
    (own, own_weight), (theirs, their_weight) = (item_losses(criterion, logits, t) for t in (target, other))
    return ((lam * own).sum() / own_weight.sum().clamp(min=1e-12)
            + ((1 - lam) * theirs).sum() / their_weight.sum().clamp(min=1e-12))


def defect_map_loss(
    logits: torch.Tensor, masks: torch.Tensor, known: torch.Tensor, pos_weight: float = 5.0
) -> torch.Tensor:
    """BCE of the coarse defect map against the max-pooled masks, over the items whose mask is known."""
    target = F.adaptive_max_pool2d(masks[:, None].float(), logits.shape[-2:])
    weight = torch.as_tensor(pos_weight, dtype=logits.dtype, device=logits.device)
    per_item = F.binary_cross_entropy_with_logits(
        logits.float(), target, pos_weight=weight, reduction="none"
    ).mean(dim=(1, 2, 3))
    known = known.float()
    return (per_item * known).sum() / known.sum().clamp(min=1.0)


def cell_class_loss(
    logits: torch.Tensor,
    masks: torch.Tensor,
    known: torch.Tensor,
    targets: torch.Tensor,
    normal_index: int,
    pos_weight: float = 5.0,
) -> torch.Tensor:
    """Cross-entropy of every cell's class (the dense design), over the items whose mask is known.

    A cell holding any defect pixel (the mask max-pooled to the cell grid) has the image's class, every other
    cell the normal class; defect cells weigh `pos_weight`, since they are few.
    """
    cells = F.adaptive_max_pool2d(masks[:, None].float(), logits.shape[-2:])[:, 0] > 0
    labels = torch.where(cells, targets.long()[:, None, None], torch.full_like(targets.long(), normal_index)[:, None, None])
    per_cell = F.cross_entropy(logits.float(), labels, reduction="none")
    weight = torch.where(labels == normal_index, 1.0, pos_weight) * known.float()[:, None, None]
    return (per_cell * weight).sum() / weight.sum().clamp(min=1e-6)


def projection_head(features: int, out: int = 128) -> nn.Module:
    """The contrastive loss's projection (SimCLR's two-layer MLP): a training aid, not part of the model file."""
    return nn.Sequential(nn.Linear(features, features), nn.ReLU(inplace=True), nn.Linear(features, out))


def supcon_loss(embeddings: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, L_out) over one view of a batch.

    Each picture is pulled towards the batch's other pictures of its class and pushed from the rest, on the unit
    sphere at `temperature`; pictures with no other of their class in the batch are not anchors. Zero when no
    picture has a partner.
    """
    z = F.normalize(embeddings.float(), dim=1)
    logits = z @ z.T / temperature
    self_pair = torch.eye(len(z), dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_pair, float("-inf"))
    log_p = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positive = (labels[:, None] == labels[None, :]) & ~self_pair
    count = positive.sum(dim=1)
    anchors = count > 0
    if not anchors.any():
        return z.sum() * 0.0
    mean_log_p = log_p.masked_fill(~positive, 0.0).sum(dim=1)[anchors] / count[anchors]
    return -mean_log_p.mean()


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """Knowledge distillation (Hinton et al. 2015): KL(teacher || student) of the class probabilities softened
    at `temperature`, times temperature^2 so its gradient keeps the scale of a cross-entropy's."""
    log_student = F.log_softmax(student.float() / temperature, dim=1)
    log_teacher = F.log_softmax(teacher.float() / temperature, dim=1)
    return F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean") * temperature**2
