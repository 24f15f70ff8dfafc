"""The review queue: images a person must look at, and how their verdicts become labelled data.

The service keeps every image decided `review`, plus a seeded-by-request audit sample of auto-decided parts
(`serve.audit_sample_rate`), as `<review_queue_dir>/<YYYY-MM-DD>/<request_id>.<ext>` next to
`<request_id>.json` (the prediction, the reason and the request metadata; written last, so an item is
complete when its JSON exists). `import_reviewed` turns verdicts, given as a CSV (file,label) or as a
folder sorted into <label>/ sub-folders, into a staging ImageFolder and imports it with
`components.data.importer.import_data`, the same validated, versioned path as any other data.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from components.config import Params, Settings
from components.data.images import is_image_file
from components.errors import UsageError
from components.files import write_text_atomic
from components.serving.predlog import BackgroundWriter, prune_days

log = logging.getLogger(__name__)

REVIEW, AUDIT = "review", "audit"
IMPORTED = "imported"
_MAGIC = ((b"\xff\xd8\xff", ".jpg"), (b"\x89PNG", ".png"), (b"BM", ".bmp"), (b"II*\x00", ".tif"),
          (b"MM\x00*", ".tif"))


def image_suffix(raw: bytes, given: str = "") -> str:
    """The file suffix for stored image bytes: the upload's own when it is an image suffix, else sniffed."""
    if given and is_image_file(Path(f"x{given}")):
        return given.lower()
    return next((suffix for magic, suffix in _MAGIC if raw.startswith(magic)), ".img")


