"""Image pipelines: (H, W, 3) uint8 RGB array -> normalised float (3, S, S) tensor.

`eval_transform` is THE preprocessing for inference: evaluation and serving call it (via the model file's
`image_size`), so training, evaluation and serving see identically prepared images.
"""

from __future__ import annotations

from functools import lru_cache, partial
from typing import TYPE_CHECKING, get_args

import numpy as np

from components.training.params import AugmentParams, Fit, Normalization

if TYPE_CHECKING:
    import albumentations as A
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


NORMALIZATIONS = get_args(Normalization)
DETAIL_SIGMAS = (1.5, 8.0)  # px of the model's input: fine detail (cracks, frayed edges), mid-scale (blowholes)


def standardize(image: np.ndarray, **_: object) -> np.ndarray:
    """Scale one image to zero mean and unit standard deviation over all its pixels (float32)."""
    image = image.astype(np.float32)
    return (image - image.mean()) / (image.std() + 1e-4)


def imagenet_normalize(image: np.ndarray, **_: object) -> np.ndarray:
    """ImageNet's per-channel mean and standard deviation on 0..1 values, (H, W, 3) float32. A grey (H, W) or
    (H, W, 1) picture gets each channel's own numbers, as its colour copy would (albumentations' Normalize
    gives a one-channel picture the first channel's only, which training then copied to three while the
    Predictor used all three: another input than the one served)."""
    scaled = image.astype(np.float32) / np.float32(255.0)
    if scaled.ndim == 2:
        scaled = scaled[:, :, None]
    mean, std = np.asarray(IMAGENET_MEAN, np.float32), np.asarray(IMAGENET_STD, np.float32)
    return (scaled - mean) / std


def _gray(image: np.ndarray) -> np.ndarray:
    """(H, W) float32 grey levels of a grey or colour picture (the channel mean)."""
    gray = image.astype(np.float32)
    if gray.ndim == 3:
        gray = gray.mean(axis=2) if gray.shape[2] > 1 else gray[:, :, 0]
    return gray


def log_detail_bands(image: np.ndarray, **_: object) -> np.ndarray:
    """`detail_bands` of the log picture (log1p of the grey levels).

    Light multiplies the surface's reflectance, so under an uneven lamp or another exposure the same dent or
    texture has a contrast in proportion to the local brightness; in the log picture it has the same contrast
    everywhere, and dark spots on dark ground (a frayed edge in shadow) are not muted against bright ones.
    """
    return detail_bands(np.log1p(_gray(image)))


def detail_bands(image: np.ndarray, **_: object) -> np.ndarray:
    """One grey picture -> (H, W, 3) float32: the picture standardised, and its detail at two scales.

    The detail bands are the picture minus its Gaussian blur (sigmas `DETAIL_SIGMAS`), each standardised:
    local dents and lines stand out, lighting gradients and the tile's overall shade drop out. A grayscale
    camera's picture otherwise fills the three input channels with three copies of itself. A colour picture
    is turned grey (the channel mean) first.
    """
    import cv2

    gray = _gray(image)
    bands = [standardize(gray)]
    bands += [standardize(gray - cv2.GaussianBlur(gray, (0, 0), sigma)) for sigma in DETAIL_SIGMAS]
    return np.stack(bands, axis=2)


BAND_KINDS = {"detail_bands": detail_bands, "log_detail_bands": log_detail_bands}  # grey -> 3 bands


def pad_to_square(image: np.ndarray, size: int, interpolation: int | None = None, **_: object) -> np.ndarray:
    """The picture with its longer side resized to `size` (area interpolation unless given) and its shorter
    side mirror-padded (reflect-101) to `size`, centred: the aspect is kept, and the padding continues the
    surface's texture instead of a flat border whose edge the detail bands would show as a defect."""
    import cv2

    height, width = image.shape[:2]
    scale = size / max(height, width)
    new_height, new_width = max(1, round(height * scale)), max(1, round(width * scale))
    small = cv2.resize(image, (new_width, new_height),
                       interpolation=cv2.INTER_AREA if interpolation is None else interpolation)
    top, left = (size - new_height) // 2, (size - new_width) // 2
    return cv2.copyMakeBorder(small, top, size - new_height - top, left, size - new_width - left,
                              cv2.BORDER_REFLECT_101)


def _to_square(image_size: int, fit: Fit) -> A.BasicTransform:
    """The step that brings a picture (and its mask) to the image_size x image_size input."""
    import albumentations as A
    import cv2

    if fit == "squash":
        return A.Resize(image_size, image_size, interpolation=cv2.INTER_AREA)
    if fit == "pad":
        return A.Lambda(image=partial(pad_to_square, size=image_size),
                        mask=partial(pad_to_square, size=image_size, interpolation=cv2.INTER_NEAREST),
                        name="pad_to_square", p=1.0)
    raise _unknown_fit(fit)


def _unknown(normalize: str) -> ValueError:
    return ValueError(f"unknown normalization {normalize!r}; use one of {', '.join(NORMALIZATIONS)}")


def _unknown_fit(fit: str) -> ValueError:
    return ValueError(f"unknown fit {fit!r}; use squash or pad")


def _finish(normalize: Normalization) -> list:
    import albumentations as A

    if normalize == "per_image":
        scale = A.Lambda(image=standardize, name="standardize", p=1.0)
    elif normalize in BAND_KINDS:
        scale = A.Lambda(image=BAND_KINDS[normalize], name=normalize, p=1.0)
    elif normalize == "imagenet":
        scale = A.Lambda(image=imagenet_normalize, name="imagenet_normalize", p=1.0)
    else:
        raise _unknown(normalize)
    return [scale, A.ToTensorV2()]


