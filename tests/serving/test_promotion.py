"""Promotion into a real `bentoml serve` under load, rollback, refusal of unapproved champions, a kill mid-way."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Self

import pytest

from components.config import Params, Settings, load_params
from components.errors import DefectOpsError
from components.registry.registry import _champion_version, approve, audit_trail
from components.registry.tracking import MODEL_NAME, connect
from components.serving.deployment import NotApproved, read_record, record_path
from components.serving.promotion import promote, rollback, service_state
from components.serving.replicas import replicas
from components.serving.run import runtime_home
from tests.serving.conftest import (
    PROBES,
    free_port,
    kill_server,
    make_tiny_model,
    probe_png,
    register_model_file,
    start_server,
    stop_server,
    until,
    write_probe_images,
)

pytestmark = pytest.mark.integration

CANDIDATE = {"gate_status": "passed", "approval_status": "pending"}


def _candidate(plant: Settings, tmp_path: Path, seed: int) -> str:
    """A registered version that passed the gate against the current champion and waits for approval."""
    model = make_tiny_model(tmp_path / f"model-{seed}" / "model.pt", seed=seed)
    champion = _champion_version(connect(plant)) or "none"
    return register_model_file(plant, model, {**CANDIDATE, "compared_with": champion})


def _tags(plant: Settings, version: str) -> dict[str, str]:
    return dict(connect(plant).get_model_version(MODEL_NAME, version).tags)


class Load:
    """A few clients posting /predict in a loop; every answer kept as (status, model_version)."""

    def __init__(self, url: str, clients: int = 3) -> None:
        self.url, self.results, self.stop = url, [], threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def _client(self, index: int) -> None:
        import httpx

        kinds = list(PROBES)
        with httpx.Client(timeout=60.0) as http:
            n = index
            while not self.stop.is_set():
                try:
                    response = http.post(f"{self.url}/predict", files={"image": ("p.png", probe_png(kinds[n % 3]))})
                    self.results.append((response.status_code, response.json().get("model_version")))
                except httpx.HTTPError as exc:
                    self.results.append((0, repr(exc)))
                n += 1

    def __enter__(self) -> Self:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)


@pytest.fixture
def served(plant: Settings, tmp_path: Path) -> Iterator[tuple[str, object]]:
    """Version 1 approved, promoted with no service running, then served by a real `bentoml serve`."""
    write_probe_images(plant)  # the tracked images parity is checked on
    first = _candidate(plant, tmp_path, seed=0)
    approve(plant, first, by="qa", note="first model")
    result = promote(plant, load_params(plant.params_file), by="tests", url=f"http://127.0.0.1:{free_port()}",
                     bento=False)
    assert result.changed and result.service == "not running"
    assert read_record(plant).model_version == f"{MODEL_NAME}/{first}"
    server = start_server(plant.project_root, plant.home_dir, free_port())
    yield first, server
    stop_server(server)


@pytest.mark.slow
def test_promotion_under_load_drops_nothing_and_rollback_goes_back(plant: Settings, tmp_path: Path,
                                                                   served: tuple[str, object]) -> None:
    first, server = served
    params = load_params(plant.params_file)
    assert service_state(server.url)["serving"] == [f"{MODEL_NAME}/{first}"]
    second = _candidate(plant, tmp_path, seed=1)
    approve(plant, second, by="qa", note="better on scratches")
    replica = start_server(plant.project_root, plant.home_dir, free_port())  # a second replica, same state root
    try:
        with Load(server.url) as load:
            time.sleep(2)
            result = promote(plant, params, by="tests", url=server.url)
            time.sleep(2)
        assert result.replicas == 2, "promotion waits for every replica, not the one behind the URL"
        assert service_state(replica.url)["serving"] == [f"{MODEL_NAME}/{second}"]
        assert runtime_home(replica.port).is_dir()
    finally:
        stop_server(replica)
    assert not runtime_home(replica.port).exists(), "a stopped service leaves no runtime folder in /tmp"
    live, _ = replicas(plant, stale_after_s=60)
    assert len(live) == 1, "a replica that stops removes its status file"
    answers = load.results
    assert result.changed and result.service == "swapped" and result.previous == f"{MODEL_NAME}/{first}"
    assert result.bento and result.bento.startswith(f"defect_classifier:v{second}-")
    assert answers and all(status == 200 for status, _ in answers), [a for a in answers if a[0] != 200][:3]
    versions = [version for _, version in answers]
    assert f"{MODEL_NAME}/{first}" in versions and versions[-3:] == [f"{MODEL_NAME}/{second}"] * 3
    assert service_state(server.url)["serving"] == [f"{MODEL_NAME}/{second}"]
    tags = _tags(plant, second)
    assert tags["deployment_status"] == "serving" and tags["deployed_by"] == "tests"
    assert tags["deployed_bento"] == result.bento and _tags(plant, first)["deployment_status"] == "retired"

    again = promote(plant, params, by="tests", url=server.url)
    assert not again.changed and again.service == "already serving"

    moved, back = rollback(plant, params, by="qa lead", reason="misses blowholes on line 2", url=server.url,
                           bento=False)
    assert moved == {"from_version": second, "version": first} and back.service == "swapped"
    assert service_state(server.url)["serving"] == [f"{MODEL_NAME}/{first}"]
    assert str(connect(plant).get_model_version_by_alias(MODEL_NAME, "champion").version) == first
    rolled = _tags(plant, second)
    assert rolled["approval_status"] == "rolled_back" and rolled["rolled_back_by"] == "qa lead"
    assert rolled["rolled_back_reason"] == "misses blowholes on line 2"
    assert _tags(plant, first)["restored_by"] == "qa lead"
    actions = [(e["action"], str(e["version"])) for e in audit_trail(plant)]
    assert actions[-2:] == [("rollback", first), ("deploy", first)]
    with pytest.raises(DefectOpsError, match="no earlier approved deployment"):
        rollback(plant, params, by="qa lead", reason="again", url=server.url)  # the only other one was rolled back

    # a champion moved by hand (MLflow UI) without `defectops approve` is refused; nothing changes
    third = _candidate(plant, tmp_path, seed=2)
    connect(plant).set_registered_model_alias(MODEL_NAME, "champion", third)
    before = record_path(plant).read_bytes()
    with pytest.raises(NotApproved, match=f"version {third} holds 'champion' but its approval_status is 'pending'"):
        promote(plant, params, by="tests", url=server.url)
    assert record_path(plant).read_bytes() == before
    assert service_state(server.url)["serving"] == [f"{MODEL_NAME}/{first}"]


@pytest.mark.slow
def test_a_service_killed_during_promotion_comes_back_on_a_consistent_version(
        plant: Settings, tmp_path: Path, served: tuple[str, object]) -> None:
    _, server = served
    second = _candidate(plant, tmp_path, seed=1)
    approve(plant, second, by="qa")
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = promote(plant, load_params(plant.params_file), by="tests", url=server.url,
                                        bento=False)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            outcome["error"] = exc

    before = record_path(plant).stat().st_mtime_ns
    promoting = threading.Thread(target=run)
    promoting.start()
    deadline = time.monotonic() + 120
    while record_path(plant).stat().st_mtime_ns == before and time.monotonic() < deadline:
        time.sleep(0.02)
    kill_server(server)  # kill -9, the moment the new record lands
    assert service_state(server.url) is None
    promoting.join(120)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["result"].service == "not running"
    assert json.loads(record_path(plant).read_text())["model_version"] == f"{MODEL_NAME}/{second}"

    restarted = start_server(plant.project_root, plant.home_dir, free_port())
    try:
        import httpx

        answer = httpx.post(f"{restarted.url}/predict", files={"image": ("p.png", probe_png("dark"))}, timeout=60)
        assert answer.status_code == 200 and answer.json()["model_version"] == f"{MODEL_NAME}/{second}"
        assert _tags(plant, second)["deployment_status"] == "serving"
    finally:
        stop_server(restarted)


def test_a_record_the_service_cannot_load_keeps_the_old_model(tmp_path: Path) -> None:
    """The watcher in the service: a broken new record is refused and counted; the old model keeps serving."""
    from components.serving import metrics
    from components.serving.deployment import DeploymentRecord, write_record
    from components.serving.reload import Deployment, RecordWatcher, file_stamp

    settings = Settings(project=tmp_path, home=tmp_path / "home")
    old = DeploymentRecord(model_uri="models:/defect-classifier/1", model_version="defect-classifier/1",
                           threshold=0.8, fast_path="fp32", deployed_at="2026-11-23T08:00:00+00:00")
    path = write_record(settings, old)
    current = Deployment(old, engine=None, reference=None, fast_path="fp32", batcher=None, stamp=file_stamp(path))
    swapped: list = []

    def load(record: DeploymentRecord, stamp: object) -> Deployment:
        raise DefectOpsError(f"cannot load {record.model_uri}")

    watcher = RecordWatcher(path, current, load, swapped.append, poll_s=60)
    failed = metrics.MODEL_RELOADS.labels("failed")._value.get()
    write_record(settings, old.model_copy(update={"model_uri": "models:/defect-classifier/2",
                                                  "model_version": "defect-classifier/2"}))
    watcher.check()
    assert swapped == [] and watcher.current is current
    assert metrics.MODEL_RELOADS.labels("failed")._value.get() == failed + 1
    watcher.check()  # the same broken file is not retried in a loop
    assert metrics.MODEL_RELOADS.labels("failed")._value.get() == failed + 1
    write_record(settings, old.model_copy(update={"deployed_at": "2026-11-24T08:00:00+00:00"}))
    watcher.check()  # the same model again (re-pinned): adopted without loading anything
    assert swapped == [] and watcher.current.record.deployed_at.startswith("2026-11-24")


def test_a_swap_while_a_request_is_still_decoding_answers_it_on_the_old_model() -> None:
    """The race behind a 60 s client timeout under load: a request took the old deployment and was still decoding
    its image (nothing queued yet) when the swap retired it. It must be answered by the old model, and the old
    batcher must stop only once the request has let go of it."""
    import asyncio

    from components.serving.batching import Batcher
    from components.serving.deployment import DeploymentRecord
    from components.serving.reload import Deployment, retire

    record = DeploymentRecord(model_uri="models:/defect-classifier/1", model_version="defect-classifier/1",
                              threshold=0.8, fast_path="fp32", deployed_at="2026-11-23T08:00:00+00:00")

    async def scenario() -> None:
        batcher = Batcher(lambda items, _stream: [2 * item for item in items], max_batch_size=4,
                          max_latency_ms=30000)
        assert await batcher(1) == 2  # it has served before
        old = Deployment(record, engine=None, reference=None, fast_path="fp32", batcher=batcher, stamp=None)
        with old.serving() as held:
            await asyncio.to_thread(retire, old, 10.0)  # the watcher thread swaps ...
            await asyncio.sleep(0.3)  # ... and the drain looks while the request is still decoding
            assert await asyncio.wait_for(held.batcher(21), 5) == 42
            assert not batcher.stopped
        await until(lambda: batcher.stopped, what="the retired batcher stopped")  # once nothing holds it

    asyncio.run(scenario())


def test_the_service_swap_waits_longer_than_one_batchs_latency_budget() -> None:
    """On CUDA the latency budget is 0.5 s; a request still decoding a large image after that must still be
    answered by the model it started on, so the service's swap waits up to the request timeout."""
    import asyncio
    from types import SimpleNamespace

    from components.serving.batching import Batcher
    from components.serving.deployment import DeploymentRecord
    from components.serving.reload import Deployment
    from components.serving.service import DefectClassifier, ExplainerCache

    def deployment(version: int, batcher: Batcher) -> Deployment:
        record = DeploymentRecord(model_uri=f"models:/defect-classifier/{version}",
                                  model_version=f"defect-classifier/{version}", threshold=0.8, fast_path="fp32",
                                  deployed_at="2026-11-23T08:00:00+00:00")
        return Deployment(record, engine=SimpleNamespace(device="cpu"), reference=None, fast_path="fp32",
                          batcher=batcher, stamp=None)

    async def scenario() -> None:
        old_batcher = Batcher(lambda items, _stream: [2 * item for item in items], max_batch_size=4,
                              max_latency_ms=500)
        new_batcher = Batcher(lambda items, _stream: [3 * item for item in items], max_batch_size=4,
                              max_latency_ms=500)
        service = DefectClassifier.inner.__new__(DefectClassifier.inner)
        service.deployment = deployment(1, old_batcher)
        service._explainers = ExplainerCache(lambda: service.deployment)
        with service.deployment.serving() as held:
            await asyncio.to_thread(service._swap, deployment(2, new_batcher))
            await asyncio.sleep(0.8)  # still decoding, past the 0.5 s budget
            assert await asyncio.wait_for(held.batcher(21), 5) == 42
        await until(lambda: old_batcher.stopped, what="the swapped-out batcher stopped")
        assert service.deployment.model_version == "defect-classifier/2"
        new_batcher.shutdown()

    asyncio.run(scenario())


