"""`defectops serve`: make sure something approved is pinned, then hand the process over to `bentoml serve`."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from components.config import PACKAGE_ROOT, Params, Settings
from components.serving.deployment import DeploymentRecord, ensure_deployment, record_path
from components.serving.params import serve_params

log = logging.getLogger(__name__)

SERVICE = "components.serving.service:DefectClassifier"


def bentoml_command(port: int, host: str) -> list[str]:
    """The `bentoml serve` command line for the service."""
    return [sys.executable, "-m", "bentoml", "serve", SERVICE, "--host", host, "--port", str(port),
            "--working-dir", str(PACKAGE_ROOT)]


def describe(record: DeploymentRecord) -> str:
    """One line on what is deployed and why its engine was chosen."""
    parity = record.parity or {}
    figures = (f", parity top-1 {parity['top1_agreement']:.4f}, max |dp| {parity['max_prob_diff']:.4f} on "
               f"{parity['n_images']} images" if parity else "")
    return (f"{record.model_version} on {record.fast_path} ({record.device}), threshold {record.threshold:.4f}"
            f"{figures}; {record.fast_path_reason}")


def prepare_and_serve(settings: Settings, params: Params, port: int | None, host: str,
                      echo: Callable[[str], None] = print) -> None:
    """Pin the approved champion when nothing is deployed (parity included), then exec `bentoml serve`."""
    settings.ensure()
    record, created = ensure_deployment(settings, params)
    echo(("pinned " if created else "deployed: ") + describe(record))
    echo(f"record: {record_path(settings)} (moving the champion alias does not change what is served)")
    port = port or serve_params(params).port
    env = dict(os.environ, DEFECTOPS_PROJECT=str(settings.project_root), DEFECTOPS_HOME=str(settings.home_dir))
    env.setdefault("BENTOML_HOME", str(settings.home_dir / "bentoml"))
    env.setdefault("BENTOML_DO_NOT_TRACK", "true")
    command = bentoml_command(port, host)
    echo(f"serving on http://{host}:{port}  (POST /predict, /predict_batch, /explain; GET /readyz, /metrics)")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(command[0], command, env)
