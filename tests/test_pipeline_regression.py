"""Every head gives the metrics it gave before the one-pipeline restructuring (tests/data/pipeline_baseline.json,
recorded with the code before it by tests/pipeline_baseline.py): trials, `fit` and `predict`."""
from __future__ import annotations

import json

import pytest

from pipeline_baseline import BASELINE, CATEGORIES, CONFIGS, DATASET, measure


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    from anoseg.data.synthetic import generate

    root = tmp_path_factory.mktemp("baseline-data")
    generate(root, **DATASET)
    return measure(root)


@pytest.mark.parametrize("head", sorted(CONFIGS))
def test_head_metrics_equal_the_recorded_ones(measured, head):
    expected = json.loads(BASELINE.read_text())[head]
    got = measured[head]
    for category in CATEGORIES:
        assert got["trial"][category] == pytest.approx(expected["trial"][category], abs=1e-6), category
    assert got["fit"] == pytest.approx(expected["fit"], abs=1e-6)
    assert got["predict"]["scores"] == pytest.approx(expected["predict"]["scores"], rel=1e-5, abs=1e-6)
    assert got["predict"]["map_sum"] == pytest.approx(expected["predict"]["map_sum"], rel=1e-6)