def test_an_explain_across_a_swap_leaves_no_copy_of_the_old_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """/explain builds a Grad-CAM copy of its model; one built for a swapped-out model serves its request and is
    then freed, not cached for the life of the process."""
    import gc
    import weakref
    from types import SimpleNamespace

    from components.serving import explain
    from components.serving.deployment import DeploymentRecord
    from components.serving.reload import Deployment
    from components.serving.service import DefectClassifier, ExplainerCache

    built: list[weakref.ref] = []
    during_build: list = []  # a swap to run while the next explainer is being built

    class Explainer:
        def __init__(self, model: str, device: str) -> None:
            built.append(weakref.ref(self))
            self.model = model
            if during_build:
                during_build.pop()()

        def overlay_base64(self, rgb, tensor, target: int, max_side: int) -> str:
            return f"overlay on {self.model}"

    def deployment(version: int) -> Deployment:
        record = DeploymentRecord(model_uri=f"models:/defect-classifier/{version}",
                                  model_version=f"defect-classifier/{version}", threshold=0.8, fast_path="fp32",
                                  deployed_at="2026-11-23T08:00:00+00:00")
        return Deployment(record, engine=SimpleNamespace(device="cpu"),
                          reference=SimpleNamespace(model=f"model {version}", device="cpu"), fast_path="fp32",
                          batcher=SimpleNamespace(shutdown=lambda: None), stamp=None)

    def alive() -> list[bool]:
        gc.collect()
        return [ref() is not None for ref in built]

    monkeypatch.setattr(explain, "GradCamExplainer", Explainer)
    first, second, third = deployment(1), deployment(2), deployment(3)
    service = DefectClassifier.inner.__new__(DefectClassifier.inner)
    service.deployment = first
    service._explainers = ExplainerCache(lambda: service.deployment)
    assert [service._overlay_png(None, None, 0, first) for _ in range(2)] == ["overlay on model 1"] * 2
    assert alive() == [True]  # built once, cached

    service._swap(second)  # an /explain that took `first` reaches Grad-CAM after the swap
    assert service._overlay_png(None, None, 0, first) == "overlay on model 1"
    assert alive() == [False, False]
    during_build.append(lambda: service._swap(third))  # the swap lands while `second`'s copy is being made
    assert service._overlay_png(None, None, 0, second) == "overlay on model 2"
    assert alive() == [False, False, False]
    assert service._overlay_png(None, None, 0, third) == "overlay on model 3"
    assert service._overlay_png(None, None, 0, third) == "overlay on model 3"
    assert alive() == [False, False, False, True]


