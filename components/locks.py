"""Process locks under the state root, so two imports (or two monthly runs) never interleave.

flock(2); on the NFS claim that Kubernetes Jobs share the Linux client turns it into a POSIX lock the server
holds, so Jobs on different nodes exclude each other too. The holder is named by process id and host.
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from components.errors import ConcurrentRunError


@contextmanager
def exclusive(lock_dir: Path, name: str, what: str) -> Iterator[None]:
    """Hold the lock `name` or fail at once with a message saying who holds it."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    path = lock_dir / f"{name}.lock"
    handle = path.open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ConcurrentRunError(f"{what} is already running ({holder}); wait for it to finish") from exc
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
