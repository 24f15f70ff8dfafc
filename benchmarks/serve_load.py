"""Serving throughput and latency: the BentoML service against the plant's original design, same model, same load.

Run on demand (never a test); everything listens on 127.0.0.1 only and every phase is bounded in time:

    .venv/bin/python benchmarks/serve_load.py                          # untrained ResNet-50 at 224 px
    .venv/bin/python benchmarks/serve_load.py --model artifacts/train/model.pt   # e.g. the demo model
    .venv/bin/python benchmarks/serve_load.py --arch resnet18 --image-size 160   # the CPU demo profile's shape

In one run it
1. pins the model in a throw-away state root (a deployment record, as promotion would) with the configured
   fast path, checked for parity on real images; an untrained model (the default: throughput does not depend
   on weights) has near-uniform probabilities on which parity says nothing, so its fast path is kept and the
   parity figures are only reported;
2. starts the real service (`bentoml serve components.serving.service:DefectClassifier`, params.yaml's
   `serve` section) and the baseline built like the plant's original design: a FastAPI endpoint (uvicorn, one
   worker, sync endpoint), one image per forward pass, fp32 PyTorch on the same device (the GPU when there is
   one), the same model file and preprocessing (the shared Predictor);
3. drives both with the same bounded client: closed loops (--concurrency threads for --seconds, at each of
   the listed client counts), then an open-loop offered load of --rate images/s for --rate-seconds, each in
   --rounds short rounds alternating between the two servers, so load from other processes falls on both alike;
4. measures in this process the ceiling of the served engine: forward passes only, on prepared real images, at
   batch sizes 1..16 (1..256 on a GPU), and the same with decode + preprocessing included, at the best batch size.
The images are real JPEGs (Magnetic Tile: $DEFECTOPS_DEMO_DATA, else ../shared/datasets/magnetic-tile).
Client and servers share the machine's cores; the load average at the start is printed with the figures, and
each server's CPU seconds per image (process tree) are given, which stay comparable when other jobs run.
Targets: service >= 3x the baseline's throughput and >= 80 % of the in-process ceiling. Throughput is the
closed-loop rate at each client count; a server's capacity is its best rate over the counts (a batching
server needs requests queued to fill its batches, a one-image server saturates with two clients), and the
targets are judged on capacities, with the ratio at every client count printed beside them.
Every percentile is printed with n, the answered requests behind it; a p99 of fewer than 100 is about the
maximum and is marked so (the open loop's defaults give 150 a server: 15 s at 10 images/s).
Exit status: non-zero, with one line after the figures, when a measured request failed or went unanswered, or a
rate came out zero or NaN. Missed targets are figures, not errors: printed as NOT MET, the exit status stays 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

log = logging.getLogger("benchmarks.serve_load")

TARGET_SPEEDUP = 3.0
TARGET_CEILING_SHARE = 0.8


@dataclass
class LoadResult:
    """One load phase against one server."""

    server: str
    phase: str
    requests: int  # sent
    errors: int  # failed or unanswered; the percentiles are over the others (requests - errors)
    seconds: float
    throughput: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    cpu_ms_per_image: float | None = None
    client_cores: float | None = None  # CPU the load generator (this process) took meanwhile
    offered_rate: float | None = None


# ------------------------------------------------------------------ inputs


def real_jpegs(limit: int) -> list[tuple[str, bytes]]:
    """Up to `limit` real JPEGs (name, bytes) spread over the classes of the Magnetic Tile set."""
    from components.config import get_settings
    from components.data.demo import magnetic_tile_folder

    root = magnetic_tile_folder(get_settings())
    files = sorted(root.glob("MT_*/Imgs/*.jpg")) or sorted(root.rglob("*.jpg"))
    if not files:
        raise SystemExit(f"no JPEGs under {root}; set DEFECTOPS_DEMO_DATA to the Magnetic Tile folder")
    step = max(1, len(files) // limit)
    return [(f.name, f.read_bytes()) for f in files[::step][:limit]]


def untrained_model(arch: str, image_size: int, classes: list[str], normal: str, path: Path,
                    images: list[bytes], review_rate: float = 0.15) -> Path:
    """An untrained classifier of the given shape, saved as a model.pt (throughput does not depend on weights).

    Its threshold sends `review_rate` of the benchmark images to review (the most params.yaml's `evaluate`
    allows), so the service stores as many review images as it would with a real model at worst.
    """
    import numpy as np
    import torch

    from components.predictor import Predictor
    from components.training.models import build_model
    from components.training.train import model_meta, save_model_file

    torch.manual_seed(0)
    model, _ = build_model(arch, len(classes), dropout=0.3, hidden=512, attention=False, weights=None)
    meta = model_meta(model, classes, normal, image_size, weights_used="random-init (benchmark)")
    predictor = Predictor(model, dict(meta), device="cpu")
    confidence = np.concatenate([predictor.probabilities(predictor.forward(torch.stack(
        [predictor.prepare(raw) for raw in images[i:i + 16]]))[0]).max(axis=1) for i in range(0, len(images), 16)])
    meta["calibration"] = {"temperature": 1.0, "threshold": float(np.quantile(confidence, review_rate))}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model_file(path, model, model.state_dict(), meta)
    return path


# ------------------------------------------------------------------ servers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_env(home: Path) -> dict[str, str]:
    """The environment of a server under the throw-away state root `home` (the caller's PYTHONPATH kept after
    the project's: carried packages stay importable)."""
    return dict(os.environ, DEFECTOPS_PROJECT=str(ROOT), DEFECTOPS_HOME=str(home), BENTOML_HOME=str(home / "bentoml"),
                BENTOML_DO_NOT_TRACK="true", HOME=str(home / "user-home"),
                PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


def start(command: list[str], env: dict[str, str], url: str, ready_path: str, log_file: Path,
          timeout: float = 300) -> subprocess.Popen:
    """Start a server in its own session and wait until `ready_path` answers 200."""
    from components.errors import DefectOpsError
    from components.serving.run import wait_until_ready

    with log_file.open("wb") as sink:
        process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        return wait_until_ready(process, url + ready_path, log_file, timeout)
    except DefectOpsError as exc:
        raise SystemExit(f"{exc}:\n{log_file.read_text(errors='replace')[-2000:]}") from None


def stop(process: subprocess.Popen) -> None:
    """SIGTERM the server; kill what is left of its process tree (BentoML workers have sessions of their own)."""
    from components.serving.run import stop_background

    stop_background(process, timeout_s=20)


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its descendants."""
    import psutil

    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            continue
    return total


# ------------------------------------------------------------------ load


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


FEW_SAMPLES = 100  # below this a p99 is about the maximum


def sample_note(n: int) -> str:
    """`(n=150)` beside a percentile; says so where a p99 of so few samples is about the maximum."""
    return f"(n={n}{', p99 ~ max' if n < FEW_SAMPLES else ''})"


def _summary(server: str, phase: str, latencies: list[float], errors: int, seconds: float,
             cpu: float | None, offered: float | None = None) -> LoadResult:
    done = len(latencies)
    return LoadResult(server, phase, done + errors, errors, round(seconds, 2), round(done / seconds, 2),
                      round(_percentile(latencies, 50), 1), round(_percentile(latencies, 95), 1),
                      round(_percentile(latencies, 99), 1),
                      round(cpu * 1000 / done, 1) if cpu is not None and done else None, offered_rate=offered)


BOUNDARY = "defectops-serve-load-7f3a9c"


def multipart_body(name: str, raw: bytes) -> bytes:
    """One JPEG as a multipart/form-data body with the file field `image` (built once per image, not per request)."""
    head = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
            "Content-Type: image/jpeg\r\n\r\n").encode()
    return head + raw + f"\r\n--{BOUNDARY}--\r\n".encode()


class Poster:
    """POSTs prebuilt multipart bodies over one keep-alive HTTP/1.1 connection (`http.client`).

    The load generator shares the 2 cores with the server it measures, so its own CPU is taken from that server:
    httpx with `files=` took 0.08-0.12 cores of the 2 at 40 images/s, this takes 0.01-0.02 (README "Figures").
    A request on a reused connection the server has meanwhile closed is retried once on a new one, as httpx does.
    """

    def __init__(self, url: str, timeout: float = 60) -> None:
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        self.host, self.port, self.path, self.timeout = parts.hostname, parts.port, parts.path, timeout
        self.headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
        self.connection: Any = None

    def post(self, body: bytes) -> bool:
        """True when the server answered 200."""
        import http.client

        for _ in range(2):
            reused = self.connection is not None
            if not reused:
                self.connection = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self.connection.request("POST", self.path, body, self.headers)
                response = self.connection.getresponse()
                response.read()
                return response.status == 200
            except (OSError, http.client.HTTPException):
                self.close()
                if not reused:
                    return False
        return False

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


def closed_loop(url: str, images: list[tuple[str, bytes]], concurrency: int, seconds: float,
                max_requests: int) -> tuple[list[float], int, float]:
    """`concurrency` threads posting images back to back for `seconds` (or max_requests); latencies in ms."""
    bodies = [multipart_body(name, raw) for name, raw in images]
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    counter = iter(range(max_requests))
    deadline = time.perf_counter() + seconds

    def worker() -> None:
        nonlocal errors
        poster = Poster(url)
        try:
            while time.perf_counter() < deadline:
                with lock:
                    index = next(counter, None)
                if index is None:
                    return
                started = time.perf_counter()
                try:
                    ok = poster.post(bodies[index % len(bodies)])
                except Exception:  # every request's outcome counts: an unexpected error is a failure, not a gap
                    log.exception("request failed")
                    ok = False
                elapsed = (time.perf_counter() - started) * 1000
                with lock:
                    if ok:
                        latencies.append(elapsed)
                    else:
                        errors += 1
        finally:
            poster.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, errors, time.perf_counter() - started


def open_loop(url: str, images: list[tuple[str, bytes]], rate: float, seconds: float,
              max_outstanding: int = 64) -> tuple[list[float], int, float]:
    """Requests sent at a fixed `rate` (images/s) whatever the answers; latency counted from the planned send."""
    bodies = [multipart_body(name, raw) for name, raw in images]
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    local = threading.local()
    posters: list[Poster] = []

    def send(planned: float, index: int) -> None:
        nonlocal errors
        try:
            if not hasattr(local, "poster"):
                local.poster = Poster(url)
                with lock:
                    posters.append(local.poster)
            ok = local.poster.post(bodies[index % len(bodies)])
        except Exception:  # every request's outcome counts: an unexpected error is a failure, not a gap
            log.exception("request failed")
            ok = False
        with lock:
            if ok:
                latencies.append((time.perf_counter() - planned) * 1000)
            else:
                errors += 1

    count = int(rate * seconds)
    started = time.perf_counter()
    with ThreadPoolExecutor(max_outstanding) as pool:
        for i in range(count):
            planned = started + i / rate
            delay = planned - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            pool.submit(send, planned, i)
    for poster in posters:
        poster.close()
    errors = count - len(latencies)  # send records every outcome; one that did not answer 200 is a failure
    return latencies, errors, time.perf_counter() - started


def drive(servers: dict[str, tuple[subprocess.Popen, str]], images: list[tuple[str, bytes]],
          args: argparse.Namespace, logs: dict[str, Path]) -> list[LoadResult]:
    """Warm up every server, then the closed-loop and the open-loop phases in alternating rounds.

    Alternating short rounds (--rounds) between the servers spreads whatever else runs on the machine evenly over
    them, so their figures compare even when the load of other processes changes during the run.
    """
    for name, (_, url) in servers.items():
        answered, errors, _ = closed_loop(url, images, 4, 60, args.warmup)
        if not answered:  # figures of a server that answers nothing would mean nothing
            tail = logs[name].read_text(errors="replace")[-3000:] if logs[name].is_file() else ""
            raise SystemExit(f"{name} answered none of {errors} warm-up requests; its log {logs[name]} ends:\n{tail}")
    results = []
    for phase, clients in [("closed", c) for c in args.concurrency] + [("open", 0)]:
        latencies: dict[str, list[float]] = {name: [] for name in servers}
        errors = dict.fromkeys(servers, 0)
        seconds = dict.fromkeys(servers, 0.0)
        cpu = dict.fromkeys(servers, 0.0)
        client = dict.fromkeys(servers, 0.0)
        order = list(servers.items())
        for round_index in range(args.rounds):
            first = round_index % len(order)  # each round starts with the next server: neither always goes first
            for name, (process, url) in order[first:] + order[:first]:
                cpu0, client0 = tree_cpu_seconds(process.pid), time.process_time()
                if phase == "closed":
                    lat, err, sec = closed_loop(url, images, clients, args.seconds / args.rounds,
                                                args.max_requests)
                else:
                    lat, err, sec = open_loop(url, images, args.rate, args.rate_seconds / args.rounds)
                cpu[name] += tree_cpu_seconds(process.pid) - cpu0
                client[name] += time.process_time() - client0
                latencies[name] += lat
                errors[name] += err
                seconds[name] += sec
        for name in servers:
            label = f"closed loop, {clients} clients" if phase == "closed" else \
                f"open loop, {args.rate:g} images/s offered"
            result = _summary(name, label, latencies[name], errors[name], seconds[name], cpu[name],
                              args.rate if phase == "open" else None)
            result.client_cores = round(client[name] / seconds[name], 2) if seconds[name] else None
            print(f"  {name}, {label}: {result.throughput} images/s, p50 {result.p50_ms} ms, p99 {result.p99_ms} ms "
                  f"{sample_note(result.requests - result.errors)}" + (f", {result.errors} FAILED" if result.errors
                                                                        else ""), flush=True)
            results.append(result)
    return results


# ------------------------------------------------------------------ baseline (the plant's original design)


def baseline_app(model_path: str, max_pixels: int) -> Any:
    """FastAPI, one image per forward pass, fp32 PyTorch on the service's device (CUDA when present, else the
    CPU), the shared Predictor for identical preprocessing."""
    from fastapi import FastAPI, File, UploadFile

    from components.predictor import Predictor

    predictor = Predictor.from_file(model_path, max_pixels=max_pixels)  # CUDA when present, as the service
    app = FastAPI()

    def ready() -> dict:
        return {"ok": True}

    def predict(image: UploadFile = File(...)) -> dict:  # noqa: B008 - FastAPI's idiom
        return predictor.predict([image.file.read()])[0].as_dict()

    # annotations are strings here (from __future__); give FastAPI the real types
    predict.__annotations__ = {"image": UploadFile, "return": dict}
    ready.__annotations__ = {"return": dict}
    app.get("/ready")(ready)
    app.post("/predict")(predict)
    return app


def run_baseline(model_path: str, port: int, max_pixels: int) -> None:
    import uvicorn

    uvicorn.run(baseline_app(model_path, max_pixels), host="127.0.0.1", port=port, log_level="warning", workers=1)


# ------------------------------------------------------------------ in-process ceiling


def ceiling(settings: Any, images: list[tuple[str, bytes]], max_pixels: int, seconds: float,
            rounds: int = 3, sizes: tuple[int, ...] = (1, 2, 4, 8, 16)) -> dict[str, Any]:
    """Images/s of the served engine in this process: forward only at each batch size of `sizes` (median of
    interleaved rounds, so a burst of other load hits every size alike), and with decode + preprocessing at the
    best size.

    An engine with several streams (OpenVINO's throughput streams, which the service's inference threads use
    side by side) is also measured that way: one thread per stream, each running its own batches of 1..4;
    the ceiling is the faster of the two ways.
    """
    import statistics

    import cv2
    import torch

    from components.serving.deployment import load_served, read_record

    cv2.setNumThreads(1)  # as in the service: preprocessing runs beside the engine, which owns the cores
    engine, _, name = load_served(settings, read_record(settings), max_pixels)
    tensors = [engine.prepare(raw) for _, raw in images[:32]]
    engine.predict([raw for _, raw in images[:32]])  # warm the decode and preprocessing path
    batches = {b: torch.stack([tensors[i % len(tensors)] for i in range(b)]) for b in sizes}
    for batch in batches.values():
        engine.forward(batch)

    cpu_ms: dict[int, list[float]] = {b: [] for b in sizes}

    def rate(work: Any, batch_size: int) -> float:
        count, started, cpu = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - started < seconds:
            work()
            count += batch_size
        cpu_ms[batch_size].append((time.process_time() - cpu) * 1000 / count)
        return count / (time.perf_counter() - started)

    stream_sizes = (1, 2, 4) if engine.streams > 1 else ()
    stream_cpu_ms: dict[int, list[float]] = {b: [] for b in stream_sizes}

    def side_by_side(batch_size: int) -> float:
        """Every stream busy with its own batches of `batch_size`, one thread each."""
        counts = [0] * engine.streams
        started, cpu = time.perf_counter(), time.process_time()

        def loop(stream: int) -> None:
            while time.perf_counter() - started < seconds:
                engine.forward(batches[batch_size], stream)
                counts[stream] += batch_size

        threads = [threading.Thread(target=loop, args=(s,)) for s in range(engine.streams)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - started
        stream_cpu_ms[batch_size].append((time.process_time() - cpu) * 1000 / sum(counts))
        return sum(counts) / elapsed

    measured: dict[int, list[float]] = {b: [] for b in sizes}
    streamed: dict[int, list[float]] = {b: [] for b in stream_sizes}
    for _ in range(rounds):
        for b in sizes:
            measured[b].append(rate(lambda b=b: engine.forward(batches[b]), b))
        for b in stream_sizes:
            streamed[b].append(side_by_side(b))
    rows = {b: round(statistics.median(v), 2) for b, v in measured.items()}
    stream_rows = {b: round(statistics.median(v), 2) for b, v in streamed.items()}
    best = max(rows, key=rows.get)
    forward_cpu_ms = round(statistics.median(cpu_ms[best]), 1)
    top, how = rows[best], f"batch {best}"
    if stream_rows and max(stream_rows.values()) > top:
        per_stream = max(stream_rows, key=stream_rows.get)
        top, how = stream_rows[per_stream], f"{engine.streams} streams side by side, batch {per_stream} each"
        forward_cpu_ms = round(statistics.median(stream_cpu_ms[per_stream]), 1)
    cpu_ms[best] = []
    position = [0]

    def end_to_end() -> None:
        chunk = [images[(position[0] + i) % len(images)][1] for i in range(best)]
        position[0] += best
        engine.predict(chunk)

    e2e = round(statistics.median(rate(end_to_end, best) for _ in range(rounds)), 2)
    return {"engine": name, "device": str(engine.device), "forward_images_per_s": rows, "streams": engine.streams,
            "side_by_side_images_per_s": stream_rows, "best_batch_size": best, "best": top, "best_how": how,
            "end_to_end_images_per_s": e2e, "precision": str(getattr(engine, "precision", "")),
            "forward_cpu_ms_per_image": forward_cpu_ms,
            "end_to_end_cpu_ms_per_image": round(statistics.median(cpu_ms[best]), 1)}


# ------------------------------------------------------------------ main


def accelerator() -> str:
    """The GPU the service will use, or 'no GPU'."""
    import torch

    if not torch.cuda.is_available():
        return "no GPU"
    return f"GPU {torch.cuda.get_device_name()} (torch {torch.__version__}, CUDA {torch.version.cuda})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model.pt to serve (default: an untrained --arch at --image-size)")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--fast-path", default=None, help="override serve.fast_path for this run")
    parser.add_argument("--concurrency", type=lambda text: [int(c) for c in text.split(",")], default=[8, 16],
                        help="closed-loop client counts, comma-separated")
    parser.add_argument("--seconds", type=float, default=20.0, help="closed-loop duration per server")
    parser.add_argument("--max-requests", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=16)
    parser.add_argument("--rate", type=float, default=10.0, help="open-loop offered load, images/s")
    parser.add_argument("--rate-seconds", type=float, default=15.0)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per phase and server")
    parser.add_argument("--ceiling-seconds", type=float, default=1.5)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--home", type=Path, default=None, help="state root to use (keeps the ONNX export)")
    parser.add_argument("--json", type=Path, default=None, help="write all figures here")
    parser.add_argument("--baseline-server", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--baseline-model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--max-pixels", type=int, default=40_000_000, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_server:
        run_baseline(args.baseline_model, args.baseline_server, args.max_pixels)
        return
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

    from components.config import Settings, load_params
    from components.serving.deployment import DeploymentRecord, pin_deployment, write_record
    from components.serving.params import serve_params

    home = args.home or Path(tempfile.mkdtemp(prefix="defectops-serve-bench-"))
    settings = Settings(project=ROOT, home=home)
    params = load_params(settings.params_file)
    profile = params.profile
    images = real_jpegs(args.images)
    load_before = os.getloadavg()
    print(f"state root {home}; {len(images)} real JPEGs; load average before: "
          f"{', '.join(f'{v:.2f}' for v in load_before)}; {os.cpu_count()} CPUs; {accelerator()}", flush=True)

    untrained = args.model is None
    model_path = Path(args.model) if args.model else untrained_model(
        args.arch, args.image_size, list(profile.classes), profile.normal_class,
        home / "models" / f"{args.arch}-{args.image_size}.pt", [raw for _, raw in images[:64]])
    started = time.perf_counter()
    parity_images = [raw for _, raw in images[:100]]
    record = pin_deployment(settings, params, str(model_path), deployed_by="benchmarks/serve_load.py",
                            images=parity_images, fast_path=args.fast_path)
    if untrained and record.fast_path == "fp32" and record.parity:
        wanted = record.parity["engine"]
        note = (f"{wanted} kept for the benchmark: untrained weights give near-uniform probabilities, on which "
                f"parity is meaningless ({record.fast_path_reason})")
        record = DeploymentRecord(**{**record.model_dump(), "fast_path": wanted, "fast_path_reason": note})
        write_record(settings, record)
    print(f"pinned {model_path.name} on {record.fast_path} in {time.perf_counter() - started:.1f} s: "
          f"{record.fast_path_reason}", flush=True)
    batching = serve_params(params).batching_for(record.device)

    env = server_env(home)
    servers: dict[str, tuple[subprocess.Popen, str]] = {}
    try:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        servers["bentoml service"] = (start(
            [sys.executable, "-m", "bentoml", "serve", "components.serving.service:DefectClassifier", "--host",
             "127.0.0.1", "--port", str(port)], env, url, "/readyz", home / "service.log"), f"{url}/predict")
        print(f"service ready (batches up to {batching.max_batch_size}, max latency {batching.max_latency_ms} ms)",
              flush=True)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        servers["fastapi baseline"] = (start(
            [sys.executable, str(Path(__file__).resolve()), "--baseline-server", str(port), "--baseline-model",
             str(model_path), "--max-pixels", str(params.data.max_image_pixels)], env, url, "/ready",
            home / "baseline.log"), f"{url}/predict")
        print(f"baseline ready (FastAPI, one image per forward pass, fp32 PyTorch on {record.device})", flush=True)
        results = drive(servers, images, args, {"bentoml service": home / "service.log",
                                                "fastapi baseline": home / "baseline.log"})
    finally:
        for process, _ in servers.values():
            stop(process)
    closed = [r for r in results if r.offered_rate is None]
    # capacity: each server at its best client count (a batching server needs queued requests to fill batches)
    service_closed = max((r for r in closed if r.server == "bentoml service"), key=lambda r: r.throughput)
    baseline_closed = max((r for r in closed if r.server == "fastapi baseline"), key=lambda r: r.throughput)

    # a GPU's forward pass keeps gaining with the batch far beyond what the service batches; the served
    # maximum and the larger sizes are both measured (the latter for the comparison with published figures)
    sizes = (1, 2, 4, 8, 16) if record.device == "cpu" else (1, 2, 4, 8, 16, 32, 64, 128, 256)
    top = ceiling(settings, images, params.data.max_image_pixels, args.ceiling_seconds, sizes=sizes)
    service_rate = service_closed.throughput
    baseline_rate = baseline_closed.throughput
    speedup = service_rate / baseline_rate if baseline_rate else float("nan")
    share = service_rate / top["best"] if top["best"] else float("nan")
    share_e2e = service_rate / top["end_to_end_images_per_s"] if top["end_to_end_images_per_s"] else float("nan")
    # CPU time per image stays comparable when other processes take cores away during one phase
    cpu_speedup = (baseline_closed.cpu_ms_per_image or 0) / (service_closed.cpu_ms_per_image or float("nan"))
    cpu_share = top["forward_cpu_ms_per_image"] / (service_closed.cpu_ms_per_image or float("nan"))
    by_phase = {(r.server, r.phase): r.throughput for r in closed}
    per_level = {phase: by_phase[("bentoml service", phase)] / by_phase[("fastapi baseline", phase)]
                 for (server, phase) in by_phase if server == "bentoml service"
                 and by_phase.get(("fastapi baseline", phase))}

    shape = f"untrained {args.arch} at {args.image_size} px" if untrained else str(model_path)
    print(f"\n{shape}, served on {record.fast_path}")
    header = f"{'server':<18} {'phase':<32} {'err':>4} {'img/s':>7} {'n':>5} {'p50 ms':>8} {'p95 ms':>8} " \
             f"{'p99 ms':>9} {'cpu ms/img':>10} {'cores':>6} {'client':>7}"
    print(header)
    print("-" * len(header))
    for r in results:
        cores = f"{r.cpu_ms_per_image * r.throughput / 1000:.2f}" if r.cpu_ms_per_image else "-"
        answered = r.requests - r.errors
        p99 = f"{r.p99_ms:.1f}" + ("~" if answered < FEW_SAMPLES else " ")
        print(f"{r.server:<18} {r.phase:<32} {r.errors:>4} {r.throughput:>7.2f} {answered:>5} {r.p50_ms:>8.1f} "
              f"{r.p95_ms:>8.1f} {p99:>9} {r.cpu_ms_per_image if r.cpu_ms_per_image else '-':>10} {cores:>6} "
              f"{r.client_cores if r.client_cores is not None else '-':>7}")
    print(f"n = answered requests, the samples behind p50/p95/p99 (err = failed ones); ~ = p99 of n < {FEW_SAMPLES}, "
          "about the maximum")
    print("client = CPU the load generator took meanwhile (it shares the machine's cores with the server); "
          "cores = CPU the server's process tree got on average; when other jobs compete for the cores, the "
          "scheduler shares CPU per runnable thread, so compare servers by cpu ms/img as well as by img/s")
    print(f"\nin-process ceiling ({top['engine']}, {top['precision']}): forward-only images/s by batch size "
          f"{top['forward_images_per_s']}"
          + (f", with {top['streams']} streams side by side (batch per stream) {top['side_by_side_images_per_s']}"
             if top["side_by_side_images_per_s"] else "")
          + f"; best {top['best']} ({top['best_how']}, {top['forward_cpu_ms_per_image']} cpu ms/img); "
          f"with decode + preprocessing at batch {top['best_batch_size']} "
          f"{top['end_to_end_images_per_s']} ({top['end_to_end_cpu_ms_per_image']} cpu ms/img)")
    print("service / baseline at the same client count: "
          + ", ".join(f"{phase.removeprefix('closed loop, ')} {ratio:.2f}x" for phase, ratio in per_level.items()))
    print(f"capacity (best client count of each): service {service_rate} images/s ({service_closed.phase}), "
          f"baseline {baseline_rate} images/s ({baseline_closed.phase})")
    print(f"service / baseline capacity: {speedup:.2f}x (target >= {TARGET_SPEEDUP}x) "
          f"{'MET' if speedup >= TARGET_SPEEDUP else 'NOT MET'}; by CPU time per image: {cpu_speedup:.2f}x")
    print(f"service capacity / forward-only ceiling: {share:.0%} (target >= {TARGET_CEILING_SHARE:.0%}) "
          f"{'MET' if share >= TARGET_CEILING_SHARE else 'NOT MET'}; service / end-to-end ceiling: {share_e2e:.0%}; "
          f"by CPU time per image: {cpu_share:.0%} of the forward-only ceiling")
    print(f"load average after: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "model": str(model_path), "untrained": untrained, "record": record.model_dump(),
            "batching": batching.model_dump(), "results": [asdict(r) for r in results], "ceiling": top,
            "speedup": speedup, "speedup_per_client_count": per_level, "ceiling_share": share,
            "ceiling_share_end_to_end": share_e2e,
            "cpu_speedup": cpu_speedup, "cpu_ceiling_share": cpu_share,
            "load_average_before": load_before, "cpus": os.cpu_count()}, indent=2, default=str))
    problems = [f"{r.server}, {r.phase}: {r.errors} of {r.requests} requests failed" for r in results if r.errors]
    problems += [f"{r.server}, {r.phase}: rate {r.throughput} images/s" for r in results
                 if not math.isfinite(r.throughput) or r.throughput <= 0]
    problems += [f"{what} is {value}" for what, value in (("service / baseline", speedup), ("service / ceiling", share))
                 if not math.isfinite(value) or value <= 0]
    if problems:
        raise SystemExit(f"serve_load FAILED: {'; '.join(problems)}")


if __name__ == "__main__":
    main()
