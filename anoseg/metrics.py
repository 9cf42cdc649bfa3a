"""MVTec AD evaluation metrics: image/pixel AUROC, AUPRO and max-F1, exact (no score binning).

Conventions (those of the MVTec AD evaluation code):

* A pixel or image is predicted anomalous at threshold ``t`` when its score is ``>= t``; every
  distinct score value is a threshold and tied scores enter the curves together (one curve point
  per distinct score).
* AUPRO: the ground-truth regions are the 8-connected components of each image's mask, pooled
  over all images of the category. At each threshold, FPR = false-positive pixels / all normal
  pixels of all images (normal pixels of defective images included) and PRO = the mean over all
  regions of the fraction of the region's pixels above the threshold. The curve starts at (0, 0),
  ends at (1, 1), and its trapezoidal area from FPR 0 to ``fpr_limit`` (the PRO at ``fpr_limit``
  linearly interpolated when ``fpr_limit`` is not a curve point) is divided by ``fpr_limit``.

* SegF1 (MVTec AD 2): the pixel F1 = 2TP / (2TP + FP + FN) over all pixels of the category at one
  fixed threshold (pixel anomalous when ``score >= threshold``) that is chosen without defective
  samples: from the pixel scores of good images (:func:`anoseg.thresholds.good_threshold`, by
  default mean + 3 std, as MVTec AD 2 does on its validation images).
* Miss rate at a false-alarm rate ``f``: the image threshold is the smallest candidate (every
  distinct image score, and +inf) at which the share of good images with score ``>= t`` is at
  most ``f``; the miss rate is the share of defective images with score ``< t``. Exact counts, no
  interpolation between curve points.

Pixel metrics sort the normal and the anomalous pixel scores separately (normal pixels only need
counting, anomalous ones also carry a region weight) and read every curve point off the two
sorted arrays with binary searches, which yields the same points as one argsort over all pixels
followed by cumulative sums, at a fraction of the cost. The pixel AUROC is computed exactly as the
Mann-Whitney statistic (ties count one half), which equals the area under the tie-merged ROC curve
that scikit-learn's ``roc_auc_score`` integrates, up to floating-point rounding.

Every public function accepts numpy arrays or torch tensors and returns plain Python floats.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from anoseg.errors import ConfigError, DataError
from anoseg.thresholds import good_threshold

__all__ = ["Metric", "METRICS", "MODES", "QUALITY_METRICS", "COST_METRICS", "MEMORY_METRICS", "METRIC_NAMES", "metric",
           "image_auroc", "pixel_auroc", "aupro", "pro_curve", "f1_max", "seg_f1", "miss_rate", "evaluate"]


@dataclass(frozen=True)
class Metric:
    """A figure a trial reports: its name, whether higher or lower is better, and what it means."""

    name: str
    mode: str  # "max" | "min": the better direction
    description: str
    kind: str  # "quality" (from the maps and scores, per category) | "cost" (per category) | "memory" (per trial)
    label: str  # short column header


#: The directions an objective can take.
MODES = ("max", "min")
#: Every metric a trial reports, in display order. Objectives, tables, exports and dashboards read this list.
METRICS: tuple[Metric, ...] = (
    Metric("image_auroc", "max", "image-level AUROC of the image scores", "quality", "img AUROC"),
    Metric("pixel_auroc", "max", "pixel-level AUROC of the anomaly maps", "quality", "px AUROC"),
    Metric("aupro", "max", "area under the per-region overlap curve up to 30% FPR, normalised", "quality",
           "AUPRO@0.3"),
    Metric("pixel_f1_max", "max", "best pixel F1 over all thresholds", "quality", "px F1max"),
    Metric("image_f1_max", "max", "best image F1 over all thresholds", "quality", "img F1max"),
    Metric("aupro_0.05", "max", "area under the per-region overlap curve up to 5% FPR, normalised", "quality",
           "AUPRO@0.05"),
    Metric("seg_f1", "max", "pixel F1 at a threshold set from good images only (mean + 3 std of their pixel scores)",
           "quality", "segF1"),
    Metric("miss_rate_0.05", "min", "share of defective images passed at the image threshold that fails at most 5% "
           "of the good images", "quality", "miss@5%FA"),
    Metric("fit_seconds", "min", "backbone forward over the training images + head fit, seconds", "cost", "fit s"),
    Metric("ms_per_image", "min", "backbone forward + scoring + map post-processing per test image, ms", "cost",
           "ms/img"),
    Metric("peak_rss_mb", "min", "peak resident memory of the trial's process, MiB", "memory", "RSS MiB"),
    Metric("peak_gpu_mb", "min", "peak GPU memory allocated, MiB (CUDA only)", "memory", "GPU MiB"),
)
_BY_NAME = {m.name: m for m in METRICS}
QUALITY_METRICS: tuple[str, ...] = tuple(m.name for m in METRICS if m.kind == "quality")
COST_METRICS: tuple[str, ...] = tuple(m.name for m in METRICS if m.kind == "cost")
MEMORY_METRICS: tuple[str, ...] = tuple(m.name for m in METRICS if m.kind == "memory")
#: What is measured per category (and averaged over categories): quality and cost.
CATEGORY_METRICS: tuple[str, ...] = QUALITY_METRICS + COST_METRICS
#: The metrics an objective may name.
METRIC_NAMES: tuple[str, ...] = CATEGORY_METRICS


def metric(name: str) -> Metric:
    """The Metric called `name`; a ConfigError listing the known ones otherwise."""
    if name not in _BY_NAME:
        raise ConfigError(f"unknown metric {name!r}; allowed: {', '.join(_BY_NAME)}")
    return _BY_NAME[name]

DEFAULT_FPR_LIMIT = 0.3
#: The low-FPR AUPRO limit (MVTec AD 2 reports AU-PRO up to 5% FPR).
LOW_FPR_LIMIT = 0.05
#: The false-alarm rate (share of good images failed) at which ``miss_rate_0.05`` is read.
DEFAULT_FALSE_ALARM_RATE = 0.05

# 3x3 ones within an image (8-connectivity) and no connection between images of the stack, so
# labelling the (N, H, W) stack at once equals labelling each image with a 3x3 ones structure.
_REGION_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_REGION_STRUCTURE[1] = True


# --------------------------------------------------------------------------- input checks


def _to_numpy(x: Any, name: str) -> np.ndarray:
    """Convert a numpy array, torch tensor or nested sequence to a numpy array."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch tensor, without importing torch
        x = x.detach().cpu()
        if str(x.dtype) in ("torch.bfloat16", "torch.float16"):
            x = x.float()
        x = x.numpy()
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as e:
        raise DataError(f"{name} cannot be converted to a numeric array: {e}") from e


