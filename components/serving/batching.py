"""Adaptive batching of single images across requests: inference threads that run whatever is queued.

`@bentoml.api(batchable=True)` batches only the one list argument of one endpoint, and it calls the batch
with the keyword arguments of whichever request arrived last, so per-request metadata (line, camera,
part_id) and a one-image `/predict` cannot go through it. The service therefore decodes and prepares
each image per request and hands the prepared tensor to this batcher, so images from `/predict`,
`/predict_batch` and `/explain` share forward passes.

The policy is dynamic batching without a hold: an inference thread takes everything queued (up to
`max_batch_size`) the moment its previous batch ends. A lone image at the line rate runs at once, on all
cores; under load, images queue while batches compute, so batches fill by themselves and the engine never
waits for company. There is one such thread per stream of the engine (OpenVINO's throughput streams: two on
2 cores, each on one core), and each runs its batches on its own stream, so one stream's core slowed by the
request work of the event loop does not leave the other's idle at the end of a shared batch.

The threads start the next batch themselves, not the event loop: with BentoML's CorkDispatcher the next
batch could only start once the event loop had finished answering the last one (the responses, the log
lines and the next requests' parsing all run there), which left the engine idle for a median 9 ms between
batches of 94 ms in `benchmarks/serve_load.py` (busy 91% of the time; README "Figures"). An image that would
wait longer than `max_latency_ms` is refused with 503, as BentoML's own dispatcher does; an idle engine
refuses nothing.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class _Job:
    item: Any
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    queued_at: float


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    """Resolve `future` (on its loop; the request may have been cancelled meanwhile)."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _answer(job: _Job, result: Any = None, error: BaseException | None = None) -> None:
    """Hand a job its result from the inference thread (nothing to do once its event loop has closed)."""
    try:
        job.loop.call_soon_threadsafe(_settle, job.future, result, error)
    except RuntimeError:
        log.debug("event loop closed before an answer could be delivered")


