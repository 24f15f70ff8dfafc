"""Shared fixtures of the deploy-configuration tests: the files under infra/, the metric names the service exports,
and the external validators (promtool, compose-spec, kubernetes-validate), which skip locally but fail in CI."""

from __future__ import annotations

import importlib
import os
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from tests.conftest import REPO_ROOT
from tests.infra.promql import exported_metric_names

INFRA = REPO_ROOT / "infra"
COMPOSE_FILE = INFRA / "docker-compose.yml"
PROMETHEUS_DIR = INFRA / "prometheus"
GRAFANA_DIR = INFRA / "grafana"
K8S_DIR = INFRA / "k8s"
METRICS_MODULE = REPO_ROOT / "components" / "serving" / "metrics.py"


def required_tool(found: Any, message: str) -> Any:
    """`found`, or a skip saying how to install it; in CI (CI=true) a missing validator is a failure."""
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


def required_module(name: str, install: str) -> ModuleType:
    """Import a validator package of the dev group (skip locally without it, fail in CI)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return required_tool(None, f"python package for {name!r} not installed: {install}")


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="session")
def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE_FILE)


@pytest.fixture(scope="session")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="session")
def prometheus_config() -> dict[str, Any]:
    return load_yaml(PROMETHEUS_DIR / "prometheus.yml")


@pytest.fixture(scope="session")
def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(PROMETHEUS_DIR / "alerts.yml")["groups"] for rule in group["rules"]]


@pytest.fixture(scope="session")
def exported_metrics() -> set[str]:
    """Every series name the service's /metrics can carry (from components/serving/metrics.py), plus `up`."""
    return exported_metric_names(METRICS_MODULE.read_text()) | {"up"}


@pytest.fixture(scope="session")
def promtool() -> str:
    """promtool on PATH (the Makefile's `tools` target installs it there), else one placed in .tools/bin."""
    local = REPO_ROOT / ".tools" / "bin" / "promtool"
    found = shutil.which("promtool") or (str(local) if os.access(local, os.X_OK) else None)
    return required_tool(found, "promtool not found: install Debian's `prometheus` package "
                                "(apt-get install -y --no-install-recommends prometheus)")
