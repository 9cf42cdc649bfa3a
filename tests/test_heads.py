from __future__ import annotations

import numpy as np
import pytest
import torch

from anoseg.errors import ConfigError, NotFittedError
from anoseg.features import combine_layers
from anoseg.heads import HEADS, create_head, head_defaults
from anoseg.pipeline import anomaly_maps
from anoseg.heads.patchcore import greedy_coreset


def normal_features(n=20, c=8, h=4, w=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, h, w, generator=g)


def test_registry_lists_heads_with_defaults():
    assert {"padim", "patchcore"} <= set(HEADS)
    assert head_defaults("patchcore")["coreset_ratio"] == 0.1


@pytest.mark.parametrize(
    "name, params, message",
    [
        ("nope", {}, "head 'nope' is unknown; allowed: .*padim"),
        ("patchcore", {"coreset": 0.1}, "no setting coreset; allowed: coreset_ratio"),
        ("patchcore", {"coreset_ratio": 2.0}, "coreset_ratio must be a number in \\(0, 1\\]"),
        ("patchcore", {"k": 0}, "k must be an integer"),
        ("padim", {"n_features": 1.5}, "n_features must be an integer"),
        ("padim", {"epsilon": -1}, "epsilon must be"),
    ],
)
def test_bad_head_settings_are_clear(name, params, message):
    with pytest.raises(ConfigError, match=message):
        create_head(name, **params)


def test_padim_matches_naive_mahalanobis():
    train, test = normal_features(), normal_features(n=3, seed=1)
    head = create_head("padim", n_features=6, epsilon=0.01, seed=3)
    head.fit(train)
    maps, image_scores = head.score(test)
    assert image_scores is None and maps.shape == (3, 4, 5)
    idx = head.channels_.numpy()
    x = train.numpy()[:, idx]
    t = test.numpy()[:, idx]
    for i, j in [(0, 0), (2, 3), (3, 4)]:
        v = x[:, :, i, j]
        cov = np.cov(v, rowvar=False) + 0.01 * np.eye(len(idx))
        diff = t[:, :, i, j] - v.mean(0)
        expected = np.sqrt(np.einsum("nd,de,ne->n", diff, np.linalg.inv(cov), diff))
        np.testing.assert_allclose(maps[:, i, j].numpy(), expected, rtol=1e-4)


def test_padim_scores_shifted_features_higher():
    head = create_head("padim", n_features=8)
    head.fit(normal_features(n=40))
    test = normal_features(n=2, seed=5)
    test[1, :, 2, 2] += 6.0
    maps, _ = head.score(test)
    assert maps[1, 2, 2] > 3 * maps[0].max()


def test_greedy_coreset_is_k_center():
    x = torch.randn(200, 4, generator=torch.Generator().manual_seed(0))
    idx = greedy_coreset(x, 10, projection_dim=128, generator=torch.Generator().manual_seed(1))
    assert len(set(idx.tolist())) == 10
    # every next pick is the point farthest from those picked before it
    for i in range(1, 10):
        d = torch.cdist(x, x[idx[:i]]).min(1).values
        assert torch.isclose(d[idx[i]], d.max())


def test_greedy_coreset_over_parts_equals_over_the_stacked_rows():
    from anoseg.heads.patchcore import take_rows

    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(n, 24, generator=g) for n in (50, 7, 80)]
    whole = torch.cat(parts)
    pick = lambda x: greedy_coreset(x, 20, projection_dim=8, generator=torch.Generator().manual_seed(1))  # noqa: E731
    idx = pick(parts)
    assert torch.equal(idx, pick(whole))
    assert torch.equal(take_rows(parts, idx), whole[idx])


def test_patchcore_bank_from_batches_equals_bank_at_once_with_projection():
    train = normal_features(n=12, c=16)
    at_once, batched = create_head("patchcore", projection_dim=8), create_head("patchcore", projection_dim=8)
    at_once.fit(train)
    batched.fit_batches(train[i:i + 5] for i in range(0, 12, 5))
    assert torch.equal(batched.memory_bank_, at_once.memory_bank_) and len(at_once.memory_bank_) == 24


