"""`defectops schedule`: serve the deployments of prefect.yaml on a Prefect server, a local one by default.

The deployments are defined once, in prefect.yaml (what `prefect deploy --all` reads on a plant server too).
Here each is built with `flow.to_deployment` and served by this process (Prefect's `Runner`, as `prefect.serve`
does), which runs the scheduled flow runs itself: no work pool or worker is needed (`work_pool` in prefect.yaml
is for the plant setup and ignored here). Schedules need a real server, so without
PREFECT_API_URL a local one is started as a subprocess, with its state under the state root:
`<home>/prefect/server.db` (sqlite; not the `prefect.db` that the temporary servers of unscheduled flow
runs use, so `defectops demo` can run beside it) and its log in `<home>/logs/prefect-server.log`.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from components.config import Settings
from components.errors import DefectOpsError, UsageError
from components.signals import held_back, in_main_thread, signal_handler, sigterm_as_interrupt

log = logging.getLogger(__name__)

Echo = Callable[[str], None]

HEALTH_TIMEOUT_S = 180.0  # first start creates the database: ~10 s on 2 idle cores, much more under load
STOP_TIMEOUT_S = 10.0
SCHEDULE_KEYS = {"cron", "interval", "rrule", "timezone", "day_or", "anchor_date", "active", "parameters", "slug"}


class ServerError(DefectOpsError):
    """The Prefect server cannot be started or reached."""


@dataclass(frozen=True)
class DeploymentSpec:
    """One entry of prefect.yaml's `deployments`, its schedules as `prefect.schedules.Schedule` objects."""

    name: str
    entrypoint: str
    description: str | None
    parameters: dict[str, Any]
    schedules: list[Any]
    concurrency_limit: Any = None  # prefect's ConcurrencyLimitConfig: one flow run at a time, as `prefect deploy`


# ------------------------------------------------------------------ prefect.yaml


def prefect_yaml(settings: Settings) -> Path:
    return settings.project_root / "prefect.yaml"


def read_deployments(settings: Settings, only: Sequence[str] = ()) -> list[DeploymentSpec]:
    """The deployments of prefect.yaml (those named in `only`, when given), checked; bad ones are usage errors."""
    path = prefect_yaml(settings)
    if not path.is_file():
        raise UsageError(f"{path}: not found; run from the project or set DEFECTOPS_PROJECT")
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UsageError(f"{path}: not valid YAML ({_one_line(exc)}); fix the file") from exc
    entries = config.get("deployments") if isinstance(config, dict) else None
    if not isinstance(entries, list) or not entries:
        raise UsageError(f"{path}: no `deployments` list; define each deployment there once")
    names = [entry.get("name") if isinstance(entry, dict) else None for entry in entries]
    _check_unique_names(path, entries, names)
    unknown = [name for name in only if name not in names]
    if unknown:
        raise UsageError(f"--only {', '.join(unknown)}: no such deployment in {path}; "
                         f"known: {', '.join(str(n) for n in names)}")
    return [_deployment_spec(path, i, entry) for i, entry in enumerate(entries) if not only or names[i] in only]


def _check_unique_names(path: Path, entries: list[Any], names: list[Any]) -> None:
    """Refuse a shared name: here it is a deployment's identity (`--only`, messages), though Prefect allows it."""
    for later, name in enumerate(names):
        if name and name in names[:later]:
            first = names.index(name)
            raise UsageError(f"{path}: deployments #{first + 1} ({entries[first].get('entrypoint')}) and "
                             f"#{later + 1} ({entries[later].get('entrypoint')}) are both named {name!r}; "
                             "give each a unique `name`")


def _deployment_spec(path: Path, index: int, entry: Any) -> DeploymentSpec:
    name = entry.get("name") if isinstance(entry, dict) else None
    where = f"{path}: deployment {name or f'#{index + 1}'}"
    entrypoint = entry.get("entrypoint") if isinstance(entry, dict) else None
    if not name or not isinstance(entrypoint, str) or ".py:" not in entrypoint:
        raise UsageError(f"{where}: needs `name` and `entrypoint: flows/<file>.py:<flow function>`")
    parameters = entry.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise UsageError(f"{where}: `parameters` must be a mapping of flow parameter to value")
    schedules = entry.get("schedules") or []
    if not isinstance(schedules, list):
        raise UsageError(f"{where}: `schedules` must be a list")
    return DeploymentSpec(name=name, entrypoint=entrypoint, description=entry.get("description"),
                          parameters=parameters, schedules=[_schedule(where, raw) for raw in schedules],
                          concurrency_limit=_concurrency_limit(where, entry.get("concurrency_limit")))


