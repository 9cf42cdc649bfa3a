"""Benchmark anoseg.metrics.aupro / pixel_auroc against plain reference implementations.

Usage: python bench/metrics.py [--n 100 --size 256 --repeats 3 --seed 0]

Data: n random size x size anomaly maps (float32, quantised to 3 decimals, so many ties) and
blob-shaped masks (thresholded smoothed noise) on half of the images. References:

* AUPRO: a straightforward numpy port of the style of the official MVTec AD evaluation code:
  per-image labelling with a 3x3 ones structure and a loop over regions, full-size per-pixel
  FP-change and PRO-change arrays, one argsort over all pixels, cumulative sums, one point per
  distinct score, (0, 0) / (1, 1) end points, trapezoid up to the limit with interpolated end.
* pixel AUROC: scikit-learn ``roc_auc_score`` on the flattened masks and maps.

Prints one JSON object.
"""
from __future__ import annotations

import argparse
import bisect
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from anoseg import metrics  # noqa: E402
from machine_info import machine  # noqa: E402


def reference_pro_curve(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PRO curve in the style of the official MVTec AD evaluation code."""
    structure = np.ones((3, 3), dtype=int)
    fp_changes = np.zeros(maps.shape, dtype=np.uint32)
    pro_changes = np.zeros(maps.shape, dtype=np.float64)
    n_ok_pixels = 0
    n_regions = 0
    for i, mask in enumerate(masks):
        labelled, n_components = ndimage.label(mask, structure)
        n_regions += n_components
        ok = labelled == 0
        n_ok_pixels += int(ok.sum())
        fp_changes[i, ok] = 1
        for k in range(1, n_components + 1):
            region = labelled == k
            pro_changes[i, region] = 1.0 / region.sum()
    scores = maps.ravel()
    order = np.argsort(scores)[::-1]
    scores_sorted = scores[order]
    fprs = np.cumsum(fp_changes.ravel()[order], dtype=np.float64) / n_ok_pixels
    pros = np.cumsum(pro_changes.ravel()[order]) / n_regions
    keep = np.append(np.diff(scores_sorted) != 0, True)  # last pixel of each tie group
    fprs = np.clip(fprs[keep], None, 1.0)
    pros = np.clip(pros[keep], None, 1.0)
    return np.concatenate(([0.0], fprs, [1.0])), np.concatenate(([0.0], pros, [1.0]))


def reference_trapezoid(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area on [0, x_max], y linearly interpolated at x_max if it is not a point."""
    correction = 0.0
    if x_max not in x:
        ins = bisect.bisect(x.tolist(), x_max)
        y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
    keep = x <= x_max
    x, y = x[keep], y[keep]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction)


def reference_aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    fprs, pros = reference_pro_curve(masks, maps)
    return reference_trapezoid(fprs, pros, fpr_limit) / fpr_limit


def reference_pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    return float(roc_auc_score(masks.ravel(), maps.ravel()))


def make_data(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Blob masks on every other image, maps = smooth noise + signal in the blobs, 3 decimals."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=bool)
    maps = np.empty((n, size, size), dtype=np.float32)
    sigma = max(size / 32, 1.0)
    for i in range(n):
        if i % 2 == 1:
            field = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma)
            masks[i] = field > np.quantile(field, 0.96)
        noise = ndimage.gaussian_filter(rng.standard_normal((size, size)), 2.0)
        noise = noise / noise.std()
        raw = 0.5 + 0.1 * noise + 0.15 * masks[i]
        maps[i] = np.round(np.clip(raw, 0.0, 1.0), 3)
    return masks, maps


def median_seconds(fn, repeats: int) -> tuple[float, float]:
    times = []
    value = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fpr-limit", type=float, default=0.3)
    args = parser.parse_args(argv)

    masks, maps = make_data(args.n, args.size, args.seed)
    limit = args.fpr_limit
    n_regions = sum(ndimage.label(m, np.ones((3, 3), dtype=int))[1] for m in masks)

    t_aupro, v_aupro = median_seconds(lambda: metrics.aupro(masks, maps, limit), args.repeats)
    t_ref_aupro, v_ref_aupro = median_seconds(lambda: reference_aupro(masks, maps, limit), args.repeats)
    t_auroc, v_auroc = median_seconds(lambda: metrics.pixel_auroc(masks, maps), args.repeats)
    t_ref_auroc, v_ref_auroc = median_seconds(lambda: reference_pixel_auroc(masks, maps), args.repeats)
    labels = masks.reshape(len(masks), -1).any(axis=1)
    image_scores = maps.reshape(len(maps), -1).max(axis=1)
    t_eval, _ = median_seconds(
        lambda: metrics.evaluate(maps, image_scores, masks, labels, fpr_limit=limit), args.repeats
    )

    result = {
        "setting": {
            "n": args.n,
            "size": args.size,
            "repeats": args.repeats,
            "seed": args.seed,
            "fpr_limit": limit,
            "maps_dtype": str(maps.dtype),
            "distinct_scores": int(np.unique(maps).size),
            "anomalous_pixel_fraction": round(float(masks.mean()), 5),
            "regions": int(n_regions),
            "machine": {**machine(), "numpy": np.__version__},
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
        "aupro": {
            "anoseg_median_s": round(t_aupro, 4),
            "reference_median_s": round(t_ref_aupro, 4),
            "speedup": round(t_ref_aupro / t_aupro, 2),
            "anoseg_value": v_aupro,
            "reference_value": v_ref_aupro,
            "abs_diff": abs(v_aupro - v_ref_aupro),
            "equal_1e-9": abs(v_aupro - v_ref_aupro) <= 1e-9,
        },
        "pixel_auroc": {
            "anoseg_median_s": round(t_auroc, 4),
            "reference_median_s": round(t_ref_auroc, 4),
            "speedup": round(t_ref_auroc / t_auroc, 2),
            "anoseg_value": v_auroc,
            "reference_value": v_ref_auroc,
            "abs_diff": abs(v_auroc - v_ref_auroc),
            "equal_1e-9": abs(v_auroc - v_ref_auroc) <= 1e-9,
        },
        "evaluate_all_metrics_median_s": round(t_eval, 4),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
