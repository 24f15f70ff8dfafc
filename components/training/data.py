"""Torch datasets over manifest rows: decode with the shared image rule, then transform."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, WeightedRandomSampler

from components.data.images import DEFAULT_MAX_PIXELS, decode, three_channels
from components.errors import UsageError

log = logging.getLogger(__name__)



EMPTY_MASK = "empty"  # a normal image: its defect mask is known to be all zero


def mask_file(image_file: Path) -> Path | None:
    """The defect mask of an image, where the dataset has one (None when there is none).

    Conventions (components/data/layout.py): `<stem>.png` beside the image (Magnetic Tile upstream), or
    `<root>/masks/<class>/<stem>.png` for `<root>/images/<class>/<file>` (our tracked `data/`).
    """
    beside = image_file.with_suffix(".png")
    if beside != image_file and beside.is_file():
        return beside
    if len(image_file.parents) >= 3 and image_file.parents[1].name == "images":
        tracked = image_file.parents[2] / "masks" / image_file.parent.name / f"{image_file.stem}.png"
        if tracked.is_file():
            return tracked
    return None


def _read_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        gray = image.convert("L")
        if gray.size != (shape[1], shape[0]):
            gray = gray.resize((shape[1], shape[0]), Image.Resampling.NEAREST)
        return (np.asarray(gray) > 127).astype(np.uint8)


class ManifestDataset(Dataset):
    """(image tensor, class index) per (file, label) row; augmentation reproducible per (seed, epoch, item).

    With `masks` (a path, EMPTY_MASK or None per item) each item is (image, class, mask (S, S) float,
    mask known 0/1), the mask following the image through every spatial augmentation.
    """

    def __init__(
        self,
        files: Sequence[str | Path],
        targets: Sequence[int],
        transform: Callable,
        seed: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        cache: bool = False,
        masks: Sequence[Path | str | None] | None = None,
        paste: float = 0.0,
        normal_target: int | None = None,
        keep_defect: float = 0.0,
        keep_tries: int = 10,
        patch: int | None = None,
        patch_focus: float = 0.0,
    ) -> None:
        if len(files) != len(targets) or (masks is not None and len(masks) != len(files)):
            raise ValueError(f"{len(files)} files but {len(targets)} targets / {len(masks or files)} masks")
        self.files = [Path(f) for f in files]
        self.targets = [int(t) for t in targets]
        self.transform = transform
        self.seed = seed
        self.max_pixels = max_pixels
        self.epoch = 0
        self.masks = list(masks) if masks is not None else None
        self._cache: dict[int, np.ndarray] | None = {} if cache else None
        self._mask_cache: dict[int, np.ndarray | None] = {}
        self.paste = paste if masks is not None and normal_target is not None else 0.0
        self._backgrounds = [i for i, t in enumerate(self.targets) if t == normal_target]
        self.keep_defect = keep_defect
        self.keep_tries = max(1, keep_tries)
        self.patch = patch
        self.patch_focus = patch_focus
        self.normal_target = normal_target

    def __len__(self) -> int:
        return len(self.files)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of an epoch (call before creating that epoch's loader iterator)."""
        self.epoch = epoch

    def _load(self, index: int) -> np.ndarray:
        decoded = decode(self.files[index], self.max_pixels)
        return decoded.pixels  # grayscale stays in one channel in the cache: 3x less memory

    def pixels(self, index: int) -> np.ndarray:
        """The decoded uint8 pixels of an item: (H, W) for a grayscale original, else (H, W, 3); cached if enabled.

        Grayscale pictures (the Magnetic Tile cameras) are augmented in their one channel and copied to three
        only as the finished tensor: every step works per channel, so the numbers are those of the
        three-channel picture (tests check it) at about half the loader's CPU time.
        """
        if self._cache is None:
            return self._load(index)
        array = self._cache.get(index)
        if array is None:
            array = self._cache[index] = self._load(index)
        return array

    def image(self, index: int) -> np.ndarray:
        """The decoded (H, W, 3) uint8 image of an item (from the in-memory cache when enabled)."""
        return three_channels(self.pixels(index))

    def preload(self, progress: bool = False) -> None:
        """Decode every image into the cache now (in the main process, so loader workers share it)."""
        if self._cache is None:
            return
        from tqdm import tqdm

        for index in tqdm(
            range(len(self)), desc="decode", unit="img", leave=False, disable=not progress or None
        ):
            if index not in self._cache:
                self._cache[index] = self._load(index)
            if self.masks is not None:
                self.mask(index, self._cache[index].shape[:2])

    def mask(self, index: int, shape: tuple[int, int]) -> np.ndarray | None:
        """The item's 0/1 defect mask at `shape` (zeros for EMPTY_MASK, None when unknown)."""
        spec = self.masks[index] if self.masks is not None else None
        if spec is None:
            return None
        if spec == EMPTY_MASK:
            return np.zeros(shape, np.uint8)
        if index not in self._mask_cache:
            self._mask_cache[index] = _read_mask(Path(spec), shape)
        return self._mask_cache[index]

    def __getitem__(self, index: int) -> tuple:
        pixels = self.pixels(index)
        if self.seed is not None and hasattr(self.transform, "set_random_state"):
            item_seed = hash((self.seed, self.epoch, index)) & 0xFFFF_FFFF
            self.transform.set_random_state(np.random.default_rng(item_seed), random.Random(item_seed))
        if self.masks is None:
            return _three_channel_tensor(self.transform(image=pixels)["image"]), self.targets[index]
        mask = self.mask(index, pixels.shape[:2])
        known = mask is not None
        if known and self.paste and self._backgrounds and mask.any():
            # a seed sequence of ints, not hash(): string hashes differ per process, and resumes must repeat
            rng = np.random.default_rng(None if self.seed is None else [self.seed, self.epoch, index, 1])
            if rng.random() < self.paste:
                background = self.pixels(self._backgrounds[int(rng.integers(len(self._backgrounds)))])
                if background.ndim != pixels.ndim:
                    pixels, background = three_channels(pixels), three_channels(background)
                pixels = paste_defect(pixels, mask, background)
        out = self._augment(pixels, mask if known else np.zeros(pixels.shape[:2], np.uint8))
        image, mask, target = out["image"], np.asarray(out["mask"]), self.targets[index]
        if self.patch:
            image, mask, target = self._patch(image, mask, target, known, index)
        return _three_channel_tensor(image), target, torch.as_tensor(mask).float(), float(known)

    def _patch(self, image: torch.Tensor, mask: np.ndarray, target: int, known: bool,
               index: int) -> tuple[torch.Tensor, np.ndarray, int]:
        """A `patch` x `patch` crop of the augmented image and its label (see `patch_crop`)."""
        rng = np.random.default_rng(None if self.seed is None else [self.seed, self.epoch, index, 2])
        y0, x0 = patch_crop(mask, self.patch, self.patch_focus, rng)
        crop = (slice(y0, y0 + self.patch), slice(x0, x0 + self.patch))
        image, mask = image[:, crop[0], crop[1]].contiguous(), np.ascontiguousarray(mask[crop])
        if known and not mask.any() and self.normal_target is not None:
            target = self.normal_target  # the defect is elsewhere in the picture: this patch shows a normal part
        return image, mask, target

    def _augment(self, rgb: np.ndarray, mask: np.ndarray) -> dict:
        """The transform's output; with `keep_defect`, with at least that share of the defect still in view.

        A random crop or shift can cut a defect out of the picture (a chipped edge, a blowhole near the
        border: with the default augmentation a fifth of those samples lose it entirely), which turns the
        sample into a mislabelled normal image. The share kept is the defect's share of the frame after the
        transform over its share before (zoom makes it approximate). Re-drawing continues the item's seeded
        random stream, so it stays reproducible; after `keep_tries` the best draw is used.
        """
        whole = float(mask.mean())
        if not self.keep_defect or not whole:
            return self.transform(image=rgb, mask=mask)
        best, best_share = None, -1.0
        for _ in range(self.keep_tries):
            out = self.transform(image=rgb, mask=mask)
            share = float(np.asarray(out["mask"], np.float32).mean()) / whole
            if share >= self.keep_defect:
                return out
            if share > best_share:
                best, best_share = out, share
        return best