def audit_sampled(request_id: str, rate: float) -> bool:
    """Whether an auto-decided request falls in the audit sample (a stable function of its id)."""
    if rate <= 0:
        return False
    draw = int(hashlib.sha256(request_id.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return draw < rate


class ReviewQueue:
    """Stores review and audit items through the background writer; prunes old days."""

    def __init__(self, folder: Path, writer: BackgroundWriter, retention_days: int, audit_rate: float) -> None:
        self.folder = folder
        self.writer = writer
        self.retention_days = retention_days
        self.audit_rate = audit_rate
        self._pruned_on: str | None = None

    def reason(self, decision: str, request_id: str) -> str | None:
        """'review' for review decisions, 'audit' for sampled auto decisions, else None."""
        if decision == REVIEW:
            return REVIEW
        return AUDIT if audit_sampled(request_id, self.audit_rate) else None

    def keep(self, request_id: str, raw: bytes, suffix: str, item: dict[str, Any]) -> bool:
        """Queue the image and its JSON for writing; never blocks."""
        return self.writer.submit(lambda: self._write(request_id, raw, suffix, item), size=len(raw))

    def _write(self, request_id: str, raw: bytes, suffix: str, item: dict[str, Any]) -> None:
        day = item["timestamp"][:10]
        if self._pruned_on != day:
            self._pruned_on = day
            prune_days(self.folder, self.retention_days)
            prune_days(self.folder / IMPORTED, self.retention_days)
        folder = self.folder / day
        folder.mkdir(parents=True, exist_ok=True)
        image = folder / f"{request_id}{image_suffix(raw, suffix)}"
        image.write_bytes(raw)
        meta = folder / f"{request_id}.json"
        write_text_atomic(meta, json.dumps({**item, "image_file": image.name}, indent=1, default=str))


@dataclass(frozen=True)
class ReviewItem:
    """One stored item: its JSON and image paths and the JSON content."""

    json_path: Path
    image_path: Path
    data: dict[str, Any]

    @property
    def request_id(self) -> str:
        return self.json_path.stem


def _read_item(meta: Path) -> dict[str, Any] | None:
    """An item's JSON, None when it is missing or unreadable."""
    try:
        return json.loads(meta.read_text())
    except (OSError, ValueError):
        return None


def _item_jsons(folder: Path) -> list[tuple[Path, dict[str, Any]]]:
    """The readable item JSONs of the day folders under `folder`, oldest day first."""
    found = []
    for meta in sorted(folder.glob("*/*.json")) if folder.is_dir() else []:
        if meta.parent.name == IMPORTED or meta.name.startswith("."):
            continue
        if (data := _read_item(meta)) is None:
            log.warning("%s: unreadable review item, skipped", meta)
        else:
            found.append((meta, data))
    return found


def pending_items(folder: Path) -> list[ReviewItem]:
    """Complete items still waiting for a verdict, oldest day first. An item with an imported JSON is not
    waiting, whatever files a killed import left behind."""
    items = []
    for meta, data in _item_jsons(folder):
        imported = folder / IMPORTED / meta.parent.name
        if (imported / meta.name).is_file() and _read_item(imported / meta.name) is not None:
            continue
        image = meta.parent / data.get("image_file", "")
        if not image.is_file():  # an import killed after moving the image, before writing its JSON (the old order)
            image = imported / data.get("image_file", "")
        if image.is_file():
            items.append(ReviewItem(meta, image, data))
    return items


def imported_items(folder: Path) -> list[ReviewItem]:
    """Items imported already, by their imported JSON, which an import writes first: its image may still wait
    in the day folder if the import was killed (the next `import_reviewed` moves it)."""
    return [ReviewItem(meta, meta.parent / data.get("image_file", ""), data)
            for meta, data in _item_jsons(folder / IMPORTED)]


def _read_labels_csv(path: Path) -> list[tuple[str, str]]:
    if not path.is_file():
        raise UsageError(f"{path}: labels file not found; give a CSV with columns file,label")
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or not {"file", "label"} <= {f.strip() for f in reader.fieldnames}:
            raise UsageError(f"{path}: needs a header with columns file,label (got {reader.fieldnames}); fix the CSV")
        rows = [((row.get("file") or "").strip(), (row.get("label") or "").strip()) for row in reader]
    rows = [(f, label) for f, label in rows if f or label]
    if not rows:
        raise UsageError(f"{path}: no rows; add one line per reviewed image (file,label)")
    return rows


def _match(items: list[ReviewItem], key: str, root: Path) -> ReviewItem | None:
    for item in items:
        rel = item.image_path.relative_to(root).as_posix()
        if key in (rel, item.image_path.name, item.request_id, item.json_path.relative_to(root).as_posix()):
            return item
    return None


def verdicts_from_csv(settings: Settings, labels: Path) -> list[tuple[ReviewItem | Path, str]]:
    """(item, label) pairs from a CSV whose `file` is a queue path, file name or request id. Items imported
    already (a rerun of the same CSV, e.g. a retried monthly run) are left out, with a log line."""
    root = settings.review_queue_dir
    items = pending_items(root)
    imported: list[ReviewItem] | None = None  # read only when a key is not pending
    pairs: list[tuple[ReviewItem | Path, str]] = []
    done: list[ReviewItem] = []
    for key, label in _read_labels_csv(labels):
        item = _match(items, key, root)
        if item is None:
            if imported is None:
                imported = imported_items(root)
            earlier = _match(imported, key, root / IMPORTED)
            if earlier is not None:
                done.append(earlier)
                continue
            candidate = Path(key) if Path(key).is_absolute() else labels.parent / key
            if not candidate.is_file():
                raise UsageError(f"{labels}: {key!r} is not a pending review item or an image file; check the name "
                                 f"(items live under {root})")
            pairs.append((candidate, label))
        else:
            pairs.append((item, label))
    if done:
        log.info("%s: %d review item(s) were imported already (e.g. %s into dataset version %s); left out",
                 labels, len(done), done[0].request_id, done[0].data.get("dataset_version"))
    return pairs


def verdicts_from_folder(settings: Settings, folder: Path) -> list[tuple[ReviewItem | Path, str]]:
    """(item, label) pairs from a folder sorted by reviewers into <label>/<image> sub-folders."""
    if not folder.is_dir():
        raise UsageError(f"{folder}: folder not found; sort reviewed images into <label>/ sub-folders there")
    items = {item.image_path.name: item for item in pending_items(settings.review_queue_dir)}
    pairs: list[tuple[ReviewItem | Path, str]] = []
    for label_dir in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for image in sorted(p for p in label_dir.iterdir() if p.is_file() and is_image_file(p)):
            pairs.append((items.get(image.name, image), label_dir.name))
    if not pairs:
        raise UsageError(f"{folder}: no images in <label>/ sub-folders; sort the reviewed images into them")
    return pairs


def build_staging(settings: Settings, params: Params, verdicts: list[tuple[ReviewItem | Path, str]]) -> Path:
    """A staging ImageFolder <label>/review-<request_id>.<ext> of the verdicts; unknown labels are errors."""
    classes = list(params.profile.classes)
    unknown = sorted({label for _, label in verdicts if label not in classes})
    if unknown:
        raise UsageError(f"unknown labels {unknown}; use the dataset's classes {classes}")
    staging = settings.staging_dir / f"review-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S%f')}"
    for source, label in verdicts:
        image = source.image_path if isinstance(source, ReviewItem) else source
        name = f"review-{source.request_id}{image.suffix}" if isinstance(source, ReviewItem) else image.name
        target = staging / label / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(image, target)
    return staging


def _mark_imported(settings: Settings, verdicts: list[tuple[ReviewItem | Path, str]], version: str | None) -> int:
    """Move the imported items to imported/<day>/. The imported JSON is written first, in one rename: from then
    on the item counts as imported, and a run killed before the image is moved is finished by the next."""
    moved = 0
    for source, label in verdicts:
        if not isinstance(source, ReviewItem):
            continue
        target = settings.review_queue_dir / IMPORTED / source.json_path.parent.name
        data = {**source.data, "label": label, "dataset_version": version,
                "imported_at": datetime.now(UTC).isoformat(timespec="seconds")}
        write_text_atomic(target / source.json_path.name, json.dumps(data, indent=1, default=str), durable=True)
        _finish_import(source.json_path, source.image_path, target)
        moved += 1
    return moved


def _finish_import(pending_json: Path, image: Path, target: Path) -> None:
    """The steps after the imported JSON is written: the image into `target`, the pending JSON removed."""
    if image.is_file():
        os.replace(image, target / image.name)
    pending_json.unlink(missing_ok=True)


def finish_interrupted_imports(folder: Path) -> int:
    """Finish the imports a killed run left half done (imported JSON written, pending files still in place)."""
    finished = 0
    for item in imported_items(folder):
        day = folder / item.json_path.parent.name
        pending_json, pending_image = day / item.json_path.name, day / item.image_path.name
        if pending_json.is_file() or pending_image.is_file():
            _finish_import(pending_json, pending_image, item.image_path.parent)
            finished += 1
    if finished:
        log.info("%s: finished %d review import(s) a killed run left half done", folder, finished)
    return finished


def import_reviewed(settings: Settings, params: Params, labels: Path | None = None, folder: Path | None = None,
                    commit_changes: bool = True, push: bool = True, progress: bool = False) -> Any:
    """Turn review verdicts into a new dataset version through the ordinary import (validated, versioned)."""
    from components.data.importer import import_data

    if (labels is None) == (folder is None):
        raise UsageError("give exactly one of --labels FILE (CSV file,label) or --folder DIR (<label>/ sub-folders)")
    finish_interrupted_imports(settings.review_queue_dir)
    verdicts = verdicts_from_csv(settings, labels) if labels else verdicts_from_folder(settings, folder)
    if not verdicts:  # every item of the CSV was imported before: nothing to version again
        from components.data.importer import ImportResult
        from components.data.tracked import dataset_version

        version = dataset_version(settings.project_root)
        result = ImportResult(version=version, previous_version=version, added=0, skipped=0, changed=False)
        result.review_items_imported = 0  # type: ignore[attr-defined]
        return result
    settings.ensure()
    staging = build_staging(settings, params, verdicts)
    try:
        result = import_data(str(staging), settings, params, commit_changes=commit_changes, push=push,
                             progress=progress)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    result.review_items_imported = _mark_imported(settings, verdicts, result.version)  # type: ignore[attr-defined]
    return result
