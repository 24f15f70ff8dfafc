"""Synthetic labelled photos of manufactured parts, with the defect classes of a typical production line.

Each image shows a part (a disc or a square plate with a centre bore, an orientation notch, a printed mark and
four or six bolts or holes) lying on a conveyor, under varying light, with sensor grain and brushed-metal
texture. The class decides what is wrong with it:

- normal: nothing; the part sits where it should, within a small placement jitter;
- scratch: one or two thin straight bright or dark lines;
- dent: a shaded elliptical depression (dark on one side, lit on the other);
- crack: a jagged dark polyline, sometimes branched, often starting at a hole or the rim;
- discoloration: a soft tinted blotch (rust, heat tint, oil);
- missing_component: one of the bolts or holes is absent;
- misalignment: the part is shifted and/or rotated well beyond the normal jitter;
- other: a foreign object (a coloured blob of debris or a coloured fibre).

Everything is drawn from numpy generators seeded with (seed, index), so the same arguments give byte-identical
files on any number of workers. The layout of image `index` does not depend on its class, which lets tests
(and behavioural model tests) render the same part with and without a defect via `render_part`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np

from components.errors import UsageError
from components.files import write_bytes_atomic
from components.parallel import chunks, image_pool

log = logging.getLogger(__name__)

NORMAL_CLASS = "normal"
DEFECT_CLASSES = ("crack", "dent", "discoloration", "misalignment", "missing_component", "other", "scratch")
SYNTH_CLASSES: tuple[str, ...] = tuple(sorted((*DEFECT_CLASSES, NORMAL_CLASS)))
MARKER_FILE = ".defectops-synth.json"
RENDER_VERSION = 1  # bump when the drawing changes, so an old set is never silently mixed with a new one
MIN_SIZE = 32
_JPEG_QUALITY = 90
_PNG_COMPRESSION = 3
_TRIES = 6  # a defect that ends up hardly visible is redrawn, at most this many times
_VISIBLE = 32  # grey levels: a pixel changed by this much shows the defect
_SHIFT = 4  # cv2 drawing with 4 fractional bits: sub-pixel positions at every image size
_ONE = 1 << _SHIFT

ImageFormat = Literal["jpg", "png"]


@dataclass
class SynthSummary:
    """What `generate` produced: where, how many images per class, and how long it took."""

    out: Path
    counts: dict[str, int]
    seconds: float
    reused: int = field(default=0)  # images already present from an interrupted or identical earlier run


# ------------------------------------------------------------------------------------------- the plan


def class_counts(count: int, normal_share: float = 0.5) -> dict[str, int]:
    """Exact images per class: `normal_share` of `count` normal, the rest shared evenly by the defects."""
    normal = int(count * normal_share + 0.5)
    defects, extra = divmod(count - normal, len(DEFECT_CLASSES))
    counts = {name: defects + (1 if i < extra else 0) for i, name in enumerate(DEFECT_CLASSES)}
    counts[NORMAL_CLASS] = normal
    return {name: counts[name] for name in SYNTH_CLASSES}


def plan_labels(count: int, seed: int, normal_share: float = 0.5) -> list[str]:
    """The class of each image index 0..count-1: exact counts, order shuffled by the seed."""
    labels = [name for name, n in class_counts(count, normal_share).items() for _ in range(n)]
    order = np.random.default_rng([seed, count]).permutation(count)
    return [labels[i] for i in order]


def file_name(label: str, index: int, image_format: ImageFormat) -> str:
    """The file name of one image: <class>_<index:06d>.<ext>."""
    return f"{label}_{index:06d}.{image_format}"


# ------------------------------------------------------------------------------------------- drawing


@dataclass(frozen=True)
class _Layout:
    """Everything about one image that does not depend on its class."""

    size: int
    shape: int  # 0 disc, 1 plate
    centre: tuple[float, float]
    angle: float  # radians
    radius: float
    background: np.ndarray  # RGB float32
    part_colour: np.ndarray  # RGB float32
    components: int  # 4 or 6
    bolts: bool  # bolts, else drilled holes
    component_radius: float
    ring: float  # distance of the components from the centre, in part radii
    sheen: tuple[float, float]  # brushed-metal sheen gradient across the part
    light: tuple[float, float, float, float]  # gain, x slope, y slope, vignette
    shadow: tuple[float, float]  # offset of the drop shadow, in pixels
    grain: float  # sensor noise sigma, grey levels
    blur: float  # optics blur sigma, pixels


def _layout(rng: np.random.Generator, size: int) -> _Layout:
    scale = size / 128
    jitter = np.clip(rng.normal(0.0, 0.012 * size, 2), -0.03 * size, 0.03 * size)
    grey = rng.uniform(35, 85)
    metal = rng.uniform(135, 185)
    return _Layout(
        size=size,
        shape=int(rng.integers(2)),
        centre=(size / 2 + float(jitter[0]), size / 2 + float(jitter[1])),
        angle=math.radians(rng.uniform(-4.0, 4.0)),
        radius=size * rng.uniform(0.30, 0.35),
        background=(grey + rng.normal(0, 5, 3)).astype(np.float32),
        part_colour=(metal * (1 + rng.normal(0, 0.015, 3))).astype(np.float32),
        components=int(rng.choice([4, 6])),
        bolts=bool(rng.random() < 0.5),
        component_radius=rng.uniform(0.085, 0.11),
        ring=rng.uniform(0.60, 0.66),
        sheen=(rng.uniform(-0.12, 0.12), rng.uniform(-0.12, 0.12)),
        light=(rng.uniform(0.85, 1.12), rng.uniform(-0.18, 0.18), rng.uniform(-0.18, 0.18), rng.uniform(0.0, 0.35)),
        shadow=(rng.uniform(1.0, 3.0) * scale, rng.uniform(1.0, 3.0) * scale),
        grain=rng.uniform(1.5, 4.5),
        blur=rng.uniform(0.35, 0.7) * math.sqrt(scale),
    )


def _fx(value: float) -> int:
    return round(value * _ONE)


def _pt(x: float, y: float) -> tuple[int, int]:
    return _fx(x), _fx(y)


def _poly(points: Iterable[tuple[float, float]]) -> np.ndarray:
    return np.array([[_fx(x), _fx(y)] for x, y in points], dtype=np.int32)


class _Pose:
    """Maps part coordinates (in part radii, y down) to image pixels."""

    def __init__(self, centre: tuple[float, float], angle: float, radius: float) -> None:
        self.cx, self.cy = centre
        self.cos, self.sin, self.radius = math.cos(angle), math.sin(angle), radius

    def __call__(self, u: float, v: float) -> tuple[float, float]:
        x, y = u * self.radius, v * self.radius
        return self.cx + x * self.cos - y * self.sin, self.cy + x * self.sin + y * self.cos


def _outline(pose: _Pose, shape: int) -> list[tuple[float, float]]:
    if shape == 0:
        return [pose(math.cos(a), math.sin(a)) for a in np.linspace(0, 2 * math.pi, 72, endpoint=False)]
    h, c = 0.88, 0.2  # half side and corner chamfer, in radii
    corners = [(-h + c, -h), (h - c, -h), (h, -h + c), (h, h - c), (h - c, h), (-h + c, h), (-h, h - c), (-h, -h + c)]
    return [pose(u, v) for u, v in corners]


def _notch(pose: _Pose, shape: int) -> list[tuple[float, float]]:
    top = -1.0 if shape == 0 else -0.88
    return [pose(u, v) for u, v in ((-0.09, top - 0.05), (0.09, top - 0.05), (0.09, top + 0.11), (-0.09, top + 0.11))]


def _part_mask(layout: _Layout, pose: _Pose) -> np.ndarray:
    import cv2

    mask = np.zeros((layout.size, layout.size), np.uint8)
    cv2.fillPoly(mask, [_poly(_outline(pose, layout.shape))], 255, cv2.LINE_AA, _SHIFT)
    cv2.fillConvexPoly(mask, _poly(_notch(pose, layout.shape)), 0, cv2.LINE_AA, _SHIFT)
    return mask


def _base(layout: _Layout, mask: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Conveyor, drop shadow and brushed part surface, as uint8 RGB."""
    import cv2

    size = layout.size
    small = max(8, size // 8)
    shade = cv2.resize(mask, (small, small), interpolation=cv2.INTER_AREA)
    shade = cv2.GaussianBlur(shade, (0, 0), 1.0)
    dx, dy = (round(d * small / size) for d in layout.shadow)
    shade = np.roll(shade, (dy, dx), axis=(0, 1))
    shadow = cv2.resize(shade, (size, size), interpolation=cv2.INTER_LINEAR).astype(np.float32) * (0.45 / 255)
    streaks = cv2.blur(noise, (max(3, size // 10), 1))  # brushed metal: noise smeared along x
    ramp = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    sheen = (layout.sheen[0] * ramp)[None, :] + (1.0 + layout.sheen[1] * ramp)[:, None]
    sheen += 0.05 * streaks
    alpha = mask.astype(np.float32)
    alpha *= 1 / 255
    ground = 1.0 - alpha
    ground *= 1.0 - shadow
    metal = alpha * sheen
    # per channel, ground * background + metal * part, saturated to uint8 by OpenCV
    return cv2.merge([cv2.addWeighted(ground, float(b), metal, float(p), 0.0, dtype=cv2.CV_8U)
                      for b, p in zip(layout.background, layout.part_colour, strict=True)])


def _component_centres(layout: _Layout, pose: _Pose) -> list[tuple[float, float]]:
    step = 2 * math.pi / layout.components
    return [pose(layout.ring * math.cos(step / 2 + k * step), layout.ring * math.sin(step / 2 + k * step))
            for k in range(layout.components)]


def _details(canvas: np.ndarray, layout: _Layout, pose: _Pose, missing: int | None) -> None:
    """Bore, printed mark and the bolts or holes (all but `missing`)."""
    import cv2

    aa, metal = cv2.LINE_AA, layout.part_colour
    px = max(1, round(layout.size / 128))
    centre = pose(0, 0)
    cv2.circle(canvas, _pt(*centre), _fx(0.22 * layout.radius), tuple(float(c) for c in metal * 1.18), -1, aa, _SHIFT)
    cv2.circle(canvas, _pt(*centre), _fx(0.15 * layout.radius), (22, 22, 24), -1, aa, _SHIFT)
    mark = [pose(u, v) for u, v in ((-0.13, -0.44), (0.13, -0.44), (0.13, -0.34), (-0.13, -0.34))]
    cv2.fillConvexPoly(canvas, _poly(mark), tuple(float(c) for c in metal * 0.45), aa, _SHIFT)
    r = layout.component_radius * layout.radius
    for k, (x, y) in enumerate(_component_centres(layout, pose)):
        if k == missing:
            continue
        if layout.bolts:
            cv2.circle(canvas, _pt(x, y), _fx(r), tuple(float(c) for c in metal * 0.72), -1, aa, _SHIFT)
            hexagon = [(x + 0.72 * r * math.cos(a), y + 0.72 * r * math.sin(a))
                       for a in np.linspace(0, 2 * math.pi, 6, endpoint=False) + layout.angle]
            cv2.fillConvexPoly(canvas, _poly(hexagon), tuple(float(c) for c in metal * 1.22), aa, _SHIFT)
            cv2.circle(canvas, _pt(x - 0.25 * r, y - 0.25 * r), _fx(0.22 * r), (245, 245, 245), -1, aa, _SHIFT)
        else:
            cv2.circle(canvas, _pt(x, y), _fx(r), tuple(float(c) for c in metal * 0.8), px, aa, _SHIFT)
            cv2.circle(canvas, _pt(x, y), _fx(0.78 * r), (18, 18, 20), -1, aa, _SHIFT)


def _random_point_on_part(rng: np.random.Generator, pose: _Pose, within: float = 0.85) -> tuple[float, float]:
    """A point of the part surface between the bore and the rim (polar, uniform in area)."""
    rho = math.sqrt(rng.uniform(0.3**2, within**2))
    phi = rng.uniform(0, 2 * math.pi)
    return pose(rho * math.cos(phi), rho * math.sin(phi))


def _roi(canvas: np.ndarray, x: float, y: float, half: float) -> tuple[slice, slice, int, int] | None:
    size = canvas.shape[0]
    x0, y0 = max(0, int(x - half)), max(0, int(y - half))
    x1, y1 = min(size, math.ceil(x + half) + 1), min(size, math.ceil(y + half) + 1)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return None
    return slice(y0, y1), slice(x0, x1), x0, y0


def _scratch(canvas: np.ndarray, rng: np.random.Generator, layout: _Layout, pose: _Pose) -> None:
    import cv2

    scale = layout.size / 128
    for _ in range(1 if rng.random() < 0.7 else 2):
        x, y = _random_point_on_part(rng, pose, 0.7)
        heading = rng.uniform(0, math.pi)
        length = rng.uniform(0.45, 0.9) * layout.radius
        bend = rng.normal(0, 0.06)
        points = [(x + t * length * math.cos(heading + bend * t), y + t * length * math.sin(heading + bend * t))
                  for t in np.linspace(-0.5, 0.5, 5)]
        colour = rng.uniform(225, 255) if rng.random() < 0.6 else rng.uniform(25, 60)
        thickness = max(1, round(scale * rng.uniform(0.5, 1.0)))
        cv2.polylines(canvas, [_poly(points)], False, (colour, colour, colour), thickness, cv2.LINE_AA, _SHIFT)


def _clear_point(rng: np.random.Generator, layout: _Layout, pose: _Pose, clearance: float) -> tuple[float, float]:
    """A point of bare part surface: at least `clearance` pixels from every bolt or hole (best of a few draws)."""
    centres = _component_centres(layout, pose)
    gap = layout.component_radius * layout.radius + clearance
    for _ in range(12):
        x, y = _random_point_on_part(rng, pose, 0.78)
        if all(math.hypot(x - cx, y - cy) > gap for cx, cy in centres):
            break
    return x, y


def _dent(canvas: np.ndarray, rng: np.random.Generator, layout: _Layout, pose: _Pose) -> None:
    a, b = layout.radius * rng.uniform(0.15, 0.26), layout.radius * rng.uniform(0.11, 0.19)
    x, y = _clear_point(rng, layout, pose, 0.6 * a)
    theta = rng.uniform(0, math.pi)
    depth = rng.uniform(80, 120)
    light = rng.uniform(0, 2 * math.pi)
    box = _roi(canvas, x, y, max(a, b) * 1.3)
    if box is None:
        return
    rows, cols, _, _ = box
    yy, xx = np.mgrid[rows, cols].astype(np.float32)
    dx, dy = xx - x, yy - y
    u = (dx * math.cos(theta) + dy * math.sin(theta)) / a
    v = (-dx * math.sin(theta) + dy * math.cos(theta)) / b
    rho2 = u * u + v * v
    inside = np.clip(1.0 - rho2, 0.0, 1.0)
    # the slope of the bowl facing the light is lit, the far slope is in shade
    facing = (u * math.cos(light) + v * math.sin(light)) * np.sqrt(inside)
    delta = depth * (facing - 0.35 * inside)
    patch = canvas[rows, cols].astype(np.float32) + delta[:, :, None]
    canvas[rows, cols] = np.clip(patch, 0, 255).astype(np.uint8)


def _crack(canvas: np.ndarray, rng: np.random.Generator, layout: _Layout, pose: _Pose) -> None:
    import cv2

    scale = layout.size / 128
    if rng.random() < 0.5 and layout.components:
        k = int(rng.integers(layout.components))
        cx, cy = _component_centres(layout, pose)[k]
        start_angle = rng.uniform(0, 2 * math.pi)
        r = layout.component_radius * layout.radius
        start = (cx + r * math.cos(start_angle), cy + r * math.sin(start_angle))
        heading = start_angle
    else:
        start = _random_point_on_part(rng, pose, 0.8)
        heading = rng.uniform(0, 2 * math.pi)
    colour = rng.uniform(8, 35)
    thickness = max(1, round(scale * rng.uniform(0.8, 1.4)))
    branches = [(start, heading, int(rng.integers(9, 16)))]
    drawn = 0
    while branches:
        (x, y), heading, steps = branches.pop()
        points = [(x, y)]
        for _ in range(steps):  # zigzag about a slowly drifting course: jagged, but going somewhere
            heading += rng.normal(0, 0.12)
            turn = heading + rng.normal(0, 0.6)
            step = layout.radius * rng.uniform(0.035, 0.07)
            x, y = x + step * math.cos(turn), y + step * math.sin(turn)
            points.append((x, y))
        cv2.polylines(canvas, [_poly(points)], False, (colour, colour, colour), thickness, cv2.LINE_AA, _SHIFT)
        drawn += 1
        if drawn < 3 and rng.random() < 0.5:
            j = int(rng.integers(1, len(points)))
            branches.append((points[j], heading + rng.choice([-1, 1]) * rng.uniform(0.5, 1.1),
                             int(rng.integers(3, 7))))


_TINTS = np.array([[150, 80, 35], [70, 60, 150], [175, 150, 55], [110, 55, 110]], np.float32)  # rust, heat, oil


def _discoloration(canvas: np.ndarray, rng: np.random.Generator, layout: _Layout, pose: _Pose) -> None:
    import cv2

    x, y = _random_point_on_part(rng, pose, 0.7)
    extent = layout.radius * rng.uniform(0.22, 0.42)
    tint = _TINTS[int(rng.integers(len(_TINTS)))] * rng.uniform(0.85, 1.1)
    strength = rng.uniform(0.4, 0.65)
    box = _roi(canvas, x, y, extent * 1.6)
    if box is None:
        return
    rows, cols, x0, y0 = box
    blotch = np.zeros((rows.stop - rows.start, cols.stop - cols.start), np.uint8)
    for _ in range(int(rng.integers(2, 5))):
        ox, oy = rng.normal(0, 0.35 * extent, 2)
        axes = (_fx(extent * rng.uniform(0.4, 0.8)), _fx(extent * rng.uniform(0.3, 0.7)))
        cv2.ellipse(blotch, _pt(x - x0 + ox, y - y0 + oy), axes, rng.uniform(0, 180), 0, 360, 255, -1,
                    cv2.LINE_AA, _SHIFT)
    blotch = cv2.GaussianBlur(blotch, (0, 0), max(0.8, 0.18 * extent)).astype(np.float32) * (strength / 255)
    part = canvas[rows, cols].astype(np.float32)
    lum = part.mean(axis=2, keepdims=True) / 160.0
    tinted = part * (1 - blotch[:, :, None]) + (tint * lum) * blotch[:, :, None]
    canvas[rows, cols] = np.clip(tinted, 0, 255).astype(np.uint8)


# rubber, red and blue plastic, green insulation, yellow tape, brown cardboard: none looks like bare metal
_DEBRIS = np.array([[25, 25, 28], [200, 40, 35], [35, 90, 190], [40, 150, 60], [215, 190, 40], [120, 80, 45]],
                   np.float32)


def _foreign_object(canvas: np.ndarray, rng: np.random.Generator, layout: _Layout, pose: _Pose) -> None:
    import cv2

    scale = layout.size / 128
    colour = tuple(float(c) for c in _DEBRIS[int(rng.integers(len(_DEBRIS)))] * rng.uniform(0.85, 1.1))
    x, y = _random_point_on_part(rng, pose, 0.9)
    if rng.random() < 0.6:  # a blob of debris
        extent = layout.radius * rng.uniform(0.08, 0.17)
        corners = int(rng.integers(6, 11))
        angles = np.sort(rng.uniform(0, 2 * math.pi, corners))
        radii = extent * rng.uniform(0.5, 1.0, corners)
        points = [(x + r * math.cos(a), y + r * math.sin(a)) for a, r in zip(angles, radii, strict=True)]
        cv2.fillPoly(canvas, [_poly(points)], colour, cv2.LINE_AA, _SHIFT)
        edge = tuple(c * 0.6 for c in colour)
        cv2.polylines(canvas, [_poly(points)], True, edge, max(1, round(scale * 0.6)), cv2.LINE_AA, _SHIFT)
    else:  # a curly fibre
        heading, curl = rng.uniform(0, 2 * math.pi), rng.uniform(-0.5, 0.5)
        points = [(x, y)]
        for _ in range(int(rng.integers(14, 26))):
            heading += curl + rng.normal(0, 0.15)
            step = layout.radius * 0.05
            x, y = x + step * math.cos(heading), y + step * math.sin(heading)
            points.append((x, y))
        cv2.polylines(canvas, [_poly(points)], False, colour, max(1, round(scale * 1.2)), cv2.LINE_AA, _SHIFT)


def _misplace(layout: _Layout, rng: np.random.Generator) -> _Layout:
    """The same part, shifted and/or rotated well beyond the normal placement jitter."""
    size, mode = layout.size, int(rng.integers(3))  # 0 shifted, 1 rotated, 2 both
    cx, cy, angle = *layout.centre, layout.angle
    if mode in (0, 2):
        distance, direction = size * rng.uniform(0.1, 0.17), rng.uniform(0, 2 * math.pi)
        cx, cy = cx + distance * math.cos(direction), cy + distance * math.sin(direction)
    if mode in (1, 2):
        angle += math.radians(rng.uniform(14, 32)) * rng.choice([-1, 1])
    return replace(layout, centre=(cx, cy), angle=angle)


def _finish(canvas: np.ndarray, layout: _Layout, noise: np.ndarray) -> np.ndarray:
    """Lighting, optics blur and sensor grain."""
    import cv2

    size = layout.size
    gain, sx, sy, vignette = layout.light
    ramp = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    field_ = gain * (1.0 + sx * ramp[None, :] + sy * ramp[:, None]
                     - vignette * 0.5 * (ramp[None, :] ** 2 + ramp[:, None] ** 2))
    blurred = cv2.GaussianBlur(canvas, (0, 0), layout.blur)
    grain = noise * layout.grain
    return cv2.merge([cv2.add(cv2.multiply(channel, field_, dtype=cv2.CV_32F), grain, dtype=cv2.CV_8U)
                      for channel in cv2.split(blurred)])


_DEFECTS = {
    "scratch": _scratch,
    "dent": _dent,
    "crack": _crack,
    "discoloration": _discoloration,
    "other": _foreign_object,
}


def _draw_visible(draw: Callable[..., None], canvas: np.ndarray, rng: np.random.Generator, layout: _Layout,
                  pose: _Pose) -> None:
    """Draw a defect, redrawing it elsewhere while it hides (a dark crack in a hole, a dent off the rim)."""
    import cv2

    before = canvas.copy()
    needed = max(8, layout.size * layout.size // 1000)
    for attempt in range(_TRIES):
        draw(canvas, rng, layout, pose)
        changed = cv2.absdiff(canvas, before).reshape(layout.size, -1)  # one value per pixel and channel
        _, strong = cv2.threshold(changed, _VISIBLE - 1, 1, cv2.THRESH_BINARY)
        if attempt == _TRIES - 1 or cv2.countNonZero(strong) >= needed:
            return
        canvas[...] = before


def render_part(seed: int, index: int, label: str, size: int = 128) -> np.ndarray:
    """The (size, size, 3) uint8 RGB image of `index` under `seed`, drawn with the defect of `label`.

    The part, light and noise depend only on (seed, index), so the same index drawn as `normal` and as a defect
    differ only by the defect.
    """
    if label not in SYNTH_CLASSES:
        raise UsageError(f"unknown synthetic class {label!r}; use one of {', '.join(SYNTH_CLASSES)}")
    if size < MIN_SIZE:
        raise UsageError(f"image size {size} is below {MIN_SIZE} pixels; ask for a size of at least {MIN_SIZE}")
    layout_rng = np.random.default_rng([seed, index, 0])
    defect_rng = np.random.default_rng([seed, index, 1])
    layout = _layout(layout_rng, size)
    noise = layout_rng.random((size, size), dtype=np.float32)  # uniform grain, unit variance: 7x cheaper than normal
    noise -= 0.5
    noise *= math.sqrt(12)
    if label == "misalignment":
        layout = _misplace(layout, defect_rng)
    pose = _Pose(layout.centre, layout.angle, layout.radius)
    canvas = _base(layout, _part_mask(layout, pose), noise)
    missing = int(defect_rng.integers(layout.components)) if label == "missing_component" else None
    _details(canvas, layout, pose, missing)
    if label in _DEFECTS:
        _draw_visible(_DEFECTS[label], canvas, defect_rng, layout, pose)
    return _finish(canvas, layout, noise)


def encode(rgb: np.ndarray, image_format: ImageFormat) -> bytes:
    """JPEG or PNG bytes of an RGB image (deterministic for the same pixels)."""
    import cv2

    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    if image_format == "jpg":
        ok, data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY])
    else:
        ok, data = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, _PNG_COMPRESSION])
    if not ok:
        raise UsageError(f"OpenCV could not encode a {image_format} image; check the opencv-python install")
    return data.tobytes()


# ------------------------------------------------------------------------------------------- writing


def _render_files(job: tuple[Path, int, int, ImageFormat, list[tuple[int, str]]]) -> int:
    out, seed, size, image_format, items = job
    for index, label in items:
        path = out / label / file_name(label, index, image_format)
        write_bytes_atomic(path, encode(render_part(seed, index, label, size), image_format))
    return len(items)


def _run_settings(count: int, size: int, seed: int, image_format: str, normal_share: float) -> dict:
    return {"generator": "defectops.synth", "render_version": RENDER_VERSION, "count": count, "size": size,
            "seed": seed, "image_format": image_format, "normal_share": normal_share}


def _check_args(count: int, size: int, image_format: str, normal_share: float) -> None:
    if count < 1:
        raise UsageError(f"count {count}: ask for at least one image")
    if size < MIN_SIZE:
        raise UsageError(f"image size {size} is below {MIN_SIZE} pixels; ask for a size of at least {MIN_SIZE}")
    if image_format not in ("jpg", "png"):
        raise UsageError(f"image format {image_format!r} is not supported; use 'jpg' or 'png'")
    if not 0.0 <= normal_share <= 1.0:
        raise UsageError(f"normal_share {normal_share} is not a fraction; give a value between 0 and 1")


def _prepare(out: Path, settings: dict, expected: dict[str, set[str]]) -> None:
    """Make `out` ready: an empty or new folder, or one holding an unfinished run with the same settings."""
    marker = out / MARKER_FILE
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a folder; choose another output folder")
    if out.is_dir() and any(out.iterdir()):
        if not marker.is_file():
            raise UsageError(f"{out}: folder is not empty and holds no synthetic set; choose an empty folder")
        try:
            previous = json.loads(marker.read_text())
        except (OSError, ValueError) as exc:
            raise UsageError(f"{marker}: unreadable ({exc}); delete {out} or choose an empty folder") from exc
        if previous != settings:
            changed = ", ".join(f"{k}={previous.get(k)!r}" for k in settings if previous.get(k) != settings[k])
            raise UsageError(f"{out}: holds a synthetic set made with other settings ({changed}); "
                             "choose an empty folder or delete it first")
        for entry in out.iterdir():
            if entry.name == MARKER_FILE:
                continue
            if not entry.is_dir() or entry.name not in expected:
                raise UsageError(f"{out}: {entry.name} is not part of the synthetic set; remove it or choose "
                                 "an empty folder")
            for file in entry.iterdir():
                if file.name.startswith(".") and file.name.endswith(".tmp"):
                    file.unlink()  # left by an interrupted run
                elif file.name not in expected[entry.name]:
                    raise UsageError(f"{file}: not part of the synthetic set; remove it or choose an empty folder")
    out.mkdir(parents=True, exist_ok=True)
    if not marker.is_file():
        write_bytes_atomic(marker, json.dumps(settings, indent=1).encode())


def generate(out: Path, count: int, size: int = 128, seed: int = 42, image_format: ImageFormat = "jpg",
             normal_share: float = 0.5, workers: int = 0, progress: bool = False) -> SynthSummary:
    """Write `count` labelled synthetic part photos to `out/<class>/<class>_<index>.<ext>` (ImageFolder layout).

    Same arguments, same bytes. An interrupted run is finished by calling again with the same arguments;
    a folder holding anything else is refused. `workers` 0 means one process per CPU core.
    """
    _check_args(count, size, image_format, normal_share)
    started = time.perf_counter()
    out = Path(out)
    labels = plan_labels(count, seed, normal_share)
    counts = class_counts(count, normal_share)
    expected: dict[str, set[str]] = {name: set() for name, n in counts.items() if n}
    for index, label in enumerate(labels):
        expected[label].add(file_name(label, index, image_format))
    _prepare(out, _run_settings(count, size, seed, image_format, normal_share), expected)
    for name in expected:
        (out / name).mkdir(exist_ok=True)
    present = {name: {f.name for f in (out / name).iterdir()} for name in expected}
    todo = [(i, label) for i, label in enumerate(labels) if file_name(label, i, image_format) not in present[label]]
    reused = count - len(todo)
    workers = workers or max(1, len(os.sched_getaffinity(0)))
    chunk = max(1, min(64, math.ceil(len(todo) / (workers * 8)))) if todo else 1
    jobs = [(out, seed, size, image_format, list(items)) for items in chunks(todo, chunk)]
    log.info("%s: drawing %d images of %dpx (%d already there) on %d workers", out, len(todo), size, reused,
             workers)
    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), unit="img", desc="synth", leave=False)
    try:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                done = _render_files(job)
                if bar:
                    bar.update(done)
        else:
            with image_pool(workers) as pool:
                for future in as_completed([pool.submit(_render_files, job) for job in jobs]):
                    done = future.result()
                    if bar:
                        bar.update(done)
    finally:
        if bar:
            bar.close()
    seconds = time.perf_counter() - started
    log.info("%s: %d images in %.1f s (%.0f img/s)", out, len(todo), seconds, len(todo) / max(seconds, 1e-9))
    return SynthSummary(out=out, counts=counts, seconds=seconds, reused=reused)
