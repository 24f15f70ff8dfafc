"""Where `defectops demo` takes its images from, in order: the configured source, a copy beside the project."""

from pathlib import Path

from components.config import Settings
from components.data.demo import demo_source, magnetic_tile_folder


def test_demo_takes_the_configured_source_then_the_copy_beside_the_project(tmp_path: Path):
    project = tmp_path / "defectops"
    project.mkdir()
    beside = tmp_path / "shared" / "datasets" / "magnetic-tile"
    beside.mkdir(parents=True)
    assert demo_source(Settings(project=project, home=tmp_path / "home", demo_data=None)) == str(beside)
    configured = Settings(project=project, home=tmp_path / "home", demo_data=str(tmp_path / "elsewhere"))
    assert demo_source(configured) == str(tmp_path / "elsewhere"), "DEFECTOPS_DEMO_DATA comes first"
    assert magnetic_tile_folder(configured) == tmp_path / "elsewhere"
    assert magnetic_tile_folder(Settings(project=project, home=tmp_path / "home", demo_data=None)) == beside
