"""Replica status files: what each running service reports, and how promotion waits on them."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from components.config import Settings
from components.serving.deployment import DeploymentRecord, write_record
from components.serving.promotion import PromotionFailed, wait_for_service
from components.serving.reload import Deployment, RecordWatcher, file_stamp
from components.serving.replicas import FOLDER, ReplicaReport, replicas
from tests.serving.conftest import free_port

OLD = DeploymentRecord(model_uri="models:/defect-classifier/1", model_version="defect-classifier/1", threshold=0.8,
                       fast_path="fp32", deployed_at="2026-11-23T08:00:00+00:00")
NEW = OLD.model_copy(update={"model_uri": "models:/defect-classifier/2", "model_version": "defect-classifier/2",
                             "deployed_at": "2026-12-01T08:00:00+00:00"})


def _settings(tmp_path: Path) -> Settings:
    return Settings(project=tmp_path, home=tmp_path / "home")


def _status_file(settings: Settings, name: str, version: str, record: str, age_s: float = 0.0,
                 **fields: str) -> Path:
    """The status file another replica (another host) would have written `age_s` seconds ago."""
    beat = (datetime.now(UTC) - timedelta(seconds=age_s)).isoformat()
    status = {"replica": name, "host": name.rsplit("-", 1)[0], "pid": 1, "started_at": beat, "heartbeat_at": beat,
              "model_version": version, "fast_path": "fp32", "device": "cpu", "record": record, **fields}
    path = settings.state_dir / FOLDER / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(status))
    return path


def _wait(settings: Settings, timeout_s: float = 1.0) -> tuple[str, int]:
    """Promotion's wait for NEW, with no service answering on the URL."""
    return wait_for_service(settings, f"http://127.0.0.1:{free_port()}", NEW, timeout_s, 0.0, poll_s=1.0)


