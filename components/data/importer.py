"""Import images into the tracked dataset: validate first, then add, version (DVC), commit (git), push.

The import is a transaction. Nothing in `data/`, `data.dvc`, `splits.csv` or the remote changes unless the
whole candidate dataset (old images plus new) passes validation. While files are being added, a journal in the
checkout (its .dvc/tmp: other checkouts sharing the state root have their own data/) lists them together with
the previous `data.dvc` and `splits.csv`; an error, Ctrl-C or a kill leaves the journal behind, and the next
command in that checkout rolls the half-done import back, unless the import had already made its git commit:
then that version is whole, and it is kept. Every new version is recorded as unpushed before the journal goes,
and leaves that record only once the remote holds it: a failed or interrupted push, or `--no-push`, keeps it
listed for `defectops data push`.
"""

from __future__ import annotations

import errno
import json
import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import pandas as pd

from components.config import Params, Settings, cpu_workers
from components.data.layout import LabelledImage, discover
from components.data.sources import open_source
from components.data.split import read_splits, write_splits
from components.data.tracked import (
    IMPORT_JOURNAL,
    checkout_file,
    data_lock,
    dataset_version,
    version_images,
    workspace_problem,
)
from components.data.versioning import DatasetRepo, commit, git, head_commit
from components.errors import DefectOpsError, SourceError, UsageError, ValidationFailed, one_line
from components.files import file_sha256, leftover_temporaries, replacing, write_text_atomic
from components.validation.manifest import build_manifest, inspect

log = logging.getLogger(__name__)

VERSION_FILES = ("data.dvc", "splits.csv", ".gitignore")


@dataclass
class ImportResult:
    version: str | None
    previous_version: str | None
    added: int
    skipped: int
    changed: bool
    committed: str | None = None
    pushed: bool | None = None
    push_message: str = ""
    report_dir: Path | None = None
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def restored(self) -> bool:
        """The committed version was missing here and on the remote, and the source held exactly its images."""
        return not self.changed and self.added > 0


# ------------------------------------------------------------------ journal


def journal_path(settings: Settings) -> Path:
    """Where an import into this checkout's data/ keeps its journal while it copies."""
    return checkout_file(settings, IMPORT_JOURNAL)


def legacy_journal_path(settings: Settings) -> Path:
    """Where a defectops before 2026-12-07 kept it, under the state root that other checkouts share."""
    return settings.state_dir / "import-journal.json"


def _refuse_legacy_journal(settings: Settings) -> None:
    """A journal at the old place belongs to whichever checkout that import ran in, which this one cannot tell:
    rolling it back here could undo this checkout's own version files, ignoring it would leave that import
    half-done there."""
    legacy = legacy_journal_path(settings)
    if legacy.is_file():
        raise UsageError(f"{legacy}: an import an earlier defectops left unfinished; move it to "
                         f"<checkout>/.dvc/tmp/{IMPORT_JOURNAL} in the checkout that import ran in (its next command "
                         "rolls the import back), or delete it if that checkout is gone")


@dataclass(frozen=True)
class Journal:
    """What an import in progress has to undo: the files it adds, the version files as they were, and what
    tells whether it got as far as its git commit."""

    added: list[str]
    backups: dict[str, str | None]
    head: str | None = None  # the git commit before the import


def _write_journal(settings: Settings, journal: Journal) -> None:
    write_text_atomic(journal_path(settings), json.dumps(asdict(journal)))


def _committed_version(settings: Settings, journal: Journal) -> tuple[str, str] | None:
    """(version, commit) when the interrupted import had made its git commit: HEAD moved and holds the
    data.dvc of the workspace, which is no longer the one before the import."""
    project = settings.project_root
    head = head_commit(project)
    if head is None or head == journal.head:
        return None
    name = VERSION_FILES[0]
    working = (project / name).read_text() if (project / name).is_file() else None
    shown = git(project, "show", f"HEAD:{name}", check=False)
    if shown.returncode != 0 or working is None or shown.stdout != working or working == journal.backups.get(name):
        return None
    version = dataset_version(project)
    return (version, head) if version else None


