"""Errors a user can act on: each carries a one-line message that names the problem and the fix."""

from __future__ import annotations


class DefectOpsError(Exception):
    """A failure the user can fix; the CLI prints its message on one line and exits with `exit_code`."""

    exit_code = 1


class UsageError(DefectOpsError):
    """The command was called wrongly (bad option, missing file, unknown source)."""

    exit_code = 2


class ImageError(DefectOpsError):
    """A file is not a usable image (unreadable, truncated, too large, not an image at all)."""


class SourceError(DefectOpsError):
    """A data source cannot be read safely (unsafe archive, unreachable URL, unknown layout)."""


class ValidationFailed(DefectOpsError):
    """A dataset failed its Great Expectations suite; `failures` lists what failed and where."""

    def __init__(self, message: str, failures: list[str] | None = None) -> None:
        super().__init__(message)
        self.failures = failures or []


class ConcurrentRunError(DefectOpsError):
    """Another defectops process holds the lock this command needs."""
