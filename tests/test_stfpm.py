"""STFPM: epoch-by-epoch reports, resume from a checkpoint, save -> load, settings errors, quality."""
from __future__ import annotations

import copy
import io

import pytest
import torch

from anoseg.errors import ConfigError
from anoseg.heads import create_head
from anoseg.metrics import QUALITY_METRICS as METRIC_KEYS
from anoseg.trial import run_trial

CATEGORIES = ["brick", "washer"]
from tests.trainable_checks import assert_save_load_identical


def stfpm_config(**head) -> dict:
    return {"backbone": "tf_efficientnet_lite0", "layers": ["blocks.1", "blocks.2"], "image_size": 128,
            "batch_size": 8, "device": "cpu", "seed": 0,
            "head": {"name": "stfpm", "epochs": 3, "batch_size": 4, **head}}


def run(synthetic_root, config, **kwargs):
    reports, states = [], []
    result = run_trial(config, synthetic_root, CATEGORIES, lambda r: reports.append((r.to_flat(), r.fidelity)),
                       checkpoint=lambda state: states.append(copy.deepcopy(state)), **kwargs)
    return result, reports, states


def test_reports_every_epoch_with_every_category(synthetic_root):
    result, reports, states = run(synthetic_root, stfpm_config(epochs=2))
    assert [step for _, step in reports] == [1, 2]
    for metrics, step in reports:
        assert metrics["fidelity"] == step and metrics["fidelity_total"] == 2 and metrics["fidelity_unit"] == "epochs"
        assert metrics["categories_done"] == 2
        for cat in CATEGORIES:
            assert 0 <= metrics[f"{cat}/aupro"] <= 1 and metrics[f"{cat}/fit_seconds"] > 0
    for cat in CATEGORIES:  # fit time counts every epoch trained so far
        assert reports[1][0][f"{cat}/fit_seconds"] > reports[0][0][f"{cat}/fit_seconds"]
    assert [s["epoch"] for s in states] == [1, 2]
    assert set(result.per_category) == set(CATEGORIES)


def test_resume_continues_from_the_checkpoint_and_matches_an_uninterrupted_trial(synthetic_root):
    config = stfpm_config(epochs=3, discrepancy_scaling=True, holdout=0.25)
    full, _, states = run(synthetic_root, config)
    buffer = io.BytesIO()  # the state survives the round trip the Tune adapter makes
    torch.save(states[0], buffer)
    saved = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)

    resumed, reports, _ = run(synthetic_root, config, resume=saved)
    assert [step for _, step in reports] == [2, 3]  # epoch 1 is not trained again
    assert all(m["resumed_from"] == 1 for m, _ in reports)
    for cat in CATEGORIES:
        for key in METRIC_KEYS:
            assert resumed.per_category[cat][key] == pytest.approx(full.per_category[cat][key], abs=1e-6)


def test_resume_rejects_a_checkpoint_of_another_trial(synthetic_root):
    _, _, states = run(synthetic_root, stfpm_config(epochs=1))
    with pytest.raises(ConfigError, match="epochs"):
        run_trial(stfpm_config(epochs=2), synthetic_root, CATEGORIES, resume=states[0])


def test_save_load_gives_identical_scores(synthetic_root, tmp_path):
    config = stfpm_config(epochs=2, discrepancy_scaling=True, holdout=0.25)
    assert_save_load_identical(config, synthetic_root, tmp_path / "model", 128)


@pytest.mark.parametrize("head, match", [
    ({"optimizer": "rmsprop"}, "optimizer must be sgd or adam"),
    ({"layer_weights": "1,x"}, "layer_weights must be"),
    ({"epochs": 0}, "epochs must be"),
    ({"holdout": 1.5}, "holdout must be"),
])
def test_bad_settings_name_the_setting(head, match):
    with pytest.raises(ConfigError, match=match):
        create_head("stfpm", **head)


def test_layer_weights_must_match_the_layers(synthetic_root):
    with pytest.raises(ConfigError, match="layer_weights '1,1,1' has 3 values but the trial selects 2 layers"):
        run_trial(stfpm_config(layer_weights="1,1,1"), synthetic_root, ["brick"])


def test_holdout_leaving_too_few_training_images_is_a_clear_error(synthetic_root):
    with pytest.raises(ConfigError, match="at least 2 must remain"):
        run_trial(stfpm_config(discrepancy_scaling=True, holdout=0.95), synthetic_root, ["brick"])
