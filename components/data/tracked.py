"""The tracked dataset (`data/` under DVC): its version id and its manifest with the committed splits."""

from __future__ import annotations

import io
import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

from components.config import Params, Settings, cpu_workers
from components.data.layout import discover
from components.data.split import read_splits
from components.errors import ConcurrentRunError, PicturesChanged, UsageError
from components.files import write_text_atomic
from components.validation.manifest import build_manifest

log = logging.getLogger(__name__)

# The checkout's own records of what writes into its data/, under its .dvc/tmp (`checkout_file`):
PULLED = "defectops-pulled"    # the id of the last pull that changed pictures
PULLING = "defectops-pulling"  # there while a pull writes into data/ (a killed one leaves it)
IMPORT_JOURNAL = "defectops-import-journal.json"  # there while an import copies (a killed one leaves it)


def version_in(text: str) -> str | None:
    """The DVC `.dir` md5 a data.dvc's text records (None when it records no output). Raises yaml.YAMLError when
    the text is not YAML, ValueError when it is not DVC's record of data/ (an `outs:` list of mappings)."""
    recorded = yaml.safe_load(text) or {}
    outs = (recorded.get("outs") or []) if isinstance(recorded, dict) else None
    if not isinstance(outs, list) or not all(isinstance(out, dict) for out in outs):
        raise ValueError("not DVC's record of data/ (an `outs:` list)")
    return outs[0].get("md5") if outs else None


