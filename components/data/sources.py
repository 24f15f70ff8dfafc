"""Turn a SOURCE argument (folder, .zip/.tar.gz archive, http(s) URL) into a local folder, safely.

Archives are checked entry by entry before anything is extracted: absolute paths, `..` and links that lead
outside are refused, and so is an archive that would not fit on the disk. Downloads and extractions go to a
private folder under the state root and are removed afterwards.
"""

from __future__ import annotations

import logging
import shutil
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from components.errors import SourceError, UsageError, one_line

log = logging.getLogger(__name__)

ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz", ".tar")
DOWNLOAD_TIMEOUT_S = 30.0


def is_url(source: str) -> bool:
    return urlparse(source).scheme in ("http", "https")


def _archive_kind(path: Path) -> str | None:
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic.startswith(b"PK"):
        return "zip"
    if magic.startswith(b"\x1f\x8b") or tarfile.is_tarfile(path):
        return "tar"
    return None


def _unsafe(name: str) -> bool:
    posix = PurePosixPath(name.replace("\\", "/"))
    return posix.is_absolute() or ".." in posix.parts or (len(name) > 1 and name[1] == ":")


def _check_space(folder: Path, needed: int, what: str) -> None:
    free = shutil.disk_usage(folder).free
    if needed * 1.1 > free:
        raise SourceError(
            f"{what}: needs {needed / 1e6:.0f} MB but only {free / 1e6:.0f} MB are free on {folder}; "
            "free some space or point DEFECTOPS_HOME to a larger disk"
        )


def _check_names(archive: Path, entries: list[tuple[str, bool]]) -> None:
    """Refuse an archive whose entries would overwrite each other: one name twice (the last would win without a
    word), or a file whose name is also a folder's."""
    files, folders = set(), set()
    for name, is_dir in entries:
        path = PurePosixPath(name.replace("\\", "/"))
        if not is_dir and path in files:
            raise SourceError(f"{archive.name}: entry {name!r} is in the archive twice; which one is meant is "
                              "unknown, rebuild the archive")
        (folders if is_dir else files).add(path)
        folders.update(path.parents)
    clash = next((path for path in files if path in folders), None)
    if clash is not None:
        raise SourceError(f"{archive.name}: {str(clash)!r} is both a file and a folder in the archive; rebuild it")


def extract_archive(archive: Path, dest: Path) -> Path:
    """Extract `archive` into `dest` after checking every entry; returns `dest`. A damaged or odd archive is a
    one-line SourceError, never a traceback."""
    kind = _archive_kind(archive)
    try:
        if kind == "zip":
            with zipfile.ZipFile(archive) as zf:
                total = 0
                for info in zf.infolist():
                    is_link = (info.external_attr >> 16) & 0o170000 == 0o120000
                    if _unsafe(info.filename) or is_link:
                        why = "is a symlink" if is_link else "escapes the archive (absolute path or ..)"
                        raise SourceError(f"{archive.name}: entry {info.filename!r} {why}; refusing to extract it")
                    total += info.file_size
                _check_names(archive, [(info.filename, info.is_dir()) for info in zf.infolist()])
                _check_space(dest.parent, total, archive.name)
                zf.extractall(dest)
        elif kind == "tar":
            with tarfile.open(archive) as tf:
                members = tf.getmembers()
                for m in members:
                    link_escapes = (m.issym() or m.islnk()) and (
                        _unsafe(m.linkname) or not _inside(dest, dest / Path(m.name).parent / m.linkname))
                    if _unsafe(m.name) or link_escapes:
                        why = "links outside the archive" if link_escapes else "escapes the archive (absolute path or ..)"
                        raise SourceError(f"{archive.name}: entry {m.name!r} {why}; refusing to extract it")
                _check_names(archive, [(m.name, m.isdir()) for m in members])
                _check_space(dest.parent, sum(m.size for m in members), archive.name)
                tf.extractall(dest, filter="data")
        else:
            raise SourceError(f"{archive}: not a .zip or .tar.gz archive; give a folder, a .zip or a .tar.gz")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error) as exc:
        raise SourceError(f"{archive.name}: damaged archive ({one_line(exc)}); download it again") from exc
    except RuntimeError as exc:  # zipfile: an encrypted entry without a password
        raise SourceError(f"{archive.name}: cannot extract it ({one_line(exc)}); give an unencrypted archive") \
            from exc
    return dest


def _inside(root: Path, path: Path) -> bool:
    return path.resolve().is_relative_to(root.resolve())


def download(url: str, dest: Path) -> Path:
    """Download `url` to a file in `dest` (streamed, with a timeout); an unreachable URL is a SourceError."""
    import httpx

    name = Path(urlparse(url).path).name or "download"
    target = dest / name
    partial = dest / f".{name}.part"
    try:
        with httpx.stream("GET", url, follow_redirects=True, timeout=DOWNLOAD_TIMEOUT_S) as response:
            response.raise_for_status()
            size = int(response.headers.get("content-length") or 0)
            if size:
                _check_space(dest, size, url)
            with partial.open("wb") as handle:
                for chunk in response.iter_bytes(1 << 20):
                    handle.write(chunk)
    except httpx.HTTPStatusError as exc:
        raise SourceError(f"{url}: server answered {exc.response.status_code}; check the address") from exc
    except httpx.HTTPError as exc:
        raise SourceError(
            f"{url}: unreachable ({type(exc).__name__}: {exc}); check the network or import a local copy"
        ) from exc
    partial.replace(target)
    return target


def check_local_source(source: str) -> None:
    """A local source that does not exist is a usage error (URLs are checked when they are fetched)."""
    if not is_url(source) and not Path(source).expanduser().exists():
        raise UsageError(f"{source}: no such file or folder; give a folder, a .zip/.tar.gz archive or an http(s) URL")


@contextmanager
def open_source(source: str, staging: Path) -> Iterator[Path]:
    """A local folder holding the source's images, valid inside the `with` block."""
    if is_url(source):
        staging.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=staging, prefix="download-") as tmp:
            archive = download(source, Path(tmp))
            yield extract_archive(archive, Path(tmp) / "extracted")
        return
    check_local_source(source)
    path = Path(source).expanduser()
    if path.is_dir():
        yield path.resolve()
        return
    staging.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=staging, prefix="extract-") as tmp:
        yield extract_archive(path, Path(tmp) / "extracted")
