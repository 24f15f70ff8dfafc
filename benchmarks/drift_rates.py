"""Drift detection rate and false-alarm rate of the drift check, on repeated production windows.

The reference is built exactly as `defectops drift` builds it (train+val image statistics, the model's answers
on val). Production windows are sampled from the held-out test images: clean ones as they are, shifted ones
under a camera change (lighting, focus, noise: components.drift.simulate), each turned into production-log records
by the same model, and compared with `components.drift.detect.compare` under the `drift` params.
Every embedding drift method is also scored on the same windows, to choose `drift.embedding`.

    .venv/bin/python benchmarks/drift_rates.py --model champion            # the tracked dataset
    .venv/bin/python benchmarks/drift_rates.py --model path/to/model.pt --data ../shared/datasets/magnetic-tile
    .venv/bin/python benchmarks/drift_rates.py --model RUN/seed-7/model.pt --data ... --split-seed 7   # another split

`--line-normal-share 0.95` draws windows as a mostly-normal line would send them (the test split has the
dataset's mix). `--prediction-reference production` compares the answers with a production baseline instead of
val's, as `defectops drift` does once a model has served its first weeks: the test images' capture groups are
halved (seeded); the baseline is the clean records of one half, spot after spot (spots drawn with the same line
mix); the windows come from the other half only, so no window holds a baseline spot. The embeddings are always
compared with val's (`drift.embedding.classes` says which).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHIFTS: dict[str, tuple[str, dict[str, float]]] = {  # camera changes: components.drift.simulate function, args
    "darker": ("lighting_change", {"gain": 0.7}),
    "brighter": ("lighting_change", {"gain": 1.3}),
    "low-contrast": ("lighting_change", {"contrast": 0.6}),
    "dim-and-flat": ("lighting_change", {"gain": 0.8, "contrast": 0.8}),
    "mild-darker": ("lighting_change", {"gain": 0.85}),
    "lamp-offset": ("lighting_change", {"offset": 30.0}),
    "blurred": ("focus_loss", {"sigma": 1.5}),
    "noisy": ("sensor_noise", {"std": 8.0}),
}
EMBEDDING_METHODS: dict[str, dict[str, Any]] = {  # bootstrap nulls over capture groups unless "image"
    "model(0.55)": {"method": "model"},
    "model(image bootstrap 0.95)": {"method": "model", "bootstrap": True, "bootstrap_unit": "image"},
    "model(group bootstrap 0.95)": {"method": "model", "bootstrap": True},
    "distance(0.2)": {"method": "distance"},
    "distance(image bootstrap 0.95)": {"method": "distance", "bootstrap": True, "bootstrap_unit": "image"},
    "distance(group bootstrap 0.95)": {"method": "distance", "bootstrap": True},
    "distance(group bootstrap 0.99)": {"method": "distance", "bootstrap": True, "quantile_probability": 0.99},
    "ratio(0.2)": {"method": "ratio"},
}


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="champion", help="champion, a version, models:/ URI or model.pt path")
    parser.add_argument("--data", default=None, help="labelled folder (e.g. the Magnetic Tile images); default: "
                        "the tracked dataset")
    parser.add_argument("--windows", type=int, default=20, help="windows per variant (clean and each shift)")
    parser.add_argument("--window-size", default="150", help="production records per window; a comma list runs "
                        "each size on the same reference and predictions")
    parser.add_argument("--shifts", default=",".join(SHIFTS), help=f"comma list of {list(SHIFTS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split-seed", type=int, default=None, help="make the grouped split with this seed, as "
                        "benchmarks/model_quality.py --seeds does (for a model trained on that split); default: "
                        "the committed split")
    parser.add_argument("--num-method", default=None, help="override drift.num_method")
    parser.add_argument("--num-threshold", type=float, default=None, help="override drift.num_threshold")
    parser.add_argument("--cat-threshold", type=float, default=None, help="override drift.cat_threshold")
    parser.add_argument("--drift-share", type=float, default=None, help="override drift.drift_share")
    parser.add_argument("--no-column-alarm", action="store_true", help="drift.column_alarm_factor off")
    parser.add_argument("--embedding", choices=["on", "off"], default=None,
                        help="override drift.embedding.enabled")
    parser.add_argument("--no-alternatives", action="store_true", help="skip scoring every embedding method")
    parser.add_argument("--line-normal-share", type=float, default=None, help="draw windows (and the baseline) "
                        "with this share of normal images; default: the test split's own mix")
    parser.add_argument("--prediction-reference", choices=["validation", "production"], default="validation",
                        help="what the answers are compared with (see the module docstring)")
    parser.add_argument("--baseline-size", type=int, default=500, help="production: records in the baseline")
    parser.add_argument("--json", type=Path, default=None, help="write all figures here")
    return parser.parse_args()


def _drift_params(args: argparse.Namespace, params: Any) -> Any:
    from components.drift.params import drift_params

    drift = drift_params(params)
    overrides: dict[str, Any] = {"num_method": args.num_method, "num_threshold": args.num_threshold,
                                 "cat_threshold": args.cat_threshold, "drift_share": args.drift_share}
    if args.no_column_alarm:
        drift = drift.model_copy(update={"column_alarm_factor": None})
    if args.embedding:
        overrides["embedding"] = drift.embedding.model_copy(update={"enabled": args.embedding == "on"})
    return drift.model_copy(update={k: v for k, v in overrides.items() if v is not None})


def _pool_records(predictor: Any, files: list[str], shifts: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Production-log records of the pool images, clean and under each camera change (one pass each)."""
    from datetime import UTC, datetime

    from components.data.images import decode
    from components.drift import simulate

    rgbs = [decode(Path(f)).rgb for f in files]
    stamps = [datetime(2025, 1, 1, tzinfo=UTC)] * len(rgbs)
    pools = {"clean": simulate.log_records(predictor, rgbs, stamps)}
    for name in shifts:
        function, options = SHIFTS[name]
        change = getattr(simulate, function)
        pools[name] = simulate.log_records(predictor, [change(rgb, **options) for rgb in rgbs], stamps)
    return pools


