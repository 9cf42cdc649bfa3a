"""Small synthetic anomaly-segmentation dataset in the MVTec AD layout, deterministic by seed.

This is the embedded default dataset of the demo and of the tests (no real MVTec AD is
available offline).  :func:`generate` writes, for every category::

    <root>/<category>/train/good/000.png ...
    <root>/<category>/test/good/000.png ...
    <root>/<category>/test/<defect>/000.png ...
    <root>/<category>/ground_truth/<defect>/000_mask.png   (uint8 0/255, same size as the image)

plus ``<root>/README.txt`` describing the generation.

Categories
----------
* Textures (:data:`TEXTURES`): ``brick``, ``grass``, ``gravel`` -- the real photographed
  textures bundled with scikit-image (``skimage.data.brick()`` etc., 512x512 grayscale, no
  download).  Every image is a random crop (random window of 256-320 px, random offset,
  random 90-degree rotation and flip) resized to ``image_size`` and given a fixed colour tint
  per category.  Defects: ``scratch``, ``hole``, ``stain``, ``foreign`` (a patch of another
  texture).
* Object (:data:`OBJECTS`): ``washer`` -- a procedural brushed-metal washer (ring with
  directional shading and bevelled edges) on a uniform dark background, with small random
  position / size / rotation jitter and mild sensor noise.  Defects: ``scratch``, ``cut`` (a
  notch missing from the outer or inner rim), ``rust``.

Every defect comes with an exact pixel mask: the pixels whose value differs noticeably from
the defect-free image (soft edges are thresholded at 2 % blend weight), so masks are binary
and tight.  Defects are clearly visible and of moderate size (about 0.5 % - 5 % of the image).

Determinism: every image uses its own ``np.random.default_rng`` seeded from
``(seed, crc32("<category>/<split>/<kind>"), index)``, so the same seed and arguments give
byte-identical PNG files, independently of which other categories are generated.
"""
from __future__ import annotations

import functools
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
    "MIN_IMAGE_SIZE",
    "MAX_IMAGE_SIZE",
    "generate",
]

TEXTURES: tuple[str, ...] = ("brick", "grass", "gravel")
OBJECTS: tuple[str, ...] = ("washer",)
CATEGORIES: tuple[str, ...] = TEXTURES + OBJECTS

#: Defect kinds per category, in the order they are written.
DEFECTS: dict[str, tuple[str, ...]] = {
    **{t: ("scratch", "hole", "stain", "foreign") for t in TEXTURES},
    "washer": ("scratch", "cut", "rust"),
}

MIN_IMAGE_SIZE = 32
MAX_IMAGE_SIZE = 1024

# Mild fixed colour tint per texture category (multiplies the grayscale photo).
_TINT: dict[str, tuple[float, float, float]] = {
    "brick": (1.00, 0.70, 0.56),
    "grass": (0.70, 0.96, 0.52),
    "gravel": (0.96, 0.91, 0.82),
}
# Stain colour per texture category, chosen to contrast with the tint.
_STAIN: dict[str, tuple[float, float, float]] = {
    "brick": (0.20, 0.26, 0.42),   # dark bluish oil stain
    "grass": (0.62, 0.44, 0.16),   # brown dead patch
    "gravel": (0.74, 0.36, 0.10),  # rust-coloured spill
}
# Texture a "foreign" patch is taken from, per texture category.
_FOREIGN_SOURCES: dict[str, tuple[str, ...]] = {
    "brick": ("gravel", "grass"),
    "grass": ("brick", "gravel"),
    "gravel": ("brick", "grass"),
}

_MASK_THRESHOLD = 0.02  # blend weight above which a pixel counts as changed


# --------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------
def _rng(seed: int, category: str, split: str, kind: str, index: int) -> np.random.Generator:
    """Independent generator per image, stable across runs and Python processes."""
    key = zlib.crc32(f"{category}/{split}/{kind}".encode("utf-8"))
    return np.random.default_rng(np.random.SeedSequence([seed, key, index]))


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


def _mask_from(alpha: np.ndarray) -> np.ndarray:
    return alpha > _MASK_THRESHOLD


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)


# --------------------------------------------------------------------------------------
# textures
# --------------------------------------------------------------------------------------
def _texture_good(category: str, size: int, rng: np.random.Generator) -> np.ndarray:
    gray = _random_crop(category, size, rng)
    gain = rng.uniform(0.96, 1.04)
    img = gray[..., None] * (np.asarray(_TINT[category], dtype=np.float32) * np.float32(gain))
    return np.clip(img, 0.0, 1.0)


def _defect_center(size: int, rng: np.random.Generator, margin: float) -> tuple[float, float]:
    lo, hi = margin * size, (1.0 - margin) * size
    return float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))


