"""What a manifest worker computes for each image file: sha256, size and the image facts (or why it is unreadable).

Kept apart from `manifest` so that worker processes import only the image code (numpy, Pillow, OpenCV), not
pandas and the settings: a worker pool then starts in well under a second.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from components.data.images import decode
from components.errors import DefectOpsError
from components.parallel import init_image_worker

FACT_COLUMNS = ["width", "height", "mode", "channels", "readable", "error", "brightness", "contrast",
                "sharpness"]

# contents already in the manifest cache: their files are hashed, not decoded again
_known_content: frozenset[str] = frozenset()


def set_known_content(known: frozenset[str]) -> None:
    global _known_content
    _known_content = known


def init_facts_worker(known: frozenset[str]) -> None:
    """Initializer of a manifest worker process: the image worker's settings and the known contents."""
    init_image_worker()
    set_known_content(known)


def inspect_bytes(raw: bytes, max_pixels: int) -> dict:
    """Facts about one image's bytes: size, mode, statistics, or why it is unreadable."""
    facts: dict = dict.fromkeys(FACT_COLUMNS)
    try:
        image = decode(raw, max_pixels)
        facts.update(readable=True, error="", **image.facts())
    except DefectOpsError as exc:
        facts.update(readable=False, error=str(exc).removeprefix("upload: "))
    return facts


def inspect_files(job: tuple[list[str], int]) -> list[dict]:
    """sha256 and bytes of each file of a chunk, and its facts unless the content is known."""
    files, max_pixels = job
    rows = []
    for file in files:
        raw = Path(file).read_bytes()
        row = {"sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw)}
        if row["sha256"] not in _known_content:
            row.update(inspect_bytes(raw, max_pixels))
        rows.append(row)
    return rows