@pytest.mark.parametrize(("args", "message"), [
    (["promote", "--no-bento"], "nothing approved to serve"),
    (["rollback", "--by", "qa", "--reason", "bad batch"], "nothing registered is deployed"),
])
def test_promote_and_rollback_with_nothing_to_do_are_one_line_errors(plant: Settings, args: list[str],
                                                                      message: str) -> None:
    from typer.testing import CliRunner

    from components.cli import app

    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and message in result.output
    assert "Traceback" not in result.output and read_record(plant) is None


def test_a_record_left_by_a_stopped_promotion_is_not_already_serving(plant: Settings, tmp_path: Path) -> None:
    """A promotion killed while waiting leaves the record on the champion; a replica that refused it still
    serves the old model, so the next promotion fails naming that, instead of reporting "already serving"."""
    from components.serving.deployment import DeploymentRecord, write_record
    from components.serving.promotion import PromotionFailed
    from components.serving.replicas import ReplicaReport

    version = _candidate(plant, tmp_path, seed=0)
    approve(plant, version, by="qa")
    left = DeploymentRecord(model_uri=f"models:/{MODEL_NAME}/{version}", model_version=f"{MODEL_NAME}/{version}",
                            threshold=0.8, fast_path="fp32", deployed_at="2026-11-23T08:00:00+00:00")
    write_record(plant, left)
    replica = ReplicaReport(plant, interval_s=60)
    replica.serving("defect-classifier/0", "fp32", "cpu", "2026-11-01T08:00:00+00:00")
    replica.refused(left.deployed_at, left.model_version, "out of GPU memory")
    try:
        with pytest.raises(PromotionFailed, match=rf"could not load {MODEL_NAME}/{version} \(out of GPU memory\).*"
                                                  "since a promotion that stopped before the service took it"):
            promote(plant, load_params(plant.params_file), url=f"http://127.0.0.1:{free_port()}", bento=False)
        assert _tags(plant, version).get("deployment_status") is None
    finally:
        replica.stop()


