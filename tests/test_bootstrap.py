"""Tests of anoseg.bootstrap: stratified resampling, replicates equal to the metrics of the concatenated
resampled images, interval coverage on a model with a known AUROC, paired tie marking, errors."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.stats import norm

from anoseg import metrics
from anoseg.bootstrap import (
    BOOTSTRAP_METRICS,
    Comparison,
    category_seed,
    compare,
    interval,
    mean_over_categories,
    replicates,
    resample_indices,
)
from anoseg.errors import ConfigError, DataError


# --------------------------------------------------------------------------- data and references


def make_category(n: int, size: int, seed: int, decimals: int = 2, defect_types: tuple[str, ...] = ("crack", "hole")):
    """n images: a third good, the rest defective with several blobs; maps rounded (many ties)."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=bool)
    maps = np.empty((n, size, size), dtype=np.float32)
    strata = []
    for i in range(n):
        if i % 3:
            field = ndimage.gaussian_filter(rng.standard_normal((size, size)), max(size / 12, 1.0))
            masks[i] = field > np.quantile(field, 0.9)
            strata.append(defect_types[i % len(defect_types)])
        else:
            strata.append("good")
        raw = 0.5 + 0.1 * rng.standard_normal((size, size)) + 0.15 * masks[i]
        maps[i] = np.round(raw, decimals)
    labels = masks.reshape(n, -1).any(axis=1)
    scores = np.round(maps.reshape(n, -1).max(axis=1), 1)  # ties between images too
    return masks, maps, labels, scores, strata


def seg_f1_reference(masks: np.ndarray, maps: np.ndarray, threshold: float) -> float:
    predicted = maps.astype(np.float64) >= threshold
    tp = np.sum(predicted & masks)
    return 2 * tp / (2 * tp + np.sum(predicted & ~masks) + np.sum(~predicted & masks))


def miss_rate_reference(labels: np.ndarray, scores: np.ndarray, rate: float = 0.05) -> float:
    good, bad = scores[~labels], scores[labels]
    for t in [*np.unique(scores), np.inf]:
        if np.mean(good >= t) <= rate:
            return float(np.mean(bad < t))
    raise AssertionError("unreachable: +inf always qualifies")


REFERENCES = {
    "image_auroc": lambda m, p, lab, s, t: metrics.image_auroc(lab, s),
    "image_f1_max": lambda m, p, lab, s, t: metrics.f1_max(lab, s),
    "miss_rate_0.05": lambda m, p, lab, s, t: miss_rate_reference(lab, s),
    "pixel_auroc": lambda m, p, lab, s, t: metrics.pixel_auroc(m, p),
    "pixel_f1_max": lambda m, p, lab, s, t: metrics.f1_max(m, p),
    "aupro": lambda m, p, lab, s, t: metrics.aupro(m, p, 0.3),
    "aupro_0.05": lambda m, p, lab, s, t: metrics.aupro(m, p, 0.05),
    "seg_f1": lambda m, p, lab, s, t: seg_f1_reference(m, p, t),
}


def concatenated(name, rows, masks, maps, labels, scores, threshold):
    return np.array([REFERENCES[name](masks[r], maps[r], labels[r], scores[r], threshold) for r in rows])


# --------------------------------------------------------------------------- resampling


def test_resample_indices_stratified_and_deterministic():
    strata = ["good"] * 5 + ["crack"] * 3 + ["hole"] * 1 + ["good", "crack"]
    rows = resample_indices(strata, 200, seed=7)
    assert rows.shape == (200, len(strata)) and rows.dtype.kind == "i"
    names = np.asarray(strata)
    for name in set(strata):
        members = set(np.flatnonzero(names == name))
        positions = np.flatnonzero(names == name)
        assert all(set(row[positions]) <= members for row in rows)  # only this stratum's images there
        assert all(np.isin(row, list(members)).sum() == len(members) for row in rows)  # counts kept
    assert np.all(rows[:, names == "hole"] == 8)  # a stratum of one
    assert not np.all(rows == rows[0])  # it does resample
    np.testing.assert_array_equal(rows, resample_indices(strata, 200, seed=7))
    assert not np.array_equal(rows, resample_indices(strata, 200, seed=8))
    np.testing.assert_array_equal(resample_indices(strata, 50, seed=7), resample_indices(tuple(strata), 50, seed=7))


def test_category_seed_stable():
    assert category_seed(0, "bottle") == category_seed(0, "bottle")
    assert category_seed(0, "bottle") != category_seed(0, "cable")
    assert category_seed(0, "bottle") != category_seed(1, "bottle")
    assert 0 <= category_seed(123, "screw") < 2**63
    assert category_seed(0, "bottle") == 8200765831394344336  # fixed across processes (not hash())


