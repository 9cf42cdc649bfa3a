from __future__ import annotations

import math

import pytest

from anoseg.errors import DataError
from anoseg.metrics import QUALITY_METRICS as METRIC_KEYS
from anoseg.trial import run_trial

RANDOM_INIT = {
    "backbone": {"name": "resnet18", "weights": "none"},
    "layers": ["layer1", "layer2"],
    "image_size": 64,
    "head": {"name": "padim", "n_features": 20},
}


def test_run_trial_reports_after_every_category(synthetic_root):
    calls = []
    result = run_trial(RANDOM_INIT, synthetic_root, ["brick", "washer"], report=lambda r: calls.append((r.to_flat(), r.fidelity)))
    assert [s for _, s in calls] == [1, 2]
    assert calls[0][0]["category"] == "brick" and "brick/aupro" in calls[0][0]
    assert calls[1][0]["categories_done"] == 2
    assert list(result.per_category) == ["brick", "washer"]
    assert result.pretrained is False and "random" in result.weights
    for metrics in result.per_category.values():
        for key in METRIC_KEYS:
            assert 0.0 <= metrics[key] <= 1.0
        assert metrics["fit_seconds"] > 0 and metrics["ms_per_image"] > 0
    # the last report's running means are the final means
    assert math.isclose(calls[-1][0]["aupro"], result.mean["aupro"])
    assert math.isclose(result.mean["aupro"], sum(m["aupro"] for m in result.per_category.values()) / 2)
    assert result.report.memory["peak_rss_mb"] > 0


def test_run_trial_patchcore_is_deterministic(synthetic_root):
    cfg = {**RANDOM_INIT, "head": {"name": "patchcore", "coreset_ratio": 0.05}}
    first = run_trial(cfg, synthetic_root, ["grass"])
    second = run_trial(cfg, synthetic_root, ["grass"])
    assert first.per_category["grass"]["aupro"] == second.per_category["grass"]["aupro"]


def test_run_trial_unknown_category_fails_before_work(synthetic_root):
    with pytest.raises(DataError, match="category nope not found"):
        run_trial(RANDOM_INIT, synthetic_root, ["nope"])


def test_train_shares_report_every_category_at_every_share_and_end_with_the_full_fit(synthetic_root):
    calls = []
    shares = run_trial(RANDOM_INIT, synthetic_root, ["brick", "washer"], train_shares=(0.5, 1.0),
                       report=lambda r: calls.append(r))
    assert [(r.fidelity, r.fidelity_total, r.train_share, r.category) for r in calls] == [
        (1, 4, 0.5, "brick"), (2, 4, 0.5, "washer"), (3, 4, 1.0, "brick"), (4, 4, 1.0, "washer")]
    full = run_trial(RANDOM_INIT, synthetic_root, ["brick", "washer"])
    for category, metrics in full.per_category.items():
        for key in METRIC_KEYS:
            assert shares.per_category[category][key] == metrics[key]
    half = calls[1].per_category
    assert any(half[c][k] != full.per_category[c][k] for c in half for k in METRIC_KEYS)  # fitted on fewer images


def test_training_subsets_are_nested():
    from anoseg.pipeline import training_subset

    quarter, half = training_subset(40, 0.25, 0), training_subset(40, 0.5, 0)
    assert len(quarter) == 10 and len(half) == 20 and set(quarter.tolist()) <= set(half.tolist())
    assert training_subset(40, 1.0, 0) is None
