"""Synthetic anomaly-segmentation dataset in the MVTec AD layout, deterministic by seed.

This is the embedded default dataset of the demo and of the tests (no real MVTec AD is
available offline).  :func:`generate` writes, for every category::

    <root>/<category>/train/good/000.png ...
    <root>/<category>/test/good/000.png ...
    <root>/<category>/test/<defect>/000.png ...
    <root>/<category>/ground_truth/<defect>/000_mask.png   (uint8 0/255, same size as the image)

plus ``<root>/README.txt`` describing the generation.

It is meant to be *hard enough to rank configurations*: most defects are subtle, good images
vary in ways a model must learn to ignore, and one category has logical defects that a purely
local model cannot see.

Categories
----------
* Textures (:data:`TEXTURES`): ``brick``, ``grass``, ``gravel`` -- the real photographed
  textures bundled with scikit-image (``skimage.data.brick()`` etc., 512x512 grayscale, no
  download).  Every image is a random crop (random window of 256-320 px, random offset,
  random 90-degree rotation and flip) resized to ``image_size``, with a colour tint per category
  (jittered per image).  Defects: ``scratch`` (thin line, bright or dark), ``hole`` (small dark
  pit), ``stain`` (low-contrast tinted smudge), ``foreign`` (a patch of another texture in its own
  colour; subtle ones take on the surface's colour and brightness), ``color`` (a slight hue shift
  at constant brightness).
* Object (:data:`OBJECTS`): ``washer`` -- a procedural brushed-metal washer (ring with
  directional shading and bevelled edges) on a dark background; per image it is shifted (up to
  6 % of the image), scaled (+-3 %), turned (any angle) and lit from a direction varying by +-20
  degrees, on a background of varying brightness.  Defects: ``scratch``, ``cut`` (a notch
  missing from the outer or inner rim), ``rust`` (a corroded spot), ``smudge`` (an oily
  fingerprint: darker, the grooves smeared).
* Object with *logical* defects: ``board`` -- a small printed-circuit assembly (green solder
  mask, copper traces, pads, silkscreen outlines, mounting holes) with eight parts: an IC with a
  pin-1 dot, an electrolytic capacitor with a polarity stripe, a resistor with colour bands, a
  diode with a cathode band, two SMD capacitors, an LED with a flat side and a pin header.  The
  board is shifted (up to 5 % of the image), scaled (+-2 %) and rotated (up to 4 degrees) per
  image and every part sits with a little placement jitter (about 0.5 px, 1 degree).  Defects:
  ``missing`` (a part is absent, its pads and outline show),
  ``moved`` (a part is displaced: slightly off its pads, or far away and skewed), ``swapped``
  (two parts trade places: resistor/diode, capacitor/LED, diode/SMD capacitor), ``rotated`` (a
  part turned by 90 degrees, or by 180 degrees for polarised parts: only the marking shows it).
  Each part looks normal in itself: what is wrong is *where* it is (or is not).

Nuisances
---------
Every image, good (train and test alike) or defective, passes the same camera model: a slight
Gaussian blur (sigma 0 - 0.9 px at 256 px), an illumination field (gain +-8 %, white balance
+-2.5 % per channel, a linear gradient up to +-12 % across the image and a vignette up to 10 %
in the corners) and sensor noise (sigma 0.4 - 1.4 % of full scale).  Objects are also shifted /
rotated (see above) and texture crops differ anyway.  A defective image is its category's
good scene with the defect added *before* the camera model, with the same camera draws.

Defect strength
---------------
Each defect draws a strength: about a third are obvious (strength 0.75 - 1), the rest subtle
(0.3 - 0.6): fainter contrast, thinner scratches, smaller holes / notches / spots, smaller
displacements (see :func:`_strength`).  Subtle defects are still visible to an inspector who
looks closely (at least about 8 grey levels on average over a coherent region, or a wrong part),
not noise.

Masks
-----
Every mask is exact: a pixel is marked when the defect changed it by more than one grey level
(the defective image is compared with the same scene without the defect, both after the camera
model), plus, for logical defects, the whole footprint of the part where it should be and where
it wrongly is; the marked region is closed (by one pixel) and its holes are filled.  Outside the mask the
defective image equals its defect-free version within one grey level.

Determinism: every image uses its own ``np.random.default_rng`` seeded from
``(seed, crc32("<category>/<split>/<kind>"), index)``, so the same seed and arguments give
byte-identical PNG files, independently of which other categories are generated.
"""
from __future__ import annotations

import functools
import math
import os
import shutil
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from anoseg.errors import ConfigError

__all__ = [
    "TEXTURES",
    "OBJECTS",
    "CATEGORIES",
    "DEFECTS",
    "LOGICAL_DEFECTS",
    "MIN_IMAGE_SIZE",
    "MAX_IMAGE_SIZE",
    "generate",
]

TEXTURES: tuple[str, ...] = ("brick", "grass", "gravel")
OBJECTS: tuple[str, ...] = ("washer", "board")
CATEGORIES: tuple[str, ...] = TEXTURES + OBJECTS

#: Defect kinds per category, in the order they are written.
DEFECTS: dict[str, tuple[str, ...]] = {
    **{t: ("scratch", "hole", "stain", "foreign", "color") for t in TEXTURES},
    "washer": ("scratch", "cut", "rust", "smudge"),
    "board": ("missing", "moved", "swapped", "rotated"),
}
#: The logical defect kinds (a part absent or in the wrong place), per category.
LOGICAL_DEFECTS: dict[str, tuple[str, ...]] = {"board": DEFECTS["board"]}

MIN_IMAGE_SIZE = 32
MAX_IMAGE_SIZE = 1024

# Mild colour tint per texture category (multiplies the grayscale photo).
_TINT: dict[str, tuple[float, float, float]] = {
    "brick": (1.00, 0.70, 0.56),
    "grass": (0.70, 0.96, 0.52),
    "gravel": (0.96, 0.91, 0.82),
}
# Stain colour per texture category (multiplicative tint), chosen to contrast with the tint.
_STAIN: dict[str, tuple[float, float, float]] = {
    "brick": (0.55, 0.62, 0.85),   # dark bluish oil stain
    "grass": (1.25, 0.85, 0.45),   # straw-coloured dead patch
    "gravel": (0.95, 0.62, 0.35),  # rust-coloured spill
}
# Texture a "foreign" patch is taken from, per texture category.
_FOREIGN_SOURCES: dict[str, tuple[str, ...]] = {
    "brick": ("gravel", "grass"),
    "grass": ("brick", "gravel"),
    "gravel": ("brick", "grass"),
}

_CHANGED = 1.0 / 255.0     # a pixel counts as changed when the defect moved it by more than this
_OBVIOUS_SHARE = 0.3       # share of obvious defects; the rest are subtle
_MAX_ATTEMPTS = 8          # redraws of a defect whose change is too small to see at this size


# --------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------
def _rng(seed: int, category: str, split: str, kind: str, index: int) -> np.random.Generator:
    """Independent generator per image, stable across runs and Python processes."""
    key = zlib.crc32(f"{category}/{split}/{kind}".encode("utf-8"))
    return np.random.default_rng(np.random.SeedSequence([seed, key, index]))


