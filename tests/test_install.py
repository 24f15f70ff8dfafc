"""After a clean install (`uv sync --frozen`), every tool of the stack imports at its pinned version."""

from __future__ import annotations

import importlib
import subprocess
import sys
from importlib.metadata import version

import pytest

PINNED = {"torch": "2.13.0", "torchvision": "0.28.0", "albumentations": "2.0.8", "prefect": "3.8.8",
          "mlflow": "3.17.2", "dvc": "3.67.1", "great-expectations": "1.24.1", "evidently": "0.7.23",
          "bentoml": "1.4.39"}
MODULES = ["torch", "torchvision", "albumentations", "prefect", "mlflow", "dvc.repo", "great_expectations",
           "evidently", "bentoml", "cv2", "components.cli", "flows.data_flow"]


@pytest.mark.parametrize(("dist", "pinned"), sorted(PINNED.items()))
def test_pinned_versions(dist: str, pinned: str) -> None:
    assert version(dist).split("+")[0] == pinned


def test_compatibility_pins() -> None:
    assert int(version("pandas").split(".")[0]) < 3
    assert tuple(map(int, version("fastapi").split(".")[:2])) < (0, 151)
    assert tuple(map(int, version("sqlalchemy").split(".")[:2])) < (2, 1)


@pytest.mark.parametrize("module", MODULES)
def test_imports(module: str) -> None:
    importlib.import_module(module)


def test_console_script_answers() -> None:
    result = subprocess.run(check=False, args=[sys.executable, "-m", "components.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "data" in result.stdout