def _workspace_version(project: Path) -> str | None:
    """The version data.dvc names; None also when a killed import left it unreadable (recovery must go on)."""
    try:
        return dataset_version(project)
    except Exception:  # noqa: BLE001 - half-written YAML, or not the shape DVC writes
        return None


def recover(settings: Settings) -> bool:
    """Finish what an interrupted import left: keep it when it was committed, else roll it back; True when
    there was one. Its staged validation reports go either way (callers hold the data lock: none is live)."""
    _refuse_legacy_journal(settings)
    for stale in settings.staging_dir.glob("report-*"):  # also of an import killed before its journal existed
        shutil.rmtree(stale, ignore_errors=True)
    path = journal_path(settings)
    if not path.is_file():
        return False
    known = {f.name for f in fields(Journal)}  # an older defectops wrote more keys
    journal = Journal(**{k: v for k, v in json.loads(path.read_text()).items() if k in known})
    committed = _committed_version(settings, journal)
    if committed is not None:
        version, head = committed
        DatasetRepo(settings).mark_unpushed(version, head)  # whether or not its push had started: it is not done
        path.unlink()
        log.warning("an interrupted import had already committed dataset version %s (%s): kept it; "
                    "`defectops data push` sends it to the remote", version, head[:8])
        return True
    project = settings.project_root
    abandoned = _workspace_version(project)  # the version the import had made, if it got that far
    for rel in journal.added:
        added = project / rel
        for leftover in [added, *leftover_temporaries(added)]:  # a kill while copying leaves its temporary file
            leftover.unlink(missing_ok=True)
        for parent in added.parents:  # a class folder the import created, now empty
            if parent == settings.data_dir or not parent.is_relative_to(settings.data_dir) or any(parent.iterdir()):
                break
            parent.rmdir()
    for name, content in journal.backups.items():
        target = project / name
        if content is None:
            target.unlink(missing_ok=True)
        else:
            target.write_text(content)
    if abandoned is not None and abandoned != _workspace_version(project):  # never committed: gone, nothing to push
        DatasetRepo(settings).forget_uncommitted(abandoned)
        if version_images(settings, abandoned, deepen=False) is None:  # no commit names it: a report of nothing
            shutil.rmtree(settings.dataset_report_dir(abandoned), ignore_errors=True)
    # a kill between `git add` and `git commit` leaves the version files staged: unstage them (the index as at HEAD)
    unstaged = git(project, "reset", "-q", "--", *journal.backups, check=False)
    if unstaged.returncode != 0:
        log.warning("could not unstage %s (%s); `git reset -- %s` does it", ", ".join(journal.backups),
                    one_line(unstaged.stderr or unstaged.stdout, 200), " ".join(journal.backups))
    path.unlink()
    log.warning("rolled back an interrupted import: removed %d added files, restored %s",
                len(journal.added), ", ".join(journal.backups))
    return True


# ------------------------------------------------------------------ planning


def _unique_name(item: LabelledImage, sha: str, taken: set[str]) -> LabelledImage:
    """Keep the source file name unless another image of the class already has it, or its stem (a.jpg and
    a.bmp would share the mask masks/<class>/a.png)."""
    if item.relpath not in taken and item.mask_relpath not in taken:
        return item
    return LabelledImage(item.path, item.label, item.mask, f"{item.path.stem}-{sha[:8]}{item.path.suffix}")


def plan_additions(existing: list[LabelledImage], existing_sha: list[str], incoming: list[LabelledImage],
                   incoming_sha: list[str]) -> tuple[list[LabelledImage], int]:
    """The incoming images not yet in the dataset (same content, same class), with collision-free names."""
    known = {(item.label, sha) for item, sha in zip(existing, existing_sha, strict=True)}
    taken = {path for item in existing for path in (item.relpath, item.mask_relpath)}
    additions, skipped = [], 0
    for item, sha in zip(incoming, incoming_sha, strict=True):
        if (item.label, sha) in known:
            skipped += 1
            continue
        item = _unique_name(item, sha, taken)
        known.add((item.label, sha))
        taken.update((item.relpath, item.mask_relpath))
        additions.append(item)
    return additions, skipped


