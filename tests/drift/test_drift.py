"""The drift check end to end: real Evidently reports over a real production log written by a real model."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from components.cli import app
from components.drift.simulate import write_log
from tests.conftest import TEST_CLASSES
from tests.drift.conftest import DARKER, production_records

runner = CliRunner()


def drift_cli(*args: str) -> tuple[int, str, dict | None]:
    """Run `defectops drift ...`; exit code, output, and the summary written with --json."""
    out = Path.cwd() / f"summary-{len(list(Path.cwd().glob('summary-*.json')))}.json"
    result = runner.invoke(app, ["drift", *args, "--json", str(out)])
    return result.exit_code, result.output, json.loads(out.read_text()) if out.is_file() else None


@pytest.mark.slow
def test_clean_window_is_quiet_and_writes_every_report(drift_project, drift_model: Path) -> None:
    settings = drift_project
    records = production_records(settings, drift_model, range(5000, 5150))
    old = production_records(settings, drift_model, range(6000, 6060), DARKER,
                             end=datetime.now(UTC) - timedelta(days=45))
    files = write_log(settings.prod_log_dir, records + old)
    with max(files).open("ab") as handle:  # a crash tore the last line of the newest day file
        handle.write(b'{"timestamp": "2025-01-0')

    code, output, summary = drift_cli("--model", str(drift_model))

    assert code == 0, output
    assert summary["status"] == "no_drift" and summary["drift"] is False, summary
    assert summary["n_current"] == len(records)  # the darker records of 45 days ago are outside the window
    assert summary["skipped_lines"] == 1
    assert summary["n_reference"] > 150 and summary["n_reference_predictions"] > 20
    assert set(summary["columns"]) == {"brightness", "contrast", "sharpness", "width", "height",
                                       "predicted_class", "confidence"}
    assert summary["embedding_drift"]["drifted"] is False
    assert summary["embedding_drift"]["bootstrap_unit"] == "capture_group"
    assert summary["embedding_drift"]["n_reference_groups"] == summary["n_reference_predictions"]  # one per image
    assert summary["reference"]["cached"] is False
    folder = Path(summary["report_dir"])
    assert folder.parent == settings.reports_dir / "drift"
    assert json.loads((folder / "summary.json").read_text())["status"] == "no_drift"
    assert (folder / "drift.html").stat().st_size > 10_000
    quality = (folder / "quality.md").read_text()
    assert "Defects by type" in quality and "latency p50 / p99" in quality
    assert {p.name for p in folder.glob("*.png")} == {"defects_by_type.png", "review_rate.png", "confidence.png",
                                                      "throughput.png", "latency.png"}
    assert summary["quality"]["n_predictions"] == len(records)
    assert "no drift" in output and "1 torn/invalid log lines skipped" in output
    assert f"bootstrap null over {summary['n_reference_predictions']} capture groups)" in output
    assert summary["column_alarm"] == [] and "column alarm: none (a column at 4x its threshold" in output
    assert summary["notes"] == [] and "note:" not in output  # notes (other models' records...) are printed


@pytest.mark.slow
def test_lighting_change_is_drift_with_exit_3(drift_project, drift_model: Path) -> None:
    settings = drift_project
    write_log(settings.prod_log_dir, production_records(settings, drift_model, range(5000, 5150), DARKER))

    code, output, summary = drift_cli("--model", str(drift_model), "--since", "7d")

    assert code == 3, output
    assert summary["status"] == "drift" and summary["dataset_drift"] is True
    assert {"brightness", "contrast", "sharpness"} <= set(summary["drifted_columns"])
    assert summary["embedding_drift"]["drifted"] is True
    assert summary["window"]["days"] == pytest.approx(7, abs=0.01)
    assert "DRIFT DETECTED" in output

    code, _, again = drift_cli("--model", str(drift_model), "--since", "7d")  # the daily check reads the cache
    assert code == 3 and again["reference"]["cached"] is True
    assert again["reference"]["path"] == summary["reference"]["path"]


@pytest.mark.slow
def test_answers_are_compared_with_the_models_first_weeks_on_the_line(drift_project, drift_model: Path) -> None:
    """A line whose parts get an answer the validation split rarely got: against validation `predicted_class`
    drifts in every window of a healthy line; against the model's first two weeks after its deployment (the
    default once those weeks lie before the window) it does not, while the image statistics stay compared with
    the training images. Before those weeks are over, and without a deployment record, validation it is; a window
    reaching back into them counts only the answers from their end on."""
    import yaml

    from components.config import load_params
    from components.drift.params import drift_params
    from components.drift.reference import load_reference, model_version_of
    from components.drift.simulate import restamp
    from components.registry.registry import load_predictor
    from components.serving.deployment import DeploymentRecord, record_path, write_record

    settings = drift_project
    params_file = settings.project_root / "params.yaml"
    predictor = load_predictor(settings, str(drift_model))
    version = model_version_of(predictor)
    validation = load_reference(settings, load_params(params_file), predictor,
                                drift_params(load_params(params_file))).frame
    answers = validation["predicted_class"].dropna()
    rare = min(TEST_CLASSES, key=lambda name: int((answers == name).sum()))  # the class val answered least
    assert (answers == rare).mean() < 0.34

    now = datetime.now(UTC)
    made = production_records(settings, drift_model, range(5000, 5200))
    for record in made:
        record["defect_type"] = rare  # what this line's parts get
    baseline = restamp(made[:100], [now - timedelta(days=40, hours=-3 * i) for i in range(100)])
    window = restamp(made[100:], [now - timedelta(days=10, hours=-2 * i) for i in range(100)])
    write_log(settings.prod_log_dir, baseline + window)

    def deployed(days_ago: float) -> None:
        write_record(settings, DeploymentRecord(model_uri=str(drift_model), model_version=version, threshold=0.5,
                                                fast_path="fp32", deployed_at=(now - timedelta(days=days_ago))
                                                .isoformat(timespec="seconds")))

    code, output, summary = drift_cli("--model", str(drift_model), "--since", "20d")  # nothing deployed
    assert code in (0, 3), output
    assert summary["reference"]["predictions"]["source"] == "validation", summary["reference"]
    assert "no deployment is recorded" in summary["reference"]["predictions"]["why"]
    assert "predicted_class" in summary["drifted_columns"], summary["columns"]["predicted_class"]

    deployed(days_ago=41)
    code, output, summary = drift_cli("--model", str(drift_model), "--since", "20d")
    predictions = summary["reference"]["predictions"]
    assert predictions["source"] == "production" and predictions["n"] == 100, predictions
    assert predictions["model_version"] == version
    assert "predicted_class" not in summary["drifted_columns"], summary["columns"]["predicted_class"]
    assert summary["n_reference_predictions"] == 100
    assert "answers compared with the production baseline of" in output
    assert summary["n_reference"] == len(validation)  # the image statistics: still the training images'
    cached = list((settings.reports_dir / "drift" / "baseline").glob("*.parquet"))
    assert len(cached) == 1
    for day_file in settings.prod_log_dir.glob("*.jsonl"):  # the baseline's days leave the log (rotated away)
        if day_file.name < (now - timedelta(days=20)).date().isoformat():
            day_file.unlink()
    _, _, again = drift_cli("--model", str(drift_model), "--since", "20d")
    assert again["reference"]["predictions"] == predictions, "read from the cache"

    raw = yaml.safe_load(params_file.read_text())
    raw["drift"]["baseline_max"] = 60
    params_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    write_log(settings.prod_log_dir, baseline)
    _, _, sampled = drift_cli("--model", str(drift_model), "--since", "20d")
    assert sampled["reference"]["predictions"]["n"] == 60 and sampled["n_reference_predictions"] == 60

    deployed(days_ago=12)  # its first two weeks are not over yet
    _, _, summary = drift_cli("--model", str(drift_model), "--since", "20d")
    assert summary["reference"]["predictions"]["source"] == "validation"
    assert "is not over by the window's end" in summary["reference"]["predictions"]["why"]

    deployed(days_ago=15)  # over a day ago: the window's answers are all of its baseline's days, left out
    _, output, summary = drift_cli("--model", str(drift_model), "--since", "20d")
    predictions = summary["reference"]["predictions"]
    assert predictions["source"] == "production" and predictions["n"] == 60, predictions  # baseline_max 60
    assert predictions["window_answers_from"] == predictions["until"]
    assert {"predicted_class", "confidence"} <= set(summary["columns_skipped"]), summary["columns_skipped"]
    assert summary["n_current"] == 100

    record_path(settings).write_text("{not json")  # an unreadable record: still a drift check
    code, output, summary = drift_cli("--model", str(drift_model), "--since", "20d")
    assert code in (0, 3) and summary["reference"]["predictions"]["source"] == "validation", output
    assert "the deployment record is unreadable" in summary["reference"]["predictions"]["why"]

    raw = yaml.safe_load(params_file.read_text())
    raw["drift"]["prediction_reference"] = "validation"
    params_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    deployed(days_ago=41)
    _, _, summary = drift_cli("--model", str(drift_model), "--since", "20d")
    assert summary["reference"]["predictions"] == {"source": "validation", "split": "val"}
    assert "predicted_class" in summary["drifted_columns"]


def test_too_few_records_is_not_enough_data_not_drift(drift_project, drift_model: Path) -> None:
    settings = drift_project
    assert not settings.prod_log_dir.exists()  # a fresh state root, or the wrong DEFECTOPS_HOME
    code, output, _ = drift_cli("--model", str(drift_model))
    assert code == 0 and f"there is no production log at {settings.prod_log_dir}" in output
    assert "DEFECTOPS_HOME" in output
    write_log(settings.prod_log_dir, production_records(settings, drift_model, range(5000, 5010), DARKER))

    code, output, summary = drift_cli("--model", str(drift_model))

    assert code == 0, output
    assert summary["status"] == "not_enough_data" and summary["drift"] is False
    assert summary["n_current"] == 10
    assert "not enough production data" in output
    folder = Path(summary["report_dir"])
    assert (folder / "summary.json").is_file() and (folder / "quality.md").is_file()
    assert not (folder / "drift.html").exists()


@pytest.mark.slow
def test_the_drift_flow_skips_only_without_a_champion_and_fails_when_the_registry_fails(
        drift_project, drift_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """"No champion yet" is the normal state before the first approval; a registry that cannot answer is an
    alarm: the scheduled drift check must fail, not report "skipped" every day. Once a model is deployed, the
    reference is that one's, not `champion`'s."""
    from components.config import load_params
    from components.drift.check import run_drift_check
    from components.errors import DefectOpsError, ModelNotFound
    from components.serving.deployment import DeploymentRecord, record_path, write_record
    from flows.monthly_flow import drift_task

    settings = drift_project
    write_log(settings.prod_log_dir, production_records(settings, drift_model, range(5000, 5060)))
    with pytest.raises(ModelNotFound, match="no version of defect-classifier has alias 'champion'"):
        run_drift_check(settings, load_params(settings.params_file))
    served = DeploymentRecord(model_uri=str(drift_model), model_version=f"file:{drift_model}", threshold=0.5,
                              fast_path="fp32", deployed_at=datetime.now(UTC).isoformat())
    write_record(settings, served)  # what the service serves, whichever version `champion` names
    check = run_drift_check(settings, load_params(settings.params_file))
    assert check.summary["model_version"] == f"file:{drift_model}" and check.summary["n_current"] == 60
    record_path(settings).unlink()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    with pytest.raises(DefectOpsError, match="MLflow tracking server at http://127.0.0.1:9 is unreachable") as failed:
        drift_task.fn("last_days", 30)
    assert not isinstance(failed.value, ModelNotFound)


def test_a_bad_window_is_a_usage_error(drift_project) -> None:
    result = runner.invoke(app, ["drift", "--since", "yesterday"])
    assert result.exit_code == 2
    assert "--since 'yesterday': not a moment" in result.output

    result = runner.invoke(app, ["drift", "--since", "2025-03-01", "--until", "2025-02-01"])
    assert result.exit_code == 2 and "is empty" in result.output


def test_windows() -> None:
    from components.drift.window import previous_month, resolve_window
    from components.errors import UsageError

    now = datetime(2025, 3, 15, 12, tzinfo=UTC)
    assert previous_month(date(2025, 3, 15)).as_dict() == {
        "since": "2025-02-01T00:00:00+00:00", "until": "2025-03-01T00:00:00+00:00", "days": 28.0}
    assert previous_month(date(2025, 1, 1)).since == datetime(2024, 12, 1, tzinfo=UTC)
    assert resolve_window(None, None, 30, now).since == now - timedelta(days=30)
    window = resolve_window("2025-03-01", "12h", 30, now)
    assert (window.since, window.until) == (datetime(2025, 3, 1, tzinfo=UTC), now - timedelta(hours=12))
    month_so_far = resolve_window("2025-03-01", "2025-04-01", 30, now)  # nothing is served after now yet
    assert (month_so_far.since, month_so_far.until) == (datetime(2025, 3, 1, tzinfo=UTC), now)
    with pytest.raises(UsageError, match="is empty"):
        resolve_window("2025-03-20", "2025-04-01", 30, now)


@pytest.mark.parametrize(("zone", "run_utc", "month"), [
    ("Asia/Shanghai", datetime(2025, 2, 28, 18, tzinfo=UTC), 2),  # 02:00 on 1 March in Shanghai
    ("Europe/Helsinki", datetime(2025, 6, 30, 23, tzinfo=UTC), 6),  # 02:00 on 1 July, summer time
    ("America/Chicago", datetime(2025, 3, 1, 8, tzinfo=UTC), 2),  # 02:00 on 1 March, behind UTC
])
def test_previous_month_is_the_plants_calendar_month(zone: str, run_utc: datetime, month: int) -> None:
    from zoneinfo import ZoneInfo

    from components.drift.window import previous_month

    plant = ZoneInfo(zone)
    assert run_utc.astimezone(plant).timetuple()[2:4] == (1, 2), "the monthly schedule's moment"
    window = previous_month(run_utc, timezone=zone)
    assert (window.since, window.until) == (datetime(2025, month, 1, tzinfo=plant),
                                            datetime(2025, month + 1, 1, tzinfo=plant))
    assert window.since.tzinfo == UTC and window.until.tzinfo == UTC, "windows stay UTC"
    assert previous_month(date(2025, month + 1, 1), timezone=zone).since == window.since, "a date is the plant's"


def test_previous_month_in_an_unknown_timezone_is_a_usage_error() -> None:
    from components.drift.window import previous_month
    from components.errors import UsageError

    with pytest.raises(UsageError, match="timezone 'Europe/Nowhere'.*prefect.yaml"):
        previous_month(timezone="Europe/Nowhere")


@pytest.mark.slow
def test_mlflow_logging_and_prefect_markdown(project, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from components.drift.check import artifact_markdown, log_to_mlflow, write_summary

    folder = tmp_path / "drift-report"
    folder.mkdir()
    (folder / "drift.html").write_text("<html></html>")
    summary = {"status": "drift", "drift": True, "rule": "r", "dataset_drift": True, "drift_share": 0.6,
               "drift_share_threshold": 0.5, "drifted_columns": ["brightness"], "n_current": 80, "skipped_lines": 2,
               "columns": {"brightness": {"method": "wasserstein", "threshold": 0.1, "score": 1.2, "drifted": True}},
               "column_alarm": [], "column_alarm_factor": 4.0,
               "embedding_drift": {"method": "distance", "score": 0.9, "drifted": True},
               "window": {"since": "2025-02-01T00:00:00+00:00", "until": "2025-03-01T00:00:00+00:00", "days": 28.0},
               "model_version": "defect-classifier/3", "files": {"html": str(folder / "drift.html")}}
    write_summary(summary, folder)

    run_id = log_to_mlflow(folder, project)

    client = MlflowClient(tracking_uri=project.tracking_uri)
    run = client.get_run(run_id)
    assert run.data.metrics["drift_detected"] == 1.0 and run.data.metrics["drift_score_brightness"] == 1.2
    names = {a.path.rsplit("/", 1)[-1] for a in client.list_artifacts(run_id, f"drift/{folder.name}")}
    assert {"summary.json", "drift.html"} <= names
    markdown = artifact_markdown(summary)
    assert "DRIFT DETECTED" in markdown and "| brightness | wasserstein | 1.200 |" in markdown
    assert "Embedding drift: **drifted** (distance, score 0.900)" in markdown
    assert "Column alarm: none (a column at 4x its threshold is drift alone)" in markdown
    assert run.data.metrics["drift_column_alarm"] == 0.0
    assert (folder / "drift.html").resolve().as_uri() in markdown


def log_frame(rng, n: int, predicted: int):
    """n records of image statistics; the first `predicted` also carry an answer and an embedding."""
    import pandas as pd

    from components.drift.reference import embedding_columns

    stats = {"brightness": rng.normal(120, 25, n), "contrast": rng.normal(30, 8, n),
             "sharpness": rng.normal(600, 150, n), "width": rng.normal(300, 40, n),
             "height": rng.normal(320, 30, n), "confidence": rng.uniform(0.5, 1, n),
             "predicted_class": rng.choice(["dent", "normal"], n).astype(object)}
    out = pd.concat([pd.DataFrame(stats), pd.DataFrame(rng.normal(0, 1, (n, 32)), columns=embedding_columns())],
                    axis=1)
    out.loc[predicted:, ["predicted_class", "confidence", *embedding_columns()]] = None
    return out


def test_predictions_of_another_model_are_left_out() -> None:
    import numpy as np

    from components.drift.detect import compare
    from components.drift.params import DriftParams
    from components.drift.reference import embedding_columns

    rng = np.random.default_rng(0)
    reference, current = log_frame(rng, 400, 200), log_frame(rng, 120, 120)
    current["model_version"] = ["defect-classifier/2"] * 40 + ["defect-classifier/3"] * 80
    # the old model answered otherwise: all dents, unsure, in another embedding space
    current.loc[:39, ["predicted_class", "confidence"]] = ["dent", 0.2]
    current.loc[:39, embedding_columns()] += 3.0

    summary = compare(reference, current, DriftParams(num_threshold=0.25), "defect-classifier/3").summary

    assert summary["status"] == "no_drift" and summary["n_current"] == 120 and summary["n_current_model"] == 80
    assert not {"predicted_class", "confidence"} & set(summary["drifted_columns"]), summary["columns"]
    assert summary["embedding_drift"]["n_window"] == 80 and summary["embedding_drift"]["drifted"] is False
    assert "40 records come from other model versions (defect-classifier/2)" in summary["notes"][0]


def test_the_drift_share_counts_the_configured_columns_when_some_are_left_out() -> None:
    """A new champion's first days: its predictions are too few and left out, 5 of the 7 columns remain. Two
    drifted image columns are still 2 of the 3 needed (0.3 of 7), not 2 of 5 >= 0.3."""
    import numpy as np

    from components.drift.detect import compare
    from components.drift.params import DriftParams

    rng = np.random.default_rng(0)
    reference, current = log_frame(rng, 400, 200), log_frame(rng, 120, 120)
    current["model_version"] = ["defect-classifier/2"] * 80 + ["defect-classifier/3"] * 40  # 40 < min_current
    current[["brightness", "contrast"]] *= 0.7  # a dimmer lamp: two columns drift
    params = DriftParams(num_threshold=0.25, drift_share=0.3, column_alarm_factor=None, embedding={"enabled": False})

    two = compare(reference, current, params, "defect-classifier/3").summary
    current["sharpness"] *= 0.7
    three = compare(reference, current, params, "defect-classifier/3").summary

    assert set(two["columns"]) == {"brightness", "contrast", "sharpness", "width", "height"}
    assert two["drifted_columns"] == ["brightness", "contrast"] and two["dataset_drift"] is False, two
    assert two["drift_share_threshold"] == pytest.approx(0.3 * 7 / 5)
    assert three["dataset_drift"] is True and three["status"] == "drift"


def test_a_column_the_reference_holds_constant_is_compared_as_a_category() -> None:
    """A fixed-resolution camera: every reference image is 256 px wide. One odd image is no drift (a distance
    normed by no spread would score it 10x its threshold); a new camera's size is, and an alarm on its own."""
    import numpy as np

    from components.drift.detect import compare
    from components.drift.params import DriftParams

    rng = np.random.default_rng(0)
    reference, current = log_frame(rng, 400, 200), log_frame(rng, 100, 100)
    reference["width"] = 256.0
    current["width"] = [257.0] + [256.0] * 99
    params = DriftParams(num_threshold=0.25, drift_share=0.3, column_alarm_factor=4.0, embedding={"enabled": False})

    one_odd = compare(reference, current, params, None).summary
    current["width"] = 320.0
    new_camera = compare(reference, current, params, None).summary

    assert one_odd["columns"]["width"]["method"] == "jensenshannon" and one_odd["status"] == "no_drift", one_odd
    assert one_odd["columns"]["height"]["method"] == "wasserstein"  # it varies in the reference
    assert new_camera["column_alarm"] == ["width"] and new_camera["status"] == "drift"


