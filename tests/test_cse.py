"""CSE: settings errors, k-means, labels, loss, the defect bank (made once per category, carried in the
training state), epoch reports, resume, save -> load, quality."""
from __future__ import annotations

import copy
import io

import pytest
import torch

from anoseg.errors import ConfigError
from anoseg.heads import create_head
from anoseg.heads.cse import CSE, defect_kinds, kmeans, position_labels, supcon_loss
from anoseg.metrics import QUALITY_METRICS as METRIC_KEYS
from anoseg.trial import run_trial

CATEGORIES = ["brick", "washer"]
QUALITY_CATEGORIES = ["board", "brick", "grass", "gravel", "washer"]
from tests.trainable_checks import assert_save_load_identical


@pytest.fixture(autouse=True)
def one_thread(one_torch_thread):
    """Every test here trains small steps on one torch thread (conftest.one_torch_thread)."""


def cse_config(**head) -> dict:
    return {"backbone": "tf_efficientnet_lite0", "layers": ["blocks.1", "blocks.2"], "image_size": 64,
            "batch_size": 8, "device": "cpu", "seed": 0,
            "head": {"name": "cse", "epochs": 3, "batch_size": 4, "k": 8, **head}}


def run(synthetic_root, config, **kwargs):
    reports, states = [], []
    result = run_trial(config, synthetic_root, CATEGORIES, lambda r: reports.append((r.to_flat(), r.fidelity)),
                       checkpoint=lambda state: states.append(copy.deepcopy(state)), **kwargs)
    return result, reports, states


@pytest.mark.parametrize("head, match", [
    ({"embedding_dim": 1}, "embedding_dim must be an integer in"),
    ({"k": 0}, "k must be an integer in"),
    ({"epochs": 0}, "epochs must be an integer in"),
    ({"lr": 2}, "lr must be a number in"),
    ({"temperature": 0}, "temperature must be a number in"),
    ({"defect_kinds": "scratch"}, r"defect_kinds must be \"all\" or distinct kinds from patch, texture"),
    ({"defect_kinds": "noise,noise"}, "defect_kinds must be"),
    ({"defect_kinds": []}, "defect_kinds must be"),
    ({"defect_kinds": 3}, "defect_kinds must be"),
    ({"batch_size": 0}, "batch_size must be an integer"),
    ({"bank_size": 0}, "bank_size must be null or an integer"),
    ({"margin": 1}, "has no setting margin"),
])
def test_bad_settings_name_the_setting(head, match):
    with pytest.raises(ConfigError, match=match):
        create_head("cse", **head)


def test_defect_kinds_as_text_or_list():
    assert defect_kinds("all") is None
    assert defect_kinds("cutpaste, noise") == ("cutpaste", "noise")
    assert defect_kinds(["blur"]) == ("blur",)
    create_head("cse", defect_kinds=["cutpaste", "texture"])