# ------------------------------------------------------------------ apply


def _copy_into_data(settings: Settings, additions: list[LabelledImage], journal: Journal,
                    validated: dict[Path, str]) -> None:
    """Copy the new images (and masks) into data/, after journaling every target so a crash can be undone. Each
    image's copy must hold the content validated (`validated`: its sha256), else the import fails and is rolled
    back: a source rewritten between validation and copy must not become a version."""
    data = settings.data_dir
    pairs = []
    for item in additions:
        pairs.append((item.path, data / item.relpath))
        if item.mask is not None:
            pairs.append((item.mask, data / item.mask_relpath))
    clash = next((dst for _, dst in pairs if dst.exists()), None)
    if clash is not None:
        raise DefectOpsError(f"{clash}: already exists; the dataset folder changed under the import, run it again")
    _write_journal(settings, replace(journal, added=[str(dst.relative_to(settings.project_root)) for _, dst in pairs]))
    for src, dst in pairs:
        with replacing(dst) as tmp:
            shutil.copyfile(src, tmp)
            if src in validated and file_sha256(tmp) != validated[src]:
                raise SourceError(f"{src}: changed while it was imported (not the content validated); nothing "
                                  "was changed, import it again once the source is complete")


def _refuse_unreadable_masks(source: str, additions: list[LabelledImage]) -> None:
    """Every defect mask that comes with a new image must decode (training reads them all): the suite checks the
    images, this their masks, before anything is copied."""
    from PIL import Image

    bad = []
    for item in additions:
        if item.mask is None:
            continue
        try:
            with Image.open(item.mask) as mask:
                mask.convert("L")
        except Exception as exc:  # noqa: BLE001 - whatever Pillow says, the mask cannot be trained on
            bad.append(f"{item.mask.name}: {one_line(exc, 160)}")
    if bad:
        more = f" (+{len(bad) - 1} more)" if len(bad) > 1 else ""
        raise ValidationFailed(f"import of {source} refused, nothing changed: the mask {bad[0]} is not a readable "
                               f"image{more}; replace or remove it", bad[1:])


def _check_disk(settings: Settings, additions: list[LabelledImage]) -> None:
    needed = sum(i.path.stat().st_size + (i.mask.stat().st_size if i.mask else 0) for i in additions)
    free = shutil.disk_usage(settings.project_root).free
    if needed * 2.2 > free:  # the workspace copy plus the DVC cache copy
        raise SourceError(
            f"{settings.project_root}: import needs about {needed * 2.2 / 1e6:.0f} MB, only {free / 1e6:.0f} MB free; "
            "free some disk space and import again"
        )


def _without_committed_images(source: str, lost: UsageError, committed_splits: dict[str, str]) -> UsageError:
    """The refusal of an import that could not bring the committed version into data/ first."""
    images = f"the {len(committed_splits)} committed images" if committed_splits else "every committed image"
    return UsageError(f"import of {source} refused, nothing changed: {lost}, then run `defectops data pull`; "
                      f"a version made without them would drop {images}, the golden test split with them")


def _place_report(settings: Settings, version: str, staged: Path) -> Path:
    """The staged validation report (with its manifest.parquet) as the version's, in one rename."""
    report_dir = settings.dataset_report_dir(version)
    if report_dir.exists():
        shutil.rmtree(report_dir)
    report_dir.parent.mkdir(parents=True, exist_ok=True)
    staged.replace(report_dir)
    return report_dir


def _stored_manifest(manifest: pd.DataFrame) -> pd.DataFrame:
    return manifest.drop(columns=["file"])


