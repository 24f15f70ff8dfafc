"""Variants of a training profile side by side, each on several grouped splits: test macro-F1 per variant.

Run on demand (never a test; every cell is a whole training run), best on a GPU machine:

    .venv/bin/python benchmarks/quality_sweep.py VARIANTS.yaml [--parallel N] [--deadline-minutes M] [--out DIR]

VARIANTS.yaml names the profile every variant starts from, the grouped splits, and each variant's params.yaml
overrides (dotted keys, as `model_quality.py --set`):

    profile: cpu
    seeds: [42, 7, 3]
    variants:
      base: {}
      epochs-150: {train.profiles.cpu.epochs: 150}
      320px: {train.profiles.cpu.image_size: 320, train.profiles.cpu.epochs: 150}

Each (split, variant) is one `model_quality.py` run in its own process and state root, N at a time: on a GPU
they share it (16 cores ran 6 ResNet-18 runs side by side at about 300 training images/s each); on 2 CPU cores
run one. Runs start split by split, so a sweep cut short still has every variant on the first split. With a
deadline no run starts after it, and each run gets `max_minutes` so it ends by then; a run stopped that way
says so, since its learning rate did not anneal. Prints per variant the test macro-F1 of each split (val in
brackets), their mean, the number of splits behind the mean, and the fit on its own training split; a mean
over fewer splits than the others (a run failed or was skipped) or including a run stopped by the deadline is
marked, since it does not compare with a full row. OUT/sweep.json holds every figure. One run per cell: between
runs of one setting the test figure moves by about 0.1 (docs/model-quality.md), so read means over several
splits, not one cell.
Exit status: non-zero, with one line after the table, when a run failed or no run gave a figure (a run skipped by
the deadline is not a failure). The sweep has no target: its figures are for comparing the variants.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
MARGIN_MINUTES = 1.5  # a run's start-up, calibration and scoring around its training


def _run(job: dict, profile: str, deadline: float | None, out: Path) -> dict:
    name, seed, overrides = job["variant"], job["seed"], dict(job["overrides"])
    folder = out / f"{name}-split{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    if deadline is not None:
        left = (deadline - time.time()) / 60 - MARGIN_MINUTES
        if left <= 0:
            return {**job, "skipped": "deadline"}
        overrides.setdefault(f"train.profiles.{profile}.max_minutes", round(left, 2))
    command = [sys.executable, str(HERE / "model_quality.py"), "--profile", profile, "--seeds", str(seed),
               "--out", str(folder)]
    for key, value in overrides.items():
        command += ["--set", f"{key}={json.dumps(value)}"]
    env = {**os.environ, "DEFECTOPS_HOME": str(folder / "home"), "PYTHONUNBUFFERED": "1"}
    started = time.time()
    with (folder / "log.txt").open("w") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, check=False).returncode
    results = folder / "results.json"
    if code or not results.is_file():
        return {**job, "failed": f"exit {code}; see {folder / 'log.txt'}"}
    try:
        r = json.loads(results.read_text())[0]
        cell = {**job, "test": r["report"]["macro_f1"], "val": r["val_macro_f1"], "fit": r["train_fit"]["macro_f1"],
                "epochs": r["epochs"], "stopped": r["stopped"], "minutes": r["train_minutes"], "report": r["report"]}
    except (ValueError, LookupError, TypeError) as exc:  # one unreadable result fails its cell, not the sweep
        return {**job, "failed": f"unreadable {results}: {type(exc).__name__}: {exc}"}
    print(f"{time.strftime('%X')} {name} split {seed}: test {cell['test']:.3f} val {cell['val']:.3f} "
          f"({time.time() - started:.0f} s)", flush=True)
    return cell


def _deadline_stopped(cell: dict) -> bool:
    return str(cell.get("stopped", "")).startswith("time budget")


def _table(cells: list[dict], variants: list[str], seeds: list[int]) -> list[str]:
    lines = ["variant".ljust(24) + "".join(f"split {s}".rjust(16) for s in seeds)
             + f"   {'mean test':>10}  {'splits':>6}  {'mean fit':>8}"]
    for name in variants:
        row = {c["seed"]: c for c in cells if c["variant"] == name}
        done = [c for c in row.values() if "test" in c]
        text = []
        for s in seeds:
            c = row.get(s, {})
            mark = "*" if _deadline_stopped(c) else "e" if str(c.get("stopped", "")).startswith("early stop") else " "
            text.append(f"{c['test']:.3f} ({c['val']:.2f}){mark}" if "test" in c else c.get("failed", c.get(
                "skipped", "-"))[:14])
        mean = f"{sum(c['test'] for c in done) / len(done):.3f}" if done else "-"
        mean += "*" if any(_deadline_stopped(c) for c in done) else " "
        splits = f"{len(done)}/{len(seeds)}" + ("!" if len(done) < len(seeds) else " ")
        fit = f"{sum(c['fit'] for c in done) / len(done):.3f}" if done else "-"
        lines.append(name.ljust(24) + "".join(t.rjust(16) for t in text) + f"   {mean:>10}  {splits:>6}  {fit:>8}")
    lines.append("test macro-F1 (val); * = stopped by the deadline before its schedule ended (on a mean: it includes "
                 "such a run), e = early stop; splits = runs behind the mean, ! = splits missing (failed or skipped): "
                 "such a mean does not compare with a full row")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", type=Path, help="YAML file: profile, seeds, variants (see above)")
    parser.add_argument("--parallel", type=int, default=1, help="runs side by side (default 1)")
    parser.add_argument("--deadline-minutes", type=float, default=None, help="start no run after this")
    parser.add_argument("--out", type=Path, default=None, help="folder for the runs and sweep.json")
    args = parser.parse_args()
    spec = yaml.safe_load(args.variants.read_text())
    profile, seeds = spec.get("profile", "cpu"), [int(s) for s in spec.get("seeds", [42, 7])]
    variants = {str(k): v or {} for k, v in spec["variants"].items()}
    out = args.out or Path(tempfile.mkdtemp(prefix="quality-sweep-"))
    deadline = time.time() + args.deadline_minutes * 60 if args.deadline_minutes else None
    jobs = [{"variant": name, "seed": seed, "overrides": overrides}
            for seed in seeds for name, overrides in variants.items()]
    print(f"{len(jobs)} runs of profile {profile}, {args.parallel} at a time; runs in {out}", flush=True)
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        cells = list(pool.map(lambda job: _run(job, profile, deadline, out), jobs))
    (out / "sweep.json").write_text(json.dumps({"profile": profile, "cells": cells}, indent=2, default=str) + "\n")
    print("\n".join(["", *_table(cells, list(variants), seeds), f"everything in {out / 'sweep.json'}"]))
    failed = [c for c in cells if "failed" in c]
    if failed:
        raise SystemExit(f"quality_sweep FAILED: {len(failed)} of {len(cells)} runs failed, e.g. {failed[0]['variant']} "
                         f"split {failed[0]['seed']}: {failed[0]['failed']}")
    if not any("test" in c for c in cells):
        raise SystemExit(f"quality_sweep FAILED: no run gave a figure ({len(cells)} skipped by the deadline)")


if __name__ == "__main__":
    main()
