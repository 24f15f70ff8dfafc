"""infra/k8s: every manifest validates against the Kubernetes JSON schemas bundled in kubernetes-validate (strict: no
unknown fields; nothing downloaded), the pieces refer to each other correctly, and the Prefect work pool template
renders into a valid GPU Job."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from typing import Any

import pytest
import yaml

from components.config import load_params
from components.serving.params import serve_params
from tests.conftest import REPO_ROOT
from tests.infra.conftest import K8S_DIR, load_yaml, required_module

INSTALL = "uv add --dev kubernetes-validate==1.37.0"
OLDEST_SUPPORTED = "1.29"  # autoscaling/v2 and every field used here are GA there
WORK_POOL_TEMPLATE = K8S_DIR / "prefect-gpu-work-pool.json"


def kubernetes_validate():
    return required_module("kubernetes_validate", INSTALL)


def k8s_versions() -> tuple[str, ...]:
    from kubernetes_validate.utils import latest_version

    return OLDEST_SUPPORTED, latest_version()


def validate(resource: dict[str, Any]) -> None:
    validator = kubernetes_validate()
    for version in k8s_versions():
        validator.validate(resource, version, strict=True)


@pytest.fixture(scope="module")
def kustomization() -> dict[str, Any]:
    return load_yaml(K8S_DIR / "kustomization.yaml")


@pytest.fixture(scope="module")
def resources(kustomization: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The kustomization's resources by kind."""
    found: dict[str, dict[str, Any]] = {}
    for name in kustomization["resources"]:
        path = K8S_DIR / name
        assert path.is_file(), f"kustomization.yaml lists {name}, which does not exist"
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                assert document["kind"] not in found, f"two {document['kind']} resources: tests expect one"
                found[document["kind"]] = document
    return found


