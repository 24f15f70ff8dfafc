"""Dataset versions with DVC (add, push to the configured remote) and git (commit data.dvc).

The version id is the DVC `.dir` md5 of `data/`. Every new version is recorded in
`$DEFECTOPS_HOME/state/unpushed.json` (with its commit) before its push starts, and leaves it only once the remote
holds it, so a failed or interrupted push, or an import with `--no-push`, leaves it for the next import (or
`defectops data push`), which pushes each version from its own commit.
"""

from __future__ import annotations

import json
import logging
import posixpath
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from components.config import Settings
from components.errors import DefectOpsError, UsageError, one_line
from components.files import write_text_atomic

log = logging.getLogger(__name__)

REMOTE_NAME = "defectops"
FALLBACK_IDENTITY = ("defectops", "defectops@localhost")
DVC_LOGGERS = ("dvc", "dvc_objects", "dvc_data")  # the loggers `dvc.logger.setup` gives DVC's console handlers


@dataclass(frozen=True)
class PushOutcome:
    pushed: bool
    message: str


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(" ".join(record.getMessage().split()))


@contextmanager
def dvc_console() -> Iterator[list[str]]:
    """DVC's console output during a call: its hints dropped ("To track the changes with git, run: git add
    data.dvc": defectops commits itself), its warnings logged once when the block ends (left alone, DVC prints
    each twice: through its own handler and through the root logger's). When the block raises, they are not
    logged: the caller has the list to name DVC's reason in its own one-line error."""
    loggers = [logging.getLogger(name) for name in DVC_LOGGERS]
    saved = [(logger.handlers[:], logger.propagate) for logger in loggers]
    collect = _Collect()
    for logger in loggers:
        logger.handlers, logger.propagate = [collect], False
    try:
        yield collect.messages
    finally:
        for logger, (handlers, propagate) in zip(loggers, saved, strict=True):
            logger.handlers, logger.propagate = handlers, propagate
    for warning in collect.messages:
        log.warning("dvc: %s", warning)