def eval_transform(image_size: int, normalize: Normalization = "imagenet", fit: Fit = "squash") -> A.Compose:
    """To the image_size x image_size square (`fit`: squashed, or aspect kept and mirror-padded; area
    interpolation), normalise, to a CHW tensor."""
    import albumentations as A

    return A.Compose([_to_square(image_size, fit), *_finish(normalize)])


def train_transform(p: AugmentParams, image_size: int, normalize: Normalization = "imagenet",
                    fit: Fit = "squash") -> A.Compose:
    """The augmented training pipeline described by the `augment` params."""
    import albumentations as A
    import cv2

    # to the square first, exactly as eval_transform does, so that crops keep the eval geometry
    steps: list = [_to_square(image_size, fit)]
    if p.crop_scale is not None:
        steps.append(
            A.RandomResizedCrop(size=(image_size, image_size), scale=p.crop_scale, ratio=p.crop_ratio, p=1.0)
        )
    if p.hflip:
        steps.append(A.HorizontalFlip(p=p.hflip))
    if p.vflip:
        steps.append(A.VerticalFlip(p=p.vflip))
    if p.rotate90:
        steps.append(A.RandomRotate90(p=p.rotate90))
    if p.affine:
        steps.append(
            A.Affine(
                scale=p.affine_scale,
                translate_percent=(-p.affine_translate, p.affine_translate),
                rotate=(-p.affine_rotate, p.affine_rotate),
                border_mode=cv2.BORDER_REFLECT_101,
                p=p.affine,
            )
        )
    if p.elastic:
        steps.append(
            A.ElasticTransform(
                alpha=p.elastic_alpha, sigma=p.elastic_sigma, border_mode=cv2.BORDER_REFLECT_101, p=p.elastic
            )
        )
    if p.erase:
        steps.append(
            A.CoarseDropout(
                num_holes_range=(1, 3),
                hole_height_range=p.erase_size,
                hole_width_range=p.erase_size,
                fill="inpaint_telea",
                fill_mask=0,
                p=p.erase,
            )
        )
    if p.brightness_contrast:
        steps.append(
            A.RandomBrightnessContrast(
                brightness_limit=p.brightness_limit, contrast_limit=p.contrast_limit, p=p.brightness_contrast
            )
        )
    if p.gamma:
        steps.append(A.RandomGamma(gamma_limit=p.gamma_limit, p=p.gamma))
    if p.blur:
        steps.append(A.GaussianBlur(blur_limit=(3, 3), p=p.blur))
    if p.noise:
        steps.append(A.GaussNoise(std_range=p.noise_std, per_channel=False, p=p.noise))
    return A.Compose([*steps, *_finish(normalize)])


@lru_cache(maxsize=8)
def _cached_eval(image_size: int, normalize: Normalization, fit: Fit) -> A.Compose:
    return eval_transform(image_size, normalize, fit)


def preprocess(image: np.ndarray, image_size: int, normalize: Normalization = "imagenet",
               fit: Fit = "squash") -> torch.Tensor:
    """One decoded image -> the (3, S, S) float tensor the model expects, contiguous.

    `image` is (H, W, 3) uint8 RGB, or (H, W) uint8 for a grayscale original (`DecodedImage.pixels`): that is
    resized and scaled in one channel, then copied to three, a third of the work and the same numbers as
    `eval_transform` on the three-channel image (tests/test_predictor.py checks this on real images).
    ToTensorV2 returns a channels-first view of the channels-last array. Copied here, with numpy, in the
    request's thread: otherwise the batch's `torch.stack` does a strided copy on torch's thread pool, which
    stalls (15 ms for 4 images instead of 0.05 ms) while an inference engine's threads hold the cores.
    """
    import torch

    if image.ndim == 2:
        return torch.from_numpy(_preprocess_gray(image, image_size, normalize, fit))
    chw = _cached_eval(image_size, normalize, fit)(image=image)["image"]
    return torch.from_numpy(np.ascontiguousarray(chw.numpy()))


def _preprocess_gray(gray: np.ndarray, image_size: int, normalize: Normalization, fit: Fit) -> np.ndarray:
    """eval_transform's steps on a one-channel image, broadcast to three channels at the end."""
    import cv2

    if fit == "pad":
        small = pad_to_square(gray, image_size)
    elif fit == "squash":
        small = cv2.resize(gray, (image_size, image_size), interpolation=cv2.INTER_AREA)
    else:
        raise _unknown_fit(fit)
    if normalize in BAND_KINDS:
        return np.ascontiguousarray(BAND_KINDS[normalize](small).transpose(2, 0, 1))
    if normalize == "per_image":
        scaled = standardize(small)[None]
        return np.ascontiguousarray(np.broadcast_to(scaled, (3, image_size, image_size)))
    if normalize == "imagenet":
        mean = np.asarray(IMAGENET_MEAN, np.float32)[:, None, None]
        std = np.asarray(IMAGENET_STD, np.float32)[:, None, None]
        return ((small.astype(np.float32) / np.float32(255.0))[None] - mean) / std
    raise _unknown(normalize)


def model_input(meta: dict) -> tuple[int, str, str]:
    """The input a model file asks for: image_size, normalization kind and fit (files from before those keys:
    ImageNet normalisation, squashed)."""
    return int(meta["image_size"]), (meta.get("normalization") or {}).get("kind", "imagenet"), meta.get("fit", "squash")


def model_transform(meta: dict) -> A.Compose:
    """The eval transform a model file asks for (its image_size, normalization and fit)."""
    return eval_transform(*model_input(meta))
