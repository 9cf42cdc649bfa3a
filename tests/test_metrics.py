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
from anoseg.metrics import aupro, evaluate, f1_max, image_auroc, pixel_auroc, pro_curve


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
    assert set(result) == {"image_auroc", "pixel_auroc", "aupro", "pixel_f1_max", "image_f1_max"}
    assert all(type(v) is float and 0.0 <= v <= 1.0 for v in result.values())
    assert result["image_auroc"] == pytest.approx(roc_auc_score(labels, image_scores), abs=1e-12)
    assert result["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps32.ravel()), abs=1e-12)
    assert result["aupro"] == pytest.approx(reference_aupro(masks, maps32), abs=1e-9)
    assert result["pixel_f1_max"] == pytest.approx(brute_force_f1_max(masks, maps32), abs=1e-12)
    assert result["image_f1_max"] == pytest.approx(brute_force_f1_max(labels, image_scores), abs=1e-12)


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