def _strength(rng: np.random.Generator) -> float:
    """A defect's strength: obvious (0.75 - 1) with probability 0.3, else subtle (0.3 - 0.6)."""
    if rng.random() < _OBVIOUS_SHARE:
        return float(rng.uniform(0.75, 1.0))
    return float(rng.uniform(0.3, 0.6))


@functools.lru_cache(maxsize=None)
def _texture(name: str) -> np.ndarray:
    """The 512x512 scikit-image texture photo as float32 in [0, 1] (cached, read-only)."""
    import skimage.data

    img = np.asarray(getattr(skimage.data, name)(), dtype=np.float32) / 255.0
    img.setflags(write=False)
    return img


def _random_crop(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Random crop (random window, offset, 90-degree rotation, flip) resized to ``size``."""
    src = _texture(name)
    h, w = src.shape
    c = int(rng.integers(256, 321))
    c = min(c, h, w)
    y0 = int(rng.integers(0, h - c + 1))
    x0 = int(rng.integers(0, w - c + 1))
    crop = src[y0:y0 + c, x0:x0 + c]
    crop = np.rot90(crop, int(rng.integers(0, 4)))
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    pil = Image.fromarray(np.ascontiguousarray(crop, dtype=np.float32))
    out = np.asarray(pil.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
    return np.clip(out, 0.0, 1.0)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy + 0.5, xx + 0.5


def _blob(size: int, rng: np.random.Generator, center: tuple[float, float],
          radii: tuple[float, float], edge_px: float, wobble: float = 0.12) -> np.ndarray:
    """Irregular soft-edged ellipse: blend weight in [0, 1], float32 (size, size)."""
    yy, xx = _grid(size)
    cy, cx = center
    ry, rx = radii
    ang = rng.uniform(0.0, np.pi)
    dy, dx = yy - cy, xx - cx
    u = dx * np.cos(ang) + dy * np.sin(ang)
    v = -dx * np.sin(ang) + dy * np.cos(ang)
    rho = np.sqrt((u / rx) ** 2 + (v / ry) ** 2)
    theta = np.arctan2(v, u)
    boundary = np.ones_like(rho)
    for k in range(2, 6):
        boundary += rng.uniform(0.0, wobble) / (k - 1) ** 0.5 * np.sin(k * theta + rng.uniform(0, 2 * np.pi))
    mean_r = 0.5 * (rx + ry)
    alpha = np.clip((boundary - rho) * mean_r / max(edge_px, 1e-3) + 0.5, 0.0, 1.0)
    return alpha.astype(np.float32)


def _curve_points(p0: np.ndarray, p1: np.ndarray, p2: np.ndarray, step: float = 0.4) -> np.ndarray:
    """Quadratic Bezier p0 -> p2 with control p1, sampled every ``step`` px."""
    length = np.linalg.norm(p1 - p0) + np.linalg.norm(p2 - p1)
    t = np.linspace(0.0, 1.0, max(int(length / step), 2))[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2


def _stroke(size: int, points: np.ndarray, width: float) -> np.ndarray:
    """Anti-aliased stroke of the given width along ``points`` (N, 2) as (y, x)."""
    line = np.zeros((size, size), dtype=bool)
    ij = np.floor(points).astype(np.int64)
    ok = (ij[:, 0] >= 0) & (ij[:, 0] < size) & (ij[:, 1] >= 0) & (ij[:, 1] < size)
    ij = ij[ok]
    if len(ij) == 0:
        return np.zeros((size, size), dtype=np.float32)
    line[ij[:, 0], ij[:, 1]] = True
    dist = ndimage.distance_transform_edt(~line)
    return np.clip(width / 2.0 + 0.5 - dist, 0.0, 1.0).astype(np.float32)


def _blend(img: np.ndarray, target: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None]
    return img * (1.0 - a) + target * a


def _luma(img: np.ndarray) -> np.ndarray:
    return img @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _smooth_field(size: int, rng: np.random.Generator, cells: int) -> np.ndarray:
    """Low-frequency random field with unit standard deviation, (size, size) float32."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    field = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
    return field / (field.std() + 1e-6)


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)


# --------------------------------------------------------------------------------------
# the camera: nuisances shared by a good image and its defective versions
# --------------------------------------------------------------------------------------
class _Camera:
    """Blur, illumination and sensor noise of one image, drawn before anything defect-related."""

    def __init__(self, size: int, rng: np.random.Generator, *, gain: float = 0.08, gradient: float = 0.12,
                 vignette: float = 0.10, blur: float = 0.9, noise: tuple[float, float] = (0.004, 0.014)) -> None:
        k = size / 256.0
        self.blur = float(rng.uniform(0.0, blur)) * k
        level = rng.uniform(1.0 - gain, 1.0 + gain)
        white = (1.0 + rng.uniform(-0.025, 0.025, size=3)).astype(np.float32)
        amp = rng.uniform(0.0, gradient)
        phi = rng.uniform(0.0, 2 * np.pi)
        vig = rng.uniform(0.0, vignette)
        yy, xx = _grid(size)
        yy, xx = 2.0 * yy / size - 1.0, 2.0 * xx / size - 1.0
        light = level * (1.0 + amp * (xx * np.cos(phi) + yy * np.sin(phi)) / np.sqrt(2.0)
                         - vig * 0.5 * (xx ** 2 + yy ** 2))
        self.light = (light[..., None] * white).astype(np.float32)
        self.noise = (rng.standard_normal((size, size, 3), dtype=np.float32)
                      * np.float32(rng.uniform(*noise)))

    def __call__(self, img: np.ndarray) -> np.ndarray:
        if self.blur >= 0.2:
            img = ndimage.gaussian_filter(img, sigma=(self.blur, self.blur, 0.0), mode="nearest")
        return np.clip(img * self.light + self.noise, 0.0, 1.0).astype(np.float32)


def _changed_mask(good: np.ndarray, bad: np.ndarray, footprint: np.ndarray | None = None) -> np.ndarray:
    """Pixels the defect changed (by more than one grey level), plus ``footprint``; closed and hole-filled."""
    mask = np.abs(bad - good).max(-1) > _CHANGED
    mask |= np.abs(_to_uint8(bad).astype(np.int16) - _to_uint8(good).astype(np.int16)).max(-1) >= 2
    if footprint is not None:
        mask |= footprint
    closed = ndimage.binary_erosion(ndimage.binary_dilation(mask, iterations=1), iterations=1, border_value=1)
    return ndimage.binary_fill_holes(mask | closed)


# --------------------------------------------------------------------------------------
# textures
# --------------------------------------------------------------------------------------
class _TextureScene:
    def __init__(self, category: str, size: int, rng: np.random.Generator) -> None:
        self.category, self.size = category, size
        gray = _random_crop(category, size, rng)
        tint = np.asarray(_TINT[category], dtype=np.float32) * (1.0 + rng.uniform(-0.03, 0.03, size=3))
        self.clean = np.clip(gray[..., None] * tint.astype(np.float32), 0.0, 1.0)
        self.camera = _Camera(size, rng)

    def defect(self, defect: str, rng: np.random.Generator) -> tuple[np.ndarray, None]:
        return _texture_defect(self.category, defect, self.clean, rng), None