@pytest.mark.parametrize("bank_size", [5, 20])
def test_bank_size_sets_the_defect_images_whether_fewer_or_more_than_training_images(bank_size):
    from anoseg.backbones import create_backbone

    backbone = create_backbone("resnet18", ["layer1", "layer2"], weights="none")
    images = torch.randint(0, 256, (12, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        maps = backbone(images.float() / 255)
    head = create_head("cse", bank_size=bank_size, epochs=2, k=4).setup(backbone, "cpu")
    for _ in range(head.epochs):
        assert head.train_epoch(images, maps) > 0
    assert head.bank_["maps"]["layer1"].shape == (bank_size, 64, 16, 16) and head.bank_["labels"].shape[0] == bank_size
    assert head.centres_.shape == (4, 64)


def test_kmeans_finds_separated_clusters_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    true_centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = (true_centres[:, None] + 0.1 * torch.randn(3, 200, 2, generator=g)).reshape(-1, 2)
    centres = kmeans(x, 3, torch.Generator().manual_seed(0))
    nearest = torch.cdist(true_centres, centres).min(dim=1).values
    assert nearest.max() < 0.05, centres
    assert torch.equal(centres, kmeans(x, 3, torch.Generator().manual_seed(0)))
    assert kmeans(x[:2], 5, torch.Generator().manual_seed(0)).shape == (2, 2)  # k is capped at the points there are


def test_position_labels_from_the_covered_share_of_each_cell():
    masks = torch.zeros(1, 16, 16, dtype=torch.bool)
    masks[0, 0:4, 0:4] = True  # cell (0, 0) of a 4x4 grid fully covered
    masks[0, 12, 12] = True  # cell (3, 3) touched by 1 of its 16 pixels
    labels = position_labels(masks, (4, 4))[0]
    assert labels[0, 0] == 1 and labels[3, 3] == -1
    assert labels[0, 1] == -1 and labels[1, 1] == -1 and labels[2, 2] == -1  # next to a touched cell: ignored
    assert labels[0, 3] == 0 and labels[3, 0] == 0


def test_the_loss_is_lower_when_defects_are_apart_from_the_normal_positions():
    g = torch.Generator().manual_seed(0)
    direction = torch.nn.functional.normalize(torch.randn(1, 16, generator=g), dim=1)
    normal = torch.nn.functional.normalize(direction + 0.1 * torch.randn(64, 16, generator=g), dim=1)
    apart = torch.nn.functional.normalize(-direction + 0.1 * torch.randn(64, 16, generator=g), dim=1)
    mixed = torch.nn.functional.normalize(direction + 0.1 * torch.randn(64, 16, generator=g), dim=1)
    assert supcon_loss(normal, apart, 0.5) < supcon_loss(normal, mixed, 0.5) - 0.3
    assert supcon_loss(normal, apart, 0.5) >= torch.log(torch.tensor(63.0))  # its floor: log(normal rows - 1)


def test_the_defect_bank_is_made_once_per_category_and_a_resumed_trial_matches(synthetic_root, monkeypatch):
    made = []
    make_bank = CSE.make_bank

    def counting(self, images):
        made.append(len(images))
        return make_bank(self, images)

    monkeypatch.setattr(CSE, "make_bank", counting)
    config = cse_config(epochs=3)
    full, reports, states = run(synthetic_root, config)
    assert made == [12, 12]  # one bank per category (12 training images each), on the first epoch only
    assert [step for _, step in reports] == [1, 2, 3]
    for metrics, step in reports:
        assert metrics["fidelity"] == step and metrics["fidelity_unit"] == "epochs"
        for cat in CATEGORIES:
            assert 0 <= metrics[f"{cat}/aupro"] <= 1 and metrics[f"{cat}/fit_seconds"] > 0
    banks = {c: states[0]["heads"][c]["bank"] for c in CATEGORIES}
    for bank in banks.values():
        assert bank["maps"]["blocks.1"].dtype == torch.float16 and bank["maps"]["blocks.1"].shape[0] == 12
        assert bank["labels"].shape == (12, 16, 16) and int((bank["labels"] == 1).sum()) > 0
    assert not torch.equal(banks["brick"]["maps"]["blocks.2"], banks["washer"]["maps"]["blocks.2"])
    assert all(torch.equal(states[-1]["heads"][c]["bank"]["labels"], banks[c]["labels"]) for c in CATEGORIES)

    buffer = io.BytesIO()  # the state survives the round trip the Tune adapter makes
    torch.save(states[0], buffer)
    saved = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    made.clear()
    resumed, reports, _ = run(synthetic_root, config, resume=saved)
    assert made == []  # the banks come from the checkpoint
    assert [step for _, step in reports] == [2, 3] and all(m["resumed_from"] == 1 for m, _ in reports)
    for cat in CATEGORIES:
        for key in METRIC_KEYS:
            assert resumed.per_category[cat][key] == pytest.approx(full.per_category[cat][key], abs=1e-6)


def test_save_load_gives_identical_scores(synthetic_root, tmp_path):
    from anoseg.data import load_test

    model, loaded = assert_save_load_identical(cse_config(epochs=2), synthetic_root, tmp_path / "model", 64)
    images = load_test(synthetic_root, "brick", 64).images
    assert loaded.head.centres_.shape == (8, 64)
    # a fresh head scores only once it has the state (the centres come with it)
    fresh = create_head("cse", **loaded.info["head"]["params"]).setup(loaded.backbone, "cpu")
    with torch.no_grad():
        layer_maps = loaded.backbone((images[:4] - torch.tensor(loaded.backbone.mean).view(1, 3, 1, 1))
                                     / torch.tensor(loaded.backbone.std).view(1, 3, 1, 1))
    with pytest.raises(RuntimeError, match="no k-means centres yet"):
        fresh.score_images(images[:4], layer_maps)
    fresh.load_state_dict(model.head.state_dict())
    expected = model.head.score_images(images[:4], layer_maps)[0]
    assert torch.equal(fresh.score_images(images[:4], layer_maps)[0], expected)


@pytest.mark.slow
def test_quality_on_real_features(synthetic_root):
    """Real ImageNet EfficientNet-Lite0 features, the embedded dataset at 128 px, every category, default settings.

    Measured (fit_model, all test images): mean image AUROC 0.739, pixel AUROC 0.942, AUPRO 0.816 (board 0.81,
    brick 0.79, grass 0.69, gravel 0.90, washer 0.89); PatchCore on the same features 0.884 / 0.967 / 0.890.
    """
    from anoseg.model import fit_model

    config = {"backbone": {"name": "tf_efficientnet_lite0", "weights": "offline"}, "layers": ["blocks.1", "blocks.2"],
              "image_size": 128, "batch_size": 16, "device": "cpu", "seed": 0, "head": {"name": "cse"}}
    metrics = {c: fit_model(config, synthetic_root, c, holdout=None).metrics for c in QUALITY_CATEGORIES}
    mean = {k: sum(m[k] for m in metrics.values()) / len(metrics) for k in ("image_auroc", "pixel_auroc", "aupro")}
    print("cse quality", {k: round(v, 4) for k, v in mean.items()})
    assert mean["aupro"] >= 0.75, metrics
    assert mean["pixel_auroc"] >= 0.90, metrics
    assert mean["image_auroc"] >= 0.65, metrics