def _concurrency_limit(where: str, raw: Any) -> Any:
    """prefect.yaml's `concurrency_limit` (a number, or {limit, collision_strategy}) as Prefect's own config."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig

    if raw is None:
        return None
    try:
        return ConcurrencyLimitConfig.model_validate({"limit": raw} if isinstance(raw, int) else raw)
    except ValueError as exc:
        raise UsageError(f"{where}: bad `concurrency_limit` ({_one_line(exc)}); give a number or "
                         "{limit: 1, collision_strategy: CANCEL_NEW}") from exc


def _schedule(where: str, raw: Any) -> Any:
    """A prefect.yaml schedule entry as a `prefect.schedules.Schedule`, validated by Prefect itself."""
    from prefect.schedules import Schedule

    if not isinstance(raw, dict) or set(raw) - SCHEDULE_KEYS:
        extra = sorted(set(raw) - SCHEDULE_KEYS) if isinstance(raw, dict) else raw
        raise UsageError(f"{where}: unknown schedule entry {extra}; use `cron` + `timezone`, or `interval` "
                         "(seconds), with `active`")
    kinds = [key for key in ("cron", "interval", "rrule") if raw.get(key) is not None]
    if len(kinds) != 1:
        raise UsageError(f"{where}: a schedule needs exactly one of `cron`, `interval` (seconds) or `rrule`")
    values = dict(raw)
    try:
        if "interval" in values:
            values["interval"] = timedelta(seconds=float(values["interval"]))
        schedule = Schedule(**values)
        upcoming = next_runs(schedule, 1)  # Prefect's own schedule model checks the timezone and the rest
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{where}: invalid schedule {raw} ({_one_line(exc)}); fix prefect.yaml") from exc
    if not upcoming:
        raise UsageError(f"{where}: schedule {describe(schedule)} has no future run (its UNTIL or COUNT is "
                         "past); fix or remove it in prefect.yaml")
    return schedule


def next_runs(schedule: Any, count: int, start: datetime | None = None) -> list[datetime]:
    """The next `count` run times of a schedule, computed by the server's own schedule model."""
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.server.schemas import schedules as server_schedules

    client_schedule = DeploymentScheduleCreate.from_schedule(schedule).schedule
    model = getattr(server_schedules, type(client_schedule).__name__)
    dates = model.model_validate(client_schedule.model_dump()).get_dates(count, start=start)
    return list(asyncio.run(dates) if inspect.iscoroutine(dates) else dates)


def describe(schedule: Any) -> str:
    """`cron '0 2 1 * *' Europe/Berlin`, `every 300 s` or `rrule '...'`, and `(inactive)` when it is off."""
    if schedule.cron is not None:
        text = f"cron '{schedule.cron}' {schedule.timezone or 'UTC'}"
    elif schedule.interval is not None:
        text = f"every {schedule.interval.total_seconds():g} s"
    else:
        text = f"rrule '{schedule.rrule}'"
    return text if schedule.active else f"{text} (inactive)"