# --------------------------------------------------------------------------- replicates are exact


def test_metric_names_cover_the_quality_metrics():
    for name, mode in BOOTSTRAP_METRICS.items():
        assert metrics.metric(name).mode == mode
    assert set(metrics.QUALITY_METRICS) <= set(BOOTSTRAP_METRICS)


@pytest.mark.parametrize("name", list(BOOTSTRAP_METRICS))
@pytest.mark.parametrize("decimals", [1, 3])
def test_replicates_equal_metric_of_concatenation(name, decimals):
    masks, maps, labels, scores, strata = make_category(9, 20, seed=decimals, decimals=decimals)
    threshold = 0.62
    rows = resample_indices(strata, 40, seed=3)
    got = replicates(name, rows, labels=labels, scores=scores, masks=masks, maps=maps, pixel_threshold=threshold)
    want = concatenated(name, rows, masks, maps, labels, scores, threshold)
    assert got.shape == (40,)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)
    # the identity resample gives the point value
    identity = np.arange(len(labels))[None, :]
    point = replicates(name, identity, labels=labels, scores=scores, masks=masks, maps=maps, pixel_threshold=threshold)
    assert point[0] == pytest.approx(REFERENCES[name](masks, maps, labels, scores, threshold), abs=1e-12)


def test_replicates_match_metrics_module_seg_f1_and_miss_rate():
    masks, maps, labels, scores, strata = make_category(12, 16, seed=5, decimals=2)
    rows = resample_indices(strata, 25, seed=1)
    seg = replicates("seg_f1", rows, labels=labels, scores=scores, masks=masks, maps=maps, pixel_threshold=0.6)
    miss = replicates("miss_rate_0.05", rows, labels=labels, scores=scores)
    np.testing.assert_allclose(seg, [metrics.seg_f1(masks[r], maps[r], 0.6) for r in rows], atol=1e-12)
    np.testing.assert_allclose(miss, [metrics.miss_rate(labels[r], scores[r], 0.05) for r in rows], atol=1e-12)


@pytest.mark.parametrize("name", ["pixel_auroc", "pixel_f1_max", "aupro", "aupro_0.05", "seg_f1"])
def test_replicates_any_resample_rows(name):
    """Rows that are not stratified (images missing, others several times) still match, and a row with
    no anomalous pixel is NaN."""
    masks, maps, labels, scores, _ = make_category(7, 18, seed=11, decimals=2)
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 7, size=(30, 7))
    rows = rows[[masks[r].any() for r in rows]]
    rows = np.vstack([rows, np.zeros((1, 7), dtype=int)])  # image 0 (good) seven times
    got = replicates(name, rows, labels=labels, scores=scores, masks=masks, maps=maps, pixel_threshold=0.6)
    want = concatenated(name, rows[:-1], masks, maps, labels, scores, 0.6)
    np.testing.assert_allclose(got[:-1], want, rtol=0, atol=1e-9)
    assert np.isnan(got[-1])


@pytest.mark.parametrize("name", ["pixel_auroc", "pixel_f1_max", "aupro", "aupro_0.05"])
def test_replicates_in_small_chunks_and_constant_maps(name, monkeypatch):
    """The memory-bounding chunks (forced tiny here) change nothing; constant maps (one threshold) work."""
    import anoseg.bootstrap as bootstrap

    masks, maps, labels, scores, strata = make_category(8, 14, seed=6, decimals=2)
    rows = resample_indices(strata, 12, seed=2)
    whole = replicates(name, rows, labels=labels, scores=scores, masks=masks, maps=maps)
    monkeypatch.setattr(bootstrap, "_CHUNK_ELEMENTS", 50)
    np.testing.assert_allclose(replicates(name, rows, labels=labels, scores=scores, masks=masks, maps=maps),
                               whole, rtol=0, atol=1e-12)
    flat = np.full_like(maps, 0.25)
    got = replicates(name, rows, labels=labels, scores=scores, masks=masks, maps=flat)
    np.testing.assert_allclose(got, concatenated(name, rows, masks, flat, labels, scores, None), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["aupro", "aupro_0.05"])