def dataset_version(project: Path) -> str | None:
    """The DVC `.dir` md5 recorded in data.dvc (None when no dataset is tracked yet)."""
    dvc_file = project / "data.dvc"
    if not dvc_file.is_file():
        return None
    try:
        return version_in(dvc_file.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise UsageError(f"{dvc_file} is not valid YAML{where} (a merge conflict?): resolve it, e.g. keep one side "
                         "with `git checkout --theirs -- data.dvc splits.csv`, then `defectops data pull --force` "
                         "and import the other side's images again") from None
    except ValueError:
        raise UsageError(f"{dvc_file} does not read as DVC's record of data/ (an `outs:` list); restore it from git, "
                         "e.g. `git checkout HEAD -- data.dvc`") from None


def manifest_of(root: Path, settings: Settings, params: Params, previous_splits: dict[str, str] | None = None,
                progress: bool = False) -> pd.DataFrame:
    """Manifest of any folder in a supported layout, split with the committed assignments where given."""
    _, items = discover(root)
    return build_manifest(items, params.profile.grouping, params.data.split, params.base.seed,
                          params.data.max_image_pixels, settings.cache_dir, cpu_workers(settings),
                          previous_splits=previous_splits, progress=progress)


def usable_rows(rows: pd.DataFrame, what: str, refuse_unreadable: bool = False) -> pd.DataFrame:
    """Readable rows only (unreadable ones are logged, or with `refuse_unreadable` a usage error: figures over
    a folder someone handed in must not quietly leave pictures out); an empty result is a usage error."""
    if "readable" in rows:
        readable = rows["readable"].fillna(False).astype(bool)
        bad = rows[~readable]
        if len(bad) and refuse_unreadable:
            error = bad["error"].iloc[0] if "error" in bad and bad["error"].iloc[0] else "remove or replace it"
            raise UsageError(f"{what}: {len(bad)} unreadable image(s), e.g. {bad['path'].iloc[0]}: {error}")
        if len(bad):
            log.warning("%d unreadable images in %s skipped (e.g. %s)", len(bad), what, bad["path"].iloc[0])
        rows = rows[readable]
    if rows.empty:
        raise UsageError(f"{what} has no readable images; import data first or check splits.csv")
    return rows.reset_index(drop=True)


@dataclass(frozen=True)
class TrackedData:
    """The tracked dataset's manifest and the version data.dvc named all the while it was read."""

    manifest: pd.DataFrame
    version: str | None
    pulled: str = field(repr=False)  # the last pull that changed pictures before the read: what `still_there` checks
    pictures: dict[Path, tuple[int, int, int]] = field(default_factory=dict, repr=False)  # data/'s files then

    def still_there(self, settings: Settings) -> None:
        """Raise PicturesChanged when a pull has changed or removed pictures of data/ since the read, or is
        writing there now, or any file of data/ then was rewritten or removed since (an edit by hand, which a
        later pull may even have put back): those listed may be gone, or other pictures now. Call it after
        reading them (training's decoding and uncached epochs, calibration, an evaluation's predictions), before
        writing what came of them. A pull or import since that only added pictures is let pass. (The mark first:
        once it is gone, a pull that overlapped has left its id.)"""
        if checkout_file(settings, PULLING).is_file() or _last_changing_pull(settings) != self.pulled:
            raise PicturesChanged("a `data pull` changed or removed pictures in data/ while this command read "
                                  "them; run it again once the pull is done")
        now = _pictures(settings.data_dir)
        changed = [path for path, facts in self.pictures.items() if now.get(path) != facts]
        if changed:
            raise PicturesChanged(f"{len(changed)} file(s) of data/ were rewritten or removed while this command "
                                  f"read them (e.g. {changed[0]}: edited by hand?); run it again once data/ holds "
                                  "the committed version (`defectops data status` says what differs)")


def tracked_manifest(settings: Settings, params: Params, progress: bool = False) -> pd.DataFrame:
    """Manifest of `data/` with the splits committed in splits.csv (`tracked_data` also says its version)."""
    return tracked_data(settings, params, progress).manifest


def tracked_data(settings: Settings, params: Params, progress: bool = False) -> TrackedData:
    """Manifest of `data/` with the splits committed in splits.csv, and the version it is.

    data/ must hold the version data.dvc commits, which is what a model records it was trained on: a
    missing data/ (a fresh clone) is pulled first; a data/ that differs (edited by hand, or a `git pull` that
    brought a newer data.dvc) is refused, since pulling over it would discard changes. What an import killed
    midway left is settled first, as the next import would (a version it had not committed is rolled back).
    It is read without the data lock, so that readers never block each other: an import that is copying, or
    commits a version (or is rolled back: that rewrites splits.csv), or a pull that is writing into data/ or
    changes pictures there, before the rows are read to the end makes it fail (ConcurrentRunError); data.dvc is
    checked against data/ in between, so a pull that only adds pictures has nothing to add. Callers record
    `version`, the one checked, rather than reading data.dvc again, and a caller that goes on to read the
    pictures checks `still_there` once it has.
    """
    finish_interrupted_changes(settings)
    restored = False
    if not (settings.data_dir / "images").is_dir():
        if dataset_version(settings.project_root) is None:
            raise UsageError(f"{settings.data_dir}: no tracked dataset; run `defectops data import SOURCE` first")
        restore_data(settings)
        restored = True
    before = _version_state(settings)  # an import copying now: that, not "data/ is modified, pull --force"
    pictures = _pictures(settings.data_dir)  # before DVC's status says they are the version's
    problem = None if restored else workspace_problem(settings)
    if _version_state(settings) != before:  # ... and one that began during DVC's status, or a `git pull`
        raise _changed_while_read()
    if problem:
        raise UsageError(problem)
    manifest = committed_manifest(settings, params, progress)
    if _version_state(settings) != before:
        raise _changed_while_read()
    return TrackedData(manifest, before[0], before[2], pictures)


def version_images(settings: Settings, version: str, deepen: bool = True) -> set[str] | None:
    """The images dataset `version` held: splits.csv of the latest commit whose data.dvc names it (imports only
    add, so they are tracked rows of any later version too); None when no commit of this clone does (a version
    never committed). With `deepen`, a shallow clone (Prefect's `git_clone` step clones one commit deep) that has
    no such commit fetches its history and looks again."""
    from components.data.versioning import git

    project = settings.project_root
    found = _committed_images(project, version)
    if found is not None or not deepen \
            or git(project, "rev-parse", "--is-shallow-repository", check=False).stdout.strip() != "true":
        return found
    return _committed_images(project, version) if _fetch_history(project, version) else None


def _committed_images(project: Path, version: str) -> set[str] | None:
    """The paths of splits.csv in the latest commit whose data.dvc names `version` (None: no such commit)."""
    from components.data.versioning import git

    commits = git(project, "log", "--format=%H", "--", "data.dvc", check=False)
    for commit in commits.stdout.split() if commits.returncode == 0 else []:
        shown = git(project, "show", f"{commit}:data.dvc", check=False)
        try:
            if shown.returncode != 0 or version_in(shown.stdout) != version:
                continue
        except (yaml.YAMLError, ValueError):  # a commit with a broken data.dvc names no version
            continue
        splits = git(project, "show", f"{commit}:splits.csv", check=False)
        if splits.returncode != 0:
            return None
        return set(pd.read_csv(io.StringIO(splits.stdout), dtype=str, keep_default_na=False)["path"])
    return None


def _fetch_history(project: Path, version: str) -> bool:
    """`git fetch --unshallow`, never prompting (no terminal, ssh in batch mode), 120 s at most; True when done."""
    import subprocess

    log.info("fetching the git history of this shallow clone to find dataset version %s", version)
    quiet = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_SSH_COMMAND": "ssh -o BatchMode=yes"}
    try:
        fetched = subprocess.run(["git", "fetch", "--quiet", "--unshallow"], cwd=project, capture_output=True,
                                 text=True, timeout=120, check=False, stdin=subprocess.DEVNULL, env=quiet)
    except subprocess.TimeoutExpired:
        problem = "no answer in 120 s"
    else:
        problem = (fetched.stderr.strip().splitlines() or ["?"])[-1] if fetched.returncode else None
    if problem is not None:
        log.warning("could not fetch the git history (%s)", problem)
    return problem is None


def _changed_while_read() -> ConcurrentRunError:
    return ConcurrentRunError("the tracked dataset changed while it was read (a dataset import or `data pull` ran "
                              "beside this command); run it again once that is done")


def _version_state(settings: Settings) -> tuple[str | None, int | None, str]:
    """What changes with data/'s contents: the version data.dvc names, splits.csv (an import's commit or roll-back
    rewrites it), and the last pull that changed pictures (one that brings the committed pictures back over a
    changed data/ leaves the other two as they were). An import that is copying (its journal exists) or a pull
    that is writing is changing them now: ConcurrentRunError. A pull marks, writes, leaves its id, then unmarks;
    the id is read before and after the marks, so a state taken at either end of a read sees any pull that
    overlapped it (its mark, or an id that moved)."""
    pulled = _last_changing_pull(settings)
    if checkout_file(settings, IMPORT_JOURNAL).is_file() or checkout_file(settings, PULLING).is_file() \
            or _last_changing_pull(settings) != pulled:
        raise _changed_while_read()
    splits = settings.splits_file
    return dataset_version(settings.project_root), splits.stat().st_mtime_ns if splits.is_file() else None, pulled


def checkout_file(settings: Settings, name: str) -> Path:
    """A file of the checkout's own record of what writes into its data/ (an import's journal, a pull's mark and
    id): under .dvc/tmp (git-ignored), not the state root, since other checkouts (Kubernetes Jobs' clones) share
    the state root but not data/; an import or pull in one never holds up or settles reads in another."""
    return settings.project_root / ".dvc" / "tmp" / name


def _last_changing_pull(settings: Settings) -> str:
    """The id of the last pull that changed or removed pictures of data/ ("" before the first): a random id, so
    that a .dvc/tmp cleared by hand never brings back one a reader holds."""
    path = checkout_file(settings, PULLED)
    return path.read_text() if path.is_file() else ""


def _note_changing_pull(settings: Settings) -> None:
    write_text_atomic(checkout_file(settings, PULLED), uuid.uuid4().hex)


def _pictures(data_dir: Path) -> dict[Path, tuple[int, int, int]]:
    """Each file under data_dir with what a rewrite changes (inode, size, mtime)."""
    if not data_dir.is_dir():
        return {}
    return {path: (info.st_ino, info.st_size, info.st_mtime_ns)
            for path in data_dir.rglob("*") if path.is_file() for info in [path.stat()]}


@contextmanager
def pulling(settings: Settings) -> Iterator[None]:
    """Mark a pull's writing into data/ as under way (the caller holds the data lock): tracked reads refuse until
    it ends. When it ends, having changed or removed any picture that was there (not only added some), it leaves
    its id before the mark goes, so that a command which read before it fails `still_there`."""
    marker, before = checkout_file(settings, PULLING), _pictures(settings.data_dir)
    write_text_atomic(marker, "a `data pull` is writing into data/")
    try:
        yield
    finally:
        try:
            after = _pictures(settings.data_dir)
            if any(after.get(path) != facts for path, facts in before.items()):
                _note_changing_pull(settings)
        finally:
            marker.unlink(missing_ok=True)


def committed_manifest(settings: Settings, params: Params, progress: bool = False) -> pd.DataFrame:
    """Manifest of `data/` with the committed splits, as it is (tracked_manifest checks it first)."""
    return manifest_of(settings.data_dir, settings, params, read_splits(settings.splits_file), progress)


def workspace_problem(settings: Settings) -> str | None:
    """One line saying how data/ differs from the version data.dvc commits (DVC's status: modified, not in
    cache, ...) and how to bring that version; None when data/ holds it, or there is no version or DVC
    repository to compare with."""
    version = dataset_version(settings.project_root)
    if version is None or not (settings.project_root / ".dvc").is_dir():
        return None
    from dvc.repo import Repo

    with Repo(str(settings.project_root)) as repo:
        status = repo.status(targets=[str(settings.project_root / "data.dvc")])
    states = {state for entries in status.values() for entry in entries if isinstance(entry, dict)
              for state in (entry.get("changed outs") or {}).values()}
    if not states:
        return None
    return (f"{settings.data_dir} does not hold the committed dataset version {version} ({', '.join(sorted(states))}); "
            "`defectops data pull --force` brings it, discarding the changes in data/")


def data_lock(settings: Settings) -> AbstractContextManager[None]:
    """The lock every writer of data/ holds (an import, a pull, a push, the recovery of a killed one): taken at
    once or refused in one line naming its holder."""
    from components.locks import exclusive

    return exclusive(settings.locks_dir, "data", "a dataset import, pull or push")


def finish_interrupted_changes(settings: Settings) -> None:
    """Roll back (or keep, when it had committed) an import that a kill left half-done, and drop the mark of a
    killed pull (what it left in data/ is `workspace_problem`'s to name), under the data lock; while an import
    or pull still runs, its one-line ConcurrentRunError: its data/ is not yet a version."""
    from components.data.importer import legacy_journal_path, recover

    marker = checkout_file(settings, PULLING)
    if not any(path.is_file() for path in (checkout_file(settings, IMPORT_JOURNAL), marker,
                                           legacy_journal_path(settings))):
        return
    with data_lock(settings):
        recover(settings)
        if marker.is_file():  # what the killed pull changed is unknown: a command that read before it must fail
            _note_changing_pull(settings)
            marker.unlink()


def restore_data(settings: Settings, force: bool = False) -> str:
    """Pull the committed dataset version into data/, under the data lock (never beside an import), and return
    it; `force` discards what differs in data/. What an import killed midway left is settled first, under the
    same lock, so the version brought is the one the next command sees (not one it then rolls back)."""
    from components.data.importer import recover
    from components.data.versioning import DatasetRepo

    settings.ensure()
    with data_lock(settings):
        recover(settings)
        version = dataset_version(settings.project_root)
        if version is None:
            raise UsageError("no dataset version is committed (no data.dvc); run `defectops data import SOURCE` "
                             "first")
        log.info("bringing the committed dataset version %s into %s (from the cache or %s)",
                 version, settings.data_dir, settings.dvc_remote_url)
        DatasetRepo(settings).restore(force=force)
    return version
