"""The review queue: what is kept, and verdicts turned into a dataset version through the ordinary import."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from components.config import load_params
from components.data.importer import import_data
from components.errors import UsageError
from components.serving.predlog import BackgroundWriter
from components.serving.review import (
    ReviewQueue,
    audit_sampled,
    build_staging,
    image_suffix,
    import_reviewed,
    pending_items,
    verdicts_from_csv,
    verdicts_from_folder,
)
from tests.conftest import make_imagefolder, write_image


def _fill_queue(folder: Path, sources: list[Path]) -> list[str]:
    writer = BackgroundWriter()
    queue = ReviewQueue(folder, writer, retention_days=30, audit_rate=0.0)
    ids = []
    for i, source in enumerate(sources):
        request_id = f"req{i:03d}"
        item = {"timestamp": datetime.now(UTC).isoformat(), "request_id": request_id, "decision": "review",
                "reason": "review", "defect_type": "dent", "confidence": 0.41}
        assert queue.keep(request_id, source.read_bytes(), source.suffix, item)
        ids.append(request_id)
    assert writer.flush()
    writer.close()
    return ids


def test_audit_sample_is_a_stable_share_of_requests() -> None:
    ids = [f"{i:032x}" for i in range(20_000)]
    share = sum(audit_sampled(i, 0.01) for i in ids) / len(ids)
    assert 0.007 < share < 0.013
    assert [audit_sampled(i, 0.01) for i in ids[:50]] == [audit_sampled(i, 0.01) for i in ids[:50]]
    assert not any(audit_sampled(i, 0.0) for i in ids[:100]) and all(audit_sampled(i, 1.0) for i in ids[:100])


def test_image_suffix_keeps_the_upload_or_sniffs_it() -> None:
    assert image_suffix(b"\x89PNG....", ".JPG") == ".jpg"
    assert image_suffix(b"\x89PNG....", "") == ".png" and image_suffix(b"\xff\xd8\xff\xe0", ".bin") == ".jpg"


def test_verdicts_from_csv_and_folder_build_a_staging_imagefolder(project, tmp_path: Path) -> None:
    sources = [write_image(tmp_path / "cam" / f"p{i}.png", seed=i) for i in range(3)]
    ids = _fill_queue(project.review_queue_dir, sources)
    assert [i.request_id for i in pending_items(project.review_queue_dir)] == ids
    labels = tmp_path / "labels.csv"
    first = pending_items(project.review_queue_dir)[0].image_path.relative_to(project.review_queue_dir)
    labels.write_text(f"file,label\n{first.as_posix()},dent\n{ids[1]},normal\n{ids[2]}.png,scratch\n")
    verdicts = verdicts_from_csv(project, labels)
    assert [label for _, label in verdicts] == ["dent", "normal", "scratch"]
    params = load_params(project.params_file)
    staging = build_staging(project, params, verdicts)
    assert sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*.png")) == [
        f"dent/review-{ids[0]}.png", f"normal/review-{ids[1]}.png", f"scratch/review-{ids[2]}.png"]

    sorted_dir = tmp_path / "sorted"
    (sorted_dir / "scratch").mkdir(parents=True)
    (sorted_dir / "scratch" / f"{ids[0]}.png").write_bytes(sources[0].read_bytes())
    assert [(getattr(s, "request_id", None), lab) for s, lab in verdicts_from_folder(project, sorted_dir)] == \
        [(ids[0], "scratch")]


def test_bad_verdicts_are_usage_errors(project, tmp_path: Path) -> None:
    _fill_queue(project.review_queue_dir, [write_image(tmp_path / "p.png", seed=1)])
    params = load_params(project.params_file)
    labels = tmp_path / "labels.csv"
    labels.write_text("file,label\nreq000,rust\n")
    with pytest.raises(UsageError, match=r"unknown labels \['rust'\]"):
        build_staging(project, params, verdicts_from_csv(project, labels))
    labels.write_text("file,label\nno-such-item,dent\n")
    with pytest.raises(UsageError, match="not a pending review item"):
        verdicts_from_csv(project, labels)
    labels.write_text("name,class\nreq000,dent\n")
    with pytest.raises(UsageError, match="columns file,label"):
        verdicts_from_csv(project, labels)
    with pytest.raises(UsageError, match="exactly one of"):
        import_reviewed(project, params)


@pytest.mark.integration
@pytest.mark.slow
def test_review_import_makes_a_new_dataset_version(project, tmp_path: Path) -> None:
    params = load_params(project.params_file)
    base = import_data(str(make_imagefolder(tmp_path / "base", per_class=4)), project, params, push=False)
    sources = [write_image(tmp_path / "cam" / f"p{i}.png", seed=900 + i) for i in range(2)]
    ids = _fill_queue(project.review_queue_dir, sources)
    labels = tmp_path / "labels.csv"
    labels.write_text(f"file,label\n{ids[0]},dent\n{ids[1]},normal\n")
    result = import_reviewed(project, params, labels=labels, push=False)
    assert result.changed and result.added == 2 and result.version != base.version
    assert (project.data_dir / "images" / "dent" / f"review-{ids[0]}.png").is_file()
    assert result.review_items_imported == 2 and not pending_items(project.review_queue_dir)
    assert len(list((project.review_queue_dir / "imported").rglob("*.json"))) == 2
    # the same CSV again (a retried monthly run): the items were imported, so nothing is versioned twice
    again = import_reviewed(project, params, labels=labels, push=False)
    assert not again.changed and again.version == result.version and again.review_items_imported == 0
    assert len(list((project.review_queue_dir / "imported").rglob("*.json"))) == 2


class Killed(BaseException):
    """Stands in for kill -9: nothing after it runs."""


def _kill_at(point: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `_mark_imported` die at `point`, leaving the files a killed process would."""
    from components.serving import review

    if point == "writing the imported JSON":
        def torn_write(path: Path, text: str, durable: bool = False) -> Path:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.with_name(f".{path.name}.999.tmp").write_text(text[:10])  # the temporary, never renamed
            raise Killed(point)

        monkeypatch.setattr(review, "write_text_atomic", torn_write)
    elif point == "moving the image":
        replace = os.replace

        def stop_at_image(source, target) -> None:
            if Path(source).suffix == ".png":
                raise Killed(point)
            replace(source, target)

        monkeypatch.setattr(os, "replace", stop_at_image)
    else:
        unlink = Path.unlink

        def stop_at_pending_json(path: Path, missing_ok: bool = False) -> None:
            if path.suffix == ".json" and "imported" not in path.parts:
                raise Killed(point)
            unlink(path, missing_ok=missing_ok)

        monkeypatch.setattr(Path, "unlink", stop_at_pending_json)