def test_aupro_fpr_limit_hit_exactly_and_anomalous_above_every_normal(name):
    """Image 0: 20 normal pixels, a share at 0.9; image 1: a region scoring above every normal pixel.
    With 30 normal pixels, 9 (or 1.5 -> not) at 0.9 lands on FPR 0.3 exactly: no interpolation."""
    masks = np.zeros((2, 4, 5), dtype=bool)
    maps = np.full((2, 4, 5), 0.1, dtype=np.float32)
    maps[0].flat[:9] = 0.9
    masks[1, :2] = True
    maps[1, :2] = 0.95
    maps[1, 0, 0] = 0.5
    rows = np.array([[0, 1], [1, 0], [1, 1], [0, 0]])
    got = replicates(name, rows, labels=np.array([0, 1]), scores=np.array([0.9, 0.95]), masks=masks, maps=maps)
    limit = 0.3 if name == "aupro" else 0.05
    np.testing.assert_allclose(got[:3], [metrics.aupro(masks[r], maps[r], limit) for r in rows[:3]], atol=1e-12)
    assert np.isnan(got[3])


def test_replicates_accept_torch_tensors():
    torch = pytest.importorskip("torch")
    masks, maps, labels, scores, strata = make_category(6, 12, seed=2)
    rows = resample_indices(strata, 10, seed=0)
    a = replicates("aupro", rows, labels=labels, scores=scores, masks=masks, maps=maps)
    b = replicates("aupro", torch.as_tensor(rows), labels=torch.as_tensor(labels), scores=torch.as_tensor(scores),
                   masks=torch.as_tensor(masks), maps=torch.as_tensor(maps))
    np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- coverage


def test_interval_covers_known_image_auroc():
    """Good scores ~ N(0, 1), defective ~ N(1, 1): the population AUROC is Phi(1 / sqrt 2). Over 200
    experiments of 30 good and 2 x 15 defective images, the 95% interval covers it about 95% of the time."""
    true_auroc = float(norm.cdf(1 / math.sqrt(2)))
    labels = np.r_[np.zeros(30, dtype=bool), np.ones(30, dtype=bool)]
    strata = ["good"] * 30 + ["crack"] * 15 + ["hole"] * 15
    covered = 0
    for experiment in range(200):
        rng = np.random.default_rng([2024, experiment])
        scores = labels.astype(float) + rng.standard_normal(labels.size)
        rows = resample_indices(strata, 300, seed=experiment)
        low, high = interval(replicates("image_auroc", rows, labels=labels, scores=scores))
        covered += low <= true_auroc <= high
    assert 0.85 <= covered / 200 <= 0.99


# --------------------------------------------------------------------------- intervals, means, ties


def test_interval_percentiles_and_nan():
    values = np.arange(1001, dtype=float) / 1000
    low, high = interval(values, 0.9)
    assert (low, high) == pytest.approx((0.05, 0.95))
    assert interval(np.append(values, np.nan), 0.9) == pytest.approx((low, high))
    assert interval(np.array([0.7]), 0.95) == (0.7, 0.7)


def test_mean_over_categories_paired():
    a, b = np.array([0.1, 0.2, 0.3]), np.array([0.5, 0.4, 0.3])
    np.testing.assert_allclose(mean_over_categories([a, b]), [0.3, 0.3, 0.3])
    np.testing.assert_allclose(mean_over_categories([a]), a)


def test_compare_marks_ties_paired():
    masks, maps, labels, scores, strata = make_category(15, 24, seed=4, decimals=3)
    rng = np.random.default_rng(9)
    trials = {
        "base": maps,
        "jitter": maps + rng.normal(0, 1e-4, maps.shape).astype(np.float32),  # same quality
        "worse": np.where(masks, maps - 0.12, maps).astype(np.float32),  # defects much fainter
    }
    rows = resample_indices(strata, 300, seed=category_seed(0, "widget"))
    reps = {t: replicates("aupro", rows, labels=labels, scores=scores, masks=masks, maps=m) for t, m in trials.items()}
    point = {t: metrics.aupro(masks, m) for t, m in trials.items()}
    rows_out = compare(reps, "max", point)
    by = {c.trial: c for c in rows_out}
    assert isinstance(rows_out[0], Comparison) and rows_out[0].best and rows_out[0].tied
    assert rows_out[0].trial in ("base", "jitter") and rows_out[-1].trial == "worse"
    assert by["base"].tied and by["jitter"].tied
    assert not by["worse"].tied and by["worse"].diff_high < 0
    for c in rows_out:
        assert c.low <= c.value <= c.high and c.diff_low <= c.diff_high
    # paired: the difference interval is far narrower than the trials' own intervals
    assert by["jitter"].diff_high - by["jitter"].diff_low < 0.1 * (by["base"].high - by["base"].low)

    # min mode on the negated values: the same ranking and ties, the worse trial's difference now > 0
    flipped = compare({t: -r for t, r in reps.items()}, "min", {t: -v for t, v in point.items()})
    assert flipped[0].trial in ("base", "jitter") and flipped[0].best
    assert [c.trial for c in flipped][-1] == "worse" and not flipped[-1].tied and flipped[-1].diff_low > 0
    # the average over categories keeps the pairing
    objective = {t: mean_over_categories([r, r]) for t, r in reps.items()}
    again = {c.trial: c.tied for c in compare(objective, "max", point)}
    assert again == {t: c.tied for t, c in by.items()}


