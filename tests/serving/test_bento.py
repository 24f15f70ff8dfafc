"""The Bento as promotion builds it (`bentoml build` from bentofile.yaml, labelled with the pinned version), and
the built Bento serving that pinned model on its own code.

The Bento is what a plant deploys (a container built from it), so it must carry every module the service
imports and the params it reads, and install the package versions the tests ran with.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml
from packaging.requirements import Requirement

from tests.conftest import REPO_ROOT
from tests.serving.conftest import PROBES, free_port, probe_png, serving_env, write_project

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@dataclass
class Built:
    """A state root with a pinned tiny model, and the Bento promotion built for that record."""

    home: Path
    project: Path
    tag: str
    folder: Path
    record: Any


@pytest.fixture(scope="module")
def bento(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Built:
    """The tiny model pinned in a fresh state root, then `build_bento` (promotion's own step) for its record."""
    from components.config import Settings, load_params
    from components.serving.deployment import pin_deployment
    from components.serving.promotion import build_bento

    base = tmp_path_factory.mktemp("bento")
    project, home = write_project(base / "project"), base / "home"
    model = home / "models" / "model.pt"
    model.parent.mkdir(parents=True)
    shutil.copyfile(tiny_model, model)
    settings = Settings(project=project, home=home)
    record = pin_deployment(settings, load_params(project / "params.yaml"), str(model), deployed_by="tests",
                            images=[probe_png(kind) for kind in PROBES] * 4)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("BENTOML_HOME", raising=False)  # promotion's default: the Bento store under the state root
        tag = build_bento(settings, record)
    name, version = tag.split(":")
    return Built(home, project, tag, home / "bentoml" / "bentos" / name / version, record)


def _files(folder: Path) -> set[Path]:
    return {path.relative_to(folder) for path in folder.rglob("*") if path.is_file()}


def test_a_checkout_under_a_hidden_folder_builds_the_same_bento(bento: Built, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """`bentoml build` refuses any path with a folder starting with '.'; promotion builds from a copy there."""
    from components.config import Settings
    from components.serving import promotion

    checkout = tmp_path / ".plant" / "defectops"
    shutil.copytree(REPO_ROOT / "components", checkout / "components",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("bentofile.yaml", "params.yaml", "infra/requirements-serving.txt", "README.md"):
        (checkout / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO_ROOT / name, checkout / name)
    monkeypatch.setattr(promotion, "PACKAGE_ROOT", checkout)
    monkeypatch.delenv("BENTOML_HOME", raising=False)
    tag = promotion.build_bento(Settings(project=bento.project, home=bento.home), bento.record)
    name, version = tag.split(":")
    folder = bento.home / "bentoml" / "bentos" / name / version
    assert tag != bento.tag and _files(folder / "src") == _files(bento.folder / "src")
    assert not (folder / "src" / "README.md").exists(), "only what bentofile.yaml includes"
    labels = yaml.safe_load((folder / "bento.yaml").read_text())["labels"]
    assert labels == yaml.safe_load((bento.folder / "bento.yaml").read_text())["labels"]


def test_the_bento_holds_the_service_its_code_and_params_and_nothing_else(bento: Built) -> None:
    folder = bento.folder
    spec = yaml.safe_load((folder / "bento.yaml").read_text())
    assert spec["service"] == "components.serving.service:DefectClassifier"
    assert spec["labels"]["model_version"].startswith("file:"), spec["labels"]
    [service] = spec["services"]
    assert service["config"]["resources"] == {"gpu": 1}
    routes = {route["route"] for route in spec["schema"]["routes"]}
    assert {"/predict", "/predict_batch", "/explain"} <= routes
    src = folder / "src"
    modules = {path.relative_to(REPO_ROOT) for path in (REPO_ROOT / "components").rglob("*.py")}
    assert modules and not {m for m in modules if not (src / m).is_file()}, "modules missing from the Bento"
    assert (src / "params.yaml").read_text() == (REPO_ROOT / "params.yaml").read_text()
    assert {path.name for path in src.iterdir()} == {"bentofile.yaml", "components", "params.yaml"}
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


def test_the_built_bento_serves_the_pinned_model_on_its_own_code(bento: Built, tmp_path: Path) -> None:
    """`bentoml serve <bento tag>` as in a container: no checkout, no project, only the state root."""
    from components.serving.run import stop_background, wait_until_ready

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = serving_env(bento.project, bento.home)
    for name in ("DEFECTOPS_PROJECT", "PYTHONPATH"):  # the Bento's own code and params.yaml, nothing else
        env.pop(name)
    env["BENTOML_HOME"] = str(bento.home / "bentoml")
    port, output = free_port(), tmp_path / "bento-serve.log"
    with output.open("ab") as sink:
        process = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", bento.tag, "--host", "127.0.0.1",
                                    "--port", str(port)], cwd=elsewhere, env=env, stdout=sink,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_ready(process, f"http://127.0.0.1:{port}/readyz", output, timeout_s=180)
        response = httpx.post(f"http://127.0.0.1:{port}/predict", timeout=60,
                              files={"image": ("bright.png", probe_png("bright"), "image/png")})
        assert response.status_code == 200, response.text
        assert (response.json()["defect_type"], response.json()["decision"]) == ("dent", "reject")
        workers = psutil.Process(process.pid).children(recursive=True)
        assert workers and {Path(w.cwd()) for w in workers} == {bento.folder / "src"}, "not run from the Bento's code"
    finally:
        stop_background(process, timeout_s=15)
