"""The production log: compact embeddings, non-blocking appends, torn lines after a crash, time windows, retention."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np

from components.serving.predlog import (
    COMPACT_DIMS,
    BackgroundWriter,
    PredictionLog,
    append_line,
    compact_embedding,
    day_file,
    prune_days,
    read_log,
    writer_name,
)
from tests.conftest import REPO_ROOT


def record(i: int, when: datetime | None = None) -> dict:
    stamp = (when or datetime.now(UTC)).isoformat(timespec="milliseconds")
    return {"timestamp": stamp, "request_id": f"r{i}", "decision": "accept", "embedding": [0.1] * COMPACT_DIMS}


def test_compact_embedding_is_a_fixed_projection() -> None:
    rng = np.random.default_rng(0)
    full = rng.standard_normal((10, 512)).astype(np.float32)
    compact = compact_embedding(full)
    assert compact.shape == (10, COMPACT_DIMS)
    np.testing.assert_array_equal(compact, compact_embedding(full))  # same seed, same projection
    np.testing.assert_allclose(compact[3], compact_embedding(full[3]), rtol=1e-5, atol=1e-6)
    original = np.linalg.norm(full[:, None] - full[None], axis=-1)[np.triu_indices(10, 1)]
    projected = np.linalg.norm(compact[:, None] - compact[None], axis=-1)[np.triu_indices(10, 1)]
    assert 0.5 < float(np.median(projected / original)) < 1.5, "distances are roughly kept"


def test_background_writer_appends_day_files_and_never_blocks(tmp_path: Path) -> None:
    writer = BackgroundWriter(max_queue=10_000)
    log = PredictionLog(tmp_path, writer, retention_days=30)
    started = time.perf_counter()
    for i in range(500):
        assert log.append(record(i))
    assert time.perf_counter() - started < 0.5, "appending only queues"
    assert writer.flush()
    result = read_log(tmp_path)
    assert [r["request_id"] for r in result.records] == [f"r{i}" for i in range(500)] and result.skipped == 0
    assert result.files == [day_file(tmp_path, datetime.now(UTC), writer_name())]
    assert result.files[0].name.endswith(f".{writer_name()}.jsonl"), "each host writes its own day file"
    writer.close()


def test_a_stalled_writer_drops_writes_past_its_byte_bound_instead_of_holding_every_picture() -> None:
    """A review item holds its upload until written: behind a stalled disk the queue stops at max_bytes (one
    write larger than that still goes when nothing is queued), and takes writes again once it drains."""
    import threading

    drops: list[int] = []
    writer = BackgroundWriter(max_queue=10_000, max_bytes=100, on_drop=lambda: drops.append(1))
    disk = threading.Event()
    written: list[str] = []
    assert writer.submit(disk.wait, size=60)  # the write the disk holds up
    assert writer.submit(lambda: written.append("small"), size=40)
    assert not writer.submit(lambda: written.append("over"), size=1) and writer.dropped == 1 and drops == [1]
    disk.set()
    assert writer.flush()
    assert writer.submit(lambda: written.append("huge"), size=500), "alone in the queue, it goes"
    assert writer.flush() and written == ["small", "huge"]
    writer.close()


def test_replicas_sharing_the_folder_write_their_own_files_read_as_one_timeline(tmp_path: Path) -> None:
    """Pods of the Kubernetes Deployment share the log folder (a ReadWriteMany claim): appends from several
    nodes to one file are not atomic there, so each writes its own day file."""
    writer = BackgroundWriter()
    replicas = [PredictionLog(tmp_path, writer, retention_days=30, name=f"defect-classifier-{n}") for n in "ab"]
    base = datetime.now(UTC) - timedelta(minutes=5)
    for i in range(10):
        assert replicas[i % 2].append(record(i, base + timedelta(seconds=i)))
    assert writer.flush()
    result = read_log(tmp_path)
    assert sorted(p.name.split(".")[1] for p in result.files) == ["defect-classifier-a", "defect-classifier-b"]
    assert [r["request_id"] for r in result.records] == [f"r{i}" for i in range(10)], "merged in time order"
    old = datetime.now(UTC) - timedelta(days=40)
    append_line(day_file(tmp_path, old, "defect-classifier-a"), record(99, old))
    assert [p.name for p in prune_days(tmp_path, keep_days=30)] == [day_file(tmp_path, old, "defect-classifier-a").name]
    writer.close()


def test_a_full_queue_drops_and_counts_instead_of_blocking(tmp_path: Path) -> None:
    writer = BackgroundWriter(max_queue=1)
    gate = threading.Event()
    writer.submit(gate.wait)  # the thread is busy until the gate opens
    time.sleep(0.05)
    accepted = [writer.submit(lambda: None) for _ in range(5)]
    assert accepted.count(False) >= 4 and writer.dropped >= 4
    gate.set()
    writer.close()


WRITER_SCRIPT = """
import sys, time
from pathlib import Path
from datetime import UTC, datetime
from components.serving.predlog import BackgroundWriter, PredictionLog, day_file
folder = Path(sys.argv[1])
writer = BackgroundWriter()
log = PredictionLog(folder, writer, retention_days=30)
for i in range(20):
    log.append({"timestamp": datetime.now(UTC).isoformat(), "request_id": f"r{i}", "decision": "accept"})
