"""Find the labelled images (and masks) in a folder, whatever supported layout it uses.

Supported layouts:
- defectops: `<root>/images/<class>/<file>` with optional masks in `<root>/masks/<class>/<stem>.png` (our `data/`);
- Magnetic Tile upstream: `<root>/MT_<Class>/Imgs/<stem>.jpg` with the mask `<stem>.png` beside it;
- ImageFolder: `<root>/<class>/<file>`.
A root holding a single folder (as archives often do) is looked into.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from components.data.images import is_image_file
from components.errors import SourceError

log = logging.getLogger(__name__)

Layout = Literal["defectops", "magnetic-tile", "imagefolder"]


@dataclass(frozen=True)
class LabelledImage:
    """One image of a source: where it is, its class, and its mask if it has one."""

    path: Path
    label: str
    mask: Path | None = None
    name: str | None = None  # file name in the tracked dataset, when it differs from the source's

    @property
    def relpath(self) -> str:
        """Its place in the tracked dataset: images/<class>/<file name>."""
        return f"images/{self.label}/{self.name or self.path.name}"

    @property
    def mask_relpath(self) -> str:
        return f"masks/{self.label}/{Path(self.name or self.path.name).stem}.png"


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _check_inside(path: Path, root: Path) -> None:
    """Refuse a symlink that leads outside the source root."""
    if path.is_symlink():
        target = path.resolve()
        if not target.is_relative_to(root):
            raise SourceError(
                f"{path}: symlink points outside the source ({target}); copy the file in or remove the link"
            )


def _files(folder: Path, root: Path) -> list[Path]:
    files = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        _check_inside(path, root)
        if path.is_file():
            files.append(path)
    return files


def _layout_of(folder: Path) -> Layout | None:
    dirs = _visible_dirs(folder)
    names = {d.name for d in dirs}
    if "images" in names and names <= {"images", "masks"}:
        return "defectops"
    if any(n.startswith("MT_") for n in names):
        return "magnetic-tile"
    if any(is_image_file(f) for d in dirs for f in d.iterdir() if f.is_file()):
        return "imagefolder"
    return None


def detect_layout(root: Path) -> tuple[Layout, Path]:
    """Which layout `root` uses, and the folder that layout starts in (a lone top folder is looked into)."""
    root = root.resolve()
    if not root.is_dir():
        raise SourceError(f"{root}: not a folder; give a folder, a .zip/.tar.gz archive or an http(s) URL")
    candidate = root
    for _ in range(3):
        layout = _layout_of(candidate)
        if layout:
            return layout, candidate
        dirs = _visible_dirs(candidate)
        if len(dirs) != 1:
            break
        candidate = dirs[0]
    raise SourceError(
        f"{root}: no supported layout found; expected <root>/<class>/*.jpg, MT_<Class>/Imgs/*.jpg "
        "or images/<class>/*"
    )


def _class_images(class_dir: Path, label: str, root: Path, masks_dir: Path | None,
                  sibling_masks: bool) -> list[LabelledImage]:
    files = [f for f in _files(class_dir, root) if is_image_file(f)]
    stems: dict[str, list[Path]] = {}
    for f in files:
        stems.setdefault(f.stem, []).append(f)
    items = []
    for f in files:
        mask = None
        if sibling_masks:
            if f.suffix.lower() == ".png" and len(stems[f.stem]) > 1:
                continue  # the mask of a same-stem image, never an image itself
            others = [p for p in stems[f.stem] if p != f and p.suffix.lower() == ".png"]
            mask = others[0] if others else None
        elif masks_dir is not None and (masks_dir / f"{f.stem}.png").is_file():
            mask = masks_dir / f"{f.stem}.png"
        items.append(LabelledImage(path=f, label=label, mask=mask))
    if not items:
        raise SourceError(f"{class_dir}: class folder {label!r} holds no images; add images or remove the folder")
    return items


def discover(root: Path) -> tuple[Layout, list[LabelledImage]]:
    """All labelled images under `root`, sorted by class and file name."""
    root = root.resolve()
    layout, base = detect_layout(root)
    items: list[LabelledImage] = []
    if layout == "defectops":
        for class_dir in _visible_dirs(base / "images"):
            _check_inside(class_dir, root)
            items += _class_images(class_dir, class_dir.name, root, base / "masks" / class_dir.name, False)
    elif layout == "magnetic-tile":
        for class_dir in _visible_dirs(base):
            if not class_dir.name.startswith("MT_"):
                continue
            _check_inside(class_dir, root)
            imgs = class_dir / "Imgs" if (class_dir / "Imgs").is_dir() else class_dir
            items += _class_images(imgs, class_dir.name.removeprefix("MT_"), root, None, True)
    else:
        for class_dir in _visible_dirs(base):
            _check_inside(class_dir, root)
            items += _class_images(class_dir, class_dir.name, root, None, False)
    names = [i.relpath for i in items]
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise SourceError(f"{root}: two files map to the same name {dupes[0]}; rename one of them")
    log.debug("%s: %s layout, %d images", root, layout, len(items))
    return layout, items


def walk_size(root: Path) -> int:
    """Bytes under a folder (for disk-space checks before copying)."""
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) if root.is_dir() else 0


def safe_name(name: str) -> str:
    """A file or class name safe to use as a path component."""
    cleaned = name.replace(os.sep, "_").strip()
    if cleaned in ("", ".", ".."):
        raise SourceError(f"{name!r}: not a usable class or file name")
    return cleaned
