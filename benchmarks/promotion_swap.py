"""Hot swap under load: the real service answers a steady line rate while promotion rewrites its deployment record.

    .venv/bin/python benchmarks/promotion_swap.py                      # ResNet-50 at 224 px, 10 images/s
    .venv/bin/python benchmarks/promotion_swap.py --arch resnet18 --image-size 160 --rate 20

In one run it pins model A (untrained: speed does not depend on weights) in a throw-away state root, starts
`bentoml serve`, prepares model B's deployment record (parity + export, as promotion does before it writes),
then sends real Magnetic Tile JPEGs at a fixed rate; a third of the way in it writes B's record, exactly as
`defectops promote` does. Every request's planned send time, status, latency and answering model version are
kept. Printed: failed requests (the target is 0), the time from the record landing to the first answer from
B, and latency p50/p99 before, during (record written until B answers + 2 s) and after the swap.
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

from benchmarks.serve_load import free_port, real_jpegs, server_env, start, stop, untrained_model


def steady_load(url: str, images: list[tuple[str, bytes]], rate: float, seconds: float,
                at_third: Callable[[], None]) -> list[tuple[float, int, float, str]]:
    """(planned send time, status, latency ms, model_version) per request, sent at `rate`; calls `at_third` once."""
    import httpx

    answers, lock, local = [], threading.Lock(), threading.local()

    def send(planned: float, index: int) -> None:
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=60)
        name, raw = images[index % len(images)]
        try:
            response = local.client.post(url, files={"image": (name, raw, "image/jpeg")})
            status, version = response.status_code, response.json().get("model_version", "")
        except (httpx.HTTPError, ValueError) as exc:
            status, version = 0, type(exc).__name__
        with lock:
            answers.append((planned, status, (time.perf_counter() - planned) * 1000, version))

    count, started, fired = int(rate * seconds), time.perf_counter(), False
    with ThreadPoolExecutor(64) as pool:
        for i in range(count):
            planned = started + i / rate
            if not fired and i >= count // 3:
                fired = True
                pool.submit(at_third)
            delay = planned - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            pool.submit(send, planned, i)
    return answers


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rate", type=float, default=10.0, help="offered load, images/s (the line rate)")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--images", type=int, default=100)
    args = parser.parse_args()
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

        print(f"serving A on {first.fast_path}; sending {args.rate:g} images/s for {args.seconds:g} s, B's record "
              "lands after a third", flush=True)
        answers = steady_load(f"{url}/predict", images, args.rate, args.seconds, promote)
    finally:
        stop(service)
    failed = [a for a in answers if a[1] != 200]
    by_b = [a for a in answers if a[3] == second.model_version]
    first_b = min((planned + latency / 1000 for planned, _, latency, _ in by_b), default=float("nan"))
    swap_s = first_b - landed[0]
    phases = {"before": [a for a in answers if a[0] < landed[0]],
              "during": [a for a in answers if landed[0] <= a[0] < first_b + 2],
              "after": [a for a in answers if a[0] >= first_b + 2]}
    print(f"\n{len(answers)} requests, {len(failed)} failed (target 0); answered by A {len(answers) - len(by_b)}, "
          f"by B {len(by_b)}; B's first answer {swap_s:.1f} s after its record landed (poll "
          f"{params.model_extra['serve'].get('reload_poll_seconds', 2)} s + load + warm-up)")
    for name, rows in phases.items():
        latencies = [latency for _, status, latency, _ in rows if status == 200]
        print(f"  {name:<7} n {len(rows):>4}  p50 {_percentile(latencies, 0.5):7.1f} ms  p99 "
              f"{_percentile(latencies, 0.99):7.1f} ms  max {max(latencies, default=float('nan')):7.1f} ms")
    print(f"load average after: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if failed:
        print(f"failures, first 3: {failed[:3]}")
        raise SystemExit(1)


if __name__ == "__main__":
    main()
