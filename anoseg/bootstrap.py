"""Paired, stratified bootstrap intervals of quality metrics, and tie marking between trials.

A replicate resamples one category's test images with replacement within each stratum ("good" and
each defect type), so it keeps the class balance. The same resamples serve every trial (paired), so
the replicates of two trials differ only by their maps and scores, and the interval of their
difference says whether the two can be told apart.

The metric of a replicate equals the metric (conventions of :mod:`anoseg.metrics`) of the
concatenation of its images, computed without concatenating: the pixels are sorted once and every
count, region weight and the region count becomes a sum weighted by the images' multiplicities in
the replicate (a pixel of an image drawn twice counts twice, of an image not drawn not at all; the
scores it leaves out only add repeated curve points). A replicate whose metric is undefined (say,
no anomalous pixel among its images) is NaN; :func:`interval` ignores NaN replicates.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from anoseg.errors import ConfigError, DataError

__all__ = ["BOOTSTRAP_METRICS", "Comparison", "category_seed", "compare", "interval", "mean_over_categories",
           "replicates", "resample_indices"]

#: The metrics :func:`replicates` computes, with their better direction.
BOOTSTRAP_METRICS: dict[str, str] = {
    "image_auroc": "max",
    "image_f1_max": "max",
    "miss_rate_0.05": "min",
    "pixel_auroc": "max",
    "pixel_f1_max": "max",
    "aupro": "max",
    "aupro_0.05": "max",
    "seg_f1": "max",
}
_IMAGE_METRICS = ("image_auroc", "image_f1_max", "miss_rate_0.05")
_AUPRO_LIMITS = {"aupro": 0.3, "aupro_0.05": 0.05}
_MISS_RATE_GOOD_FRACTION = 0.05

# 8-connected regions within an image, none across images of the (N, H, W) stack (as anoseg.metrics).
_REGION_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_REGION_STRUCTURE[1] = True
# Largest number of float64 elements of a temporary array (chunks bound the memory).
_CHUNK_ELEMENTS = 1 << 22


# --------------------------------------------------------------------------- resampling


def category_seed(seed: int, category: str) -> int:
    """A seed for one category derived stably from (seed, category) (SHA-256, not Python's hash())."""
    digest = hashlib.sha256(f"{int(seed)}\x00{category}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _check_n_boot(n_boot: Any) -> int:
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ConfigError(f"the number of bootstrap replicates must be an integer >= 1; got {n_boot!r}")
    return int(n_boot)


def resample_indices(strata: Sequence[str], n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, N) image indices: row b draws, with replacement, within each stratum as many images as it
    has (at that stratum's positions), so each row keeps every stratum's count. Deterministic for a seed."""
    n_boot = _check_n_boot(n_boot)
    names = [str(s) for s in strata]
    if not names:
        raise DataError("resampling needs at least one image; got no strata")
    rng = np.random.default_rng(seed)
    names_arr = np.asarray(names)
    out = np.empty((n_boot, len(names)), dtype=np.int64)
    for name in sorted(set(names)):
        members = np.flatnonzero(names_arr == name)
        out[:, members] = members[rng.integers(0, members.size, size=(n_boot, members.size))]
    return out


def _multiplicities(resamples: Any, n_images: int) -> np.ndarray:
    """(B, N) float64: how often each image occurs in each row of `resamples`."""
    from anoseg.metrics import _to_numpy

    arr = _to_numpy(resamples, "resamples")
    if arr.ndim != 2 or arr.shape[0] < 1:
        raise DataError(f"resamples must be a (B, N) array of image indices with B >= 1; got shape {arr.shape}")
    if arr.shape[1] != n_images:
        raise DataError(f"resamples rows have {arr.shape[1]} indices but the category has {n_images} images")
    if arr.dtype.kind not in "iu":
        raise DataError(f"resamples must hold integer image indices; got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() >= n_images):
        raise DataError(f"resamples hold indices outside [0, {n_images})")
    n_boot = arr.shape[0]
    offsets = (np.arange(n_boot, dtype=np.int64) * n_images)[:, None]
    counts = np.bincount((arr.astype(np.int64) + offsets).ravel(), minlength=n_boot * n_images)
    return counts.reshape(n_boot, n_images).astype(np.float64)


# --------------------------------------------------------------------------- image metrics


def _image_auroc(w: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUROC (ties count one half) with multiplicities: a quadratic form in w."""
    pair = labels[:, None] & ~labels[None, :]
    kernel = ((scores[:, None] > scores[None, :]) + 0.5 * (scores[:, None] == scores[None, :])) * pair
    num = np.einsum("bi,bi->b", w @ kernel, w)
    den = (w @ labels.astype(np.float64)) * (w @ (~labels).astype(np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _f1_max(w: np.ndarray, pos_table: Any, neg_table: Any, n_thresholds: int, n_pos: np.ndarray) -> np.ndarray:
    """max over thresholds of 2TP / (TP + FP + P); tables give (N, chunk) counts >= threshold per image."""
    best = np.full(w.shape[0], -np.inf)
    step = max(1, _CHUNK_ELEMENTS // max(w.shape[0], w.shape[1]))
    for start in range(0, n_thresholds, step):
        sl = slice(start, min(start + step, n_thresholds))
        tp = w @ pos_table(sl)
        fp = w @ neg_table(sl)
        with np.errstate(divide="ignore", invalid="ignore"):
            f1 = 2.0 * tp / (tp + fp + n_pos[:, None])
        np.fmax(best, f1.max(axis=1), out=best)
    return np.where(n_pos > 0, best, np.nan)


def _image_f1_max(w: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    thresholds = np.unique(scores[labels])
    ge = scores[:, None] >= thresholds[None, :]
    pos = (ge & labels[:, None]).astype(np.float64)
    neg = (ge & ~labels[:, None]).astype(np.float64)
    return _f1_max(w, lambda sl: pos[:, sl], lambda sl: neg[:, sl], thresholds.size,
                   w @ labels.astype(np.float64))


def _miss_rate(w: np.ndarray, labels: np.ndarray, scores: np.ndarray, good_fraction: float) -> np.ndarray:
    """Fraction of defective images below the smallest threshold (distinct scores, +inf) that at most
    `good_fraction` of the good images reach."""
    candidates = np.append(np.unique(scores).astype(np.float64), np.inf)
    ge = scores.astype(np.float64)[:, None] >= candidates[None, :]
    n_good = w @ (~labels).astype(np.float64)
    n_bad = w @ labels.astype(np.float64)
    good_ge = w @ (ge & ~labels[:, None]).astype(np.float64)  # (B, C)
    bad_lt = w @ (~ge & labels[:, None]).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ok = good_ge / n_good[:, None] <= good_fraction  # a suffix of the candidates (+inf always)
        first = np.argmax(ok, axis=1)
        miss = bad_lt[np.arange(w.shape[0]), first] / n_bad
    return np.where((n_good > 0) & (n_bad > 0), miss, np.nan)


# --------------------------------------------------------------------------- pixel metrics


class _Pixels:
    """A category's pixels sorted once: keys image * K + rank of the score (K distinct scores), the
    normal ones sorted, the anomalous ones sorted with their region weights (1 / region size)."""

    def __init__(self, masks: np.ndarray, maps: np.ndarray, with_regions: bool) -> None:
        n, h, width = masks.shape
        flat_masks = masks.reshape(-1)
        flat_maps = maps.reshape(-1)
        # One sort of all pixels: dense ranks of the scores; the normal pixels, in score order, then
        # grouped by image with a stable (radix) sort of their image numbers.
        perm = np.argsort(flat_maps)
        sorted_maps = flat_maps[perm]
        is_new = np.empty(perm.size, dtype=bool)
        is_new[:1] = True
        np.not_equal(sorted_maps[1:], sorted_maps[:-1], out=is_new[1:])
        rank_sorted = np.cumsum(is_new, dtype=np.int64) - 1
        rank = np.empty(perm.size, dtype=np.int64)
        rank[perm] = rank_sorted
        self.n_images = n
        self.k = k = int(rank_sorted[-1]) + 1
        self.base = np.arange(n, dtype=np.int64) * k
        image_dtype = np.uint16 if n <= np.iinfo(np.uint16).max else np.int64
        image = np.repeat(np.arange(n, dtype=image_dtype), h * width)
        normal_sorted = ~flat_masks[perm]
        image_n = image[perm[normal_sorted]]
        by_image = np.argsort(image_n, kind="stable")
        self.nkey = image_n[by_image].astype(np.int64) * k + rank_sorted[normal_sorted][by_image]
        self.n_normal = np.bincount(image_n, minlength=n).astype(np.float64)
        self.nend = np.cumsum(self.n_normal).astype(np.int64)
        image_a = np.flatnonzero(flat_masks) // (h * width)
        akey = image_a * k + rank[flat_masks]
        order = np.argsort(akey, kind="stable")
        self.akey = akey[order]
        self.rank_a = rank[flat_masks][order]
        self.n_anomalous = np.bincount(image_a, minlength=n).astype(np.float64)
        self.aend = np.cumsum(self.n_anomalous).astype(np.int64)
        self.astart = self.aend - self.n_anomalous.astype(np.int64)
        # Distinct anomalous ranks (the thresholds that change an overlap) and each pixel's among them.
        self.distinct_a, pos = np.unique(self.rank_a, return_inverse=True)
        self.pos_a = pos.reshape(-1)
        if with_regions:
            from scipy import ndimage

            labelled, n_regions = ndimage.label(masks, structure=_REGION_STRUCTURE)
            region_ids = labelled[masks]  # C order, as image_a
            sizes = np.bincount(region_ids, minlength=n_regions + 1)
            self.rho = (1.0 / sizes[region_ids])[order]
            region_image = np.zeros(n_regions + 1, dtype=np.int64)
            region_image[region_ids] = image_a
            self.n_regions = np.bincount(region_image[1:], minlength=n).astype(np.float64)
            self.rho_cumsum = np.concatenate(([0.0], np.cumsum(self.rho)))

    def normal_ge(self, images: np.ndarray, ranks: np.ndarray, side: str = "left") -> np.ndarray:
        """Normal pixels of `images` (broadcast with `ranks`) scoring >= (side left) or > (right) the rank."""
        return self.nend[images] - np.searchsorted(self.nkey, self.base[images] + ranks, side=side)

    def fp_at(self, w: np.ndarray, ranks: np.ndarray) -> np.ndarray:
        """(B,) weighted count of normal pixels with rank >= ranks (B,)."""
        cnt = self.normal_ge(np.arange(self.n_images)[None, :], ranks[:, None])
        return np.einsum("bi,bi->b", w, cnt.astype(np.float64))

    def first_anomalous(self, ranks: np.ndarray) -> np.ndarray:
        """(B, N) position in the anomalous order of each image's first pixel with rank >= ranks (B,)."""
        return np.searchsorted(self.akey, self.base[None, :] + ranks[:, None], side="left")

    def overlap_at(self, w: np.ndarray, ranks: np.ndarray) -> np.ndarray:
        """(B,) weighted sum of region weights of anomalous pixels with rank >= ranks (B,)."""
        cs = self.rho_cumsum
        return np.einsum("bi,bi->b", w, cs[self.aend][None, :] - cs[self.first_anomalous(ranks)])

    def d_table(self, images: np.ndarray) -> np.ndarray:
        """(A, len(images)): for each anomalous pixel a and image i, #normal_i > s_a + #normal_i >= s_a."""
        idx, distinct = images[:, None], self.distinct_a[None, :]
        d = self.normal_ge(idx, distinct, "left") + self.normal_ge(idx, distinct, "right")
        return d[:, self.pos_a].T.astype(np.float64)

    def image_chunks(self, rows: int) -> list[np.ndarray]:
        step = max(1, _CHUNK_ELEMENTS // max(1, rows, self.akey.size))
        return [np.arange(s, min(s + step, self.n_images)) for s in range(0, self.n_images, step)]


def _pixel_auroc(w: np.ndarray, px: _Pixels) -> np.ndarray:
    """Mann-Whitney pixel AUROC: twice U = w' M w with M[j, i] = sum over anomalous a of image j of
    #normal_i < s_a + #normal_i <= s_a = 2 n_i A_j - sum_a D_i(a)."""
    m = np.empty((px.n_images, px.n_images))
    for images in px.image_chunks(w.shape[0] * px.n_images):
        cd = np.zeros((px.akey.size + 1, images.size))
        np.cumsum(px.d_table(images), axis=0, out=cd[1:])
        m[:, images] = 2.0 * px.n_anomalous[:, None] * px.n_normal[None, images] - (cd[px.aend] - cd[px.astart])
    twice_u = np.einsum("bj,bj->b", w @ m, w)
    den = 2.0 * (w @ px.n_normal) * (w @ px.n_anomalous)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, twice_u / np.where(den > 0, den, 1.0), np.nan)


def _pixel_f1_max(w: np.ndarray, px: _Pixels) -> np.ndarray:
    thresholds = px.distinct_a
    images = np.arange(px.n_images)[:, None]

    def pos(sl: slice) -> np.ndarray:
        needles = px.base[images] + thresholds[None, sl]
        return (px.aend[images] - np.searchsorted(px.akey, needles, side="left")).astype(np.float64)

    def neg(sl: slice) -> np.ndarray:
        return px.normal_ge(images, thresholds[None, sl]).astype(np.float64)

    return _f1_max(w, pos, neg, thresholds.size, w @ px.n_anomalous)


def _aupro(w: np.ndarray, px: _Pixels, limit: float) -> np.ndarray:
    """Weighted AUPRO. The curve is cut after its last point with FPR <= limit: the point of all pixels
    scoring above v, the highest score where the weighted false positives (>= v) exceed the limit; the
    next point (>= v) gives the interpolated end. The trapezoid area up to the cut is, summed by parts,
    X Y - sum over anomalous pixels a above v of dPRO_a (FPR(> s_a) + FPR(>= s_a)) / 2, whose weighted form
    is a quadratic form in the multiplicities read off per-image cumulative sums."""
    n_boot = w.shape[0]
    n_normal = w @ px.n_normal
    n_regions = w @ px.n_regions
    valid = (n_normal > 0) & (n_regions > 0)
    nn = np.where(valid, n_normal, 1.0)
    nr = np.where(valid, n_regions, 1.0)
    # Largest false-positive count f with f / nn <= limit, as anoseg.metrics compares (floats).
    f_max = np.floor(limit * nn)
    f_max = np.where((f_max + 1) / nn <= limit, f_max + 1, f_max)
    f_max = np.where(f_max / nn > limit, f_max - 1, f_max)
    # Bisection for v: largest rank with fp(>= v) > f_max (rank -1 stands for "below every score").
    lo = np.full(n_boot, -1, dtype=np.int64)
    hi = np.full(n_boot, px.k, dtype=np.int64)
    for _ in range((px.k + 1).bit_length()):
        mid = (lo + hi) // 2
        above = (mid < 0) | (px.fp_at(w, np.maximum(mid, 0)) > f_max)
        lo = np.where(above, mid, lo)
        hi = np.where(above, hi, mid)
    cut = lo + 1  # pixels with rank >= cut are in
    v = np.maximum(lo, 0)
    x0 = px.fp_at(w, cut) / nn
    y0 = np.minimum(px.overlap_at(w, cut) / nr, 1.0)
    x1 = px.fp_at(w, v) / nn
    y1 = np.minimum(px.overlap_at(w, v) / nr, 1.0)
    # sum_j sum_i w_j w_i sum_{a of image j, rank >= cut} rho_a D_i(a), D_i(a) = #normal_i > s_a + >= s_a
    first = px.first_anomalous(cut)  # (B, N)
    s = np.zeros(n_boot)
    for images in px.image_chunks(n_boot * px.n_images):
        cp = np.zeros((px.akey.size + 1, images.size))
        np.cumsum(px.rho[:, None] * px.d_table(images), axis=0, out=cp[1:])
        h = cp[px.aend][None, :, :] - cp[first]  # (B, N, chunk)
        s += np.einsum("bi,bi->b", np.einsum("bj,bji->bi", w, h), w[:, images])
    area = x0 * y0 - 0.5 * s / (nn * nr)
    with np.errstate(divide="ignore", invalid="ignore"):
        y_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        tail = 0.5 * (y_limit + y0) * (limit - x0)
    area = np.where(x0 != limit, area + tail, area)
    return np.where(valid, area / limit, np.nan)


def _seg_f1(w: np.ndarray, masks: np.ndarray, maps: np.ndarray, threshold: float) -> np.ndarray:
    """Pixel F1 at a fixed threshold (score >= threshold compared as reals); NaN without anomalous pixels."""
    predicted = maps.astype(np.float64, copy=False) >= float(threshold)
    tp = np.count_nonzero(predicted & masks, axis=(1, 2)).astype(np.float64)
    fp = np.count_nonzero(predicted, axis=(1, 2)) - tp
    n_pos = np.count_nonzero(masks, axis=(1, 2)).astype(np.float64)
    tp_b, n_pos_b = w @ tp, w @ n_pos
    den = tp_b + w @ fp + n_pos_b
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(n_pos_b > 0, 2.0 * tp_b / np.where(den > 0, den, 1.0), np.nan)


def replicates(
    metric_name: str,
    resamples: np.ndarray,
    *,
    labels: Any,
    scores: Any,
    masks: Any = None,
    maps: Any = None,
    pixel_threshold: float | None = None,
) -> np.ndarray:
    """(B,) the metric on each resampled image set (row of `resamples`, image indices into the category):
    equal to the anoseg.metrics value on the concatenation of those images; NaN where it is undefined.

    labels (N,) 0/1 and scores (N,) per image; masks (N,H,W) and maps (N,H,W) for pixel metrics;
    `pixel_threshold` for seg_f1 (a pixel is anomalous when its map value is >= it), held fixed over the
    replicates (the one of the point value).
    """
    if metric_name not in BOOTSTRAP_METRICS:
        raise ConfigError(f"unknown bootstrap metric {metric_name!r}; allowed: {', '.join(BOOTSTRAP_METRICS)}")
    from anoseg.metrics import _image_inputs, _pixel_inputs, _to_numpy

    if metric_name in _IMAGE_METRICS:
        labels_b, scores_f = _image_inputs(labels, scores)
        w = _multiplicities(resamples, labels_b.size)
        if metric_name == "image_auroc":
            return _image_auroc(w, labels_b, scores_f)
        if metric_name == "image_f1_max":
            return _image_f1_max(w, labels_b, scores_f)
        return _miss_rate(w, labels_b, scores_f, _MISS_RATE_GOOD_FRACTION)

    if masks is None or maps is None:
        raise DataError(f"{metric_name} is a pixel metric: it needs masks and maps")
    masks_b, maps_f = _pixel_inputs(masks, maps)
    n_images = masks_b.shape[0]
    for name, value in (("labels", labels), ("scores", scores)):
        if value is not None and _to_numpy(value, name).shape != (n_images,):
            raise DataError(f"{name} must have one entry per image ({n_images}); "
                            f"got shape {tuple(_to_numpy(value, name).shape)}")
    w = _multiplicities(resamples, n_images)
    if metric_name == "seg_f1":
        if (pixel_threshold is None or isinstance(pixel_threshold, bool)
                or not isinstance(pixel_threshold, (int, float, np.floating, np.integer))
                or math.isnan(pixel_threshold)):
            raise ConfigError(f"seg_f1 needs a pixel_threshold (a real number, held fixed over the replicates); "
                              f"got {pixel_threshold!r}")
        return _seg_f1(w, masks_b, maps_f, pixel_threshold)
    if metric_name == "pixel_auroc":
        return _pixel_auroc(w, _Pixels(masks_b, maps_f, with_regions=False))
    if metric_name == "pixel_f1_max":
        return _pixel_f1_max(w, _Pixels(masks_b, maps_f, with_regions=False))
    return _aupro(w, _Pixels(masks_b, maps_f, with_regions=True), _AUPRO_LIMITS[metric_name])


# --------------------------------------------------------------------------- intervals and ties


def _check_level(level: Any) -> float:
    if isinstance(level, bool) or not isinstance(level, (int, float, np.floating, np.integer)):
        raise ConfigError(f"the interval level must be a number in (0, 1); got {level!r}")
    if not (0.0 < float(level) < 1.0):
        raise ConfigError(f"the interval level must be in (0, 1), e.g. 0.95; got {level!r}")
    return float(level)


def _replicate_vector(values: Any, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.size < 1:
        raise DataError(f"{name} must be a 1-D array of B >= 1 replicates; got shape {arr.shape}")
    return arr


def interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval (the central `level` share) of bootstrap replicates, NaN replicates ignored."""
    level = _check_level(level)
    arr = _replicate_vector(values, "replicates")
    arr = arr[~np.isnan(arr)]
    if arr.size == 0:
        raise DataError("no defined replicate (all are NaN): the metric is undefined on every resample")
    low, high = np.percentile(arr, [50.0 * (1.0 - level), 50.0 * (1.0 + level)])
    return float(low), float(high)


def mean_over_categories(per_category: Sequence[np.ndarray]) -> np.ndarray:
    """(B,) replicates of a category mean: the mean over categories of each category's (paired) replicates."""
    arrays = [_replicate_vector(a, f"replicates of category {k}") for k, a in enumerate(per_category)]
    if not arrays:
        raise DataError("mean over categories needs at least one category's replicates")
    if len({a.shape for a in arrays}) > 1:
        raise DataError(f"every category needs the same number of replicates; got {[a.size for a in arrays]}")
    return np.mean(np.stack(arrays), axis=0)


@dataclass(frozen=True)
class Comparison:
    """One trial against the best: its point value and interval, and the interval of trial - best."""

    trial: str
    value: float
    low: float
    high: float
    diff_low: float
    diff_high: float
    tied: bool  # the difference interval contains 0 (the best is tied with itself)
    best: bool


def compare(
    replicates_by_trial: Mapping[str, np.ndarray],
    mode: str,
    point: Mapping[str, float],
    level: float = 0.95,
) -> list[Comparison]:
    """Each trial against the best by point value (`mode` "max" or "min"), best first, then by point value:
    its interval, the paired interval of (trial - best) and whether that contains 0 (tied)."""
    if mode not in ("max", "min"):
        raise ConfigError(f"mode must be 'max' or 'min'; got {mode!r}")
    level = _check_level(level)
    if not replicates_by_trial:
        raise DataError("compare needs at least one trial")
    reps = {str(t): _replicate_vector(r, f"replicates of trial {t!r}") for t, r in replicates_by_trial.items()}
    if len({r.shape for r in reps.values()}) > 1:
        raise DataError("every trial needs the same (paired) replicates; got lengths "
                        + ", ".join(f"{t}: {r.size}" for t, r in reps.items()))
    missing = [t for t in replicates_by_trial if t not in point]
    if missing:
        raise DataError(f"no point value for trials {missing}")
    values = {str(t): float(point[t]) for t in replicates_by_trial}
    bad = [t for t, v in values.items() if not math.isfinite(v)]
    if bad:
        raise DataError(f"point values must be finite; not for trials {bad}")
    sign = -1.0 if mode == "max" else 1.0
    order = sorted(values, key=lambda t: sign * values[t])  # stable: ties keep the input order
    best = order[0]
    out = []
    for t in order:
        low, high = interval(reps[t], level)
        diff_low, diff_high = interval(reps[t] - reps[best], level) if t != best else (0.0, 0.0)
        out.append(Comparison(t, values[t], low, high, diff_low, diff_high,
                              tied=bool(diff_low <= 0.0 <= diff_high), best=t == best))
    return out
