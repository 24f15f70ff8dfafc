"""The synthetic part generator: exact, deterministic, decodable, and each defect really drawn."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from components.config import load_params
from components.data.images import decode
from components.data.layout import discover
from components.data.synth import (
    MARKER_FILE,
    NORMAL_CLASS,
    SYNTH_CLASSES,
    class_counts,
    generate,
    render_part,
)
from components.errors import UsageError

REPO_ROOT = Path(__file__).resolve().parents[2]
COUNT, SIZE = 40, 64


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith(".")}


@pytest.fixture(scope="module")
def synth_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small set, made once for the module with two worker processes."""
    out = tmp_path_factory.mktemp("synth") / "set"
    generate(out, COUNT, size=SIZE, seed=7, workers=2)
    return out


def test_classes_match_params() -> None:
    params = load_params(REPO_ROOT / "params.yaml")
    assert list(SYNTH_CLASSES) == params.datasets["synthetic"].classes
    assert list(SYNTH_CLASSES) == sorted(SYNTH_CLASSES)
    assert params.datasets["synthetic"].normal_class == NORMAL_CLASS


def test_counts_are_exact_with_normal_the_majority() -> None:
    for count in (1, 8, 40, 801, 50_000):
        counts = class_counts(count, 0.5)
        assert sum(counts.values()) == count
        defects = [n for name, n in counts.items() if name != NORMAL_CLASS]
        assert max(defects) - min(defects) <= 1
    assert class_counts(800)[NORMAL_CLASS] == 400
    assert class_counts(100, 0.65)[NORMAL_CLASS] == 65


def test_layout_and_counts_on_disk(synth_set: Path) -> None:
    expected = class_counts(COUNT)
    folders = sorted(p.name for p in synth_set.iterdir() if p.is_dir())
    assert folders == list(SYNTH_CLASSES)
    for label, n in expected.items():
        files = sorted((synth_set / label).iterdir())
        assert len(files) == n
        assert all(f.name.startswith(f"{label}_") and f.suffix == ".jpg" and len(f.stem) == len(label) + 7
                   for f in files)
    layout, items = discover(synth_set)
    assert layout == "imagefolder" and len(items) == COUNT


def test_images_decode_at_requested_size(synth_set: Path) -> None:
    for path in sorted(synth_set.rglob("*.jpg"))[:10]:
        image = decode(path)
        assert (image.width, image.height, image.mode) == (SIZE, SIZE, "RGB")
        assert image.rgb.shape == (SIZE, SIZE, 3)
        assert 5 < image.rgb.mean() < 250


def test_same_seed_gives_identical_files_on_any_worker_count(synth_set: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    generate(again, COUNT, size=SIZE, seed=7, workers=1)
    assert _hashes(again) == _hashes(synth_set)


def test_other_seed_gives_other_images(synth_set: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    generate(other, COUNT, size=SIZE, seed=8, workers=1)
    first, second = _hashes(synth_set), _hashes(other)
    assert set(first.values()).isdisjoint(second.values())


def test_png_output(tmp_path: Path) -> None:
    summary = generate(tmp_path / "png", 9, size=48, image_format="png", workers=1)
    files = sorted((tmp_path / "png").rglob("*.png"))
    assert len(files) == 9 == sum(summary.counts.values())
    assert decode(files[0]).rgb.shape == (48, 48, 3)


def test_each_defect_changes_the_same_part() -> None:
    for index in range(6):
        normal = render_part(3, index, NORMAL_CLASS, 96).astype(np.int16)
        for label in SYNTH_CLASSES:
            if label == NORMAL_CLASS:
                continue
            diff = np.abs(render_part(3, index, label, 96).astype(np.int16) - normal)
            assert diff.mean() > 0, f"{label} image {index} is identical to the normal one"
            assert diff.max() >= 40, f"{label} image {index} differs by at most {diff.max()} grey levels"


def test_rerun_resumes_an_interrupted_set(synth_set: Path, tmp_path: Path) -> None:
    out = tmp_path / "resumed"
    generate(out, COUNT, size=SIZE, seed=7, workers=1)
    victims = sorted(out.rglob("*.jpg"))[::5]
    for victim in victims:
        victim.unlink()
    (out / "dent" / ".dent_000001.jpg.123.tmp").write_bytes(b"partial")
    summary = generate(out, COUNT, size=SIZE, seed=7, workers=1)
    assert summary.reused == COUNT - len(victims)
    assert _hashes(out) == _hashes(synth_set)
    assert not list(out.rglob("*.tmp"))


def test_refuses_a_folder_of_another_run(synth_set: Path, tmp_path: Path) -> None:
    out = tmp_path / "set"
    generate(out, 16, size=SIZE, seed=1, workers=1)
    assert (out / MARKER_FILE).is_file()
    with pytest.raises(UsageError, match="other settings.*seed=1"):
        generate(out, 16, size=SIZE, seed=2, workers=1)
    (out / "normal" / "stray.jpg").write_bytes(b"x")
    with pytest.raises(UsageError, match="stray.jpg"):
        generate(out, 16, size=SIZE, seed=1, workers=1)


def test_refuses_a_folder_with_foreign_files(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="not empty"):
        generate(tmp_path, 8, size=SIZE, workers=1)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert sum(generate(empty, 8, size=SIZE, workers=1).counts.values()) == 8


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"count": 0}, "at least one image"),
    ({"size": 16}, "at least 32"),
    ({"image_format": "gif"}, "use 'jpg' or 'png'"),
    ({"normal_share": 1.5}, "between 0 and 1"),
])
def test_bad_arguments_are_usage_errors(tmp_path: Path, kwargs: dict, message: str) -> None:
    args = {"count": 8, "size": SIZE, **kwargs}
    with pytest.raises(UsageError, match=message):
        generate(tmp_path / "bad", workers=1, **args)
    assert not (tmp_path / "bad").exists()