def test_patchcore_scores_equal_brute_force_nearest_neighbour():
    train, test = normal_features(n=10), normal_features(n=3, seed=2)
    head = create_head("patchcore", coreset_ratio=0.25, k=1, reweight_neighbours=0)
    head.fit(train)
    assert head.memory_bank_.shape == (50, 8)  # 25% of 10*4*5 patches
    maps, image_scores = head.score(test)
    patches = test.permute(0, 2, 3, 1).reshape(-1, 8)
    expected = torch.cdist(patches, head.memory_bank_).min(1).values.reshape(3, 4, 5)
    torch.testing.assert_close(maps, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(image_scores, expected.flatten(1).max(1).values)


def test_patchcore_reweighting_follows_the_paper():
    train, test = normal_features(n=10), normal_features(n=2, seed=2)
    head = create_head("patchcore", coreset_ratio=0.5, k=1, reweight_neighbours=3)
    head.fit(train)
    maps, image_scores = head.score(test)
    bank = head.memory_bank_
    for n in range(2):
        patches = test[n].permute(1, 2, 0).reshape(-1, 8)
        d = torch.cdist(patches, bank)
        worst = d.min(1).values.argmax()
        s_star, m_star = d[worst].min(0)
        support = torch.cdist(bank[m_star][None], bank)[0].topk(3, largest=False).indices
        dist = torch.linalg.vector_norm(patches[worst] - bank[support], dim=1)
        weight = 1 - torch.exp(dist[0]) / torch.exp(dist).sum()
        torch.testing.assert_close(image_scores[n], weight * s_star, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["padim", "patchcore"])
def test_state_dict_round_trip_gives_identical_scores(name):
    head = create_head(name)
    head.fit(normal_features(n=12))
    state = head.state_dict()
    clone = create_head(name)
    clone.load_state_dict(state)
    test = normal_features(n=2, seed=9)
    a, b = head.score(test), clone.score(test)
    assert torch.equal(a[0], b[0])


def test_anomaly_maps_upsample_and_smooth():
    patch = torch.zeros(1, 8, 8)
    patch[0, 4, 4] = 1.0
    maps = anomaly_maps(patch, 64)
    assert maps.shape == (1, 64, 64)
    assert maps[0].argmax() // 64 in range(30, 40)  # peak stays around the centre
    assert float(maps.max()) < 1.0  # smoothing spreads the peak


def test_padim_fit_in_chunks_of_positions_matches_naive_mahalanobis(monkeypatch):
    import anoseg.heads.padim as padim

    train, test = normal_features(n=15, c=10, h=6, w=7), normal_features(n=2, c=10, h=6, w=7, seed=1)
    whole = create_head("padim", n_features=6)
    whole.fit(train)
    monkeypatch.setattr(padim, "CHUNK_ELEMENTS", 6 * 15 * 4)  # 4 positions a chunk: 11 chunks, the last short
    chunked = create_head("padim", n_features=6)
    chunked.fit(train)
    torch.testing.assert_close(chunked.cholesky_, whole.cholesky_)
    torch.testing.assert_close(chunked.score(test)[0], whole.score(test)[0])


def _naive_padim_maps(head, train, test, epsilon=0.01):
    """Mahalanobis maps from float64 numpy covariances of the head's channels."""
    idx = head.channels_.numpy()
    x, t = train.double().numpy()[:, idx], test.double().numpy()[:, idx]
    out = np.empty((len(t),) + t.shape[2:])
    for i in range(t.shape[2]):
        for j in range(t.shape[3]):
            v = x[:, :, i, j]
            inv = np.linalg.inv(np.cov(v, rowvar=False) + epsilon * np.eye(len(idx)))
            diff = t[:, :, i, j] - v.mean(0)
            out[:, i, j] = np.sqrt(np.einsum("nd,de,ne->n", diff, inv, diff))
    return out


@pytest.mark.parametrize("batch", [3, 4, 40])
def test_padim_fit_from_batches_matches_naive_mahalanobis(batch):
    # d = 6 channels: batches are held until 6 images, then folded into running sums (batch 3 and 4
    # cross that point; 40 never does). A mean far from 0 checks the shifted sums lose no precision.
    train = normal_features(n=40, c=10, h=3, w=4) * 2 + 100
    test = normal_features(n=3, c=10, h=3, w=4, seed=1) * 2 + 100
    head = create_head("padim", n_features=6)
    head.fit_batches(train[i:i + batch] for i in range(0, len(train), batch))
    np.testing.assert_allclose(head.score(test)[0].numpy(), _naive_padim_maps(head, train, test), rtol=1e-4)
    whole = create_head("padim", n_features=6)
    whole.fit(train)
    torch.testing.assert_close(head.cholesky_, whole.cholesky_, rtol=1e-4, atol=1e-4)


def test_padim_batches_must_agree_and_exist():
    head = create_head("padim", n_features=4)
    with pytest.raises(ConfigError, match="a training batch has a 3x3 feature grid, the first one 4x5"):
        head.fit_batches([normal_features(n=3), normal_features(n=3, h=3, w=3)])
    with pytest.raises(ConfigError, match="padim: no training features"):
        head.fit_batches([])
    with pytest.raises(ConfigError, match="at least 2 training images"):
        head.fit_batches([normal_features(n=1)])
    with pytest.raises(ConfigError, match="patchcore: no training features"):
        create_head("patchcore").fit_batches(iter([]))


@pytest.mark.parametrize("name", ["patchcore", "gaussian_ad", "feature_dictionary"])
def test_fitting_from_batches_equals_fitting_at_once(name):
    train, test = normal_features(n=12, c=16), normal_features(n=2, c=16, seed=4)
    at_once, batched = create_head(name), create_head(name)
    at_once.fit(train)
    batched.fit_batches(train[i:i + 5] for i in range(0, 12, 5))
    torch.testing.assert_close(batched.score(test)[0], at_once.score(test)[0])


def test_fit_head_streams_layer_maps_through_head_features():
    from anoseg.features import combine_layers, layer_map_batches
    from anoseg.pipeline import fit_feature_head as fit_head

    g = torch.Generator().manual_seed(2)
    layer_maps = {"fine": torch.randn(9, 6, 8, 8, generator=g).half(), "coarse": torch.randn(9, 12, 4, 4, generator=g)}
    streamed, whole = create_head("padim", n_features=5), create_head("padim", n_features=5)
    fit_head(streamed, layer_map_batches(layer_maps, 4), ["fine", "coarse"])
    whole.fit(combine_layers(layer_maps).index_select(1, streamed.channels_))  # the same 5 of 18, at once
    assert streamed.in_channels_ == 18
    test = combine_layers({k: v[:2] for k, v in layer_maps.items()})
    torch.testing.assert_close(streamed.score(test)[0], whole.score(test.index_select(1, streamed.channels_))[0],
                               rtol=1e-4, atol=1e-4)


def test_head_features_build_only_the_channels_padim_reads():
    from anoseg.features import combine_layers
    from anoseg.pipeline import head_features

    g = torch.Generator().manual_seed(0)
    layer_maps = {"fine": torch.randn(4, 6, 8, 8, generator=g).half(), "mid": torch.randn(4, 10, 4, 4, generator=g),
                  "coarse": torch.randn(4, 12, 2, 2, generator=g)}
    head = create_head("padim", n_features=5, seed=1)
    features = head_features(head, layer_maps, ["fine", "mid", "coarse"])
    assert features.shape == (4, 5, 8, 8) and features.dtype == torch.float32
    full = combine_layers(layer_maps, ["fine", "mid", "coarse"])
    torch.testing.assert_close(features, full.index_select(1, head.channels_), rtol=0, atol=1e-6)
    # a subset that skips a layer entirely, with PatchCore-style patch averaging
    only = torch.tensor([6, 9, 20])
    torch.testing.assert_close(combine_layers(layer_maps, None, 3, only),
                               combine_layers(layer_maps, None, 3).index_select(1, only), rtol=0, atol=1e-6)
    # PaDiM fitted on the subset scores full combined features the same (the ONNX graph passes those)
    head.fit(features)
    torch.testing.assert_close(head.score(full)[0], head.score(features)[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="padim expects 28 combined channels"):
        head.score(full[:, :7])


def test_gaussian_smoothing_equals_torchvision_blur():
    from torchvision.transforms.functional import gaussian_blur

    from anoseg.pipeline import gaussian_smooth

    maps = torch.rand(3, 1, 70, 90, generator=torch.Generator().manual_seed(0)) * 5
    torch.testing.assert_close(gaussian_smooth(maps, 4.0), gaussian_blur(maps, [33, 33], [4.0, 4.0]), rtol=0, atol=2e-5)


# ----------------------------------------------------------------------------- every head is an estimator

def _data(name: str):
    """(images, layer maps, layers) to fit and score `name` on: a random resnet18 for a trainable head,
    random maps on two grids (16 combined channels) for a feature head."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(40, 3, 32, 32, generator=g)
    if HEADS[name].trainable:
        from anoseg.backbones import create_backbone

        backbone = create_backbone("resnet18", ["layer1", "layer2"], weights="none")
        with torch.no_grad():
            return images, backbone(images), ["layer1", "layer2"], backbone
    maps = {"fine": torch.randn(40, 8, 6, 6, generator=g), "coarse": torch.randn(40, 8, 3, 3, generator=g)}
    return images, maps, ["fine", "coarse"], None


@pytest.mark.parametrize("name", sorted(HEADS))
def test_every_head_stores_its_settings_as_given_and_validates_them_in_one_place(name):
    settings = {p: object() for p in head_defaults(name)}  # no setting allows these
    head = HEADS[name](**settings)  # the constructor only stores
    assert vars(head) == settings and all(head.get_params()[p] is v for p, v in settings.items())
    first = next(iter(HEADS[name].constraints))
    message = f"head '{name}': {first} must be .*, got <object"
    with pytest.raises(ConfigError, match=message):
        create_head(name, **settings)
    images, maps, layers, backbone = _data(name)
    with pytest.raises(ConfigError, match=message):  # a head constructed directly is checked before fitting
        head.setup(backbone, "cpu") if head.trainable else head.fit(combine_layers(maps, layers))
    if not head.trainable:
        with pytest.raises(ConfigError, match=message):
            head.fit_batches([combine_layers(maps, layers)])
    assert set(HEADS[name].constraints) == set(head_defaults(name))  # every setting has its constraint


@pytest.mark.parametrize("name", sorted(HEADS))
def test_every_head_fits_like_an_estimator_and_answers_onnx_scorer(name):
    images, maps, layers, backbone = _data(name)
    head = create_head(name)
    features = combine_layers(maps, layers, head.patch_size)
    # fitted on 30 images, scored on the other 10 (no distance near 0, where float32 round-off is large)
    test_images, test_maps = images[30:], {k: m[30:] for k, m in maps.items()}
    score = ((lambda: head.score_images(test_images, test_maps)) if head.trainable else
             (lambda: head.score(features[30:])))
    with pytest.raises(NotFittedError, match=f"head '{name}' is not fitted: call .* before score"):
        score()
    with pytest.raises(NotFittedError, match=f"head '{name}' is not fitted"):
        head.onnx_scorer(layers)
    if head.trainable:
        assert head.setup(backbone, "cpu") is head
        head.train_epoch(images[:30], {k: m[:30] for k, m in maps.items()})
    else:
        assert head.fit(features[:30]) is head
    learned = {k for k in vars(head) if not k.startswith("_")} - set(head.get_params())
    assert learned and all(k.endswith("_") for k in learned), learned
    assert all(getattr(head, a) is not None for a in head.fitted_attributes)

    patch_maps, image_scores = score()
    scorer = head.onnx_scorer(layers)  # the same numbers from (images, layer maps), on the CPU
    assert isinstance(scorer, torch.nn.Module)
    with torch.no_grad():
        onnx_maps, onnx_scores = scorer(test_images, test_maps)
    torch.testing.assert_close(onnx_maps, patch_maps, rtol=1e-4, atol=1e-4 * float(patch_maps.abs().max()))
    assert (onnx_scores is None) == (image_scores is None)
    if image_scores is not None:
        torch.testing.assert_close(onnx_scores, image_scores, rtol=1e-4, atol=1e-6)


def test_onnx_export_names_no_head():
    from pathlib import Path

    import anoseg.onnx_export

    source = Path(anoseg.onnx_export.__file__).read_text().lower()
    assert [name for name in HEADS if name in source] == []
    assert "padim" not in source and "patchcore" not in source