def _staging_import(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace the dataset import by one that records the staged file names (the queue is what is tested)."""
    from components.data.importer import ImportResult

    staged: list[str] = []

    def fake_import(source: str, settings, params, **kwargs) -> ImportResult:
        staged.extend(p.name for p in Path(source).rglob("*.png"))
        return ImportResult(version="v1", previous_version=None, added=len(staged), skipped=0, changed=True)

    monkeypatch.setattr("components.data.importer.import_data", fake_import)
    return staged


def _queue_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


@pytest.mark.parametrize("point", ["writing the imported JSON", "moving the image", "removing the pending JSON"])
def test_a_rerun_after_an_import_killed_midway_imports_the_item_once(project, tmp_path: Path, point: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    [request_id] = _fill_queue(project.review_queue_dir, [write_image(tmp_path / "p.png", seed=1)])
    day = pending_items(project.review_queue_dir)[0].json_path.parent.name
    labels = tmp_path / "labels.csv"
    labels.write_text(f"file,label\n{request_id},dent\n")
    params = load_params(project.params_file)
    staged = _staging_import(monkeypatch)
    with monkeypatch.context() as patch:
        _kill_at(point, patch)
        with pytest.raises(Killed):
            import_reviewed(project, params, labels=labels, push=False)

    again = import_reviewed(project, params, labels=labels, push=False)  # the retried monthly run
    assert _queue_files(project.review_queue_dir) == [f"imported/{day}/{request_id}.json",
                                                      f"imported/{day}/{request_id}.png"]
    imported = json.loads((project.review_queue_dir / "imported" / day / f"{request_id}.json").read_text())
    assert (imported["label"], imported["dataset_version"]) == ("dent", "v1")
    # killed before the imported JSON existed, the item is still pending and is staged again (the dataset
    # import skips an image it has); once the JSON exists, the item counts as imported
    assert staged == [f"review-{request_id}.png"] * (2 if point == "writing the imported JSON" else 1)
    assert again.review_items_imported == (1 if point == "writing the imported JSON" else 0)
    assert not pending_items(project.review_queue_dir)


def test_an_item_left_by_the_old_import_order_is_imported_on_the_rerun(project, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Imports once moved the image first: a kill then left a pending JSON without its image, and the image in
    imported/ without a JSON (or with a torn one), and the rerun stopped on 'not a pending review item'."""
    [request_id] = _fill_queue(project.review_queue_dir, [write_image(tmp_path / "p.png", seed=1)])
    item = pending_items(project.review_queue_dir)[0]
    imported = project.review_queue_dir / "imported" / item.json_path.parent.name
    imported.mkdir(parents=True)
    os.replace(item.image_path, imported / item.image_path.name)
    (imported / item.json_path.name).write_text('{"request_id": ')
    labels = tmp_path / "labels.csv"
    labels.write_text(f"file,label\n{request_id},scratch\n")
    staged = _staging_import(monkeypatch)

    result = import_reviewed(project, load_params(project.params_file), labels=labels, push=False)
    assert result.review_items_imported == 1 and staged == [f"review-{request_id}.png"]
    assert _queue_files(project.review_queue_dir) == [f"imported/{imported.name}/{request_id}.json",
                                                      f"imported/{imported.name}/{request_id}.png"]
    assert json.loads((imported / f"{request_id}.json").read_text())["label"] == "scratch"