def _deployed_then_approved(plant: Settings, tmp_path: Path) -> tuple[Params, str, str, str]:
    """(params, a free service URL, v1 deployed there, v2 approved since but not promoted)."""
    write_probe_images(plant)
    params, url = load_params(plant.params_file), f"http://127.0.0.1:{free_port()}"
    first = _candidate(plant, tmp_path, seed=0)
    approve(plant, first, by="qa", note="first")
    promote(plant, params, by="tests", url=url, bento=False)
    second = _candidate(plant, tmp_path, seed=1)
    approve(plant, second, by="qa", note="second")
    return params, url, first, second


@pytest.mark.parametrize("cut", ["record_deployment", "_audit"])
def test_a_deployment_left_unrecorded_is_completed_by_the_next_run(plant: Settings, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    cut: str) -> None:
    """A promotion swaps v1 for v2, then recording it fails (a registry blip before the tags, or a SIGTERM after
    them, at the audit line); the next run finds the record on v2 and completes the deployment as that run would
    have: v1 retired, one audit line naming v1, the record and the Bento."""
    from components.registry import registry
    from components.serving import promotion
    from flows.promotion_flow import deployment_markdown

    params, url, first, second = _deployed_then_approved(plant, tmp_path)
    monkeypatch.setattr(promotion, "build_bento", lambda settings, record: f"defect_classifier:v{second}-test")
    real = getattr(registry, cut)

    def cut_off(*args: object, **kwargs: object) -> None:
        monkeypatch.setattr(registry, cut, real)  # once
        raise RuntimeError("registry blip")

    monkeypatch.setattr(registry, cut, cut_off)
    with pytest.raises(RuntimeError, match="registry blip"):
        promote(plant, params, by="tests", url=url)
    record = read_record(plant)
    assert record.model_version == f"{MODEL_NAME}/{second}"

    done = promote(plant, params, by="the next run", url=url)
    assert done.changed and done.completed and done.previous == f"{MODEL_NAME}/{first}"
    assert done.bento == f"defect_classifier:v{second}-test" and done.service == "not running"
    assert _tags(plant, second)["deployment_status"] == "serving" and _tags(plant, first)["deployment_status"] == "retired"
    assert _tags(plant, second)["deployed_bento"] == done.bento
    deploys = [e for e in audit_trail(plant) if e["action"] == "deploy"]
    assert [(e["version"], e["previous_deployed"]) for e in deploys] == [(first, None), (second, first)]
    assert (deploys[-1]["record"], deploys[-1]["bento"], deploys[-1]["by"], deploys[-1]["completed_by"]) == (
        record.deployed_at, done.bento, "tests", "the next run")
    assert "completed the tags and audit line" in deployment_markdown(done.as_dict())

    again = promote(plant, params, by="the next run", url=url)
    assert not again.changed and again.service == "not running"
    assert len([e for e in audit_trail(plant) if e["action"] == "deploy"]) == 2, "completed once"


