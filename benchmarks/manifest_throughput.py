"""Measured throughput of the image manifest and of a re-validation, on the real and on synthetic images.

Run on demand (never a test):

    .venv/bin/python benchmarks/manifest_throughput.py [--synth-count 20000] [--size 512] [--breakdown 300]

Prints one table. Figures:
- Magnetic Tile (DEFECTOPS_DEMO_DATA, else ../shared/datasets/magnetic-tile): images/s of a first manifest
  (`discover` + `build_manifest`, empty cache folder);
- synthetic set (generated once into --bench-dir and reused while complete): generation rate, first-manifest
  images/s with an empty cache, and the time to re-validate the unchanged set (manifest from the warm cache +
  `validate_manifest` with params.yaml's `synthetic` profile and `validate` rules), reported apart from the
  start-up cost of a fresh interpreter importing Great Expectations and the manifest module;
- with --breakdown N, the CPU time per image of each step of the manifest (read, sha256, decode, RGB
  conversion, statistics) on N images of the synthetic set, beside cheaper ways to get the same numbers.
Every row also gives CPU milliseconds per image (this process and its worker processes), which stay meaningful
when other jobs share the cores and the wall-clock rates drop. First manifests run in a freshly spawned
interpreter, as `defectops` would; the OS page cache is warm throughout.
Targets: >= 500 images/s for a first manifest, < 5 s to re-validate an unchanged dataset in a new process
(start-up + the work, the row that says so). A missed target is a figure, not an error: printed as NOT MET, the
exit status stays 0. The exit status is non-zero, with one line after the table, when the validation of the
unchanged set FAILED, a first manifest found no images or gave no rate, or the Magnetic Tile folder has no
images (pass --skip-magnetic to leave them out on purpose).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

log = logging.getLogger("benchmarks.manifest_throughput")

TARGET_RATE = 500.0  # images/s, first manifest
TARGET_REVALIDATE = 5.0  # seconds, unchanged dataset
IMPORT_CODE = "import great_expectations, components.validation.manifest"


@dataclass
class Row:
    """One measured figure of the table."""

    dataset: str
    measure: str
    images: int | None
    seconds: float | None
    cpu: float | None = None  # CPU seconds of this process and its reaped children over the same span
    note: str = ""

    @property
    def rate(self) -> float | None:
        return self.images / self.seconds if self.images and self.seconds else None

    @property
    def cpu_ms(self) -> float | None:
        return 1000 * self.cpu / self.images if self.images and self.cpu is not None else None


def cpu_seconds() -> float:
    """CPU time used so far by this process and its reaped children (subprocesses), and by the live children
    with theirs: the pool workers fork from multiprocessing's forkserver, which outlives them and reaps them."""
    import psutil

    t = os.times()
    total = t.user + t.system + t.children_user + t.children_system
    for child in psutil.Process().children():
        try:
            c = child.cpu_times()
            total += c.user + c.system + c.children_user + c.children_system
        except psutil.Error:  # ended meanwhile: counted once reaped
            continue
    return total


def timed(action: Callable[[], Any]) -> tuple[Any, float, float]:
    """Run `action`: its result, wall seconds and CPU seconds."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = action()
    return result, time.perf_counter() - wall, cpu_seconds() - cpu


def _params() -> Any:
    from components.config import load_params

    return load_params(ROOT / "params.yaml")


def _manifest(root: Path, cache_dir: Path, workers: int, profile_name: str) -> tuple[Any, Row, Row]:
    """The manifest of a folder, with one row for `discover` and one for `build_manifest`."""
    from components.data.layout import discover
    from components.validation.manifest import build_manifest

    params = _params()
    profile = params.datasets[profile_name]
    (_, items), found, found_cpu = timed(lambda: discover(root))
    frame, built, built_cpu = timed(lambda: build_manifest(
        items, profile.grouping, params.data.split, params.base.seed, params.data.max_image_pixels,
        cache_dir=cache_dir, workers=workers))
    return frame, Row("", "discover", len(items), found, found_cpu), \
        Row("", "build_manifest", len(items), built, built_cpu)


def _first_manifest(root: Path, cache_dir: Path, workers: int, profile_name: str) -> tuple[Row, Row, str]:
    """discover + build_manifest rows, and the most common image size and mode (run in a fresh interpreter)."""
    frame, found, built = _manifest(root, cache_dir, workers, profile_name)
    sizes = frame.groupby(["width", "height", "mode"]).size().sort_values(ascending=False)
    return found, built, " ".join(str(v) for v in sizes.index[0]) if len(sizes) else ""


def fresh_first_manifest(root: Path, cache_dir: Path, workers: int, profile_name: str) -> tuple[Row, Row, str]:
    """`_first_manifest` in a newly spawned interpreter, as a CLI command would run it.

    A long-running process skews the figure: glibc raises its mmap threshold after large frees (pandas, Parquet),
    the forked workers inherit that and page-fault far less per image than a fresh `defectops` process does.
    """
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(_first_manifest, root, cache_dir, workers, profile_name).result()


def _rate_verdict(images: int, seconds: float | None) -> str:
    """The first-manifest target, judged on `images` in `seconds`."""
    rate = images / seconds if images and seconds else 0.0
    return f"target >= {TARGET_RATE:.0f}/s: " + ("met" if rate >= TARGET_RATE else "NOT MET")


def has_magnetic_tile(data: Path) -> bool:
    """Whether `data` holds the Magnetic Tile classes (MT_Free at the top or one level down)."""
    return (data / "MT_Free").is_dir() or any(data.glob("*/MT_Free"))


def failures(rows: list[Row]) -> list[str]:
    """What makes the run's figures meaningless: a failed validation, a first manifest without images or rate."""
    problems = [f"{r.dataset} {r.measure}: {r.note}" for r in rows if r.note.startswith("FAILED")]
    problems += [f"{r.dataset} {r.measure}: {r.images or 0} images in {r.seconds} s, no rate" for r in rows
                 if "first manifest" in r.measure and not r.rate]
    return problems


