"""The production log: one JSON line per prediction in `<prod_log_dir>/<YYYY-MM-DD>.<host>.jsonl` (UTC days).

Each host writes its own day file: the service's replicas share the folder (a ReadWriteMany claim in
Kubernetes, where appends from several nodes to one file are not atomic), and `read_log` merges the files of a
day in timestamp order.

Lines are appended by one background thread (`BackgroundWriter`), never on the request path: a full queue
drops the line and counts it rather than slow the line down. A crash can only tear the last line of a file;
`read_log` skips and counts such lines, and the writer starts a fresh line after a torn tail so the next
record is never glued to it. Every line carries the image statistics of `components.data.images.image_stats`
(the manifest's own) and a compact embedding (`compact_embedding`), which the drift reference reuses.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

COMPACT_DIMS = 32
COMPACT_SEED = 20240917
_DAY_FORMAT = "%Y-%m-%d"


# ------------------------------------------------------------------ compact embedding


@lru_cache(maxsize=4)
def _projection(in_dim: int, dims: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((in_dim, dims)) / np.sqrt(dims)).astype(np.float32)


def compact_embedding(embedding: np.ndarray | list[float], dims: int = COMPACT_DIMS,
                      seed: int = COMPACT_SEED) -> np.ndarray:
    """The model embedding (..., D) projected to `dims` values by a fixed seeded Gaussian random projection.

    Johnson-Lindenstrauss: distances between images are kept up to a small factor, so drift measured on
    the compact vectors follows drift of the full embedding. The production log and the drift reference
    both call this function, with the same seed, so their vectors are comparable.
    """
    array = np.asarray(embedding, dtype=np.float32)
    return array @ _projection(array.shape[-1], dims, seed)


# ------------------------------------------------------------------ writing


def day_file(folder: Path, when: datetime, writer: str | None = None) -> Path:
    """The log file of the UTC day of `when` (of one `writer`, a host, when given)."""
    day = when.astimezone(UTC).strftime(_DAY_FORMAT)
    return folder / (f"{day}.{writer}.jsonl" if writer else f"{day}.jsonl")


def writer_name() -> str:
    """This host's name as a file-name part (a Kubernetes pod's name)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", socket.gethostname()).strip("-") or "host"


def _file_day(path: Path) -> date | None:
    """The day of a log file (`<day>.jsonl`, `<day>.<writer>.jsonl`) or review-queue folder (`<day>`)."""
    try:
        return datetime.strptime(path.name.split(".", 1)[0], _DAY_FORMAT).date()
    except ValueError:
        return None


def prune_days(folder: Path, keep_days: int, today: date | None = None) -> list[Path]:
    """Delete the log files (or review-queue day folders) older than `keep_days`; returns what was deleted."""
    import shutil

    if not folder.is_dir():
        return []
    cutoff = (today or datetime.now(UTC).date()) - timedelta(days=keep_days)
    removed = []
    for entry in sorted(folder.iterdir()):
        day = _file_day(entry)
        if day is None or day >= cutoff:
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    if removed:
        log.info("retention: deleted %d entries older than %d days from %s", len(removed), keep_days, folder)
    return removed


def append_line(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line; starts a new line first when the file ends in a torn (unterminated) line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, separators=(",", ":"), default=str) + "\n"
    with path.open("ab+") as handle:
        if handle.tell() > 0:
            handle.seek(-1, 2)
            if handle.read(1) != b"\n":
                handle.write(b"\n")
        handle.write(line.encode())


class BackgroundWriter:
    """One daemon thread running queued writes (log lines, review items) off the request path. The queue is
    bounded by count and by the bytes its writes hold (a review item holds its upload): a stalled disk drops
    and counts writes rather than filling the memory with pictures."""

    def __init__(self, max_queue: int = 10_000, name: str = "prediction-log",
                 on_drop: Callable[[], None] | None = None, on_error: Callable[[], None] | None = None,
                 max_bytes: int = 512 * 2**20) -> None:
        self._queue: queue.Queue[tuple[Callable[[], None], int] | None] = queue.Queue(maxsize=max_queue)
        self._on_drop, self._on_error = on_drop, on_error
        self._max_bytes, self._queued_bytes, self._bytes_lock = max_bytes, 0, threading.Lock()
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, task: Callable[[], None], size: int = 0) -> bool:
        """Queue a write holding `size` bytes; False (and counted) when the queue is full. Never blocks."""
        with self._bytes_lock:
            fits = size == 0 or self._queued_bytes == 0 or self._queued_bytes + size <= self._max_bytes
            if fits:
                self._queued_bytes += size
        try:
            if not fits:
                raise queue.Full
            self._queue.put_nowait((task, size))
            return True
        except queue.Full:
            if fits:
                self._release(size)
            self.dropped += 1
            if self._on_drop:
                self._on_drop()
            return False

    def _release(self, size: int) -> None:
        with self._bytes_lock:
            self._queued_bytes -= size

    def _run(self) -> None:
        while True:
            entry = self._queue.get()
            if entry is None:
                return
            task, size = entry
            try:
                task()
            except Exception:  # one bad write must not stop the log
                log.exception("background write failed")
                if self._on_error:
                    self._on_error()
            finally:
                self._release(size)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued so far is written; False on timeout."""
        done = threading.Event()
        if not self.submit(done.set):
            return False
        return done.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, then stop the thread."""
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            log.warning("prediction log queue still full at shutdown; %d writes lost", self._queue.qsize())
            return
        self._thread.join(timeout)