def _three_channel_tensor(image: torch.Tensor) -> torch.Tensor:
    """A transformed (1, S, S) grayscale tensor copied to the (3, S, S) the networks take; (3, S, S) made
    contiguous (ToTensorV2 returns a channels-first view of a channels-last array)."""
    return (image.expand(3, -1, -1) if image.shape[0] == 1 else image).contiguous()


def patch_crop(mask: np.ndarray, size: int, focus: float, rng: np.random.Generator) -> tuple[int, int]:
    """Top-left corner of a `size` crop: with probability `focus` (when the mask has a defect) one whose
    middle third holds a random defect pixel, else uniform over the picture.

    Training the dense design on patches gives many different views of each defect and of normal surface per
    epoch at a fraction of a whole picture's cost; a patch's label is the image's class when it holds defect
    pixels, the normal class when it holds none (its masks say so).
    """
    height, width = mask.shape
    if size > min(height, width):
        raise UsageError(f"patch_size {size} exceeds the training picture ({height}x{width}); lower patch_size")
    ys, xs = np.nonzero(mask)
    if len(ys) and rng.random() < focus:
        k = int(rng.integers(len(ys)))
        jitter = rng.integers(-(size // 3), size // 3 + 1, 2)
        y0, x0 = int(ys[k] + jitter[0]) - size // 2, int(xs[k] + jitter[1]) - size // 2
    else:
        y0, x0 = int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))
    return int(np.clip(y0, 0, height - size)), int(np.clip(x0, 0, width - size))