def test_compare_min_mode_miss_rate():
    labels = np.r_[np.zeros(40, dtype=bool), np.ones(40, dtype=bool)]
    strata = ["good"] * 40 + ["bad"] * 40
    rng = np.random.default_rng(3)
    base = labels * 3.0 + rng.standard_normal(80)
    trials = {"good_model": base, "same": base + rng.normal(0, 1e-6, 80),
              "poor": labels * 0.3 + rng.standard_normal(80)}
    rows = resample_indices(strata, 400, seed=1)
    reps = {t: replicates("miss_rate_0.05", rows, labels=labels, scores=s) for t, s in trials.items()}
    point = {t: metrics.miss_rate(labels, s) for t, s in trials.items()}
    out = {c.trial: c for c in compare(reps, BOOTSTRAP_METRICS["miss_rate_0.05"], point)}
    assert point["poor"] > point["good_model"]
    assert out["poor"].diff_low > 0 and not out["poor"].tied
    assert out["same"].tied and out["good_model"].tied
    assert out["good_model"].best or out["same"].best


# --------------------------------------------------------------------------- errors


def test_errors():
    masks, maps, labels, scores, strata = make_category(6, 10, seed=1)
    rows = resample_indices(strata, 5, seed=0)
    with pytest.raises(ConfigError, match="level"):  # a ValueError
        interval(np.ones(5), 1.0)
    with pytest.raises(ValueError, match="level"):
        interval(np.ones(5), 0)
    with pytest.raises(ValueError, match="level"):
        compare({"a": np.ones(3)}, "max", {"a": 1.0}, level=95)
    with pytest.raises(ValueError, match=">= 1"):
        resample_indices(strata, 0, seed=0)
    with pytest.raises(ValueError, match=">= 1"):
        resample_indices(strata, 2.5, seed=0)
    with pytest.raises(ValueError) as unknown:
        replicates("aupro_0.1", rows, labels=labels, scores=scores, masks=masks, maps=maps)
    assert all(name in str(unknown.value) for name in BOOTSTRAP_METRICS)
    with pytest.raises(DataError, match="5 indices but the category has 6"):
        replicates("image_auroc", rows[:, :5], labels=labels, scores=scores)
    with pytest.raises(DataError, match="outside"):
        replicates("image_auroc", rows + 1, labels=labels, scores=scores)
    with pytest.raises(DataError, match="B >= 1"):
        replicates("image_auroc", np.zeros((0, 6), dtype=int), labels=labels, scores=scores)
    with pytest.raises(DataError, match="same shape"):
        replicates("aupro", rows, labels=labels, scores=scores, masks=masks, maps=maps[:, :5])
    with pytest.raises(DataError, match="one entry per image"):
        replicates("aupro", rows, labels=labels[:5], scores=scores[:5], masks=masks, maps=maps)
    with pytest.raises(DataError, match="same length"):
        replicates("image_auroc", rows, labels=labels, scores=scores[:5])
    with pytest.raises(DataError, match="needs masks and maps"):
        replicates("pixel_auroc", rows, labels=labels, scores=scores)
    with pytest.raises(ValueError, match="pixel_threshold"):
        replicates("seg_f1", rows, labels=labels, scores=scores, masks=masks, maps=maps)
    with pytest.raises(DataError, match="same"):
        compare({"a": np.ones(3), "b": np.ones(4)}, "max", {"a": 1.0, "b": 1.0})
    with pytest.raises(DataError, match="point value"):
        compare({"a": np.ones(3), "b": np.ones(3)}, "max", {"a": 1.0})
    with pytest.raises(ValueError, match="mode"):
        compare({"a": np.ones(3)}, "best", {"a": 1.0})
    with pytest.raises(DataError, match="all are NaN"):
        interval(np.full(4, np.nan))
    with pytest.raises(DataError, match="same number"):
        mean_over_categories([np.ones(3), np.ones(4)])
    with pytest.raises(DataError):
        mean_over_categories([])