def _when(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S %Z" if moment.second else "%Y-%m-%d %H:%M %Z").strip()


def _next(schedule: Any) -> str:
    """The next run, or `none`: a schedule checked when prefect.yaml was read may have ended while the server started."""
    upcoming = next_runs(schedule, 1)
    return _when(upcoming[0]) if upcoming else "none (it has ended)"


# ------------------------------------------------------------------ flows and deployments


def load_flows(settings: Settings, specs: Sequence[DeploymentSpec]) -> dict[str, Any]:
    """Each deployment's flow, loaded from its entrypoint under the project root, its parameters checked."""
    from prefect.exceptions import MissingFlowError, ParameterTypeError, ScriptError, SignatureMismatchError
    from prefect.flows import load_flow_from_entrypoint

    flows = {}
    for spec in specs:
        where = f"{prefect_yaml(settings)}: deployment {spec.name}"
        file, function = spec.entrypoint.rsplit(":", 1)
        script = settings.project_root / file
        if not script.is_file():
            raise UsageError(f"{where}: entrypoint file {file} not found in {settings.project_root}; "
                             "fix `entrypoint`")
        try:
            flow = load_flow_from_entrypoint(f"{script}:{function}", use_placeholder_flow=False)
        except MissingFlowError as exc:
            raise UsageError(f"{where}: {file} has no @flow function {function!r}; fix `entrypoint`") from exc
        except ScriptError as exc:
            raise DefectOpsError(f"{where}: importing {file} failed: {exc.user_exc!r}") from exc
        flow_logger = logging.getLogger("prefect.flows")  # it logs the same failure over several lines
        flow_logger.disabled = True
        try:
            flow.validate_parameters(spec.parameters)
        except (ParameterTypeError, SignatureMismatchError) as exc:
            raise UsageError(f"{where}: bad `parameters` for {function}: {_one_line(exc)}") from exc
        finally:
            flow_logger.disabled = False
        flows[spec.name] = flow
    return flows


def build_deployments(specs: Sequence[DeploymentSpec], flows: dict[str, Any]) -> list[Any]:
    """One `RunnerDeployment` per spec; entrypoints resolve from the working directory (the project root)."""
    return [flows[spec.name].to_deployment(name=spec.name, description=spec.description,
                                           parameters=spec.parameters, schedules=spec.schedules,
                                           concurrency_limit=spec.concurrency_limit)
            for spec in specs]


def check_deployments(settings: Settings, only: Sequence[str], echo: Echo) -> None:
    """Load prefect.yaml and its flows, print each deployment with its schedules and next three runs."""
    specs = read_deployments(settings, only)
    load_flows(settings, specs)
    echo(f"{prefect_yaml(settings)}: {len(specs)} deployment(s), every flow loads")
    for spec in specs:
        echo(f"{spec.name}  ({spec.entrypoint})")
        for schedule in spec.schedules:
            echo(f"  {describe(schedule)}: next " + ", ".join(_when(d) for d in next_runs(schedule, 3)))
        if not spec.schedules:
            echo("  no schedule: runs only when started by hand")


# ------------------------------------------------------------------ the server


def _healthy(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=3.0).status_code == 200
    except httpx.HTTPError:
        return False


def _ensure_port_free(host: str, port: int) -> None:
    """Fail with a one-line error naming the port when it cannot be bound (SO_REUSEADDR, as the server does)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise UsageError(f"--host {host}: not a valid address ({exc})") from exc
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise ServerError(f"port {port} on {host} is already in use; choose another with --port, or set "
                              f"PREFECT_API_URL=http://{host}:{port}/api if a Prefect server runs there") from exc


# Linux: the server gets SIGTERM when this process dies, even by `kill -9` (prctl PR_SET_PDEATHSIG survives exec)
_EXEC_DYING_WITH_PARENT = ("import ctypes, os, signal, sys; ctypes.CDLL(None).prctl(1, signal.SIGTERM); "
                           "os.getppid() == int(sys.argv[1]) or sys.exit(1); os.execv(sys.argv[2], sys.argv[2:])")


def _dying_with_parent(command: list[str]) -> list[str]:
    if not sys.platform.startswith("linux"):
        return command
    return [sys.executable, "-c", _EXEC_DYING_WITH_PARENT, str(os.getpid()), *command]


@dataclass
class LocalServer:
    """`prefect server start` as a subprocess with its state under `<home>/prefect` and its log under `<home>/logs`."""

    host: str
    port: int
    home: Path
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    @property
    def prefect_home(self) -> Path:
        return self.home / "prefect"

    @property
    def database(self) -> Path:
        return self.prefect_home / "server.db"

    @property
    def log_file(self) -> Path:
        return self.home / "logs" / "prefect-server.log"

    def check_port(self) -> None:
        """Bind the port the way the server will, so a taken one is a clear error before anything starts."""
        _ensure_port_free(self.host, self.port)

    def start(self, timeout: float = HEALTH_TIMEOUT_S) -> None:
        """Start the server and wait until it answers /api/health; fail with its log's tail if it dies."""
        self.check_port()
        self.prefect_home.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PREFECT_HOME": str(self.prefect_home),
               "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{self.database}",
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        env.pop("PREFECT_API_URL", None)
        command = [sys.executable, "-m", "prefect", "server", "start", "--host", self.host, "--port", str(self.port)]
        command = _dying_with_parent(command)
        # held back: an interrupt cannot land between the server starting and `self.process` naming it (stop()
        # would then find nothing to stop)
        with held_back(signal.SIGTERM, signal.SIGINT), self.log_file.open("w") as log_stream:
            # its own session: a terminal's Ctrl-C reaches only us, and we stop it after serve() has finished
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log_stream,
                                            stderr=subprocess.STDOUT, env=env, cwd=self.prefect_home,
                                            start_new_session=True)
        self._wait_healthy(timeout)

    def _wait_healthy(self, timeout: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while not _healthy(f"{self.api_url}/health"):
            if self.process.poll() is not None:
                raise ServerError(f"the Prefect server exited with code {self.process.returncode} while starting "
                                  f"({self.log_file}): {self.log_tail()}")
            if time.monotonic() > deadline:
                raise ServerError(f"the Prefect server did not answer {self.api_url}/health within {timeout:.0f} s; "
                                  f"see {self.log_file}")
            time.sleep(0.5)

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_file.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        kept = [line.strip() for line in text if line.strip(" ^~")]  # not traceback underlines
        return " | ".join(kept[-lines:]) or "(empty log)"

    def stop(self) -> None:
        """SIGTERM the server's process group, SIGKILL it after STOP_TIMEOUT_S; a no-op when it is gone."""
        if self.process is None:
            return
        for sig, wait in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, STOP_TIMEOUT_S)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(wait)
                break
            except subprocess.TimeoutExpired:
                log.warning("the Prefect server did not stop within %.0f s; killing it", wait)
        try:  # anything it started in its group
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _check_remote(api_url: str) -> None:
    health = f"{api_url.rstrip('/')}/health"
    if not _healthy(health):
        raise ServerError(f"PREFECT_API_URL={api_url}: no Prefect server answers {health}; start it, fix the "
                          "URL, or unset PREFECT_API_URL to run a local server")