def test_odd_log_lines_are_skipped_or_read_as_missing(tmp_path: Path) -> None:
    """Lines a foreign writer or a bug may leave: skipped and counted, never a traceback in `defectops drift`."""
    from components.drift.current import current_frame
    from components.serving.predlog import read_log

    good = {"timestamp": "2026-06-01T10:00:00+00:00", "defect_type": "normal", "metadata": {"camera": 3}}
    lines = [{"timestamp": None}, {"timestamp": 5}, {"timestamp": {}}, [1, 2], "text", {"defect_type": "dent"},
             {**good, "metadata": "cam-1"}, {**good, "defect_type": ["dent"]}, good]
    (tmp_path / "2026-06-01.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))

    read = read_log(tmp_path)
    frame = current_frame(read.records)

    assert read.skipped == 6 and len(read.records) == 3
    assert frame["predicted_class"].tolist() == ["normal", None, "normal"]
    assert frame["camera"].tolist() == [None, "3", "3"]


def test_an_interrupted_check_leaves_no_report_folder(drift_project, monkeypatch: pytest.MonkeyPatch) -> None:
    from components.config import load_params
    from components.drift import check

    settings = drift_project

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt  # Ctrl-C (or SIGTERM, which the CLI turns into it) while the reports are written

    monkeypatch.setattr(check, "quality_report", interrupted)
    with pytest.raises(KeyboardInterrupt):
        check.run_drift_check(settings, load_params(settings.params_file))
    assert not list((settings.reports_dir / "drift").iterdir())

    monkeypatch.undo()
    done = check.run_drift_check(settings, load_params(settings.params_file))
    assert [p.name for p in (settings.reports_dir / "drift").iterdir()] == [done.report_dir.name]
    assert (done.report_dir / "quality.md").is_file() and (done.report_dir / "summary.json").is_file()


def test_two_checks_in_one_second_get_two_report_folders(drift_project) -> None:
    from components.drift.check import PARTIAL_SUFFIX, _reserve_report_dir

    now = datetime(2026, 6, 1, 6, 0, tzinfo=UTC)
    killed, _ = _reserve_report_dir(drift_project, now)  # a check killed -9 while writing: its .partial stays
    first, first_partial = _reserve_report_dir(drift_project, now)
    second, _ = _reserve_report_dir(drift_project, now)
    first_partial.rename(first)  # the first finished
    third, _ = _reserve_report_dir(drift_project, now)

    assert len({killed, first, second, third}) == 4
    assert first.name == "20260601T060000Z-2" and first_partial.name == first.name + PARTIAL_SUFFIX


def test_the_quality_report_follows_the_plants_days_and_names_every_model(tmp_path: Path) -> None:
    """Days are the plant's (Berlin: 23:30 UTC on 30 June is 1 July); with two models in the window the report
    says its figures cover both; a missing latency reads '-', not 'nan'."""
    from components.drift.current import current_frame
    from components.drift.quality import quality_report
    from components.drift.window import previous_month

    base = {"defect_type": "normal", "decision": "accept", "confidence": 0.9}
    records = [{**base, "timestamp": "2026-06-30T23:30:00+00:00", "model_version": "defect-classifier/2"},
               {**base, "timestamp": "2026-07-01T08:00:00+00:00", "model_version": "defect-classifier/3",
                "latency_ms": 12.0},
               {**base, "timestamp": "2026-07-02T08:00:00+00:00", "model_version": "defect-classifier/3"}]
    window = previous_month(date(2026, 8, 3), timezone="Europe/Berlin")

    report = quality_report(current_frame(records), window, tmp_path, "normal", "defect-classifier/3")
    text = report.markdown.read_text()

    assert window.timezone == "Europe/Berlin"
    assert "Models (the figures cover all): defect-classifier/3 (2), defect-classifier/2 (1)" in text
    assert "| 2026-07-01 | 2 |" in text and "| 2026-06-30 |" not in text, text
    assert report.figures["active_days"] == 2
    assert "| 2026-07-02 | 1 | 0 | 0 | 0.900 | 0.900 | - | - |" in text and "nan" not in text, text


def test_one_column_far_off_is_drift_on_its_own() -> None:
    """A noisy sensor moves sharpness far and little else: below the drift share, but a column alarm."""
    import numpy as np

    from components.drift.detect import column_alarms, compare
    from components.drift.params import DriftParams

    rng = np.random.default_rng(0)
    reference, current = log_frame(rng, 400, 200), log_frame(rng, 120, 120)
    current["sharpness"] *= 4  # sensor noise: the Laplacian variance of every picture rises several-fold
    params = DriftParams(num_threshold=0.25, drift_share=0.3, column_alarm_factor=4.0, embedding={"enabled": False})

    alarmed = compare(reference, current, params, None).summary
    off = compare(reference, current, params.model_copy(update={"column_alarm_factor": None}), None).summary

    assert alarmed["drifted_columns"] == ["sharpness"] and alarmed["dataset_drift"] is False
    assert alarmed["columns"]["sharpness"]["score"] >= 4 * 0.25
    assert alarmed["column_alarm"] == ["sharpness"] and alarmed["drift"] is True and alarmed["status"] == "drift"
    assert off["column_alarm"] == [] and off["drift"] is False
    # p-values fall as drift grows, so a p-value test is never an alarm whatever its score
    assert column_alarms({"sharpness": {"method": "ks", "threshold": 0.05, "score": 0.9, "drifted": False}}, 4) == []


def test_a_reference_of_too_few_spots_has_no_embedding_null() -> None:
    import numpy as np

    from components.drift.detect import compare
    from components.drift.params import DriftParams

    rng = np.random.default_rng(0)
    reference, current = log_frame(rng, 400, 200), log_frame(rng, 120, 120)
    reference["group"] = ["spot-1", "spot-2"] * 200  # the reference's 200 answers come from two spots only

    summary = compare(reference, current, DriftParams(embedding={"bootstrap": True}), None).summary

    assert summary["status"] == "no_drift" and summary["embedding_drift"] is None
    assert any("come from 2 capture groups, at least 4 needed" in note for note in summary["notes"]), summary["notes"]


def test_the_embedding_null_spans_capture_groups() -> None:
    """Spots differ more than exposures of one spot do: new spots are not drift, all of them shifted is."""
    import numpy as np
    import pandas as pd

    from components.drift.detect import embedding_drift
    from components.drift.params import DriftParams
    from components.drift.reference import embedding_columns

    rng = np.random.default_rng(1)

    def spots(n: int, shift: float = 0.0) -> pd.DataFrame:
        """Four exposures each of n spots: a spot's own place in the embedding, plus a little per exposure."""
        centres = rng.normal(0, 1, (n, 32)) + shift
        return pd.DataFrame(np.repeat(centres, 4, axis=0) + rng.normal(0, 0.2, (4 * n, 32)),
                            columns=embedding_columns())

    groups = pd.Series(np.repeat(np.arange(40), 4))
    by_group = DriftParams(embedding={"method": "distance", "bootstrap": True})
    by_image = DriftParams(embedding={"method": "distance", "bootstrap": True, "bootstrap_unit": "image"})
    flagged = {"new spots": 0, "new spots, image null": 0, "shifted spots": 0}
    for _ in range(20):  # each trial: a reference of 40 spots, a window of 30 other spots
        reference, new_spots, shifted = spots(40), spots(30), spots(30, shift=0.5)
        verdict = embedding_drift(reference, new_spots, by_group, groups)
        assert verdict["n_reference_groups"] == 40 and verdict["bootstrap_unit"] == "capture_group"
        flagged["new spots"] += verdict["drifted"]
        flagged["new spots, image null"] += embedding_drift(reference, new_spots, by_image, groups)["drifted"]
        flagged["shifted spots"] += embedding_drift(reference, shifted, by_group, groups)["drifted"]

    # a 95% null: about one trial in twenty; Evidently's image bootstrap calls new spots drift nearly always
    assert flagged["new spots"] <= 3 and flagged["new spots, image null"] >= 17, flagged
    assert flagged["shifted spots"] == 20, flagged



def test_the_embedding_check_of_normal_parts_ignores_the_class_mix() -> None:
    """Defective parts embed elsewhere than normal ones, so a mostly-normal line moves the mean embedding away
    from val's (half normal here) without any change on the line. Compared over the parts called normal only
    (the default), that is no drift, while a change in how normal parts look still is."""
    import numpy as np

    from components.drift.detect import compare
    from components.drift.params import DriftParams
    from components.drift.reference import embedding_columns

    rng = np.random.default_rng(0)
    reference, current = log_frame(rng, 400, 200), log_frame(rng, 150, 150)
    reference["group"] = [f"spot-{i // 2}" for i in range(400)]
    current.loc[:142, "predicted_class"] = "normal"  # 95% normal
    current.loc[143:, "predicted_class"] = "dent"
    for frame in (reference, current):
        dents = frame["predicted_class"] == "dent"
        frame.loc[dents, embedding_columns()] += 1.5

    def params(classes: str = "normal") -> DriftParams:
        return DriftParams(columns=["brightness"], column_alarm_factor=None,
                           embedding={"method": "distance", "bootstrap": True, "classes": classes})

    every = compare(reference, current, params("all"), normal_class="normal")
    normal = compare(reference, current, params(), normal_class="normal")
    current.loc[current["predicted_class"] == "normal", embedding_columns()] += 0.5  # normal parts look otherwise
    changed = compare(reference, current, params(), normal_class="normal")

    assert every.summary["embedding_drift"]["drifted"] is True, every.summary["embedding_drift"]
    assert every.summary["embedding_drift"]["classes"] == "all"
    assert normal.summary["embedding_drift"]["drifted"] is False, normal.summary["embedding_drift"]
    assert normal.summary["embedding_drift"]["classes"] == "normal"
    assert normal.summary["embedding_drift"]["n_current"] == 143
    assert changed.summary["embedding_drift"]["drifted"] is True


def test_the_reference_is_the_dataset_version_the_model_was_trained_on(project, drift_model: Path,
                                                                        tmp_path: Path) -> None:
    """After the monthly import, data/ also holds last month's production images: the reference keeps to the
    images of the version the model was trained on (found through git, checked against the model's digest; a
    shallow clone fetches its history), or says so where a clone cannot pick them out, and does not cache that
    stand-in."""
    import subprocess

    from components.config import Settings, load_params
    from components.data.importer import import_data
    from components.data.tracked import tracked_manifest
    from components.drift.params import drift_params
    from components.drift.reference import load_reference
    from components.predictor import Predictor
    from components.training.train import training_digest
    from tests.conftest import make_imagefolder

    params = load_params(project.params_file)
    first = import_data(str(make_imagefolder(tmp_path / "m1", per_class=8)), project, params)
    known = tracked_manifest(project, params)
    import_data(str(make_imagefolder(tmp_path / "m2", per_class=8, seed=3, prefix="line")), project, params)
    predictor = Predictor.from_file(drift_model)
    predictor.meta.update(dataset_version=first.version, manifest_digest=training_digest(known))
    drift = drift_params(params)

    reference = load_reference(project, params, predictor, drift)
    assert reference.dataset_version == first.version and reference.note is None
    assert set(reference.frame["path"]) == set(known.loc[known["split"].isin(drift.reference_splits), "path"])
    assert load_reference(project, params, predictor, drift).cached

    def shallow_clone(name: str) -> Settings:  # a Job's `git_clone` pull step clones one commit deep
        clone = tmp_path / name
        subprocess.run(["git", "clone", "-q", "--depth", "1", f"file://{project.project_root}", str(clone)],
                       check=True)
        (clone / "params.yaml").write_text(project.params_file.read_text())
        return Settings(project=clone, home=tmp_path / f"{name}-home", dvc_remote=project.dvc_remote_url)

    deepened = load_reference(shallow_clone("job"), params, predictor, drift)
    assert deepened.dataset_version == first.version and deepened.note is None, "its history was fetched"
    cut_off = shallow_clone("offline")
    subprocess.run(["git", "-C", str(cut_off.project_root), "remote", "set-url", "origin", str(tmp_path / "gone")],
                   check=True)
    stand_in = load_reference(cut_off, params, predictor, drift)
    assert stand_in.dataset_version != first.version and stand_in.path is None and not stand_in.cached
    assert "no commit of this clone records that version" in stand_in.note
    assert len(stand_in.frame) > len(reference.frame)