def magnetic_tile(data: Path, bench_dir: Path, workers: int) -> list[Row]:
    """First manifest of the Magnetic Tile images, empty cache."""
    cache = Path(tempfile.mkdtemp(prefix="cache-mt-", dir=bench_dir))
    try:
        found, built, common = fresh_first_manifest(data, cache, workers, "magnetic-tile")
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    n = found.images or 0
    return [Row("magnetic-tile", "discover (list + classify files)", n, found.seconds, found.cpu),
            Row("magnetic-tile", "first manifest (build_manifest, empty cache)", n, built.seconds, built.cpu,
                f"most common {common}"),
            Row("magnetic-tile", "discover + first manifest", n, found.seconds + built.seconds,
                (found.cpu or 0) + (built.cpu or 0),
                _rate_verdict(n, found.seconds + built.seconds))]


def generation_rate(bench_dir: Path, workers: int, count: int = 2000, size: int = 128) -> Row:
    """Generator rate on a small throw-away set."""
    from components.data.synth import generate

    out = Path(tempfile.mkdtemp(prefix="gen-rate-", dir=bench_dir)) / "set"
    try:
        _, wall, cpu = timed(lambda: generate(out, count, size=size, seed=1, workers=workers))
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
    return Row(f"synthetic {size}px", "generate (render + encode + write)", count, wall, cpu)


def import_cost(repeats: int = 3) -> list[Row]:
    """Wall time of fresh interpreters importing great_expectations and the manifest module (median of runs).

    Measured as installed (bytecode from site-packages) and, where this shell sets PYTHONPYCACHEPREFIX, as this
    shell runs it: with PYTHONDONTWRITEBYTECODE also set, such a prefix means every start recompiles everything.
    """
    base = {k: v for k, v in os.environ.items() if k != "PYTHONPYCACHEPREFIX"}
    base["PYTHONPATH"] = str(ROOT)
    variants = [("fresh process, as installed", base)]
    if os.environ.get("PYTHONPYCACHEPREFIX"):
        variants.append(("fresh process, PYTHONPYCACHEPREFIX set", {**base, "PYTHONPYCACHEPREFIX":
                                                                    os.environ["PYTHONPYCACHEPREFIX"]}))
    rows = []
    for name, env in variants:
        runs = [timed(lambda env=env: subprocess.run([sys.executable, "-c", IMPORT_CODE], check=True, env=env,
                                                     cwd=ROOT))[1:] for _ in range(repeats)]
        walls = [w for w, _ in runs]
        rows.append(Row(name, f"python -c '{IMPORT_CODE}'", None, statistics.median(walls),
                        statistics.median(c for _, c in runs),
                        "median of " + ", ".join(f"{t:.2f}" for t in walls) + " s"))
    return rows


