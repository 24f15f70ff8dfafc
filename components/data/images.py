"""The one image conversion rule shared by validation, training, evaluation and serving.

Rule (documented in README, "Image conversion rule"):
1. Refuse empty input, non-images, truncated files and images over the pixel limit (decompression bombs).
2. Apply the EXIF orientation.
3. Convert to 8-bit RGB: 16/32-bit integer images are scaled from 0..65535 to 0..255; float images are clipped
   to 0..255; palette, CMYK, YCbCr, LAB and HSV go through Pillow's own conversion; an alpha channel is dropped
   (colour channels kept as they are, as Pillow and torchvision do); grayscale is copied to three channels.
The result is an (H, W, 3) uint8 array; the model therefore always sees three channels, whatever the camera.
`decode` keeps a grayscale original in its single channel (`DecodedImage.pixels`) and makes the three-channel
copy (`.rgb`) only when asked: statistics and the eval transform give the same numbers on either.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from components.errors import ImageError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"})
DEFAULT_MAX_PIXELS = 40_000_000


@dataclass(frozen=True)
class DecodedImage:
    """An image after the conversion rule, with what the manifest records about the original.

    `pixels` is the converted image in its fewest channels: (H, W) uint8 for a grayscale original, else
    (H, W, 3). Image statistics and `transforms.preprocess` give the same result on it as on `rgb` (a grayscale
    image is three equal channels), and one channel is a third of the work; `rgb` is made only when asked for.
    """

    pixels: np.ndarray
    width: int
    height: int
    mode: str  # the original Pillow mode, e.g. "L", "RGB", "I;16", "CMYK"
    channels: int  # channels of the original

    @property
    def gray(self) -> np.ndarray | None:
        """The single channel of a grayscale original (None for a colour one)."""
        return self.pixels if self.pixels.ndim == 2 else None

    def facts(self) -> dict[str, Any]:
        """What the manifest records and the service logs about an image: size, original mode and channels, and
        the statistics (one definition, so production images compare with the training reference)."""
        return {"width": self.width, "height": self.height, "mode": self.mode, "channels": self.channels,
                **image_stats(self.pixels)}

    @cached_property
    def rgb(self) -> np.ndarray:
        """(H, W, 3) uint8: a grayscale original copied to three channels."""
        return three_channels(self.pixels)


def _open(source: bytes | Path | Image.Image, max_pixels: int) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    name = source.name if isinstance(source, Path) else "upload"
    raw = source.read_bytes() if isinstance(source, Path) else source
    if not raw:
        raise ImageError(f"{name}: empty file (0 bytes); remove it or replace it with the real image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))
            check_pixels(image, max_pixels, name)
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # Pillow's own, lower limit
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{found.group(1)} pixels" if found else "its size"
        raise ImageError(f"{name}: {size} exceeds the limit of {max_pixels} (data.max_image_pixels); "
                         "downscale it or raise the limit") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"{name}: not an image Pillow can read; remove it or convert it to JPEG/PNG") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{name}: corrupt or truncated image ({exc}); re-export it from the camera") from exc
    return image


def header_pixels(raw: bytes) -> int:
    """Width x height as the image's header states it, without decoding; 0 when unreadable (`decode` says why)."""
    try:
        with Image.open(io.BytesIO(raw)) as image:
            return image.width * image.height
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return 0


def check_pixels(image: Image.Image, max_pixels: int, name: str = "image") -> None:
    """Refuse an image over the pixel limit before it is decoded."""
    pixels = image.width * image.height
    if pixels > max_pixels:
        raise ImageError(
            f"{name}: {image.width}x{image.height} = {pixels} pixels exceeds the limit of {max_pixels} "
            "(data.max_image_pixels); downscale it or raise the limit"
        )


# EXIF orientation -> the transpose that shows the picture upright (as ImageOps.exif_transpose does; that one
# also writes the EXIF back, which raises on a malformed tag of a real camera's file)
_ORIENTATIONS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                 4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
                 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation tag, 1 (upright) when there is none or the EXIF cannot be read."""
    try:
        value = image.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block says nothing about the pixels
        return 1
    return value if isinstance(value, int) else 1


def convert(image: Image.Image) -> np.ndarray:
    """Apply the conversion rule (steps 2 and 3) to a decoded Pillow image, keeping grayscale in one channel:
    an (H, W) uint8 array for a grayscale original, else (H, W, 3)."""
    transpose = _ORIENTATIONS.get(_orientation(image))
    if transpose is not None:  # transposing copies, so only when needed
        image = image.transpose(transpose)
    mode = image.mode
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        array = np.asarray(image).astype(np.float32)
        return np.clip(array / 257.0 + 0.5, 0, 255).astype(np.uint8)
    if mode == "F":
        return np.clip(np.asarray(image), 0, 255).astype(np.uint8)
    if mode in ("L", "1", "LA"):
        return np.asarray(image if mode == "L" else image.convert("L"))
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return np.ascontiguousarray(np.asarray(image if mode == "RGB" else image.convert("RGB")))


def three_channels(array: np.ndarray) -> np.ndarray:
    """An (H, W) grayscale array copied to (H, W, 3); a three-channel array as it is."""
    return np.repeat(array[:, :, None], 3, axis=2) if array.ndim == 2 else array


def to_rgb(image: Image.Image) -> np.ndarray:
    """Apply the conversion rule (steps 2 and 3) to a decoded Pillow image: (H, W, 3) uint8."""
    return three_channels(convert(image))


def decode(source: bytes | Path | Image.Image, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode bytes, a file or a Pillow image under the conversion rule; raises ImageError on bad input."""
    image = _open(source, max_pixels)
    mode, channels = image.mode, len(image.getbands())
    try:
        pixels = convert(image)
    except (OSError, ValueError) as exc:
        raise ImageError(f"image in mode {mode}: cannot convert to RGB ({exc})") from exc
    return DecodedImage(pixels=pixels, width=image.width, height=image.height, mode=mode, channels=channels)


def image_stats(rgb: np.ndarray) -> dict[str, float]:
    """Brightness (mean gray), contrast (std of gray) and sharpness (variance of the Laplacian) of an RGB image.

    The manifest, the production log and the drift reference all use this function, so their numbers compare.
    """
    import cv2

    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY) if rgb.ndim == 3 else rgb
    mean, std = cv2.meanStdDev(gray)
    laplacian = cv2.Laplacian(gray, cv2.CV_32F)
    _, lap_std = cv2.meanStdDev(laplacian)
    return {
        "brightness": float(mean[0, 0]),
        "contrast": float(std[0, 0]),
        "sharpness": float(lap_std[0, 0] ** 2),
    }


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES
