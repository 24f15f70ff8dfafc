"""infra/grafana: the provisioned dashboard is valid JSON with the panels the plant needs, every query reads metrics
the service exports, and promtool parses every query."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.infra.conftest import GRAFANA_DIR, load_yaml
from tests.infra.promql import series_names

DASHBOARD = GRAFANA_DIR / "dashboards" / "defectops-serving.json"
# required panel -> a word its title must hold and a metric one of its queries must read
REQUIRED_PANELS = {
    "throughput": ("throughput", "decisions_total"),
    "defects by type": ("defects by type", "defects_detected_total"),
    "decisions": ("decisions", "decisions_total"),
    "confidence": ("confidence", "prediction_confidence_sum"),
    "latency p99": ("latency p99", "inference_latency_seconds_bucket"),
    "review rate": ("review rate", "decisions_total"),
}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """All panels, including those inside rows."""
    found = []
    for panel in dashboard["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return [panel for panel in found if panel.get("type") != "row"]


def queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    return [(panel["title"], target["expr"]) for panel in panels(dashboard) for target in panel.get("targets", [])]


def test_dashboard_is_valid_json_with_a_stable_identity(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "defectops-serving"
    assert dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_every_required_panel_is_present(dashboard: dict[str, Any]) -> None:
    by_title = {panel["title"].lower(): panel for panel in panels(dashboard)}
    for required, (word, metric) in REQUIRED_PANELS.items():
        matching = [p for title, p in by_title.items() if word in title]
        assert matching, f"no panel whose title holds {word!r} ({required})"
        read = set().union(*(series_names(t["expr"]) for p in matching for t in p["targets"]))
        assert metric in read, f"panel '{word}' does not read {metric}"


def test_every_query_reads_only_exported_metrics(dashboard: dict[str, Any], exported_metrics: set[str]) -> None:
    assert queries(dashboard)
    for title, expr in queries(dashboard):
        names = series_names(expr)
        assert names, f"panel {title!r}: no metric in {expr!r}"
        assert names <= exported_metrics, f"panel {title!r} reads {sorted(names - exported_metrics)}, not exported"


def test_every_panel_uses_the_provisioned_datasource(dashboard: dict[str, Any]) -> None:
    datasource = load_yaml(GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml")["datasources"][0]
    for panel in panels(dashboard):
        assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == datasource["uid"], panel["title"]
            assert target.get("refId"), panel["title"]


def test_panels_fit_the_grid_without_overlap(dashboard: dict[str, Any]) -> None:
    taken: set[tuple[int, int]] = set()
    for panel in panels(dashboard):
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                 for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not cells & taken, f"panel {panel['title']!r} overlaps another"
        taken |= cells


def test_the_queries_are_promql_that_promtool_parses(dashboard: dict[str, Any], promtool: str,
                                                     tmp_path: Path) -> None:
    """Grafana's variables replaced by plain values, each query checked as a recording rule."""
    rules = []
    for index, (_, expr) in enumerate(queries(dashboard)):
        plain = re.sub(r"\$__rate_interval|\$__interval", "1m", expr).replace("$job", "defect-classifier")
        rules.append({"record": f"dashboard:query_{index}", "expr": plain})
    rules_file = tmp_path / "dashboard-rules.yml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(rules_file)], check=False, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
