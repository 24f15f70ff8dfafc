"""Hot swap under load: the real service answers a steady line rate while promotion rewrites its deployment record.

    .venv/bin/python benchmarks/promotion_swap.py                      # ResNet-50 at 224 px, 10 images/s
    .venv/bin/python benchmarks/promotion_swap.py --arch resnet18 --image-size 160 --rate 20

In one run it pins model A (untrained: speed does not depend on weights) in a throw-away state root, starts
`bentoml serve`, prepares model B's deployment record (parity + export, as promotion does before it writes),
sends a few warm-up requests (not measured), then real Magnetic Tile JPEGs at a fixed rate; a third of the way in
it writes B's record, exactly as `defectops promote` does. Every request's planned send time, status, latency
and answering model version are kept. Printed: failed requests (the target is 0), the time from the record
landing to the first answer from B, and latency p50/p99 with their sample count n before, during (record written
until B answers + 2 s) and after the swap; a p99 of n < 100 (the "during" phase at 10 images/s) is about the
maximum and is marked so.
Exit status: non-zero, with one line, when a request failed or has no recorded outcome, the promotion raised, B
never answered or a phase has no answered request; the swap is then not shown to work.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.serve_load import (
    _percentile,
    free_port,
    real_jpegs,
    sample_note,
    server_env,
    start,
    stop,
    untrained_model,
)


def warm_up(url: str, images: list[tuple[str, bytes]], count: int) -> int:
    """`count` requests one after another before the measured load (first-request costs stay out of it)."""
    import httpx

    answered = 0
    with httpx.Client(timeout=60) as client:
        for index in range(count):
            name, raw = images[index % len(images)]
            try:
                answered += client.post(url, files={"image": (name, raw, "image/jpeg")}).status_code == 200
            except httpx.HTTPError:
                continue
    return answered


def steady_load(url: str, images: list[tuple[str, bytes]], count: int, rate: float,
                at_third: Callable[[], None]) -> tuple[list[tuple[float, int, float, str]], BaseException | None]:
    """(planned send time, status, latency ms, model_version) of each of `count` requests sent at `rate`, and what
    `at_third`, called once a third of the way in, raised (None when it returned)."""
    import httpx

    answers, lock, local = [], threading.Lock(), threading.local()

    def send(planned: float, index: int) -> None:
        name, raw = images[index % len(images)]
        try:
            if not hasattr(local, "client"):
                local.client = httpx.Client(timeout=60)
            response = local.client.post(url, files={"image": (name, raw, "image/jpeg")})
            status, version = response.status_code, response.json().get("model_version", "")
        except Exception as exc:  # noqa: BLE001 - every request's outcome counts: a failure, not a gap
            status, version = 0, f"{type(exc).__name__}: {exc}"[:200]
        with lock:
            answers.append((planned, status, (time.perf_counter() - planned) * 1000, version))

    started, promotion = time.perf_counter(), None
    with ThreadPoolExecutor(64) as pool:
        for i in range(count):
            planned = started + i / rate
            if promotion is None and i >= count // 3:
                promotion = pool.submit(at_third)
            delay = planned - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            pool.submit(send, planned, i)
    return answers, promotion.exception() if promotion is not None else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rate", type=float, default=10.0, help="offered load, images/s (the line rate)")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=8, help="requests sent before the measured load")
    args = parser.parse_args()
    count = int(args.rate * args.seconds)
    if count < 3:
        parser.error(f"--rate x --seconds gives {count} requests; at least 3 are needed (before, during, after)")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

    from components.config import Settings, load_params
    from components.serving.deployment import build_record, pin_deployment, write_record

    home = Path(tempfile.mkdtemp(prefix="defectops-swap-bench-"))
    settings = Settings(project=ROOT, home=home)
    params = load_params(settings.params_file)
    images = real_jpegs(args.images)
    raws = [raw for _, raw in images[:64]]
    classes, normal = list(params.profile.classes), params.profile.normal_class
    models = [untrained_model(args.arch, args.image_size, classes, normal, home / "models" / f"{name}.pt", raws)
              for name in ("a", "b")]
    print(f"{args.arch} at {args.image_size} px; load average before: "
          f"{', '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
    first = pin_deployment(settings, params, str(models[0]), "benchmark", images=raws)
    env = server_env(home)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    service = start([sys.executable, "-m", "bentoml", "serve", "components.serving.service:DefectClassifier",
                     "--host", "127.0.0.1", "--port", str(port)], env, url, "/readyz", home / "service.log")
    try:
        second = build_record(settings, params, str(models[1]), "benchmark", images=raws)
        second = second.model_copy(update={"fast_path": first.fast_path})  # untrained: parity says nothing
        landed: list[float] = []

        def promote() -> None:
            landed.append(time.perf_counter())
            write_record(settings, second)

        warmed = warm_up(f"{url}/predict", images, args.warmup)
        if args.warmup and not warmed:
            raise SystemExit(f"the service answered none of {args.warmup} warm-up requests; see {home / 'service.log'}")
        print(f"serving A on {first.fast_path} ({warmed} of {args.warmup} warm-up requests answered); sending "
              f"{args.rate:g} images/s for {args.seconds:g} s, B's record lands after a third", flush=True)
        answers, promotion_error = steady_load(f"{url}/predict", images, count, args.rate, promote)
    finally:
        stop(service)
    if promotion_error is not None:  # without B's record there is no swap to measure
        raise SystemExit(f"promotion_swap FAILED: writing B's record raised {type(promotion_error).__name__}: "
                         f"{promotion_error}")
    failed = [a for a in answers if a[1] != 200]
    by_b = [a for a in answers if a[3] == second.model_version]
    print(f"\n{count} requests sent, {len(answers)} outcomes recorded, {len(failed)} failed (target 0); answered by "
          f"A {len(answers) - len(failed) - len(by_b)}, by B {len(by_b)}")
    problems = []
    if len(answers) != count:
        problems.append(f"{count - len(answers)} of {count} requests have no recorded outcome")
    if failed:
        print(f"failures, first 3: {failed[:3]}")
        problems.append(f"{len(failed)} of {count} requests failed")
    if not by_b:
        problems.append(f"model B never answered in the {args.seconds * 2 / 3:.0f} s after its record landed "
                        f"(see {home / 'service.log'})")
    else:
        first_b = min(planned + latency / 1000 for planned, _, latency, _ in by_b)
        print(f"B's first answer {first_b - landed[0]:.1f} s after its record landed (poll "
              f"{params.model_extra['serve'].get('reload_poll_seconds', 2)} s + load + warm-up)")
        phases = {"before": [a for a in answers if a[0] < landed[0]],
                  "during": [a for a in answers if landed[0] <= a[0] < first_b + 2],
                  "after": [a for a in answers if a[0] >= first_b + 2]}
        for name, rows in phases.items():
            latencies = [latency for _, status, latency, _ in rows if status == 200]
            if not latencies:
                problems.append(f"the {name} phase has no answered request ({len(rows)} sent)")
                continue
            print(f"  {name:<7} p50 {_percentile(latencies, 50):7.1f} ms  p99 {_percentile(latencies, 99):7.1f} ms  "
                  f"max {max(latencies):7.1f} ms  {sample_note(len(latencies))}")
    print(f"load average after: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if problems:
        raise SystemExit(f"promotion_swap FAILED: {'; '.join(problems)}")


if __name__ == "__main__":
    main()