def test_a_replica_reports_what_it_serves_beats_and_leaves_no_file(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    report = ReplicaReport(settings, interval_s=0.05)
    report.serving(OLD.model_version, "openvino", "cpu", OLD.deployed_at)
    first = json.loads(report.path.read_text())
    assert first["model_version"] == OLD.model_version and first["record"] == OLD.deployed_at
    assert first["fast_path"] == "openvino" and first["loading"] is None and first["refused"] is None
    report.start()
    time.sleep(0.3)
    assert json.loads(report.path.read_text())["heartbeat_at"] > first["heartbeat_at"]
    live, stale = replicas(settings, stale_after_s=15)
    assert [r.replica for r in live] == [report.path.stem] and stale == []
    report.stop()
    assert not report.path.exists()
    time.sleep(0.15)
    assert not report.path.exists(), "no heartbeat after stop"


def test_replicas_sorts_live_from_stale_skips_garbage_and_forgets_the_long_dead(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    _status_file(settings, "node-a-7", NEW.model_version, NEW.deployed_at)
    _status_file(settings, "node-b-7", OLD.model_version, OLD.deployed_at, age_s=60)
    dead = _status_file(settings, "node-c-7", OLD.model_version, OLD.deployed_at, age_s=2 * 86400)
    (settings.state_dir / FOLDER / "node-d-7.json").write_text("{not json")
    live, stale = replicas(settings, stale_after_s=15)
    assert [r.replica for r in live] == ["node-a-7"]
    assert [r.replica for r in stale] == ["node-b-7", "node-c-7"]
    assert not dead.exists()


def test_promotion_waits_for_every_live_replica(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    _status_file(settings, "node-a-7", NEW.model_version, NEW.deployed_at)
    _status_file(settings, "node-b-7", NEW.model_version, NEW.deployed_at)
    _status_file(settings, "node-c-7", OLD.model_version, OLD.deployed_at, age_s=60)  # gone: not waited for
    assert _wait(settings) == ("swapped", 2)

    behind = _status_file(settings, "node-b-7", OLD.model_version, OLD.deployed_at, loading=NEW.deployed_at)
    with pytest.raises(PromotionFailed, match="replica node-b-7 still serves defect-classifier/1 1 s after"):
        _wait(settings)
    behind.unlink()
    assert _wait(settings) == ("swapped", 1)


def test_promotion_fails_when_one_replica_refuses_the_record(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    _status_file(settings, "node-a-7", NEW.model_version, NEW.deployed_at)
    _status_file(settings, "node-b-7", OLD.model_version, OLD.deployed_at, refused=NEW.deployed_at,
                 refused_version=NEW.model_version, refused_error="CUDA out of memory")
    with pytest.raises(PromotionFailed, match=r"replica node-b-7 could not load defect-classifier/2 \(CUDA out of "
                                              r"memory\); it kept serving defect-classifier/1"):
        _wait(settings, timeout_s=60)
    # a refusal of an earlier record of the same version does not fail this promotion
    _status_file(settings, "node-b-7", NEW.model_version, NEW.deployed_at, refused="2026-11-30T08:00:00+00:00")
    assert _wait(settings) == ("swapped", 2)


def test_no_replica_and_no_service_means_the_record_waits_for_the_next_start(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    _status_file(settings, "node-a-7", OLD.model_version, OLD.deployed_at, age_s=3600)  # killed an hour ago
    assert _wait(settings) == ("down", 0)


def test_the_watcher_reports_loading_refusal_and_swap(tmp_path: Path) -> None:
    """The service's record watcher keeps the replica's status current (the load itself is a stand-in here:
    loading real models is what tests/serving/test_promotion.py does against `bentoml serve`)."""
    settings = _settings(tmp_path)
    path = write_record(settings, OLD)

    class Engine:
        device = "cpu"

    current = Deployment(OLD, engine=Engine(), reference=None, fast_path="fp32", batcher=None, stamp=file_stamp(path))
    report = ReplicaReport(settings, interval_s=60)
    seen_loading: list[str | None] = []

    def refuse(record: DeploymentRecord, stamp: object) -> Deployment:
        seen_loading.append(json.loads(report.path.read_text())["loading"])
        raise RuntimeError("parity failed\nlong traceback")

    watcher = RecordWatcher(path, current, refuse, lambda _: None, poll_s=60, report=report).start()
    watcher.stop()
    assert json.loads(report.path.read_text())["record"] == OLD.deployed_at
    write_record(settings, NEW)
    watcher.check()
    status = json.loads(report.path.read_text())
    assert seen_loading == [NEW.deployed_at]
    assert status["model_version"] == OLD.model_version and status["loading"] is None
    assert (status["refused"], status["refused_version"], status["refused_error"]) == (
        NEW.deployed_at, NEW.model_version, "parity failed")

    watcher.load = lambda record, stamp: Deployment(record, Engine(), None, "fp32", None, stamp)
    newer = NEW.model_copy(update={"deployed_at": "2026-12-02T08:00:00+00:00"})
    write_record(settings, newer)
    watcher.check()
    status = json.loads(report.path.read_text())
    assert (status["model_version"], status["record"]) == (NEW.model_version, newer.deployed_at)
    report.stop()


def test_the_replicas_command_lists_live_and_gone_replicas(plant: Settings) -> None:
    from typer.testing import CliRunner

    from components.cli import app

    runner = CliRunner()
    empty = runner.invoke(app, ["replicas"])
    assert empty.exit_code == 0 and "no service replica has reported" in empty.output
    _status_file(plant, "node-a-7", NEW.model_version, NEW.deployed_at)
    _status_file(plant, "node-b-7", OLD.model_version, OLD.deployed_at, refused=NEW.deployed_at,
                 refused_version=NEW.model_version, refused_error="CUDA out of memory")
    _status_file(plant, "node-c-7", OLD.model_version, OLD.deployed_at, age_s=3600)
    listed = runner.invoke(app, ["replicas"])
    assert listed.exit_code == 0, listed.output
    rows = {line.split()[0]: line for line in listed.output.splitlines()[1:]}
    assert set(rows) == {"node-a-7", "node-b-7", "node-c-7"}
    assert " live " in rows["node-a-7"] and NEW.model_version in rows["node-a-7"]
    assert "defect-classifier/2: CUDA out of memory" in rows["node-b-7"] and " gone " in rows["node-c-7"]
    as_json = json.loads(runner.invoke(app, ["replicas", "--json"]).output)
    assert [r["replica"] for r in as_json["live"]] == ["node-a-7", "node-b-7"]
    assert [r["replica"] for r in as_json["gone"]] == ["node-c-7"]


def test_a_replica_still_starting_is_waited_for_until_it_serves_the_record(tmp_path: Path) -> None:
    """A pod restarted during a promotion reports before it has loaded anything: promotion waits for it (it may
    be loading the old record), fails on its refusal, and stops waiting once its file goes stale."""
    import threading

    settings = _settings(tmp_path)
    _status_file(settings, "node-a-7", NEW.model_version, NEW.deployed_at)
    starting = ReplicaReport(settings, interval_s=0.2).start()
    try:
        starting.loading(OLD.deployed_at, OLD.model_version)  # read the record just before promotion rewrote it
        status = json.loads(starting.path.read_text())
        assert (status["model_version"], status["record"], status["loading"]) == ("", "", OLD.deployed_at)
        with pytest.raises(PromotionFailed, match=rf"replica {starting.path.stem} is still starting \(loading "
                                                  r"defect-classifier/1\) 1 s after the record named"):
            _wait(settings)
        threading.Timer(0.5, starting.serving, args=(NEW.model_version, "fp32", "cpu", NEW.deployed_at)).start()
        assert _wait(settings, timeout_s=30) == ("swapped", 2)
    finally:
        starting.stop()

    _status_file(settings, "node-b-7", "", "", refused=NEW.deployed_at, refused_version=NEW.model_version,
                 refused_error="CUDA out of memory")
    with pytest.raises(PromotionFailed, match=r"replica node-b-7 could not load defect-classifier/2 \(CUDA out of "
                                              r"memory\); it did not start"):
        _wait(settings, timeout_s=60)
    _status_file(settings, "node-b-7", "", "", age_s=60, loading=NEW.deployed_at)  # died while starting
    assert _wait(settings) == ("swapped", 1)


def test_the_service_reports_before_it_loads_its_first_model(plant: Settings,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The service's start (the model load is a stand-in): its status file names the record it is loading before
    the load begins, names the refusal if the load fails, and what it serves once started."""
    from types import SimpleNamespace

    from components.serving import reload
    from components.serving.service import DefectClassifier

    stamp = file_stamp(write_record(plant, NEW))
    during_load: list[dict] = []

    def status() -> dict:
        files = list((plant.state_dir / FOLDER).glob("*.json"))
        assert len(files) == 1, files
        return json.loads(files[0].read_text())

    def refuse(settings: Settings, serve: object, record: DeploymentRecord, max_pixels: int,
               stamp: object) -> Deployment:
        during_load.append(status())
        raise RuntimeError("CUDA out of memory\nlong traceback")

    monkeypatch.setattr(reload, "load_deployment", refuse)
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        DefectClassifier.inner()
    assert [(s["loading"], s["loading_version"], s["record"]) for s in during_load] == [
        (NEW.deployed_at, NEW.model_version, "")]
    refused = status()
    assert (refused["refused"], refused["refused_error"], refused["loading"]) == (
        NEW.deployed_at, "CUDA out of memory", None)
    for path in (plant.state_dir / FOLDER).glob("*.json"):
        path.unlink()

    def load(settings: Settings, serve: object, record: DeploymentRecord, max_pixels: int,
             stamp: object) -> Deployment:
        during_load.append(status())
        engine = SimpleNamespace(device="cpu", prepare=lambda pixels: pixels, normal_class="normal")
        batcher = SimpleNamespace(max_batch_size=4, max_latency_ms=10, stopped=False, shutdown=lambda: None)
        return Deployment(record, engine, None, "fp32", batcher, stamp)

    monkeypatch.setattr(reload, "load_deployment", load)
    service = DefectClassifier.inner()
    try:
        assert during_load[-1]["loading"] == NEW.deployed_at and during_load[-1]["record"] == ""
        started = status()
        assert (started["model_version"], started["record"], started["loading"]) == (
            NEW.model_version, NEW.deployed_at, None)
        assert service.watcher.seen == stamp
    finally:
        service.shutdown()
    assert not list((plant.state_dir / FOLDER).glob("*.json"))