def synthetic(out: Path, count: int, size: int, bench_dir: Path, workers: int) -> list[Row]:
    """Generation, first manifest and re-validation of a synthetic set."""
    from components.data.synth import generate

    params = _params()
    label = f"synthetic {count / 1000:g}k {size}px"
    summary, wall, cpu = timed(lambda: generate(out, count, size=size, seed=params.base.seed, workers=workers,
                                                progress=True))
    if summary.reused < count:
        rows = [Row(label, "generate (render + encode + write)", count - summary.reused, wall, cpu)]
    else:
        rows = [Row(label, "generate", None, None, note=f"reused the complete set in {out}")]

    cache = Path(tempfile.mkdtemp(prefix="cache-synth-", dir=bench_dir))
    try:
        found, built, _ = fresh_first_manifest(out, cache, workers, "synthetic")
        n = found.images or 0
        rows += [Row(label, "discover", n, found.seconds, found.cpu),
                 Row(label, "first manifest (build_manifest, empty cache)", n, built.seconds, built.cpu,
                     _rate_verdict(n, built.seconds))]

        import great_expectations  # noqa: F401 - the import is start-up cost, measured apart below

        from components.validation.suite import validate_manifest

        profile, rules = params.datasets["synthetic"], params.validate_
        for attempt in ("1st in process", "2nd in process"):
            frame, found, built = _manifest(out, cache, workers, "synthetic")
            report, checked, checked_cpu = timed(lambda frame=frame: validate_manifest(frame, profile, rules))
            verdict = "passed" if report.success else f"FAILED: {'; '.join(report.failures)[:100]}"
            context = " (incl. GX context set-up)" if attempt.startswith("1st") else ""
            rows += [Row(label, f"re-validate {attempt}: discover + manifest from warm cache", n,
                         found.seconds + built.seconds, (found.cpu or 0) + (built.cpu or 0)),
                     Row(label, f"re-validate {attempt}: validate_manifest{context}", n, checked, checked_cpu,
                         verdict),
                     Row(label, f"re-validate {attempt}: work", n, found.seconds + built.seconds + checked)]
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    work = next(r for r in rows if r.measure == "re-validate 1st in process: work").seconds or 0.0
    startup = import_cost()
    rows += startup
    total = startup[0].seconds + work
    rows.append(Row(label, "re-validate, new process: start-up as installed + 1st work", n, total,
                    note=f"target < {TARGET_REVALIDATE:.0f} s: " + ("met" if total < TARGET_REVALIDATE else "NOT MET")))
    return rows


def breakdown(root: Path, sample: int) -> list[tuple[str, float]]:
    """CPU milliseconds per image of each step of the manifest on one core, and of cheaper equivalents."""
    import cv2
    import numpy as np
    from PIL import Image, ImageOps

    from components.data.images import decode, image_stats, to_rgb

    cv2.setNumThreads(1)
    files = sorted(root.rglob("*.jpg"))[:sample] or sorted(root.rglob("*.png"))[:sample]
    raws = [f.read_bytes() for f in files]

    def opened(raw: bytes) -> Image.Image:
        image = Image.open(io.BytesIO(raw))
        image.load()
        return image

    def rgb_without_copies(image: Image.Image) -> np.ndarray:
        if image.getexif().get(0x0112, 1) != 1:
            image = ImageOps.exif_transpose(image)
        return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))

    def stats_int16(rgb: np.ndarray) -> tuple[Any, Any]:
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        return cv2.meanStdDev(gray), cv2.meanStdDev(cv2.Laplacian(gray, cv2.CV_16S))

    images = [opened(r) for r in raws]
    rgbs = [to_rgb(i) for i in images]
    grays = [cv2.cvtColor(r, cv2.COLOR_RGB2GRAY) for r in rgbs]
    laplacians = [cv2.Laplacian(g, cv2.CV_32F) for g in grays]
    steps: list[tuple[str, Callable[[int], Any]]] = [
        ("read_bytes", lambda i: files[i].read_bytes()),
        ("sha256", lambda i: hashlib.sha256(raws[i]).hexdigest()),
        ("Image.open + load (decode)", lambda i: opened(raws[i])),
        ("to_rgb (exif_transpose + convert + asarray)", lambda i: to_rgb(images[i])),
        ("  ImageOps.exif_transpose (copies)", lambda i: ImageOps.exif_transpose(images[i])),
        ("  image.convert('RGB') (copies)", lambda i: images[i].convert("RGB")),
        ("  np.asarray(image) (tobytes copy)", lambda i: np.asarray(images[i])),
        ("image_stats: cvtColor to gray", lambda i: cv2.cvtColor(rgbs[i], cv2.COLOR_RGB2GRAY)),
        ("image_stats: meanStdDev(gray)", lambda i: cv2.meanStdDev(grays[i])),
        ("image_stats: Laplacian CV_32F", lambda i: cv2.Laplacian(grays[i], cv2.CV_32F)),
        ("image_stats: meanStdDev(laplacian f32)", lambda i: cv2.meanStdDev(laplacians[i])),
        ("= decode() + image_stats() as called", lambda i: image_stats(decode(raws[i]).pixels)),
        ("alt: to_rgb without copies", lambda i: rgb_without_copies(images[i])),
        ("alt: stats with Laplacian CV_16S", lambda i: stats_int16(rgbs[i])),
        ("alt: open+load, no-copy RGB, CV_16S stats", lambda i: stats_int16(rgb_without_copies(opened(raws[i])))),
        ("alt: cv2.imdecode only", lambda i: cv2.imdecode(np.frombuffer(raws[i], np.uint8), cv2.IMREAD_COLOR)),
    ]
    results = []
    for name, step in steps:
        started = time.process_time()
        for i in range(len(files)):
            step(i)
        results.append((name, 1000 * (time.process_time() - started) / max(1, len(files))))
    return results