# ------------------------------------------------------------------ the command


def run_schedule(settings: Settings, host: str, port: int, only: Sequence[str], echo: Echo) -> None:
    """Serve prefect.yaml's deployments on PREFECT_API_URL's server, else on a local one; blocks until stopped."""
    specs = read_deployments(settings, only)
    api_url = os.environ.get("PREFECT_API_URL")
    server = None if api_url else LocalServer(host, port, settings.home_dir)
    if server is not None:
        server.check_port()
    # flow runs start in subprocesses from here: same project (entrypoints are relative) and state root
    os.chdir(settings.project_root)
    os.environ.setdefault("DEFECTOPS_PROJECT", str(settings.project_root))
    os.environ.setdefault("DEFECTOPS_HOME", str(settings.home_dir))
    with sigterm_as_interrupt():  # until serving: SIGTERM acts as Ctrl-C
        try:
            deployments = build_deployments(specs, load_flows(settings, specs))
            if server is None:
                _check_remote(api_url)
            else:
                echo(f"starting a Prefect server on {server.url} (database {server.database}, log {server.log_file})")
                server.start()
                api_url = server.api_url
            os.environ["PREFECT_API_URL"] = api_url
            _serve(specs, deployments, api_url, echo, stops_server=server is not None)
        except KeyboardInterrupt:
            pass
        finally:
            if server is not None:
                with signal_handler(signal.SIG_IGN, signal.SIGTERM, signal.SIGINT):  # never half-stopped
                    server.stop()
    echo("stopped" + (": the deployments are paused on the server" if server is None else " (server too)"))


def _serve(specs: Sequence[DeploymentSpec], deployments: list[Any], api_url: str, echo: Echo,
           stops_server: bool) -> None:
    """`prefect.serve`, with one SIGTERM or Ctrl-C stopping it cleanly (see `_run_until_signal`)."""
    from prefect.runner import Runner
    from prefect.settings import PREFECT_API_URL, temporary_settings

    for spec in specs:
        plan = "; ".join(f"{describe(s)}, next {_next(s)}" for s in spec.schedules)
        echo(f"  {spec.name:<20} {plan or 'no schedule (manual runs only)'}")
    ui_url = api_url.rstrip("/").removesuffix("/api")
    with temporary_settings({PREFECT_API_URL: api_url}):
        runner = Runner(pause_on_shutdown=True)
        for deployment in deployments:
            runner.add_deployment(deployment)  # creates or updates it on the server, schedules included
        echo(f"Prefect UI: {ui_url}  (PREFECT_API_URL={api_url})")
        echo(f"serving {len(deployments)} deployment(s); this process runs their flow runs. "
             f"Ctrl-C or SIGTERM stops it{' and the server' if stops_server else ''}.")
        try:
            asyncio.run(_run_until_signal(runner, echo))
        finally:
            _flush_to_server()


def _flush_to_server(timeout: float = 10.0) -> None:
    """Send Prefect's queued logs and events while the server is up: their exit hooks would wait for it forever."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=timeout)


async def _run_until_signal(runner: Any, echo: Echo) -> None:
    """Run the Prefect runner until SIGTERM or SIGINT, then `Runner.astop()`: cancel runs, pause deployments.

    This is what `prefect.serve` does, minus its SIGTERM handler: that one calls the runner's sync `stop()`
    from inside the event loop (in 3.8.8 the coroutine is never awaited), which leaves flow runs `Running` and
    logs tracebacks. A second signal while stopping cancels at once.
    """
    loop = asyncio.get_running_loop()
    serving = asyncio.ensure_future(runner.start())
    await asyncio.sleep(0)  # runner.start() has now installed its own SIGTERM handler: replace it

    stopping: list[asyncio.Task] = []  # holds the task: the loop keeps only a weak reference

    def stop() -> None:
        if runner.started and not stopping:
            echo("stopping: cancelling flow runs in progress, pausing the deployments (again: at once)")
            stopping.append(loop.create_task(runner.astop()))
        else:
            serving.cancel()

    if in_main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop)
    try:
        await serving
    except asyncio.CancelledError:
        pass


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line; for pydantic's, only what was wrong."""
    from pydantic import ValidationError

    text = "; ".join(e["msg"] for e in exc.errors()) if isinstance(exc, ValidationError) else str(exc)
    return " ".join(text.split())[:300]
