"""Every running replica of the service says what it serves, so that promotion can wait for all of them.

Replicas (pods behind one Kubernetes Service, or several `bentoml serve` on one machine) share DEFECTOPS_HOME
and so the deployment record. A load-balanced URL reaches one of them per request: promotion cannot tell from
`/metrics` alone whether every replica swapped. So each replica keeps a status file,
`<state>/replicas/<host>-<pid>.json`: the version it serves, the record it is loading, the last record it
refused, and a heartbeat rewritten every `serve.reload_poll_seconds` by a thread of its own (a model load does
not delay it). A replica writes it before it loads its first model, so one that is still starting (a pod
restarted during a promotion) is waited for too: it serves nothing yet (`record` empty) and names the record it
is loading. The file goes when the replica stops; a replica killed without a word (kill -9, a lost node), or
one that could not start, leaves a file whose heartbeat stops, and after `stale_after_s` it is no longer waited
for.

A record is named by its `deployed_at` stamp (promotion writes a new one each time), so a refusal is matched
to the record that promotion wrote without comparing the clocks of two machines.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from datetime import UTC, datetime, timedelta

from pydantic import BaseModel, ValidationError

from components.config import Settings
from components.files import write_text_atomic

log = logging.getLogger(__name__)

FOLDER = "replicas"
FORGET_AFTER = timedelta(days=1)  # a dead replica's file is removed by the next reader after this long


class ReplicaStatus(BaseModel):
    """One replica's report (the JSON of its status file)."""

    replica: str  # <host>-<pid>
    host: str
    pid: int
    started_at: str
    heartbeat_at: str
    model_version: str = ""  # what its requests run on now ("" while starting: nothing yet)
    fast_path: str = ""
    device: str = ""
    record: str = ""  # deployed_at of the record it serves ("" while starting)
    loading: str | None = None  # deployed_at of a record it is loading now ...
    loading_version: str | None = None  # ... and the version that record names
    refused: str | None = None  # deployed_at of the last record it could not load ...
    refused_version: str | None = None  # ... the version that record named ...
    refused_error: str | None = None  # ... and why

    def age(self, now: datetime) -> timedelta:
        return now - datetime.fromisoformat(self.heartbeat_at)

    @property
    def starting(self) -> bool:
        """Still loading its first model: it serves nothing yet."""
        return not self.record


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class ReplicaReport:
    """The status file of this process: `serving`, `loading` and `refused` change it, a heartbeat thread rewrites it."""

    def __init__(self, settings: Settings, interval_s: float) -> None:
        host = socket.gethostname()
        self.path = settings.state_dir / FOLDER / f"{host}-{os.getpid()}.json"
        self.interval_s = interval_s
        self._status: ReplicaStatus | None = None
        self._host, self._started = host, _now()
        self._failing = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="replica-heartbeat", daemon=True)

    def serving(self, model_version: str, fast_path: str, device: str, record: str) -> None:
        """This replica now serves `model_version` (from the record stamped `record`)."""
        self._update(model_version=model_version, fast_path=fast_path, device=device, record=record, loading=None,
                     loading_version=None)

    def loading(self, record: str, version: str | None = None) -> None:
        self._update(loading=record, loading_version=version)

    def refused(self, record: str | None, version: str | None, error: str) -> None:
        """A record could not be loaded (`record` None: the file itself was unreadable)."""
        self._update(loading=None, loading_version=None, refused=record or "unreadable", refused_version=version,
                     refused_error=error.splitlines()[0][:500] if error else "")

    def _update(self, **fields: object) -> None:
        with self._lock:
            if self._status is None:
                fields = {"replica": self.path.stem, "host": self._host, "pid": os.getpid(),
                          "started_at": self._started, "heartbeat_at": _now(), **fields}
                self._status = ReplicaStatus.model_validate(fields)
            else:
                self._status = self._status.model_copy(update=fields)
        self._write()

    def _write(self) -> None:
        with self._lock:
            if self._status is None or self._stop.is_set():
                return
            self._status = self._status.model_copy(update={"heartbeat_at": _now()})
            text = self._status.model_dump_json(indent=2) + "\n"
            try:
                write_text_atomic(self.path, text)
                self._failing = False
            except OSError as exc:  # a full or read-only state volume must not take the service down
                if not self._failing:  # once, not at every heartbeat
                    log.warning("replica status %s not written (promotion cannot see this replica): %s",
                                self.path, exc)
                self._failing = True

    def start(self) -> ReplicaReport:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._write()

    def stop(self) -> None:
        """Stop the heartbeat and remove the file: promotion no longer waits for this replica."""
        with self._lock:
            self._stop.set()
            self.path.unlink(missing_ok=True)

    def halt(self) -> None:
        """Stop the heartbeat but keep the file (a replica that could not start): promotion reads its refusal now,
        and the file then goes stale like a dead replica's."""
        with self._lock:
            self._stop.set()


def replicas(settings: Settings, stale_after_s: float) -> tuple[list[ReplicaStatus], list[ReplicaStatus]]:
    """(live, stale) replicas: live ones have a heartbeat younger than `stale_after_s`.

    Files of replicas silent for over a day are removed; unreadable files (a replica writing its first status
    cannot produce one: writes are atomic) are skipped with a warning.
    """
    folder = settings.state_dir / FOLDER
    now = datetime.now(UTC)
    live: list[ReplicaStatus] = []
    stale: list[ReplicaStatus] = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            status = ReplicaStatus.model_validate(json.loads(path.read_text()))
        except FileNotFoundError:
            continue  # the replica stopped meanwhile
        except (OSError, ValueError, ValidationError) as exc:
            log.warning("replica status %s unreadable, ignored: %s", path, str(exc).splitlines()[0])
            continue
        age = status.age(now)
        if age > FORGET_AFTER:
            path.unlink(missing_ok=True)
        (live if age.total_seconds() <= stale_after_s else stale).append(status)
    return live, stale


def stale_after(interval_s: float) -> float:
    """How long a heartbeat may be missing before a replica counts as gone: a few intervals, at least 15 s."""
    return max(15.0, 5 * interval_s)