def main() -> None:
    args = _arguments()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    from components.config import get_settings, load_params
    from components.data.tracked import manifest_of, tracked_manifest
    from components.drift.params import EmbeddingDriftParams
    from components.drift.reference import build_reference, embedding_columns, model_version_of
    from components.registry.registry import load_predictor

    settings, params = get_settings(), load_params()
    drift = _drift_params(args, params)
    shifts = [s for s in args.shifts.split(",") if s]
    began = time.perf_counter()
    predictor = load_predictor(settings, args.model)
    manifest = manifest_of(Path(args.data), settings, params) if args.data else tracked_manifest(settings, params)
    if args.split_seed is not None and args.split_seed != params.base.seed:
        from components.data.split import assign_splits
        manifest = manifest.assign(split=assign_splits(manifest, params.data.split, args.split_seed, None))
    reference = build_reference(manifest, predictor, drift)
    pool = manifest[(manifest["split"] == "test") & (manifest["readable"] == True)].reset_index(drop=True)
    pools = _pool_records(predictor, pool["file"].astype(str).tolist(), shifts)
    setup_s = time.perf_counter() - began
    version = model_version_of(predictor)
    weights = _line_weights(pool, params.profile.normal_class, args.line_normal_share)
    drawn_from = np.arange(len(pool))
    if args.prediction_reference == "production":
        reference, drawn_from = _with_production_baseline(reference, pool, pools["clean"], weights, args)
    predicted = reference[reference["predicted_class"].notna()].dropna(subset=embedding_columns())
    predicted = predicted.reset_index(drop=True)  # val's answers: a baseline's rows hold no embeddings
    ref_emb, ref_groups = predicted[embedding_columns()], predicted["group"]
    alternatives = {} if args.no_alternatives else {
        name: drift.model_copy(update={"embedding": EmbeddingDriftParams(**{
            **drift.embedding.model_dump(exclude={"method", "threshold", "bootstrap", "quantile_probability",
                                                  "bootstrap_unit"}),
            **spec})}) for name, spec in EMBEDDING_METHODS.items()}
    print(f"model {version}; reference {len(reference)} rows ({int(reference['predicted_class'].notna().sum())} "
          f"answers from {args.prediction_reference}); pool {len(pool)} test images, windows from {len(drawn_from)} "
          f"(normal share {'as the split' if weights is None else args.line_normal_share}); {args.windows} windows "
          f"per variant; setup {setup_s:.0f} s")
    print(f"params: num {drift.num_method} >= {drift.num_threshold}, cat {drift.cat_method} >= {drift.cat_threshold}, "
          f"per column {drift.per_column_threshold or '-'}, drift_share {drift.drift_share}, "
          f"column alarm {drift.column_alarm_factor}x, "
          f"embedding {drift.embedding.model_dump(exclude={'enabled'})}")
    everything = {}
    for size in [int(v) for v in str(args.window_size).split(",")]:
        results = _run_windows(pools, reference, (ref_emb, ref_groups), drift, alternatives, version, size, args,
                               drawn_from, weights, params.profile.normal_class)
        _print(results, shifts, size, drift, args.windows)
        everything[size] = {v: {**o, "columns": dict(o["columns"]), "alternatives": dict(o["alternatives"])}
                            for v, o in results.items()}
    if args.json:
        args.json.write_text(json.dumps(everything, indent=2, default=float))


