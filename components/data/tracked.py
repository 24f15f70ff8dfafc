"""The tracked dataset (`data/` under DVC): its version id and its manifest with the committed splits."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import yaml

from components.config import Params, Settings, cpu_workers
from components.data.layout import discover
from components.data.split import read_splits
from components.errors import UsageError
from components.validation.manifest import build_manifest

log = logging.getLogger(__name__)


def dataset_version(project: Path) -> str | None:
    """The DVC `.dir` md5 recorded in data.dvc (None when no dataset is tracked yet)."""
    dvc_file = project / "data.dvc"
    if not dvc_file.is_file():
        return None
    outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or []
    return outs[0].get("md5") if outs else None


def manifest_of(root: Path, settings: Settings, params: Params, previous_splits: dict[str, str] | None = None,
                progress: bool = False) -> pd.DataFrame:
    """Manifest of any folder in a supported layout, split with the committed assignments where given."""
    _, items = discover(root)
    return build_manifest(items, params.profile.grouping, params.data.split, params.base.seed,
                          params.data.max_image_pixels, settings.cache_dir, cpu_workers(settings),
                          previous_splits=previous_splits, progress=progress)


def usable_rows(rows: pd.DataFrame, what: str) -> pd.DataFrame:
    """Readable rows only (unreadable ones are logged); an empty result is a usage error naming `what`."""
    if "readable" in rows:
        readable = rows["readable"].fillna(False).astype(bool)
        bad = rows[~readable]
        if len(bad):
            log.warning("%d unreadable images in %s skipped (e.g. %s)", len(bad), what, bad["path"].iloc[0])
        rows = rows[readable]
    if rows.empty:
        raise UsageError(f"{what} has no readable images; import data first or check splits.csv")
    return rows.reset_index(drop=True)


def tracked_manifest(settings: Settings, params: Params, progress: bool = False) -> pd.DataFrame:
    """Manifest of `data/` with the splits committed in splits.csv; a committed version missing from data/ (a
    fresh clone) is pulled first."""
    if not (settings.data_dir / "images").is_dir():
        if dataset_version(settings.project_root) is None:
            raise UsageError(f"{settings.data_dir}: no tracked dataset; run `defectops data import SOURCE` first")
        restore_data(settings)
    return manifest_of(settings.data_dir, settings, params, read_splits(settings.splits_file), progress)


def restore_data(settings: Settings) -> None:
    """Pull the committed dataset version into data/, under the data lock (never beside an import)."""
    from components.data.versioning import DatasetRepo
    from components.locks import exclusive

    settings.ensure()
    with exclusive(settings.locks_dir, "data", "a dataset import"):
        log.info("data/ does not hold the committed dataset version %s: pulling it from %s",
                 dataset_version(settings.project_root), settings.dvc_remote_url)
        DatasetRepo(settings).restore()
