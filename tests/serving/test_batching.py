"""The adaptive batcher: batches what is queued, one inference thread per engine stream, a latency budget."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from bentoml.exceptions import ServiceUnavailable

from components.serving.batching import Batcher
from tests.serving.conftest import until


class Recorder:
    """An `infer` that doubles its items, taking `seconds` per batch, and notes each call's stream and overlap."""

    def __init__(self, seconds: float = 0.0, fail_on: int | None = None) -> None:
        self.seconds, self.fail_on = seconds, fail_on
        self.calls: list[tuple[int | None, int]] = []  # (stream, batch size)
        self.active = self.most_active = 0
        self._lock = threading.Lock()

    def __call__(self, items, stream):
        with self._lock:
            self.calls.append((stream, len(items)))
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        try:
            time.sleep(self.seconds)
            if self.fail_on is not None and self.fail_on in items:
                raise RuntimeError("engine fault")
            return [item * 2 for item in items]
        finally:
            with self._lock:
                self.active -= 1


def run(batcher: Batcher, coroutine):
    async def main():
        try:
            return await coroutine(batcher)
        finally:
            batcher.shutdown()

    return asyncio.run(main())


def test_the_batcher_batches_what_is_queued() -> None:
    infer = Recorder(seconds=0.02)
    results = run(Batcher(infer, max_batch_size=4, max_latency_ms=30_000),
                  lambda b: asyncio.gather(*(b(i) for i in range(12))))
    assert results == [i * 2 for i in range(12)]
    sizes = [size for _, size in infer.calls]
    assert sum(sizes) == 12 and max(sizes) <= 4 and len(sizes) < 12, f"batch sizes {sizes}"


def test_a_lone_image_runs_at_once_on_the_whole_engine() -> None:
    infer = Recorder()

    async def one_at_a_time(batcher):
        started = time.perf_counter()
        answers = [await batcher(i) for i in range(5)]
        return answers, time.perf_counter() - started

    answers, seconds = run(Batcher(infer, max_batch_size=4, max_latency_ms=30_000, streams=2), one_at_a_time)
    assert answers == [0, 2, 4, 6, 8] and seconds < 0.5, "no image is held back waiting for company"
    assert infer.calls == [(None, 1)] * 5, "alone, an image may use every stream's cores"


def test_under_load_each_stream_computes_its_own_batches_side_by_side() -> None:
    infer = Recorder(seconds=0.05)
    results = run(Batcher(infer, max_batch_size=2, max_latency_ms=30_000, streams=2),
                  lambda b: asyncio.gather(*(b(i) for i in range(16))))
    assert results == [i * 2 for i in range(16)]
    assert {stream for stream, _ in infer.calls} >= {0, 1} and infer.most_active == 2
    assert all(size <= 2 for _, size in infer.calls)


def test_images_over_the_latency_budget_get_503_and_the_rest_are_answered() -> None:
    infer = Recorder(seconds=0.1)

    async def burst(batcher):
        await batcher(0)  # one batch teaches the batcher what a batch costs
        return await asyncio.gather(*(batcher(i) for i in range(1, 9)), return_exceptions=True)

    outcomes = run(Batcher(infer, max_batch_size=1, max_latency_ms=250), burst)
    refused = [o for o in outcomes if isinstance(o, ServiceUnavailable)]
    answered = [o for o in outcomes if not isinstance(o, BaseException)]
    assert refused and answered, outcomes
    assert "latency budget" in str(refused[0]) and "max_latency_ms" in str(refused[0])
    assert len(answered) <= 3, "with 100 ms a batch, a 250 ms budget admits two or three queued images"


def test_a_full_batch_after_lone_images_is_not_refused_on_their_timing() -> None:
    infer = Recorder(seconds=0.1)  # as on a GPU: a batch of 32 takes about as long as one image

    async def burst(batcher):
        await batcher(0)  # lone images teach the batcher 0.1 s a batch
        return await asyncio.gather(*(batcher(i) for i in range(32)), return_exceptions=True)

    outcomes = run(Batcher(infer, max_batch_size=32, max_latency_ms=250), burst)
    assert outcomes == [i * 2 for i in range(32)], "a /predict_batch of 32 fits the 250 ms budget"


def test_one_batch_slower_than_the_budget_does_not_refuse_every_later_image() -> None:
    """Seen on a GPU: a batch took longer than the 500 ms budget (with cuDNN's autotuner on), the estimate stayed
    above the budget, and with only batches updating it, every later image got 503."""
    infer = Recorder()
    infer.seconds = 0.4

    async def slow_then_fast(batcher):
        await batcher(0)  # one slow batch: the estimate is now 0.4 s a batch, over the 250 ms budget
        infer.seconds = 0.0
        answers = [await batcher(i) for i in range(1, 20)]  # lone images, one after another
        return answers, batcher._seconds_per_batch

    answers, estimate = run(Batcher(infer, max_batch_size=4, max_latency_ms=250), slow_then_fast)
    assert answers == [i * 2 for i in range(1, 20)], "an idle engine takes the image"
    assert estimate < 0.05, "the fast batches brought the estimate back down"


def test_an_engine_error_reaches_every_image_of_its_batch_and_the_next_batch_is_served() -> None:
    infer = Recorder(seconds=0.02, fail_on=3)

    async def scenario(batcher):
        first = await asyncio.gather(*(batcher(i) for i in range(4)), return_exceptions=True)
        return first, await batcher(5)

    first, after = run(Batcher(infer, max_batch_size=4, max_latency_ms=30_000), scenario)
    failed = [o for o in first if isinstance(o, RuntimeError)]
    assert failed and all("engine fault" in str(o) for o in failed) and after == 10


def test_shutdown_refuses_queued_and_new_images_and_stops_the_threads() -> None:
    infer = Recorder(seconds=0.2)
    batcher = Batcher(infer, max_batch_size=1, max_latency_ms=30_000, streams=2)

    async def scenario():
        tasks = [asyncio.ensure_future(batcher(i)) for i in range(6)]
        await until(lambda: sum(batcher._running) == 2)  # two computing, four queued
        await asyncio.to_thread(batcher.shutdown)
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        with pytest.raises(ServiceUnavailable, match="retired"):
            await batcher(9)
        return outcomes

    outcomes = asyncio.run(scenario())
    assert sum(isinstance(o, ServiceUnavailable) for o in outcomes) == 4
    assert sorted(o for o in outcomes if isinstance(o, int)) == [0, 2], "the running batches finish"
    asyncio.run(until(lambda: batcher.stopped))
    assert batcher.pending == 0


class _Fatal(BaseException):
    """Not an Exception: ends the inference thread that meets it (as SystemExit would)."""


def test_when_the_inference_threads_die_nothing_hangs_and_the_batcher_says_so(caplog) -> None:
    def infer(items, stream):
        time.sleep(0.1)
        raise _Fatal("out of the blue")

    batcher = Batcher(infer, max_batch_size=1, max_latency_ms=30_000)

    async def scenario():
        outcomes = await asyncio.wait_for(asyncio.gather(*(batcher(i) for i in range(3)), return_exceptions=True), 5)
        with pytest.raises(ServiceUnavailable, match="restart the service"):
            await batcher(9)
        return outcomes

    first, *queued = asyncio.run(scenario())
    assert isinstance(first, RuntimeError) and "inference stopped" in str(first)
    assert all(isinstance(o, ServiceUnavailable) and "inference threads stopped" in str(o) for o in queued), queued
    assert batcher.stopped, "the service's readiness check reads this"
    assert "must be restarted" in caplog.text