def _scores_array(x: Any, name: str) -> np.ndarray:
    """Real-valued, finite scores; float32/float64 kept (ties stay exact), others to float."""
    arr = _to_numpy(x, name)
    kind = arr.dtype.kind
    if kind == "f":
        if arr.dtype.itemsize < 4:
            arr = arr.astype(np.float32)  # float16 -> float32 is exact
    elif kind in "biu":
        arr = arr.astype(np.float64)
    else:
        raise DataError(f"{name} must hold real numbers; got dtype {arr.dtype}")
    if arr.size and not np.isfinite(arr).all():
        n_nan = int(np.isnan(arr).sum())
        n_inf = int(np.isinf(arr).sum())
        raise DataError(
            f"{name} contains non-finite values ({n_nan} NaN, {n_inf} inf); "
            "anomaly scores must be finite numbers"
        )
    return arr


def _binary_array(x: Any, name: str) -> np.ndarray:
    """Boolean array from bool or 0/1 numeric input."""
    arr = _to_numpy(x, name)
    if arr.dtype == bool:
        return arr
    if arr.dtype.kind not in "iuf":
        raise DataError(f"{name} must be binary (bool or 0/1); got dtype {arr.dtype}")
    bad = (arr != 0) & (arr != 1)
    if bad.any():
        examples = np.unique(arr[bad])[:5].tolist()
        raise DataError(
            f"{name} must be binary (bool or 0/1); found other values such as {examples}"
        )
    return arr != 0


