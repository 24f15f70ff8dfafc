"""Errors a user can act on: each carries a one-line message that names the problem and the fix."""

from __future__ import annotations

import re

ANSI_CODE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # a terminal colour or cursor code some libraries put in messages


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


class ModelNotFound(DefectOpsError):
    """The registry answered, and has no such model version or alias (no champion yet, a version never made)."""


class ConcurrentRunError(DefectOpsError):
    """Another defectops process holds the lock this command needs, or changed what this command was reading."""


class PicturesChanged(ConcurrentRunError):
    """A `data pull` changed or removed pictures of data/ while a command read them (TrackedData.still_there)."""


def one_line(text: object, limit: int = 240) -> str:
    """A library's message on one line (whitespace runs collapsed, terminal colour codes removed), cut at `limit`
    characters."""
    flat = " ".join(ANSI_CODE.sub("", str(text)).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def first_validation_error(exc: Exception) -> str:
    """`key.path: message` of a pydantic ValidationError's first error, without the input dump and URL pydantic
    appends; other exceptions: their first line."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            first = errors()[0]
        except (IndexError, TypeError):
            first = None
        if first:
            where = ".".join(str(part) for part in first.get("loc", ()))
            message = str(first.get("msg", "")).removeprefix("Value error, ")
            return one_line(f"{where}: {message}" if where else message)
    return one_line(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)

