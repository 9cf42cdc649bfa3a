"""Tests of anoseg.metrics: AUROCs against scikit-learn, AUPRO on hand-computed cases and against a
plain per-threshold reference of the official MVTec AD definition, max-F1 against brute force."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score

from anoseg.errors import ConfigError, DataError
import anoseg.metrics as metrics_module
from anoseg.metrics import (METRICS, QUALITY_METRICS, aupro, evaluate, f1_max, image_auroc, metric, miss_rate,
                            pixel_auroc, pro_curve, seg_f1)
from anoseg.thresholds import good_threshold


# --------------------------------------------------------------------------- plain references


def reference_pro_curve(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Literal definition: for each distinct score t, descending, predict score >= t; FPR over all
    normal pixels of all images, PRO = mean over all 8-connected regions (pooled) of the overlap."""
    masks = np.asarray(masks, dtype=bool)
    per_image_regions = []
    for mask in masks:
        labelled, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=int))
        per_image_regions.append([labelled == k for k in range(1, n + 1)])
    normal = ~masks
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        predicted = maps >= t
        fprs.append((predicted & normal).sum() / normal.sum())
        overlaps = [
            (predicted[i] & region).sum() / region.sum()
            for i, image_regions in enumerate(per_image_regions)
            for region in image_regions
        ]
        pros.append(float(np.mean(overlaps)))
    fprs.append(1.0)
    pros.append(1.0)
    return np.array(fprs), np.array(pros)


