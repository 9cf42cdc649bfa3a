"""SimpleNet: settings errors, the discriminator learns, epoch reports, resume, save -> load, quality."""
from __future__ import annotations

import copy
import io
from types import SimpleNamespace

import pytest
import torch

from anoseg.errors import ConfigError
from anoseg.heads import HEADS, create_head
from anoseg.metrics import QUALITY_METRICS as METRIC_KEYS
from anoseg.trial import run_trial

CATEGORIES = ["brick", "washer"]
QUALITY_CATEGORIES = ["board", "brick", "grass", "gravel", "washer"]
from tests.trainable_checks import assert_save_load_identical


@pytest.fixture(autouse=True)
def one_thread(one_torch_thread):
    """Every test here trains small steps on one torch thread (conftest.one_torch_thread)."""


def simplenet_config(**head) -> dict:
    return {"backbone": "tf_efficientnet_lite0", "layers": ["blocks.1", "blocks.2"], "image_size": 64,
            "batch_size": 8, "device": "cpu", "seed": 0, "head": {"name": "simplenet", "epochs": 3, "batch_size": 4,
                                                                   **head}}


def run(synthetic_root, config, **kwargs):
    reports, states = [], []
    result = run_trial(config, synthetic_root, CATEGORIES, lambda r: reports.append((r.to_flat(), r.fidelity)),
                       checkpoint=lambda state: states.append(copy.deepcopy(state)), **kwargs)
    return result, reports, states


@pytest.mark.parametrize("head, match", [
    ({"epochs": 0}, "epochs must be an integer in"),
    ({"lr": 0}, "lr must be a number in"),
    ({"noise_std": -0.1}, "noise_std must be a number in"),
    ({"adaptor_dim": 0}, "adaptor_dim must be null or an integer"),
    ({"adaptor_dim": 8.5}, "adaptor_dim must be null or an integer"),
    ({"batch_size": True}, "batch_size must be an integer"),
    ({"seed": -1}, "seed must be a non-negative integer"),
    ({"noise": 0.1}, "has no setting noise"),
])
def test_bad_settings_name_the_setting(head, match):
    with pytest.raises(ConfigError, match=match):
        create_head("simplenet", **head)


def test_adaptor_dim_null_is_the_channel_count():
    assert HEADS["simplenet"].effective_params({}, 64)["adaptor_dim"] == 64
    assert HEADS["simplenet"].effective_params({"adaptor_dim": 32}, 64)["adaptor_dim"] == 32


def fake_backbone() -> SimpleNamespace:
    """What setup reads of a backbone: its layers and their channels."""
    return SimpleNamespace(layers=("fine", "coarse"), channels={"fine": 6, "coarse": 6})


def structured_maps(n: int, generator: torch.Generator, off: float = 0.0) -> dict[str, torch.Tensor]:
    """Normal maps: 12 channels spanned by 3 directions (+ a little noise); `off` moves them off that plane."""
    basis = torch.randn(3, 12, generator=torch.Generator().manual_seed(1))
    x = torch.randn(n, 8, 8, 3, generator=generator) @ basis + 0.05 * torch.randn(n, 8, 8, 12, generator=generator)
    x = x + off * torch.randn(n, 8, 8, 12, generator=generator)
    x = x.permute(0, 3, 1, 2)
    return {"fine": x[:, :6].contiguous(), "coarse": x[:, 6:, ::2, ::2].contiguous()}


def test_the_discriminator_tells_normal_from_off_distribution_features():
    g = torch.Generator().manual_seed(0)
    train, normal, anomalous = structured_maps(24, g), structured_maps(4, g), structured_maps(4, g, off=1.0)
    head = create_head("simplenet", epochs=15, batch_size=4, lr=0.01).setup(fake_backbone(), "cpu")
    with pytest.raises(RuntimeError, match="not trained yet"):
        head.score_images(torch.zeros(4, 3, 32, 32), normal)
    losses = [head.train_epoch(torch.zeros(24, 3, 32, 32), train) for _ in range(head.epochs)]
    assert losses[-1] < 0.5 * losses[0], losses
    normal_maps, scores = head.score_images(torch.zeros(4, 3, 32, 32), normal)
    anomalous_maps, _ = head.score_images(torch.zeros(4, 3, 32, 32), anomalous)
    assert scores is None and normal_maps.shape == (4, 8, 8)
    # measured: loss 0.98 -> 0.03; mean score normal -0.56 (99th percentile -0.37), off the plane 0.52, and 84 % of
    # the positions off the plane above the highest normal one
    assert float(anomalous_maps.mean()) > float(normal_maps.quantile(0.99)), (normal_maps.mean(), anomalous_maps.mean())
    assert float((anomalous_maps > normal_maps.max()).float().mean()) > 0.6


