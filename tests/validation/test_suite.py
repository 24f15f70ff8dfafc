"""Data tests on real image files: the GX suite passes a clean set and names the file behind each failure."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from components.config import DatasetProfile, GroupingParams, SplitParams, ValidateParams
from components.data.layout import discover
from components.errors import UsageError
from components.validation.manifest import build_manifest
from components.validation.suite import ValidationReport, class_shares, validate_manifest

PROFILE = DatasetProfile(normal_class="Free", classes=["Crack", "Free"])
RULES = ValidateParams(min_images_per_class=3)
CLEAN_COUNTS = {"Crack": 4, "Free": 6}


def _noise_image(seed: int, size: int = 48) -> Image.Image:
    """A mid-grey noisy RGB image: brightness, contrast and sharpness well inside the default ranges."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(60, 200, (size, size, 3), dtype=np.uint8), "RGB")


def _jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def clean_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clean ImageFolder set (Crack: 4, Free: 6), PNG and JPEG mixed, every image distinct."""
    root = tmp_path_factory.mktemp("clean")
    seed = 0
    for label, count in CLEAN_COUNTS.items():
        (root / label).mkdir()
        for i in range(count):
            seed += 1
            image = _noise_image(seed)
            if i % 2:
                (root / label / f"{label.lower()}_{i}.jpg").write_bytes(_jpeg_bytes(image))
            else:
                image.save(root / label / f"{label.lower()}_{i}.png")
    return root


def _variant(clean_root: Path, tmp_path: Path, files: dict[str, bytes]) -> Path:
    """A copy of the clean set with extra files (relative path -> content)."""
    root = tmp_path / "data"
    shutil.copytree(clean_root, root)
    for relpath, content in files.items():
        (root / relpath).parent.mkdir(parents=True, exist_ok=True)
        (root / relpath).write_bytes(content)
    return root


def _manifest(root: Path) -> pd.DataFrame:
    _, items = discover(root)
    return build_manifest(items, GroupingParams(), SplitParams(), seed=0, max_pixels=40_000_000, workers=1)


def _only_failure(report: ValidationReport) -> str:
    assert not report.success
    assert len(report.failures) == 1, report.summary()
    return report.failures[0]


@pytest.fixture(scope="module")
def clean_manifest(clean_root: Path) -> pd.DataFrame:
    return _manifest(clean_root)


def test_clean_set_passes(clean_manifest: pd.DataFrame) -> None:
    report = validate_manifest(clean_manifest, PROFILE, RULES, previous_shares=class_shares(clean_manifest))
    assert report.success, report.summary()
    assert report.failures == []
    stats = report.statistics
    assert stats["evaluated_expectations"] == stats["successful_expectations"] >= 10
    assert stats["unsuccessful_expectations"] == 0
    assert report.summary().startswith("Dataset validation passed")
    json.dumps(report.result)


def test_class_shares(clean_manifest: pd.DataFrame) -> None:
    assert class_shares(clean_manifest) == pytest.approx({"Crack": 0.4, "Free": 0.6})


def test_truncated_jpeg_is_named_once(clean_root: Path, tmp_path: Path) -> None:
    whole = _jpeg_bytes(_noise_image(100, size=256))
    root = _variant(clean_root, tmp_path, {"Crack/truncated.jpg": whole[: len(whole) // 2]})
    line = _only_failure(validate_manifest(_manifest(root), PROFILE, RULES))
    assert "images/Crack/truncated.jpg: corrupt or truncated image" in line


def test_zero_byte_file(clean_root: Path, tmp_path: Path) -> None:
    root = _variant(clean_root, tmp_path, {"Free/empty.jpg": b""})
    line = _only_failure(validate_manifest(_manifest(root), PROFILE, RULES))
    assert "images/Free/empty.jpg: empty file (0 bytes)" in line


def test_text_file_named_jpg(clean_root: Path, tmp_path: Path) -> None:
    root = _variant(clean_root, tmp_path, {"Crack/notes.jpg": b"operator notes: camera 3 re-aligned\n"})
    line = _only_failure(validate_manifest(_manifest(root), PROFILE, RULES))
    assert "images/Crack/notes.jpg: not an image" in line


def test_unknown_class_folder(clean_root: Path, tmp_path: Path) -> None:
    buffer = io.BytesIO()
    _noise_image(200).save(buffer, format="PNG")
    root = _variant(clean_root, tmp_path, {"Rust/rust_0.png": buffer.getvalue()})
    line = _only_failure(validate_manifest(_manifest(root), PROFILE, RULES))
    assert "classes not in the profile ['Rust']" in line
    assert "images/Rust/rust_0.png" in line


def test_too_few_images_in_a_class(clean_manifest: pd.DataFrame) -> None:
    rules = RULES.model_copy(update={"min_images_per_class": 5})
    line = _only_failure(validate_manifest(clean_manifest, PROFILE, rules))
    assert "fewer than 5 readable images" in line
    assert "Crack 4" in line and "Free" not in line


def test_expected_class_without_images_fails(clean_manifest: pd.DataFrame) -> None:
    profile = DatasetProfile(normal_class="Free", classes=["Crack", "Dent", "Free"])
    report = validate_manifest(clean_manifest, profile, RULES)
    assert not report.success
    assert any("Dent 0" in line for line in report.failures), report.summary()
    assert any(line.startswith("no images of ['Dent']") for line in report.failures), report.summary()


def test_same_image_in_two_classes_is_a_label_conflict(clean_root: Path, tmp_path: Path) -> None:
    root = _variant(clean_root, tmp_path, {"Free/copy.png": (clean_root / "Crack/crack_0.png").read_bytes()})
    line = _only_failure(validate_manifest(_manifest(root), PROFILE, RULES))
    assert "label conflict: images/Crack/crack_0.png (Crack) = images/Free/copy.png (Free)" in line


def test_duplicate_kinds_split_leak_and_plain_duplicate(clean_root: Path, tmp_path: Path) -> None:
    root = _variant(clean_root, tmp_path, {"Free/copy.png": (clean_root / "Free/free_0.png").read_bytes()})
    manifest = _manifest(root)
    pair = manifest["path"].isin(["images/Free/free_0.png", "images/Free/copy.png"])
    manifest.loc[pair, "split"] = ["train", "test"]
    line = _only_failure(validate_manifest(manifest, PROFILE, RULES))
    assert "split leak: " in line and "images/Free/copy.png (" in line and "images/Free/free_0.png (" in line
    manifest.loc[pair, "split"] = "train"
    line = _only_failure(validate_manifest(manifest, PROFILE, RULES))
    assert "duplicate: " in line and "images/Free/copy.png" in line


def test_brightness_out_of_range(clean_root: Path, tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (48, 48), (2, 2, 2)).save(buffer, format="PNG")  # too dark, and flat
    root = _variant(clean_root, tmp_path, {"Crack/dark.png": buffer.getvalue()})
    report = validate_manifest(_manifest(root), PROFILE, RULES)
    assert not report.success
    brightness = [line for line in report.failures if line.startswith("brightness outside [5, 250]")]
    assert len(brightness) == 1, report.summary()
    assert "images/Crack/dark.png (2)" in brightness[0]


def test_an_imports_own_pictures_are_held_to_mostly_among_themselves(clean_root: Path, tmp_path: Path) -> None:
    """Two dark pictures beside ten good ones are within brightness's `mostly` (0.8 here: 2 of 12 are 17%), but
    as an import's whole batch they are all out of range: judged among the new rows, the import is refused."""
    from components.config import Range
    from components.validation.suite import NEW

    def dark(level: int) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (48, 48), (level, level, level)).save(buffer, format="PNG")
        return buffer.getvalue()

    root = _variant(clean_root, tmp_path, {"Crack/dark.png": dark(2), "Free/dark.png": dark(3)})
    rules = RULES.model_copy(update={"brightness": Range(min=5, max=250, mostly=0.8),
                                     "contrast": Range(min=0, max=200), "sharpness": Range()})  # flat: only dark
    manifest = _manifest(root)
    assert validate_manifest(manifest, PROFILE, rules).success, "diluted by the old rows, as before"
    batch = manifest.assign(**{NEW: manifest["path"].str.endswith("dark.png")})
    report = validate_manifest(batch, PROFILE, rules)
    assert not report.success
    [line] = [line for line in report.failures if line.startswith("brightness")]
    assert "in 2 of 2 readable images" in line and "images/Crack/dark.png (2)" in line