def _defect_center(size: int, rng: np.random.Generator, margin: float) -> tuple[float, float]:
    lo, hi = margin * size, (1.0 - margin) * size
    return float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))


def _scratch_alpha(size: int, rng: np.random.Generator, width: float,
                   length_frac: tuple[float, float]) -> np.ndarray:
    """One curved scratch (quadratic Bezier) of the given width somewhere in the image."""
    length = rng.uniform(*length_frac) * size
    c = np.array(_defect_center(size, rng, 0.25))
    ang = rng.uniform(0.0, np.pi)
    d = np.array([np.sin(ang), np.cos(ang)]) * length / 2.0
    normal = np.array([d[1], -d[0]]) / np.linalg.norm(d)
    bend = rng.uniform(-0.3, 0.3) * length
    p0, p2 = c - d, c + d
    p1 = c + normal * bend
    return _stroke(size, _curve_points(p0, p1, p2), width)


def _texture_defect(category: str, defect: str, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    size = img.shape[0]
    k = size / 256.0
    s = _strength(rng)
    if defect == "scratch":
        width = max(0.8, (1.6 + 2.2 * s) * k * rng.uniform(0.85, 1.15))
        alpha = _scratch_alpha(size, rng, width, (0.2 + 0.25 * s, 0.3 + 0.3 * s))
        if rng.random() < 0.5:
            target = np.full_like(img, rng.uniform(0.85, 0.98))   # bright scratch (fresh material)
        else:
            target = img * rng.uniform(0.15, 0.3)                # dark scratch (groove)
        out = _blend(img, target, alpha * (0.45 + 0.5 * s))
    elif defect == "hole":
        r = max(1.6, (0.012 + 0.04 * s) * size * rng.uniform(0.85, 1.15))
        aspect = rng.uniform(0.7, 1.0)
        alpha = _blob(size, rng, _defect_center(size, rng, 0.12), (r * aspect, r), edge_px=max(1.0, 1.2 * k))
        depth = np.clip(ndimage.gaussian_filter(alpha, sigma=max(0.7, r / 3.0)), 0, 1)
        target = img * (0.12 + 0.25 * (1.0 - depth))[..., None]  # dark pit, lighter towards the rim
        out = _blend(img, target, alpha * (0.75 + 0.25 * s))
    elif defect == "stain":
        r = rng.uniform(0.05, 0.10) * size
        aspect = rng.uniform(0.55, 1.0)
        alpha = _blob(size, rng, _defect_center(size, rng, 0.15), (r * aspect, r), edge_px=max(2.0, r / 2.5),
                      wobble=0.25)
        color = np.asarray(_STAIN[category], dtype=np.float32)
        target = img * color                                      # tinted / darker, texture visible through it
        out = _blend(img, target, alpha * (0.25 + 0.65 * s))
    elif defect == "foreign":
        src_name = _FOREIGN_SOURCES[category][int(rng.integers(0, len(_FOREIGN_SOURCES[category])))]
        mix = 0.3 + 0.7 * s  # the patch's own colour (obvious) or mostly the surface's (subtle)
        tint = (mix * np.asarray(_TINT[src_name], dtype=np.float32)
                + (1 - mix) * np.asarray(_TINT[category], dtype=np.float32))
        patch = _random_crop(src_name, size, rng)[..., None] * tint.astype(np.float32)
        r = max(2.0, (0.045 + 0.04 * s) * size * rng.uniform(0.9, 1.1))
        aspect = rng.uniform(0.6, 1.0)
        center = _defect_center(size, rng, 0.15)
        alpha = _blob(size, rng, center, (r * aspect, r), edge_px=max(1.0, 1.5 * k), wobble=0.15)
        # match the patch's brightness to the surface around it (subtle: nearly, obvious: partly)
        weight = alpha.sum() + 1e-6
        gain = float((_luma(img) * alpha).sum() / weight) / max(float((_luma(patch) * alpha).sum() / weight), 1e-3)
        gain = gain ** (0.9 - 0.6 * s)  # subtle: nearly matched, obvious: partly
        out = _blend(img, patch * np.float32(gain), alpha * (0.6 + 0.4 * s))
    elif defect == "color":
        r = rng.uniform(0.06, 0.11) * size
        aspect = rng.uniform(0.6, 1.0)
        alpha = _blob(size, rng, _defect_center(size, rng, 0.15), (r * aspect, r), edge_px=max(2.0, r / 3.0),
                      wobble=0.2)
        # a direction in the chroma plane (orthogonal to grey), brightness kept
        ang = rng.uniform(0.0, 2 * np.pi)
        e1 = np.array([1.0, -1.0, 0.0]) / np.sqrt(2.0)
        e2 = np.array([1.0, 1.0, -2.0]) / np.sqrt(6.0)
        direction = (np.cos(ang) * e1 + np.sin(ang) * e2).astype(np.float32)
        shift = (0.14 + 0.22 * s) * _luma(img)[..., None] * direction
        out = img + shift * alpha[..., None]
    else:  # pragma: no cover - guarded by DEFECTS
        raise ConfigError(f"unknown defect {defect!r} for category {category!r}")
    return np.clip(out, 0.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------------------
# procedural object: brushed metal washer
# --------------------------------------------------------------------------------------
class _Washer:
    """Geometry of one washer instance (pose and size drawn from ``rng``)."""

    def __init__(self, size: int, rng: np.random.Generator) -> None:
        self.size = size
        jitter = 0.06 * size
        self.cy = size / 2.0 + float(np.clip(rng.normal(0.0, jitter / 2), -jitter, jitter))
        self.cx = size / 2.0 + float(np.clip(rng.normal(0.0, jitter / 2), -jitter, jitter))
        scale = rng.uniform(0.97, 1.03)
        self.r_out = 0.34 * size * scale * rng.uniform(0.99, 1.01)
        self.r_in = 0.15 * size * scale * rng.uniform(0.98, 1.02)
        self.rot = rng.uniform(0.0, 2 * np.pi)
        self.light = np.pi * 1.25 + rng.uniform(-0.35, 0.35)  # light from the top-left, +-20 degrees
        self.bg = np.array([0.16, 0.18, 0.22], dtype=np.float32) * np.float32(rng.uniform(0.85, 1.15))
        # brushed-metal concentric texture parameters
        self.freqs = rng.uniform(0.25, 0.9, size=4) * (256.0 / size)
        self.phases = rng.uniform(0.0, 2 * np.pi, size=4)
        yy, xx = _grid(size)
        self.dy, self.dx = yy - self.cy, xx - self.cx
        self.r = np.sqrt(self.dy ** 2 + self.dx ** 2)
        self.theta = np.arctan2(self.dy, self.dx)

    def coverage(self) -> np.ndarray:
        outer = np.clip(self.r_out - self.r + 0.5, 0.0, 1.0)
        inner = np.clip(self.r - self.r_in + 0.5, 0.0, 1.0)
        return (outer * inner).astype(np.float32)

    def render(self, coverage: np.ndarray) -> np.ndarray:
        size = self.size
        # face shading: directional light from the top-left plus a mild radial falloff
        light = self.light  # direction (atan2 convention)
        face = 0.60 + 0.10 * np.cos(self.theta - light + self.rot) - 0.05 * (self.r / self.r_out)
        # brushed concentric grooves, slightly wavy along the angle (rotated with the part)
        brushed = np.zeros_like(self.r)
        wiggle = 0.6 * np.sin(self.theta + self.rot)
        for f, p in zip(self.freqs, self.phases):
            brushed += np.sin(self.r * np.float32(f) + (wiggle + np.float32(p)))
        face = face + 0.018 * brushed
        # bevels: a highlight / shadow band along the outer and inner edge
        bevel = max(2.0, 0.03 * size)
        t_out = np.clip((self.r_out - self.r) / bevel, 0.0, 1.0)
        t_in = np.clip((self.r - self.r_in) / bevel, 0.0, 1.0)
        normal_light = np.cos(self.theta - light)
        face = face + 0.22 * (1.0 - t_out) * normal_light - 0.22 * (1.0 - t_in) * normal_light
        metal = np.clip(face, 0.0, 1.0)[..., None] * np.array([0.93, 0.96, 1.0], dtype=np.float32)
        img = self.bg * (1.0 - coverage[..., None]) + metal * coverage[..., None]
        return np.clip(img, 0.0, 1.0).astype(np.float32)

    def point_on_ring(self, rng: np.random.Generator, margin: float) -> tuple[float, float, float, float]:
        """Random (y, x, radius, angle) on the ring face, ``margin`` px away from both edges."""
        rad = rng.uniform(self.r_in + margin, max(self.r_in + margin, self.r_out - margin))
        ang = rng.uniform(0.0, 2 * np.pi)
        return self.cy + rad * np.sin(ang), self.cx + rad * np.cos(ang), rad, ang


class _WasherScene:
    def __init__(self, size: int, rng: np.random.Generator) -> None:
        self.size = size
        self.washer = _Washer(size, rng)
        self.cov = self.washer.coverage()
        self.clean = self.washer.render(self.cov)
        self.camera = _Camera(size, rng)

    def defect(self, defect: str, rng: np.random.Generator) -> tuple[np.ndarray, None]:
        return _washer_defect(self.washer, self.cov, self.clean, defect, rng), None


def _washer_defect(washer: _Washer, cov: np.ndarray, img: np.ndarray, defect: str,
                   rng: np.random.Generator) -> np.ndarray:
    size = washer.size
    k = size / 256.0
    s = _strength(rng)
    if defect == "cut":
        if rng.random() < 0.7:  # bite out of the outer rim
            rho = max(1.5, (0.01 + 0.05 * s) * size * rng.uniform(0.9, 1.1))
            dist = washer.r_out - rng.uniform(0.1, 0.4) * rho
        else:                   # bite out of the inner rim
            rho = max(1.5, (0.01 + 0.04 * s) * size * rng.uniform(0.9, 1.1))
            dist = washer.r_in + rng.uniform(0.1, 0.4) * rho
        ang = rng.uniform(0.0, 2 * np.pi)
        # notch centre relative to the washer centre, distance of every pixel to it
        oy, ox = dist * np.sin(ang), dist * np.cos(ang)
        d = np.sqrt((washer.dy - oy) ** 2 + (washer.dx - ox) ** 2)
        notch = np.clip(rho - d + 0.5, 0.0, 1.0)
        return washer.render((cov * (1.0 - notch)).astype(np.float32))
    if defect == "scratch":
        width = max(0.8, (0.8 + 1.4 * s) * k * rng.uniform(0.85, 1.15))
        # a curved scratch running across the ring face
        span = washer.r_out - washer.r_in
        ang0 = rng.uniform(0.0, 2 * np.pi)
        dang = (0.3 + 0.8 * s) * rng.uniform(0.8, 1.2) * rng.choice([-1.0, 1.0])
        r0 = washer.r_in + rng.uniform(0.1, 0.4) * span
        r1 = washer.r_out - rng.uniform(0.1, 0.4) * span
        if rng.random() < 0.5:
            r0, r1 = r1, r0
        t = np.linspace(0.0, 1.0, 400)
        rr = r0 + (r1 - r0) * t
        aa = ang0 + dang * t + rng.uniform(-0.15, 0.15) * np.sin(np.pi * t)
        pts = np.stack([washer.cy + rr * np.sin(aa), washer.cx + rr * np.cos(aa)], axis=1)
        alpha = _stroke(size, pts, width) * cov
        value = rng.uniform(0.82, 0.95) if rng.random() < 0.5 else rng.uniform(0.18, 0.32)
        return _blend(img, np.full_like(img, value), alpha * (0.2 + 0.65 * s))
    margin = 0.25 * (washer.r_out - washer.r_in)
    cy, cx, _, _ = washer.point_on_ring(rng, margin)
    if defect == "rust":
        r = max(1.8, (0.014 + 0.045 * s) * size * rng.uniform(0.9, 1.1))
        alpha = _blob(size, rng, (cy, cx), (r * rng.uniform(0.6, 1.0), r), edge_px=max(1.5, size / 96),
                      wobble=0.25) * cov
        grain = ndimage.gaussian_filter(rng.standard_normal((size, size), dtype=np.float32), sigma=max(0.7, size / 256))
        grain = grain / (grain.std() + 1e-6)
        rust = np.array([0.56, 0.30, 0.14], dtype=np.float32) * (1.0 + 0.18 * grain)[..., None]
        return _blend(img, rust, alpha * (0.12 + 0.75 * s))
    if defect == "smudge":
        r = rng.uniform(0.04, 0.08) * size
        alpha = _blob(size, rng, (cy, cx), (r * rng.uniform(0.55, 0.9), r), edge_px=max(2.0, r / 2.5),
                      wobble=0.3) * cov
        smear = ndimage.gaussian_filter(img, sigma=(1.5 * k + 0.5, 1.5 * k + 0.5, 0.0))
        oily = smear * (np.float32(1.0 - (0.03 + 0.15 * s)) * np.array([1.0, 0.97, 0.9], dtype=np.float32))
        return _blend(img, oily, alpha * (0.4 + 0.6 * s))
    raise ConfigError(f"unknown defect {defect!r} for category 'washer'")  # pragma: no cover


# --------------------------------------------------------------------------------------
# procedural object with logical defects: a small circuit board
# --------------------------------------------------------------------------------------
# Shapes are drawn in board units (the board spans [-0.5, 0.5] in u (right) and v (down)) with
# anti-aliased signed distances.  A shape: (kind, cx, cy, a, b, corner, colour, shade, body)
# in its part's local frame; kind "box" (half sizes a, b), "disc" (radius a), "ring" (radius a,
# half width b), "half" (a disc of radius a cut by the line x = b: the LED's flat side).
# ``shade`` names a shading of the colour, ``body`` marks the shapes of the part's footprint.
_PAD = (0.74, 0.74, 0.72)
_SILK = (0.86, 0.87, 0.83)
_PARTS: dict[str, list[tuple]] = {
    "chip": (
        [("box", -0.10 + 0.05 * i, sy, 0.011, 0.022, 0.0, (0.80, 0.80, 0.82), None, True)
         for i in range(5) for sy in (-0.098, 0.098)]
        + [("box", 0.0, 0.0, 0.13, 0.085, 0.006, (0.10, 0.10, 0.11), "top", True),
           ("disc", -0.10, 0.052, 0.014, 0.0, 0.0, (0.34, 0.34, 0.36), None, False)]
    ),
    "cap": [
        ("disc", 0.0, 0.0, 0.085, 0.0, 0.0, (0.10, 0.16, 0.42), None, True),
        ("stripe", -0.085, 0.0, 0.085, 0.036, 0.0, (0.82, 0.84, 0.88), None, False),
        ("disc", 0.0, 0.0, 0.064, 0.0, 0.0, (0.72, 0.74, 0.77), "dome", False),
        ("box", 0.0, 0.0, 0.045, 0.0035, 0.0, (0.42, 0.43, 0.45), None, False),
        ("box", 0.0, 0.0, 0.0035, 0.045, 0.0, (0.42, 0.43, 0.45), None, False),
    ],
    "resistor": [
        ("box", 0.0, 0.0, 0.095, 0.008, 0.0, (0.72, 0.72, 0.74), None, True),
        ("box", 0.0, 0.0, 0.062, 0.027, 0.018, (0.84, 0.72, 0.52), "cyl", True),
        ("box", -0.036, 0.0, 0.0065, 0.026, 0.0, (0.45, 0.22, 0.08), "cyl", False),
        ("box", -0.018, 0.0, 0.0065, 0.026, 0.0, (0.08, 0.08, 0.08), "cyl", False),
        ("box", 0.000, 0.0, 0.0065, 0.026, 0.0, (0.78, 0.10, 0.08), "cyl", False),
        ("box", 0.038, 0.0, 0.0065, 0.026, 0.0, (0.82, 0.64, 0.26), "cyl", False),
    ],
    "diode": [
        ("box", 0.0, 0.0, 0.095, 0.008, 0.0, (0.72, 0.72, 0.74), None, True),
        ("box", 0.0, 0.0, 0.062, 0.026, 0.008, (0.09, 0.09, 0.10), "cyl", True),
        ("box", 0.040, 0.0, 0.008, 0.026, 0.0, (0.80, 0.80, 0.82), "cyl", False),
    ],
    "smd": [
        ("box", 0.0, 0.0, 0.042, 0.024, 0.003, (0.68, 0.58, 0.42), None, True),
        ("box", -0.034, 0.0, 0.011, 0.025, 0.002, (0.82, 0.82, 0.84), None, True),
        ("box", 0.034, 0.0, 0.011, 0.025, 0.002, (0.82, 0.82, 0.84), None, True),
    ],
    "led": [
        ("half", 0.0, 0.0, 0.05, 0.040, 0.0, (0.55, 0.06, 0.05), None, True),
        ("disc", 0.0, 0.0, 0.039, 0.0, 0.0, (0.86, 0.13, 0.10), "dome", True),
        ("disc", -0.012, -0.012, 0.010, 0.0, 0.0, (1.0, 0.72, 0.66), None, False),
    ],
    "header": (
        [("box", 0.0, 0.0, 0.17, 0.042, 0.004, (0.11, 0.11, 0.12), "top", True)]
        + [("box", -0.12 + 0.08 * i, 0.0, 0.013, 0.013, 0.0, (0.86, 0.71, 0.33), None, False) for i in range(4)]
    ),
}
# The board's layout: part -> (kind, u, v, angle in degrees).
_LAYOUT: dict[str, tuple[str, float, float, float]] = {
    "chip": ("chip", -0.17, -0.17, 0.0),
    "cap": ("cap", 0.22, -0.22, 0.0),
    "resistor": ("resistor", 0.20, 0.02, 0.0),
    "diode": ("diode", 0.20, 0.14, 0.0),
    "smd_a": ("smd", -0.30, 0.10, 0.0),
    "smd_b": ("smd", -0.08, 0.10, 90.0),
    "led": ("led", 0.30, 0.30, 0.0),
    "header": ("header", -0.14, 0.34, 0.0),
}
# Pads and silkscreen per part kind, in the part's nominal frame (they stay when the part goes).
_FOOTPRINTS: dict[str, list[tuple]] = {
    "chip": ([("box", -0.10 + 0.05 * i, sy, 0.015, 0.024, 0.0, _PAD, None, False)
              for i in range(5) for sy in (-0.102, 0.102)]
             + [("disc", -0.155, 0.10, 0.010, 0.0, 0.0, _SILK, None, False)]),
    "cap": [("ring", 0.0, 0.0, 0.097, 0.004, 0.0, _SILK, None, False),
            ("box", 0.12, -0.07, 0.016, 0.0035, 0.0, _SILK, None, False),
            ("box", 0.12, -0.07, 0.0035, 0.016, 0.0, _SILK, None, False),
            ("box", -0.055, 0.0, 0.022, 0.028, 0.0, _PAD, None, False),
            ("box", 0.055, 0.0, 0.022, 0.028, 0.0, _PAD, None, False)],
    "resistor": [("box", -0.095, 0.0, 0.017, 0.02, 0.0, _PAD, None, False),
                 ("box", 0.095, 0.0, 0.017, 0.02, 0.0, _PAD, None, False),
                 ("outline", 0.0, 0.0, 0.072, 0.038, 0.0, _SILK, None, False)],
    "diode": [("box", -0.095, 0.0, 0.017, 0.02, 0.0, _PAD, None, False),
              ("box", 0.095, 0.0, 0.017, 0.02, 0.0, _PAD, None, False),
              ("outline", 0.0, 0.0, 0.072, 0.038, 0.0, _SILK, None, False),
              ("box", 0.055, 0.0, 0.0035, 0.038, 0.0, _SILK, None, False)],
    "smd": [("box", -0.036, 0.0, 0.017, 0.029, 0.0, _PAD, None, False),
            ("box", 0.036, 0.0, 0.017, 0.029, 0.0, _PAD, None, False),
            ("outline", 0.0, 0.0, 0.062, 0.038, 0.0, _SILK, None, False)],
    "led": [("ring", 0.0, 0.0, 0.058, 0.0035, 0.0, _SILK, None, False),
            ("disc", -0.022, 0.0, 0.011, 0.0, 0.0, _PAD, None, False),
            ("disc", 0.022, 0.0, 0.011, 0.0, 0.0, _PAD, None, False)],
    "header": [("outline", 0.0, 0.0, 0.182, 0.054, 0.0, _SILK, None, False),
               ("outline", -0.12, 0.0, 0.027, 0.027, 0.0, _SILK, None, False)]
              + [("disc", -0.12 + 0.08 * i, 0.0, 0.02, 0.0, 0.0, (0.80, 0.66, 0.30), None, False) for i in range(4)],
}
# Copper traces (polylines in board units) and vias.
_TRACES: tuple[tuple[tuple[float, float], ...], ...] = (
    ((-0.27, -0.07), (-0.27, 0.02), (-0.336, 0.02), (-0.336, 0.08)),
    ((-0.12, -0.07), (-0.12, 0.0), (-0.08, 0.0), (-0.08, 0.05)),
    ((-0.07, -0.07), (-0.07, -0.03), (0.105, -0.03), (0.105, 0.0)),
    ((0.295, 0.02), (0.40, 0.02), (0.40, 0.14), (0.295, 0.14)),
    ((0.105, 0.14), (0.05, 0.14), (0.05, 0.34), (0.0, 0.34)),
    ((-0.07, -0.27), (-0.07, -0.37), (0.165, -0.37), (0.165, -0.25)),
    ((0.30, -0.22), (0.40, -0.22), (0.40, -0.08)),
    ((0.278, 0.30), (0.20, 0.30), (0.20, 0.23)),
    ((-0.08, 0.15), (-0.08, 0.22), (-0.18, 0.22), (-0.18, 0.30)),
    ((-0.264, 0.12), (-0.264, 0.20), (-0.26, 0.20), (-0.26, 0.30)),
)
_VIAS: tuple[tuple[float, float], ...] = ((0.40, -0.08), (0.20, 0.23), (0.0, -0.45), (-0.44, -0.10))
_HOLES: tuple[tuple[float, float], ...] = ((-0.435, -0.435), (0.435, -0.435), (-0.435, 0.435), (0.435, 0.435))
# Pairs of parts that can trade places, parts that can be moved and rotations per part.
_SWAP_PAIRS: tuple[tuple[str, str], ...] = (("resistor", "diode"), ("cap", "led"), ("diode", "smd_b"))
_MOVABLE: tuple[str, ...] = ("cap", "resistor", "diode", "smd_a", "smd_b", "led")
_POLAR: tuple[str, ...] = ("chip", "cap", "resistor", "diode", "led")   # 180 degrees shows in the marking
_ROTATABLE: tuple[str, ...] = ("chip", "cap", "resistor", "diode", "smd_a", "smd_b", "led")


class _Board:
    """The board's pose in the image and a painter for shapes in board / part coordinates."""

    def __init__(self, size: int, rng: np.random.Generator) -> None:
        self.size = size
        jitter = 0.05 * size
        self.cy = size / 2.0 + float(np.clip(rng.normal(0.0, jitter / 2), -jitter, jitter))
        self.cx = size / 2.0 + float(np.clip(rng.normal(0.0, jitter / 2), -jitter, jitter))
        self.angle = float(np.deg2rad(rng.uniform(-4.0, 4.0)))
        self.side = 0.76 * size * float(rng.uniform(0.98, 1.02))
        self.px = 1.0 / self.side  # board units per pixel
        yy, xx = _grid(size)
        c, s = math.cos(self.angle), math.sin(self.angle)
        self.u = (((xx - self.cx) * c + (yy - self.cy) * s) / self.side).astype(np.float32)
        self.v = ((-(xx - self.cx) * s + (yy - self.cy) * c) / self.side).astype(np.float32)

    def _window(self, u: float, v: float, radius: float) -> tuple[slice, slice] | None:
        """Pixel window holding a shape centred at board (u, v) with the given radius (board units)."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        x = self.cx + self.side * (u * c - v * s)
        y = self.cy + self.side * (u * s + v * c)
        r = radius * self.side + 2.0
        y0, y1 = max(0, int(y - r)), min(self.size, int(math.ceil(y + r)))
        x0, x1 = max(0, int(x - r)), min(self.size, int(math.ceil(x + r)))
        if y0 >= y1 or x0 >= x1:
            return None
        return slice(y0, y1), slice(x0, x1)

    def coverage(self, shape: tuple, pose: tuple[float, float, float]
                 ) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray, np.ndarray] | None:
        """(window, coverage, local x, local y) of ``shape`` placed with part pose (u, v, angle rad)."""
        kind, sx, sy, a, b = shape[:5]
        corner = shape[5]
        pu, pv, pa = pose
        c, s = math.cos(pa), math.sin(pa)
        cu, cv = pu + sx * c - sy * s, pv + sx * s + sy * c
        radius = math.hypot(a, b) if kind in ("box", "outline") else a + abs(b) + 0.01
        win = self._window(cu, cv, radius)
        if win is None:
            return None
        du, dv = self.u[win] - pu, self.v[win] - pv
        x = du * c + dv * s - sx
        y = -du * s + dv * c - sy
        if kind in ("box", "outline"):
            qx, qy = np.abs(x) - (a - corner), np.abs(y) - (b - corner)
            sdf = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0) - corner
            if kind == "outline":
                sdf = np.abs(sdf) - 0.0035
        elif kind == "disc":
            sdf = np.hypot(x, y) - a
        elif kind == "ring":
            sdf = np.abs(np.hypot(x, y) - a) - b
        elif kind == "half":        # disc cut by the line x = b
            sdf = np.maximum(np.hypot(x, y) - a, x - b)
        elif kind == "stripe":      # the part of a disc (radius a, centred at -sx) with x < b - a
            sdf = np.maximum(np.hypot(x + sx, y) - a, x + sx - (b - a))
        else:  # pragma: no cover
            raise ValueError(kind)
        cov = np.clip(0.5 - sdf / self.px, 0.0, 1.0).astype(np.float32)
        return win, cov, x, y

    def paint(self, img: np.ndarray, shapes: Sequence[tuple], pose: tuple[float, float, float],
              footprint: np.ndarray | None = None) -> None:
        for shape in shapes:
            got = self.coverage(shape, pose)
            if got is None:
                continue
            win, cov, x, y = got
            colour = np.asarray(shape[6], dtype=np.float32)
            shade = shape[7]
            if shade == "top":      # matte plastic lit from the top-left
                f = 1.0 + 0.6 * np.clip(-(x + y), -0.2, 0.2)
            elif shade == "dome":   # round top: brighter towards the light, darker at the rim
                rr = np.hypot(x, y) / max(shape[3], 1e-3)
                f = 1.05 - 0.35 * rr ** 2 - 0.5 * np.clip(x + y, -0.1, 0.1)
            elif shade == "cyl":    # cylinder lying along x: a highlight along its axis
                f = 1.1 - 0.45 * (y / max(shape[4], 1e-3)) ** 2
            else:
                f = None
            col = colour if f is None else np.clip(f[..., None] * colour, 0.0, 1.0)
            c3 = cov[..., None]
            img[win] = img[win] * (1.0 - c3) + col * c3
            if footprint is not None and shape[8]:
                np.maximum(footprint[win], cov, out=footprint[win])


class _BoardScene:
    """A board with its parts in their (jittered) places; defects re-render it."""

    def __init__(self, size: int, rng: np.random.Generator) -> None:
        self.size = size
        self.board = _Board(size, rng)
        table = np.array([0.30, 0.30, 0.33], dtype=np.float32) * np.float32(rng.uniform(0.85, 1.15))
        green = np.array([0.08, 0.33, 0.17], dtype=np.float32) * (1.0 + rng.uniform(-0.05, 0.05, 3)).astype(np.float32)
        mottle = 1.0 + 0.03 * _smooth_field(size, rng, 6)
        grain = 1.0 + 0.02 * _smooth_field(size, rng, max(8, size // 4))
        b = self.board
        base = np.broadcast_to(table * grain[..., None], (size, size, 3)).copy()
        # board body
        cover = np.clip(0.5 - (np.maximum(np.abs(b.u), np.abs(b.v)) - 0.5) / b.px, 0.0, 1.0)[..., None]
        base = base * (1.0 - cover) + (green * mottle[..., None]) * cover
        trace = (0.13, 0.44, 0.23)
        for line in _TRACES:
            for (u0, v0), (u1, v1) in zip(line[:-1], line[1:]):
                shape = ("box", 0.0, 0.0, abs(u1 - u0) / 2 + 0.006, abs(v1 - v0) / 2 + 0.006, 0.0, trace, None, False)
                b.paint(base, [shape], ((u0 + u1) / 2, (v0 + v1) / 2, 0.0))
        for u, v in _VIAS:
            b.paint(base, [("disc", 0.0, 0.0, 0.016, 0.0, 0.0, (0.80, 0.66, 0.30), None, False),
                           ("disc", 0.0, 0.0, 0.007, 0.0, 0.0, (0.05, 0.05, 0.05), None, False)], (u, v, 0.0))
        for u, v in _HOLES:
            b.paint(base, [("disc", 0.0, 0.0, 0.034, 0.0, 0.0, (0.80, 0.66, 0.30), None, False),
                           ("disc", 0.0, 0.0, 0.021, 0.0, 0.0, table * 0.6, None, False)], (u, v, 0.0))
        for name, (kind, u, v, deg) in _LAYOUT.items():
            b.paint(base, _FOOTPRINTS[kind], (u, v, math.radians(deg)))
        self.base = base
        # every part's pose with placement jitter (good boards are not all alike)
        self.poses: dict[str, tuple[float, float, float]] = {}
        for name, (kind, u, v, deg) in _LAYOUT.items():
            du, dv = rng.normal(0.0, 0.003, size=2)
            self.poses[name] = (u + float(du), v + float(dv), math.radians(deg + float(rng.normal(0.0, 1.2))))
        self.clean = self.render(self.poses)
        self.camera = _Camera(size, rng)
        self.changes: dict[str, tuple[tuple[float, float, float], tuple[float, float, float] | None]] = {}

    def render(self, poses: dict[str, tuple[float, float, float]], on_top: Sequence[str] = ()) -> np.ndarray:
        """The board with the parts in ``poses`` (a part not in it is missing); ``on_top`` drawn last."""
        img = self.base.copy()
        for name in [n for n in poses if n not in on_top] + [n for n in on_top if n in poses]:
            self.board.paint(img, _PARTS[_LAYOUT[name][0]], poses[name])
        return np.clip(img, 0.0, 1.0).astype(np.float32)

    def footprint(self, name: str, pose: tuple[float, float, float]) -> np.ndarray:
        fp = np.zeros((self.size, self.size), dtype=np.float32)
        self.board.paint(np.zeros((self.size, self.size, 3), dtype=np.float32), _PARTS[_LAYOUT[name][0]], pose, fp)
        return fp > 0.5

    def defect(self, defect: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """The image with a logical defect and the footprint of the parts concerned, where they should be
        and where they are; ``self.changes`` records {part: (pose where it should be, pose where it is or None)}."""
        s = _strength(rng)
        poses = dict(self.poses)
        if defect == "missing":
            name = list(_LAYOUT)[int(rng.integers(0, len(_LAYOUT)))]
            del poses[name]
            self.changes = {name: (self.poses[name], None)}
            return self.render(poses), self.footprint(name, self.poses[name])
        if defect == "moved":
            name = _MOVABLE[int(rng.integers(0, len(_MOVABLE)))]
            u, v, a = poses[name]
            dist = rng.uniform(0.03, 0.06) if s < 0.7 else rng.uniform(0.12, 0.25)  # off its pads / far away
            ang = rng.uniform(0.0, 2 * np.pi)
            skew = math.radians(rng.uniform(-8.0, 8.0) if s < 0.7 else rng.uniform(-35.0, 35.0))
            new = (float(np.clip(u + dist * math.cos(ang), -0.38, 0.38)),
                   float(np.clip(v + dist * math.sin(ang), -0.38, 0.38)), a + skew)
            poses[name] = new
            self.changes = {name: (self.poses[name], new)}
            fp = self.footprint(name, (u, v, a)) | self.footprint(name, new)
            return self.render(poses, on_top=[name]), fp
        if defect == "swapped":
            one, two = _SWAP_PAIRS[int(rng.integers(0, len(_SWAP_PAIRS)))]
            poses[one], poses[two] = self.poses[two], self.poses[one]
            self.changes = {one: (self.poses[one], poses[one]), two: (self.poses[two], poses[two])}
            fp = (self.footprint(one, self.poses[one]) | self.footprint(two, self.poses[two])
                  | self.footprint(one, poses[one]) | self.footprint(two, poses[two]))
            return self.render(poses, on_top=[one, two]), fp
        if defect == "rotated":
            name = _ROTATABLE[int(rng.integers(0, len(_ROTATABLE)))]
            u, v, a = poses[name]
            turn = 180.0 if (name in _POLAR and s < 0.7) else float(rng.choice([90.0, -90.0]))
            if name == "led" and turn != 180.0:
                turn = 180.0  # round: only the flat side shows a turn
            poses[name] = (u, v, a + math.radians(turn))
            self.changes = {name: (self.poses[name], poses[name])}
            fp = self.footprint(name, (u, v, a)) | self.footprint(name, poses[name])
            return self.render(poses, on_top=[name]), fp
        raise ConfigError(f"unknown defect {defect!r} for category 'board'")  # pragma: no cover


# --------------------------------------------------------------------------------------
# dispatch + writing
# --------------------------------------------------------------------------------------
def _scene(category: str, size: int, rng: np.random.Generator) -> _TextureScene | _WasherScene | _BoardScene:
    if category in TEXTURES:
        return _TextureScene(category, size, rng)
    if category == "washer":
        return _WasherScene(size, rng)
    return _BoardScene(size, rng)


def _good(category: str, size: int, rng: np.random.Generator) -> np.ndarray:
    scene = _scene(category, size, rng)
    return scene.camera(scene.clean)


def _defective(category: str, defect: str, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A defective image and its mask: the good scene of the same draws with the defect added."""
    scene = _scene(category, size, rng)
    good = scene.camera(scene.clean)
    min_pixels = max(3, int(0.0004 * size * size))
    for _ in range(_MAX_ATTEMPTS):
        clean, footprint = scene.defect(defect, rng)
        bad = scene.camera(clean)
        mask = _changed_mask(good, bad, footprint)
        if mask.sum() >= min_pixels:
            break
    return bad, mask


def _save_rgb(path: Path, img: np.ndarray) -> None:
    Image.fromarray(_to_uint8(img)).save(path, format="PNG", compress_level=1)


def _save_mask(path: Path, mask: np.ndarray) -> None:
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(path, format="PNG", compress_level=1)


def _check_int(name: str, value: object, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name} must be <= {maximum}, got {value}")
    return value


def _check_categories(categories: Sequence[str] | str | None) -> list[str]:
    if categories is None:
        return list(CATEGORIES)
    if isinstance(categories, str):
        categories = [categories]
    try:
        requested = list(categories)
    except TypeError:
        raise ConfigError(f"categories must be a list of names from {list(CATEGORIES)}, got {categories!r}") from None
    if not requested:
        raise ConfigError(f"categories is empty; choose from {list(CATEGORIES)}")
    out: list[str] = []
    for cat in requested:
        if not isinstance(cat, str) or cat not in CATEGORIES:
            raise ConfigError(f"unknown synthetic category {cat!r}; allowed: {', '.join(CATEGORIES)}")
        if cat not in out:
            out.append(cat)
    return out


def _readme(seed: int, categories: list[str], image_size: int, n_train: int, n_test_good: int,
            n_test_per_defect: int) -> str:
    lines = [
        "Synthetic anomaly-segmentation dataset written by anoseg.data.synthetic.generate().",
        "",
        "Layout: MVTec AD (<category>/train/good, <category>/test/{good,<defect>},",
        "<category>/ground_truth/<defect>/NNN_mask.png with uint8 0/255 masks).",
        "Textures are random crops of the photographs bundled with scikit-image",
        "(skimage.data.brick/grass/gravel) with a colour tint per category; 'washer' is a",
        "procedural brushed-metal washer; 'board' a procedural circuit board whose defects are",
        "logical (a part missing, moved, swapped or rotated). All defects are synthetic, most of",
        "them subtle, with exact pixel masks. Good and defective images alike vary in blur,",
        "illumination, sensor noise and (objects) position and rotation.",
        "Generation is deterministic: the same seed and arguments give byte-identical files.",
        "",
        "Arguments of the last generation into this folder:",
        f"  seed = {seed}",
        f"  categories = {', '.join(categories)}",
        f"  image_size = {image_size}",
        f"  n_train = {n_train}",
        f"  n_test_good = {n_test_good}",
        f"  n_test_per_defect = {n_test_per_defect}",
        "",
        "Defect kinds:",
    ]
    lines += [f"  {cat}: {', '.join(DEFECTS[cat])}" for cat in categories]
    return "\n".join(lines) + "\n"


def generate(root: str | Path, *, seed: int = 0, categories: Sequence[str] | None = None,
             image_size: int = 256, n_train: int = 40, n_test_good: int = 10, n_test_per_defect: int = 8,
             overwrite: bool = False) -> list[str]:
    """Write the synthetic dataset under ``root`` in the MVTec AD layout.

    Args:
        root: dataset root; ``<root>/<category>/...`` folders and ``<root>/README.txt`` are written.
        seed: non-negative integer; same seed and arguments give byte-identical files.
        categories: subset of :data:`CATEGORIES` (default: all of them, in that order).
        image_size: side of the square images in pixels (32 .. 1024).
        n_train: defect-free training images per category.
        n_test_good: defect-free test images per category.
        n_test_per_defect: test images per defect kind (each with its mask).
        overwrite: replace existing non-empty category folders (they are deleted first).

    Returns:
        The category names written, in order.

    Raises:
        ConfigError: unknown category, out-of-range size / count / seed, or a non-empty
            category folder exists and ``overwrite`` is false.
    """
    seed = _check_int("seed", seed, 0)
    image_size = _check_int("image_size", image_size, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)
    n_train = _check_int("n_train", n_train, 1)
    n_test_good = _check_int("n_test_good", n_test_good, 1)
    n_test_per_defect = _check_int("n_test_per_defect", n_test_per_defect, 1)
    cats = _check_categories(categories)
    if not isinstance(root, (str, Path)) or str(root) == "":
        raise ConfigError(f"root must be a non-empty path, got {root!r}")
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"dataset root {str(root)!r} exists and is not a folder")

    # check every target before writing anything
    for cat in cats:
        folder = root / cat
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"{str(folder)!r} exists and is not a folder")
        if folder.is_dir() and any(folder.iterdir()) and not overwrite:
            raise ConfigError(
                f"category folder {str(folder)!r} is not empty; pass overwrite=True to replace it"
            )

    if any(cat in TEXTURES for cat in cats):
        for name in TEXTURES:  # load the photos once, before any worker thread needs them
            _texture(name)
    root.mkdir(parents=True, exist_ok=True)
    for cat in cats:
        folder = root / cat
        if folder.is_dir():
            shutil.rmtree(folder)
        _write_category(folder, cat, seed, image_size, n_train, n_test_good, n_test_per_defect)

    (root / "README.txt").write_text(
        _readme(seed, cats, image_size, n_train, n_test_good, n_test_per_defect), encoding="utf-8"
    )
    return cats


