"""The adaptive batcher's bound on how long BentoML's CorkDispatcher holds a lone image."""

from __future__ import annotations

import asyncio

from components.serving.batching import Batcher


def test_after_a_burst_a_lone_image_is_not_held_for_the_bursts_queueing_time() -> None:
    batcher = Batcher(lambda items: list(items), max_batch_size=4, max_latency_ms=30_000)
    optimizer = batcher._dispatcher.optimizer
    for i in range(60):  # a burst: batches of 1-4 taking 10 ms an image, first requests queued 150 ms
        optimizer.log_outbound(n=1 + i % 4, wait=0.150, duration=0.010 * (1 + i % 4))
    optimizer.trigger_refresh()
    assert 0.009 < optimizer.o_a < 0.011 and optimizer.o_b < 0.001, "BentoML's own fit of the batch cost"
    assert optimizer.wait <= optimizer.o_a + optimizer.o_b < 0.02, "unbounded, BentoML would hold images 150 ms"


def test_the_batcher_still_batches_what_is_queued() -> None:
    seen: list[int] = []

    def infer(items):
        seen.append(len(items))
        return [item * 2 for item in items]

    async def main() -> list[int]:
        batcher = Batcher(infer, max_batch_size=4, max_latency_ms=30_000)
        try:
            return list(await asyncio.gather(*(batcher(i) for i in range(12))))
        finally:
            batcher.shutdown()

    assert asyncio.run(main()) == [i * 2 for i in range(12)]
    assert sum(seen) == 12 and max(seen) <= 4 and len(seen) < 12, f"batch sizes {seen}"