def test_reports_every_epoch_and_a_resumed_trial_matches_an_uninterrupted_one(synthetic_root):
    config = simplenet_config(epochs=3)
    full, reports, states = run(synthetic_root, config)
    assert [step for _, step in reports] == [1, 2, 3]
    for metrics, step in reports:
        assert metrics["fidelity"] == step and metrics["fidelity_total"] == 3 and metrics["fidelity_unit"] == "epochs"
        for cat in CATEGORIES:
            assert 0 <= metrics[f"{cat}/aupro"] <= 1 and metrics[f"{cat}/fit_seconds"] > 0
    assert [s["epoch"] for s in states] == [1, 2, 3]
    # each category keeps its own standardisation in its training state
    mean = {c: states[0]["heads"][c]["model"]["mean"] for c in CATEGORIES}
    assert not torch.equal(mean["brick"], mean["washer"])

    buffer = io.BytesIO()  # the state survives the round trip the Tune adapter makes
    torch.save(states[0], buffer)
    saved = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    resumed, reports, _ = run(synthetic_root, config, resume=saved)
    assert [step for _, step in reports] == [2, 3]  # epoch 1 is not trained again
    assert all(m["resumed_from"] == 1 for m, _ in reports)
    for cat in CATEGORIES:
        for key in METRIC_KEYS:
            assert resumed.per_category[cat][key] == pytest.approx(full.per_category[cat][key], abs=1e-6)


def test_save_load_gives_identical_scores(synthetic_root, tmp_path):
    from anoseg.data import load_test

    model, loaded = assert_save_load_identical(simplenet_config(epochs=2), synthetic_root, tmp_path / "model", 64)
    images = load_test(synthetic_root, "brick", 64).images
    # a fresh head given the state scores the same; the untrained one does not
    fresh = create_head("simplenet", **loaded.info["head"]["params"]).setup(loaded.backbone, "cpu")
    with torch.no_grad():
        layer_maps = loaded.backbone((images[:4] - torch.tensor(loaded.backbone.mean).view(1, 3, 1, 1))
                                     / torch.tensor(loaded.backbone.std).view(1, 3, 1, 1))
    fresh.load_state_dict(model.head.state_dict())
    expected = model.head.score_images(images[:4], layer_maps)[0]
    assert torch.equal(fresh.score_images(images[:4], layer_maps)[0], expected)


@pytest.mark.slow
def test_quality_on_real_features(synthetic_root):
    """Real ImageNet EfficientNet-Lite0 features, the embedded dataset at 128 px, every category, default settings.

    Measured (fit_model, all test images): mean image AUROC 0.884, pixel AUROC 0.939, AUPRO 0.763 (board 0.61,
    brick 0.96, grass 0.72, gravel 0.63, washer 0.90); PatchCore on the same features 0.884 / 0.967 / 0.890. The
    paper's fixed noise std (0.015, features not standardised) reached AUPRO 0.35 after 20 epochs.
    """
    from anoseg.model import fit_model

    config = {"backbone": {"name": "tf_efficientnet_lite0", "weights": "offline"}, "layers": ["blocks.1", "blocks.2"],
              "image_size": 128, "batch_size": 16, "device": "cpu", "seed": 0, "head": {"name": "simplenet"}}
    metrics = {c: fit_model(config, synthetic_root, c, holdout=None).metrics for c in QUALITY_CATEGORIES}
    mean = {k: sum(m[k] for m in metrics.values()) / len(metrics) for k in ("image_auroc", "pixel_auroc", "aupro")}
    print("simplenet quality", {k: round(v, 4) for k, v in mean.items()})
    assert mean["aupro"] >= 0.70, metrics
    assert mean["pixel_auroc"] >= 0.90, metrics
    assert mean["image_auroc"] >= 0.78, metrics