def _scratch_alpha(size: int, rng: np.random.Generator,
                   length_frac: tuple[float, float] = (0.35, 0.55)) -> np.ndarray:
    """One curved scratch (quadratic Bezier) of width ~size/64 somewhere in the image."""
    width = max(2.0, size / 64.0) * rng.uniform(0.85, 1.2)
    length = rng.uniform(*length_frac) * size
    c = np.array(_defect_center(size, rng, 0.3))
    ang = rng.uniform(0.0, np.pi)
    d = np.array([np.sin(ang), np.cos(ang)]) * length / 2.0
    normal = np.array([d[1], -d[0]]) / np.linalg.norm(d)
    bend = rng.uniform(-0.35, 0.35) * length
    p0, p2 = c - d, c + d
    p1 = c + normal * bend
    return _stroke(size, _curve_points(p0, p1, p2), width)


def _texture_defect(category: str, defect: str, img: np.ndarray,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = img.shape[0]
    if defect == "scratch":
        alpha = _scratch_alpha(size, rng)
        if rng.random() < 0.5:
            value = rng.uniform(0.88, 0.98)          # bright scratch (fresh material)
        else:
            value = rng.uniform(0.03, 0.10)          # dark scratch (groove)
        target = np.full_like(img, value)
        out = _blend(img, target, alpha * rng.uniform(0.85, 1.0))
    elif defect == "hole":
        r = rng.uniform(0.055, 0.085) * size
        aspect = rng.uniform(0.75, 1.0)
        alpha = _blob(size, rng, _defect_center(size, rng, 0.15), (r * aspect, r), edge_px=max(1.5, size / 128))
        depth = np.clip(ndimage.gaussian_filter(alpha, sigma=max(1.0, r / 4.0)), 0, 1)
        target = img * 0.08 + 0.02 * (1.0 - depth)[..., None]  # near-black core, slightly lighter rim
        out = _blend(img, target, alpha)
    elif defect == "stain":
        r = rng.uniform(0.07, 0.11) * size
        aspect = rng.uniform(0.6, 1.0)
        alpha = _blob(size, rng, _defect_center(size, rng, 0.18), (r * aspect, r), edge_px=max(2.0, size / 64),
                      wobble=0.2)
        color = np.asarray(_STAIN[category], dtype=np.float32)
        lum = _luma(img)[..., None]
        target = color * (0.55 + 0.9 * lum)           # keep the underlying texture visible
        out = _blend(img, target, alpha * rng.uniform(0.7, 0.85))
    elif defect == "foreign":
        src_name = _FOREIGN_SOURCES[category][int(rng.integers(0, len(_FOREIGN_SOURCES[category])))]
        patch = _random_crop(src_name, size, rng)[..., None] * np.asarray(_TINT[src_name], dtype=np.float32)
        r = rng.uniform(0.065, 0.10) * size
        aspect = rng.uniform(0.6, 1.0)
        alpha = _blob(size, rng, _defect_center(size, rng, 0.18), (r * aspect, r), edge_px=max(1.0, size / 256),
                      wobble=0.15)
        out = _blend(img, patch, alpha)
    else:  # pragma: no cover - guarded by DEFECTS
        raise ConfigError(f"unknown defect {defect!r} for category {category!r}")
    return np.clip(out, 0.0, 1.0).astype(np.float32), _mask_from(alpha)


# --------------------------------------------------------------------------------------
# procedural object: brushed metal washer
# --------------------------------------------------------------------------------------
class _Washer:
    """Geometry of one washer instance (random jitter drawn from ``rng``)."""

    def __init__(self, size: int, rng: np.random.Generator) -> None:
        self.size = size
        jitter = 0.03 * size
        self.cy = size / 2.0 + float(np.clip(rng.normal(0.0, jitter / 2), -jitter, jitter))
        self.cx = size / 2.0 + float(np.clip(rng.normal(0.0, jitter / 2), -jitter, jitter))
        self.r_out = 0.36 * size * rng.uniform(0.985, 1.015)
        self.r_in = 0.155 * size * rng.uniform(0.98, 1.02)
        self.rot = rng.uniform(-np.pi / 12, np.pi / 12)
        # brushed-metal concentric texture parameters
        self.freqs = rng.uniform(0.25, 0.9, size=4) * (256.0 / size)
        self.phases = rng.uniform(0.0, 2 * np.pi, size=4)
        yy, xx = _grid(size)
        self.dy, self.dx = yy - self.cy, xx - self.cx
        self.r = np.sqrt(self.dy ** 2 + self.dx ** 2)
        self.theta = np.arctan2(self.dy, self.dx)
        # sensor noise, drawn with the geometry so that a defect changes only its own pixels
        self.noise = 0.01 * rng.standard_normal((size, size, 3), dtype=np.float32)

    def coverage(self) -> np.ndarray:
        outer = np.clip(self.r_out - self.r + 0.5, 0.0, 1.0)
        inner = np.clip(self.r - self.r_in + 0.5, 0.0, 1.0)
        return (outer * inner).astype(np.float32)

    def render(self, coverage: np.ndarray) -> np.ndarray:
        size = self.size
        bg = np.array([0.16, 0.18, 0.22], dtype=np.float32)
        # face shading: directional light from the top-left plus a mild radial falloff
        light = np.pi * 1.25  # direction (atan2 convention), top-left
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
        img = bg * (1.0 - coverage[..., None]) + metal * coverage[..., None]
        img = img + self.noise
        return np.clip(img, 0.0, 1.0).astype(np.float32)

    def point_on_ring(self, rng: np.random.Generator, margin: float) -> tuple[float, float, float, float]:
        """Random (y, x, radius, angle) on the ring face, ``margin`` px away from both edges."""
        rad = rng.uniform(self.r_in + margin, max(self.r_in + margin, self.r_out - margin))
        ang = rng.uniform(0.0, 2 * np.pi)
        return self.cy + rad * np.sin(ang), self.cx + rad * np.cos(ang), rad, ang


def _washer_good(size: int, rng: np.random.Generator) -> np.ndarray:
    washer = _Washer(size, rng)
    return washer.render(washer.coverage())


def _washer_defect(defect: str, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    washer = _Washer(size, rng)
    cov = washer.coverage()
    if defect == "cut":
        if rng.random() < 0.7:  # bite out of the outer rim
            rho = rng.uniform(0.06, 0.085) * size
            dist = washer.r_out - rng.uniform(0.1, 0.4) * rho
        else:                   # bite out of the inner rim
            rho = rng.uniform(0.05, 0.07) * size
            dist = washer.r_in + rng.uniform(0.1, 0.4) * rho
        ang = rng.uniform(0.0, 2 * np.pi)
        # notch centre relative to the washer centre, distance of every pixel to it
        oy, ox = dist * np.sin(ang), dist * np.cos(ang)
        d = np.sqrt((washer.dy - oy) ** 2 + (washer.dx - ox) ** 2)
        notch = np.clip(rho - d + 0.5, 0.0, 1.0)
        new_cov = (cov * (1.0 - notch)).astype(np.float32)
        img = washer.render(new_cov)
        return img, _mask_from(cov - new_cov)
    img = washer.render(cov)
    if defect == "scratch":
        width = max(2.0, size / 64.0) * rng.uniform(0.9, 1.2)
        # a curved scratch running across the ring face, from near one edge to near the other
        span = washer.r_out - washer.r_in
        ang0 = rng.uniform(0.0, 2 * np.pi)
        dang = rng.uniform(0.9, 1.4) * rng.choice([-1.0, 1.0])
        r0 = washer.r_in + rng.uniform(0.08, 0.3) * span
        r1 = washer.r_out - rng.uniform(0.08, 0.3) * span
        if rng.random() < 0.5:
            r0, r1 = r1, r0
        t = np.linspace(0.0, 1.0, 400)
        rr = r0 + (r1 - r0) * t
        aa = ang0 + dang * t + rng.uniform(-0.15, 0.15) * np.sin(np.pi * t)
        pts = np.stack([washer.cy + rr * np.sin(aa), washer.cx + rr * np.cos(aa)], axis=1)
        alpha = _stroke(size, pts, width) * cov
        value = rng.uniform(0.92, 1.0) if rng.random() < 0.5 else rng.uniform(0.12, 0.22)
        out = _blend(img, np.full_like(img, value), alpha * rng.uniform(0.85, 1.0))
    elif defect == "rust":
        r = rng.uniform(0.06, 0.09) * size
        margin = 0.25 * (washer.r_out - washer.r_in)
        cy, cx, _, _ = washer.point_on_ring(rng, margin)
        alpha = _blob(size, rng, (cy, cx), (r * rng.uniform(0.6, 1.0), r), edge_px=max(1.5, size / 96),
                      wobble=0.25) * cov
        grain = ndimage.gaussian_filter(rng.standard_normal((size, size), dtype=np.float32), sigma=max(0.7, size / 256))
        grain = grain / (grain.std() + 1e-6)
        rust = np.array([0.56, 0.27, 0.10], dtype=np.float32) * (1.0 + 0.18 * grain)[..., None]
        out = _blend(img, rust, alpha * rng.uniform(0.8, 0.95))
    else:  # pragma: no cover - guarded by DEFECTS
        raise ConfigError(f"unknown defect {defect!r} for category 'washer'")
    return np.clip(out, 0.0, 1.0).astype(np.float32), _mask_from(alpha)


# --------------------------------------------------------------------------------------
# dispatch + writing
# --------------------------------------------------------------------------------------
def _good(category: str, size: int, rng: np.random.Generator) -> np.ndarray:
    if category in TEXTURES:
        return _texture_good(category, size, rng)
    return _washer_good(size, rng)


def _defective(category: str, defect: str, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    if category in TEXTURES:
        return _texture_defect(category, defect, _texture_good(category, size, rng), rng)
    return _washer_defect(defect, size, rng)


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
        "procedural brushed-metal washer. All defects are synthetic, with exact pixel masks.",
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
             image_size: int = 256, n_train: int = 40, n_test_good: int = 10, n_test_per_defect: int = 6,
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
