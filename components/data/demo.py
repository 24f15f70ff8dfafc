"""Where the demo's images come from: the configured source, the public archive, or synthetic images."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from components.config import Settings

log = logging.getLogger(__name__)

MAGNETIC_TILE_URL = "https://github.com/abin24/Magnetic-tile-defect-datasets./archive/refs/heads/master.zip"


def _reachable(url: str) -> bool:
    import httpx

    try:
        return httpx.head(url, follow_redirects=True, timeout=10.0).status_code < 400
    except httpx.HTTPError:
        return False


def use_dataset_profile(settings: Settings, name: str) -> None:
    """Point params.yaml's data.dataset at another profile, keeping the file's comments."""
    path = settings.params_file
    text = path.read_text()
    updated = re.sub(r"(?m)^(data:\n(?:[ \t]+.*\n)*?[ \t]+dataset:[ \t]*)[\w.-]+", rf"\g<1>{name}", text, count=1)
    if updated != text:
        path.write_text(updated)
        log.warning("params.yaml: data.dataset set to %r for this data", name)


def shared_copy(settings: Settings) -> Path:
    """Where a workplace keeps its copy of Magnetic Tile beside the project (the tests look there too)."""
    return settings.project_root.parent / "shared" / "datasets" / "magnetic-tile"


def magnetic_tile_folder(settings: Settings) -> Path:
    """The Magnetic Tile folder the benchmarks read: DEFECTOPS_DEMO_DATA when set, else the shared copy."""
    return Path(settings.demo_data) if settings.demo_data else shared_copy(settings)


def demo_source(settings: Settings) -> str:
    """DEFECTOPS_DEMO_DATA when set, else a copy beside the project (`../shared/datasets/magnetic-tile`), else the
    public Magnetic Tile archive, else synthetic images (with a message)."""
    if settings.demo_data:
        return settings.demo_data
    beside = shared_copy(settings)
    if beside.is_dir():
        log.info("demo data: the Magnetic Tile copy at %s", beside)
        return str(beside)
    if _reachable(MAGNETIC_TILE_URL):
        return MAGNETIC_TILE_URL
    from components.config import load_params
    from components.data.synth import generate

    params = load_params(settings.params_file)
    out = settings.staging_dir / "synthetic-demo"
    log.warning("the public Magnetic Tile archive is unreachable (%s); using %d synthetic images instead",
                MAGNETIC_TILE_URL, params.synth.count)
    if not out.is_dir() or not any(out.iterdir()):
        generate(out, params.synth.count, params.synth.image_size, params.base.seed, params.synth.image_format,
                 progress=True)
    use_dataset_profile(settings, "synthetic")
    return str(out)
