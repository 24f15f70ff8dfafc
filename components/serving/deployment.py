"""The deployment record: the one pinned model version the service serves, with its threshold and fast path.

`<state>/deployed.json` is written by promotion (or, while there is none, by `defectops serve` from the
approved champion) and read by the service at start. It holds a pinned URI (`models:/defect-classifier/3`,
never an alias, or a model.pt path), so moving `champion` changes nothing a running or restarted service
serves until the record itself is rewritten.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from components.config import Params, Settings
from components.errors import DefectOpsError
from components.files import write_text_atomic
from components.predictor import ImageInput, Predictor
from components.serving.engines import REFERENCE, build_engine, device_kind
from components.serving.params import serve_params

log = logging.getLogger(__name__)

RECORD_FILE = "deployed.json"
CHAMPION = "champion"


class NothingToServe(DefectOpsError):
    """There is no deployment record and no approved champion: the service must not start."""


class NotApproved(NothingToServe):
    """`champion` is on a version without the approval `defectops approve` records (e.g. moved in the UI only)."""


class DeploymentRecord(BaseModel):
    """What the service serves: a pinned model, its decision threshold and the engine chosen by parity."""

    model_config = ConfigDict(extra="allow")

    model_uri: str  # pinned: models:/defect-classifier/<N> or an absolute model.pt path
    model_version: str  # defect-classifier/<N> or file:<path>
    threshold: float
    fast_path: str  # the engine served: openvino | onnxruntime | bf16 | fp16 | fp32
    requested_fast_path: str = "auto"
    fast_path_reason: str = ""
    device: str = "cpu"
    parity: dict[str, Any] | None = None
    deployed_at: str
    deployed_by: str = ""
    source: str = ""


def record_path(settings: Settings) -> Path:
    return settings.state_dir / RECORD_FILE


def read_record_file(path: Path) -> DeploymentRecord:
    """A deployment record file; a clear error when it cannot be read."""
    try:
        return DeploymentRecord.model_validate(json.loads(path.read_text()))
    except (ValueError, OSError) as exc:
        raise DefectOpsError(f"{path}: unreadable deployment record ({str(exc).splitlines()[0]}); restore it or "
                             "delete it and run `defectops serve` to pin the approved champion again") from exc


def read_record(settings: Settings) -> DeploymentRecord | None:
    """The deployment record, or None when nothing was deployed yet."""
    path = record_path(settings)
    return read_record_file(path) if path.is_file() else None


def write_record(settings: Settings, record: DeploymentRecord) -> Path:
    """Write the record atomically (tmp + fsync + rename)."""
    return write_text_atomic(record_path(settings), json.dumps(record.model_dump(), indent=2) + "\n",
                             durable=True)


def approved_champion(settings: Settings) -> tuple[str, dict[str, str]]:
    """The pinned URI and tags of the `champion` version; NothingToServe unless it is approved."""
    from mlflow.exceptions import MlflowException

    from components.registry.registry import champion_approval_problem, not_found, registry_failed
    from components.registry.tracking import MODEL_NAME, connect

    client = connect(settings)
    how = "register and approve one: `defectops register`, then `defectops approve N --by NAME`"
    try:
        version = client.get_model_version_by_alias(MODEL_NAME, CHAMPION)
    except MlflowException as exc:
        if not not_found(exc):  # a registry that fails is not one without a champion
            raise registry_failed(exc, f"look up {MODEL_NAME}@{CHAMPION}", settings.tracking_uri) from exc
        raise NothingToServe(f"nothing approved to serve: no deployment record ({record_path(settings)}) and no "
                             f"{MODEL_NAME}@{CHAMPION} in {settings.tracking_uri}; {how}") from exc
    tags = dict(version.tags or {})
    problem = champion_approval_problem(tags)
    if problem:
        raise NotApproved(f"nothing approved to serve: {MODEL_NAME} version {version.version} holds "
                             f"'{CHAMPION}' but {problem}; approve it with `defectops approve {version.version} "
                             "--by NAME`")
    return f"models:/{MODEL_NAME}/{version.version}", tags


def current_device() -> str:
    """'cuda' when a GPU is present, else 'cpu' (the service's own choice; `resources` only asks for one)."""
    return device_kind()


def load_reference(settings: Settings, model_uri: str, device: str, max_pixels: int) -> Predictor:
    """The fp32 PyTorch predictor of a registered model URI or a model.pt path."""
    from components.registry.registry import load_predictor

    predictor = load_predictor(settings, model_uri, device=device, max_pixels=max_pixels)
    if not getattr(predictor, "model_version", None):
        predictor.model_version = predictor.meta.get("model_version", model_uri)  # type: ignore[attr-defined]
    return predictor


def pin_deployment(settings: Settings, params: Params, model_uri: str, deployed_by: str,
                   images: list[ImageInput] | None = None, fast_path: str | None = None,
                   source: str = "") -> DeploymentRecord:
    """Load one model version, choose its fast path by parity on real images, and write the deployment record."""
    record = build_record(settings, params, model_uri, deployed_by, images, fast_path, source)
    path = write_record(settings, record)
    log.info("deployment record %s: %s on %s (%s)", path, record.model_version, record.fast_path,
             record.fast_path_reason)
    return record


def build_record(settings: Settings, params: Params, model_uri: str, deployed_by: str,
                 images: list[ImageInput] | None = None, fast_path: str | None = None,
                 source: str = "") -> DeploymentRecord:
    """The deployment record of one model version: loaded here, its fast path chosen by parity on real images."""
    from components.serving.parity import choose_engine, parity_images

    serve = serve_params(params)
    device = current_device()
    reference = load_reference(settings, model_uri, device, params.data.max_image_pixels)
    if images is None:
        images = list(parity_images(settings, serve.parity.images))
    _, choice = choose_engine(reference, fast_path or serve.fast_path, images, serve.parity,
                              settings.cache_dir / "serving")
    pinned = reference.meta.get("model_uri") or str(Path(model_uri).expanduser().resolve())
    if Path(pinned).is_dir():
        pinned = str(Path(pinned) / "model.pt")
    return DeploymentRecord(
        model_uri=pinned, model_version=str(reference.model_version), threshold=reference.threshold,
        fast_path=choice.engine, requested_fast_path=choice.requested, fast_path_reason=choice.reason,
        device=device_kind(device), parity=choice.parity, deployed_at=datetime.now(UTC).isoformat(timespec="seconds"),
        deployed_by=deployed_by, source=source or model_uri)


def ensure_deployment(settings: Settings, params: Params) -> tuple[DeploymentRecord, bool]:
    """The deployment record; without one, pin the approved champion (parity included). True when newly written."""
    record = read_record(settings)
    if record is not None:
        return record, False
    uri, tags = approved_champion(settings)
    record = pin_deployment(settings, params, uri, deployed_by="defectops serve",
                            source=f"{CHAMPION} alias at deploy time (approved by {tags.get('approved_by', '?')})")
    return record, True


def load_served(settings: Settings, record: DeploymentRecord, max_pixels: int) -> tuple[Predictor, Predictor, str]:
    """(engine, fp32 reference, engine name) for the record on this machine's device."""
    device = current_device()
    reference = load_reference(settings, record.model_uri, device, max_pixels)
    reference.threshold = record.threshold
    engine = record.fast_path
    if engine != REFERENCE and record.device != device_kind(device):
        log.warning("the record's fast path %s was checked on %s but this machine has %s: serving fp32; "
                    "re-pin the deployment on this machine to use a fast path", engine, record.device, device)
        engine = REFERENCE
    served = build_engine(reference, engine, settings.cache_dir / "serving")
    served.threshold = record.threshold
    checked = (record.parity or {}).get("precision")
    if engine != REFERENCE and checked and checked != getattr(served, "precision", checked):
        # another CPU (a replica on a node with bf16, or without): numbers parity never saw, so not served
        log.warning("the record's fast path %s runs in %s on this machine but parity was checked in %s: serving "
                    "fp32; re-pin the deployment on this kind of machine to use a fast path", engine,
                    getattr(served, "precision", "?"), checked)
        engine = REFERENCE
        served = build_engine(reference, engine, settings.cache_dir / "serving")
        served.threshold = record.threshold
    return served, reference, engine
