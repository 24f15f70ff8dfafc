"""Training throughput: our loop against a bare PyTorch loop on the same model, batch, precision and images.

Run on demand (never a test):

    .venv/bin/python benchmarks/train_throughput.py [--profile cpu] [--images 256] [--repeats 3] [--data DIR]

Images: the 'train' split of the Magnetic Tile manifest (--data, else DEFECTOPS_DEMO_DATA, else
../shared/datasets/magnetic-tile), the first --images of them, profile and augmentation from params.yaml.
Measured in one process, alternating, each --repeats times (the median is reported; each round starts with the
next loop, so none always runs first):
- ours:          `Trainer.train_epoch` (progress bar, finite-loss check, scheduler, scaler, EMA if configured,
                 per-epoch reseeding) over the profile's DataLoader (decode cache, augmentation, workers);
- bare+loader:   a plain `for x, y in loader: forward/backward/step` over the same DataLoader, with our loop's
                 optimiser choice (fused AdamW on CUDA), grad scaler (fp16 on CUDA) and per-step `loss.item()`
                 (the sync our loop makes each step), so the two compare like for like on a GPU too;
- bare+tensors:  the same plain loop over batches already in memory (the compute-only ceiling).
Overhead of our loop = 1 - ours / bare+loader (target < 10%). Data loading is the bottleneck when the loop
waits on the loader for a large share of the epoch, or when bare+loader is well below bare+tensors.
Every row also gives CPU seconds per 100 images of this process and its workers, which stay meaningful
when other jobs share the cores and the wall-clock rates drop.
A missed overhead target is a figure, not an error: printed as NOT MET, the exit status stays 0. The exit status
is non-zero, with one line, when a loop processed no images or a rate came out zero or NaN.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

log = logging.getLogger("benchmarks.train_throughput")
TARGET_OVERHEAD = 0.10


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _measure(fn: Callable[[], int]) -> tuple[float, float, float]:
    """(images/s, wall seconds, CPU seconds) of one call that returns the number of images it processed."""
    cpu, start = _cpu_seconds(), time.perf_counter()
    images = fn()
    wall = time.perf_counter() - start
    return images / wall, wall, _cpu_seconds() - cpu


def main() -> None:
    """Measure and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default=None, help="train.profiles entry (default: auto)")
    parser.add_argument("--images", type=int, default=256, help="training images per measured epoch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", type=Path, default=None, help="dataset folder (default: Magnetic Tile)")
    parser.add_argument(
        "--threads", type=int, default=0, help="compute threads for both loops (0: free cores)"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

    import torch

    from components.config import get_settings, load_params
    from components.data.demo import magnetic_tile_folder
    from components.data.tracked import manifest_of
    from components.training.cores import free_cores_threads, others_runnable_now
    from components.training.loop import (
        Trainer,
        autocast,
        mask_loss,
        resolve_precision,
        seed_everything,
    )
    from components.training.params import augment_params, train_params
    from components.training.train import (
        build_loaders,
        choose_profile,
        loop_config,
        profile_loss,
        profile_model,
    )

    settings = get_settings()
    params = load_params(ROOT / "params.yaml")
    tp, aug = train_params(params), augment_params(params)
    name, prof = choose_profile(tp, args.profile)
    data = args.data or magnetic_tile_folder(settings)
    manifest = manifest_of(data, settings, params)
    train_rows = manifest[manifest["split"] == "train"].head(args.images).reset_index(drop=True)
    val_rows = manifest[manifest["split"] == "val"].head(8).reset_index(drop=True)
    classes = params.profile.classes
    seed = params.base.seed
    seed_everything(seed, tp.deterministic)
    loader, val_loader, targets = build_loaders(
        train_rows,
        val_rows,
        classes,
        prof,
        aug,
        seed,
        params.data.max_image_pixels,
        params.profile.normal_class,
    )
    threads = args.threads or prof.threads or free_cores_threads(others_runnable_now())
    torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_precision(prof.precision, device)
    memory_format = torch.channels_last if prof.channels_last else torch.contiguous_format

    def fresh_model() -> torch.nn.Module:
        torch.manual_seed(seed)
        model, _ = profile_model(prof, len(classes), None)
        return model.to(device, memory_format=memory_format).train()

    counts = [targets.count(i) for i in range(len(classes))]
    # the pipeline's own settings, loss included; only the epoch budget, threads and progress bar differ, and
    # mixup, cutmix, SAM, the contrastive loss and distillation are off: they change the training algorithm (SAM:
    # two passes a step; a teacher: one more forward pass), not the pipeline's cost
    normal = classes.index(params.profile.normal_class)
    cfg = loop_config(prof, seed, tp.deterministic, normal, epochs=100, min_epochs=0, max_minutes=None, threads=threads,
                      progress=True, mixup_alpha=0.0, cutmix_alpha=0.0, sam_rho=0.0, supcon_weight=0.0)
    if prof.mixup_alpha or prof.cutmix_alpha or prof.sam_rho or prof.supcon_weight or prof.distill_from:
        print(f"profile {name} has mixup_alpha {prof.mixup_alpha:g}, cutmix_alpha {prof.cutmix_alpha:g}, sam_rho "
              f"{prof.sam_rho:g}, supcon_weight {prof.supcon_weight:g}, distill_from {prof.distill_from or '-'}: "
              "measured without them (SAM doubles the passes of a step, a teacher adds a forward pass), like the "
              "bare loop")
    trainer = Trainer(fresh_model(), loader, val_loader, profile_loss(prof, counts), cfg, device, None)
    waits: list[float] = []

    def ours() -> int:
        epoch = trainer.train_epoch()
        trainer.epoch += 1
        waits.append(epoch.data_wait_s)
        return len(loader) * prof.batch_size

    bare_model = fresh_model()
    # the optimiser kind and the scaler as our Trainer makes them (fused AdamW and a live scaler only on CUDA)
    bare_opt = torch.optim.AdamW(bare_model.parameters(), lr=prof.lr, weight_decay=prof.weight_decay,
                                 fused=device.type == "cuda" or None)
    bare_scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16" and device.type == "cuda")
    bare_loss = profile_loss(prof, counts).to(device)

    def bare_step(batch: list[torch.Tensor]) -> None:
        x = batch[0].to(device, non_blocking=True).contiguous(memory_format=memory_format)
        y = batch[1].to(device, non_blocking=True)
        with autocast(device, precision):
            out, defect = bare_model.forward_train(x)
        loss = bare_loss(out.float(), y)
        if defect is not None and len(batch) == 4:  # the same loss on the masks as ours
            loss = loss + mask_loss(defect, batch[2].to(device), batch[3].to(device), y, cfg)
        bare_opt.zero_grad(set_to_none=True)
        bare_scaler.scale(loss).backward()
        bare_scaler.step(bare_opt)
        bare_scaler.update()
        loss.item()  # our loop reads the loss every step (a device sync on a GPU)

    def bare_loader() -> int:
        n = 0
        for batch in loader:
            bare_step(batch)
            n += len(batch[1])
        if device.type == "cuda":
            torch.cuda.synchronize()
        return n

    batches = [[t.clone() if isinstance(t, torch.Tensor) else t for t in batch] for batch in loader]

    def bare_tensors() -> int:
        for batch in batches:
            bare_step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return sum(len(batch[1]) for batch in batches)

    ours()
    bare_tensors()  # warm-up: oneDNN primitives, allocator, loader workers
    waits.clear()
    runs: dict[str, list[tuple[float, float, float]]] = {"ours": [], "bare+loader": [], "bare+tensors": []}
    loops = [("ours", ours), ("bare+loader", bare_loader), ("bare+tensors", bare_tensors)]
    for round_index in range(args.repeats):
        first = round_index % len(loops)  # each round starts with the next loop: none always runs first
        for label, loop in loops[first:] + loops[:first]:
            runs[label].append(_measure(loop))

    images = len(loader) * prof.batch_size
    print(
        f"\nprofile {name}: {prof.arch} {prof.image_size}px batch {prof.batch_size} {precision} "
        f"channels_last={prof.channels_last} workers={prof.num_workers} device={device} "
        f"threads={torch.get_num_threads()} cores={len(os.sched_getaffinity(0))}; {images} images/epoch, "
        f"median of {args.repeats}; load average {os.getloadavg()[0]:.1f}"
    )
    print(f"{'loop':<14}{'images/s':>10}{'wall s':>9}{'CPU s/100 img':>15}")
    rate = {}
    for label, values in runs.items():
        rate[label] = statistics.median(v[0] for v in values)
        wall = statistics.median(v[1] for v in values)
        cpu = statistics.median(v[2] for v in values)
        print(f"{label:<14}{rate[label]:>10.1f}{wall:>9.2f}{100 * cpu / images:>15.2f}")
    broken = [f"{label} {value}" for label, value in rate.items() if not math.isfinite(value) or value <= 0]
    if broken:
        raise SystemExit(f"train_throughput FAILED: images/s of {', '.join(broken)}; the loader gave no batches?")
    overhead = 1 - rate["ours"] / rate["bare+loader"]
    wait_share = statistics.median(waits) / statistics.median(v[1] for v in runs["ours"])
    loader_cost = 1 - rate["bare+loader"] / rate["bare+tensors"]
    verdict = "MET" if overhead < TARGET_OVERHEAD else "NOT MET"
    print(
        f"\noverhead of our loop vs bare loop on the same loader: {100 * overhead:+.1f}% "
        f"(target < {100 * TARGET_OVERHEAD:.0f}%: {verdict})"
    )
    print(
        f"time our loop waits on the loader: {100 * wait_share:.1f}% of the epoch; "
        f"bare loop loses {100 * loader_cost:+.1f}% to loading vs in-memory batches"
    )
    bottleneck = wait_share > 0.10 or loader_cost > 0.15
    print(
        f"data loading is {'THE BOTTLENECK' if bottleneck else 'not the bottleneck'} "
        f"({prof.num_workers} loader worker(s), decode cache {'on' if prof.cache_images else 'off'})"
    )


if __name__ == "__main__":
    main()