def reference_aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Trapezoid area of the reference curve on [0, fpr_limit] / fpr_limit, the PRO at fpr_limit
    linearly interpolated between its neighbours when fpr_limit is not a curve point."""
    x, y = reference_pro_curve(masks, maps)
    area = 0.0
    for i in range(1, len(x)):
        if x[i] <= fpr_limit:
            area += 0.5 * (y[i] + y[i - 1]) * (x[i] - x[i - 1])
        else:
            if x[i - 1] < fpr_limit:
                y_lim = y[i - 1] + (y[i] - y[i - 1]) * (fpr_limit - x[i - 1]) / (x[i] - x[i - 1])
                area += 0.5 * (y_lim + y[i - 1]) * (fpr_limit - x[i - 1])
            break
    return area / fpr_limit


def brute_force_f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    labels = np.asarray(labels, dtype=bool).ravel()
    scores = np.asarray(scores).ravel()
    best = 0.0
    for t in np.unique(scores):
        predicted = scores >= t
        tp = int((predicted & labels).sum())
        fp = int((predicted & ~labels).sum())
        fn = int((~predicted & labels).sum())
        best = max(best, 2 * tp / (2 * tp + fp + fn))
    return best


def official_procedure_aupro(masks: np.ndarray, maps: np.ndarray, limits: list[float]) -> list[float]:
    """The MVTec AD evaluation procedure, re-implemented here from its description.

    1. Label each image's ground truth on its own: 8-connected components (3x3 structure).
    2. For thresholds from the highest score down (here every distinct score, so no sampling
       error), binarise all maps with ``score >= t``; FPR = false-positive pixels / all normal
       pixels of all images; PRO = mean over the components of all images of the share of the
       component's pixels that are predicted.
    3. The curve runs from (0, 0) through those points to (1, 1) (fprs and pros clipped to 1).
    4. Area for a limit x_max: keep the points with x <= x_max; when x_max is not itself a curve
       point, find the first point beyond it (bisection), interpolate y linearly at x_max and add
       the trapezoid from the last kept point to x_max; the AUPRO is that area / x_max.
    """
    import bisect

    masks = np.asarray(masks, dtype=bool)
    maps = np.asarray(maps, dtype=np.float64)
    labelled, sizes = [], []  # per image: component ids (0 = background) and component sizes
    for mask in masks:
        lab, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=np.int64))
        labelled.append(lab)
        sizes.append(np.bincount(lab.ravel(), minlength=n + 1)[1:].astype(np.float64))
    n_components = sum(s.size for s in sizes)
    n_normal = int((~masks).sum())
    x, y = [0.0], [0.0]
    for t in sorted(set(maps.ravel().tolist()), reverse=True):
        false_positives, overlap_sum = 0, 0.0
        for i in range(masks.shape[0]):
            predicted = maps[i] >= t
            false_positives += int((predicted & ~masks[i]).sum())
            hits = np.bincount(labelled[i][predicted], minlength=sizes[i].size + 1)[1:]
            overlap_sum += float((hits / sizes[i]).sum())
        x.append(min(1.0, false_positives / n_normal))
        y.append(min(1.0, overlap_sum / n_components))
    x.append(1.0)
    y.append(1.0)
    results = []
    for x_max in limits:
        correction = 0.0
        if x_max not in x:
            ins = bisect.bisect(x, x_max)
            y_at = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
            correction = 0.5 * (y_at + y[ins - 1]) * (x_max - x[ins - 1])
        xs = [a for a in x if a <= x_max]
        ys = y[: len(xs)]
        area = sum(0.5 * (ys[j] + ys[j - 1]) * (xs[j] - xs[j - 1]) for j in range(1, len(xs)))
        results.append((area + correction) / x_max)
    return results


def brute_force_seg_f1(masks: np.ndarray, maps: np.ndarray, threshold: float) -> float:
    masks = np.asarray(masks, dtype=bool)
    predicted = np.asarray(maps).astype(np.float64) >= threshold  # compared as reals
    tp = int((predicted & masks).sum())
    fp = int((predicted & ~masks).sum())
    fn = int((~predicted & masks).sum())
    return 2 * tp / (2 * tp + fp + fn)


def brute_force_miss_rate(labels: np.ndarray, scores: np.ndarray, false_alarm_rate: float) -> float:
    """Literal definition: smallest candidate (distinct scores, +inf) whose good-fail share <= rate."""
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    good, defective = scores[~labels], scores[labels]
    for t in sorted(set(scores.tolist())) + [math.inf]:
        if (good >= t).sum() / good.size <= false_alarm_rate:
            return float((defective < t).sum() / defective.size)
    raise AssertionError("+inf always qualifies")


def random_case(seed: int, n: int = 3, size: int = 9, levels: int = 6):
    """Small masks with several blobs and maps quantised to few levels (many ties)."""
    rng = np.random.default_rng(seed)
    masks = rng.random((n, size, size)) < 0.15
    masks[0] = False  # one normal image
    masks[1, 0, 0] = True  # at least one anomalous pixel
    maps = np.round(rng.random((n, size, size)) * levels + 1.5 * masks) / levels
    return masks, maps


# --------------------------------------------------------------------------- AUROC


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_image_auroc_equals_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.random(40) < 0.4
    labels[:2] = [True, False]
    scores = np.round(rng.random(40) + 0.3 * labels, 1)  # with ties
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("decimals", [1, 3, None])
def test_pixel_auroc_equals_sklearn(seed: int, decimals: int | None) -> None:
    rng = np.random.default_rng(seed)
    masks = rng.random((5, 16, 16)) < 0.1
    maps = (rng.random((5, 16, 16)) + 0.4 * masks).astype(np.float32)
    if decimals is not None:
        maps = np.round(maps, decimals)
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)


def test_pixel_auroc_hand_case_with_tie() -> None:
    # anomalous 0.9, 0.5; normal 0.5, 0.1: pairs (0.9>0.5, 0.9>0.1, 0.5=0.5 -> 1/2, 0.5>0.1) = 3.5/4
    masks = np.array([[[1, 1, 0, 0]]])
    maps = np.array([[[0.9, 0.5, 0.5, 0.1]]])
    assert pixel_auroc(masks, maps) == 0.875


# --------------------------------------------------------------------------- AUPRO, hand cases


def test_aupro_perfect_separation_is_one() -> None:
    # Region {0.9, 0.8}, normals {0.2, 0.1}. Curve (0,0) (0,.5) (0,1) (.5,1) (1,1) (1,1):
    # PRO is 1 over all of [0, 0.3] -> area 0.3 -> 0.3 / 0.3 = 1.
    masks = np.array([[[1, 1, 0, 0]]])
    maps = np.array([[[0.9, 0.8, 0.1, 0.2]]])
    fprs, pros = pro_curve(masks, maps)
    np.testing.assert_array_equal(fprs, [0, 0, 0, 0.5, 1, 1])
    np.testing.assert_array_equal(pros, [0, 0.5, 1, 1, 1, 1])
    assert aupro(masks, maps) == pytest.approx(1.0, abs=1e-12)


def test_aupro_ties_merged_into_one_point() -> None:
    # Row [a1 a2 n1 n2 n3 n4], one region {a1, a2} (size 2), 4 normal pixels.
    # Scores a1 .9, a2 .5, n1 .5, n2 .5, n3 .1, n4 0. Distinct thresholds descending:
    #   .9 -> (fpr 0, pro .5);  .5 -> a2, n1, n2 together -> (2/4, 1);  .1 -> (.75, 1);  0 -> (1, 1)
    # Curve (0,0) (0,.5) (.5,1) (.75,1) (1,1) (1,1). At fpr .3 the PRO is interpolated on the
    # tie segment: .5 + .5 * .3/.5 = .8; area = .5 * (.5 + .8) * .3 = .195 -> .195 / .3 = .65.
    # (Counting a2 before n1, n2 would give 1.0; after them 0.5.)
    masks = np.array([[[1, 1, 0, 0, 0, 0]]])
    maps = np.array([[[0.9, 0.5, 0.5, 0.5, 0.1, 0.0]]])
    fprs, pros = pro_curve(masks, maps)
    np.testing.assert_allclose(fprs, [0, 0, 0.5, 0.75, 1, 1], atol=1e-15)
    np.testing.assert_allclose(pros, [0, 0.5, 1, 1, 1, 1], atol=1e-15)
    assert aupro(masks, maps, 0.3) == pytest.approx(0.65, abs=1e-12)


def test_aupro_region_not_reached_before_limit() -> None:
    # Row [A n B n n n n n n n n n]: regions A = {0} and B = {2} (not adjacent), 10 normal pixels.
    # A .9, normals .8 .7 ... distinct, all above B .05. PRO is .5 (A found, B not) from fpr 0 up
    # to fpr 1; B only joins at the last threshold -> (1, 1). fpr .3 = 3/10 is a curve point:
    # area = .5 * .3 = .15 -> AUPRO .5; region B contributes 0 before fpr .3.
    masks = np.zeros((1, 1, 12), dtype=bool)
    masks[0, 0, [0, 2]] = True
    maps = np.zeros((1, 1, 12))
    maps[0, 0, 0] = 0.9
    maps[0, 0, 2] = 0.05
    maps[0, 0, [1, 3, 4, 5, 6, 7, 8, 9, 10, 11]] = [0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.15, 0.12, 0.1]
    fprs, pros = pro_curve(masks, maps)
    assert fprs.size == 14  # 12 distinct scores + 2 end points
    np.testing.assert_allclose(pros[1:-2], 0.5, atol=1e-15)  # B not reached until fpr 1
    assert aupro(masks, maps, 0.3) == pytest.approx(0.5, abs=1e-12)
    # Up to fpr 1: .5 until the last two points (1, .5) -> (1, 1): area .5 -> .5.
    assert aupro(masks, maps, 1.0) == pytest.approx(0.5, abs=1e-12)


def test_aupro_interpolated_end_point() -> None:
    # Row [a1 a2 n1 n2 n3 n4], region {a1, a2}, 4 normals. Scores a1 .9, n1 .8, a2 = n2 = n3 = .5,
    # n4 .1. Thresholds: .9 -> (0, .5); .8 -> (.25, .5); .5 -> (.75, 1); .1 -> (1, 1).
    # fpr_limit .5 lies inside the segment (.25, .5)-(.75, 1): PRO there = .5 + .5 * .25/.5 = .75.
    # Area = .5 * .25 (flat part) + .5 * (.5 + .75) * .25 = .125 + .15625 = .28125 -> /.5 = .5625.
    # fpr_limit .25 is a curve point: area .125 -> /.25 = .5 (no interpolation).
    masks = np.array([[[1, 1, 0, 0, 0, 0]]])
    maps = np.array([[[0.9, 0.5, 0.8, 0.5, 0.5, 0.1]]])
    fprs, pros = pro_curve(masks, maps)
    np.testing.assert_allclose(fprs, [0, 0, 0.25, 0.75, 1, 1], atol=1e-15)
    np.testing.assert_allclose(pros, [0, 0.5, 0.5, 1, 1, 1], atol=1e-15)
    assert aupro(masks, maps, 0.5) == pytest.approx(0.5625, abs=1e-12)
    assert aupro(masks, maps, 0.25) == pytest.approx(0.5, abs=1e-12)


def test_aupro_regions_pooled_over_images() -> None:
    # Image 1 row [a n n n]: region {a} (size 1). Image 2 row [b1 b2 b3 n]: region {b1 b2 b3}
    # (size 3, at the same positions as image 1's region: must stay a separate region).
    # Image 3 row [n n n n]: normal image. 2 regions, 8 normal pixels (all images).
    # Scores a .9, b1 .8, b2 = b3 = .05; normals image 1 .7 .6 .5, image 2 .4, image 3 all 0.
    # Thresholds: .9 -> (0, (1 + 0)/2 = .5); .8 -> (0, (1 + 1/3)/2 = 2/3); .7 .6 .5 .4 ->
    # (1/8 .. 4/8, 2/3); .05 -> (.5, 1); 0 -> (1, 1).
    # fpr_limit .6 is between .5 and 1 with PRO 1: area = 2/3 * .5 + 1 * .1 = 13/30 -> /.6 = 13/18.
    # (Normal pixels of image 3 left out would give 2/3; pixel-pooled recall 2/4 instead of 2/3.)
    masks = np.zeros((3, 1, 4), dtype=bool)
    masks[0, 0, 0] = True
    masks[1, 0, :3] = True
    maps = np.array([[[0.9, 0.7, 0.6, 0.5]], [[0.8, 0.05, 0.05, 0.4]], [[0.0, 0.0, 0.0, 0.0]]])
    fprs, pros = pro_curve(masks, maps)
    np.testing.assert_allclose(fprs, [0, 0, 0, 1 / 8, 2 / 8, 3 / 8, 4 / 8, 4 / 8, 1, 1], atol=1e-15)
    np.testing.assert_allclose(pros, [0, 0.5] + [2 / 3] * 5 + [1, 1, 1], atol=1e-15)
    assert aupro(masks, maps, 0.6) == pytest.approx(13 / 18, abs=1e-12)
    assert aupro(masks, maps, 0.3) == pytest.approx(2 / 3, abs=1e-12)


def test_aupro_eight_connectivity() -> None:
    # Mask [[1 0 0], [0 1 1]]: (0,0) touches (1,1) diagonally -> ONE region of size 3
    # (4-connectivity would give {(0,0)} and {(1,1),(1,2)}). Scores: (0,0) .9, normals
    # .8 .7 .6, (1,1) = (1,2) = .1. Thresholds: .9 -> (0, 1/3); .8 .7 .6 -> (1/3 .. 1, 1/3);
    # .1 -> (1, 1). PRO is 1/3 on [0, .3] -> AUPRO 1/3 (two regions would give (1 + 0)/2 = .5).
    masks = np.array([[[1, 0, 0], [0, 1, 1]]], dtype=bool)
    maps = np.array([[[0.9, 0.8, 0.7], [0.6, 0.1, 0.1]]])
    fprs, pros = pro_curve(masks, maps)
    assert pros[1] == pytest.approx(1 / 3, abs=1e-15)
    assert aupro(masks, maps, 0.3) == pytest.approx(1 / 3, abs=1e-12)


# --------------------------------------------------------------------------- AUPRO, randomised


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 0.17, 1.0])
def test_aupro_equals_reference(seed: int, fpr_limit: float) -> None:
    masks, maps = random_case(seed)
    expected = reference_aupro(masks, maps, fpr_limit)
    assert aupro(masks, maps, fpr_limit) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pro_curve_equals_reference(seed: int, dtype) -> None:
    masks, maps = random_case(seed, n=4, size=8, levels=10)
    maps = maps.astype(dtype)
    fprs, pros = pro_curve(masks, maps)
    ref_fprs, ref_pros = reference_pro_curve(masks, maps)
    assert fprs.shape == ref_fprs.shape
    np.testing.assert_allclose(fprs, ref_fprs, atol=1e-12)
    np.testing.assert_allclose(pros, ref_pros, atol=1e-12)
    assert np.all(np.diff(fprs) >= 0) and np.all(np.diff(pros) >= 0)


def test_aupro_unquantised_scores_equal_reference() -> None:
    rng = np.random.default_rng(7)
    masks = ndimage.gaussian_filter(rng.standard_normal((3, 12, 12)), (0, 1.5, 1.5)) > 0.3
    maps = rng.random((3, 12, 12)) + 0.5 * masks
    assert aupro(masks, maps) == pytest.approx(reference_aupro(masks, maps), abs=1e-9)


# --------------------------------------------------------------------------- F1


@pytest.mark.parametrize("seed", range(5))
def test_f1_max_equals_brute_force_and_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.random(300) < 0.2
    labels[0] = True
    scores = np.round(rng.random(300) + 0.4 * labels, 2)
    expected = brute_force_f1_max(labels, scores)
    assert f1_max(labels, scores) == pytest.approx(expected, abs=1e-12)
    precision, recall, _ = precision_recall_curve(labels, scores)
    denom = precision + recall
    sk = np.max(np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0))
    assert f1_max(labels, scores) == pytest.approx(sk, abs=1e-12)


def test_f1_max_hand_case() -> None:
    # positives .9 .4, negatives .6 .1: t=.9 -> tp1 fp0 fn1 -> 2/3; t=.4 -> tp2 fp1 -> 4/5 = .8
    assert f1_max(np.array([1, 1, 0, 0]), np.array([0.9, 0.4, 0.6, 0.1])) == pytest.approx(0.8)


# --------------------------------------------------------------------------- evaluate


def test_evaluate_matches_single_metrics_and_accepts_torch() -> None:
    masks, maps = random_case(3, n=4, size=10)
    labels = masks.reshape(4, -1).any(axis=1)
    image_scores = maps.reshape(4, -1).max(axis=1) + 0.01 * np.arange(4)
    result = evaluate(
        torch.from_numpy(maps.astype(np.float32)),
        torch.from_numpy(image_scores),
        torch.from_numpy(masks),
        torch.from_numpy(labels.astype(np.int64)),
    )
    maps32 = maps.astype(np.float32)
    assert set(result) == {"image_auroc", "pixel_auroc", "aupro", "aupro_0.05", "pixel_f1_max", "image_f1_max",
                           "seg_f1", "miss_rate_0.05"}
    assert tuple(result) == QUALITY_METRICS
    assert all(type(v) is float and 0.0 <= v <= 1.0 for v in result.values())
    assert result["image_auroc"] == pytest.approx(roc_auc_score(labels, image_scores), abs=1e-12)
    assert result["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps32.ravel()), abs=1e-12)
    assert result["aupro"] == pytest.approx(reference_aupro(masks, maps32), abs=1e-9)
    assert result["pixel_f1_max"] == pytest.approx(brute_force_f1_max(masks, maps32), abs=1e-12)
    assert result["image_f1_max"] == pytest.approx(brute_force_f1_max(labels, image_scores), abs=1e-12)
    assert result["aupro_0.05"] == pytest.approx(reference_aupro(masks, maps32, 0.05), abs=1e-9)
    good_t, _ = good_threshold(maps32[~labels])
    assert result["seg_f1"] == brute_force_seg_f1(masks, maps32, good_t)
    assert result["miss_rate_0.05"] == brute_force_miss_rate(labels, image_scores, 0.05)


# --------------------------------------------------------------------------- new quality metrics


def test_metric_list_has_the_threshold_aware_metrics_in_order() -> None:
    assert QUALITY_METRICS == ("image_auroc", "pixel_auroc", "aupro", "pixel_f1_max", "image_f1_max",
                               "aupro_0.05", "seg_f1", "miss_rate_0.05")
    names = [m.name for m in METRICS]
    assert names.index("image_f1_max") + 1 == names.index("aupro_0.05")
    assert names.index("miss_rate_0.05") + 1 == names.index("fit_seconds")
    assert (metric("aupro_0.05").mode, metric("aupro_0.05").label) == ("max", "AUPRO@0.05")
    assert (metric("seg_f1").mode, metric("seg_f1").label) == ("max", "segF1")
    assert (metric("miss_rate_0.05").mode, metric("miss_rate_0.05").label) == ("min", "miss@5%FA")
    assert all(metric(n).kind == "quality" for n in ("aupro_0.05", "seg_f1", "miss_rate_0.05"))


def test_aupro_005_hand_case() -> None:
    # Row [a1 a2 n1 .. n10]: region {a1, a2}, 10 normals. a1 .9; a2 = n1 = .5; n2..n10 .4 .. .02 < .5.
    # Curve: .9 -> (0, .5); .5 -> (.1, 1); then (.2, 1) ... (1, 1).
    # At fpr .05 the PRO is interpolated on (0, .5)-(.1, 1): .75; area .5 * (.5 + .75) * .05 = .03125 -> .625.
    # At fpr .3: .5 * (.5 + 1) * .1 + 1 * .2 = .275 -> 11/12.
    masks = np.zeros((1, 1, 12), dtype=bool)
    masks[0, 0, :2] = True
    maps = np.array([[[0.9, 0.5, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1, 0.08, 0.05, 0.02]]])
    assert aupro(masks, maps, 0.05) == pytest.approx(0.625, abs=1e-12)
    assert reference_aupro(masks, maps, 0.05) == pytest.approx(0.625, abs=1e-12)
    labels = np.array([1])
    with pytest.raises(DataError):  # evaluate needs a good image too
        evaluate(maps, np.array([1.0]), masks, labels)
    maps2 = np.concatenate([maps, np.zeros((1, 1, 12))])  # + a good image: 12 more normals at 0
    masks2 = np.concatenate([masks, np.zeros((1, 1, 12), dtype=bool)])
    # 22 normals: .9 -> (0, .5); .5 -> (1/22, 1) -> at .05 PRO 1 past 1/22:
    # area = .5 * (.5 + 1) / 22 + (.05 - 1/22) -> / .05
    expected = (0.75 / 22 + (0.05 - 1 / 22)) / 0.05
    result = evaluate(maps2, np.array([0.9, 0.0]), masks2, np.array([1, 0]))
    assert result["aupro_0.05"] == pytest.approx(expected, abs=1e-12)
    assert result["aupro"] == pytest.approx(reference_aupro(masks2, maps2, 0.3), abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_aupro_005_equals_reference_on_random_data(seed: int) -> None:
    masks, maps = random_case(seed, n=4, size=10, levels=8)
    labels = masks.reshape(4, -1).any(axis=1)
    result = evaluate(maps, maps.reshape(4, -1).max(axis=1), masks, labels)
    assert result["aupro_0.05"] == pytest.approx(reference_aupro(masks, maps, 0.05), abs=1e-9)
    assert aupro(masks, maps, 0.05) == pytest.approx(reference_aupro(masks, maps, 0.05), abs=1e-9)


def test_evaluate_sorts_and_builds_the_pro_curve_once(monkeypatch) -> None:
    calls = []
    original = metrics_module._pro_curve_sorted
    monkeypatch.setattr(metrics_module, "_pro_curve_sorted", lambda *a: calls.append(1) or original(*a))
    masks, maps = random_case(1)
    evaluate(maps, maps.reshape(3, -1).max(axis=1), masks, masks.reshape(3, -1).any(axis=1))
    assert len(calls) == 1  # aupro and aupro_0.05 share the curve


def _official_cases():
    """Data with ties and several 8-connected regions per image."""
    cases = [random_case(seed, n=4, size=10, levels=6) for seed in range(4)]
    rng = np.random.default_rng(11)
    masks = ndimage.gaussian_filter(rng.standard_normal((3, 16, 16)), (0, 1.0, 1.0)) > 0.35
    masks[0] = False
    maps = np.round((rng.random((3, 16, 16)) + 0.6 * masks) * 20) / 20  # steps of .05: ties
    cases.append((masks, maps))
    # Hand-made: two regions in image 0 (one touching diagonally inside), three in image 1.
    m = np.zeros((2, 6, 6), dtype=bool)
    m[0, 0, 0] = m[0, 1, 1] = True  # one region (diagonal)
    m[0, 4:6, 4:6] = True
    m[1, 0, 0:2] = m[1, 3, 3] = m[1, 5, 0] = True
    s = np.zeros((2, 6, 6))
    s[0, 0, 0], s[0, 1, 1], s[0, 4:6, 4:6] = 0.9, 0.4, 0.6
    s[1, 0, 0:2], s[1, 3, 3], s[1, 5, 0] = [0.6, 0.2], 0.9, 0.4
    s[0, 2, 2] = s[1, 2, 2] = 0.6  # normals tied with region pixels
    s[0, 3, 0] = 0.4
    cases.append((m, s))
    return cases


@pytest.mark.parametrize("case", range(6))
def test_aupro_equals_official_procedure_at_several_limits(case: int) -> None:
    masks, maps = _official_cases()[case]
    # the data have what the comparison must cover: ties and images with several regions
    assert np.unique(maps).size < maps.size
    assert max(ndimage.label(mk, structure=np.ones((3, 3)))[1] for mk in masks) >= 2
    limits = [0.01, 0.05, 0.3, 1.0]
    expected = official_procedure_aupro(masks, maps, limits)
    for limit, value in zip(limits, expected):
        assert aupro(masks, maps, limit) == pytest.approx(value, abs=1e-6)
        assert aupro(masks, maps, limit) == pytest.approx(value, abs=1e-9)
    labels = masks.reshape(len(masks), -1).any(axis=1)
    if not labels.all() and labels.any():
        result = evaluate(maps, maps.reshape(len(maps), -1).max(axis=1), masks, labels)
        assert result["aupro"] == pytest.approx(expected[2], abs=1e-9)
        assert result["aupro_0.05"] == pytest.approx(expected[1], abs=1e-9)


def test_official_procedure_reference_on_the_hand_case() -> None:
    # guards the reference itself: the tie case of test_aupro_ties_merged_into_one_point
    masks = np.array([[[1, 1, 0, 0, 0, 0]]])
    maps = np.array([[[0.9, 0.5, 0.5, 0.5, 0.1, 0.0]]])
    assert official_procedure_aupro(masks, maps, [0.3]) == [pytest.approx(0.65, abs=1e-12)]


def test_seg_f1_hand_cases() -> None:
    # masks [1 1 0 0 0], maps [.9 .5 .5 .3 .1]
    masks = np.array([[[1, 1, 0, 0, 0]]])
    maps = np.array([[[0.9, 0.5, 0.5, 0.3, 0.1]]])
    assert seg_f1(masks, maps, 0.5) == pytest.approx(0.8)  # tp 2 (tie at .5 included), fp 1: 4/5
    assert seg_f1(masks, maps, 0.6) == pytest.approx(2 / 3)  # tp 1, fn 1
    assert seg_f1(masks, maps, 0.3) == pytest.approx(4 / 6)  # tp 2, fp 2
    assert seg_f1(masks, maps, -math.inf) == pytest.approx(4 / 7)  # everything predicted
    assert seg_f1(masks, maps, 1.0) == 0.0  # nothing predicted
    assert seg_f1(masks, maps, math.inf) == 0.0
    assert seg_f1(masks, maps, np.float32(0.5)) == pytest.approx(0.8)
    assert seg_f1(torch.from_numpy(masks), torch.from_numpy(maps), 0.5) == pytest.approx(0.8)


def test_seg_f1_compares_float32_scores_with_the_exact_threshold() -> None:
    # float32(.1) = .10000000149..: above the float64 threshold .1 and .1 + 1e-9, below .1 + 1e-8
    masks = np.array([[[1, 1, 0, 0]]])
    maps = np.array([[[0.1, 0.05, 0.1, 0.0]]], dtype=np.float32)
    for t in (0.1, float(np.float32(0.1)), float(np.float32(0.1)) + 1e-12, 0.1 + 1e-9, 0.1 + 1e-8, 0.05, 1e39, -1e39):
        expected = brute_force_seg_f1(masks, maps, t)
        assert seg_f1(masks, maps, t) == expected
        two = evaluate(np.concatenate([maps, maps]), np.array([0.2, 0.1]), np.concatenate([masks, 0 * masks]),
                       np.array([1, 0]), pixel_threshold=t)
        assert two["seg_f1"] == brute_force_seg_f1(np.concatenate([masks, 0 * masks]),
                                                   np.concatenate([maps, maps]), t)
    assert seg_f1(masks, maps, 0.1) == pytest.approx(0.5)  # tp 1 fp 1 fn 1: 2 / (2 + 1 + 1)
    assert seg_f1(masks, maps, 0.1 + 1e-9) == pytest.approx(0.5)
    assert seg_f1(masks, maps, 0.1 + 1e-8) == 0.0
    assert seg_f1(masks, maps, float(np.float32(0.1)) + 1e-12) == 0.0


@pytest.mark.parametrize("seed", range(4))
def test_seg_f1_equals_brute_force(seed: int) -> None:
    masks, maps = random_case(seed, n=4, size=10, levels=5)
    for t in np.unique(maps)[::3].tolist() + [0.33, -1.0, 10.0]:
        assert seg_f1(masks, maps, t) == pytest.approx(brute_force_seg_f1(masks, maps, t), abs=1e-15)


def test_evaluate_seg_f1_threshold_from_good_images_hand_case() -> None:
    # good image pixels [2 4 4 4 5 5 7 9]: mean 5, std 2 -> threshold 5 + 3 * 2 = 11 (tie 11 included).
    # defective image [12 11 10.9 3 0 0 0 0], mask on the first three: tp 2 (12, 11), fn 1 (10.9), fp 0 -> 4/5.
    maps = np.array([[[2, 4, 4, 4, 5, 5, 7, 9]], [[12, 11, 10.9, 3, 0, 0, 0, 0]]], dtype=np.float64)
    masks = np.zeros((2, 1, 8), dtype=bool)
    masks[1, 0, :3] = True
    labels = np.array([0, 1])
    scores = np.array([9.0, 12.0])
    assert evaluate(maps, scores, masks, labels)["seg_f1"] == pytest.approx(0.8)
    assert evaluate(maps, scores, masks, labels, pixel_threshold=10)["seg_f1"] == pytest.approx(1.0)
    # a validation threshold below the good pixels: all 8 good + 1 normal (3) pixels are false positives at 1.5
    assert evaluate(maps, scores, masks, labels, pixel_threshold=1.5)["seg_f1"] == pytest.approx(6 / 15)
    with pytest.raises(ConfigError, match="pixel_threshold"):
        evaluate(maps, scores, masks, labels, pixel_threshold=math.nan)


@pytest.mark.parametrize("seed", range(3))
def test_evaluate_seg_f1_default_uses_good_threshold_of_good_images(seed: int) -> None:
    masks, maps = random_case(seed, n=5, size=10, levels=7)
    labels = masks.reshape(5, -1).any(axis=1)
    assert not labels.all()
    good_t, _ = good_threshold(maps[~labels])
    result = evaluate(maps, maps.reshape(5, -1).max(axis=1), masks, labels)
    assert result["seg_f1"] == pytest.approx(seg_f1(masks, maps, good_t), abs=1e-15)
    assert result["seg_f1"] == pytest.approx(brute_force_seg_f1(masks, maps, good_t), abs=1e-15)
    given = evaluate(maps, maps.reshape(5, -1).max(axis=1), masks, labels, pixel_threshold=0.5)
    assert given["seg_f1"] == pytest.approx(seg_f1(masks, maps, 0.5), abs=1e-15)


def test_miss_rate_hand_cases() -> None:
    good = list(range(1, 21))  # 20 good images scored 1 .. 20: at 5% one of them may fail
    # t = 20 (good >= 20: 1/20 = .05); t = 19 would fail 2/20. Defective 19 (tied with a good score
    # that must pass) and 5 are missed, 20 (tied with the one good allowed to fail) and 50 are caught.
    labels = [0] * 20 + [1] * 4
    assert miss_rate(labels, good + [19, 20, 50, 5]) == pytest.approx(0.5)
    assert miss_rate(labels, good + [19, 20, 50, 5], 0.05) == pytest.approx(0.5)
    # rate 0: no good image may fail -> t above 20: the next candidate 21; 20 and 5 missed
    assert miss_rate([0] * 20 + [1] * 3, good + [20, 21, 5], 0.0) == pytest.approx(2 / 3)
    # nothing above the good scores -> t = +inf: every defective image is missed
    assert miss_rate([0] * 20 + [1] * 2, good + [20, 3], 0.0) == 1.0
    # all good scores below all defective ones -> nothing missed, even at rate 0
    assert miss_rate([0, 0, 0, 1, 1], [1, 2, 3, 4, 5], 0.0) == 0.0
    assert miss_rate([0, 0, 0, 1, 1], [1, 2, 3, 4, 5]) == 0.0
    # ties among the good scores at the threshold: good 1 .. 18, 19, 19 -> both 19s must pass
    tied = list(range(1, 19)) + [19, 19]
    assert miss_rate([0] * 20 + [1, 1], tied + [19, 25]) == pytest.approx(0.5)
    assert miss_rate([0] * 20 + [1, 1], tied + [19.5, 25]) == 0.0
    # exactly at the rate: 10 good, 10% -> one may fail (1/10 <= .1)
    assert miss_rate([0] * 10 + [1], list(range(10)) + [9], 0.1) == 0.0
    assert miss_rate([0] * 10 + [1], list(range(10)) + [8], 0.1) == 1.0


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("rate", [0.0, 0.05, 0.1, 0.25, 0.5])
def test_miss_rate_equals_brute_force(seed: int, rate: float) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 60))
    labels = rng.random(n) < 0.4
    labels[:2] = [True, False]
    scores = np.round(rng.random(n) + 0.3 * labels, 1)  # ties
    assert miss_rate(labels, scores, rate) == brute_force_miss_rate(labels, scores, rate)
    if rate == 0.05:
        result = evaluate(np.zeros((n, 1, 2)) + np.array([1.0, 0.0]), scores,
                          np.zeros((n, 1, 2), dtype=bool) | np.array([True, False]), labels)
        assert result["miss_rate_0.05"] == brute_force_miss_rate(labels, scores, 0.05)


@pytest.mark.parametrize("rate", [1.0, -0.01, 1.5, math.nan, math.inf, True, "0.05", None])
def test_miss_rate_bad_rate(rate) -> None:
    with pytest.raises(ConfigError, match="false_alarm_rate"):
        miss_rate([0, 1], [0.1, 0.2], rate)


def test_miss_rate_and_seg_f1_bad_input() -> None:
    with pytest.raises(DataError, match="at least one anomalous image"):
        miss_rate([0, 0], [0.1, 0.2])
    with pytest.raises(DataError, match="at least one anomalous image"):
        miss_rate([1, 1], [0.1, 0.2])
    with pytest.raises(DataError, match="non-finite"):
        miss_rate([0, 1], [0.1, math.nan])
    with pytest.raises(DataError, match="at least one anomalous pixel"):
        seg_f1(np.zeros((1, 2, 2), bool), np.zeros((1, 2, 2)), 0.5)
    with pytest.raises(DataError, match="same shape"):
        seg_f1(np.zeros((1, 2, 2), bool), np.zeros((1, 2, 3)), 0.5)
    for bad in (math.nan, "0.5", None, True):
        with pytest.raises(ConfigError, match="threshold"):
            seg_f1(np.array([[[1, 0]]]), np.array([[[0.5, 0.1]]]), bad)


# --------------------------------------------------------------------------- bad input


def test_shape_mismatch_names_both_shapes() -> None:
    with pytest.raises(DataError, match=r"\(2, 4, 4\).*\(2, 4, 5\)"):
        aupro(np.zeros((2, 4, 4), bool), np.zeros((2, 4, 5)))
    with pytest.raises(DataError, match="3-D"):
        pixel_auroc(np.zeros((4, 4), bool), np.zeros((4, 4)))


def test_no_anomalous_pixel() -> None:
    with pytest.raises(DataError, match="at least one anomalous pixel"):
        aupro(np.zeros((2, 4, 4), bool), np.random.default_rng(0).random((2, 4, 4)))


def test_no_normal_pixel() -> None:
    with pytest.raises(DataError, match="at least one normal pixel"):
        pixel_auroc(np.ones((1, 2, 2), bool), np.zeros((1, 2, 2)))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_maps(bad: float) -> None:
    masks = np.array([[[1, 0], [0, 0]]], bool)
    maps = np.array([[[0.5, bad], [0.1, 0.2]]])
    with pytest.raises(DataError, match="non-finite"):
        aupro(masks, maps)
    with pytest.raises(DataError, match="non-finite"):
        pixel_auroc(masks, maps)


def test_non_binary_masks() -> None:
    with pytest.raises(DataError, match="binary"):
        aupro(np.array([[[255, 0], [0, 0]]]), np.zeros((1, 2, 2)))


@pytest.mark.parametrize("limit", [0.0, -0.1, 1.5, math.nan])
def test_bad_fpr_limit(limit: float) -> None:
    with pytest.raises(ConfigError, match="fpr_limit"):
        aupro(np.array([[[1, 0]]]), np.array([[[0.5, 0.1]]]), fpr_limit=limit)


def test_image_metrics_need_both_classes() -> None:
    with pytest.raises(DataError, match="at least one anomalous image"):
        image_auroc(np.zeros(3), np.array([0.1, 0.2, 0.3]))
    with pytest.raises(DataError, match=r"shape \(3,\).*shape \(2,\)"):
        image_auroc(np.array([0, 1, 1]), np.array([0.1, 0.2]))


def test_evaluate_image_count_mismatch() -> None:
    masks, maps = random_case(0, n=3, size=4)
    with pytest.raises(DataError, match="one per image"):
        evaluate(maps, np.array([0.1, 0.2]), masks, np.array([0, 1]))