def _write_category(folder: Path, cat: str, seed: int, size: int, n_train: int, n_test_good: int,
                    n_test_per_defect: int) -> None:
    def name(i: int, n: int) -> str:
        return f"{i:0{max(3, len(str(n - 1)))}d}"

    def good_job(split: str, i: int, path: Path) -> Callable[[], None]:
        return lambda: _save_rgb(path, _good(cat, size, _rng(seed, cat, split, "good", i)))

    def defect_job(defect: str, i: int, img_path: Path, mask_path: Path) -> Callable[[], None]:
        def job() -> None:
            img, mask = _defective(cat, defect, size, _rng(seed, cat, "test", defect, i))
            _save_rgb(img_path, img)
            _save_mask(mask_path, mask)
        return job

    jobs: list[Callable[[], None]] = []
    for split, n in (("train", n_train), ("test", n_test_good)):
        out = folder / split / "good"
        out.mkdir(parents=True, exist_ok=True)
        jobs += [good_job(split, i, out / f"{name(i, n)}.png") for i in range(n)]
    for defect in DEFECTS[cat]:
        img_dir = folder / "test" / defect
        mask_dir = folder / "ground_truth" / defect
        img_dir.mkdir(parents=True, exist_ok=True)
        mask_dir.mkdir(parents=True, exist_ok=True)
        for i in range(n_test_per_defect):
            stem = name(i, n_test_per_defect)
            jobs.append(defect_job(defect, i, img_dir / f"{stem}.png", mask_dir / f"{stem}_mask.png"))
    # Every image has its own generator, so running the jobs on threads (numpy and the PNG
    # encoder release the GIL) does not change any byte of the output.
    workers = max(1, min(8, os.cpu_count() or 1))
    if workers == 1:
        for job in jobs:
            job()
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for future in [pool.submit(job) for job in jobs]:
            future.result()