def paste_defect(source: np.ndarray, mask: np.ndarray, background: np.ndarray) -> np.ndarray:
    """The defect of `source` (where `mask` is set, with a soft margin) blended into a normal `background`.

    Both are (H, W) grayscale or both (H, W, 3). The background is resized to the source's size, so the defect
    keeps its place (edge defects stay at the edge); the pasted pixels are rescaled to the background's local
    brightness and contrast.
    """
    import cv2

    h, w = mask.shape
    background = cv2.resize(background, (w, h), interpolation=cv2.INTER_AREA)
    margin = max(3, round(0.03 * min(h, w))) | 1
    region = cv2.dilate(mask.astype(np.uint8), np.ones((margin, margin), np.uint8))
    alpha = cv2.GaussianBlur(region.astype(np.float32), (2 * margin + 1, 2 * margin + 1), 0)
    alpha = alpha[:, :, None] if source.ndim == 3 else alpha
    alpha = np.clip(alpha * 1.5, 0.0, 1.0)
    # match brightness and contrast on a ring around the defect: the defect keeps its contrast to its context
    ring = cv2.dilate(region, np.ones((4 * margin + 1, 4 * margin + 1), np.uint8)).astype(
        bool
    ) & ~region.astype(bool)
    context = ring if ring.sum() >= 16 else region.astype(bool)
    src, dst = source.astype(np.float32), background.astype(np.float32)
    mu_s, sd_s = src[context].mean(), src[context].std() + 1.0
    mu_b, sd_b = dst[context].mean(), dst[context].std() + 1.0
    matched = (src - mu_s) / sd_s * sd_b + mu_b
    return np.clip(alpha * matched + (1 - alpha) * dst, 0, 255).astype(np.uint8)


def class_targets(frame: pd.DataFrame, classes: Sequence[str]) -> list[int]:
    """Class index of each manifest row; a label outside `classes` is a usage error."""
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(frame["label"]) - set(index))
    if unknown:
        raise UsageError(
            f"labels {unknown} are not among the dataset's classes {list(classes)}; add them to "
            "params.yaml datasets.<name>.classes or remove those images"
        )
    return [index[label] for label in frame["label"]]


def class_counts(targets: Sequence[int], num_classes: int) -> np.ndarray:
    """How many items of each class."""
    return np.bincount(np.asarray(targets, dtype=np.int64), minlength=num_classes)


def balanced_sampler(
    targets: Sequence[int], num_classes: int, power: float, generator: torch.Generator
) -> WeightedRandomSampler:
    """Samples items with weight count(class)^-power: 1 = classes equally often, 0 = as in the data."""
    counts = class_counts(targets, num_classes).astype(np.float64)
    per_class = np.where(counts > 0, np.maximum(counts, 1.0) ** -power, 0.0)
    weights = torch.as_tensor(per_class[np.asarray(targets)], dtype=torch.double)
    return WeightedRandomSampler(weights, num_samples=len(targets), replacement=True, generator=generator)
