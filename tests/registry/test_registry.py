"""The registry on a real sqlite MLflow: register, idempotence, the gate, approve/reject, loading, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from components.errors import DefectOpsError, PicturesChanged, UsageError
from tests.conftest import make_imagefolder
from tests.registry.conftest import LENIENT_GATE, make_train_dir, params_with_gate

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ALWAYS_DENT = [5.0, 0.0, 0.0]
ALWAYS_NORMAL = [0.0, 5.0, 0.0]
NAME = "defect-classifier"


def _client(settings):
    from components.registry.tracking import connect

    return connect(settings)


def _versions(settings) -> list[str]:
    return sorted(str(v.version) for v in _client(settings).search_model_versions(f"name='{NAME}'"))


def _aliases(settings) -> dict[str, str]:
    from components.registry.registry import _aliases

    return _aliases(_client(settings))


def _use(monkeypatch: pytest.MonkeyPatch, settings) -> None:
    """Point the CLI (which reads the environment) at these settings."""
    monkeypatch.setenv("DEFECTOPS_PROJECT", str(settings.project_root))
    monkeypatch.setenv("DEFECTOPS_HOME", str(settings.home_dir))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_register_logs_run_version_alias_and_artifacts(registered) -> None:
    from mlflow.artifacts import list_artifacts

    settings, _, result = registered
    assert result.created and result.version == "1" and result.compared_with == "none"
    assert result.gate_passed and result.approval_status == "pending"
    client = _client(settings)
    version = client.get_model_version(NAME, "1")
    tags = version.tags
    assert _aliases(settings) == {"challenger": "1"}
    for key in ("dataset_version", "git_commit", "weights_used", "threshold", "temperature", "macro_f1",
                "defect_detection_rate", "escape_rate", "review_rate", "false_alarm_rate", "run_id",
                "manifest_digest", "model_sha256", "gate_status", "gate_reasons", "compared_with"):
        assert key in tags, key
    assert tags["dataset_version"].endswith(".dir") and len(tags["git_commit"]) == 40
    assert tags["trained_on_dataset_version"] == "untracked folder"  # make_train_dir: no dataset version
    assert tags["gate_status"] == "passed" and "(no champion)" in tags["gate_reasons"]
    assert tags["run_id"] == result.run_id and version.run_id == result.run_id

    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["image_size"] == "32" and run.data.params["calibration.temperature"] == "1.0"
    assert run.data.tags["manifest_digest"] == tags["manifest_digest"]
    for key in ("test_accuracy", "test_macro_f1", "test_defect_detection_rate", "test_false_alarm_rate",
                "test_review_rate", "test_escape_rate", "test_ece", "test_latency_ms", "test_recall_dent",
                "test_f1_normal"):
        assert key in run.data.metrics, key
    history = client.get_metric_history(result.run_id, "val_macro_f1")
    assert [(m.step, m.value) for m in history] == [(1, 0.3), (2, 0.5)]
    files = {a.path for a in list_artifacts(run_id=result.run_id)}
    files |= {a.path for folder in ("plots", "evaluation", "training")
              for a in list_artifacts(run_id=result.run_id, artifact_path=folder)}
    assert {"plots/confusion_matrix.png", "plots/calibration_test.png", "evaluation/per_class.json",
            "evaluation/test_report.json", "evaluation/comparison.md", "training/history.csv"} <= files
    assert result.comparison_path == settings.reports_dir / "comparisons" / "v1.md"
    assert "Gate: PASSED" in result.comparison_path.read_text()
    assert "Trend" in result.comparison_path.read_text()
    audit = [json.loads(line) for line in (settings.home_dir / "registry-audit.jsonl").read_text().splitlines()]
    assert audit[-1]["action"] == "register" and audit[-1]["version"] == "1"


def test_registering_the_same_model_again_is_a_no_op(registered) -> None:
    from components.registry.registry import register

    settings, train_dir, first = registered
    again = register(settings, params_with_gate(settings, **LENIENT_GATE), train_dir)
    assert not again.created and again.version == first.version and again.run_id == first.run_id
    assert _versions(settings) == ["1"]


def test_a_forced_registration_retried_returns_the_version_it_made(registry_project, tmp_path: Path) -> None:
    """A flow retries a registration that failed after its version was made (the run's end, the audit line):
    with `force`, the retry must not register the model twice; another forced registration does."""
    from components.registry.registry import register

    settings, params = registry_project, params_with_gate(registry_project, **LENIENT_GATE)
    train_dir = make_train_dir(tmp_path / "train")
    first = register(settings, params, train_dir, force=True, origin="prefect task run 1234")
    retried = register(settings, params, train_dir, force=True, origin="prefect task run 1234")
    assert first.created and not retried.created and retried.version == first.version == "1"
    again = register(settings, params, train_dir, force=True, origin="prefect task run 5678")
    assert again.created and again.version == "2" and _versions(settings) == ["1", "2"]


def test_registered_model_loads_for_any_batch_size(registered) -> None:
    import mlflow
    import torch

    from components.registry.registry import load_predictor

    settings, train_dir, _ = registered
    predictor = load_predictor(settings, f"models:/{NAME}@challenger")
    assert predictor.model_version == f"{NAME}/1" and predictor.classes == ["dent", "normal", "scratch"]
    assert predictor.temperature == 1.0 and predictor.image_size == 32
    for batch in (1, 5):
        assert len(predictor.predict_tensors(torch.rand(batch, 3, 32, 32))) == batch
    pyfunc = mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    for batch in (1, 5):
        assert pyfunc.predict(np.zeros((batch, 3, 32, 32), np.float32)).shape == (batch, 3)
    assert load_predictor(settings, "1").model_version == f"{NAME}/1"
    local = load_predictor(settings, str(train_dir / "model.pt"))
    assert local.model_version.startswith("file:")
    with pytest.raises(DefectOpsError, match="no version of defect-classifier has alias 'champion'"):
        load_predictor(settings, "champion")


def test_models_and_evaluate_cli(registered, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from components.cli import app
    from components.data.tracked import dataset_version

    settings, train_dir, _ = registered
    _use(monkeypatch, settings)
    runner = CliRunner()
    listed = runner.invoke(app, ["models"])
    assert listed.exit_code == 0, listed.output
    assert "challenger" in listed.output and "pending" in listed.output and "macro_f1" in listed.output

    version_before = dataset_version(settings.project_root)
    images_before = len(list((settings.data_dir / "images").rglob("*.png")))
    folder = make_imagefolder(tmp_path / "new-images", per_class=3, seed=7)
    out = tmp_path / "eval" / "report.json"
    evaluated = runner.invoke(app, ["evaluate", "--model", "challenger", "--data", str(folder), "--json", str(out)])
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads(out.read_text())
    for key in ("accuracy", "macro_f1", "per_class", "defect_detection_rate", "false_alarm_rate", "review_rate",
                "escape_rate", "auto_precision", "ece", "n_images", "model_version"):
        assert key in report, key
    assert report["n_images"] == 9 and report["model_version"] == f"{NAME}/1"
    assert dataset_version(settings.project_root) == version_before, "evaluating a folder imports nothing"
    assert len(list((settings.data_dir / "images").rglob("*.png"))) == images_before
    cut = next(folder.rglob("*.png"))
    cut.write_bytes(cut.read_bytes()[:40])  # a truncated upload
    refused = runner.invoke(app, ["evaluate", "--model", "challenger", "--data", str(folder), "--json",
                                  str(tmp_path / "eval" / "cut.json")])
    assert refused.exit_code == 2 and "1 unreadable image(s), e.g. " in refused.output
    assert f"{cut.parent.name}/{cut.name}: not an image" in refused.output and "remove it" in refused.output
    assert not (tmp_path / "eval" / "cut.json").exists()
    golden = runner.invoke(app, ["evaluate", "--model", str(train_dir / "model.pt"), "--json", str(out)])
    assert golden.exit_code == 0, golden.output
    assert json.loads(out.read_text())["split"] == "test"


def test_a_model_trained_on_another_dataset_version_is_refused(registry_project, tmp_path: Path) -> None:
    """Its golden-test figures would not compare with the champion's (and may include pictures it trained on):
    nothing is logged or registered."""
    from components.registry.registry import list_versions, register

    settings = registry_project
    elsewhere = make_train_dir(tmp_path / "older", dataset_version="0123456789abcdef0123456789abcdef.dir")
    with pytest.raises(UsageError, match=r"trained on dataset version 0123456789abcdef.*\.dir, but this checkout "
                                         r"holds .*\.dir: .*check out the commit whose data.dvc names"):
        register(settings, params_with_gate(settings, **LENIENT_GATE), elsewhere)
    assert list_versions(settings) == []


def _pull_over_an_edit(settings) -> None:
    """A `data pull --force` that puts back a picture edited by hand: it changes a picture of data/."""
    from components.data.tracked import restore_data

    picture = next((settings.data_dir / "images").rglob("*.png"))
    kept = picture.read_bytes()
    picture.write_bytes(b"edited by hand")
    restore_data(settings, force=True)
    assert picture.read_bytes() == kept


def test_a_pull_while_the_golden_pictures_are_read_leaves_no_figures(registry_project, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The figures must be of the pictures their dataset version names: a `data pull` that changes data/ while
    register, evaluate or the drift reference read them fails that command before it writes anything (no run,
    no version, no cached reference)."""
    from components.drift import reference
    from components.drift.params import drift_params
    from components.evaluation import runner
    from components.predictor import Predictor
    from components.registry import registry
    from components.registry.evaluate import evaluate_model
    from components.registry.registry import list_versions, register

    settings = registry_project
    params = params_with_gate(settings, **LENIENT_GATE)
    train_dir = make_train_dir(tmp_path / "train")

    def beside_a_pull(real):
        def read_while_pulled(*args, **kwargs):
            _pull_over_an_edit(settings)
            return real(*args, **kwargs)
        return read_while_pulled

    changed = "a `data pull` changed or removed pictures in data/ while this command read them"
    with monkeypatch.context() as patch:
        patch.setattr(registry, "_evaluate", beside_a_pull(registry._evaluate))
        with pytest.raises(PicturesChanged, match=changed):
            register(settings, params, train_dir)
    assert list_versions(settings) == []
    client = _client(settings)
    assert client.search_runs([client.get_experiment_by_name("defectops").experiment_id]) == []

    with monkeypatch.context() as patch:
        patch.setattr(runner, "evaluate_rows", beside_a_pull(runner.evaluate_rows))
        with pytest.raises(PicturesChanged, match=changed):
            evaluate_model(settings, params, str(train_dir / "model.pt"))

    drift = drift_params(params)
    predictor = Predictor.from_file(train_dir / "model.pt")
    with monkeypatch.context() as patch:
        patch.setattr(reference, "build_reference", beside_a_pull(reference.build_reference))
        with pytest.raises(PicturesChanged, match=changed):
            reference.load_reference(settings, params, predictor, drift)
    assert not list(settings.reports_dir.rglob("*.parquet")), "no reference cached"
    assert not reference.load_reference(settings, params, predictor, drift).cached


def test_gate_approve_and_reject(registry_project, tmp_path: Path) -> None:
    from components.cli import app
    from components.registry.registry import approve, audit_trail, list_versions, register, reject

    settings = registry_project
    dent_dir = make_train_dir(tmp_path / "dent", ALWAYS_DENT)
    first = register(settings, params_with_gate(settings, min_macro_f1=0.6), dent_dir)
    assert first.created and not first.gate_passed and first.approval_status == "not-eligible"
    assert any("macro_f1" in r and "FAILED" in r and "(no champion)" in r for r in first.gate_reasons)
    [row] = list_versions(settings)
    assert row["gate_status"] == "failed" and row["aliases"] == ["challenger"]
    with pytest.raises(DefectOpsError, match=r"did not pass the gate \(macro_f1 .*FAILED"):
        approve(settings, first.version, by="alice")
    with pytest.raises(UsageError, match=r"reject needs --reason \(why\); it was given empty"):
        reject(settings, first.version, by="alice", reason=" ")
    with pytest.raises(UsageError, match=r"reject needs --by \(who\) and --reason \(why\); both were"):
        reject(settings, first.version, by="", reason="")
    with pytest.raises(UsageError, match="--force needs --note"):
        approve(settings, first.version, by="alice", force=True)
    assert "champion" not in _aliases(settings)
    approve(settings, first.version, by="alice", note="first model on the line, review #1", force=True)
    assert _aliases(settings) == {"champion": "1"}
    tags = _client(settings).get_model_version(NAME, "1").tags
    assert tags["approved_by"] == "alice" and tags["approval_status"] == "approved" and tags["approved_at"]
    assert tags["approval_forced"] == "true" and tags["previous_champion"] == "none"
    assert tags["approval_note"] == "first model on the line, review #1"

    lenient = params_with_gate(settings, **LENIENT_GATE)
    worse = register(settings, lenient, make_train_dir(tmp_path / "normal", ALWAYS_NORMAL))
    assert worse.compared_with == "1" and not worse.gate_passed
    assert any("defect_detection_rate" in r and "FAILED" in r for r in worse.gate_reasons)
    assert _aliases(settings) == {"champion": "1", "challenger": "2"}
    rejected = CliRunner().invoke(app, ["reject", worse.version, "--by", "bob", "--reason", "misses every defect"])
    assert rejected.exit_code == 0 and "challenger alias removed" in rejected.output, rejected.output
    assert _aliases(settings) == {"champion": "1"}
    tags = _client(settings).get_model_version(NAME, "2").tags
    assert tags["approval_status"] == "rejected" and tags["rejected_by"] == "bob" and tags["rejected_at"]
    with pytest.raises(DefectOpsError, match="is the champion"):
        reject(settings, "1", by="bob", reason="no")

    same = register(settings, lenient, dent_dir, force=True)
    assert same.created and same.version == "3" and same.gate_passed and same.compared_with == "1"
    assert "champion v1" in same.comparison_path.read_text()
    approved = CliRunner().invoke(app, ["approve", "v3", "--by", "carol", "--note", "better on scratches"])
    assert approved.exit_code == 0 and "version 3 is now the champion (previous: 1)" in approved.output
    assert _aliases(settings) == {"champion": "3"}
    assert _client(settings).get_model_version(NAME, "3").tags["previous_champion"] == "1"
    rows = {r["version"]: r for r in list_versions(settings)}
    assert rows["3"]["aliases"] == ["champion"] and rows["2"]["approval_status"] == "rejected"
    assert rows["1"]["aliases"] == [] and rows["3"]["approval_status"] == "approved"
    assert [(e["action"], e["version"]) for e in audit_trail(settings)] == [
        ("register", "1"), ("approve", "1"), ("register", "2"), ("reject", "2"), ("register", "3"),
        ("approve", "3")]

    with pytest.raises(DefectOpsError, match="did not pass the gate"):
        approve(settings, worse.version, by="erin")
    approve(settings, worse.version, by="erin", note="line stop: v3 crashes on the new camera", force=True)
    tags = _client(settings).get_model_version(NAME, "2").tags
    assert tags["approval_status"] == "approved" and tags["overrode_rejection"].startswith("rejected by bob at ")
    assert tags["overrode_rejection"].endswith(": misses every defect")
    assert audit_trail(settings)[-1]["overrode_rejection"] == tags["overrode_rejection"]


def test_approve_records_a_champion_made_in_the_mlflow_ui(registry_project, tmp_path: Path) -> None:
    from components.registry.registry import approval_problem, approve, audit_trail, register

    settings = registry_project
    version = register(settings, params_with_gate(settings, **LENIENT_GATE), make_train_dir(tmp_path / "m")).version
    _client(settings).set_registered_model_alias(NAME, "champion", version)  # what the UI's alias click does
    assert approval_problem(_client(settings).get_model_version(NAME, version).tags) == "its approval_status is 'pending'"

    outcome = approve(settings, version, by="dana", note="moved it in the UI")
    assert outcome["changed"] and _aliases(settings)["champion"] == version
    tags = _client(settings).get_model_version(NAME, version).tags
    assert approval_problem(tags) is None and tags["approved_by"] == "dana"
    assert tags["previous_champion"] == "unknown (alias moved in the MLflow UI)"
    assert audit_trail(settings)[-1]["alias_moved_in_ui"] is True
    assert not approve(settings, version, by="dana")["changed"]


def test_a_former_champion_moved_back_in_the_ui_needs_a_new_approval(registry_project, tmp_path: Path) -> None:
    """Its old approval was replaced by the next champion's: serving refuses it until someone approves it again,
    and that approval is recorded (not taken for the old one); a rollback skips a deployed version since deleted."""
    from components.registry.registry import approve, audit_trail, record_deployment, register, rollback
    from components.serving.deployment import NotApproved, approved_champion

    settings, lenient = registry_project, params_with_gate(registry_project, **LENIENT_GATE)
    for n, who in ((1, "alice"), (2, "bob"), (3, "dana")):
        version = register(settings, lenient, make_train_dir(tmp_path / f"m{n}", seed=n)).version
        approve(settings, version, by=who, note=f"model {n}", force=True)
        record_deployment(settings, version, who, {"engine": "fp32"}, None if n == 1 else str(n - 1))
    _client(settings).set_registered_model_alias(NAME, "champion", "1")  # a click in the UI, no approval
    with pytest.raises(NotApproved, match="version 1 holds 'champion' but its approval of .* was replaced by "
                                          "version 2's"):
        approved_champion(settings)
    outcome = approve(settings, "1", by="carol", note="back to v1 after the camera swap")
    assert outcome["changed"] and audit_trail(settings)[-1]["by"] == "carol"
    tags = _client(settings).get_model_version(NAME, "1").tags
    assert tags["approved_by"] == "carol" and tags["replaced_by"] == "none"
    assert approved_champion(settings)[0] == f"models:/{NAME}/1"

    _client(settings).set_registered_model_alias(NAME, "champion", "3")
    _client(settings).delete_model_version(NAME, "2")  # deployed once, deleted by an admin since
    assert rollback(settings, "3", by="qa lead", reason="misses blowholes")["version"] == "1"


def test_a_second_approval_or_rejection_keeps_the_first_on_the_version(registry_project, tmp_path: Path) -> None:
    """MLflow keeps no history of tags: before an approval, rejection or roll-back overwrites the one a version
    holds, that one goes to its `history` tag, so the version itself (the UI, another home) keeps both."""
    from components.registry.registry import approve, register, reject

    settings, lenient = registry_project, params_with_gate(registry_project, **LENIENT_GATE)
    first, second, third = (register(settings, lenient, make_train_dir(tmp_path / f"m{n}", seed=n)).version
                            for n in (1, 2, 3))
    approve(settings, first, by="alice", note="first on the line", force=True)
    approve(settings, second, by="bob", note="better\non scratches", force=True)
    approve(settings, first, by="carol", note="back to v1", force=True)
    tags = _client(settings).get_model_version(NAME, first).tags
    assert tags["approved_by"] == "carol" and tags["approval_note"] == "back to v1"
    [line] = tags["history"].splitlines()
    assert line.startswith("earlier approval: approved_by=alice; approved_at=")
    assert line.endswith("; approval_note=first on the line; approval_forced=true"), "'none' values left out"
    reject(settings, third, by="dan", reason="misses blowholes")
    reject(settings, third, by="erin", reason="and\ncracks")
    tags = _client(settings).get_model_version(NAME, third).tags
    assert tags["rejected_by"] == "erin" and tags["history"].startswith("earlier rejection: rejected_by=dan; ")
    assert tags["history"].endswith("rejected_reason=misses blowholes") and "history" not in \
        _client(settings).get_model_version(NAME, second).tags


def test_evaluate_decodes_under_the_plants_pixel_limit(registry_project, tmp_path: Path) -> None:
    """A plant with 42 MP cameras raises data.max_image_pixels above the 40 MP default: evaluate (as calibration,
    registration and the drift reference) decodes under that limit, as import, training and serving do."""
    from PIL import Image

    from components.registry.evaluate import evaluate_model

    params = params_with_gate(registry_project, **LENIENT_GATE)
    params = params.model_copy(update={"data": params.data.model_copy(update={"max_image_pixels": 50_000_000})})
    folder = make_imagefolder(tmp_path / "line", per_class=2)
    Image.new("L", (7000, 6000), 128).save(folder / "normal" / "full-frame.png")
    report = evaluate_model(registry_project, params, str(make_train_dir(tmp_path / "m") / "model.pt"),
                            data=str(folder))
    assert report["n_images"] == 7


def test_unreachable_tracking_server_registers_nothing(registry_project, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from components.cli import app

    train_dir = make_train_dir(tmp_path / "train")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    result = CliRunner().invoke(app, ["register", "--train-dir", str(train_dir)])
    assert result.exit_code == 1
    assert "MLflow tracking server at http://127.0.0.1:9 is unreachable" in result.output
    assert "unset MLFLOW_TRACKING_URI" in result.output and "Traceback" not in result.output
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert _versions(registry_project) == []


def test_broken_model_metadata_is_refused_before_any_run(registry_project, tmp_path: Path) -> None:
    import torch

    from components.registry.registry import register

    train_dir = make_train_dir(tmp_path / "train", extra_meta={"notes": torch.ones(2)})
    with pytest.raises(UsageError, match="metadata is not plain data"):
        register(registry_project, params_with_gate(registry_project, **LENIENT_GATE), train_dir)
    client = _client(registry_project)
    assert _versions(registry_project) == []
    assert client.search_runs([client.get_experiment_by_name("defectops").experiment_id]) == []


def test_failure_after_version_created_leaves_no_version(registry_project, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    from components.registry import registry

    def disk_full(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(registry, "_write_comparison", disk_full)
    with pytest.raises(OSError, match="No space left"):
        registry.register(registry_project, params_with_gate(registry_project, **LENIENT_GATE),
                          make_train_dir(tmp_path / "train"))
    client = _client(registry_project)
    assert _versions(registry_project) == [] and _aliases(registry_project) == {}
    [run] = client.search_runs([client.get_experiment_by_name("defectops").experiment_id])
    assert run.info.status == "FAILED"
    experiment_ids = [client.get_experiment_by_name("defectops").experiment_id]
    assert mlflow.search_logged_models(experiment_ids=experiment_ids, output_format="list") == []
    assert not list((registry_project.reports_dir / "comparisons").glob("*.md"))


def _fail_once(monkeypatch: pytest.MonkeyPatch, method: str, when) -> list:
    """MlflowClient.<method> raises a registry error (as a server gone mid-command does) the first time `when`
    holds for its arguments; returns the calls it failed."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    real, failed = getattr(MlflowClient, method), []

    def flaky(self, *args, **kwargs):
        if not failed and when(*args, **kwargs):
            failed.append(args)
            raise MlflowException("API request failed with error code 503 != 200", error_code="TEMPORARILY_UNAVAILABLE")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, method, flaky)
    return failed


def test_an_approval_stopped_after_the_alias_moved_is_completed_by_running_it_again(
        registry_project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The registry fails after `champion` moved: one line naming the fix, and the rerun records what is missing
    (the replaced champion's tags, `challenger` taken off, the audit line) instead of saying "nothing to do"."""
    from components.cli import app
    from components.registry.registry import approve, audit_trail, register

    settings = registry_project
    _use(monkeypatch, settings)
    lenient = params_with_gate(settings, **LENIENT_GATE)
    approve(settings, register(settings, lenient, make_train_dir(tmp_path / "a", seed=1)).version, by="alice")
    second = register(settings, lenient, make_train_dir(tmp_path / "b", seed=2))
    assert second.compared_with == "1" and _aliases(settings) == {"champion": "1", "challenger": "2"}

    failed = _fail_once(monkeypatch, "set_model_version_tag", lambda name, version, key, value: key == "replaced_by")
    stopped = CliRunner().invoke(app, ["approve", "2", "--by", "bob"])
    assert failed and stopped.exit_code == 1 and "Traceback" not in stopped.output
    assert "the MLflow registry at sqlite:///" in stopped.output
    assert "failed to approve version 2 (API request failed with error code 503" in stopped.output
    assert "run the command again" in stopped.output
    assert _aliases(settings) == {"champion": "2", "challenger": "2"}
    assert [e["version"] for e in audit_trail(settings) if e["action"] == "approve"] == ["1"]

    rerun = CliRunner().invoke(app, ["approve", "2", "--by", "carol"])
    assert rerun.exit_code == 0 and "version 2 is now the champion (previous: 1); approved by carol" in rerun.output
    assert _aliases(settings) == {"champion": "2"}
    first_tags = _client(settings).get_model_version(NAME, "1").tags
    assert first_tags["replaced_by"] == "2" and first_tags["replaced_at"]
    line = audit_trail(settings)[-1]
    assert (line["action"], line["version"], line["by"], line["completed_by"]) == ("approve", "2", "bob", "carol")
    assert line["previous_champion"] == "1" and line["challenger_removed"] is True
    assert not approve(settings, "2", by="carol")["changed"]


def test_a_registry_error_is_not_read_as_no_champion(registry_project, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed alias lookup once let `reject` take the champion: now it is a one-line error and nothing moves."""
    from components.registry.registry import approve, register, reject

    settings = registry_project
    version = register(settings, params_with_gate(settings, **LENIENT_GATE), make_train_dir(tmp_path / "m")).version
    approve(settings, version, by="alice")
    _fail_once(monkeypatch, "get_registered_model", lambda name: True)
    with pytest.raises(DefectOpsError, match=r"failed to reject version 1 \(API request failed .*run the command"):
        reject(settings, version, by="bob", reason="flaky")
    tags = _client(settings).get_model_version(NAME, version).tags
    assert tags["approval_status"] == "approved" and "rejected_by" not in tags
    with pytest.raises(DefectOpsError, match="is the champion"):
        reject(settings, version, by="bob", reason="the registry answers again")


def test_approve_refuses_a_gate_passed_against_a_former_champion(registry_project, tmp_path: Path) -> None:
    """Two challengers gated against v1: once one is champion, the other was never compared with it."""
    from components.registry.registry import approve, register

    settings = registry_project
    lenient = params_with_gate(settings, **LENIENT_GATE)
    approve(settings, register(settings, lenient, make_train_dir(tmp_path / "a", seed=1)).version, by="alice")
    second_dir = make_train_dir(tmp_path / "b", seed=2)
    second = register(settings, lenient, second_dir)
    third = register(settings, lenient, second_dir, force=True)  # the same figures: its gate passes too
    assert second.compared_with == third.compared_with == "1" and second.gate_passed and third.gate_passed
    approve(settings, second.version, by="bob")
    with pytest.raises(DefectOpsError, match=r"version 3 was gated against champion v1, but the champion is now v2; "
                                             r"register it again \(`defectops register --force`\)"):
        approve(settings, third.version, by="carol")
    assert _aliases(settings)["champion"] == "2"
    approve(settings, third.version, by="carol", note="v2 crashes on the new camera", force=True)
    assert _aliases(settings)["champion"] == "3"


def test_a_failed_registration_left_behind_is_not_taken_for_the_model(registry_project, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A version whose failed registration could not be deleted is tagged; registering again creates a new one."""
    from mlflow import MlflowClient

    from components.registry import registry

    def refused(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    train_dir = make_train_dir(tmp_path / "train")
    with monkeypatch.context() as patch:
        patch.setattr(registry, "_write_comparison", refused)
        patch.setattr(MlflowClient, "delete_model_version", refused)
        with pytest.raises(OSError, match="No space left"):
            registry.register(registry_project, params_with_gate(registry_project, **LENIENT_GATE), train_dir)
    left = _client(registry_project).get_model_version(NAME, "1").tags
    assert left["registration"] == "failed" and left["approval_status"] == "not-eligible"
    assert registry.find_trained(registry_project, left["training_fingerprint"]) is None
    with pytest.raises(DefectOpsError, match="version 1 is what a failed or cut-off registration left behind"):
        registry.approve(registry_project, "1", by="alice")
    again = registry.register(registry_project, params_with_gate(registry_project, **LENIENT_GATE), train_dir)
    assert again.created and again.version == "2" and again.gate_passed


# A registration in its own process that SIGKILLs itself once its version exists, at the comparison's write
# (no clean-up can run): what an OOM kill or a container killed after its grace period leaves.
KILLED_REGISTRATION = """
import os, signal, sys
import yaml
from components.config import Params, get_settings
from components.registry import registry

def killed(*_args, **_kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

registry._write_comparison = killed
settings = get_settings()
raw = yaml.safe_load(settings.params_file.read_text())
raw["evaluate"] = {**raw.get("evaluate", {}), "gate": {"min_macro_f1": 0.0, "min_defect_detection_rate": 0.0,
                                                       "max_false_alarm_rate": 1.0}}
registry.register(settings, Params.model_validate(raw), sys.argv[1])
"""


def test_a_registration_killed_after_its_version_exists_is_redone_not_taken_for_done(
        registry_project, tmp_path: Path) -> None:
    """The version is created before its comparison, alias and tags are all written; a kill -9 in between leaves
    it marked incomplete: never approved, never found as the trained model, and registering again removes it
    (its run ends FAILED) and makes a whole one."""
    import subprocess
    import sys

    from components.registry import registry
    from tests.conftest import REPO_ROOT

    train_dir = make_train_dir(tmp_path / "train")
    killed = subprocess.run([sys.executable, "-c", KILLED_REGISTRATION, str(train_dir)], cwd=REPO_ROOT,
                            capture_output=True, text=True, check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    left = _client(registry_project).get_model_version(NAME, "1")
    assert left.tags["registration"] == "incomplete" and _aliases(registry_project) == {}
    assert registry.find_trained(registry_project, left.tags["training_fingerprint"]) is None
    with pytest.raises(DefectOpsError, match="version 1 is what a failed or cut-off registration left behind"):
        registry.approve(registry_project, "1", by="alice")
    with pytest.raises(DefectOpsError, match="version 1 is what a failed or cut-off registration"):
        registry.approve(registry_project, "1", by="alice", force=True, note="it looked done")  # not even so
    assert [r["approval_status"] for r in registry.list_versions(registry_project)] == ["registration incomplete"]

    again = registry.register(registry_project, params_with_gate(registry_project, **LENIENT_GATE), train_dir)
    assert again.created and again.version == "2" and _versions(registry_project) == ["2"]
    assert _aliases(registry_project) == {"challenger": "2"}
    assert _client(registry_project).get_model_version(NAME, "2").tags["registration"] == "complete"
    assert _client(registry_project).get_run(left.run_id).info.status == "FAILED"
    experiment_ids = [_client(registry_project).get_experiment_by_name("defectops").experiment_id]
    import mlflow

    assert len(mlflow.search_logged_models(experiment_ids=experiment_ids, output_format="list")) == 1, \
        "the cut-off registration's logged model went with it"
    assert not registry.register(registry_project, params_with_gate(registry_project, **LENIENT_GATE),
                                 train_dir).created, "a whole registration is found again"


def test_a_cut_off_version_a_person_made_champion_is_never_deleted(registry_project, tmp_path: Path) -> None:
    """Registering a cut-off model again removes what the kill left, unless a person acted on it since (the
    alias moved in the MLflow UI): a champion is never deleted by a registration."""
    import subprocess
    import sys

    from components.registry import registry
    from tests.conftest import REPO_ROOT

    train_dir = make_train_dir(tmp_path / "train")
    killed = subprocess.run([sys.executable, "-c", KILLED_REGISTRATION, str(train_dir)], cwd=REPO_ROOT,
                            capture_output=True, text=True, check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    _client(registry_project).set_registered_model_alias(NAME, "champion", "1")  # a click in the UI
    again = registry.register(registry_project, params_with_gate(registry_project, **LENIENT_GATE), train_dir)
    assert again.version == "2" and _versions(registry_project) == ["1", "2"]
    assert _aliases(registry_project) == {"champion": "1", "challenger": "2"}


def test_an_approval_or_rejection_that_fails_midway_leaves_the_tags_as_they_were(
        registry_project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The alias move or a tag write fails (registry gone): the decision did not happen, so none of its tags stay
    on the version, and the rerun does not take the half-written one for an earlier decision (`history`)."""
    from components.registry.registry import approve, register, reject

    settings, lenient = registry_project, params_with_gate(registry_project, **LENIENT_GATE)
    first, second = (register(settings, lenient, make_train_dir(tmp_path / f"m{n}", seed=n)).version for n in (1, 2))
    approve(settings, first, by="alice", note="first", force=True)
    before = dict(_client(settings).get_model_version(NAME, second).tags)
    with monkeypatch.context() as patch:
        _fail_once(patch, "set_registered_model_alias", lambda name, alias, version: alias == "champion")
        with pytest.raises(DefectOpsError):
            approve(settings, second, by="bob", note="first try", force=True)
    assert dict(_client(settings).get_model_version(NAME, second).tags) == before
    approve(settings, second, by="bob", note="second try", force=True)
    tags = _client(settings).get_model_version(NAME, second).tags
    assert tags["approval_note"] == "second try" and "history" not in tags

    third = register(settings, lenient, make_train_dir(tmp_path / "m3", seed=3)).version
    before = dict(_client(settings).get_model_version(NAME, third).tags)
    with monkeypatch.context() as patch:
        _fail_once(patch, "set_model_version_tag", lambda name, version, key, value: key == "approval_status")
        with pytest.raises(DefectOpsError):
            reject(settings, third, by="dan", reason="first try")
    assert dict(_client(settings).get_model_version(NAME, third).tags) == before