def _line_weights(pool: Any, normal_class: str, normal_share: float | None) -> np.ndarray | None:
    """Per-image draw weights giving `normal_share` normal images (None: the pool's own mix)."""
    if normal_share is None:
        return None
    if not 0 < normal_share < 1:
        raise SystemExit(f"--line-normal-share {normal_share} must lie strictly between 0 and 1")
    normal = (pool["label"] == normal_class).to_numpy()
    if normal.all() or not normal.any():
        raise SystemExit("--line-normal-share needs both normal and defective test images")
    return np.where(normal, normal_share / normal.sum(), (1 - normal_share) / (~normal).sum())


def _with_production_baseline(reference: Any, pool: Any, clean: list[dict[str, Any]], weights: np.ndarray | None,
                              args: argparse.Namespace) -> tuple[Any, np.ndarray]:
    """The reference with a production baseline's answers (the clean records of half the test capture groups,
    spot after spot, spots drawn with the line's mix), and the indices of the other half, for the windows."""
    from components.drift.baseline import with_baseline
    from components.drift.current import current_frame

    rng = np.random.default_rng(args.seed + 1)
    groups = pool["group"].astype(str).to_numpy()
    names = np.unique(groups)
    baseline_groups = rng.choice(names, len(names) // 2, replace=False)
    members = [np.flatnonzero(groups == g) for g in baseline_groups]
    spot_weight = np.array([1.0 if weights is None else weights[m].sum() for m in members])
    picked: list[int] = []
    while len(picked) < args.baseline_size:  # whole spots, one after another
        picked.extend(members[rng.choice(len(members), p=spot_weight / spot_weight.sum())].tolist())
    window_idx = np.flatnonzero(~np.isin(groups, baseline_groups))
    return with_baseline(reference, current_frame([clean[i] for i in picked])), window_idx


def _run_windows(pools: dict[str, list[dict[str, Any]]], reference: Any, embeddings: tuple[Any, Any], drift: Any,
                 alternatives: dict[str, Any], version: str, size: int, args: argparse.Namespace,
                 drawn_from: np.ndarray, weights: np.ndarray | None, normal_class: str) -> dict[str, Any]:
    """Compare `args.windows` random windows of `size` records of every variant with the reference.

    `embeddings` are the reference's embeddings and their capture groups, for the alternative embedding methods;
    windows draw from the pool images `drawn_from`, with `weights` (None: uniformly).
    """
    from components.drift.current import current_frame
    from components.drift.detect import compare, embedding_drift
    from components.drift.reference import embedding_columns

    ref_emb, ref_groups = embeddings

    rng = np.random.default_rng(args.seed)
    p = None if weights is None else weights[drawn_from] / weights[drawn_from].sum()
    results: dict[str, Any] = {}
    for variant, records in pools.items():
        outcome: dict[str, Any] = {"overall": 0, "dataset": 0, "alarm": 0, "embedding": 0, "columns": Counter(),
                                   "alternatives": Counter(), "drift_share": [], "embedding_score": [],
                                   "scores": {}, "seconds": [], "windows": []}
        for _ in range(args.windows):
            picked = rng.choice(drawn_from, size, replace=weights is not None or size > len(drawn_from), p=p)
            frame = current_frame([records[i] for i in picked])
            started = time.perf_counter()
            summary = compare(reference, frame, drift, version, normal_class).summary
            outcome["seconds"].append(time.perf_counter() - started)
            outcome["overall"] += summary["drift"]
            outcome["dataset"] += summary["dataset_drift"]
            outcome["alarm"] += bool(summary["column_alarm"])
            emb = summary["embedding_drift"] or {}
            outcome["embedding"] += bool(emb.get("drifted"))
            outcome["columns"].update(summary["drifted_columns"])
            outcome["drift_share"].append(summary["drift_share"])
            outcome["embedding_score"].append(emb.get("score", float("nan")))
            for column, verdict in summary["columns"].items():
                outcome["scores"].setdefault(column, []).append(verdict["score"])
            outcome["windows"].append({"columns": summary["columns"],
                                       "embedding_drifted": bool(emb.get("drifted"))})
            cur_emb = frame[embedding_columns()].dropna()
            for name, alternative in alternatives.items():
                outcome["alternatives"][name] += embedding_drift(ref_emb, cur_emb, alternative, ref_groups)["drifted"]
        results[variant] = outcome
    return results


def _sweep(results: dict[str, Any], shifts: list[str], drift: Any, n: int) -> None:
    """What-if: the overall rates under other numerical thresholds and drift shares, from the same scores (the
    column alarm scaled with the threshold)."""
    from components.drift.detect import column_alarms

    print(f"what-if (false alarms | detection per shift: {', '.join(shifts)}), same embedding verdicts:")
    for threshold in (0.15, 0.2, 0.25, 0.3):
        for share in (0.3, 0.45):
            def drifted(window: dict[str, Any], threshold: float = threshold, share: float = share) -> bool:
                columns = {c: {**v, "threshold": drift.per_column_threshold.get(
                    c, drift.cat_threshold if c == "predicted_class" else threshold)}
                    for c, v in window["columns"].items()}
                hits = sum(v["score"] >= v["threshold"] for v in columns.values())
                return (hits / max(1, len(columns)) >= share or bool(column_alarms(columns, drift.column_alarm_factor))
                        or window["embedding_drifted"])

            rates = [sum(map(drifted, results[v]["windows"])) / n for v in ["clean", *shifts]]
            print(f"  num_threshold {threshold:.2f} drift_share {share:.2f}: {rates[0]:.2f} | "
                  + " ".join(f"{r:.2f}" for r in rates[1:]))


def _print(results: dict[str, Any], shifts: list[str], size: int, drift: Any, n: int) -> None:
    seconds = np.mean([s for o in results.values() for s in o["seconds"]])
    print(f"\n=== windows of {size} production records ({n} per variant; compare {seconds:.2f} s/window)")
    print(f"{'variant':<14}{'overall':>9}{'dataset':>9}{'alarm':>7}{'embed':>7}{'share':>7}{'emb score':>11}  "
          "drifted columns")
    for variant, o in results.items():
        columns = ", ".join(f"{c} {k}" for c, k in o["columns"].most_common())
        print(f"{variant:<14}{o['overall'] / n:>9.2f}{o['dataset'] / n:>9.2f}{o['alarm'] / n:>7.2f}"
              f"{o['embedding'] / n:>7.2f}"
              f"{np.mean(o['drift_share']):>7.2f}{np.nanmean(o['embedding_score']):>11.3f}  {columns or '-'}")
    columns = list(results["clean"]["scores"])
    print("mean (max) drift score per column")
    print(f"{'variant':<14}" + "".join(f"{c[:15]:>16}" for c in columns))
    for variant, o in results.items():
        print(f"{variant:<14}" + "".join(f"{np.mean(o['scores'].get(c, [np.nan])):>9.3f} "
                                        f"({np.max(o['scores'].get(c, [np.nan])):.2f})" for c in columns))
    clean, shifted = results["clean"], [results[s] for s in shifts]
    print(f"FALSE-ALARM RATE (clean windows): {clean['overall'] / n:.2f}   DETECTION RATE: " + ", ".join(
        f"{name} {results[name]['overall'] / n:.2f}" for name in shifts))
    _sweep(results, shifts, drift, n)
    if not clean["alternatives"]:
        return
    print(f"embedding methods alone (false alarms on clean | detection per shift: {', '.join(shifts)}):")
    for name in EMBEDDING_METHODS:
        rates = " ".join(f"{o['alternatives'][name] / n:.2f}" for o in shifted)
        print(f"  {name:<26}{clean['alternatives'][name] / n:>5.2f} | {rates}")


if __name__ == "__main__":
    main()