class PredictionLog:
    """Appends prediction records to the day's file through a BackgroundWriter, with retention."""

    def __init__(self, folder: Path, writer: BackgroundWriter, retention_days: int, name: str | None = None) -> None:
        self.folder = folder
        self.writer = writer
        self.name = name or writer_name()
        self.retention_days = retention_days
        self._pruned_on: date | None = None

    def append(self, record: dict[str, Any]) -> bool:
        """Queue one record (it must have an ISO `timestamp`); never blocks."""
        return self.writer.submit(lambda: self._write(record))

    def _write(self, record: dict[str, Any]) -> None:
        now = datetime.now(UTC)
        if self._pruned_on != now.date():
            self._pruned_on = now.date()
            prune_days(self.folder, self.retention_days, now.date())
        append_line(day_file(self.folder, datetime.fromisoformat(record["timestamp"]), self.name), record)


# ------------------------------------------------------------------ reading


@dataclass
class LogRead:
    """Records read from the production log, and how many lines were skipped as torn or invalid."""

    records: list[dict[str, Any]] = field(default_factory=list)
    skipped: int = 0
    files: list[Path] = field(default_factory=list)

    def frame(self) -> Any:
        """The records as a pandas DataFrame (metadata flattened to metadata.<key> columns)."""
        import pandas as pd

        return pd.json_normalize(self.records) if self.records else pd.DataFrame()


def _as_utc(value: datetime | date | str | None) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if not isinstance(value, datetime):
        value = datetime(value.year, value.month, value.day)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _lines(path: Path) -> Iterator[tuple[bytes, bool]]:
    """(line, terminated) for each line of a file."""
    with path.open("rb") as handle:
        for raw in handle:
            yield raw, raw.endswith(b"\n")


def read_log(folder: Path, since: datetime | date | str | None = None,
             until: datetime | date | str | None = None) -> LogRead:
    """Records with since <= timestamp < until (UTC; naive values are UTC), skipping torn or invalid lines."""
    start, end = _as_utc(since), _as_utc(until)
    result = LogRead()
    if not folder.is_dir():
        return result
    rows: list[tuple[datetime, dict[str, Any]]] = []
    for path in sorted(folder.glob("*.jsonl")):
        day = _file_day(path)
        if day is None:
            continue
        day_start = datetime(day.year, day.month, day.day, tzinfo=UTC)
        if (start and day_start + timedelta(days=1) <= start) or (end and day_start >= end):
            continue
        result.files.append(path)
        for raw, terminated in _lines(path):
            if not raw.strip():
                continue
            try:
                if not terminated:
                    raise ValueError("unterminated last line")
                record = json.loads(raw)
                if not isinstance(record, dict) or not isinstance(record.get("timestamp"), str):
                    raise TypeError("not a record with a timestamp")
                stamp = _as_utc(record["timestamp"])
            except (ValueError, TypeError):
                result.skipped += 1
                continue
            if (start and stamp < start) or (end and stamp >= end):
                continue
            rows.append((stamp, record))
    if len(result.files) > 1:  # several writers (replicas) per day: one timeline (the sort is stable)
        rows.sort(key=lambda row: row[0])
    result.records = [record for _, record in rows]
    if result.skipped:
        log.warning("production log %s: skipped %d torn or invalid lines", folder, result.skipped)
    return result


def utc_now_iso() -> str:
    """The current UTC time as an ISO string with milliseconds."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def monotonic_ms(start: float) -> float:
    """Milliseconds since a perf_counter() start, rounded to 0.01 ms."""
    return round((time.perf_counter() - start) * 1000, 2)