def test_a_champion_the_service_refused_is_not_retried_until_approved_anew_or_forced(
        plant: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model the service refuses (out of GPU memory) is not loaded again by every scheduled run: promotion skips
    that approval of it with one line until it is approved anew or forced."""
    from typer.testing import CliRunner

    from components.cli import app
    from components.serving import promotion
    from components.serving.promotion import PromotionFailed, RefusedBefore, refused_path
    from components.serving.replicas import ReplicaReport

    params, url, first, second = _deployed_then_approved(plant, tmp_path)
    target = f"{MODEL_NAME}/{second}"

    replica = ReplicaReport(plant, interval_s=1).start()  # a running replica that refuses `second` while `fits`
    replica.serving(f"{MODEL_NAME}/{first}", "fp32", "cpu", read_record(plant).deployed_at)
    fits, slow, builds = [False], [True], []
    write_record, build_record = promotion.write_record, promotion.build_record

    def written(settings: Settings, record: object) -> Path:
        path = write_record(settings, record)
        if record.model_version == target and not slow[0]:
            if fits[0]:
                replica.serving(target, record.fast_path, "cpu", record.deployed_at)
            else:
                replica.refused(record.deployed_at, target, "CUDA out of memory")
        return path

    def built(*args: object, **kwargs: object) -> object:
        builds.append(1)
        return build_record(*args, **kwargs)

    monkeypatch.setattr(promotion, "write_record", written)
    monkeypatch.setattr(promotion, "build_record", built)
    try:
        # a replica too slow to swap in time (still loading) has refused nothing: the next run tries again
        quick = params.model_copy(deep=True)
        quick.model_extra["serve"]["promotion_timeout_seconds"] = 1
        with pytest.raises(PromotionFailed, match=r"still serves .* 1 s after the record named"):
            promote(plant, quick, by="tests", url=url, bento=False)
        assert not refused_path(plant).exists() and len(builds) == 1
        slow[0] = False
        with pytest.raises(PromotionFailed, match=r"could not load .*\(CUDA out of memory\)"):
            promote(plant, params, by="tests", url=url, bento=False)
        assert read_record(plant).model_version == f"{MODEL_NAME}/{first}" and len(builds) == 2
        with pytest.raises(RefusedBefore, match=rf"{target} not promoted again: the service refused it at .*CUDA "
                                                "out of memory.*force"):
            promote(plant, params, by="tests", url=url, bento=False)
        assert len(builds) == 2, "no parity load, no record, no replica loading it again"
        cli = CliRunner().invoke(app, ["promote", "--no-bento", "--service-url", url])
        assert cli.exit_code != 0 and "not promoted again" in cli.output and "Traceback" not in cli.output

        # approved anew (a new approved_at): tried again, and refused again
        connect(plant).set_model_version_tag(MODEL_NAME, second, "approved_at", "2099-01-01T00:00:00+00:00")
        with pytest.raises(PromotionFailed, match="CUDA out of memory"):
            promote(plant, params, by="tests", url=url, bento=False)
        assert len(builds) == 3 and json.loads(refused_path(plant).read_text())["version"] == second

        replica.stop()  # the cause fixed (the pod restarted on a bigger GPU), then forced through
        replica = ReplicaReport(plant, interval_s=1).start()
        replica.serving(f"{MODEL_NAME}/{first}", "fp32", "cpu", read_record(plant).deployed_at)
        fits[0] = True
        forced = CliRunner().invoke(app, ["promote", "--no-bento", "--service-url", url, "--force"])
        assert forced.exit_code == 0 and f"deployed {target}" in forced.output, forced.output
        assert "now serves it on 1 replica" in forced.output and len(builds) == 4
        assert not refused_path(plant).exists()
    finally:
        replica.stop()