def import_data(source: str, settings: Settings, params: Params, commit_changes: bool = True,
                push: bool = True, progress: bool = False) -> ImportResult:
    """Validate SOURCE together with the tracked images, then add it as a new dataset version."""
    from components.validation.suite import NEW, class_shares, validate_manifest

    settings.ensure()
    with data_lock(settings):
        recover(settings)
        repo = DatasetRepo(settings)
        repo.ensure_initialised()
        project = settings.project_root
        previous = dataset_version(project)
        lost: UsageError | None = None  # why the committed version could not be brought into data/
        if previous and not (settings.data_dir / "images").is_dir():
            try:
                repo.restore()
            except UsageError as exc:  # only a source holding exactly that version may go on (checked below)
                lost = exc
        elif problem := workspace_problem(settings):  # a new version must extend the committed one
            raise UsageError(problem)
        existing: list[LabelledImage] = discover(settings.data_dir)[1] if (settings.data_dir / "images").is_dir() else []
        workers = cpu_workers(settings)
        existing_facts = inspect([i.path for i in existing], params.data.max_image_pixels, settings.cache_dir, workers)

        with open_source(source, settings.staging_dir) as root:
            _, incoming = discover(root)
            incoming_facts = inspect([i.path for i in incoming], params.data.max_image_pixels,
                                     settings.cache_dir, workers, progress)
            additions, skipped = plan_additions(existing, existing_facts["sha256"].tolist(), incoming,
                                                incoming_facts["sha256"].tolist())
            if not additions:
                retried = repo.retry_pending() if push else None
                return ImportResult(previous, previous, 0, skipped, False,
                                    pushed=retried.pushed if retried else None,
                                    push_message=retried.message if retried else "")

            _refuse_unreadable_masks(source, additions)
            committed_splits = read_splits(settings.splits_file)
            if lost is not None and {item.relpath for item in additions} != set(committed_splits):
                raise _without_committed_images(source, lost, committed_splits)
            manifest = build_manifest(existing + additions, params.profile.grouping, params.data.split,
                                      params.base.seed, params.data.max_image_pixels, settings.cache_dir, workers,
                                      previous_splits=committed_splits, progress=progress)
            old_rows = manifest["path"].isin({i.relpath for i in existing})
            previous_shares = class_shares(manifest[old_rows]) if old_rows.any() else None
            staging_report = Path(tempfile.mkdtemp(prefix="report-", dir=settings.staging_dir))
            report = validate_manifest(manifest.assign(**{NEW: ~old_rows}), params.profile, params.validate_,
                                       previous_shares, staging_report)
            if not report.success:
                shutil.rmtree(staging_report, ignore_errors=True)
                more = f" (+{len(report.failures) - 1} more failed expectations, listed below)" \
                    if len(report.failures) > 1 else ""
                raise ValidationFailed(f"import of {source} refused, nothing changed: {report.failures[0]}{more}",
                                       report.failures[1:])

            _check_disk(settings, additions)
            backups = {name: (project / name).read_text() if (project / name).is_file() else None
                       for name in VERSION_FILES}
            journal = Journal([], backups, head_commit(project))
            try:
                _copy_into_data(settings, additions, journal,
                                dict(zip((i.path for i in incoming), incoming_facts["sha256"], strict=True)))
                version = repo.add()
                if lost is not None and version != previous:  # the committed names, other pictures
                    raise _without_committed_images(source, lost, committed_splits)
                write_splits(manifest, settings.splits_file)
                # the report in place before the commit: a version that is committed (and kept by `recover`,
                # whatever stops the import after) always has its report and manifest.parquet
                _stored_manifest(manifest).to_parquet(staging_report / "manifest.parquet", index=False)
                report_dir = _place_report(settings, version, staging_report)
                commit_id = None
                if commit_changes:
                    message = f"data: version {version} (+{len(additions)} images from {Path(source).name or source})"
                    commit_id = commit(project, list(VERSION_FILES), message)
                repo.mark_unpushed(version, commit_id)  # before the journal goes and the push starts
            except BaseException as exc:
                recover(settings)
                shutil.rmtree(staging_report, ignore_errors=True)
                if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                    raise SourceError(f"{settings.project_root}: disk full during import; nothing was changed, "
                                      "free some space and import again") from exc
                raise
            journal_path(settings).unlink(missing_ok=True)

        result = ImportResult(version, previous, len(additions), skipped, version != previous,
                              committed=commit_id,
                              report_dir=report_dir, counts=manifest["label"].value_counts().sort_index().to_dict())
        if push:
            outcome = repo.push(version, commit_id)
            result.pushed, result.push_message = outcome.pushed, outcome.message
        return result
