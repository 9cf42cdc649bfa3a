"""Deterministic synthetic defects on good images: ``(image, mask, kind)`` for validation and training.

Used (a) as a validation set for model selection when no real defects exist and (b) to train heads
(CSE, a segmentation head) on generated defects.  :func:`generate` makes one defect,
:func:`generate_batch` many, cycling over good images; :func:`foreground_mask` estimates an object's
foreground so defects can be kept on the object.

Masks
-----
* Perlin kinds (``patch``, ``texture``, ``intensity``, ``blur``, ``noise``): the ``k`` pixels with the
  highest value of a 2-D gradient (Perlin) noise field, fractal sum of 1-3 octaves whose base
  lattice (1 .. side/8 cells, independently per axis) the rng draws.  ``k`` is drawn log-uniformly in
  ``DefectConfig.area`` (a fraction of the image area), so masks go from a few pixels to large
  multi-blob regions, and the area is always exactly within the range (never empty).  The fill is
  blended in with an opacity drawn in ``DefectConfig.opacity``.
* ``cutpaste``: a rectangle (aspect 0.3 - 3.3, axis-aligned or rotated) of the same image pasted
  elsewhere, its content rotated or not, colour-jittered half of the time; ``cutpaste_scar``: the same
  with a thin long rotated rectangle (length >= 5x width while the area allows; length at most 0.9x
  the shorter image side, so large scar areas widen the scar).  The mask is the pasted rectangle
  (the ``k`` pixels nearest its centre in the rotated rectangle's Chebyshev distance), pasted opaque.

Fills
-----
``patch``: another good image of the same category from ``pool`` (resized if needed), randomly flipped
and shifted (mirror padding).  ``texture``: a procedural texture made here (random-phase noise with a
random spectral slope, stripes or checkers) through a random colour map of 2-4 random colours; nothing is
downloaded or read from disk.  ``intensity``: contrast change about the region's mean plus a
brightness/colour offset.  ``blur``: box blur or axis-aligned motion blur.  ``noise``: additive Gaussian
noise (grey or per channel).

Exact masks
-----------
The mask is exactly the set of changed pixels: every pixel outside it is bitwise the input, and every
pixel inside it differs from the input by at least ``2/255`` in at least one channel (``MIN_CHANGE``;
for uint8 input: at least 2 grey levels), so the change survives quantisation to 8 bits.  A pixel whose
blended value would be closer than that (blur or a brightness shift in a flat region, a fill that
happens to match) is pushed by ``2.5/255`` (uint8: 2 levels) in every channel, in the direction of the
intended change (or towards the side with room).  Output stays in ``[0, 1]`` (uint8 in, uint8 out).

``pool`` and ``patch``
----------------------
With ``DefectConfig.kinds=None`` (default: all kinds), ``patch`` is drawn only when ``pool`` holds an
image other than the input; otherwise it is left out (the other weights keep their shares).  Naming
``patch`` explicitly in ``kinds`` without such a pool raises :class:`~anoseg.errors.ConfigError`.

Independence from the dataset painter
-------------------------------------
The demo dataset (:mod:`anoseg.data.synthetic`) paints its defects with wobbly soft ellipses
(holes, stains, colour shifts, rust, smudges, notches), Bezier-curve strokes (scratches), foreign
patches cut from *other* scikit-image texture photos, and logical part swaps on a circuit board.  This
module imports nothing from it and shares none of those recipes: masks are Perlin-noise level sets or
(rotated) rectangles, never ellipses/blobs or strokes; fills come from the same category's good images,
from the image itself, from procedural textures generated here (never the scikit-image photos), or from
box/motion blur, additive offsets and additive noise (not the painter's multiplicative tints, chroma
shifts or darkened Gaussian smear).

Determinism: everything is drawn from ``np.random.default_rng(seed)`` and computed in float64 numpy on
the CPU, so the same seed and inputs give bitwise-identical output.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from anoseg.errors import ConfigError

__all__ = [
    "KINDS",
    "PERLIN_KINDS",
    "MIN_CHANGE",
    "DefectConfig",
    "generate",
    "generate_batch",
    "batch_seed",
    "foreground_mask",
    "perlin_noise",
]

KINDS: tuple[str, ...] = ("patch", "texture", "cutpaste", "cutpaste_scar", "intensity", "blur", "noise")
PERLIN_KINDS: tuple[str, ...] = ("patch", "texture", "intensity", "blur", "noise")
#: Smallest change (in at least one channel) of every pixel inside a mask, on the [0, 1] scale.
MIN_CHANGE = 2.0 / 255.0
_NUDGE = 2.5 / 255.0      # float push for pixels that changed less than MIN_CHANGE
_NUDGE_LEVELS = 2         # the same for uint8 images, in grey levels
_MAX_AREA = 0.5           # largest allowed area fraction
_MIN_SIDE = 8

ImageLike = Union[torch.Tensor, np.ndarray]


# --------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------
def _pair(name: str, value: Any, low: float, high: float, *, low_open: bool) -> tuple[float, float]:
    """A (min, max) pair of finite numbers with low </<= min <= max <= high."""
    bound = f"{'(' if low_open else '['}{low:g}, {high:g}]"
    try:
        a, b = value
        a, b = float(a), float(b)
    except (TypeError, ValueError):
        raise ConfigError(f"DefectConfig.{name}: must be a (min, max) pair of numbers in {bound}, "
                          f"got {value!r}") from None
    if isinstance(value, str) or not (math.isfinite(a) and math.isfinite(b)):
        raise ConfigError(f"DefectConfig.{name}: must be a (min, max) pair of numbers in {bound}, got {value!r}")
    if (a <= low if low_open else a < low) or b > high:
        raise ConfigError(f"DefectConfig.{name}: values must lie in {bound}, got {value!r}")
    if a > b:
        raise ConfigError(f"DefectConfig.{name}: min must be <= max, got {value!r}")
    return a, b


@dataclass(frozen=True)
class DefectConfig:
    """Options of the defect generator (validated on construction; errors are ConfigError).

    Attributes:
        kinds: kinds to draw from, a subset of :data:`KINDS`; ``None`` = all of them, ``patch`` only
            when a pool is given (see the module docstring).
        weights: relative shares of the kinds (default equal): a mapping ``{kind: weight}`` (kinds not
            named keep weight 1) or a sequence aligned with ``kinds`` (explicit ``kinds`` only); weights
            are >= 0 with a positive sum.  After validation: a tuple aligned with the resolved kinds.
        area: (min, max) mask area as a fraction of the image area, in (0, 0.5]; drawn log-uniformly.
        opacity: (min, max) opacity of the fill of the Perlin kinds, in (0, 1].
    """

    kinds: tuple[str, ...] | None = None
    weights: Mapping[str, float] | Sequence[float] | None = None
    area: tuple[float, float] = (0.002, 0.15)
    opacity: tuple[float, float] = (0.5, 1.0)

    def __post_init__(self) -> None:
        allowed = ", ".join(KINDS)
        kinds = self.kinds
        if kinds is not None:
            if isinstance(kinds, str):
                kinds = (kinds,)
            try:
                kinds = tuple(kinds)
            except TypeError:
                raise ConfigError(f"DefectConfig.kinds: must be a list of kinds from {allowed}, got {kinds!r}") from None
            if not kinds:
                raise ConfigError(f"DefectConfig.kinds: is empty; allowed: {allowed}")
            for k in kinds:
                if not isinstance(k, str) or k not in KINDS:
                    raise ConfigError(f"DefectConfig.kinds: unknown kind {k!r}; allowed: {allowed}")
            if len(set(kinds)) != len(kinds):
                raise ConfigError(f"DefectConfig.kinds: repeated kind in {list(kinds)}")
        resolved = KINDS if kinds is None else kinds
        w = self.weights
        if w is None:
            weights = (1.0,) * len(resolved)
        elif isinstance(w, Mapping):
            for k in w:
                if k not in resolved:
                    raise ConfigError(f"DefectConfig.weights: key {k!r} is not one of the kinds; "
                                      f"allowed: {', '.join(resolved)}")
            weights = tuple(w.get(k, 1.0) for k in resolved)
        else:
            if kinds is None:
                raise ConfigError("DefectConfig.weights: a list of weights needs explicit kinds; "
                                  f"use a mapping {{kind: weight}} with kinds from {allowed}")
            if isinstance(w, str):
                raise ConfigError(f"DefectConfig.weights: must be numbers, got {w!r}")
            try:
                weights = tuple(w)
            except TypeError:
                raise ConfigError(f"DefectConfig.weights: must be a mapping or a list of numbers, got {w!r}") from None
            if len(weights) != len(resolved):
                raise ConfigError(f"DefectConfig.weights: {len(weights)} weights for {len(resolved)} kinds "
                                  f"{list(resolved)}")
        out = []
        for k, x in zip(resolved, weights):
            if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)) \
                    or not math.isfinite(float(x)) or float(x) < 0:
                raise ConfigError(f"DefectConfig.weights: weight of {k!r} must be a finite number >= 0, got {x!r}")
            out.append(float(x))
        if sum(out) <= 0:
            raise ConfigError("DefectConfig.weights: all weights are 0; at least one must be > 0")
        object.__setattr__(self, "kinds", kinds)
        object.__setattr__(self, "weights", tuple(out))
        object.__setattr__(self, "area", _pair("area", self.area, 0.0, _MAX_AREA, low_open=True))
        object.__setattr__(self, "opacity", _pair("opacity", self.opacity, 0.0, 1.0, low_open=True))

    def draw_table(self, has_pool: bool) -> tuple[tuple[str, ...], np.ndarray]:
        """The kinds that can be drawn and their probabilities, given whether a usable pool exists."""
        kinds = KINDS if self.kinds is None else self.kinds
        weights = list(self.weights)  # type: ignore[arg-type]
        if not has_pool and "patch" in kinds:
            if self.kinds is not None:
                raise ConfigError("kind 'patch' needs pool=[other good images of the same category]; "
                                  "pass a pool or remove 'patch' from DefectConfig.kinds")
            i = kinds.index("patch")
            kinds = kinds[:i] + kinds[i + 1:]
            del weights[i]
        p = np.asarray(weights, dtype=np.float64)
        if p.sum() <= 0:
            raise ConfigError("DefectConfig.weights: every kind that can be drawn has weight 0 "
                              "('patch' is left out without a pool)")
        return kinds, p / p.sum()


# --------------------------------------------------------------------------------------
# input handling
# --------------------------------------------------------------------------------------
def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or int(seed) < 0:
        raise ConfigError(f"seed must be an integer >= 0, got {seed!r}")
    return int(seed)


def _as_tensor(image: Any, what: str) -> torch.Tensor:
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image))
    if not isinstance(image, torch.Tensor):
        raise ConfigError(f"{what} must be a torch tensor (C, H, W), got {type(image).__name__}")
    if image.ndim != 3 or image.shape[1] < _MIN_SIDE or image.shape[2] < _MIN_SIDE or image.shape[0] < 1:
        raise ConfigError(f"{what} must have shape (C, H, W) with H, W >= {_MIN_SIDE}, got {tuple(image.shape)}")
    if image.dtype not in (torch.uint8, torch.float16, torch.float32, torch.float64):
        raise ConfigError(f"{what} must be uint8 or float16/32/64, got {image.dtype}")
    return image


def _to_hwc(image: torch.Tensor, what: str) -> np.ndarray:
    """(C, H, W) tensor -> float64 (H, W, C) numpy in [0, 1] (exact for every accepted dtype)."""
    arr = image.detach().cpu()
    if arr.dtype == torch.uint8:
        out = arr.numpy().astype(np.float64) / 255.0
    else:
        out = arr.to(torch.float64).numpy()
        if not np.isfinite(out).all() or out.min() < 0.0 or out.max() > 1.0:
            raise ConfigError(f"{what}: float values must lie in [0, 1]")
    return np.ascontiguousarray(out.transpose(1, 2, 0))


def _as_mask(fg: Any, shape: tuple[int, int], what: str = "foreground") -> np.ndarray:
    if isinstance(fg, torch.Tensor):
        fg = fg.detach().cpu().numpy()
    fg = np.asarray(fg)
    if fg.shape != shape:
        raise ConfigError(f"{what} must be an (H, W) mask of shape {shape}, got {fg.shape}")
    if fg.dtype != bool:
        if not np.isin(fg, (0, 1)).all():
            raise ConfigError(f"{what} must be boolean (or 0/1)")
        fg = fg.astype(bool)
    return fg


# --------------------------------------------------------------------------------------
# Perlin noise and masks
# --------------------------------------------------------------------------------------
def _fade(t: np.ndarray) -> np.ndarray:
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin_noise(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """2-D gradient (Perlin) noise of ``shape`` with ``res`` lattice cells per axis, float64 in about [-1, 1]."""
    h, w = shape
    ry, rx = max(1, int(res[0])), max(1, int(res[1]))
    angles = rng.uniform(0.0, 2.0 * np.pi, size=(ry + 1, rx + 1))
    gy, gx = np.sin(angles), np.cos(angles)
    y = (np.arange(h) + 0.5) * (ry / h)
    x = (np.arange(w) + 0.5) * (rx / w)
    yi, xi = np.minimum(np.floor(y).astype(np.int64), ry - 1), np.minimum(np.floor(x).astype(np.int64), rx - 1)
    yf, xf = (y - yi)[:, None], (x - xi)[None, :]
    Y, X = yi[:, None], xi[None, :]

    def corner(dy: int, dx: int) -> np.ndarray:
        return gy[Y + dy, X + dx] * (yf - dy) + gx[Y + dy, X + dx] * (xf - dx)

    u, v = _fade(yf), _fade(xf)
    top = corner(0, 0) * (1 - v) + corner(0, 1) * v
    bottom = corner(1, 0) * (1 - v) + corner(1, 1) * v
    return (top * (1 - u) + bottom * u) * math.sqrt(2.0)


def _fractal_perlin(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Fractal sum of 1-3 octaves of Perlin noise with a random base lattice per axis."""
    h, w = shape
    top = max(0, int(math.log2(max(1, min(h, w) // 8))))
    ry, rx = 2 ** int(rng.integers(0, top + 1)), 2 ** int(rng.integers(0, top + 1))
    octaves = int(rng.integers(1, 4))
    total = np.zeros(shape, dtype=np.float64)
    for o in range(octaves):
        res = (min(ry * 2 ** o, max(1, h // 2)), min(rx * 2 ** o, max(1, w // 2)))
        total += 0.5 ** o * perlin_noise(shape, res, rng)
    # a tiny deterministic jitter breaks exact ties so the top-k set is well defined
    return total + 1e-9 * rng.standard_normal(shape)


def _top_k(score: np.ndarray, k: int, allowed: np.ndarray | None) -> np.ndarray:
    """Mask of the ``k`` highest-scoring allowed pixels (ties broken by pixel order)."""
    flat = score.ravel()
    idx = np.arange(flat.size) if allowed is None else np.flatnonzero(allowed.ravel())
    order = np.argsort(-flat[idx], kind="stable")[:k]
    mask = np.zeros(flat.size, dtype=bool)
    mask[idx[order]] = True
    return mask.reshape(score.shape)


def _area_bounds(config: DefectConfig, h: int, w: int, fg_pixels: int) -> tuple[int, int]:
    n = h * w
    kmin = max(1, math.ceil(config.area[0] * n - 1e-9))
    kmax = max(kmin, math.floor(config.area[1] * n + 1e-9))
    if kmin > fg_pixels:
        raise ConfigError(f"foreground has {fg_pixels} pixels, fewer than the smallest defect area "
                          f"({kmin} pixels = DefectConfig.area[0] of the image); lower area or enlarge the foreground")
    return kmin, min(kmax, fg_pixels)


def _draw_k(rng: np.random.Generator, kmin: int, kmax: int) -> int:
    """A pixel count drawn log-uniformly in [kmin, kmax]."""
    k = int(round(math.exp(rng.uniform(math.log(kmin), math.log(kmax + 1e-12)))))
    return min(max(k, kmin), kmax)


# --------------------------------------------------------------------------------------
# fills of the Perlin kinds
# --------------------------------------------------------------------------------------
def _colour_map(t: np.ndarray, channels: int, rng: np.random.Generator) -> np.ndarray:
    """Map t in [0, 1] (H, W) through a piecewise-linear map between 2-4 random colours."""
    n = int(rng.integers(2, 5))
    anchors = rng.uniform(0.0, 1.0, size=(n, channels))
    pos = np.linspace(0.0, 1.0, n)
    return np.stack([np.interp(t, pos, anchors[:, c]) for c in range(channels)], axis=-1)


def _texture(h: int, w: int, channels: int, rng: np.random.Generator) -> np.ndarray:
    """A procedural texture (H, W, C) in [0, 1]: spectral noise, stripes or checkers."""
    style = int(rng.integers(0, 3))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    if style == 0:  # random-phase noise with amplitude ~ f^(-beta), anisotropic
        beta = rng.uniform(0.5, 3.0)
        fy = np.fft.fftfreq(h)[:, None] * rng.uniform(0.5, 2.0)
        fx = np.fft.rfftfreq(w)[None, :]
        f = np.sqrt(fy ** 2 + fx ** 2)
        f[0, 0] = 1.0
        spectrum = f ** (-beta) * np.exp(2j * np.pi * rng.uniform(0.0, 1.0, size=f.shape))
        spectrum[0, 0] = 0.0
        t = np.fft.irfft2(spectrum, s=(h, w))
    elif style == 1:  # stripes, optionally wavy
        theta = rng.uniform(0.0, np.pi)
        period = rng.uniform(3.0, max(4.0, min(h, w) / 3.0))
        u = xx * math.cos(theta) + yy * math.sin(theta)
        v = -xx * math.sin(theta) + yy * math.cos(theta)
        wave = rng.uniform(0.0, 2.0) * np.sin(2 * np.pi * v / rng.uniform(8.0, 40.0))
        t = np.sin(2 * np.pi * u / period + wave + rng.uniform(0, 2 * np.pi))
        if rng.random() < 0.5:
            t = np.sign(t) * np.abs(t) ** 0.3  # sharper
    else:  # rotated checkers
        theta = rng.uniform(0.0, np.pi)
        cell = rng.uniform(2.0, max(3.0, min(h, w) / 4.0))
        u = (xx * math.cos(theta) + yy * math.sin(theta)) / cell
        v = (-xx * math.sin(theta) + yy * math.cos(theta)) / cell
        t = ((np.floor(u) + np.floor(v)) % 2.0) + 0.15 * rng.standard_normal((h, w))
    lo, hi = t.min(), t.max()
    t = (t - lo) / (hi - lo) if hi > lo else np.zeros_like(t)
    return _colour_map(t, channels, rng)


def _patch_fill(pool: list[np.ndarray], h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Another good image from the pool, resized to (h, w), randomly flipped and shifted (mirrored)."""
    src = pool[int(rng.integers(0, len(pool)))]
    if src.shape[:2] != (h, w):
        t = torch.from_numpy(np.ascontiguousarray(src.transpose(2, 0, 1)))[None]
        src = F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)[0].numpy().transpose(1, 2, 0)
        src = np.clip(src, 0.0, 1.0)
    if rng.random() < 0.5:
        src = src[::-1]
    if rng.random() < 0.5:
        src = src[:, ::-1]
    py, px = h // 2, w // 2
    dy, dx = int(rng.integers(-py, py + 1)), int(rng.integers(-px, px + 1))
    padded = np.pad(src, ((py, py), (px, px), (0, 0)), mode="symmetric")
    return np.ascontiguousarray(padded[py + dy:py + dy + h, px + dx:px + dx + w])


def _fill(kind: str, img: np.ndarray, mask: np.ndarray, pool: list[np.ndarray],
          rng: np.random.Generator) -> np.ndarray:
    h, w, c = img.shape
    side = min(h, w)
    if kind == "patch":
        return _patch_fill(pool, h, w, rng)
    if kind == "texture":
        return _texture(h, w, c, rng)
    if kind == "intensity":
        mean = img[mask].mean(axis=0)
        contrast = rng.uniform(0.6, 1.4)
        brightness = rng.choice([-1.0, 1.0]) * rng.uniform(0.06, 0.3)
        colour = rng.uniform(-0.08, 0.08, size=c)
        return (img - mean) * contrast + mean + brightness + colour
    if kind == "blur":
        if rng.random() < 0.5:
            size = 2 * int(rng.integers(1, max(2, side // 16) + 1)) + 1
            return ndimage.uniform_filter(img, size=(size, size, 1), mode="reflect")
        size = int(rng.integers(3, max(4, side // 6) + 1))
        return ndimage.uniform_filter1d(img, size=size, axis=int(rng.integers(0, 2)), mode="reflect")
    if kind == "noise":
        sigma = rng.uniform(0.03, 0.2)
        if rng.random() < 0.5:
            return img + sigma * rng.standard_normal((h, w, 1))
        return img + sigma * rng.standard_normal((h, w, c))
    raise AssertionError(kind)  # pragma: no cover


# --------------------------------------------------------------------------------------
# cut-paste
# --------------------------------------------------------------------------------------
def _centre(rng: np.random.Generator, h: int, w: int, ey: float, ex: float) -> tuple[float, float]:
    """A random point whose (ey, ex) half-extent box fits in the image (the middle if it cannot)."""
    cy = rng.uniform(ey, h - ey) if 2 * ey < h else h / 2.0
    cx = rng.uniform(ex, w - ex) if 2 * ex < w else w / 2.0
    return cy, cx


def _cutpaste(img: np.ndarray, scar: bool, kmin: int, kmax: int, fg: np.ndarray | None,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(mask, proposal) of a rectangle (or thin scar) cut from ``img`` and pasted elsewhere."""
    h, w, c = img.shape
    side = min(h, w)
    long_max = 0.9 * side
    if scar:
        width_max = max(2.0, 0.05 * side)
        k = _draw_k(rng, kmin, max(kmin, min(kmax, int(long_max * width_max))))
        width = min(rng.uniform(1.0, width_max), math.sqrt(k / 5.0))
        width = max(width, k / long_max, 0.5)
        length = k / width
        theta = rng.uniform(0.0, np.pi)
        rot_content = False
    else:
        k = _draw_k(rng, kmin, kmax)
        lo, hi = math.log(0.3), math.log(1 / 0.3)
        if k > 0:  # keep the longer side within long_max where possible
            lo = max(lo, math.log(k / long_max ** 2))
            hi = min(hi, math.log(long_max ** 2 / k))
        aspect = math.exp(rng.uniform(lo, hi)) if lo < hi else 1.0
        length, width = math.sqrt(k * aspect), math.sqrt(k / aspect)
        theta = 0.0 if rng.random() < 0.5 else rng.uniform(0.0, np.pi)
        rot_content = rng.random() < 0.5
    cos, sin = math.cos(theta), math.sin(theta)
    ex = 0.5 * (length * abs(cos) + width * abs(sin))
    ey = 0.5 * (length * abs(sin) + width * abs(cos))
    if fg is not None:  # centre on a random foreground pixel
        idx = np.flatnonzero(fg.ravel())
        p = int(idx[int(rng.integers(0, idx.size))])
        ct = (p // w + 0.5, p % w + 0.5)
    else:
        ct = _centre(rng, h, w, ey, ex)
    # source centre: away from the target when there is room
    cs = _centre(rng, h, w, ey, ex)
    for _ in range(8):
        if math.hypot(cs[0] - ct[0], cs[1] - ct[1]) >= 0.5 * min(length, width) + 1.0:
            break
        cs = _centre(rng, h, w, ey, ex)
    theta_src = rng.uniform(0.0, 2 * np.pi) if rot_content else theta

    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    dy, dx = yy - ct[0], xx - ct[1]
    u = dx * cos + dy * sin
    v = -dx * sin + dy * cos
    score = -np.maximum(np.abs(u) / length, np.abs(v) / width)
    mask = _top_k(score, k, fg)

    # content: local (u, v) of each masked pixel mapped into the source rectangle (nearest pixel)
    us, vs = u[mask], v[mask]
    cs_, sn_ = math.cos(theta_src), math.sin(theta_src)
    sy = cs[0] + us * sn_ + vs * cs_
    sx = cs[1] + us * cs_ - vs * sn_
    iy = np.clip(np.floor(sy), 0, h - 1).astype(np.int64)
    ix = np.clip(np.floor(sx), 0, w - 1).astype(np.int64)
    content = img[iy, ix]
    if rng.random() < 0.5:  # colour jitter
        content = content * rng.uniform(0.85, 1.15, size=c) + rng.uniform(-0.06, 0.06, size=c)
    proposal = img.copy()
    proposal[mask] = content
    return mask, proposal


# --------------------------------------------------------------------------------------
# exact-mask output
# --------------------------------------------------------------------------------------
def _finish(original: torch.Tensor, orig: np.ndarray, proposal: np.ndarray, mask: np.ndarray) -> torch.Tensor:
    """The output tensor: ``original`` outside ``mask``, ``proposal`` (pushed to >= MIN_CHANGE) inside."""
    p = np.clip(proposal[mask], 0.0, 1.0)  # (N, C) float64
    o = orig[mask]
    room_up = o <= 0.5
    direction = np.where(p > o, 1.0, np.where(p < o, -1.0, np.where(room_up, 1.0, -1.0)))
    if original.dtype == torch.uint8:
        ol = np.round(o * 255.0).astype(np.int64)
        pl = np.round(p * 255.0).astype(np.int64)
        weak = np.abs(pl - ol).max(axis=1) < _NUDGE_LEVELS
        step = direction * _NUDGE_LEVELS
        step = np.where((ol + step < 0) | (ol + step > 255), -step, step).astype(np.int64)
        pl[weak] = ol[weak] + step[weak]
        values = torch.from_numpy(pl.astype(np.uint8))
    else:
        np_dtype = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}[original.dtype]
        pc = p.astype(np_dtype).astype(np.float64)
        weak = np.abs(pc - o).max(axis=1) < MIN_CHANGE
        step = direction * _NUDGE
        step = np.where((o + step < 0.0) | (o + step > 1.0), -step, step)
        pc[weak] = o[weak] + step[weak]
        values = torch.from_numpy(pc.astype(np_dtype))
    out = original.detach().cpu().clone()
    m = torch.from_numpy(mask)
    out[:, m] = values.T.contiguous()
    return out.to(original.device)


# --------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------
def _prepare_pool(pool: Any, image: torch.Tensor, channels: int) -> list[np.ndarray]:
    """The pool as float64 (H, W, C) arrays, without images equal to ``image``."""
    if pool is None:
        return []
    if isinstance(pool, (torch.Tensor, np.ndarray)) and np.ndim(pool) == 3:
        raise ConfigError("pool must be a list of (C, H, W) images or an (N, C, H, W) tensor, got one image")
    out = []
    for i, item in enumerate(pool):
        t = _as_tensor(item, f"pool[{i}]")
        if t.shape[0] != channels:
            raise ConfigError(f"pool[{i}] has {t.shape[0]} channels, the image {channels}")
        if t.shape == image.shape and t.dtype == image.dtype and torch.equal(t.cpu(), image.cpu()):
            continue  # not "another" image
        out.append(_to_hwc(t, f"pool[{i}]"))
    return out


def _resolve_config(config: DefectConfig | Mapping[str, Any] | None) -> DefectConfig:
    if config is None:
        return DefectConfig()
    if isinstance(config, DefectConfig):
        return config
    if isinstance(config, Mapping):
        unknown = set(config) - {"kinds", "weights", "area", "opacity"}
        if unknown:
            raise ConfigError(f"DefectConfig: unknown field(s) {sorted(unknown)}; allowed: kinds, weights, area, opacity")
        return DefectConfig(**config)
    raise ConfigError(f"config must be a DefectConfig or a mapping, got {type(config).__name__}")


def generate(image: ImageLike, *, seed: int, config: DefectConfig | Mapping[str, Any] | None = None,
             pool: Sequence[ImageLike] | torch.Tensor | None = None,
             foreground: torch.Tensor | np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """One synthetic defect on a good image.

    Args:
        image: good image (C, H, W), float in [0, 1] or uint8 (numpy arrays are accepted too).
        seed: integer >= 0; the same seed and inputs give bitwise-identical output.
        config: :class:`DefectConfig` (or a mapping of its fields); default ``DefectConfig()``.
        pool: other good images of the same category (any size, same channels) for ``patch``;
            entries equal to ``image`` are ignored.
        foreground: optional (H, W) bool mask; the defect lies inside it.

    Returns:
        ``(defective, mask, kind)``: the image with the input's dtype, shape and device, the (H, W)
        bool mask of exactly the changed pixels (each changed by >= :data:`MIN_CHANGE`), the kind.
    """
    seed = _check_seed(seed)
    config = _resolve_config(config)
    image = _as_tensor(image, "image")
    orig = _to_hwc(image, "image")
    h, w, c = orig.shape
    fg = None if foreground is None else _as_mask(foreground, (h, w))
    fg_pixels = h * w if fg is None else int(fg.sum())
    pool_arrays = _prepare_pool(pool, image, c)
    kinds, probs = config.draw_table(bool(pool_arrays))
    kmin, kmax = _area_bounds(config, h, w, fg_pixels)

    rng = np.random.default_rng(seed)
    kind = kinds[int(rng.choice(len(kinds), p=probs))]
    if kind in ("cutpaste", "cutpaste_scar"):
        mask, proposal = _cutpaste(orig, kind == "cutpaste_scar", kmin, kmax, fg, rng)
    else:
        k = _draw_k(rng, kmin, kmax)
        mask = _top_k(_fractal_perlin((h, w), rng), k, fg)
        fill = _fill(kind, orig, mask, pool_arrays, rng)
        alpha = rng.uniform(*config.opacity)
        proposal = orig * (1.0 - alpha) + np.clip(fill, 0.0, 1.0) * alpha
    out = _finish(image, orig, proposal, mask)
    return out, torch.from_numpy(mask), kind


def batch_seed(seed: int, index: int) -> int:
    """The seed :func:`generate_batch` uses for item ``index`` (a 63-bit hash of ``(seed, index)``)."""
    state = np.random.SeedSequence([_check_seed(seed), int(index)]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


def generate_batch(images: Sequence[ImageLike] | torch.Tensor, n: int, *, seed: int,
                   config: DefectConfig | Mapping[str, Any] | None = None,
                   pool: Sequence[ImageLike] | torch.Tensor | None = None,
                   foreground: Any = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``n`` defective images cycling over ``images`` (item ``i`` uses ``images[i % len(images)]``).

    Item ``i`` equals ``generate(images[i % len(images)], seed=batch_seed(seed, i), ...)``.  All images
    must share one shape and dtype.  ``foreground`` is None, one (H, W) mask for all images, or one mask
    per image (a sequence or an (N, H, W) tensor aligned with ``images``).

    Returns:
        ``(images (n, C, H, W), masks (n, H, W) bool, kinds)``.
    """
    seed = _check_seed(seed)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ConfigError(f"n must be an integer >= 1, got {n!r}")
    if isinstance(images, (torch.Tensor, np.ndarray)) and np.ndim(images) == 3:
        raise ConfigError("images must be a list of (C, H, W) images or an (N, C, H, W) tensor, got one image")
    goods = [_as_tensor(im, f"images[{i}]") for i, im in enumerate(images)]
    if not goods:
        raise ConfigError("images is empty")
    for i, im in enumerate(goods):
        if im.shape != goods[0].shape or im.dtype != goods[0].dtype:
            raise ConfigError(f"images[{i}] is {tuple(im.shape)} {im.dtype}, images[0] "
                              f"{tuple(goods[0].shape)} {goods[0].dtype}; all must match")
    config = _resolve_config(config)
    hw = tuple(goods[0].shape[1:])
    if foreground is None:
        fgs: list[Any] = [None] * len(goods)
    elif np.ndim(foreground) == 2:
        fgs = [foreground] * len(goods)
    else:
        fgs = list(foreground)
        if len(fgs) != len(goods):
            raise ConfigError(f"foreground has {len(fgs)} masks for {len(goods)} images")
    outs, masks, kinds = [], [], []
    for i in range(int(n)):
        j = i % len(goods)
        out, mask, kind = generate(goods[j], seed=batch_seed(seed, i), config=config, pool=pool,
                                   foreground=None if fgs[j] is None else _as_mask(fgs[j], hw))
        outs.append(out)
        masks.append(mask)
        kinds.append(kind)
    return torch.stack(outs), torch.stack(masks), kinds


def foreground_mask(image: ImageLike, *, border: float = 0.03, threshold: float | None = None,
                    max_hole: float = 0.01) -> torch.Tensor:
    """Estimate the foreground of an object photographed on a roughly uniform background.

    The background colour is the per-channel median of a border strip (``border`` x the shorter side,
    at least 1 px); a pixel is foreground when some channel differs from it by more than ``threshold``
    (default: the larger of 0.04 and 2x the 98th percentile of the border's own differences, i.e. above
    the background's noise and shading).  The result is cleaned: opening (drops specks), closing,
    holes smaller than ``max_hole`` of the image filled, components smaller than 5 % of the largest one
    removed.

    Limits: it assumes the object does not touch most of the border and that the background is one
    colour (a strong gradient, vignette or shadow shows up as foreground; object parts of the
    background's colour are missed unless they are small holes); it finds no "object" in a texture
    image.  When nothing is found it returns an all-True mask (the whole image), so it is always safe to
    pass as ``foreground``.

    Returns:
        (H, W) bool tensor on the CPU.
    """
    t = _as_tensor(image, "image")
    img = _to_hwc(t, "image")
    h, w, _ = img.shape
    b = max(1, int(round(border * min(h, w))))
    strip = np.concatenate([img[:b].reshape(-1, img.shape[2]), img[-b:].reshape(-1, img.shape[2]),
                            img[:, :b].reshape(-1, img.shape[2]), img[:, -b:].reshape(-1, img.shape[2])])
    ref = np.median(strip, axis=0)
    diff = np.abs(img - ref).max(axis=2)
    if threshold is None:
        edge = np.abs(strip - ref).max(axis=1)
        threshold = max(0.04, 2.0 * float(np.quantile(edge, 0.98)))
    m = diff > threshold
    m = ndimage.binary_opening(m, iterations=1)
    m = ndimage.binary_closing(np.pad(m, 2), iterations=2)[2:-2, 2:-2]
    holes = ndimage.binary_fill_holes(m) & ~m
    if holes.any():
        lab, n = ndimage.label(holes)
        sizes = ndimage.sum_labels(holes, lab, index=np.arange(1, n + 1))
        small = np.flatnonzero(sizes < max_hole * h * w) + 1
        m |= np.isin(lab, small)
    lab, n = ndimage.label(m)
    if n == 0:
        return torch.ones((h, w), dtype=torch.bool)
    sizes = ndimage.sum_labels(m, lab, index=np.arange(1, n + 1))
    keep = np.flatnonzero(sizes >= 0.05 * sizes.max()) + 1
    return torch.from_numpy(np.isin(lab, keep))