writer.flush()
with day_file(folder, datetime.now(UTC), log.name).open("ab") as handle:  # half written when the crash comes
    handle.write(b'{"timestamp": "2030-01-01T00:00:00+00:00", "request_id": "torn", "decis')
    handle.flush()
    print("torn", flush=True)
    time.sleep(60)
"""


def test_a_writer_killed_mid_line_leaves_a_torn_line_the_reader_skips(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    process = subprocess.Popen([sys.executable, "-c", WRITER_SCRIPT, str(tmp_path)], stdout=subprocess.PIPE,
                               env=env, text=True)
    assert process.stdout.readline().strip() == "torn"
    os.kill(process.pid, signal.SIGKILL)
    process.wait(10)
    result = read_log(tmp_path)
    assert len(result.records) == 20 and result.skipped == 1
    # the next writer starts a fresh line: its record is not glued to the torn one
    append_line(day_file(tmp_path, datetime.now(UTC), writer_name()), record(99))
    result = read_log(tmp_path)
    assert [r["request_id"] for r in result.records][-1] == "r99" and len(result.records) == 21
    assert result.skipped == 1


def test_invalid_lines_anywhere_are_skipped_and_counted(tmp_path: Path) -> None:
    path = day_file(tmp_path, datetime.now(UTC))
    append_line(path, record(1))
    with path.open("a") as handle:
        handle.write("not json\n{\"no_timestamp\": 1}\n\n")
    append_line(path, record(2))
    result = read_log(tmp_path)
    assert [r["request_id"] for r in result.records] == ["r1", "r2"] and result.skipped == 2


def test_since_and_until_select_a_time_window(tmp_path: Path) -> None:
    base = datetime(2025, 3, 10, 12, tzinfo=UTC)
    for i in range(5):
        when = base + timedelta(days=i)
        append_line(day_file(tmp_path, when), record(i, when))
    window = read_log(tmp_path, since=date(2025, 3, 11), until=datetime(2025, 3, 13, 12, tzinfo=UTC))
    assert [r["request_id"] for r in window.records] == ["r1", "r2"]
    assert [p.name for p in window.files] == ["2025-03-11.jsonl", "2025-03-12.jsonl", "2025-03-13.jsonl"]
    assert len(read_log(tmp_path, since="2025-03-13T00:00:00").records) == 2


def test_retention_deletes_old_days_only(tmp_path: Path) -> None:
    today = date(2025, 6, 30)
    for days_ago in (0, 5, 29, 31, 100):
        when = datetime(today.year, today.month, today.day, tzinfo=UTC) - timedelta(days=days_ago)
        append_line(day_file(tmp_path, when), record(days_ago, when))
    (tmp_path / "notes.txt").write_text("kept")
    removed = prune_days(tmp_path, keep_days=30, today=today)
    assert sorted(p.name for p in removed) == ["2025-03-22.jsonl", "2025-05-30.jsonl"]
    assert len(read_log(tmp_path).records) == 3 and (tmp_path / "notes.txt").exists()
    assert json.loads((tmp_path / "2025-06-30.jsonl").read_text())["request_id"] == "r0"
