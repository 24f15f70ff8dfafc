"""Atomic file replacement: readers (and a crash) see the old file or the new one, never half of one."""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _temporary(path: Path, pid: int | str) -> Path:
    return path.with_name(f".{path.name}.{pid}.tmp")


@contextmanager
def replacing(path: Path, durable: bool = False) -> Iterator[Path]:
    """A temporary path beside `path` to write to; when the block ends without error it replaces `path` in one
    rename (after an fsync when `durable`). On error the temporary file is removed and `path` is untouched; a
    killed process leaves it behind (`leftover_temporaries` finds it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path, os.getpid())
    try:
        yield tmp
        if durable:
            with tmp.open("rb") as handle:
                os.fsync(handle.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def leftover_temporaries(path: Path) -> list[Path]:
    """The temporary files of `replacing(path)` that killed processes left beside `path`."""
    if not path.parent.is_dir():
        return []
    return sorted(path.parent.glob(_temporary(Path(glob.escape(path.name)), "*").name))


def write_text_atomic(path: Path, text: str, durable: bool = False) -> Path:
    """Write `text` to `path` through `replacing`."""
    with replacing(path, durable) as tmp:
        tmp.write_text(text)
    return path


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    """Write `data` to `path` through `replacing`."""
    with replacing(path) as tmp:
        tmp.write_bytes(data)
    return path


def file_sha256(path: Path) -> str:
    """The hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
