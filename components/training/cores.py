"""How many compute threads a CPU training may use: the cores that other processes leave free.

OpenMP threads that share a core with another busy process stall each other at every barrier: on a shared
2-core machine, 2 threads under load ran 5-8x slower than 1 thread, so the loop never oversubscribes. It
counts what other processes want rather than what they get: the kernel's count of runnable threads
(/proc/loadavg's fourth field) minus the runnable threads of this process and its children (the loader's
workers), sampled in the background (`OthersLoad`) and averaged between two checks (the loop checks every
10 s of training), and read a few times right before the first epoch (`others_runnable_now`). Two trainings
started together read each other as idle there (both still starting up); the first check 10 s later
splits the cores between them.

Why not the 1-minute load average minus our own thread count: it also held our own short-lived work (start-
up, validation, checkpoint writes, an OpenMP thread spinning while the main thread augments), so with nobody
else on the machine it read 2.8 for 2 compute threads and dropped the demo to one thread for two epochs; and
it lags, so two trainings started together each took both cores (167 s for a first epoch of 56 s). Why not
the CPU time others used: under contention a process gets less than it wants, so that undercounts them.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Self

PROC = Path("/proc")


def free_cores_threads(others: float) -> int:
    """Compute threads for the cores left by `others` runnable threads of other processes (on average).

    A core is given up only when others keep at least 0.75 of one busy: with a threshold of 0.5, a background
    of about half a core (the demo's local Prefect server) cost the CPU profile a thread for some epochs:
    55-60 s each, where the 2-thread epochs around them took 32-36 s.
    """
    cores = len(os.sched_getaffinity(0))
    return max(1, min(cores, cores - int(max(0.0, others) + 0.25)))


def runnable_threads(pid: str = "self") -> int:
    """Threads of a process and of its descendants that are runnable (state R) right now."""
    count = 0
    try:
        tasks = list((PROC / pid / "task").iterdir())
    except OSError:
        return 0
    for task in tasks:
        try:
            count += (task / "stat").read_text().rsplit(")", 1)[1].split()[0] == "R"
            children = (task / "children").read_text().split()  # a kernel without it: no children counted
        except (OSError, IndexError):
            continue  # the thread ended while we looked
        count += sum(runnable_threads(child) for child in children)
    return count


def others_runnable() -> float | None:
    """Runnable threads of other processes right now (None where Linux's /proc is not there)."""
    try:
        running = int((PROC / "loadavg").read_text().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return None
    return float(max(0, running - runnable_threads()))


def others_runnable_now(samples: int = 9, interval_s: float = 0.05) -> float:
    """The median of a few quick reads of `others_runnable` (0.0 without /proc: no evidence of others)."""
    reads = []
    for index in range(samples):
        read = others_runnable()
        if read is None:
            return 0.0
        reads.append(read)
        if index + 1 < samples:
            time.sleep(interval_s)
    return sorted(reads)[len(reads) // 2]


class OthersLoad:
    """Samples `others_runnable` in a background thread; `take()` gives the mean since the last take."""

    def __init__(self, interval_s: float = 0.25) -> None:
        self.interval_s = interval_s
        self._total, self._count = 0.0, 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="others-load", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            read = others_runnable()
            if read is None:
                return
            with self._lock:
                self._total += read
                self._count += 1

    def take(self) -> float | None:
        """Mean runnable threads of others since the last take; None when nothing was sampled."""
        with self._lock:
            mean = self._total / self._count if self._count else None
            self._total, self._count = 0.0, 0
        return mean
