"""infra/prometheus: promtool accepts the config and the rules, the rule unit tests fire every alert on synthetic
series, and every expression reads metrics the service really exports."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.infra.conftest import PROMETHEUS_DIR, load_yaml
from tests.infra.promql import series_names

RULES_TEST = PROMETHEUS_DIR / "alerts.test.yml"


def run_promtool(promtool: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([promtool, *map(str, args)], check=False, capture_output=True, text=True, timeout=120,
                            cwd=PROMETHEUS_DIR)
    assert result.returncode == 0, f"promtool {' '.join(map(str, args))}:\n{result.stdout}\n{result.stderr}"
    return result


def rules_by_name(alert_rules: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for rule in alert_rules if "alert" in rule}


# ------------------------------------------------------------------ promtool


def test_promtool_accepts_the_alert_rules(promtool: str) -> None:
    run_promtool(promtool, "check", "rules", "alerts.yml")


def test_promtool_accepts_the_config_and_its_rule_files(promtool: str) -> None:
    output = run_promtool(promtool, "check", "config", "prometheus.yml").stdout
    assert "alerts.yml" in output and "SUCCESS" in output


def test_alert_rule_unit_tests_pass(promtool: str) -> None:
    """Low confidence, p99 over 100 ms, a defect-rate spike, a down service and log drops fire; healthy series don't."""
    run_promtool(promtool, "test", "rules", RULES_TEST.name)


def test_rule_unit_tests_catch_a_broken_threshold(promtool: str, tmp_path: Path) -> None:
    """The unit tests have teeth: with the confidence threshold moved to 0.65 they fail."""
    broken = (PROMETHEUS_DIR / "alerts.yml").read_text().replace(") < 0.85", ") < 0.65")
    assert broken != (PROMETHEUS_DIR / "alerts.yml").read_text()
    (tmp_path / "alerts.yml").write_text(broken)
    confidence_only = load_yaml(RULES_TEST)
    confidence_only["tests"] = [t for t in confidence_only["tests"] if "confidence" in t["name"]]
    (tmp_path / RULES_TEST.name).write_text(yaml.safe_dump(confidence_only))
    result = subprocess.run([promtool, "test", "rules", RULES_TEST.name], check=False, capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert result.returncode != 0
    assert "DefectClassifierLowConfidence" in result.stdout + result.stderr


# ------------------------------------------------------------------ what the rules say


def test_the_four_required_alerts_exist(alert_rules: list[dict[str, Any]]) -> None:
    rules = rules_by_name(alert_rules)
    confidence = rules["DefectClassifierLowConfidence"]["expr"]
    assert "prediction_confidence_sum" in confidence and "prediction_confidence_count" in confidence
    assert "< 0.85" in confidence
    spike = rules["DefectClassifierDefectRateSpike"]["expr"]
    assert "defects_detected_total" in spike and "offset" in spike
    latency = rules["DefectClassifierSlowInference"]["expr"]
    assert "histogram_quantile(0.99" in latency and "inference_latency_seconds_bucket" in latency
    assert "> 0.1" in latency
    assert "up{" in rules["DefectClassifierDown"]["expr"]


def test_every_alert_has_severity_summary_and_a_for_duration(alert_rules: list[dict[str, Any]]) -> None:
    for rule in alert_rules:
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        assert rule.get("for"), f"{rule['alert']} would fire on a single evaluation"


def test_alert_expressions_read_only_exported_metrics(alert_rules: list[dict[str, Any]],
                                                      exported_metrics: set[str]) -> None:
    for rule in alert_rules:
        names = series_names(rule["expr"])
        assert names, f"{rule['alert']}: no metric found in its expression"
        unknown = names - exported_metrics
        assert not unknown, f"{rule['alert']} reads {sorted(unknown)}, which the service does not export"


def test_every_alert_is_unit_tested_firing_and_quiet(alert_rules: list[dict[str, Any]]) -> None:
    cases = [case for test in load_yaml(RULES_TEST)["tests"] for case in test["alert_rule_test"]]
    for name in rules_by_name(alert_rules):
        mine = [case for case in cases if case["alertname"] == name]
        assert any(case["exp_alerts"] for case in mine), f"{name}: no unit test where it fires"
        assert any(not case["exp_alerts"] for case in mine), f"{name}: no unit test where it stays quiet"


def test_rule_unit_tests_use_the_exported_series(exported_metrics: set[str]) -> None:
    for test in load_yaml(RULES_TEST)["tests"]:
        for series in test["input_series"]:
            name = series["series"].split("{", 1)[0]
            assert name in exported_metrics, f"alerts.test.yml feeds {name}, which the service does not export"


# ------------------------------------------------------------------ the helpers themselves


def test_exported_names_follow_prometheus_client_suffixes(exported_metrics: set[str]) -> None:
    for name in ("defects_detected_total", "decisions_total", "prediction_confidence_bucket",
                 "prediction_confidence_sum", "prediction_confidence_count", "inference_latency_seconds_bucket",
                 "served_model_info", "review_items_total"):
        assert name in exported_metrics
    assert "defects_detected" not in exported_metrics  # a counter is only ever exposed with _total


@pytest.mark.parametrize(("expr", "expected"), [
    ('sum by (job, le) (rate(inference_latency_seconds_bucket{job="x",le=~"0.1|+Inf"}[5m]))',
     {"inference_latency_seconds_bucket"}),
    ("rate(defects_detected_total[1d] offset 15m) / on (job) group_left (decision) decisions_total",
     {"defects_detected_total", "decisions_total"}),
    ('sum(rate(decisions_total{job="$job",decision="review"}[$__rate_interval])) > 0.5 and up == 1',
     {"decisions_total", "up"}),
])
def test_series_names_reads_only_metric_names(expr: str, expected: set[str]) -> None:
    assert series_names(expr) == expected
