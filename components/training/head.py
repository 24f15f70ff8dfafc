"""The dense design's second step: refit the image head on whole training pictures.

The trunk learns on patches (`patch_size`), and so does the head during the loop, but the line shows whole
pictures, whose pooled evidence differs from a patch's (a defect fills less of the frame). After the loop, the
evidence of every training picture (as served, and mirrored) is computed once with the best trunk, and the head
(the plant's dropout/Linear/ReLU/dropout/Linear) is trained again on it. The refit head is kept only if the
validation pictures agree (macro-F1 not lower; on a tie, a lower validation loss).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from components.training.loop import autocast, classification_metrics

log = logging.getLogger(__name__)


@torch.no_grad()
def evidence(model: nn.Module, loader: DataLoader, device: torch.device, precision: str = "fp32",
             mirrored: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled cell evidence of every picture of a loader (and of its mirror image), with the targets."""
    model.eval()
    rows, targets = [], []
    for batch in loader:
        images = batch[0].to(device)
        views = [images, images.flip(-1)] if mirrored else [images]
        for view in views:
            with autocast(device, precision):
                rows.append(model.evidence(model.cells(view)).float().cpu())
            targets.append(torch.as_tensor(batch[1]))
    return torch.cat(rows), torch.cat(targets)


def _head_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.classifier(model.hidden(x))


def refit_head(model: nn.Module, train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
               criterion: nn.Module, epochs: int, lr: float = 1e-3, weight_decay: float = 1e-2,
               batch_size: int = 64, seed: int = 0) -> dict[str, Any]:
    """Train the head again on `train` evidence; keep it if validation agrees. Returns what happened."""
    head = [model.hidden, model.classifier]
    before_state = [{k: v.clone() for k, v in m.state_dict().items()} for m in head]
    with torch.no_grad():
        before = classification_metrics(val[1].numpy(), _head_logits(model.eval(), val[0]).numpy())
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    for module in head:
        for layer in module.modules():
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()
    params = [p for m in head for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs))
    x, y = train
    for module in head:
        module.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), batch_size):
            pick = order[start:start + batch_size]
            loss = criterion(_head_logits(model, x[pick]), y[pick])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
    model.eval()
    with torch.no_grad():
        after = classification_metrics(val[1].numpy(), _head_logits(model, val[0]).numpy())
    kept = after["macro_f1"] > before["macro_f1"] + 1e-9 or (
        abs(after["macro_f1"] - before["macro_f1"]) <= 1e-9 and after["loss"] < before["loss"])
    if not kept:
        for module, state in zip(head, before_state, strict=True):
            module.load_state_dict(state)
    log.info("head refit on %d training pictures: val macro-F1 %.4f -> %.4f, val loss %.4f -> %.4f (%s)",
             len(y), before["macro_f1"], after["macro_f1"], before["loss"], after["loss"],
             "kept" if kept else "not kept")
    return {"epochs": epochs, "kept": bool(kept), "val_macro_f1_before": before["macro_f1"],
            "val_macro_f1_after": after["macro_f1"], "val_loss_before": before["loss"],
            "val_loss_after": after["loss"], "n_train": len(y)}

