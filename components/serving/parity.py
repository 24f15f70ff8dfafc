"""Parity of a fast inference path with the fp32 PyTorch model, on real images; the choice of what to serve.

The check compares what the line would see: temperature-scaled probabilities, top-1 classes and the
accept/reject/review decisions, image by image, on the same prepared tensors. It passes when

* top-1 agreement >= `min_top1_agreement` (default 99.5 %: at most 1 image in 200 may change class),
* decision agreement >= `min_decision_agreement` (default 99.5 %: at most 1 image in 200 may get another
  accept / reject / review than the evaluated fp32 model; a flip from review to accept of a defective part is
  an escape), and
* the largest absolute difference of any class probability on any image <= `max_prob_diff` (default 0.05).

The first batch is also run one image at a time, since engines may take another path for a single image.

Why 0.05: a decision can only flip for an image whose confidence lies within that distance of the review
threshold, and such images are the ones calibration already sends to review more often; a bf16 engine
typically moves probabilities by well under 0.01 on a trained model (the record keeps the measured figures), so
0.05 leaves room for unlucky images but catches a broken export (wrong normalisation or layout moves
probabilities by 0.2 and more). How many decisions do flip is bounded on its own. A fast path that fails is not served:
`choose_engine` falls back to fp32 and says why, and the deployment record keeps that evidence.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from components.config import Settings
from components.errors import DefectOpsError, ImageError
from components.evaluation.decision import decide
from components.predictor import ImageInput, Predictor
from components.serving.engines import REFERENCE, build_engine, resolve_fast_path
from components.serving.params import ParityParams

log = logging.getLogger(__name__)

PARITY_SEED = 1234


@dataclass(frozen=True)
class ParityReport:
    """How a candidate engine compares with the fp32 reference on the same images."""

    engine: str
    passed: bool
    n_images: int
    top1_agreement: float
    decision_agreement: float
    max_prob_diff: float
    mean_prob_diff: float
    min_top1_agreement: float
    max_prob_diff_bound: float
    reason: str
    seconds: float
    skipped_images: int = 0
    precision: str = ""
    min_decision_agreement: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class EngineChoice:
    """The engine to serve, the one asked for, and the evidence (parity report or why none was run)."""

    engine: str
    requested: str
    device: str
    parity: dict[str, Any] | None = None
    reason: str = ""
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _prepared_batches(reference: Predictor, images: Sequence[ImageInput], batch_size: int) -> tuple[list, int]:
    import torch

    tensors, skipped = [], 0
    for image in images:
        try:
            tensors.append(reference.prepare(image))
        except ImageError as exc:
            skipped += 1
            log.debug("parity: skipped an unreadable image (%s)", exc)
    return [torch.stack(tensors[i:i + batch_size]) for i in range(0, len(tensors), batch_size)], skipped


def check_parity(reference: Predictor, candidate: Predictor, images: Sequence[ImageInput], bounds: ParityParams,
                 engine: str = "candidate", batch_size: int = 16) -> ParityReport:
    """Compare the candidate's calibrated probabilities and decisions with the fp32 reference's, image by image."""
    started = time.perf_counter()
    batches, skipped = _prepared_batches(reference, images, batch_size)
    if not batches:
        raise DefectOpsError(f"parity check of {engine}: none of the {len(images)} images could be read; "
                             "give real images from the line (e.g. the tracked dataset)")
    ref_probs, cand_probs = [], []
    for index, batch in enumerate(batches):
        ref_logits, _ = reference.forward(batch)
        cand_logits, _ = candidate.forward(batch)
        ref_probs.append(reference.probabilities(ref_logits))
        cand_probs.append(reference.probabilities(cand_logits))
        if index == 0:  # the engine may take another path for a single image: compare that too
            singles = np.concatenate([candidate.forward(batch[i:i + 1])[0] for i in range(len(batch))])
            ref_probs.append(ref_probs[0])
            cand_probs.append(reference.probabilities(singles))
    ref, cand = np.concatenate(ref_probs), np.concatenate(cand_probs)
    top1 = float((ref.argmax(axis=1) == cand.argmax(axis=1)).mean())
    ref_decisions = decide(ref, reference.classes, reference.normal_class, reference.threshold)
    cand_decisions = decide(cand, reference.classes, reference.normal_class, reference.threshold)
    diff = np.abs(ref - cand)
    max_diff = float(diff.max()) if np.isfinite(diff).all() else float("inf")
    problems = []
    if top1 < bounds.min_top1_agreement:
        problems.append(f"top-1 agreement {top1:.4f} < {bounds.min_top1_agreement}")
    decisions = float((ref_decisions == cand_decisions).mean())
    if decisions < bounds.min_decision_agreement:
        problems.append(f"decision agreement {decisions:.4f} < {bounds.min_decision_agreement} (at threshold "
                        f"{reference.threshold:.4f})")
    if not max_diff <= bounds.max_prob_diff:
        problems.append(f"max probability difference {max_diff:.4f} > {bounds.max_prob_diff}")
    passed = not problems
    reason = (f"top-1 agreement {top1:.4f} >= {bounds.min_top1_agreement}, decision agreement {decisions:.4f} >= "
              f"{bounds.min_decision_agreement}, max probability difference "
              f"{max_diff:.4f} <= {bounds.max_prob_diff} on {sum(len(b) for b in batches)} images") if passed \
        else "; ".join(problems)
    report = ParityReport(
        engine=engine, passed=passed, n_images=sum(len(b) for b in batches), top1_agreement=top1,
        decision_agreement=decisions, max_prob_diff=max_diff,
        mean_prob_diff=float(diff.mean()), min_top1_agreement=bounds.min_top1_agreement,
        max_prob_diff_bound=bounds.max_prob_diff, reason=reason, seconds=round(time.perf_counter() - started, 2),
        skipped_images=skipped, precision=str(getattr(candidate, "precision", "")),
        min_decision_agreement=bounds.min_decision_agreement)
    log.info("parity of %s vs fp32: %s (%s)", engine, "PASSED" if passed else "FAILED", reason)
    return report


def parity_images(settings: Settings, count: int, seed: int = PARITY_SEED) -> list[Path]:
    """A fixed, seeded sample of real images: the tracked dataset (data/), else the demo data folder."""
    from components.data.layout import discover
    from components.errors import SourceError

    roots = [settings.data_dir]
    if settings.demo_data and Path(settings.demo_data).is_dir():
        roots.append(Path(settings.demo_data))
    for root in roots:
        if not root.is_dir():
            continue
        try:
            files = sorted(item.path for item in discover(root)[1])
        except SourceError as exc:
            log.debug("parity images: %s not usable (%s)", root, exc)
            continue
        if files:
            return sorted(random.Random(seed).sample(files, min(count, len(files))))
    return []


def choose_engine(reference: Predictor, requested: str, images: Sequence[ImageInput], bounds: ParityParams,
                  cache_dir: Path) -> tuple[Predictor, EngineChoice]:
    """The fast path when it passes parity against `reference` (fp32) on `images`, else the fp32 reference."""
    device = str(reference.device)
    wanted = resolve_fast_path(requested, device)
    if wanted == REFERENCE:
        return reference, EngineChoice(REFERENCE, requested, device, reason="fp32 requested (serve.fast_path)")
    if not images:
        return reference, EngineChoice(REFERENCE, requested, device, reason=f"no real images to check {wanted} "
                                       "against fp32; served fp32 (import data or set DEFECTOPS_DEMO_DATA)")
    try:
        candidate = build_engine(reference, wanted, cache_dir)
        report = check_parity(reference, candidate, images, bounds, engine=wanted)
    except DefectOpsError as exc:
        log.warning("fast path %s unusable: %s; serving fp32", wanted, exc)
        return reference, EngineChoice(REFERENCE, requested, device, reason=f"{wanted} unusable: {exc}")
    if not report.passed:
        log.warning("fast path %s failed parity (%s); serving fp32", wanted, report.reason)
        return reference, EngineChoice(REFERENCE, requested, device, report.as_dict(),
                                       f"{wanted} failed parity ({report.reason}); served fp32")
    return candidate, EngineChoice(wanted, requested, device, report.as_dict(), f"{wanted} passed parity")
