"""Promotion: roll the approved champion into the running service; rollback: a person's command to go back.

`promote` is what the `promote-approved` flow runs every few minutes:

1. the `champion` version, refused unless it carries the tags `defectops approve` writes (an alias moved in
   the MLflow UI alone is not an approval);
2. nothing to do when it is already the deployed version;
3. load it here and check its fast path for parity on real images (a failing fast path is served on fp32);
4. build the Bento, labelled with the version (what a plant deploys as a container);
5. rewrite the deployment record atomically: the running service hot-swaps onto it (components/serving/reload.py),
   a restarted one starts on it, so a service killed at any point comes back on a consistent version;
6. wait until every running replica of the service reports the new version (their status files, see
   components/serving/replicas.py; a service that keeps none is asked on /metrics). If one refuses the model,
   the previous record is put back and promotion fails: the old model never stopped serving, and replicas that
   had swapped swap back, and the refusal is remembered (`<state>/refused.json`): the scheduled flow does not
   retry that approval of that version (parity, Bento, every replica loading it again) until it is approved
   again or promotion is forced. If no service is running, the record stands and the next start serves it;
7. tag the version deployed (who, when, engine, Bento) and the one it replaces retired; an audit line naming
   the record. A run stopped before that line (registry down, killed) is completed by the next one, from the
   record: the audit trail, not the tags, says whether a record's deployment was recorded.

`rollback` moves `champion` back to the version deployed before (tags + audit line, like an approval) and
promotes it.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from components.config import PACKAGE_ROOT, Params, Settings
from components.errors import DefectOpsError
from components.files import write_text_atomic
from components.locks import exclusive
from components.serving.deployment import (
    DeploymentRecord,
    approved_champion,
    build_record,
    read_record,
    record_path,
    write_record,
)
from components.serving.params import serve_params
from components.serving.replicas import replicas, stale_after

log = logging.getLogger(__name__)

SERVED_METRIC = "served_model_info"
RELOADS_METRIC = "model_reloads"
REFUSED_FILE = "refused.json"


class PromotionFailed(DefectOpsError):
    """The service did not take the new version; the previous deployment record is back in place."""


class ServiceRefused(PromotionFailed):
    """A replica (or the one service) could not load the record: not slowness, which a timeout is."""


class RefusedBefore(DefectOpsError):
    """The service refused this approval of the champion before: not retried until approved again or forced."""


@dataclass(frozen=True)
class PromotionResult:
    """What promotion did: the version now deployed, the one before, and what the running service reported."""

    model_version: str
    previous: str | None
    changed: bool
    service: str  # swapped | not running | already serving
    service_url: str
    bento: str | None = None
    fast_path: str = ""
    seconds: float = 0.0
    replicas: int = 0  # replicas that reported the swap
    completed: bool = False  # finished the tags and audit line of a deployment an earlier run left unrecorded

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def service_url(settings: Settings, params: Params, explicit: str | None = None) -> str:
    """The running service's URL: given, DEFECTOPS_SERVICE_URL, or 127.0.0.1 on serve.port."""
    return (explicit or settings.service_url or f"http://127.0.0.1:{serve_params(params).port}").rstrip("/")