def _check_fpr_limit(fpr_limit: float) -> float:
    if isinstance(fpr_limit, bool) or not isinstance(fpr_limit, (int, float, np.floating, np.integer)):
        raise ConfigError(f"fpr_limit must be a number in (0, 1]; got {fpr_limit!r}")
    limit = float(fpr_limit)
    if not (math.isfinite(limit) and 0.0 < limit <= 1.0):
        raise ConfigError(f"fpr_limit must be in (0, 1]; got {fpr_limit!r}")
    return limit


def _check_threshold(threshold: Any, name: str = "threshold") -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating, np.integer)):
        raise ConfigError(f"{name} must be a real number; got {threshold!r}")
    value = float(threshold)
    if math.isnan(value):
        raise ConfigError(f"{name} must be a real number; got NaN")
    return value


def _check_false_alarm_rate(false_alarm_rate: Any) -> float:
    if isinstance(false_alarm_rate, bool) or not isinstance(false_alarm_rate, (int, float, np.floating, np.integer)):
        raise ConfigError(f"false_alarm_rate must be a number in [0, 1); got {false_alarm_rate!r}")
    rate = float(false_alarm_rate)
    if not (math.isfinite(rate) and 0.0 <= rate < 1.0):
        raise ConfigError(f"false_alarm_rate must be in [0, 1); got {false_alarm_rate!r}")
    return rate


