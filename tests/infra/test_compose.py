"""infra/docker-compose.yml: valid against the Compose specification, every cross-reference resolves, every
long-running service has a healthcheck, the service gets its GPU, Prometheus and Grafana point at real services."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from components.config import load_params
from components.serving.params import serve_params
from tests.conftest import REPO_ROOT
from tests.infra.conftest import COMPOSE_FILE, GRAFANA_DIR, INFRA, PROMETHEUS_DIR, load_yaml, required_module

REQUIRED_SERVICES = {"postgres", "minio", "minio-setup", "mlflow", "prefect-server", "prefect-worker", "serving",
                     "prometheus", "grafana"}
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
_VARIABLE = re.compile(r"\$\$|\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def env_example() -> dict[str, str]:
    lines = (INFRA / ".env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))


def interpolate(text: str, env: dict[str, str]) -> str:
    """What `docker compose` does before it validates: ${VAR}, ${VAR:-default}, ${VAR:?error}, $$."""

    def value(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, operator, argument = match.groups()
        if name in env and env[name] != "":
            return env[name]
        if operator and operator.endswith("-"):
            return argument
        raise KeyError(f"${{{name}}} is neither in infra/.env.example nor given a default")

    return _VARIABLE.sub(value, text)


def depends_on(service: dict[str, Any]) -> dict[str, str]:
    """depends_on as {name: condition}, for both the list and the long form."""
    raw = service.get("depends_on") or {}
    if isinstance(raw, list):
        return dict.fromkeys(raw, "service_started")
    return {name: (spec or {}).get("condition", "service_started") for name, spec in raw.items()}


def mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of each short-form volume entry."""
    pairs = []
    for entry in service.get("volumes", []):
        source, target = entry.split(":")[:2]
        pairs.append((source, target))
    return pairs


def is_bind(source: str) -> bool:
    return source.startswith((".", "/", "~"))


def container_ports(service: dict[str, Any]) -> set[int]:
    ports = {int(p) for p in service.get("expose", [])}
    for mapping in service.get("ports", []):
        ports.add(int(str(mapping).rsplit(":", 1)[-1].split("/")[0]))
    return ports


def one_shot(service: dict[str, Any]) -> bool:
    return service.get("restart") == "no"


# ------------------------------------------------------------------ the specification


def test_the_compose_file_is_valid_against_the_compose_specification() -> None:
    compose_spec = required_module("compose_spec", "uv add --dev compose-spec==0.2.1")
    text = interpolate(COMPOSE_FILE.read_text(), env_example())
    # through PyYAML, which resolves the `<<:` merge keys that docker compose supports
    document = compose_spec.PyCompose.from_json(json.dumps(yaml.safe_load(text)))
    document.validate()
    assert REQUIRED_SERVICES <= set(document.service_names())


def test_the_specification_check_has_teeth() -> None:
    compose_spec = required_module("compose_spec", "uv add --dev compose-spec==0.2.1")
    document = yaml.safe_load(interpolate(COMPOSE_FILE.read_text(), env_example()))
    document["services"]["serving"]["healthcheck"]["retries"] = "five"
    with pytest.raises(ValueError, match="retries|invalid type"):
        compose_spec.PyCompose.from_json(json.dumps(document)).validate()


def test_every_variable_is_in_env_example_or_has_a_default() -> None:
    interpolate(COMPOSE_FILE.read_text(), env_example())  # raises KeyError naming the variable


def test_env_example_holds_no_real_secret() -> None:
    for name, value in env_example().items():
        if re.search(r"PASSWORD|SECRET", name):
            assert value.startswith("change-me"), f"infra/.env.example: {name} must be a change-me placeholder"
    assert ".env" in (INFRA / ".gitignore").read_text().split(), "infra/.gitignore must keep infra/.env out of git"


