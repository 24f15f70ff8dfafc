"""Sources: layouts, safe archive extraction, URLs served on 127.0.0.1."""

from __future__ import annotations

import functools
import http.server
import io
import os
import shutil
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest

from components.data.layout import detect_layout, discover
from components.data.sources import open_source
from components.errors import SourceError, UsageError
from tests.conftest import make_imagefolder, write_image


@pytest.fixture
def served(tmp_path: Path):
    """An HTTP server on 127.0.0.1 serving tmp_path/www; yields its base URL."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_imagefolder_layout(tmp_path: Path) -> None:
    make_imagefolder(tmp_path / "src", per_class=2)
    layout, items = discover(tmp_path / "src")
    assert layout == "imagefolder"
    assert sorted({i.label for i in items}) == ["dent", "normal", "scratch"]
    assert items[0].relpath == "images/dent/img_000.png"


def test_magnetic_tile_layout_pairs_masks_and_never_takes_them_for_images(tmp_path: Path) -> None:
    imgs = tmp_path / "archive-root" / "MT_Crack" / "Imgs"
    write_image(imgs / "exp1_num_10.jpg", 1)
    write_image(imgs / "exp1_num_10.png", 2, mode="L")
    write_image(tmp_path / "archive-root" / "MT_Free" / "Imgs" / "exp1_num_99.jpg", 3)
    layout, base = detect_layout(tmp_path)  # one top-level folder, as in the upstream archive
    assert layout == "magnetic-tile" and base.name == "archive-root"
    _, items = discover(tmp_path)
    assert [(i.label, i.path.name, i.mask.name if i.mask else None) for i in items] == [
        ("Crack", "exp1_num_10.jpg", "exp1_num_10.png"), ("Free", "exp1_num_99.jpg", None)]


def test_empty_class_folder_is_named(tmp_path: Path) -> None:
    make_imagefolder(tmp_path / "src", per_class=2)
    (tmp_path / "src" / "crack").mkdir()
    with pytest.raises(SourceError, match=r"crack.*holds no images"):
        discover(tmp_path / "src")


def test_symlink_outside_the_source_is_refused(tmp_path: Path) -> None:
    make_imagefolder(tmp_path / "src", per_class=2)
    outside = write_image(tmp_path / "elsewhere.png", 5)
    os.symlink(outside, tmp_path / "src" / "dent" / "link.png")
    with pytest.raises(SourceError, match=r"link.png: symlink points outside the source"):
        discover(tmp_path / "src")


def test_zip_and_tar_archives(tmp_path: Path) -> None:
    src = make_imagefolder(tmp_path / "parts", per_class=2)
    zipped = shutil.make_archive(str(tmp_path / "parts"), "zip", tmp_path, "parts")
    tarred = shutil.make_archive(str(tmp_path / "parts"), "gztar", tmp_path, "parts")
    for archive in (zipped, tarred):
        with open_source(archive, tmp_path / "staging") as root:
            layout, items = discover(root)
            assert layout == "imagefolder" and len(items) == 6
    assert not any((tmp_path / "staging").iterdir()), "extraction folders are removed afterwards"
    assert src.is_dir()


@pytest.mark.parametrize("name", ["../evil.png", "/abs/evil.png"])
def test_archive_entries_escaping_are_refused(tmp_path: Path, name: str) -> None:
    zip_path = tmp_path / "evil.zip"
    with zipfile.ZipFile(zip_path, "w") as zf:
        zf.writestr("ok/a.png", b"x")
        zf.writestr(name, b"x")
    with pytest.raises(SourceError, match="escapes the archive"), open_source(str(zip_path), tmp_path / "st"):
        pass
    tar_path = tmp_path / "evil.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tf:
        info = tarfile.TarInfo(name)
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(SourceError, match="escapes the archive"), open_source(str(tar_path), tmp_path / "st"):
        pass
    assert not (tmp_path / "evil.png").exists()


def test_damaged_or_self_overwriting_archives_are_one_line_errors(tmp_path: Path) -> None:
    """A truncated zip or tar.gz, a name twice, a file that is also a folder: each a one-line SourceError naming
    the archive (not a BadZipFile, EOFError or IsADirectoryError traceback, nor a silent last-one-wins)."""
    import warnings

    src = make_imagefolder(tmp_path / "parts", per_class=2)
    zipped = Path(shutil.make_archive(str(tmp_path / "parts"), "zip", tmp_path, "parts"))
    tarred = Path(shutil.make_archive(str(tmp_path / "parts"), "gztar", tmp_path, "parts"))
    for archive in (zipped, tarred):
        cut = tmp_path / f"cut-{archive.name}"
        cut.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
        with pytest.raises(SourceError, match=rf"^{cut.name}: damaged archive .*; download it again$"), \
                open_source(str(cut), tmp_path / "st"):
            pass
    twice, both = tmp_path / "twice.zip", tmp_path / "both.zip"
    with warnings.catch_warnings(), zipfile.ZipFile(twice, "w") as zf:
        warnings.simplefilter("ignore")  # zipfile warns of the duplicate name it writes
        zf.writestr("parts/dent/a.png", (src / "dent" / "img_000.png").read_bytes())
        zf.writestr("parts/dent/a.png", (src / "dent" / "img_001.png").read_bytes())
    with zipfile.ZipFile(both, "w") as zf:
        zf.writestr("parts/dent/a.png", b"x")
        zf.writestr("parts/dent/a.png/", b"")
    with pytest.raises(SourceError, match="'parts/dent/a.png' is in the archive twice"), \
            open_source(str(twice), tmp_path / "st"):
        pass
    with pytest.raises(SourceError, match="'parts/dent/a.png' is both a file and a folder"), \
            open_source(str(both), tmp_path / "st"):
        pass


def test_tar_symlink_leading_outside_is_refused(tmp_path: Path) -> None:
    tar_path = tmp_path / "link.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tf:
        info = tarfile.TarInfo("parts/dent/a.png")
        info.type, info.linkname = tarfile.SYMTYPE, "../../../etc/passwd"
        tf.addfile(info)
    with pytest.raises(SourceError, match="links outside"), open_source(str(tar_path), tmp_path / "st"):
        pass


def test_url_archive_on_localhost(tmp_path: Path, served) -> None:
    www, base = served
    make_imagefolder(tmp_path / "parts", per_class=2)
    shutil.make_archive(str(www / "parts"), "zip", tmp_path, "parts")
    with open_source(f"{base}/parts.zip", tmp_path / "staging") as root:
        assert len(discover(root)[1]) == 6


def test_unreachable_url_and_missing_path(tmp_path: Path, served) -> None:
    _, base = served
    with pytest.raises(SourceError, match="server answered 404"), open_source(f"{base}/nope.zip", tmp_path / "s"):
        pass
    with pytest.raises(SourceError, match="unreachable"), open_source("http://127.0.0.1:9/x.zip", tmp_path / "s"):
        pass
    with pytest.raises(UsageError, match="no such file or folder"), open_source(str(tmp_path / "none"), tmp_path):
        pass
