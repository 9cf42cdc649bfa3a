"""Decision thresholds: where an image fails and a pixel is anomalous."""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from anoseg.errors import ConfigError, DataError

#: The ways :func:`good_threshold` can set a threshold from good samples only.
GOOD_THRESHOLD_METHODS = ("mean_std", "quantile")


def _good_scores(good_scores: Any) -> np.ndarray:
    """Flat, finite, real scores of good samples (numpy arrays, torch tensors or sequences)."""
    if hasattr(good_scores, "detach") and hasattr(good_scores, "cpu"):  # torch tensor, without importing torch
        good_scores = good_scores.detach().cpu()
        if str(good_scores.dtype) in ("torch.bfloat16", "torch.float16"):
            good_scores = good_scores.float()
        good_scores = good_scores.numpy()
    try:
        arr = np.asarray(good_scores)
    except (TypeError, ValueError) as e:
        raise DataError(f"good scores cannot be converted to a numeric array: {e}") from e
    if arr.dtype.kind not in "biuf":
        raise DataError(f"good scores must hold real numbers; got dtype {arr.dtype}")
    arr = arr.reshape(-1)
    if arr.size == 0:
        raise DataError("a threshold from good samples needs at least one good score; got none")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        n_nan, n_inf = int(np.isnan(arr).sum()), int(np.isinf(arr).sum())
        raise DataError(f"good scores contain non-finite values ({n_nan} NaN, {n_inf} inf); "
                        "anomaly scores must be finite numbers")
    return arr


def _real(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
            or not math.isfinite(float(value)):
        raise ConfigError(f"{name} must be a finite number; got {value!r}")
    return float(value)


def good_threshold(good_scores: Any, method: str = "mean_std", k: float = 3.0,
                   quantile: float = 0.99) -> tuple[float, str]:
    """A threshold set from good (defect-free) samples only, and a short description of it.

    ``"mean_std"`` (default): mean + ``k`` * standard deviation (population, ddof 0) of the scores.
    The default k = 3 follows the MVTec AD 2 SegF1 protocol (Heckler-Kram et al., 2025), whose
    fixed pixel threshold is mean + 3 std of the anomaly scores of the good validation images (the
    "statistical mean+3std binarization" that MVTec AD 2 follow-up work such as RoBiS,
    arXiv:2505.21152, starts from). ``"quantile"``: numpy's ``quantile`` (linear
    interpolation) of the scores at ``quantile``. Statistics are taken in float64. A sample counts
    as anomalous when its score is ``>= threshold``.

    good_scores: any shape, flattened (for a pixel threshold: the anomaly maps of good images).
    Returns (threshold, e.g. "mean + 3.0 std of 1234 good scores").
    """
    if method not in GOOD_THRESHOLD_METHODS:
        raise ConfigError(f"unknown good-threshold method {method!r}; allowed: {', '.join(GOOD_THRESHOLD_METHODS)}")
    if method == "mean_std":
        k = _real(k, "k")
        if k < 0:
            raise ConfigError(f"k (standard deviations above the mean) must be >= 0; got {k!r}")
    else:
        quantile = _real(quantile, "quantile")
        if not 0.0 <= quantile <= 1.0:
            raise ConfigError(f"quantile must be in [0, 1]; got {quantile!r}")
    scores = _good_scores(good_scores)
    n = scores.size
    if method == "mean_std":
        mean = float(np.mean(scores, dtype=np.float64))
        std = float(np.std(scores, dtype=np.float64))
        return mean + k * std, f"mean + {k} std of {n} good scores"
    value = float(np.quantile(scores.astype(np.float64, copy=False), quantile, method="linear"))
    return value, f"{quantile} quantile of {n} good scores"


def f1_max_threshold(labels: Any, scores: Any) -> tuple[float, float]:
    """(best F1, threshold) over thresholds ``score >= t``; the threshold lies midway between the F1-max
    score and the next lower score present (any class), so the decisions on these data are unchanged."""
    labels = np.asarray(labels, dtype=bool).reshape(-1)
    scores = np.asarray(scores).reshape(-1)
    if not labels.any():
        raise DataError("a threshold by F1 needs at least one positive (defective) sample")
    pos = np.sort(scores[labels])
    neg = np.sort(scores[~labels])
    candidates = np.unique(pos)
    tp = pos.size - np.searchsorted(pos, candidates, side="left")
    fp = neg.size - np.searchsorted(neg, candidates, side="left")
    f1 = 2.0 * tp / (tp + fp + pos.size)
    best = int(np.argmax(f1))
    t = candidates[best]
    below = max(pos[pos < t].max(initial=-np.inf), neg[neg < t].max(initial=-np.inf))
    threshold = float(t) if not np.isfinite(below) else float((float(t) + float(below)) / 2)
    return float(f1[best]), threshold


def choose_thresholds(labels: np.ndarray, scores: np.ndarray, masks: np.ndarray, maps: np.ndarray,
                      where: str) -> dict[str, Any]:
    """Image and pixel thresholds at the F1 maximum of these data (`where` names them in "method"),
    with the image F1, precision and recall there; without both good and defective images, the
    highest score (nothing seen fails)."""
    labels = np.asarray(labels).astype(bool)
    if not (labels.any() and not labels.all()):
        return {"image": float(scores.max()), "pixel": float(maps.max()),
                "method": f"max of the scores on {where} (it lacks defective or good images)"}
    image_f1, image_t = f1_max_threshold(labels, scores)
    pixel_f1, pixel_t = f1_max_threshold(masks, maps)
    predicted = scores >= image_t
    return {
        "image": image_t, "pixel": pixel_t, "method": f"f1_max on {where}",
        "image_f1": image_f1, "pixel_f1": pixel_f1,
        "image_precision": float((predicted & labels).sum() / max(1, predicted.sum())),
        "image_recall": float((predicted & labels).sum() / labels.sum()),
    }


def thresholds_from_good(scores: Any, maps: Any, where: str) -> dict[str, Any]:
    """Image and pixel thresholds set from good (defect-free) images only: :func:`good_threshold`'s default
    (mean + 3 std, as MVTec AD 2) of their image scores and of their anomaly-map values.

    scores (N,) and maps (N, H, W) of good images only (numpy arrays or torch tensors); `where` names
    these images in "method". No defect label or mask is used, so this needs no defective image.
    """
    image, image_how = good_threshold(scores)
    pixel, pixel_how = good_threshold(maps)
    return {"image": image, "pixel": pixel,
            "method": f"mean + 3 std of the good images of {where} (image: {image_how}; pixel: {pixel_how})"}