def test_credentials_come_from_the_environment_not_the_file(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        environment = service.get("environment") or {}
        for key, value in environment.items():
            if re.search(r"PASSWORD|SECRET_KEY|SECRET_ACCESS", key):
                assert str(value).startswith("${"), f"{name}.{key} is written into the compose file"


# ------------------------------------------------------------------ cross-references


def test_required_services_exist(services: dict[str, dict[str, Any]]) -> None:
    assert REQUIRED_SERVICES <= set(services), f"missing: {REQUIRED_SERVICES - set(services)}"


def test_depends_on_names_existing_services_with_a_condition_they_can_meet(
        services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for other, condition in depends_on(service).items():
            assert other in services, f"{name} depends on unknown service {other!r}"
            assert condition in CONDITIONS, f"{name} -> {other}: unknown condition {condition!r}"
            if condition == "service_healthy":
                assert "healthcheck" in services[other], f"{name} waits for {other} to be healthy; it has no healthcheck"
            if condition == "service_completed_successfully":
                assert one_shot(services[other]), f"{name} waits for {other} to complete; it is not one-shot"


def test_named_volumes_and_networks_are_declared_and_used(compose: dict[str, Any],
                                                          services: dict[str, dict[str, Any]]) -> None:
    declared_volumes, declared_networks = set(compose.get("volumes", {})), set(compose.get("networks", {}))
    used_volumes, used_networks = set(), set()
    for name, service in services.items():
        for source, _ in mounts(service):
            if not is_bind(source):
                assert source in declared_volumes, f"{name} mounts undeclared volume {source!r}"
                used_volumes.add(source)
        networks = service.get("networks", [])
        for network in networks if isinstance(networks, list) else list(networks):
            assert network in declared_networks, f"{name} joins undeclared network {network!r}"
            used_networks.add(network)
    assert declared_volumes == used_volumes, f"declared but unused volumes: {declared_volumes - used_volumes}"
    assert declared_networks == used_networks, f"declared but unused networks: {declared_networks - used_networks}"


def test_bind_mounts_and_build_contexts_exist(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for source, _ in mounts(service):
            if is_bind(source):
                assert (INFRA / source).exists(), f"{name} mounts {source}, which does not exist under infra/"
        build = service.get("build")
        if build:
            context = INFRA / (build if isinstance(build, str) else build["context"])
            dockerfile = context / (build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile")
            assert context.is_dir(), f"{name}: build context {context} missing"
            assert dockerfile.is_file(), f"{name}: {dockerfile} missing"


def test_worker_image_copies_only_what_exists() -> None:
    """Every COPY source of the worker's Dockerfile is in the repository (the build context is the root)."""
    for line in (INFRA / "worker" / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (REPO_ROOT / source).exists(), f"infra/worker/Dockerfile copies {source}, which is missing"


def test_the_project_folder_is_set_by_compose_not_baked_into_the_worker_image(
        services: dict[str, dict[str, Any]]) -> None:
    """A Kubernetes training Job (same image) runs in its git clone and finds params.yaml from there; a
    DEFECTOPS_PROJECT baked into the image would point it at the empty /srv/project instead."""
    dockerfile = (INFRA / "worker" / "Dockerfile").read_text()
    assert not re.search(r"^\s*(ENV\s+)?DEFECTOPS_PROJECT=", dockerfile, re.MULTILINE)
    environment = services["prefect-worker"]["environment"]
    assert environment["DEFECTOPS_PROJECT"] == "/srv/project"  # prefect.yaml's pull step needs it there
    assert ("defectops-project", "/srv/project") in mounts(services["prefect-worker"])


def test_services_that_talk_share_a_network(services: dict[str, dict[str, Any]]) -> None:
    def networks(name: str) -> set[str]:
        return set(services[name].get("networks", []))  # a list, or a mapping of network names

    for name, service in services.items():
        if service.get("network_mode") == "none":
            continue
        for other in depends_on(service):
            if services[other].get("network_mode") != "none":
                assert networks(name) & networks(other), f"{name} and {other} share no network"


# ------------------------------------------------------------------ health


def test_every_service_has_a_healthcheck_or_is_one_shot(services: dict[str, dict[str, Any]]) -> None:
    waited_for = {other for service in services.values()
                  for other, condition in depends_on(service).items()
                  if condition == "service_completed_successfully"}
    for name, service in services.items():
        if one_shot(service):
            assert name in waited_for, f"{name} is one-shot but nothing waits for it to complete"
            continue
        test = (service.get("healthcheck") or {}).get("test")
        assert test and not service["healthcheck"].get("disable"), f"{name} runs on but has no healthcheck"


def test_the_service_reserves_one_nvidia_gpu(services: dict[str, dict[str, Any]]) -> None:
    devices = services["serving"]["deploy"]["resources"]["reservations"]["devices"]
    assert {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]} in devices


def test_the_service_listens_where_params_say_and_checks_readyz(services: dict[str, dict[str, Any]]) -> None:
    serving = services["serving"]
    port = serve_params(load_params(REPO_ROOT / "params.yaml")).port
    assert port in container_ports(serving)
    assert f"http://localhost:{port}/readyz" in " ".join(serving["healthcheck"]["test"])
    assert serving["image"].endswith("defect_classifier:latest}"), "the image `bentoml containerize` tags"


def test_the_service_and_the_worker_share_defectops_home(services: dict[str, dict[str, Any]]) -> None:
    """The deployment record the worker's promotion writes is the one the service reads."""
    home = "/srv/defectops"
    for name in ("serving", "prefect-worker"):
        assert ("defectops-home", home) in mounts(services[name])
        assert services[name]["environment"]["DEFECTOPS_HOME"] == home


def test_the_project_reaches_every_plant_service(services: dict[str, dict[str, Any]]) -> None:
    """The variables components/config.py, MLflow and Prefect read point at services of this file."""
    environment = services["prefect-worker"]["environment"]
    for key in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "DEFECTOPS_DVC_REMOTE_ENDPOINT"):
        host, port = re.match(r"https?://([\w-]+):(\d+)", environment[key]).groups()
        assert host in services and int(port) in container_ports(services[host]), f"{key}={environment[key]}"
    assert environment["DEFECTOPS_DVC_REMOTE"].startswith("s3://")


# ------------------------------------------------------------------ Prometheus and Grafana wiring


def test_prometheus_mounts_its_config_and_every_rule_file(services: dict[str, dict[str, Any]],
                                                          prometheus_config: dict[str, Any]) -> None:
    prometheus = services["prometheus"]
    config_flag = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    config_path = Path(config_flag.split("=", 1)[1])
    mounted = {Path(target): INFRA / source for source, target in mounts(prometheus) if is_bind(source)}
    assert mounted.get(config_path) == PROMETHEUS_DIR / "prometheus.yml"
    for rule_file in prometheus_config["rule_files"]:
        assert (PROMETHEUS_DIR / rule_file).is_file(), f"prometheus.yml names {rule_file}, missing in infra/prometheus"
        assert mounted.get(config_path.parent / rule_file) == PROMETHEUS_DIR / rule_file, f"{rule_file} not mounted"


def test_scrape_targets_are_services_on_their_ports(services: dict[str, dict[str, Any]],
                                                    prometheus_config: dict[str, Any]) -> None:
    targets = [target for job in prometheus_config["scrape_configs"]
               for static in job.get("static_configs", []) for target in static["targets"]]
    assert "serving:3000" in targets
    for target in targets:
        host, port = target.rsplit(":", 1)
        service = services["prometheus"] if host == "localhost" else services.get(host)
        assert service is not None, f"scrape target {target}: no service {host!r}"
        assert int(port) in container_ports(service), f"scrape target {target}: {host} does not listen on {port}"


def test_grafana_provisioning_points_at_prometheus_and_the_dashboards(services: dict[str, dict[str, Any]]) -> None:
    grafana = services["grafana"]
    mounted = {target: INFRA / source for source, target in mounts(grafana) if is_bind(source)}
    assert mounted["/etc/grafana/provisioning"] == GRAFANA_DIR / "provisioning"
    datasource = load_yaml(GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml")["datasources"][0]
    host, port = re.match(r"http://([\w-]+):(\d+)", datasource["url"]).groups()
    assert host in services and int(port) in container_ports(services[host])
    provider = load_yaml(GRAFANA_DIR / "provisioning" / "dashboards" / "defectops.yml")["providers"][0]
    dashboards = mounted[provider["options"]["path"]]
    assert list(dashboards.glob("*.json")), f"no dashboard JSON in {dashboards}"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (dashboards / Path(home).name).is_file()