def git(project: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run git in the project; failures become one-line errors."""
    result = subprocess.run(["git", *args], cwd=project, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise DefectOpsError(f"git {' '.join(args[:2])} failed in {project}: {detail[-1] if detail else '?'}")
    return result


def _identity_args(project: Path) -> list[str]:
    has_email = git(project, "config", "user.email", check=False).stdout.strip()
    has_name = git(project, "config", "user.name", check=False).stdout.strip()
    if has_email and has_name:
        return []
    log.info("git has no committer identity here; committing as %s <%s>", *FALLBACK_IDENTITY)
    return ["-c", f"user.name={FALLBACK_IDENTITY[0]}", "-c", f"user.email={FALLBACK_IDENTITY[1]}"]


def commit(project: Path, paths: list[str], message: str) -> str | None:
    """Commit exactly `paths` (other staged work is left alone); returns the commit id, None if nothing changed."""
    git(project, "add", "--", *paths)
    if not git(project, "diff", "--cached", "--name-only", "--", *paths).stdout.strip():
        return None
    git(project, *_identity_args(project), "commit", "-q", "-m", message, "--", *paths)
    return git(project, "rev-parse", "HEAD").stdout.strip()


def head_commit(project: Path) -> str | None:
    result = git(project, "rev-parse", "HEAD", check=False)
    return result.stdout.strip() if result.returncode == 0 else None


def _unsaved_files(exc: BaseException) -> str | None:
    """When DVC refused to pull over files of data/ that neither the version nor its cache holds (it would lose
    them; only `force` overrides): the first such file ("" when DVC named none); else None."""
    from dvc.exceptions import CheckoutError, DvcException

    message = str(exc)
    if not isinstance(exc, DvcException) or isinstance(exc, CheckoutError) or "without" not in message \
            or "confirmation" not in message:  # dvc.repo.checkout's refusal, or ConfirmRemoveError
        return None
    named = [line.strip() for line in message.splitlines()[1:] if line.strip()]
    return named[0] if named else ""


class DatasetRepo:
    """The project's DVC repo, configured with the remote of these settings."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.project = settings.project_root
        self.unpushed_file = settings.state_dir / "unpushed.json"

    def ensure_initialised(self) -> None:
        """Check git, init DVC if needed, and point the default remote at the configured URL (local config)."""
        from dvc.repo import Repo

        if git(self.project, "rev-parse", "--show-toplevel", check=False).returncode != 0:
            raise UsageError(f"{self.project}: not a git repository; clone the project or run `git init` there")
        if not (self.project / ".dvc").is_dir():
            with dvc_console():
                Repo.init(str(self.project))
            commit(self.project, [".dvc/config", ".dvc/.gitignore", ".dvcignore"], "Initialise DVC")
        remote = self.settings.dvc_remote_url
        section = {"url": remote}
        if self.settings.dvc_remote_endpoint:
            if not remote.startswith("s3://"):
                raise UsageError(f"DEFECTOPS_DVC_REMOTE_ENDPOINT is set ({self.settings.dvc_remote_endpoint}) but "
                                 f"the DVC remote {remote} is not an s3:// URL; unset the endpoint or set "
                                 "DEFECTOPS_DVC_REMOTE to the bucket, e.g. s3://defectops/dvc")
            section["endpointurl"] = self.settings.dvc_remote_endpoint
        with Repo(str(self.project)) as repo, repo.config.edit("local") as conf:
            conf["core"]["remote"] = REMOTE_NAME
            conf["remote"][REMOTE_NAME] = section

    def add(self) -> str:
        """`dvc add data`; returns the new version id (the `.dir` md5)."""
        from dvc.repo import Repo

        with dvc_console(), Repo(str(self.project)) as repo:
            stages = repo.add(str(self.project / "data"))
            return stages[0].outs[0].hash_info.value

    def restore(self, force: bool = False) -> None:
        """Bring the committed dataset version (data.dvc) into data/: from DVC's cache, else the remote.

        A fresh clone (a Kubernetes training Job's `git_clone`, a colleague's checkout) has data.dvc but no
        data/; the images come from the configured remote. Raises a one-line UsageError when they cannot, or
        (without `force`) when data/ holds files the pull would lose. Interrupted, it leaves no partial data/.
        """
        from dvc.repo import Repo

        from components.data.tracked import dataset_version, pulling

        self.ensure_initialised()
        data_dir = self.settings.data_dir
        was_there = data_dir.exists()
        targets = [str(self.project / "data.dvc")]
        try:
            with dvc_console() as warnings, Repo(str(self.project)) as repo:
                repo.fetch(targets=targets, remote=REMOTE_NAME)  # `dvc pull`, downloading before data/ is touched
                with pulling(self.settings):  # a command reading data/ meanwhile fails rather than mixes
                    try:
                        repo.checkout(targets=targets, force=force)
                    except BaseException:
                        if not was_there:  # a partial checkout must not pass for the dataset
                            shutil.rmtree(data_dir, ignore_errors=True)
                        raise
        except BaseException as exc:  # DVC raises many types for a missing cache or a dead remote; or Ctrl-C
            if not isinstance(exc, Exception):  # Ctrl-C, SIGTERM: cleaned up, now stop
                raise
            if not force and was_there and (unsaved := _unsaved_files(exc)) is not None:
                if unsaved and Path(unsaved).is_relative_to(self.project):
                    unsaved = str(Path(unsaved).relative_to(self.project))
                example = f" (e.g. {unsaved})" if unsaved else ""
                raise UsageError(
                    f"{data_dir} holds changes that are in neither the committed dataset version "
                    f"{dataset_version(self.project)} nor DVC's cache{example}, so a pull would lose them; "
                    "`defectops data pull --force` brings the committed version, discarding them (move them out "
                    "of data/ first to keep them)"
                ) from exc
            reason = one_line("; ".join([*warnings[:1], str(exc) or type(exc).__name__]), 300)
            raise UsageError(
                f"the committed dataset version {dataset_version(self.project)} could not be brought into "
                f"{self.settings.data_dir} from the cache or {self.settings.dvc_remote_url} ({reason}); set "
                "DEFECTOPS_DVC_REMOTE (and the endpoint and credentials) to the remote it was pushed to"
            ) from exc

    def push(self, version: str, commit_id: str | None) -> PushOutcome:
        """Push `version` and every earlier unpushed one. Each is recorded in unpushed.json first and leaves it only
        once the remote holds it: a failure, Ctrl-C or kill midway keeps it for the next run."""
        self.mark_unpushed(version, commit_id)
        return self._push_unpushed()

    def _push_unpushed(self) -> PushOutcome:
        """Push each unpushed version from what names it: data.dvc for the workspace version, else its commit."""
        from dvc.repo import Repo

        from components.data.tracked import dataset_version

        current = dataset_version(self.project)
        pushed: list[str] = []
        failures: dict[str, str] = {}
        stranded: list[str] = []
        with dvc_console() as warnings, Repo(str(self.project)) as repo:
            # data.dvc as a commit's tree names it (a relative target would follow the working directory)
            at_rev = posixpath.join("/", *self.project.resolve().relative_to(Path(repo.scm.root_dir).resolve()).parts,
                                    "data.dvc")
            for version, commit_id in self._unpushed().items():
                source = None if version == current else self._commit_naming(version, commit_id)
                if version != current and source is None:
                    stranded.append(self._nothing_to_push_from(version, commit_id))
                    continue
                seen = len(warnings)
                try:
                    if source is None:  # the version data.dvc names now
                        repo.push(targets=[str(self.project / "data.dvc")], remote=REMOTE_NAME)
                    else:  # an earlier version: its own commit's data.dvc, not the workspace's
                        repo.push(targets=[at_rev], remote=REMOTE_NAME, revs=[source], workspace=False)
                except Exception as exc:  # DVC raises many types for a dead remote  # noqa: BLE001
                    failures[version] = f"{type(exc).__name__}: {one_line(exc, 200)}"
                    continue
                # DVC only warns when files of the version are missing here and on the remote: not pushed
                if missing := [w for w in warnings[seen:] if "Missing cache files" in w]:
                    failures[version] = f"dataset version {version}: {one_line(missing[0], 200)}"
                    continue
                self.forget_unpushed(version)
                pushed.append(version)
        url = self.settings.dvc_remote_url
        if failures:  # the commit waits too: a shared data.dvc must never name images the remote lacks
            kept = "the version is" if len(failures) == 1 else f"{len(failures)} versions are"
            return PushOutcome(False, f"push to {url} failed ({failures[next(iter(failures))]}); {kept} kept locally "
                                      "and the next import or `defectops data push` retries")
        parts = [f"pushed to {url}"] if pushed else []
        shared = self.push_commits()  # every committed version is on the remote now
        if shared is not None:
            parts.append(shared.message)
        return PushOutcome(not stranded and (shared is None or shared.pushed), "; ".join(parts + stranded))

    def _commit_naming(self, version: str, commit_id: str | None) -> str | None:
        """A commit whose data.dvc names `version`: the recorded one, else one in data.dvc's history (a version
        imported with --no-commit and committed by hand); None when none does."""
        if commit_id and _version_at(self.project, commit_id) == version:
            return commit_id
        return next((rev for rev, md5 in _data_dvc_history(self.project, 50) if md5 == version), None)

    def _nothing_to_push_from(self, version: str, commit_id: str | None) -> str:
        """Why an unpushed version that neither data.dvc nor a commit names stays unpushed, and what to do."""
        why = (f"its commit {commit_id[:8]} is no longer in this repository" if commit_id else
               "it was imported with --no-commit")
        return (f"dataset version {version} not pushed: {why} and neither data.dvc nor a commit names it, so there "
                "is nothing to push it from; it stays unpushed: put its data.dvc back (e.g. `git stash pop`) and run "
                f"`defectops data push`, or, if it is abandoned, delete its entry from {self.unpushed_file}")

    def push_commits(self) -> PushOutcome | None:
        """Push this branch's dataset commits to the git remote `DEFECTOPS_GIT_REMOTE` (None when unset), so a
        fresh clone (a colleague's, a Kubernetes training Job's) gets the new data.dvc and splits.csv."""
        remote = self.settings.git_remote
        if not remote:
            return None
        branch = git(self.project, "symbolic-ref", "--quiet", "--short", "HEAD", check=False).stdout.strip()
        if not branch:
            self._mark_git_pending(remote)
            return PushOutcome(False, f"git push to {remote} skipped: HEAD is detached in {self.project}; check out "
                                      "a branch, then `defectops data push`")
        result = git(self.project, "push", "--quiet", remote, f"HEAD:refs/heads/{branch}", check=False)
        if result.returncode == 0:
            self.git_pending_file.unlink(missing_ok=True)
            return PushOutcome(True, f"{branch} pushed to git remote {remote}")
        self._mark_git_pending(remote)
        lines = [line.strip() for line in (result.stderr or result.stdout).splitlines() if line.strip()]
        if any("[rejected]" in line or "non-fast-forward" in line for line in lines):
            return PushOutcome(False, f"git push to {remote} ({branch}) was rejected: the remote branch has commits "
                                      f"this checkout lacks; run `git pull --rebase {remote} {branch}` in "
                                      f"{self.project}, then `defectops data push`")
        reason = next((line for line in lines if line.startswith(("fatal:", "error:"))), lines[-1] if lines else "?")
        return PushOutcome(False, f"git push to {remote} ({branch}) failed ({reason}); the commit is kept locally "
                                  "and the next import or `defectops data push` retries")

    @property
    def git_pending_file(self) -> Path:
        return self.settings.state_dir / "git-unpushed"

    def _mark_git_pending(self, remote: str) -> None:
        self.git_pending_file.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.git_pending_file, remote)

    def retry_pending(self) -> PushOutcome | None:
        """Push the versions (and dataset commits) not yet on the remote; None when there are none."""
        if not self._unpushed():
            return self.push_commits() if self.git_pending_file.is_file() else None
        return self._push_unpushed()

    def mark_unpushed(self, version: str, commit_id: str | None) -> None:
        """Remember a version for the next push (`defectops data push`, or the next import)."""
        pending = self._unpushed()
        pending[version] = commit_id or pending.get(version)
        self._save_unpushed(pending)

    def forget_unpushed(self, version: str) -> None:
        """Drop a version from the unpushed ones: the remote holds it, or it no longer exists."""
        pending = self._unpushed()
        if version in pending:
            del pending[version]
            self._save_unpushed(pending)

    def forget_uncommitted(self, version: str) -> None:
        """Drop a version that no commit records from the unpushed ones (an import rolled back before its commit)."""
        pending = self._unpushed()
        if version in pending and pending[version] is None:
            self.forget_unpushed(version)

    def unpushed_versions(self) -> list[str]:
        return list(self._unpushed())

    def unpushed_commits(self) -> str | None:
        """The git remote that dataset commits are waiting for, if a push to it failed."""
        return self.git_pending_file.read_text().strip() if self.git_pending_file.is_file() else None

    def _unpushed(self) -> dict[str, str | None]:
        if not self.unpushed_file.is_file():
            return {}
        return json.loads(self.unpushed_file.read_text())

    def _save_unpushed(self, pending: dict[str, str | None]) -> None:
        self.unpushed_file.parent.mkdir(parents=True, exist_ok=True)
        if not pending:
            self.unpushed_file.unlink(missing_ok=True)
            return
        write_text_atomic(self.unpushed_file, json.dumps(pending, indent=2))


def _version_at(project: Path, rev: str) -> str | None:
    """The dataset version (`.dir` md5) that data.dvc names at commit `rev`; None when it names none, or `rev` is
    not in the repository."""
    from components.data.tracked import version_in

    shown = git(project, "show", f"{rev}:data.dvc", check=False)
    return version_in(shown.stdout) if shown.returncode == 0 else None


def _data_dvc_history(project: Path, limit: int) -> Iterator[tuple[str, str]]:
    """(commit, dataset version) of the last `limit` commits that changed data.dvc, newest first."""
    for rev in git(project, "log", "--format=%H", "-n", str(limit), "--", "data.dvc", check=False).stdout.split():
        if md5 := _version_at(project, rev):
            yield rev, md5


def previous_version(project: Path, current: str | None) -> str | None:
    """The dataset version committed before `current` (from the git history of data.dvc)."""
    return next((md5 for _, md5 in _data_dvc_history(project, 20) if md5 != current), None)
