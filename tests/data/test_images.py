"""The one conversion rule: every supported mode becomes (H, W, 3) uint8; bad input is refused by name."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.data.images import decode, image_stats
from components.errors import ImageError


def _bytes(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_sixteen_bit_is_scaled_to_eight_bit() -> None:
    array = np.full((8, 10), 65535, dtype=np.uint16)
    array[:, :5] = 257 * 100
    out = decode(_bytes(Image.fromarray(array), "PNG"))
    assert out.rgb.shape == (8, 10, 3) and out.rgb.dtype == np.uint8
    assert out.rgb[0, 0].tolist() == [100, 100, 100] and out.rgb[0, 9].tolist() == [255, 255, 255]
    assert out.mode.startswith("I")


@pytest.mark.parametrize(("mode", "fmt"), [("CMYK", "JPEG"), ("RGBA", "PNG"), ("P", "PNG"), ("L", "JPEG"),
                                           ("LA", "PNG"), ("1", "PNG"), ("RGB", "BMP"), ("RGB", "TIFF")])
def test_every_mode_becomes_rgb(mode: str, fmt: str) -> None:
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (12, 16, 3), dtype=np.uint8))
    out = decode(_bytes(rgb.convert(mode), fmt))
    assert out.rgb.shape == (12, 16, 3) and out.rgb.dtype == np.uint8 and out.width == 16 and out.height == 12


def test_rgba_drops_alpha_and_keeps_colour() -> None:
    image = Image.new("RGBA", (4, 4), (200, 10, 20, 0))
    assert decode(_bytes(image, "PNG")).rgb[0, 0].tolist() == [200, 10, 20]


def test_grayscale_is_copied_to_three_channels() -> None:
    out = decode(_bytes(Image.new("L", (5, 5), 77), "PNG"))
    assert out.channels == 1 and out.rgb[2, 2].tolist() == [77, 77, 77]


@pytest.mark.parametrize(("mode", "gray"), [("L", True), ("LA", True), ("1", True), ("I;16", True),
                                            ("RGB", False), ("P", False), ("CMYK", False)])
def test_grayscale_originals_also_keep_their_one_channel(mode: str, gray: bool) -> None:
    """`pixels` is the fewest channels: the single gray channel, or RGB; both give the same statistics."""
    rng = np.random.default_rng(1)
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65535, (12, 16), dtype=np.uint16))
    else:
        image = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).convert(mode)
    out = decode(_bytes(image, "TIFF" if mode == "CMYK" else "PNG"))
    assert (out.gray is not None) == gray
    if gray:
        assert out.pixels is out.gray and out.gray.shape == (12, 16)
        assert np.array_equal(np.repeat(out.gray[:, :, None], 3, axis=2), out.rgb)
    else:
        assert out.pixels is out.rgb
    assert image_stats(out.pixels) == pytest.approx(image_stats(out.rgb), rel=1e-6)


def test_bad_input_is_refused_with_the_file_name(tmp_path: Path) -> None:
    good = _bytes(Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")
    cases = {"truncated.jpg": (good[: len(good) // 2], "truncated"), "empty.jpg": (b"", "empty file"),
             "notes.jpg": (b"this is text, not a picture", "not an image")}
    for name, (raw, message) in cases.items():
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(ImageError, match=rf"{name}: .*{message}"):
            decode(tmp_path / name)


def test_decompression_bomb_is_refused_before_decoding() -> None:
    raw = _bytes(Image.new("L", (2000, 2000)), "PNG")
    with pytest.raises(ImageError, match="exceeds the limit of 1000000"):
        decode(raw, max_pixels=1_000_000)
    # past Pillow's own bomb limit (89 MP), Pillow refuses first: the message still names ours
    huge = _bytes(Image.new("L", (12000, 12000)), "PNG")
    with pytest.raises(ImageError, match=r"144000000 pixels exceeds the limit of 40000000 \(data.max_image_pixels\)"):
        decode(huge, max_pixels=40_000_000)


def test_stats_follow_the_image() -> None:
    flat = image_stats(np.full((32, 32, 3), 100, np.uint8))
    assert flat == {"brightness": 100.0, "contrast": 0.0, "sharpness": 0.0}
    noisy = image_stats(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    assert noisy["contrast"] > 30 and noisy["sharpness"] > 1000


def _jpeg_with_exif(pixels: np.ndarray, entries: list[tuple[int, int, int, bytes]]) -> bytes:
    """A JPEG whose EXIF block holds these raw (tag, type, count, 4-byte value) entries, as a camera writes them."""
    import struct

    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHI", tag, kind, count) + value
                                                    for tag, kind, count, value in entries) + struct.pack("<I", 0)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=100, exif=b"Exif\0\0II*\0" + struct.pack("<I", 8) + ifd)
    return buffer.getvalue()


@pytest.mark.parametrize("malformed", [False, True], ids=["plain", "with-a-malformed-tag"])
def test_exif_orientation_is_applied_even_beside_a_malformed_tag(malformed: bool) -> None:
    """Orientation 6 (the camera turned a quarter): the picture comes out upright. A real camera's file may also
    hold a tag of the wrong type (ExtraSamples as text), on which Pillow's exif_transpose raised struct.error,
    a 500 in the service and a crash of validation, instead of a decoded picture."""
    pixels = np.zeros((20, 40), np.uint8)
    pixels[:, :20] = 255  # bright left half
    rotate = (274, 3, 1, bytes([6, 0, 0, 0]))  # SHORT 6
    entries = [rotate, (338, 2, 4, b"cam\0")] if malformed else [rotate]
    out = decode(_jpeg_with_exif(pixels, entries))
    assert out.pixels.shape == (40, 20), "turned upright: taller than wide"
    assert out.pixels[5, 10] > 200 and out.pixels[35, 10] < 50, "the bright half on top, as a quarter turn puts it"
