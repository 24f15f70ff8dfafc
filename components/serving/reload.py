"""Hot swap: the running service follows its deployment record, without a restart and without dropping requests.

Promotion rewrites `<state>/deployed.json` atomically (tmp + rename). A watcher thread in the service sees the
new file (inode, size, mtime), loads and warms the new engine beside the old one, then swaps one reference.
Every request takes that reference once when it starts, so it runs start to end on one model (its result
names that version): requests already holding the old model finish on it, later ones run on the new one.
The old batcher stops once no request holds the old model and its queue is empty (a request may hold it
while still decoding its image, before it has queued anything). A record that cannot be loaded is refused:
the old model keeps serving, and the failure is logged and counted (`model_reloads_total{outcome="failed"}`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.config import Settings
from components.serving import metrics
from components.serving.batching import Batcher
from components.serving.deployment import DeploymentRecord, load_served, read_record_file
from components.serving.params import ServeParams
from components.serving.replicas import ReplicaReport

log = logging.getLogger(__name__)

Stamp = tuple[int, int, int]


def file_stamp(path: Path) -> Stamp | None:
    """What changes when the record is replaced (inode, size, mtime); None when there is no record."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


@dataclass
class Deployment:
    """One loaded model version as requests use it: record, engine, fp32 reference and its own batcher."""

    record: DeploymentRecord
    engine: Any  # a Predictor (or a fast engine with the same interface)
    reference: Any
    fast_path: str
    batcher: Batcher
    stamp: Stamp | None
    requests: int = 0  # requests that took this deployment and have not finished (retire waits for them)
    loop: asyncio.AbstractEventLoop | None = None  # the event loop those requests run on (None: never held)

    @contextmanager
    def serving(self) -> Iterator[Deployment]:
        """Hold this deployment for one request: `retire` stops its batcher only after the request is done.

        Enter it on the event loop in the same step that reads the service's current deployment (no await in
        between), so that a swap cannot retire the deployment between the read and the count.
        """
        self.loop = asyncio.get_running_loop()
        self.requests += 1
        try:
            yield self
        finally:
            self.requests -= 1

    @property
    def model_version(self) -> str:
        return self.record.model_version

    @property
    def labels(self) -> tuple[str, str, str, str]:
        """The labels of `served_model_info` for this deployment."""
        return self.model_version, self.fast_path, str(self.engine.device), f"{self.record.threshold:.4f}"


def _infer(engine: Any, tensors: Sequence[Any], stream: int | None) -> list[Any]:
    """One forward pass over the tensors of several requests (called by the batcher, in an inference thread)."""
    import torch

    started = time.perf_counter()
    predictions = engine.predict_tensors(torch.stack(list(tensors)), with_embedding=True, stream=stream)
    metrics.BATCH_SECONDS.observe(time.perf_counter() - started)
    metrics.BATCH_SIZE.observe(len(tensors))
    return predictions


def load_deployment(settings: Settings, serve: ServeParams, record: DeploymentRecord, max_pixels: int,
                    stamp: Stamp | None) -> Deployment:
    """Load the record's model on this machine's device, give it a batcher, and warm it up."""
    import numpy as np
    import torch

    engine, reference, fast_path = load_served(settings, record, max_pixels)
    batching = serve.batching_for(str(engine.device))
    batcher = Batcher(lambda tensors, stream: _infer(engine, tensors, stream), batching.max_batch_size,
                      batching.max_latency_ms, streams=engine.streams)
    tensor = engine.prepare(np.full((32, 32, 3), 128, dtype=np.uint8))
    # the first request pays no compile or allocation cost. On a GPU the first pass at each new batch size is
    # slower (kernel selection); the GPU benchmark saw 5% 503s in its first loaded phase only, likely that
    # (README "Figures"), so every size is warmed there
    sizes = range(1, batching.max_batch_size + 1) if engine.device.type == "cuda" else {1, 2, batching.max_batch_size}
    for n in sorted(sizes):
        for stream in [None, *(range(engine.streams) if engine.streams > 1 else [])]:
            engine.forward(torch.stack([tensor] * n), stream)
    return Deployment(record, engine, reference, fast_path, batcher, stamp)


def retire(deployment: Deployment, grace_s: float) -> None:
    """Stop a swapped-out deployment's batcher once no request holds it and nothing is queued on it.

    Called from the watcher thread; the wait runs on the event loop where requests hold the deployment (none
    ever held it: it stops at once). After `grace_s` the batcher stops anyway (a request still waiting on it
    then fails).
    """
    loop = deployment.loop
    if loop is None:
        deployment.batcher.shutdown()
        return
    def busy() -> bool:
        return bool(deployment.requests or deployment.batcher.pending)

    async def drain() -> None:
        deadline = loop.time() + grace_s
        while busy() and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if busy():
            log.warning("%s retired with %d request(s) still on it after %.0f s", deployment.model_version,
                        deployment.requests, grace_s)
        deployment.batcher.shutdown()

    asyncio.run_coroutine_threadsafe(drain(), loop)


class RecordWatcher:
    """A daemon thread that calls `load` for each new deployment record and hands the result to `swap`."""

    def __init__(self, path: Path, current: Deployment, load: Callable[[DeploymentRecord, Stamp | None], Deployment],
                 swap: Callable[[Deployment], None], poll_s: float, report: ReplicaReport | None = None) -> None:
        self.path, self.current, self.load, self.swap, self.poll_s = path, current, load, swap, poll_s
        self.report = report  # this replica's status file (components/serving/replicas.py), kept current
        self.seen = current.stamp
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="deployment-record-watcher", daemon=True)

    def start(self) -> RecordWatcher:
        self._report_serving()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.check()

    def check(self) -> None:
        """Swap onto the record on disk when it names another model, engine or threshold than the one served."""
        stamp = file_stamp(self.path)
        if stamp is None or stamp == self.seen:
            return  # unchanged, or deleted: keep serving what was loaded
        self.seen = stamp
        record = None
        try:
            record = read_record_file(self.path)
            served = self.current.record
            if (record.model_uri, record.fast_path, record.threshold) == (served.model_uri, served.fast_path,
                                                                           served.threshold):
                self.current.record, self.current.stamp = record, stamp
                self._report_serving()
                return
            log.info("deployment record changed: loading %s (%s) beside %s", record.model_version,
                     record.fast_path, served.model_version)
            if self.report:
                self.report.loading(record.deployed_at, record.model_version)
            started = time.perf_counter()
            loaded = self.load(record, stamp)
        except Exception as exc:  # noqa: BLE001 - whatever breaks, the old model keeps serving
            metrics.MODEL_RELOADS.labels("failed").inc()
            log.error("deployment record %s not loaded, still serving %s: %s", self.path,
                      self.current.model_version, exc)
            if self.report:
                self.report.refused(record and record.deployed_at, record and record.model_version, str(exc))
            return
        previous, self.current = self.current, loaded
        self.swap(loaded)
        self._report_serving()
        metrics.MODEL_RELOADS.labels("swapped").inc()
        log.info("now serving %s (%s on %s; loaded in %.1f s); %s retires once its queue is empty",
                 loaded.model_version, loaded.fast_path, loaded.engine.device, time.perf_counter() - started,
                 previous.model_version)

    def _report_serving(self) -> None:
        if self.report:
            served = self.current
            self.report.serving(served.model_version, served.fast_path, str(served.engine.device),
                                served.record.deployed_at)
