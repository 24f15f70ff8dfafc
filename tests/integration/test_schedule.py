"""`defectops schedule`: prefect.yaml checked and printed, bad files and ports refused, and a real local server
that gets the deployments, schedules their runs and goes away with the command."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from components.cli import app
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.integration

REPO_DEPLOYMENTS = ["--only", "monthly-retraining", "--only", "daily-drift", "--only", "promote-approved"]
CRON_DEPLOYMENTS = ["--only", "monthly-retraining", "--only", "daily-drift"]  # served end to end: no promotion runs
TINY_FLOW = '''from prefect import flow


@flow
def tiny(window_days: int = 30) -> int:
    return window_days
'''

runner = CliRunner()


@pytest.fixture
def repo_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The repository as the project (its prefect.yaml and flows), with a throw-away state root."""
    monkeypatch.setenv("DEFECTOPS_PROJECT", str(REPO_ROOT))
    monkeypatch.setenv("DEFECTOPS_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.chdir(tmp_path)  # the serve path moves to the project root: restored after the test
    return REPO_ROOT


@pytest.fixture
def tiny_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project with one small flow and a prefect.yaml holding a cron and an interval deployment."""
    root = tmp_path / "project"
    (root / "flows").mkdir(parents=True)
    (root / "flows" / "tiny_flow.py").write_text(TINY_FLOW)
    write_prefect_yaml(root, [
        {"name": "nightly", "entrypoint": "flows/tiny_flow.py:tiny",
         "schedules": [{"cron": "30 1 * * *", "timezone": "Europe/Berlin", "active": True}]},
        {"name": "every-five-minutes", "entrypoint": "flows/tiny_flow.py:tiny", "parameters": {"window_days": 7},
         "schedules": [{"interval": 300, "active": True}]},
    ])
    monkeypatch.setenv("DEFECTOPS_PROJECT", str(root))
    monkeypatch.setenv("DEFECTOPS_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.chdir(tmp_path)
    return root


@pytest.fixture
def no_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """A test that expects an error before any server starts fails fast, instead of starting one."""
    from components.schedule import LocalServer, ServerError

    def refuse(self: LocalServer, timeout: float = 0) -> None:
        raise ServerError("the test expected an error before the server starts")

    monkeypatch.setattr(LocalServer, "start", refuse)


def schedule_options(check: bool) -> list[str]:
    """`--check`, or what serves on a free port."""
    return ["--check"] if check else ["--port", str(free_port())]


def write_prefect_yaml(root: Path, deployments: list[dict]) -> None:
    (root / "prefect.yaml").write_text(yaml.safe_dump({"name": "defectops", "deployments": deployments},
                                                      sort_keys=False))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


# ------------------------------------------------------------------ --check and usage errors


def test_check_prints_the_monthly_cron_and_its_next_three_runs(repo_project: Path) -> None:
    result = runner.invoke(app, ["schedule", "--check", *REPO_DEPLOYMENTS])
    assert result.exit_code == 0, result.output
    monthly = next(line for line in result.output.splitlines() if "0 2 1 * *" in line)
    assert "Europe/Berlin" in monthly
    runs = re.findall(r"(\d{4})-(\d{2})-(\d{2}) (\d{2}):(\d{2})", monthly)
    assert len(runs) == 3 and all(day == "01" and (hour, minute) == ("02", "00") for _, _, day, hour, minute in runs)
    months = [(int(year), int(month)) for year, month, *_ in runs]
    assert months == sorted(months) and len(set(months)) == 3, "three consecutive first-of-month runs"
    assert "0 6 * * *" in result.output and "daily-drift" in result.output
    promote = next(line for line in result.output.splitlines() if "every 300 s" in line)
    assert len(re.findall(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}", promote)) == 3
    assert "promote-approved  (flows/promotion_flow.py:promote_approved)" in result.output


def test_check_handles_cron_and_interval_schedules_of_any_deployment(tiny_project: Path) -> None:
    result = runner.invoke(app, ["schedule", "--check"])
    assert result.exit_code == 0, result.output
    assert "nightly" in result.output and "cron '30 1 * * *' Europe/Berlin" in result.output
    interval = next(line for line in result.output.splitlines() if "every 300 s" in line)
    assert len(re.findall(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}", interval)) == 3


@pytest.mark.parametrize(("change", "message"), [
    ({"entrypoint": "flows/missing_flow.py:tiny"}, "entrypoint file flows/missing_flow.py not found"),
    ({"entrypoint": "flows/tiny_flow.py:no_such_flow"}, "no @flow function 'no_such_flow'"),
    ({"schedules": [{"cron": "0 25 * * *", "timezone": "Europe/Berlin"}]}, "invalid schedule"),
    ({"schedules": [{"cron": "0 2 1 * *", "timezone": "Europe/Nowhere"}]}, "invalid schedule"),
    ({"parameters": {"no_such_parameter": 1}}, "bad `parameters`"),
])
def test_a_bad_prefect_yaml_is_a_one_line_error(tiny_project: Path, change: dict, message: str) -> None:
    entry = {"name": "nightly", "entrypoint": "flows/tiny_flow.py:tiny",
             "schedules": [{"cron": "30 1 * * *", "timezone": "Europe/Berlin"}], **change}
    write_prefect_yaml(tiny_project, [entry])
    result = runner.invoke(app, ["schedule", "--check"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert "nightly" in lines[0] and "prefect.yaml" in lines[0]


@pytest.mark.parametrize("check", [True, False], ids=["check", "serve"])
def test_two_deployments_with_one_name_are_refused_before_any_server_starts(no_server: None, tiny_project: Path,
                                                                           check: bool) -> None:
    """Prefect allows it (names are unique per flow), but here a name is a deployment's identity (`--only`)."""
    (tiny_project / "flows" / "other_flow.py").write_text(TINY_FLOW.replace("def tiny", "def other"))
    write_prefect_yaml(tiny_project, [
        {"name": "nightly", "entrypoint": "flows/tiny_flow.py:tiny", "schedules": [{"cron": "30 1 * * *"}]},
        {"name": "nightly", "entrypoint": "flows/other_flow.py:other", "schedules": [{"interval": 300}]},
    ])
    result = runner.invoke(app, ["schedule", *schedule_options(check)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "nightly" in lines[0] and "flows/tiny_flow.py:tiny" in lines[0] and "flows/other_flow.py:other" in lines[0]
    assert "unique `name`" in lines[0]


@pytest.mark.parametrize("check", [True, False], ids=["check", "serve"])
def test_a_schedule_without_future_runs_is_refused_before_any_server_starts(no_server: None, tiny_project: Path,
                                                                           check: bool) -> None:
    write_prefect_yaml(tiny_project, [{"name": "nightly", "entrypoint": "flows/tiny_flow.py:tiny",
                                       "schedules": [{"rrule": "FREQ=DAILY;UNTIL=20200101T000000"}]}])
    result = runner.invoke(app, ["schedule", *schedule_options(check)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "nightly" in lines[0] and "no future run" in lines[0] and "UNTIL" in lines[0]


def test_the_repository_prefect_yaml_with_a_wrong_entrypoint_is_refused(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    project = tmp_path / "copy"
    project.mkdir()
    config = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    config["deployments"][0]["entrypoint"] = "flows/monthly_flow.py:monthly_retrainin"  # a typo
    (project / "prefect.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (project / "flows").mkdir()
    (project / "flows" / "monthly_flow.py").write_text((REPO_ROOT / "flows" / "monthly_flow.py").read_text())
    monkeypatch.setenv("DEFECTOPS_PROJECT", str(project))
    monkeypatch.setenv("DEFECTOPS_HOME", str(tmp_path / "home"))
    result = runner.invoke(app, ["schedule", "--check", "--only", config["deployments"][0]["name"]])
    assert result.exit_code != 0
    assert result.output.strip().splitlines() == [result.output.strip()]
    assert "monthly_retrainin" in result.output and "Traceback" not in result.output


def test_an_unknown_only_name_lists_the_known_ones(repo_project: Path) -> None:
    result = runner.invoke(app, ["schedule", "--check", "--only", "weekly-nothing"])
    assert result.exit_code == 2 and "weekly-nothing" in result.output and "monthly-retraining" in result.output


def test_a_port_in_use_is_named_in_the_error(repo_project: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = runner.invoke(app, ["schedule", "--port", str(port), "--only", "daily-drift"])
    assert result.exit_code != 0
    assert f"port {port}" in result.output and "--port" in result.output and "Traceback" not in result.output
    assert "starting a Prefect server" not in result.output


def test_an_unreachable_prefect_api_url_is_a_one_line_error(repo_project: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"http://127.0.0.1:{free_port()}/api"
    monkeypatch.setenv("PREFECT_API_URL", url)
    result = runner.invoke(app, ["schedule", "--only", "daily-drift"])
    assert result.exit_code != 0
    error = result.output.strip().splitlines()[-1]
    assert error.startswith("error: ") and url in error and "unset PREFECT_API_URL" in error


# ------------------------------------------------------------------ end to end


def _post(port: int, path: str, body: dict) -> list[dict]:
    response = httpx.post(f"http://127.0.0.1:{port}/api/{path}", json=body, timeout=10)
    response.raise_for_status()
    return response.json()


def _poll(what: str, check, timeout: float, process: subprocess.Popen, log: Path):
    """Call `check` until it returns something truthy; fail naming `what` (with the command's output)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"`defectops schedule` exited ({process.returncode}) before {what}:\n{log.read_text()}")
        try:
            found = check()
        except httpx.HTTPError:
            found = None
        if found:
            return found
        time.sleep(1)
    pytest.fail(f"no {what} within {timeout:.0f} s:\n{log.read_text()}")


@pytest.mark.slow
def test_schedule_serves_the_deployments_on_a_local_server_and_stops_it(tmp_path: Path) -> None:
    port = free_port()
    home = tmp_path / "home"
    env = {**os.environ, "DEFECTOPS_HOME": str(home), "DEFECTOPS_PROJECT": str(REPO_ROOT)}
    for var in ("PREFECT_API_URL", "PREFECT_HOME"):  # a fresh machine: the command sets up Prefect by itself
        env.pop(var, None)
    log = tmp_path / "schedule.log"
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "components.cli", "schedule", "--port", str(port),
                                    *CRON_DEPLOYMENTS], cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        # the server's first start creates its database: slow on a loaded 2-core machine
        def both_deployments() -> dict[str, dict] | None:
            found = {d["name"]: d for d in _post(port, "deployments/filter", {})}
            return found if {"monthly-retraining", "daily-drift"} <= set(found) else None

        deployments = _poll("both deployments on the server", both_deployments, 240, process, log)
        assert set(deployments) == {"monthly-retraining", "daily-drift"}, "--only serves only those named"
        monthly = deployments["monthly-retraining"]
        assert not monthly["paused"]
        [schedule] = monthly["schedules"]
        assert schedule["active"] is True
        assert schedule["schedule"]["cron"] == "0 2 1 * *"
        assert schedule["schedule"]["timezone"] == "Europe/Berlin"
        assert deployments["daily-drift"]["parameters"] == {"trigger_retraining": True, "cooldown_days": 7,
                                                            "timezone": "Europe/Berlin"}  # window: params.yaml
        for served in deployments.values():  # one flow run at a time, as `prefect deploy` sets it
            assert served["global_concurrency_limit"]["limit"] == 1, served["name"]
            assert served["concurrency_options"]["collision_strategy"] == "CANCEL_NEW", served["name"]
        _poll("serving message", lambda: "Ctrl-C or SIGTERM" in log.read_text(), 60, process, log)
        output = log.read_text()
        assert f"Prefect UI: http://127.0.0.1:{port}" in output
        assert re.search(r"monthly-retraining\s+cron '0 2 1 \* \*' Europe/Berlin, next \d{4}-\d{2}-01 02:00", output)
        assert (home / "prefect" / "server.db").is_file() and (home / "logs" / "prefect-server.log").is_file()

        # the server's scheduler creates the upcoming runs (its recent-deployments loop runs every few seconds)
        runs = _poll("scheduled runs of monthly-retraining", lambda: _post(port, "flow_runs/filter", {
            "flow_runs": {"deployment_id": {"any_": [monthly["id"]]}, "state": {"type": {"any_": ["SCHEDULED"]}}},
            "sort": "EXPECTED_START_TIME_ASC"}), 90, process, log)
        for run in runs:
            local = datetime.fromisoformat(run["expected_start_time"]).astimezone(ZoneInfo("Europe/Berlin"))
            assert (local.day, local.hour, local.minute) == (1, 2, 0), run["expected_start_time"]

        stopped_at = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        seconds = time.monotonic() - stopped_at
    finally:
        if process.poll() is None:
            process.kill()  # the server dies with it (PR_SET_PDEATHSIG), but the test has failed anyway
            process.wait()
    assert process.returncode == 0, log.read_text()
    assert seconds < 30
    assert "stopped (server too)" in log.read_text()
    assert port_is_free(port), "the Prefect server outlived `defectops schedule`"
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=3)