def print_table(rows: list[Row]) -> None:
    """The figures as an aligned text table."""
    header = ("dataset", "measure", "images", "wall s", "images/s", "cpu ms/img", "note")
    cells = [header] + [(r.dataset, r.measure, "" if r.images is None else str(r.images),
                         "" if r.seconds is None else f"{r.seconds:.2f}",
                         "" if r.rate is None else f"{r.rate:.0f}",
                         "" if r.cpu_ms is None else f"{r.cpu_ms:.2f}", r.note) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for k, row in enumerate(cells):
        print("  ".join(cell.rjust(w) if i in (2, 3, 4, 5) else cell.ljust(w)
                        for i, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip())
        if k == 0:
            print("  ".join("-" * w for w in widths))


def main(argv: list[str] | None = None) -> None:
    """Measure and print the table."""
    from components.config import get_settings
    from components.data.demo import magnetic_tile_folder

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-data", type=Path,
                        default=magnetic_tile_folder(get_settings()),
                        help="Magnetic Tile folder (default: $DEFECTOPS_DEMO_DATA or ../shared/datasets/magnetic-tile)")
    parser.add_argument("--bench-dir", type=Path, default=Path("/tmp/defectops-bench"),
                        help="scratch folder: the synthetic set and the throw-away caches live here")
    parser.add_argument("--synth-count", type=int, default=20_000, help="images in the synthetic set")
    parser.add_argument("--size", type=int, default=512, help="side of the synthetic images, pixels")
    parser.add_argument("--workers", type=int, default=0, help="processes; 0 = one per CPU core")
    parser.add_argument("--breakdown", type=int, default=0, metavar="N",
                        help="also time each manifest step per image on N synthetic images (one core)")
    parser.add_argument("--skip-magnetic", action="store_true", help="leave out the Magnetic Tile figures")
    parser.add_argument("--skip-synthetic", action="store_true", help="leave out the synthetic figures")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

    from components.config import cpu_workers, get_settings

    workers = args.workers or cpu_workers(get_settings())
    if not args.skip_magnetic and not has_magnetic_tile(args.demo_data.resolve()):
        raise SystemExit(f"no Magnetic Tile images at {args.demo_data.resolve()} (no MT_Free folder); pass "
                         "--demo-data DIR, set DEFECTOPS_DEMO_DATA, or --skip-magnetic to leave them out")
    args.bench_dir.mkdir(parents=True, exist_ok=True)
    synth_dir = args.bench_dir / f"synth{args.synth_count / 1000:g}k-{args.size}px"
    print(f"python {sys.version.split()[0]}, {workers} worker processes, {len(os.sched_getaffinity(0))} cores, "
          f"load average {os.getloadavg()[0]:.2f} at the start")
    rows: list[Row] = []
    if not args.skip_magnetic:
        rows += magnetic_tile(args.demo_data.resolve(), args.bench_dir, workers)
    if not args.skip_synthetic:
        rows.append(generation_rate(args.bench_dir, workers))
        rows += synthetic(synth_dir, args.synth_count, args.size, args.bench_dir, workers)
    print()
    print_table(rows)
    if args.breakdown and synth_dir.is_dir():
        print(f"\nCPU ms per image on one core, {args.breakdown} images of {synth_dir}:")
        for name, ms in breakdown(synth_dir, args.breakdown):
            print(f"  {name:45s} {ms:7.2f}")
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end; with other jobs on the cores the wall-clock rates "
          "drop, the CPU ms per image does not")
    problems = failures(rows)
    if problems:
        raise SystemExit(f"manifest_throughput FAILED: {'; '.join(problems)}")


if __name__ == "__main__":
    main()
