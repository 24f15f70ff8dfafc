"""The Bento: `bentoml build` from bentofile.yaml, and the built Bento serving a pinned model on its own code.

The Bento is what a plant deploys (a container built from it), so it must carry every module the service
imports and the params it reads, and install the package versions the tests ran with.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import httpx
import psutil
import pytest
import yaml
from packaging.requirements import Requirement

from tests.conftest import REPO_ROOT
from tests.serving.conftest import PROBES, free_port, probe_png, serving_env, write_project

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BENTO = "defect_classifier"


@pytest.fixture(scope="module")
def bento(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(BENTOML_HOME, the built Bento's folder) after a real `bentoml build` of this checkout."""
    store = tmp_path_factory.mktemp("bento-store")
    env = dict(os.environ, BENTOML_HOME=str(store), BENTOML_DO_NOT_TRACK="true")
    built = subprocess.run([sys.executable, "-m", "bentoml", "build", "--output", "tag"], cwd=REPO_ROOT, env=env,
                           capture_output=True, text=True, timeout=300, check=False)
    assert built.returncode == 0, built.stdout + built.stderr
    [folder] = [p for p in (store / "bentos" / BENTO).iterdir() if p.is_dir() and p.name != "latest"]
    return store, folder


def test_the_bento_holds_the_service_its_code_and_params_and_nothing_else(bento) -> None:
    _, folder = bento
    spec = yaml.safe_load((folder / "bento.yaml").read_text())
    assert spec["service"] == "components.serving.service:DefectClassifier"
    [service] = spec["services"]
    assert service["config"]["resources"] == {"gpu": 1}
    routes = {route["route"] for route in spec["schema"]["routes"]}
    assert {"/predict", "/predict_batch", "/explain"} <= routes
    src = folder / "src"
    modules = {path.relative_to(REPO_ROOT) for path in (REPO_ROOT / "components").rglob("*.py")}
    assert modules and not {m for m in modules if not (src / m).is_file()}, "modules missing from the Bento"
    assert (src / "params.yaml").read_text() == (REPO_ROOT / "params.yaml").read_text()
    for left_out in ("tests", "data", ".defectops", "flows", "benchmarks"):
        assert not (src / left_out).exists(), left_out
    assert not list(src.rglob("__pycache__"))
    requirements = (folder / "env" / "python" / "requirements.txt").read_text()
    assert "torch==2.13.0" in requirements and "bentoml==" in requirements


def test_the_bento_installs_the_versions_the_tests_ran_with() -> None:
    """infra/requirements-serving.txt (the Bento's environment): every package pinned to this environment's
    (uv.lock's) version, so a Bento built later does not pick up releases nobody tested."""
    mismatched = []
    for line in (REPO_ROOT / "infra" / "requirements-serving.txt").read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        requirement = Requirement(line)
        installed = metadata.version(requirement.name)
        if str(requirement.specifier) != f"=={installed}":
            mismatched.append(f"{requirement} (installed {installed})")
    assert not mismatched, "serving requirements not pinned to the uv.lock versions: " + ", ".join(mismatched)


def test_the_built_bento_serves_the_pinned_model_on_its_own_code(bento, tiny_model: Path,
                                                                tmp_path: Path) -> None:
    """`bentoml serve <bento tag>` as in a container: no checkout, no project, only the state root."""
    from components.config import Settings, load_params
    from components.serving.deployment import pin_deployment
    from components.serving.run import stop_background, wait_until_ready

    store, folder = bento
    project, home = write_project(tmp_path / "project"), tmp_path / "home"
    model = home / "models" / "model.pt"
    model.parent.mkdir(parents=True)
    shutil.copyfile(tiny_model, model)
    pin_deployment(Settings(project=project, home=home), load_params(project / "params.yaml"), str(model),
                   deployed_by="tests", images=[probe_png(kind) for kind in PROBES] * 4)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = serving_env(project, home)
    for name in ("DEFECTOPS_PROJECT", "PYTHONPATH"):  # the Bento's own code and params.yaml, nothing else
        env.pop(name)
    env["BENTOML_HOME"] = str(store)
    port, output = free_port(), tmp_path / "bento-serve.log"
    with output.open("ab") as sink:
        process = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", f"{BENTO}:{folder.name}", "--host",
                                    "127.0.0.1", "--port", str(port)], cwd=elsewhere, env=env, stdout=sink,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_ready(process, f"http://127.0.0.1:{port}/readyz", output, timeout_s=180)
        response = httpx.post(f"http://127.0.0.1:{port}/predict", timeout=60,
                              files={"image": ("bright.png", probe_png("bright"), "image/png")})
        assert response.status_code == 200, response.text
        assert (response.json()["defect_type"], response.json()["decision"]) == ("dent", "reject")
        workers = psutil.Process(process.pid).children(recursive=True)
        assert workers and {Path(w.cwd()) for w in workers} == {folder / "src"}, "not run from the Bento's code"
    finally:
        stop_background(process, timeout_s=15)
