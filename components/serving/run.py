"""`defectops serve`: make sure something approved is pinned, then hand the process over to `bentoml serve`."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from components.config import PACKAGE_ROOT, Params, Settings
from components.errors import DefectOpsError
from components.serving.deployment import DeploymentRecord, ensure_deployment, record_path
from components.serving.params import serve_params
from components.signals import held_back

log = logging.getLogger(__name__)

SERVICE = "components.serving.service:DefectClassifier"


def bentoml_command(port: int, host: str) -> list[str]:
    """The `bentoml serve` command line for the service."""
    return [sys.executable, "-m", "bentoml", "serve", SERVICE, "--host", host, "--port", str(port),
            "--working-dir", str(PACKAGE_ROOT)]


def runtime_home(port: int) -> Path:
    """BENTOML_HOME of one serving replica: a local folder of its own, never the shared state root.

    `bentoml serve` empties `$BENTOML_HOME/prometheus_multiproc_dir` when it starts, and every worker keeps its
    metric values in files there, which `/metrics` adds up. Replicas sharing that folder (on the state volume of
    Kubernetes pods, or two services on one machine) would wipe each other's metrics at each start and report
    each other's values: `served_model_info` would name another replica's model. The service needs nothing
    else from BentoML's home (it loads models from MLflow; request uploads are spooled there, locally too).
    """
    import tempfile

    return Path(tempfile.gettempdir()) / f"defectops-serve-{os.getuid()}-{port}"


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
    env = dict(os.environ, DEFECTOPS_PROJECT=str(settings.project_root), DEFECTOPS_HOME=str(settings.home_dir),
               BENTOML_HOME=str(runtime_home(port)))
    env.setdefault("BENTOML_DO_NOT_TRACK", "true")
    command = bentoml_command(port, host)
    echo(f"serving on http://{host}:{port}  (POST /predict, /predict_batch, /explain; GET /readyz, /metrics)")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(command[0], command, env)


def start_in_background(settings: Settings, port: int, log_file: Path, timeout_s: float = 300.0,
                        host: str = "127.0.0.1", env: dict[str, str] | None = None) -> subprocess.Popen:
    """`defectops serve` as a child process (its own session, output to `log_file`); returns once /readyz is 200.

    `env` is the child's base environment (default: this one); the project and state root are always set.
    """
    log_file.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ if env is None else env, DEFECTOPS_PROJECT=str(settings.project_root),
               DEFECTOPS_HOME=str(settings.home_dir))
    process: subprocess.Popen | None = None
    try:
        # its own session: a terminal's Ctrl-C reaches only us, so an interrupted start must stop it here
        with held_back(signal.SIGTERM, signal.SIGINT), log_file.open("ab") as sink:
            process = subprocess.Popen([sys.executable, "-m", "components.cli", "serve", "--port", str(port),
                                        "--host", host], cwd=settings.project_root, env=env, stdout=sink,
                                       stderr=subprocess.STDOUT, start_new_session=True)
        return wait_until_ready(process, f"http://{host}:{port}/readyz", log_file, timeout_s)
    except BaseException:
        if process is not None:
            stop_background(process, port=port)
        raise


def wait_until_ready(process: subprocess.Popen, ready_url: str, log_file: Path,
                     timeout_s: float) -> subprocess.Popen:
    """Poll `ready_url` until it answers 200; a clear error (and the server stopped) when it exits or times out."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_file.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise DefectOpsError(f"the server exited with code {process.returncode} ({tail[0]}); see {log_file}")
        try:
            if httpx.get(ready_url, timeout=2.0).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_background(process)
    raise DefectOpsError(f"{ready_url} was not ready after {timeout_s:.0f} s; see {log_file}")


def stop_background(process: subprocess.Popen, timeout_s: float = 30.0, port: int | None = None) -> None:
    """SIGTERM `bentoml serve` (it stops its workers and flushes the log); kill the whole tree if it hangs.

    With the `port` a service was started on, its runtime folder (`runtime_home`) is removed once every
    process of the tree has exited: a service started for a while (the demo, tests) leaves nothing in /tmp.
    """
    import psutil

    try:
        if process.poll() is not None:
            return
        try:
            tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        process.terminate()
        _, alive = psutil.wait_procs(tree, timeout=timeout_s)
        if process.poll() is None:  # hung: a worker it started after the first listing is killed too
            with contextlib.suppress(psutil.NoSuchProcess):
                alive += [p for p in psutil.Process(process.pid).children(recursive=True) if p not in alive]
        for leftover in alive:  # BentoML workers run in sessions of their own: never leave one serving
            leftover.kill()
        psutil.wait_procs(alive, timeout=10)
        process.wait(10)
    finally:
        if port is not None and process.poll() is not None:
            shutil.rmtree(runtime_home(port), ignore_errors=True)
