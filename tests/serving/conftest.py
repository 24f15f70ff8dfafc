"""Serving fixtures: a tiny model with known answers, a project with a deployment record, one real server."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import REPO_ROOT, TEST_CLASSES, git_init

IMAGE_SIZE = 64
THRESHOLD = 0.8
# probe image -> (expected top-1 class, expected decision) for the crafted model below
PROBES = {"dark": ("normal", "accept"), "bright": ("dent", "reject"), "mixed": (None, "review")}
SERVE_PARAMS = {
    "port": 3000,
    "batching": {"cpu": {"max_batch_size": 4, "max_latency_ms": 60_000},
                 "cuda": {"max_batch_size": 8, "max_latency_ms": 2_000}},
    "fast_path": "onnxruntime",
    "parity": {"min_top1_agreement": 0.995, "max_prob_diff": 0.05, "images": 20},
    "audit_sample_rate": 1.0,
    "log_retention_days": 30,
    "review_retention_days": 30,
    "max_upload_bytes": 3_000_000,
    "max_batch_images": 8,
    "max_batch_pixels": 1_000_000,  # the smallest allowed: two frames of 0.6 MP are over it
    "log_queue_size": 1000,
}
MAX_PIXELS = 1_000_000


def probe_rgb(kind: str) -> np.ndarray:
    """The (64, 64, 3) probe images the tiny model was fitted to."""
    rng = np.random.default_rng({"dark": 1, "bright": 2, "mixed": 3}[kind])
    base = {"dark": 40, "bright": 215, "mixed": 128}[kind]
    pixels = np.clip(base + rng.normal(0, 20, (IMAGE_SIZE, IMAGE_SIZE, 3)), 0, 255).astype(np.uint8)
    if kind == "mixed":
        pixels[16:48, 16:48] = 255 - pixels[16:48, 16:48]
    return pixels


def probe_png(kind: str) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(probe_rgb(kind)).save(buffer, format="PNG")
    return buffer.getvalue()


def make_tiny_model(path: Path, threshold: float = THRESHOLD, seed: int = 0) -> Path:
    """A resnet18 at 64 px with random features and a head fitted so the probes give accept, reject, review."""
    import torch

    from components.training.models import build_model
    from components.training.train import model_meta, save_model_file
    from components.training.transforms import preprocess

    torch.manual_seed(seed)
    model, _ = build_model("resnet18", len(TEST_CLASSES), dropout=0.0, hidden=64, weights=None)
    model.eval()
    batch = torch.stack([preprocess(probe_rgb(kind), IMAGE_SIZE) for kind in PROBES])
    with torch.inference_mode():
        _, embedding = model.forward_with_embedding(batch)
    dent, normal = TEST_CLASSES.index("dent"), TEST_CLASSES.index("normal")
    targets = np.zeros((3, len(TEST_CLASSES)))
    targets[0, normal] = 6.0  # dark -> normal, p ~ 0.995 -> accept
    targets[1, dent] = 6.0  # bright -> dent -> reject
    targets[2] = [0.3, 0.2, 0.0]  # mixed -> p ~ 0.38 -> review
    design = np.hstack([embedding.numpy(), np.ones((3, 1))])
    solution = np.linalg.pinv(design) @ targets
    head = model.classifier[-1]
    with torch.no_grad():
        head.weight.copy_(torch.tensor(solution[:-1].T, dtype=torch.float32))
        head.bias.copy_(torch.tensor(solution[-1], dtype=torch.float32))
    meta = model_meta(model, TEST_CLASSES, "normal", IMAGE_SIZE, created_at="2025-01-01T00:00:00+00:00",
                      calibration={"temperature": 1.0, "threshold": threshold})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model_file(path, model, model.state_dict(), meta)
    return path


async def until(check: Callable[[], bool], timeout: float = 10.0, what: str = "the condition") -> None:
    """Poll `check` every 10 ms until it holds (a thread of the code under test got there); fail after `timeout`:
    no fixed sleep that a loaded machine can outlast."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not hold within {timeout:.0f} s")
        await asyncio.sleep(0.01)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serving_env(project_root: Path, home: Path) -> dict[str, str]:
    """Environment of a serving subprocess: this project and state root, caches in the test state folder."""
    env = dict(os.environ)
    env.update({"DEFECTOPS_PROJECT": str(project_root), "DEFECTOPS_HOME": str(home),
                "HOME": str(home / "user-home"), "PYTHONPATH": str(REPO_ROOT),
                "BENTOML_DO_NOT_TRACK": "true", "OPENVINO_TELEMETRY_DISABLED": "1"})
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def write_project(root: Path, serve: dict | None = None) -> Path:
    """A project folder (git repo with params.yaml: the tiny dataset profile and a `serve` section)."""
    root.mkdir(parents=True, exist_ok=True)
    if not (root / ".git").exists():
        git_init(root)
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["data"]["dataset"] = "tiny"
    params["data"]["max_image_pixels"] = MAX_PIXELS
    params["datasets"]["tiny"] = {"normal_class": "normal", "classes": TEST_CLASSES, "grouping": {"rule": "image"}}
    params["validate"]["min_images_per_class"] = 3
    params["validate"]["max_class_shift_kl"] = 0.5
    params["serve"] = serve or SERVE_PARAMS
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / "pyproject.toml").write_text("[project]\nname = 'plant'\n")
    return root


