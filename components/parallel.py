"""Process-pool helpers shared by the image workers (manifest building, synthetic generation)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor


def keep_buffers_in_heap() -> None:
    """Stop glibc from mapping and unmapping every image-sized buffer: that page-faults each image afresh.

    By default glibc serves allocations over 128 KiB with mmap and returns them on free, so each 512 px image
    costs ~2000 page faults (about 45% of the CPU time). Raising the mmap and trim thresholds keeps the memory
    in the process heap for reuse. Only called in worker processes, which exit when the run ends.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to tune
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 64 << 20)
    libc.mallopt(m_trim_threshold, 256 << 20)


def init_image_worker() -> None:
    """Initializer of an image worker process: one OpenCV thread, buffers kept in the heap."""
    import cv2

    cv2.setNumThreads(1)  # one process per core already; OpenCV threads would only contend
    keep_buffers_in_heap()


def chunks(items: Sequence, size: int) -> Iterable[Sequence]:
    """Consecutive slices of at most `size` items."""
    for start in range(0, len(items), size):
        yield items[start:start + size]


def image_pool(workers: int, initializer: Callable[..., None] = init_image_worker,
               initargs: tuple = ()) -> ProcessPoolExecutor:
    """Worker processes for image work, forked from a clean forkserver rather than from the caller.

    Forking the caller hangs a worker when the caller has run OpenCV's thread pool (decoding, augmentation,
    serving): the pool's threads do not survive the fork, and the worker's first OpenCV call waits for them.
    The forkserver is started once per process with the image modules loaded, so a pool still starts fast;
    what a worker needs from the caller comes through `initargs`.
    """
    from multiprocessing import get_context

    context = get_context("forkserver")
    context.set_forkserver_preload(["components.validation.facts", "components.data.synth"])
    return ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=initializer,
                               initargs=initargs)