def _pixel_inputs(masks: Any, maps: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validated (masks bool (N,H,W), maps float (N,H,W)) with both pixel classes present."""
    masks_arr = _to_numpy(masks, "masks")
    maps_arr = _to_numpy(maps, "maps")
    if masks_arr.ndim != 3 or maps_arr.ndim != 3:
        raise DataError(
            "masks and maps must be 3-D arrays of shape (N, H, W); "
            f"got masks shape {tuple(masks_arr.shape)} and maps shape {tuple(maps_arr.shape)}"
        )
    if masks_arr.shape != maps_arr.shape:
        raise DataError(
            "masks and maps must have the same shape; "
            f"got masks shape {tuple(masks_arr.shape)} and maps shape {tuple(maps_arr.shape)}"
        )
    if masks_arr.size == 0:
        raise DataError(f"pixel metrics need at least one pixel; got shape {tuple(masks_arr.shape)}")
    masks_b = _binary_array(masks_arr, "masks")
    maps_f = _scores_array(maps_arr, "maps")
    n_anomalous = int(np.count_nonzero(masks_b))
    if n_anomalous == 0:
        raise DataError(
            "pixel metrics need at least one anomalous pixel in the ground truth masks; "
            f"all {masks_b.shape[0]} masks are empty"
        )
    if n_anomalous == masks_b.size:
        raise DataError(
            "pixel metrics need at least one normal pixel in the ground truth masks; "
            "every pixel of every mask is anomalous"
        )
    return masks_b, maps_f


def _image_inputs(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validated (labels bool (N,), scores float (N,)) with both image classes present."""
    labels_arr = _to_numpy(labels, "labels")
    scores_arr = _to_numpy(scores, "scores")
    if labels_arr.ndim != 1 or scores_arr.ndim != 1 or labels_arr.shape != scores_arr.shape:
        raise DataError(
            "image labels and scores must be 1-D arrays of the same length (one per image); "
            f"got labels shape {tuple(labels_arr.shape)} and scores shape {tuple(scores_arr.shape)}"
        )
    labels_b = _binary_array(labels_arr, "labels")
    scores_f = _scores_array(scores_arr, "scores")
    n_anomalous = int(np.count_nonzero(labels_b))
    if n_anomalous == 0 or n_anomalous == labels_b.size:
        raise DataError(
            "image metrics need at least one anomalous image (label 1) and one normal image "
            f"(label 0); got {n_anomalous} anomalous of {labels_b.size} images"
        )
    return labels_b, scores_f


# --------------------------------------------------------------------------- computations


def _runs(sorted_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values of an ascending array and the index of each one's first occurrence."""
    is_first = np.empty(sorted_values.size, dtype=bool)
    is_first[:1] = True
    np.not_equal(sorted_values[1:], sorted_values[:-1], out=is_first[1:])
    first = np.flatnonzero(is_first)
    return sorted_values[first], first


def _auroc_sorted(normal_sorted: np.ndarray, anomalous_sorted: np.ndarray) -> float:
    """Exact AUROC = P(anomalous > normal) + P(equal) / 2, from the two ascending score arrays."""
    below = np.searchsorted(normal_sorted, anomalous_sorted, side="left")
    below_or_equal = np.searchsorted(normal_sorted, anomalous_sorted, side="right")
    twice_u = int(below.sum(dtype=np.int64)) + int(below_or_equal.sum(dtype=np.int64))
    return twice_u / (2 * normal_sorted.size * anomalous_sorted.size)


def _f1_max_sorted(normal_sorted: np.ndarray, positive_sorted: np.ndarray) -> float:
    """Max F1 over thresholds ``score >= t``. Lowering t past a negative-only score only adds
    false positives, so the maximum is reached at a distinct positive score."""
    n_pos = positive_sorted.size
    thresholds, _ = _runs(positive_sorted)
    tp = n_pos - np.searchsorted(positive_sorted, thresholds, side="left")
    fp = normal_sorted.size - np.searchsorted(normal_sorted, thresholds, side="left")
    f1 = 2.0 * tp / (tp + fp + n_pos)  # 2TP / (2TP + FP + FN)
    return float(f1.max())


def _threshold_as(threshold: float, dtype: np.dtype) -> Any:
    """The smallest value ``v`` of ``dtype`` with ``v >= threshold``, so that for finite scores of
    that dtype ``score >= v`` holds exactly when ``score >= threshold`` does (compared as reals)."""
    kind = np.dtype(dtype).type
    if not math.isfinite(threshold) or np.finfo(kind).bits >= 64:
        return kind(threshold)  # float64 (or wider) holds every float threshold exactly
    info = np.finfo(kind)
    if threshold > float(info.max):
        return kind(np.inf)
    if threshold < float(info.min):
        return kind(-np.inf)
    v = kind(threshold)
    if float(v) < threshold:
        v = np.nextafter(v, kind(np.inf))
    return v


def _f1_at_sorted(normal_sorted: np.ndarray, positive_sorted: np.ndarray, threshold: float) -> float:
    """F1 = 2TP / (2TP + FP + FN) of ``score >= threshold`` from the two ascending score arrays."""
    t = _threshold_as(threshold, positive_sorted.dtype)
    tp = positive_sorted.size - int(np.searchsorted(positive_sorted, t, side="left"))
    t = _threshold_as(threshold, normal_sorted.dtype)
    fp = normal_sorted.size - int(np.searchsorted(normal_sorted, t, side="left"))
    return 2.0 * tp / (tp + fp + positive_sorted.size)


def _miss_rate_sorted(good_sorted: np.ndarray, defective_sorted: np.ndarray, false_alarm_rate: float) -> float:
    """Share of defective scores below the smallest candidate threshold whose false-alarm share
    (good scores >= t) is at most ``false_alarm_rate``.

    With K the most good images that may fail (the largest K with K / n_good <= rate), a threshold
    qualifies exactly when it lies above v, the (K+1)-th highest good score; the smallest candidate
    above v is the next distinct score (or +inf), so a defective image is missed exactly when its
    score is <= v.
    """
    n_good = good_sorted.size
    allowed = int(np.flatnonzero(np.arange(n_good + 1) / n_good <= false_alarm_rate).max())  # < n_good
    v = good_sorted[n_good - 1 - allowed]
    return int(np.searchsorted(defective_sorted, v, side="right")) / defective_sorted.size


def _region_weights(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Per anomalous pixel (C order of ``masks``), 1 / size of its 8-connected region; and the
    number of regions pooled over all images."""
    from scipy import ndimage

    labelled, n_regions = ndimage.label(masks, structure=_REGION_STRUCTURE)
    region_ids = labelled[masks]
    sizes = np.bincount(region_ids, minlength=n_regions + 1).astype(np.float64)
    return 1.0 / sizes[region_ids], int(n_regions)


def _pro_curve_sorted(
    normal_sorted: np.ndarray,
    anomalous_sorted: np.ndarray,
    weights_sorted: np.ndarray,
    n_regions: int,
) -> tuple[np.ndarray, np.ndarray]:
    """PRO curve from ascending normal scores and ascending anomalous scores with their weights.

    One point per distinct score t (all pixels with score >= t included): the distinct normal
    scores, merged with the distinct anomalous scores that no normal pixel has. Counts of pixels
    >= t are integers; binary searches run only with the (few) anomalous scores as needles.
    """
    n_normal = normal_sorted.size
    n_anomalous = anomalous_sorted.size
    # Thresholds at distinct normal scores u0[j]: normals >= u0[j] from the first occurrences;
    # anomalies < u0[j] are those whose count of u0 values <= them is at most j.
    u0, first0 = _runs(normal_sorted)
    fp0 = n_normal - first0
    n_u0_le = np.searchsorted(u0, anomalous_sorted, side="right")
    hits0 = n_anomalous - np.cumsum(np.bincount(n_u0_le, minlength=u0.size + 1))[: u0.size]
    # Thresholds at distinct anomalous scores that are not normal scores.
    u1, first1 = _runs(anomalous_sorted)
    n_u0_lt = np.searchsorted(u0, u1, side="left")
    in_u0 = u0[np.minimum(n_u0_lt, u0.size - 1)] == u1
    only1 = ~in_u0
    u1_only, n_u0_lt = u1[only1], n_u0_lt[only1]
    fp1 = n_normal - np.searchsorted(normal_sorted, u1_only, side="left")
    hits1 = n_anomalous - first1[only1]
    # Merge both threshold sets in ascending score order, then walk them descending.
    is_only1 = np.zeros(u0.size + u1_only.size, dtype=bool)
    is_only1[n_u0_lt + np.arange(u1_only.size)] = True
    n_fp = np.empty(is_only1.size, dtype=np.int64)
    n_hit = np.empty(is_only1.size, dtype=np.int64)
    n_fp[is_only1], n_fp[~is_only1] = fp1, fp0
    n_hit[is_only1], n_hit[~is_only1] = hits1, hits0
    n_fp, n_hit = n_fp[::-1], n_hit[::-1]
    # Overlap sums accumulated in descending score order, as a cumulative sum over sorted pixels.
    overlap_cumsum = np.zeros(n_anomalous + 1, dtype=np.float64)
    np.cumsum(weights_sorted[::-1], out=overlap_cumsum[1:])
    fprs = n_fp / np.float64(n_normal)
    pros = overlap_cumsum[n_hit] / np.float64(n_regions)
    np.minimum(fprs, 1.0, out=fprs)
    np.minimum(pros, 1.0, out=pros)
    return np.concatenate(([0.0], fprs, [1.0])), np.concatenate(([0.0], pros, [1.0]))


def _area_to_limit(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area under (x, y) (x ascending, from 0 to 1) on [0, limit]; y interpolated at
    ``limit`` when it is not a point of x."""
    n_in = int(np.searchsorted(x, limit, side="right"))  # points with x <= limit (x[0] = 0)
    xs, ys = x[:n_in], y[:n_in]
    area = float(np.sum(0.5 * (ys[1:] + ys[:-1]) * (xs[1:] - xs[:-1])))
    x0, y0 = x[n_in - 1], y[n_in - 1]
    if x0 != limit:  # then limit < 1 = x[-1], so x[n_in] exists and x[n_in] > limit > x0
        x1, y1 = x[n_in], y[n_in]
        y_limit = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        area += float(0.5 * (y_limit + y0) * (limit - x0))
    return area


class _SortedPixels:
    """Sorted normal scores and sorted anomalous scores (with region weights) of one category."""

    def __init__(self, masks: np.ndarray, maps: np.ndarray, with_regions: bool) -> None:
        flat_masks = masks.reshape(-1)
        flat_maps = maps.reshape(-1)
        self.normal = np.sort(flat_maps[~flat_masks])
        anomalous = flat_maps[flat_masks]
        if with_regions:
            weights, self.n_regions = _region_weights(masks)
            order = np.argsort(anomalous, kind="stable")
            self.anomalous = anomalous[order]
            self.weights = weights[order]
        else:
            self.anomalous = np.sort(anomalous)

        self._curve: tuple[np.ndarray, np.ndarray] | None = None

    def pro_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """The PRO curve, computed once and reused by every :meth:`aupro` limit."""
        if self._curve is None:
            self._curve = _pro_curve_sorted(self.normal, self.anomalous, self.weights, self.n_regions)
        return self._curve

    def aupro(self, limit: float) -> float:
        fprs, pros = self.pro_curve()
        return _area_to_limit(fprs, pros, limit) / limit


# --------------------------------------------------------------------------- public API


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Image-level AUROC (scikit-learn ``roc_auc_score``) of per-image labels 0/1 and scores."""
    labels_b, scores_f = _image_inputs(labels, scores)
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels_b, scores_f))


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    """Exact pixel-level AUROC over all pixels of the category: masks (N,H,W) binary, maps (N,H,W)."""
    masks_b, maps_f = _pixel_inputs(masks, maps)
    pixels = _SortedPixels(masks_b, maps_f, with_regions=False)
    return _auroc_sorted(pixels.normal, pixels.anomalous)


def pro_curve(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fprs, pros) of the per-region overlap curve, one point per distinct score (descending
    threshold) with the (0, 0) and (1, 1) end points; float64 arrays, fprs non-decreasing."""
    masks_b, maps_f = _pixel_inputs(masks, maps)
    return _SortedPixels(masks_b, maps_f, with_regions=True).pro_curve()


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = DEFAULT_FPR_LIMIT) -> float:
    """Area under the PRO curve up to ``fpr_limit`` divided by ``fpr_limit`` (MVTec AD AUPRO)."""
    limit = _check_fpr_limit(fpr_limit)
    masks_b, maps_f = _pixel_inputs(masks, maps)
    return _SortedPixels(masks_b, maps_f, with_regions=True).aupro(limit)


def f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    """Maximum F1 over all thresholds ``score >= t`` (the points of scikit-learn's
    ``precision_recall_curve``); labels 0/1 and scores of any equal shape, flattened."""
    labels_arr = _to_numpy(labels, "labels")
    scores_arr = _to_numpy(scores, "scores")
    if labels_arr.shape != scores_arr.shape:
        raise DataError(
            "labels and scores must have the same shape; "
            f"got labels shape {tuple(labels_arr.shape)} and scores shape {tuple(scores_arr.shape)}"
        )
    labels_b = _binary_array(labels_arr, "labels").reshape(-1)
    scores_f = _scores_array(scores_arr, "scores").reshape(-1)
    if not labels_b.any():
        raise DataError("F1 needs at least one positive label (1); all labels are 0")
    return _f1_max_sorted(np.sort(scores_f[~labels_b]), np.sort(scores_f[labels_b]))


def seg_f1(masks: Any, maps: Any, threshold: float) -> float:
    """Pixel F1 = 2TP / (2TP + FP + FN) at one fixed threshold (pixel anomalous when
    ``score >= threshold``) over all pixels of masks (N,H,W) and maps (N,H,W): MVTec AD 2's SegF1
    when the threshold comes from good images only (:func:`anoseg.thresholds.good_threshold`).
    0.0 when nothing anomalous is found (the masks must hold an anomalous pixel)."""
    t = _check_threshold(threshold)
    masks_b, maps_f = _pixel_inputs(masks, maps)
    predicted = maps_f >= _threshold_as(t, maps_f.dtype)
    tp = int(np.count_nonzero(predicted & masks_b))
    fp = int(np.count_nonzero(predicted)) - tp
    return 2.0 * tp / (tp + fp + int(np.count_nonzero(masks_b)))


def miss_rate(labels: Any, scores: Any, false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE) -> float:
    """Share of defective images (label 1) passed at the image threshold that fails at most
    ``false_alarm_rate`` of the good images (label 0).

    The threshold t is the smallest candidate (every distinct score, and +inf) with
    ``#(good >= t) / #good <= false_alarm_rate``; a defective image is missed when its score is
    ``< t``. Exact counts, no interpolation: ``false_alarm_rate=0`` allows no good image to fail, and
    scores tied with a good score that must pass are missed too.
    """
    rate = _check_false_alarm_rate(false_alarm_rate)
    labels_b, scores_f = _image_inputs(labels, scores)
    return _miss_rate_sorted(np.sort(scores_f[~labels_b]), np.sort(scores_f[labels_b]), rate)


def evaluate(
    maps: Any,
    image_scores: Any,
    masks: Any,
    labels: Any,
    *,
    fpr_limit: float = DEFAULT_FPR_LIMIT,
    pixel_threshold: float | None = None,
) -> dict[str, float]:
    """All quality metrics of one category.

    maps (N,H,W) anomaly maps, image_scores (N,), masks (N,H,W) binary ground truth, labels (N,)
    0/1; numpy arrays or torch tensors. Returns fractions in [0, 1] under the names of
    :data:`QUALITY_METRICS`, in that order: image_auroc, pixel_auroc, aupro (up to ``fpr_limit``),
    pixel_f1_max, image_f1_max, aupro_0.05, seg_f1 and miss_rate_0.05.

    seg_f1 is read at ``pixel_threshold`` when given (pass one chosen on validation good images
    when these are test data); otherwise at :func:`anoseg.thresholds.good_threshold` (mean + 3 std)
    of the pixel scores of the good images (label 0) among these inputs.
    """
    limit = _check_fpr_limit(fpr_limit)
    threshold = None if pixel_threshold is None else _check_threshold(pixel_threshold, "pixel_threshold")
    masks_b, maps_f = _pixel_inputs(masks, maps)
    labels_b, scores_f = _image_inputs(labels, image_scores)
    if labels_b.shape[0] != masks_b.shape[0]:
        raise DataError(
            f"got {labels_b.shape[0]} image labels/scores but {masks_b.shape[0]} masks/maps; "
            "there must be one per image"
        )
    if threshold is None:
        threshold, _ = good_threshold(maps_f[~labels_b])
    from sklearn.metrics import roc_auc_score  # lazily: reading the metric list must stay light

    pixels = _SortedPixels(masks_b, maps_f, with_regions=True)
    good_sorted, defective_sorted = np.sort(scores_f[~labels_b]), np.sort(scores_f[labels_b])
    return {
        "image_auroc": float(roc_auc_score(labels_b, scores_f)),
        "pixel_auroc": _auroc_sorted(pixels.normal, pixels.anomalous),
        "aupro": pixels.aupro(limit),
        "pixel_f1_max": _f1_max_sorted(pixels.normal, pixels.anomalous),
        "image_f1_max": _f1_max_sorted(good_sorted, defective_sorted),
        "aupro_0.05": pixels.aupro(LOW_FPR_LIMIT),
        "seg_f1": _f1_at_sorted(pixels.normal, pixels.anomalous, threshold),
        "miss_rate_0.05": _miss_rate_sorted(good_sorted, defective_sorted, DEFAULT_FALSE_ALARM_RATE),
    }
