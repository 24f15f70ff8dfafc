"""The monthly loop under a real Prefect server, and the deployment schedules as Prefect reads them."""

from __future__ import annotations

import asyncio
import inspect
import logging
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import yaml

from components.locks import exclusive
from flows.monthly_flow import LAST_RETRAINING, _record_retraining, last_retraining
from tests.conftest import REPO_ROOT, make_imagefolder
from tests.integration.test_training_flow import TINY_PROFILE

pytestmark = pytest.mark.integration

# flows.monthly_flow is imported above, not in a test: importing prefect sets up logging, which inside a test would
# drop pytest's log capture (caplog)


def test_schedules_load_with_cron_and_timezone() -> None:
    from prefect.server.schemas.schedules import CronSchedule

    config = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in config["deployments"]}
    assert set(deployments) >= {"monthly-retraining", "daily-drift"}
    spec = deployments["monthly-retraining"]["schedules"][0]
    monthly = CronSchedule(cron=spec["cron"], timezone=spec["timezone"])
    runs = monthly.get_dates(3, start=datetime(2026, 11, 23, tzinfo=ZoneInfo("UTC")))
    runs = asyncio.run(runs) if inspect.iscoroutine(runs) else runs  # sync or async, by context
    assert [(r.year, r.month, r.day, r.hour) for r in runs] == [(2026, 12, 1, 2), (2027, 1, 1, 2), (2027, 2, 1, 2)]
    assert all(str(r.tzinfo) == "Europe/Berlin" for r in runs)
    assert deployments["monthly-retraining"]["parameters"]["timezone"] == spec["timezone"], "last month: the plant's"
    daily = deployments["daily-drift"]["schedules"][0]
    assert CronSchedule(cron=daily["cron"], timezone=daily["timezone"]).cron == "0 6 * * *"
    for deployment in deployments.values():
        module, name = deployment["entrypoint"].split(":")
        assert f"def {name}(" in (REPO_ROOT / module).read_text()


@pytest.mark.slow
def test_monthly_retraining_end_to_end_and_idempotent(project, tmp_path: Path, prefect_server) -> None:
    from flows.monthly_flow import monthly_retraining

    params = yaml.safe_load(project.params_file.read_text())
    params["train"]["profile"] = "tiny"
    params["train"]["profiles"]["tiny"] = TINY_PROFILE
    params["evaluate"]["n_boot"] = 50
    project.params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    state = monthly_retraining(new_data=str(make_imagefolder(tmp_path / "month1", per_class=8)), return_state=True)
    first = state.result()
    assert first["ingested"]["changed"] and first["registered"]["created"]
    # last month's drift is judged before the imports: its reference must be the dataset the champion knew
    order = asyncio.run(_task_order(state.state_details.flow_run_id))
    assert order.index("drift-check") < order.index("ingest-dataset"), order
    # no production log yet (and no champion): reported, never drift, and the loop goes on
    assert first["drift_previous_month"]["status"] in ("skipped", "not_enough_data")
    assert not first["drift_previous_month"]["drift"]
    assert last_retraining()["dataset_version"] == first["dataset_version"]
    again = monthly_retraining(new_data=str(tmp_path / "month1"))
    assert not again["ingested"]["changed"] and again["skipped"], "same data version: no duplicate model"


async def _task_order(flow_run_id) -> list[str]:
    """The names of a flow run's tasks and subflows (without the run-count suffix), in the order they started."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    for _ in range(100):  # the server records task runs from events, a moment after the flow returns
        async with get_client() as client:
            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        if all(run.start_time for run in runs) and {"drift-check", "ingest-dataset"} <= {
                run.name.rsplit("-", 1)[0] for run in runs}:
            break
        await asyncio.sleep(0.2)
    return [run.name.rsplit("-", 1)[0] for run in sorted(runs, key=lambda run: run.start_time)]


def test_two_monthly_runs_at_once_refuse(project, prefect_server) -> None:
    from prefect.states import StateType

    from flows.monthly_flow import monthly_retraining

    project.ensure()
    with exclusive(project.locks_dir, "monthly", "a monthly retraining run"):
        state = monthly_retraining(return_state=True)
    assert state.type == StateType.FAILED and "already running" in state.message


def test_a_torn_retraining_record_counts_as_none_with_a_warning(project, caplog: pytest.LogCaptureFixture) -> None:
    record = project.ensure().state_dir / LAST_RETRAINING
    for broken in ('{"at": "2025-03-01T02:', "[]", '{"at": "yesterday"}', '{"dataset_version": "abc"}'):
        record.write_text(broken)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert last_retraining() is None, broken
        [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert str(record) in warning and "rewrites it" in warning and "\n" not in warning, warning
    record.write_text('{"at": "2025-03-01T02:00:00+00:00", "dataset_version": "abc", "version": "3"}')
    assert last_retraining() == {"at": "2025-03-01T02:00:00+00:00", "dataset_version": "abc", "version": "3"}


def test_a_retraining_record_is_never_left_half_written(project, monkeypatch: pytest.MonkeyPatch) -> None:
    project.ensure()
    _record_retraining({"dataset_version": "v1", "registered": {"version": "1"}})
    before = last_retraining()
    write_text = Path.write_text

    def killed_halfway(path: Path, text: str, *args, **kwargs) -> int:  # the process dies mid-write
        write_text(path, text[: len(text) // 2], *args, **kwargs)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(Path, "write_text", killed_halfway)
        _record_retraining({"dataset_version": "v2", "registered": {"version": "2"}})
    assert last_retraining() == before and before["dataset_version"] == "v1"