class Batcher:
    """`await batcher(item)` -> that item's output, computed with other queued items in one call of `infer`.

    `infer(items, stream)` runs in one of `streams` inference threads; `stream` is that thread's index, or None
    for a lone image while no other batch computes (the engine may then use all its cores on it).
    """

    def __init__(self, infer: Callable[[Sequence[Any], int | None], Sequence[Any]], max_batch_size: int,
                 max_latency_ms: int, streams: int = 1) -> None:
        self.infer = infer
        self.max_batch_size = max_batch_size
        self.max_latency_ms = max_latency_ms
        self.streams = max(1, streams)
        self._queue: deque[_Job] = deque()
        self._ready = threading.Condition()
        self._running = [0] * self.streams  # images each thread is computing now
        self._alive = self.streams
        self._closed: str | None = None  # why new images are refused, once they are
        self._seconds_per_batch: float | None = None  # moving average of a batch's compute time on one stream
        for i in range(self.streams):
            threading.Thread(target=self._work, args=(i,), name=f"inference-{i}", daemon=True).start()

    # ------------------------------------------------------------ request side (event loop)

    async def __call__(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        job = _Job(item, loop.create_future(), loop, time.perf_counter())
        with self._ready:
            if self._closed:
                raise self._unavailable(self._closed)
            # an idle engine takes the image at once, whatever the estimate says: refusing it would leave the
            # estimate (only batches update it) stuck above the budget after one slow batch, refusing for ever
            busy = bool(self._queue) or any(self._running)
            if busy and self._expected_wait(len(self._queue) + 1) > self.max_latency_ms / 1000:
                raise self._overloaded()
            self._queue.append(job)
            self._ready.notify()
        return await job.future

    @property
    def pending(self) -> int:
        """Images queued or computing."""
        with self._ready:
            return len(self._queue) + sum(self._running)

    @property
    def stopped(self) -> bool:
        """No inference thread runs any more (shut down, or every one died)."""
        with self._ready:
            return self._alive == 0

    def shutdown(self) -> None:
        """Refuse new images, fail the queued ones with 503, and let the threads end after their current batch."""
        self._close("this model version was retired while the request was queued; retry")

    def _close(self, reason: str) -> None:
        with self._ready:
            self._closed = self._closed or reason
            dropped, self._queue = list(self._queue), deque()
            self._ready.notify_all()
        for job in dropped:
            _answer(job, error=self._unavailable(reason))

    # ------------------------------------------------------------ inference threads

    def _work(self, stream: int) -> None:
        try:
            self._serve(stream)
        finally:
            with self._ready:
                self._alive -= 1
                last = self._alive == 0 and not self._closed
            if last:  # nothing would ever answer what is queued: refuse it, and readiness fails (service.py)
                log.critical("every inference thread has stopped; the service must be restarted")
                self._close("the inference threads stopped (see the service log); restart the service")

    def _serve(self, stream: int) -> None:
        while True:
            with self._ready:
                while not self._queue and not self._closed:
                    self._ready.wait()
                if self._closed:
                    return
                jobs = self._take()
                alone = len(jobs) == 1 and not any(self._running)
                self._running[stream] = len(jobs)
            if jobs and not self._run(jobs, None if alone or self.streams == 1 else stream, stream):
                return  # SystemExit or the like: this thread ends

    def _take(self) -> list[_Job]:
        """Up to max_batch_size queued jobs still wanted; those queued past the latency budget get 503."""
        jobs: list[_Job] = []
        now = time.perf_counter()
        while self._queue and len(jobs) < self.max_batch_size:
            job = self._queue.popleft()
            if job.future.done():  # the request was cancelled (client gone)
                continue
            if now - job.queued_at > self.max_latency_ms / 1000:
                _answer(job, error=self._overloaded())
                continue
            jobs.append(job)
        return jobs

    def _run(self, jobs: list[_Job], stream: int | None, thread: int) -> bool:
        """Compute one batch on `stream` and answer its jobs; False when the thread must end.

        Inference thread `thread` counts as idle again before the answers go out, so a caller's next image
        finds it so.
        """
        started = time.perf_counter()
        outputs: list[Any] = []
        error: BaseException | None = None
        try:
            outputs = list(self.infer([job.item for job in jobs], stream))
            if len(outputs) != len(jobs):
                raise RuntimeError(f"infer returned {len(outputs)} outputs for {len(jobs)} inputs")
        except BaseException as exc:  # every caller of this batch gets the error
            log.exception("inference failed for a batch of %d", len(jobs))
            error = exc
        with self._ready:
            self._running[thread] = 0
            if error is None and (stream is not None or self.streams == 1):
                self._learn(time.perf_counter() - started)
        if error is not None:
            failure = error if isinstance(error, Exception) else RuntimeError(f"inference stopped: {error!r}")
            for job in jobs:
                _answer(job, error=failure)
            return isinstance(error, Exception)
        for job, output in zip(jobs, outputs, strict=True):
            _answer(job, output)
        return True

    # ------------------------------------------------------------ latency budget

    def _learn(self, seconds: float) -> None:
        """Track how long a batch takes, whatever its size.

        At low load batches are small, so this under-estimates a full batch: images are admitted rather than
        refused early (a GPU runs 32 images in little more than the time of one), and `_take` still refuses any
        that then waited past the budget. Under load batches are full and the estimate is right.
        """
        previous = self._seconds_per_batch
        self._seconds_per_batch = seconds if previous is None else 0.8 * previous + 0.2 * seconds

    def _expected_wait(self, queued: int) -> float:
        """Seconds until the `queued`-th queued image would be answered: the batches ahead of it, then its own."""
        if self._seconds_per_batch is None:
            return 0.0
        rounds = math.ceil(math.ceil(queued / self.max_batch_size) / self.streams) + (1 if any(self._running) else 0)
        return rounds * self._seconds_per_batch

    def _overloaded(self) -> Exception:
        return self._unavailable(f"inference queue over its {self.max_latency_ms} ms latency budget; retry, or "
                                 "raise serve.batching.*.max_latency_ms")

    @staticmethod
    def _unavailable(message: str) -> Exception:
        from bentoml.exceptions import ServiceUnavailable

        return ServiceUnavailable(message)