def test_class_proportions_shifted(clean_manifest: pd.DataFrame) -> None:
    line = _only_failure(validate_manifest(clean_manifest, PROFILE, RULES,
                                           previous_shares={"Crack": 0.9, "Free": 0.1}))
    assert "class proportions moved" in line and "> 0.1 (validate.max_class_shift_kl)" in line
    assert "Free 60.0% (was 10.0%)" in line


def test_class_new_since_previous_version_is_an_infinite_shift(clean_manifest: pd.DataFrame) -> None:
    line = _only_failure(validate_manifest(clean_manifest, PROFILE, RULES, previous_shares={"Free": 1.0}))
    assert "KL divergence infinite (['Crack'] had no images before)" in line


def test_report_files_are_written_and_nothing_else(clean_root: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    root = _variant(clean_root, tmp_path, {"Free/empty.jpg": b""})
    manifest = _manifest(root)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    report_dir = tmp_path / "report"
    report = validate_manifest(manifest, PROFILE, RULES, report_dir=report_dir)
    assert sorted(p.name for p in report_dir.iterdir()) == ["data_docs", "validation.json"]
    saved = json.loads((report_dir / "validation.json").read_text())
    assert saved["success"] is False and saved["statistics"] == report.statistics
    assert saved["failures"] == report.failures
    index = report_dir / "data_docs" / "index.html"
    assert index.is_file() and "manifest" in index.read_text()
    assert list((report_dir / "data_docs" / "validations").rglob("*.html"))
    assert list(work.iterdir()) == []
    assert str(report_dir / "validation.json") in report.summary()


def test_manifest_without_required_columns_is_refused(clean_manifest: pd.DataFrame) -> None:
    with pytest.raises(UsageError, match=r"lacks the columns \['sha256'\]"):
        validate_manifest(clean_manifest.drop(columns=["sha256"]), PROFILE, RULES)


def test_a_missing_or_unknown_split_is_named(clean_manifest: pd.DataFrame) -> None:
    manifest = clean_manifest.copy()
    blank, typo = manifest["path"].iloc[0], manifest["path"].iloc[1]
    manifest.loc[0, "split"], manifest.loc[1, "split"] = None, "tset"
    report = validate_manifest(manifest, PROFILE, RULES)
    assert not report.success and len(report.failures) == 2, report.summary()
    missing, unknown = report.failures
    assert f"1 file without a split: {blank};" in missing, missing
    assert f"1 file with a split not in ['train', 'val', 'test']: {typo} (tset);" in unknown, unknown
    assert all("splits.csv" in line for line in report.failures)


def test_a_capture_group_in_two_splits_is_named(clean_manifest: pd.DataFrame) -> None:
    """New images that fall between two committed capture groups join them into one group whose committed
    images sit in train and in test: the same spot trained on and scored."""
    manifest = clean_manifest.copy()
    train, test = (manifest.index[manifest["split"] == name][0] for name in ("train", "test"))
    manifest.loc[[train, test], "group"] = "Crack/capture-5000"
    report = validate_manifest(manifest, PROFILE, RULES)
    assert not report.success and len(report.failures) == 1, report.summary()
    [line] = report.failures
    assert line.startswith("2 files in capture groups that span two splits, so one spot would be trained on and "
                           f"scored: {manifest.loc[train, 'path']} (Crack/capture-5000: train)"), line
    assert line.endswith("move the group's images into one split in splits.csv")
