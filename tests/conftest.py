"""Shared fixtures: isolated state for every test, temporary git+DVC projects, small real images, real data."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent

# Everything the libraries write goes to one throw-away folder, never to ~ (set before they are imported).
_STATE = Path(tempfile.mkdtemp(prefix="defectops-tests-"))
for var, sub in {"PREFECT_HOME": "prefect", "BENTOML_HOME": "bentoml", "TORCH_HOME": "torch",
                 "MPLCONFIGDIR": "mpl", "XDG_CACHE_HOME": "xdg-cache"}.items():
    os.environ.setdefault(var, str(_STATE / sub))
os.environ.update({"NO_ALBUMENTATIONS_UPDATE": "1", "DVC_NO_ANALYTICS": "1",
                   "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "GIT_TERMINAL_PROMPT": "0"})
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("DEFECTOPS_DVC_REMOTE", None)

TEST_CLASSES = ["dent", "normal", "scratch"]


def write_image(path: Path, seed: int, size: tuple[int, int] = (64, 48), mode: str = "RGB",
                fmt: str | None = None) -> Path:
    """A small textured image, different for every seed."""
    rng = np.random.default_rng(seed)
    base = rng.integers(60, 190)
    pixels = np.clip(base + rng.normal(0, 25, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt)
    return path


def make_imagefolder(root: Path, per_class: int = 6, classes: list[str] | None = None, seed: int = 0,
                     prefix: str = "img") -> Path:
    """An ImageFolder source with `per_class` distinct images per class."""
    for c, label in enumerate(classes or TEST_CLASSES):
        for i in range(per_class):
            write_image(root / label / f"{prefix}_{i:03d}.png", seed * 10_000 + c * 1000 + i)
    return root


def sleeping_python(folder: Path, ignores_sigterm: bool = False) -> tuple[Path, Path]:
    """(script, pidfile): a stand-in for `sys.executable` that writes its pid to `pidfile` (whole, by a rename),
    then sleeps two minutes whatever it was asked to run; with `ignores_sigterm`, as a child stuck in a long C
    call would. Tests set `sys.executable` to it to see whether the code under test stops the process it started."""
    script, pidfile = folder / "python", folder / "child.pid"
    trap = "trap '' TERM\n" if ignores_sigterm else ""
    script.write_text(f'#!/bin/sh\n{trap}echo $$ > "{pidfile}.tmp" && mv "{pidfile}.tmp" "{pidfile}"\nexec sleep 120\n')
    script.chmod(0o755)
    return script, pidfile


def alive(pid: int) -> bool:
    """Whether a process of this pid exists (a zombie counts: reap it first)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def kill_leftover(pidfile: Path) -> None:
    """SIGKILL the process `pidfile` names, if it still runs (a test's clean-up whatever its outcome)."""
    if pidfile.is_file() and alive(pid := int(pidfile.read_text())):
        os.kill(pid, signal.SIGKILL)


def git_init(folder: Path) -> None:
    subprocess.run(["git", "init", "-q", "-b", "main", str(folder)], check=True)


@pytest.fixture(autouse=True)
def _no_leaked_tracking_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    """mlflow.set_tracking_uri() exports MLFLOW_TRACKING_URI; one test's store must not become the next one's."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A fresh project (git repo with params.yaml) and state root; returns its Settings."""
    from components.config import get_settings

    root = tmp_path / "project"
    root.mkdir()
    git_init(root)
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["data"]["dataset"] = "tiny"
    params["datasets"]["tiny"] = {"normal_class": "normal", "classes": TEST_CLASSES, "grouping": {"rule": "image"}}
    params["validate"]["min_images_per_class"] = 3
    params["validate"]["max_class_shift_kl"] = 0.5
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # mlflow.set_tracking_uri() exports MLFLOW_TRACKING_URI: never let one test's store leak into the next
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DEFECTOPS_PROJECT", str(root))
    monkeypatch.setenv("DEFECTOPS_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    return get_settings()


@pytest.fixture(scope="session")
def magnetic_tile() -> Iterator[Path]:
    """The real Magnetic Tile images; a skip here, but a failure in CI where they must be present."""
    configured = os.environ.get("DEFECTOPS_DEMO_DATA")
    path = Path(configured) if configured else REPO_ROOT.parent / "shared" / "datasets" / "magnetic-tile"
    if not (path / "MT_Free").is_dir():
        message = f"Magnetic Tile images not found at {path} (set DEFECTOPS_DEMO_DATA)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    yield path


S3_KEYS = {"AWS_ACCESS_KEY_ID": "defectops-test", "AWS_SECRET_ACCESS_KEY": "defectops-test-secret",
           "AWS_DEFAULT_REGION": "us-east-1"}


@contextmanager
def s3_server(*buckets: str) -> Iterator[tuple[str, object]]:
    """An S3 protocol server (moto's) on 127.0.0.1 standing in for infra/'s MinIO: its endpoint and a boto3
    client (keys S3_KEYS) after making `buckets`."""
    import boto3
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=S3_KEYS["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=S3_KEYS["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
        for bucket in buckets:
            client.create_bucket(Bucket=bucket)
        yield endpoint, client
    finally:
        server.stop()
