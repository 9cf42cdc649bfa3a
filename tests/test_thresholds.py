"""Tests of anoseg.thresholds.good_threshold: a threshold from good samples only (MVTec AD 2's SegF1
threshold is mean + 3 std of the good validation pixel scores), hand cases and bad input."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from anoseg.errors import ConfigError, DataError
from anoseg.thresholds import GOOD_THRESHOLD_METHODS, good_threshold

# mean 5, population std 2 (sample std would be 2.138...)
HAND = [2, 4, 4, 4, 5, 5, 7, 9]


def test_methods_tuple() -> None:
    assert GOOD_THRESHOLD_METHODS == ("mean_std", "quantile")


def test_default_is_mean_plus_three_population_std() -> None:
    threshold, description = good_threshold(HAND)
    assert threshold == 11.0  # 5 + 3 * 2
    assert description == "mean + 3.0 std of 8 good scores"
    assert good_threshold(HAND, "mean_std") == (11.0, "mean + 3.0 std of 8 good scores")


def test_mean_std_with_other_k() -> None:
    assert good_threshold(HAND, k=1) == (7.0, "mean + 1.0 std of 8 good scores")
    assert good_threshold(HAND, k=0)[0] == 5.0
    assert good_threshold(HAND, k=2.5)[0] == pytest.approx(10.0)


def test_quantile_hand_cases() -> None:
    # sorted [2 4 4 4 5 5 7 9]; linear: position q * 7
    assert good_threshold(HAND, "quantile", quantile=0.5)[0] == pytest.approx(4.5)  # between 4 and 5
    assert good_threshold(HAND, "quantile", quantile=0.99)[0] == pytest.approx(7 + 0.93 * 2)  # pos 6.93
    assert good_threshold(HAND, "quantile")[0] == pytest.approx(8.86)  # default .99
    assert good_threshold(HAND, "quantile", quantile=0.0)[0] == 2.0
    assert good_threshold(HAND, "quantile", quantile=1.0)[0] == 9.0
    assert good_threshold(HAND, "quantile", quantile=0.99)[1] == "0.99 quantile of 8 good scores"


def test_any_shape_and_torch_and_float32() -> None:
    maps = np.array(HAND, dtype=np.float32).reshape(2, 2, 2)
    assert good_threshold(maps)[0] == 11.0
    assert good_threshold(torch.tensor(HAND, dtype=torch.float16).reshape(2, 4))[0] == 11.0
    assert good_threshold(np.array(HAND, dtype=np.int64))[0] == 11.0
    assert isinstance(good_threshold(maps)[0], float)


@pytest.mark.parametrize("seed", range(3))
def test_random_equals_numpy(seed: int) -> None:
    scores = np.random.default_rng(seed).random((4, 7, 9)).astype(np.float32)
    s64 = scores.astype(np.float64).ravel()
    assert good_threshold(scores)[0] == pytest.approx(s64.mean() + 3 * s64.std(ddof=0), rel=1e-12)
    assert good_threshold(scores, "quantile", quantile=0.9)[0] == pytest.approx(np.quantile(s64, 0.9), rel=1e-12)
    assert good_threshold(scores)[1] == f"mean + 3.0 std of {scores.size} good scores"


def test_constant_scores() -> None:
    assert good_threshold([0.25] * 5) == (0.25, "mean + 3.0 std of 5 good scores")


@pytest.mark.parametrize("scores", [[], np.zeros((0, 4))])
def test_empty_is_data_error(scores) -> None:
    with pytest.raises(DataError, match="at least one good score"):
        good_threshold(scores)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_is_data_error(bad: float) -> None:
    with pytest.raises(DataError, match="non-finite"):
        good_threshold([0.1, bad, 0.3])


def test_non_numeric_is_data_error() -> None:
    with pytest.raises(DataError, match="real numbers"):
        good_threshold(["a", "b"])


def test_unknown_method_names_allowed_values() -> None:
    with pytest.raises(ConfigError, match=r"'max'.*mean_std, quantile"):
        good_threshold(HAND, "max")


@pytest.mark.parametrize("k", [-1.0, math.nan, math.inf, True, "3", None])
def test_bad_k(k) -> None:
    with pytest.raises(ConfigError, match="k"):
        good_threshold(HAND, k=k)


@pytest.mark.parametrize("q", [-0.1, 1.5, math.nan, "0.9", None, False])
def test_bad_quantile(q) -> None:
    with pytest.raises(ConfigError, match="quantile"):
        good_threshold(HAND, "quantile", quantile=q)


def test_checks_only_the_parameter_of_the_method() -> None:
    # quantile is ignored by mean_std and k by quantile
    assert good_threshold(HAND, "mean_std", quantile=5)[0] == 11.0
    assert good_threshold(HAND, "quantile", k=-1, quantile=1.0)[0] == 9.0
