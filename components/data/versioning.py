"""Dataset versions with DVC (add, push to the configured remote) and git (commit data.dvc).

The version id is the DVC `.dir` md5 of `data/`. A version whose push failed is remembered in
`$DEFECTOPS_HOME/state/unpushed.json` and pushed by the next import (or `defectops data push`).
"""

from __future__ import annotations

import json
import logging
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
        data/; the images come from the configured remote. Raises a one-line UsageError when they cannot.
        """
        from dvc.repo import Repo

        from components.data.tracked import dataset_version

        self.ensure_initialised()
        data_dir = self.settings.data_dir
        was_there = data_dir.exists()
        try:
            with dvc_console() as warnings, Repo(str(self.project)) as repo:
                repo.pull(targets=[str(self.project / "data.dvc")], remote=REMOTE_NAME, force=force)
        except Exception as exc:  # DVC raises many types for a missing cache or a dead remote
            if not was_there:  # a partial checkout must not pass for the dataset
                shutil.rmtree(data_dir, ignore_errors=True)
            reason = one_line("; ".join([*warnings[:1], str(exc) or type(exc).__name__]), 300)
            raise UsageError(
                f"the committed dataset version {dataset_version(self.project)} could not be brought into "
                f"{self.settings.data_dir} from the cache or {self.settings.dvc_remote_url} ({reason}); set "
                "DEFECTOPS_DVC_REMOTE (and the endpoint and credentials) to the remote it was pushed to"
            ) from exc

    def push(self, version: str, commit_id: str | None) -> PushOutcome:
        """Push the workspace version and any earlier unpushed ones; remember failures for the next run."""
        from dvc.repo import Repo

        pending = self._unpushed()
        pending[version] = commit_id
        failures = {}
        with dvc_console(), Repo(str(self.project)) as repo:
            for ver, rev in list(pending.items()):
                try:
                    if ver == version:
                        repo.push(remote=REMOTE_NAME)
                    elif rev:
                        repo.push(remote=REMOTE_NAME, revs=[rev])
                    else:
                        continue  # an uncommitted old version: nothing left to push it from
                    pending.pop(ver)
                except Exception as exc:  # DVC raises many types for a dead remote  # noqa: BLE001
                    failures[ver] = f"{type(exc).__name__}: {one_line(exc, 200)}"
        self._save_unpushed(pending)
        if failures:  # the commit waits too: a shared data.dvc must never name images the remote lacks
            return PushOutcome(False, f"push to {self.settings.dvc_remote_url} failed ({failures[next(iter(failures))]}); "
                                      "the version is kept locally and the next import or `defectops data push` retries")
        pushed = f"pushed to {self.settings.dvc_remote_url}"
        shared = self.push_commits()
        return PushOutcome(True, pushed) if shared is None else PushOutcome(shared.pushed, f"{pushed}; {shared.message}")

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
        """Push versions (and dataset commits) whose push failed earlier; None when there are none."""
        pending = self._unpushed()
        if not pending:
            return self.push_commits() if self.git_pending_file.is_file() else None
        from components.data.tracked import dataset_version

        current = dataset_version(self.project)
        version = current if current in pending else next(iter(pending))
        return self.push(version, pending.get(version))

    def mark_unpushed(self, version: str, commit_id: str | None) -> None:
        """Remember a version for the next push (`defectops data push`, or the next import)."""
        pending = self._unpushed()
        pending[version] = commit_id
        self._save_unpushed(pending)

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


def previous_version(project: Path, current: str | None) -> str | None:
    """The dataset version committed before `current` (from the git history of data.dvc)."""
    import yaml

    log_out = git(project, "log", "--format=%H", "-n", "20", "--", "data.dvc", check=False).stdout.split()
    for rev in log_out:
        shown = git(project, "show", f"{rev}:data.dvc", check=False)
        if shown.returncode != 0:
            continue
        outs = (yaml.safe_load(shown.stdout) or {}).get("outs") or []
        md5 = outs[0].get("md5") if outs else None
        if md5 and md5 != current:
            return md5
    return None
