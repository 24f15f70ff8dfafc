"""The image manifest: one row per image, built in parallel and cached by content.

Columns: path (place in the dataset, images/<class>/<file>), file (where it was read), label, group, split,
width, height, mode, channels, bytes, sha256, readable, error, brightness, contrast, sharpness, has_mask.

The cache (under DEFECTOPS_HOME/cache) maps a file's (path, size, mtime, inode) to its sha256, and a sha256 to
the decoded facts, so an unchanged dataset re-validates without reading a single image, and a copied or
renamed image is hashed but not decoded again.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from components.config import GroupingParams, SplitParams
from components.data.layout import LabelledImage
from components.data.split import assign_splits, group_keys
from components.files import replacing
from components.parallel import chunks, image_pool
from components.validation.facts import (
    FACT_COLUMNS,
    init_facts_worker,
    inspect_files,
    set_known_content,
)

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ["path", "file", "label", "group", "split", "bytes", "sha256", *FACT_COLUMNS, "has_mask"]
CACHE_FILE = "manifest-cache.parquet"
_CHUNK = 32


@dataclass(frozen=True)
class _FileKey:
    file: str
    size: int
    mtime_ns: int
    inode: int

    @classmethod
    def of(cls, path: Path) -> _FileKey:
        st = path.stat()
        return cls(str(path), st.st_size, st.st_mtime_ns, st.st_ino)


class ManifestCache:
    """Content cache of image facts, stored as Parquet under the state root."""

    def __init__(self, folder: Path | None) -> None:
        self.path = folder / CACHE_FILE if folder else None
        table = pd.read_parquet(self.path) if self.path and self.path.is_file() else pd.DataFrame()
        self.by_key: dict[_FileKey, str] = {}
        self.by_sha: dict[str, dict] = {}
        for row in table.to_dict("records"):
            self.by_key[_FileKey(row["file"], row["size"], row["mtime_ns"], row["inode"])] = row["sha256"]
            self.by_sha[row["sha256"]] = {c: row[c] for c in FACT_COLUMNS}
        self.dirty = False

    def save(self, keys: dict[_FileKey, str]) -> None:
        if not self.path or not self.dirty:
            return
        rows = [{"file": k.file, "size": k.size, "mtime_ns": k.mtime_ns, "inode": k.inode, "sha256": sha,
                 **self.by_sha[sha]} for k, sha in {**self.by_key, **keys}.items() if sha in self.by_sha]
        with replacing(self.path) as tmp:
            pd.DataFrame(rows).to_parquet(tmp, index=False)


def inspect(files: list[Path], max_pixels: int, cache_dir: Path | None, workers: int,
            progress: bool = False) -> pd.DataFrame:
    """bytes, sha256 and image facts of each file, in order, from the cache where the content is known."""
    cache = ManifestCache(cache_dir)
    keys = [_FileKey.of(f) for f in files]
    out: list[dict | None] = [None] * len(files)
    todo: list[int] = []
    for i, key in enumerate(keys):
        sha = cache.by_key.get(key)
        if sha is not None and sha in cache.by_sha:
            out[i] = {"sha256": sha, "bytes": key.size, **cache.by_sha[sha]}
        else:
            todo.append(i)
    if todo:
        # files whose stat changed are hashed; only unknown contents are decoded
        known = frozenset(cache.by_sha)
        jobs = [([str(files[i]) for i in chunk], max_pixels) for chunk in chunks(todo, _CHUNK)]
        try:
            results = _run_jobs(jobs, known, workers, progress, len(todo))
        finally:
            set_known_content(frozenset())
        for i, row in zip(todo, (r for chunk in results for r in chunk), strict=True):
            if row.get("readable") is None and row["sha256"] in cache.by_sha:
                row.update(cache.by_sha[row["sha256"]])
            out[i] = row
            cache.by_sha[row["sha256"]] = {c: row[c] for c in FACT_COLUMNS}
            cache.by_key[keys[i]] = row["sha256"]
        cache.dirty = True
        cache.save({})
    return pd.DataFrame(out, columns=["bytes", "sha256", *FACT_COLUMNS])


def _run_jobs(jobs: list, known: frozenset[str], workers: int, progress: bool, total: int) -> list[list[dict]]:
    bar = None
    if progress and total > 200:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="img", desc="manifest", leave=False)
    results = []
    if workers <= 1 or len(jobs) <= 2:
        set_known_content(known)
        iterator = map(inspect_files, jobs)
    else:
        pool = image_pool(workers, init_facts_worker, (known,))
        iterator = pool.map(inspect_files, jobs)
    for chunk in iterator:
        results.append(chunk)
        if bar:
            bar.update(len(chunk))
    if workers > 1 and len(jobs) > 2:
        pool.shutdown()
    if bar:
        bar.close()
    return results


def build_manifest(items: list[LabelledImage], grouping: GroupingParams, fractions: SplitParams, seed: int,
                   max_pixels: int, cache_dir: Path | None = None, workers: int | None = None,
                   previous_splits: dict[str, str] | None = None, progress: bool = False) -> pd.DataFrame:
    """The manifest of a list of labelled images (a tracked dataset or any source)."""
    workers = workers or max(1, len(os.sched_getaffinity(0)))
    frame = pd.DataFrame({
        "path": [i.relpath for i in items],
        "file": [str(i.path) for i in items],
        "label": [i.label for i in items],
        "has_mask": [i.mask is not None for i in items],
    })
    frame["group"] = group_keys(frame["path"].tolist(), frame["label"].tolist(), grouping)
    frame["split"] = assign_splits(frame, fractions, seed, previous_splits) if len(frame) else []
    facts = inspect([i.path for i in items], max_pixels, cache_dir, workers, progress)
    frame = pd.concat([frame, facts], axis=1)
    frame["readable"] = frame["readable"].astype(bool)
    frame["error"] = frame["error"].fillna("")
    return frame[MANIFEST_COLUMNS]
