"""Adaptive batching of single images across requests, with BentoML's own algorithm (CorkDispatcher).

`@bentoml.api(batchable=True)` batches only the one list argument of one endpoint, and it calls the batch
with the keyword arguments of whichever request arrived last, so per-request metadata (line, camera,
part_id) and a one-image `/predict` cannot go through it. The service therefore decodes and prepares
each image per request and hands the prepared tensor to this batcher: the same CorkDispatcher BentoML
uses behind `batchable=True` (one batch in flight, adaptive wait, requests that would exceed
`max_latency_ms` refused with 503), so images from `/predict`, `/predict_batch` and `/explain` share
forward passes. On CPU set `max_latency_ms` well above one full batch's compute time (see params.yaml).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger(__name__)


class Batcher:
    """`await batcher(item)` -> that item's output, computed with other pending items in one call of `infer`."""

    def __init__(self, infer: Callable[[Sequence[Any]], Sequence[Any]], max_batch_size: int,
                 max_latency_ms: int) -> None:
        from bentoml._internal.marshal.dispatcher import CorkDispatcher

        self.infer = infer
        self.max_batch_size = max_batch_size
        self.max_latency_ms = max_latency_ms
        self._dispatcher = CorkDispatcher(max_latency_in_ms=max_latency_ms, max_batch_size=max_batch_size,
                                          fallback=self._overloaded, get_batch_size=lambda _item: 1,
                                          batch_dim=(0, 0))
        self._call = self._dispatcher(self._run)
        _bound_cork_wait(self._dispatcher.optimizer)

    def _overloaded(self) -> Any:
        from bentoml.exceptions import ServiceUnavailable

        raise ServiceUnavailable(f"inference queue over its {self.max_latency_ms} ms latency budget; retry, "
                                 "or raise serve.batching.*.max_latency_ms")

    async def _run(self, items: Sequence[Any]) -> Sequence[Any]:
        import anyio

        return await anyio.to_thread.run_sync(self.infer, list(items))

    async def __call__(self, item: Any) -> Any:
        return await self._call(item)

    def shutdown(self) -> None:
        """Cancel pending items and stop the dispatcher."""
        self._dispatcher.shutdown()


def _bound_cork_wait(optimizer: Any) -> None:
    """Keep the dispatcher from holding a lone image longer than computing one image takes.

    CorkDispatcher holds a request to fill a batch for up to `optimizer.wait`, which it re-estimates every few
    seconds as the mean wait of the last 50 batches. After a burst those waits were long (requests queued
    behind running batches), so at line rate it then holds each image that long, which keeps the mean up: in
    benchmarks/serve_load.py the median latency at 10 images/s was 130 ms right after 16 clients instead of
    30-45 ms. Batches still form under load (requests queue while a batch runs); they just never wait for
    company longer than a one-image batch's estimated compute time (o_a + o_b).
    """
    refresh = optimizer.trigger_refresh

    def bounded_refresh() -> None:
        refresh()
        optimizer.wait = min(optimizer.wait, optimizer.o_a + optimizer.o_b)

    optimizer.trigger_refresh = bounded_refresh