def serving_container(resources: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return resources["Deployment"]["spec"]["template"]["spec"]["containers"][0]


# ------------------------------------------------------------------ schemas


def test_every_manifest_is_listed_in_the_kustomization(kustomization: dict[str, Any]) -> None:
    manifests = {p.name for p in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert manifests == set(kustomization["resources"])


@pytest.mark.parametrize("kind", ["Namespace", "PersistentVolumeClaim", "Deployment", "Service",
                                  "HorizontalPodAutoscaler"])
def test_manifest_validates_against_the_bundled_schema(resources: dict[str, dict[str, Any]], kind: str) -> None:
    assert kind in resources, f"no {kind} in infra/k8s"
    validate(resources[kind])


def test_the_schema_check_has_teeth(resources: dict[str, dict[str, Any]]) -> None:
    validator = kubernetes_validate()
    typo = copy.deepcopy(resources["Deployment"])
    typo["spec"]["replcas"] = 2
    with pytest.raises(validator.ValidationError):
        validator.validate(typo, OLDEST_SUPPORTED, strict=True)
    wrong_type = copy.deepcopy(resources["HorizontalPodAutoscaler"])
    wrong_type["spec"]["maxReplicas"] = "four"
    with pytest.raises(validator.ValidationError):
        validator.validate(wrong_type, OLDEST_SUPPORTED, strict=True)


def test_kustomize_renders_valid_resources(tmp_path) -> None:
    """Where kubectl is installed (not required), the rendered output validates too, generated ConfigMaps included."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed; the resources themselves are validated above")
    rendered = subprocess.run([kubectl, "kustomize", str(K8S_DIR)], check=False, capture_output=True, text=True, timeout=60)
    assert rendered.returncode == 0, rendered.stderr
    documents = [d for d in yaml.safe_load_all(rendered.stdout) if d]
    assert {d["kind"] for d in documents} >= {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap"}
    for document in documents:
        validate(document)
        if document["kind"] != "Namespace":
            assert document["metadata"]["namespace"] == "defectops"


# ------------------------------------------------------------------ how the pieces fit


def test_the_deployment_asks_for_a_gpu_on_a_gpu_node(resources: dict[str, dict[str, Any]]) -> None:
    pod = resources["Deployment"]["spec"]["template"]["spec"]
    assert serving_container(resources)["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])


def test_probes_use_bentoml_health_endpoints_on_the_served_port(resources: dict[str, dict[str, Any]]) -> None:
    container = serving_container(resources)
    port = serve_params(load_params(REPO_ROOT / "params.yaml")).port
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert named["http"] == port
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    assert container["startupProbe"]["httpGet"]["path"] == "/livez"


def test_the_service_selects_the_pods_and_targets_their_port(resources: dict[str, dict[str, Any]]) -> None:
    service, deployment = resources["Service"], resources["Deployment"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    container_ports = {p["name"] for p in serving_container(resources)["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports


def test_the_hpa_scales_the_deployment(resources: dict[str, dict[str, Any]]) -> None:
    hpa, deployment = resources["HorizontalPodAutoscaler"], resources["Deployment"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    cpu = serving_container(resources)["resources"]["requests"]["cpu"]
    assert cpu, "a CPU utilisation target needs a CPU request"


def test_the_deployment_mounts_the_claim_and_its_config(resources: dict[str, dict[str, Any]],
                                                        kustomization: dict[str, Any]) -> None:
    pod = resources["Deployment"]["spec"]["template"]["spec"]
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    mount = next(m for m in serving_container(resources)["volumeMounts"] if m["name"] in claims)
    assert claims[mount["name"]] == resources["PersistentVolumeClaim"]["metadata"]["name"]
    generated = {g["name"]: g for g in kustomization["configMapGenerator"]}
    config_map = next(e["configMapRef"]["name"] for e in serving_container(resources)["envFrom"] if "configMapRef" in e)
    settings = dict(literal.split("=", 1) for literal in generated[config_map]["literals"])
    assert settings["DEFECTOPS_HOME"] == mount["mountPath"]
    assert settings["MLFLOW_TRACKING_URI"].startswith("http")


# ------------------------------------------------------------------ the Prefect work pool for GPU training


@pytest.fixture(scope="module")
def work_pool_template() -> dict[str, Any]:
    return json.loads(WORK_POOL_TEMPLATE.read_text())


def render_job(template: dict[str, Any], **values: Any) -> dict[str, Any]:
    """The Job a Kubernetes worker would submit: Prefect's templating with the variables' defaults, then what the
    worker itself does before submitting (env as a list, a command, generateName) and what the API client drops
    (null fields; `parallelism`/`completions` in the pod spec, which prefect-kubernetes requires there)."""
    from prefect.utilities.templating import apply_values

    defaults = {name: spec["default"] for name, spec in template["variables"]["properties"].items() if "default" in spec}
    job = apply_values(template["job_configuration"]["job_manifest"],
                       {**defaults, "name": "defectops-train", "labels": {}, "env": {}, **values})
    container = job["spec"]["template"]["spec"]["containers"][0]
    container["env"] = [{"name": k, "value": v} for k, v in (container.get("env") or {}).items()]
    container["args"] = container.get("args") or ["prefect", "flow-run", "execute"]

    def drop_nulls(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: drop_nulls(v) for k, v in value.items() if v is not None}
        if isinstance(value, list):
            return [drop_nulls(v) for v in value]
        return value

    job = drop_nulls(job)
    pod = job["spec"]["template"]["spec"]
    assert pod.pop("parallelism") == 1 and pod.pop("completions") == 1
    return job


def test_work_pool_template_passes_prefects_own_check(work_pool_template: dict[str, Any]) -> None:
    """Every {{ placeholder }} of the job configuration is a declared variable (what the Prefect server checks)."""
    from prefect.server.schemas.actions import WorkPoolCreate

    WorkPoolCreate(name="defectops-gpu", type="kubernetes", base_job_template=work_pool_template)
    undeclared = copy.deepcopy(work_pool_template)
    undeclared["job_configuration"]["job_manifest"]["spec"]["activeDeadlineSeconds"] = "{{ deadline }}"
    with pytest.raises(ValueError, match="deadline"):
        WorkPoolCreate(name="defectops-gpu", type="kubernetes", base_job_template=undeclared)


def test_work_pool_template_keeps_what_the_kubernetes_worker_requires(work_pool_template: dict[str, Any]) -> None:
    manifest = work_pool_template["job_configuration"]["job_manifest"]
    assert (manifest["apiVersion"], manifest["kind"]) == ("batch/v1", "Job")
    pod = manifest["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["parallelism"] == 1 and pod["completions"] == 1
    assert pod["containers"][0]["name"] == "prefect-job"
    for key in ("command", "env", "labels", "name", "namespace", "job_manifest"):
        assert key in work_pool_template["job_configuration"], key


def test_work_pool_renders_a_valid_gpu_job(work_pool_template: dict[str, Any]) -> None:
    job = render_job(work_pool_template)
    validate(job)
    pod = job["spec"]["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1 == resources["requests"]["nvidia.com/gpu"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert job["metadata"]["namespace"] == "defectops"


def test_work_pool_overrides_render_too(work_pool_template: dict[str, Any]) -> None:
    """What a deployment may set (job_variables in prefect.yaml) still gives a valid Job."""
    job = render_job(work_pool_template, gpu_count=2, image="registry.plant.example/defectops-worker:abc123",
                     node_selector={"cloud.google.com/gke-accelerator": "nvidia-l4"}, finished_job_ttl=3600,
                     env={"DEFECTOPS_WORKERS": "8"})
    validate(job)
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert {"name": "DEFECTOPS_WORKERS", "value": "8"} in container["env"]


def test_work_pool_jobs_read_the_settings_the_kustomization_generates(work_pool_template: dict[str, Any],
                                                                      kustomization: dict[str, Any]) -> None:
    job = render_job(work_pool_template)
    container = job["spec"]["template"]["spec"]["containers"][0]
    config_map = next(e["configMapRef"]["name"] for e in container["envFrom"] if "configMapRef" in e)
    generated = {g["name"]: g for g in kustomization["configMapGenerator"]}
    assert config_map in generated, f"the Jobs read ConfigMap {config_map}, which kustomization.yaml does not make"
    assert generated[config_map].get("options", {}).get("disableNameSuffixHash"), "its name must not get a hash"
    settings = dict(literal.split("=", 1) for literal in generated[config_map]["literals"])
    for key in ("DEFECTOPS_HOME", "MLFLOW_TRACKING_URI", "DEFECTOPS_DVC_REMOTE", "DEFECTOPS_DVC_REMOTE_ENDPOINT"):
        assert key in settings, f"{config_map} lacks {key}"
    home = next(m for m in container["volumeMounts"] if m["name"] == "defectops-home")
    assert settings["DEFECTOPS_HOME"] == home["mountPath"]