APPROVED = {"approval_status": "approved", "approved_by": "qa", "approved_at": "2026-11-23T08:00:00+00:00"}


def register_model_file(settings, model_file: Path, tags: dict[str, str]) -> str:
    """Log a model file to MLflow as the registry does (pickle flavour) and register a version with `tags`."""
    import mlflow

    from components.registry.tracking import MODEL_NAME, connect
    from components.training.train import load_model_file

    connect(settings)
    model, meta = load_model_file(model_file)
    with mlflow.start_run():
        info = mlflow.pytorch.log_model(model, name="model", serialization_format="pickle",
                                        pip_requirements=["torch"], metadata={"defectops": meta})
    return str(mlflow.register_model(info.model_uri, MODEL_NAME, tags=tags).version)


def write_probe_images(settings) -> None:
    """The tracked images parity is checked on: the probes, under data/images/<class>/."""
    for i, kind in enumerate(PROBES):
        image = settings.data_dir / "images" / ("normal" if kind == "dark" else "dent") / f"{kind}-{i}.png"
        image.parent.mkdir(parents=True, exist_ok=True)
        image.write_bytes(probe_png(kind))


@dataclass
class Server:
    """A running `defectops serve` (bentoml serve) and where it writes."""

    url: str
    home: Path
    project: Path
    process: subprocess.Popen
    output: Path

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def settings(self):
        from components.config import Settings

        return Settings(project=self.project, home=self.home)

    def log_text(self) -> str:
        return self.output.read_text(errors="replace")


def start_server(project: Path, home: Path, port: int, timeout: float = 120.0) -> Server:
    """`defectops serve --port N` in its own session (components.serving.run); returns once /readyz is 200."""
    from components.config import Settings
    from components.serving.run import start_in_background

    output = home / f"serve-{port}.log"
    process = start_in_background(Settings(project=project, home=home), port, output, timeout,
                                  env=serving_env(project, home))
    return Server(f"http://127.0.0.1:{port}", home, project, process, output)


def stop_server(server: Server) -> None:
    """SIGTERM the service; whatever is left of it (workers run in sessions of their own) is killed after 15 s."""
    from components.serving.run import stop_background

    stop_background(server.process, timeout_s=15, port=server.port)


def kill_server(server: Server) -> None:
    """kill -9 the whole service: `bentoml serve` and its workers (which BentoML starts in sessions of their own)."""
    import psutil

    try:
        processes = [psutil.Process(server.process.pid)]
        processes += processes[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(processes, timeout=10)
    server.process.wait(10)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-model") / "model.pt")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Server]:
    """One real service for the module: the tiny model pinned in a deployment record, on 127.0.0.1."""
    from components.config import Settings, load_params
    from components.serving.deployment import pin_deployment

    base = tmp_path_factory.mktemp("serving")
    project, home = write_project(base / "project"), base / "home"
    model = home / "models" / "model.pt"
    model.parent.mkdir(parents=True)
    shutil.copyfile(tiny_model, model)
    settings = Settings(project=project, home=home)
    params = load_params(project / "params.yaml")
    images = [probe_png(kind) for kind in PROBES] * 4
    pin_deployment(settings, params, str(model), deployed_by="tests", images=images)
    running = start_server(project, home, free_port())
    yield running
    stop_server(running)


@pytest.fixture
def plant(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A project with the serving params and an empty state root (no record, empty MLflow) in the environment."""
    from components.config import Settings

    project = write_project(tmp_path / "project")
    home = tmp_path / "home"
    for name, value in (("DEFECTOPS_PROJECT", project), ("DEFECTOPS_HOME", home), ("BENTOML_HOME", home / "bentoml")):
        monkeypatch.setenv(name, str(value))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return Settings(project=project, home=home)