def service_state(url: str) -> dict[str, Any] | None:
    """{'serving': [versions with served_model_info 1], 'reload_failures': n} from /metrics; None when unreachable."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    try:
        response = httpx.get(f"{url}/metrics", timeout=5.0)
        response.raise_for_status()
    except httpx.HTTPError:
        return None
    serving, failures = [], 0.0
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == SERVED_METRIC and sample.value >= 1:
                serving.append(sample.labels.get("model_version", ""))
            elif sample.name == f"{RELOADS_METRIC}_total" and sample.labels.get("outcome") == "failed":
                failures += sample.value
    return {"serving": serving, "reload_failures": failures}


def wait_for_service(settings: Settings, url: str, record: DeploymentRecord, timeout_s: float,
                     failures_before: float, poll_s: float) -> tuple[str, int]:
    """('swapped', replicas) once every live replica serves `record`; ('down', 0) when none runs (or all go away);
    else PromotionFailed: a replica refused the record, or one still serves another version (or is still
    starting) after `timeout_s`.

    Replicas are known from their status files (components/serving/replicas.py), written from before a replica
    loads its first model. With none, the service at `url` is asked through /metrics, as a single replica that
    keeps no status file would be.
    """
    version = record.model_version
    deadline = time.monotonic() + timeout_s
    while True:
        live, _ = replicas(settings, stale_after(poll_s))
        if live:
            for replica in live:
                if replica.refused == record.deployed_at:
                    kept = "it did not start" if replica.starting else f"it kept serving {replica.model_version}"
                    raise ServiceRefused(f"replica {replica.replica} could not load {version} "
                                         f"({replica.refused_error}); {kept}")
            # a replica still starting serves nothing yet: behind until it reports this record
            behind = [r for r in live if (r.model_version, r.record) != (version, record.deployed_at)]
            if not behind:
                return "swapped", len(live)
            waiting = ", ".join(f"replica {r.replica} is still starting (loading {r.loading_version or r.loading})"
                                if r.starting else f"replica {r.replica} still serves {r.model_version}"
                                for r in behind)
        else:
            state = service_state(url)
            if state is None:
                return "down", 0
            if state["serving"] == [version]:
                return "swapped", 1
            if state["reload_failures"] > failures_before:
                raise ServiceRefused(f"the service at {url} could not load {version} (see its log); it kept "
                                     f"serving {', '.join(state['serving']) or '?'}")
            waiting = f"the service at {url} still serves {', '.join(state['serving']) or '?'}"
        if time.monotonic() > deadline:
            raise PromotionFailed(f"{waiting} {timeout_s:.0f} s after the record named {version} (serve."
                                  "promotion_timeout_seconds); see its log")
        time.sleep(0.5)


def _hidden_part(path: Path) -> str | None:
    """The first folder of `path` whose name starts with '.', if any."""
    return next((part for part in path.resolve().parts if part.startswith(".")), None)


@contextmanager
def build_context(root: Path) -> Iterator[Path]:
    """The folder `bentoml build` runs in: the project itself, or a copy of what bentofile.yaml takes from it.

    bentoml build refuses any build file whose absolute path has a folder starting with '.' ("Accessing hidden
    files is not allowed"), so a project cloned under, say, ~/.local/src could never be promoted. There the
    files the Bento takes (bentofile.yaml, its `include` patterns, its requirements file) are copied to a
    temporary folder first; the Bento is the same.
    """
    hidden_root = _hidden_part(root)
    if hidden_root is None:
        yield root
        return
    import shutil
    import tempfile

    import yaml

    spec = yaml.safe_load((root / "bentofile.yaml").read_text())
    wanted = [root / "bentofile.yaml", root / spec["python"]["requirements_txt"]]
    wanted += [file for pattern in spec.get("include", []) for file in sorted(root.glob(pattern.lstrip("/")))
               if file.is_file() and "__pycache__" not in file.parts]
    with tempfile.TemporaryDirectory(prefix="defectops-bento-") as folder:
        staged = Path(folder)
        hidden = _hidden_part(staged)
        if hidden is not None:
            raise DefectOpsError(f"bentoml build refuses paths with a folder starting with '.' ({hidden_root} in "
                                 f"{root}, {hidden} in the temp folder {staged}); set TMPDIR to a folder without "
                                 "one and promote again")
        for file in wanted:
            target = staged / file.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, target)
        log.info("the project's path has a hidden folder (%s), which bentoml build refuses: building from a "
                 "copy of the Bento's files in %s", hidden_root, staged)
        yield staged


def build_bento(settings: Settings, record: DeploymentRecord) -> str:
    """`bentoml build` of the service, labelled with the pinned version; returns the Bento tag."""
    number = record.model_version.rsplit("/", 1)[-1]
    stamp = datetime.now(UTC).strftime("%Y%m%dt%H%M%S")
    version = f"v{number}-{stamp}" if number.isdigit() else f"file-{stamp}"
    labels = {"model_version": record.model_version, "model_uri": record.model_uri, "fast_path": record.fast_path,
              "threshold": f"{record.threshold:.4f}"}
    with build_context(PACKAGE_ROOT) as context:
        command = [sys.executable, "-m", "bentoml", "build", str(context), "--version", version, "-o", "tag",
                   *[arg for key, value in labels.items() for arg in ("--label", f"{key}={value}")]]
        done = subprocess.run(command, check=False, cwd=context, capture_output=True, text=True,
                              env={"BENTOML_HOME": str(settings.home_dir / "bentoml"), **os.environ,
                                   "BENTOML_DO_NOT_TRACK": "true"})
    tags = [line.removeprefix("__tag__:") for line in done.stdout.splitlines() if line.startswith("__tag__:")]
    if done.returncode != 0 or not tags:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise DefectOpsError(f"bentoml build failed ({detail[-1] if detail else done.returncode}); nothing was "
                             "deployed. Fix the build (bentofile.yaml) and promote again")
    return tags[-1]


def _number(model_version: str | None) -> str | None:
    """'3' for 'defect-classifier/3'; None for a model file or nothing."""
    from components.registry.tracking import MODEL_NAME

    if model_version and model_version.startswith(f"{MODEL_NAME}/"):
        return model_version.rsplit("/", 1)[1]
    return None


def refused_path(settings: Settings) -> Path:
    return settings.state_dir / REFUSED_FILE


def _refusal_entry(settings: Settings) -> dict[str, Any] | None:
    """The recorded refusal; {} when the file is unreadable (of no use: promotion proceeds), None when absent."""
    path = refused_path(settings)
    try:
        entry = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("%s unreadable, ignored (promotion proceeds): %s", path, str(exc).splitlines()[0])
        return {}
    return entry if isinstance(entry, dict) else {}


def recorded_refusal(settings: Settings, number: str, approved_at: str) -> dict[str, Any] | None:
    """The service's refusal of version `number` as approved at `approved_at`, if promotion recorded one."""
    entry = _refusal_entry(settings)
    if entry and str(entry.get("version")) == number and entry.get("approved_at") == approved_at:
        return entry
    return None


def _record_refusal(settings: Settings, number: str, approved_at: str, record: DeploymentRecord,
                    reason: str) -> None:
    """Remember the refusal, so that the scheduled flow does not redo parity, a Bento and every replica's load of
    a model the service cannot take, every few minutes."""
    entry = {"version": number, "model_version": record.model_version, "approved_at": approved_at,
             "record": record.deployed_at, "at": datetime.now(UTC).isoformat(timespec="seconds"),
             "reason": reason.splitlines()[0][:500] if reason else ""}
    try:
        write_text_atomic(refused_path(settings), json.dumps(entry, indent=2) + "\n")
    except OSError as exc:  # the promotion failed anyway; the next run only retries it in full
        log.warning("refusal of %s not recorded in %s (the next run retries it): %s", record.model_version,
                    refused_path(settings), exc)


def _forget_refusal(settings: Settings, number: str) -> None:
    """A version now deployed is no longer refused (an unreadable record of a refusal goes too)."""
    entry = _refusal_entry(settings)
    if entry is not None and (not entry or str(entry.get("version")) == number):
        refused_path(settings).unlink(missing_ok=True)


def deployment_recorded(settings: Settings, number: str, record: DeploymentRecord) -> bool:
    """Whether the audit trail has the deploy line of `record` (written last, after the tags).

    Lines name their record's deployed_at; older lines, which do not, count when written after the record.
    """
    from components.registry.registry import audit_trail

    for entry in audit_trail(settings):
        if entry.get("action") != "deploy" or str(entry.get("version")) != number:
            continue
        if entry.get("record") == record.deployed_at or ("record" not in entry
                                                          and str(entry.get("at", "")) >= record.deployed_at):
            return True
    return False


def promote(settings: Settings, params: Params, by: str = "promote-approved", url: str | None = None,
            bento: bool = True, images: list | None = None, force: bool = False) -> PromotionResult:
    """Deploy the approved champion when it is not the deployed version (see the module docstring); `force`
    retries a champion the service refused before."""
    from components.registry.registry import record_deployment
    from components.registry.tracking import MODEL_NAME

    started = time.monotonic()
    url = service_url(settings, params, url)
    with exclusive(settings.locks_dir, "promotion", "a promotion"):
        champion_uri, tags = approved_champion(settings)
        number = champion_uri.rsplit("/", 1)[1]
        target = f"{MODEL_NAME}/{number}"
        current = read_record(settings)
        state = service_state(url)
        serve = serve_params(params)
        failures_before = state["reload_failures"] if state else 0.0
        if current is not None and current.model_version == target:
            # the record names it, but a promotion stopped while waiting (killed) left it there whether or not
            # the service took it: "already serving" only once every running replica serves it
            try:
                outcome, replica_count = wait_for_service(settings, url, current, serve.promotion_timeout_seconds,
                                                          failures_before, serve.reload_poll_seconds)
            except PromotionFailed as exc:
                raise PromotionFailed(f"{exc}; the deployment record has named {target} since a promotion that "
                                      "stopped before the service took it: fix what the service's log says and "
                                      "promote again, or go back with `defectops rollback`") from exc
            if deployment_recorded(settings, number, current):
                return PromotionResult(target, None, False,
                                       "already serving" if outcome == "swapped" else "not running", url,
                                       fast_path=current.fast_path, seconds=time.monotonic() - started)
            # the service took the record, but the run that wrote it stopped before its audit line (registry
            # down, killed while tagging): finish what that run would have written, from the record
            previous, bento_tag = getattr(current, "previous_model_version", None), getattr(current, "bento", None)
            service = "swapped" if outcome == "swapped" else "not running"
            log.warning("the deployment of %s (record of %s) was not recorded: completing its tags and audit line",
                        target, current.deployed_at)
            details = {"fast_path": current.fast_path, "bento": bento_tag, "service": service, "service_url": url,
                       "record": current.deployed_at, "completed_by": by}
            record_deployment(settings, number, current.deployed_by or by, details, _number(previous))
            _forget_refusal(settings, number)
            return PromotionResult(target, previous, True, service, url, bento_tag, current.fast_path,
                                   time.monotonic() - started, replica_count, completed=True)
        refusal = None if force else recorded_refusal(settings, number, tags["approved_at"])
        if refusal is not None:
            raise RefusedBefore(f"{target} not promoted again: the service refused it at {refusal.get('at')} "
                                f"({refusal.get('reason')}); fix that, then `defectops promote --force` "
                                f"(the promote-approved flow's force=true) or approve another version "
                                f"(recorded in {refused_path(settings)})")
        source = f"champion v{number}, approved by {tags['approved_by']} at {tags['approved_at']}"
        record = build_record(settings, params, champion_uri, by, images, source=source)
        record = record.model_copy(update={"previous_model_version": current.model_version if current else None,
                                           "previous_model_uri": current.model_uri if current else None})
        bento_tag = build_bento(settings, record) if bento else None
        if bento_tag:
            record = record.model_copy(update={"bento": bento_tag})
        write_record(settings, record)
        log.info("deployment record %s now names %s (%s)", record_path(settings), target, record.fast_path)
        try:
            outcome, replica_count = wait_for_service(settings, url, record, serve.promotion_timeout_seconds,
                                                      failures_before, serve.reload_poll_seconds)
        except PromotionFailed as exc:
            _restore(settings, current)
            if isinstance(exc, ServiceRefused):  # a timeout (a slow or starting replica) is tried again next run
                _record_refusal(settings, number, tags["approved_at"], record, str(exc))
            raise PromotionFailed(f"{exc}; the deployment record is back on "
                                  f"{current.model_version if current else 'nothing'}") from exc
        except BaseException:  # stopped while waiting (Ctrl-C, the flow run cancelled): the old record again
            _restore(settings, current)
            raise
        service = "swapped" if outcome == "swapped" else "not running"
        if outcome == "down":
            log.warning("no service answers at %s: the record names %s, which the service serves when it starts",
                        url, target)
        details = {"fast_path": record.fast_path, "bento": bento_tag, "service": service, "service_url": url,
                   "record": record.deployed_at}
        record_deployment(settings, number, by, details, _number(current.model_version if current else None))
        _forget_refusal(settings, number)
    return PromotionResult(target, current.model_version if current else None, True, service, url, bento_tag,
                           record.fast_path, time.monotonic() - started, replica_count)


def _restore(settings: Settings, previous: DeploymentRecord | None) -> None:
    """Put the previous record back (or remove the new one when there was none)."""
    if previous is not None:
        write_record(settings, previous)
    else:
        record_path(settings).unlink(missing_ok=True)


def rollback(settings: Settings, params: Params, by: str, reason: str, url: str | None = None,
             bento: bool = True) -> tuple[dict[str, Any], PromotionResult]:
    """A person's command: `champion` back to the version deployed before the current one, then promote it
    (forced: a person asked for that version, even if the service once refused it)."""
    from components.registry.registry import rollback as rollback_champion

    current = read_record(settings)
    number = _number(current.model_version if current else None)
    if number is None:
        raise DefectOpsError("nothing registered is deployed, so there is nothing to roll back; see "
                             f"{record_path(settings)} and `defectops models`")
    moved = rollback_champion(settings, number, by, reason)
    return moved, promote(settings, params, by=f"rollback by {by}", url=url, bento=bento, force=True)
