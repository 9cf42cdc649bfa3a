"""Tests of the backbones added to the registry beyond the first set: layer tables, partial builds, the
size rules of ConvNeXt / DenseNet, the pretrained tags "hub" would fetch, and file / hub-cache weights giving
the same features as the library's own model.

No network is used (random init, local files, seeded caches). The geometry of every registered backbone
(old and new, every layer) is checked in tests/test_backbones.py::test_layers_shapes_and_freezing.
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import anoseg.backbones as B
from anoseg.backbones.timm_models import HUB_TAGS
from anoseg.errors import ConfigError
from tests.conftest import assert_features_close, seed_hf_cache

NEW_TIMM = [
    "hrnet_w48", "resnet50", "wide_resnet101_2", "densenet121", "convnext_tiny", "efficientnet_b0",
    "efficientnet_b4", "mobilenetv3_large_100",
]


@pytest.fixture(scope="module", autouse=True)
def _fast_cpu():
    """As in test_backbones.py: one intra-op thread and flushed denormals keep random-init CPU runs fast."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)
    torch.set_num_threads(threads)


def _table(name):
    return [(l.name, l.channels, l.stride) for l in B.backbone_layers(name)]


def _x(size=64, seed=0):
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- layer tables

def test_new_layer_tables():
    assert _table("convnext_tiny") == [("stages.0", 96, 4), ("stages.1", 192, 8), ("stages.2", 384, 16), ("stages.3", 768, 32)]
    assert _table("hrnet_w48") == [("stem", 64, 2), ("stage1", 48, 4), ("stage2", 96, 8), ("stage3", 192, 16), ("stage4", 384, 32)]
    assert _table("efficientnet_b4") == [
        ("blocks.0", 24, 2), ("blocks.1", 32, 4), ("blocks.2", 56, 8), ("blocks.4", 160, 16), ("blocks.6", 448, 32)
    ]
    assert _table("efficientnet_b0") == _table("tf_efficientnet_lite0")
    assert _table("mobilenetv3_large_100") == [
        ("blocks.0", 16, 2), ("blocks.1", 24, 4), ("blocks.2", 40, 8), ("blocks.4", 112, 16), ("blocks.6", 960, 32)
    ]
    assert _table("densenet121") == [
        ("features.norm0", 64, 2), ("features.denseblock1", 256, 4), ("features.denseblock2", 512, 8),
        ("features.denseblock3", 1024, 16), ("features.norm5", 1024, 32),
    ]
    resnet = [("act1", 64, 2), ("layer1", 256, 4), ("layer2", 512, 8), ("layer3", 1024, 16), ("layer4", 2048, 32)]
    assert _table("resnet50") == resnet and _table("wide_resnet101_2") == resnet
    assert _table("deeplabv3_resnet101") == _table("deeplabv3_resnet50")
    assert _table("fcn_resnet101") == _table("fcn_resnet50")
    mobilenet = _table("deeplabv3_mobilenet_v3_large")
    assert mobilenet[:17] == _table("lraspp_mobilenet_v3_large")[:17]
    assert [row[0] for row in mobilenet[:17]] == [f"features.{i}" for i in range(17)]
    assert mobilenet[-3:] == [("features.16", 960, 16), ("aspp", 256, 16), ("head", 256, 16)]
    assert _table("maskrcnn_resnet50_fpn_v2") == _table("fasterrcnn_resnet50_fpn_v2")
    assert _table("fcos_resnet50_fpn") == _table("retinanet_resnet50_fpn_v2") == [
        ("body.layer1", 256, 4), ("body.layer2", 512, 8), ("body.layer3", 1024, 16), ("body.layer4", 2048, 32),
        ("fpn.0", 256, 8), ("fpn.1", 256, 16), ("fpn.2", 256, 32), ("fpn.p6", 256, 64), ("fpn.p7", 256, 128),
    ]


def test_hub_tags_are_imagenet_1k():
    """What weights="hub" fetches for the timm backbones: an ImageNet-1k tag timm knows, on the HF hub; the
    ResNets and DenseNet use torchvision's weights as the PaDiM / PatchCore papers do (no network: timm's
    own table)."""
    import timm

    for name in NEW_TIMM:
        tag = HUB_TAGS[name]
        assert tag.split(".")[0] == name and tag.endswith("in1k") and "in22k" not in tag and "in12k" not in tag
        cfg = timm.get_pretrained_cfg(tag)
        assert cfg is not None and cfg.hf_hub_id, tag
    for name in ("resnet50", "wide_resnet101_2", "densenet121"):
        assert HUB_TAGS[name].endswith(".tv_in1k")


def test_torchvision_hub_weights_exist():
    import torchvision
    from torchvision.models import detection, segmentation

    for ctor in (segmentation.deeplabv3_resnet101, segmentation.fcn_resnet101, segmentation.deeplabv3_mobilenet_v3_large,
                 detection.maskrcnn_resnet50_fpn_v2, detection.fcos_resnet50_fpn):
        assert torchvision.models.get_model_weights(ctor).DEFAULT.url.startswith("https://download.pytorch.org/")


# --------------------------------------------------------------------------- partial builds and sizes

@pytest.mark.parametrize(
    "name,layer,divisor",
    [
        ("convnext_tiny", "stages.0", 4),
        ("convnext_tiny", "stages.1", 8),
        ("densenet121", "features.denseblock1", 1),
        ("densenet121", "features.denseblock2", 8),
        ("efficientnet_b4", "blocks.6", 1),
    ],
)
def test_size_divisor_is_the_deepest_stride_where_sizes_floor(name, layer, divisor):
    """ConvNeXt (patchify stem, unpadded stride-2 convs) and DenseNet (2x2 average-pool transitions) floor odd
    sizes: they accept only multiples of the deepest requested stride, and then give exactly size / stride."""
    ext = B.create_backbone(name, [layer], weights="none")
    assert ext.size_divisor == divisor
    stride, channels = ext.strides[layer], ext.channels[layer]
    for size in (72, 40) if divisor > 1 else (72, 65):
        with torch.no_grad():
            out = ext(_x(size))[layer]
        assert tuple(out.shape) == (1, channels, math.ceil(size / stride), math.ceil(size / stride))
    if divisor > 1:
        with pytest.raises(ConfigError, match=f"multiples of {divisor}"):
            ext(_x(divisor * 9 + 2))


# --------------------------------------------------------------------------- weights: file and hub cache

@pytest.mark.parametrize("name", ["convnext_tiny", "densenet121", "mobilenetv3_large_100"])
def test_file_weights_timm_match_the_full_model(name, tmp_path):
    """A full-classifier state dict loads into the features model by name, also where timm renames the
    flattened children (ConvNeXt ``stages_0``, DenseNet ``features_denseblock1``), and gives the classifier's
    own intermediate features."""
    import timm

    torch.manual_seed(5)
    full = timm.create_model(name, pretrained=False).eval()
    path = tmp_path / f"{name}.pth"
    torch.save(full.state_dict(), path)
    layers = [l.name for l in B.backbone_layers(name)]
    x = _x(64)
    with torch.no_grad():
        ref = full.forward_intermediates(x, intermediates_only=True)
    assert len(ref) == len(layers)
    for chosen in ([layers[1]], layers):
        ext = B.create_backbone(name, chosen, weights=str(path))
        assert ext.weights == f"file:{path.resolve()}" and ext.pretrained
        with torch.no_grad():
            out = ext(x)
        for layer in chosen:
            assert_features_close(out[layer], ref[layers.index(layer)])


def test_file_weights_new_torchvision(tmp_path):
    from torchvision.models.detection import fcos_resnet50_fpn
    from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large

    x = _x(64)
    torch.manual_seed(6)
    seg = deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, aux_loss=True).eval()
    torch.save(seg.state_dict(), tmp_path / "dlv3mb.pth")
    ext = B.create_backbone("deeplabv3_mobilenet_v3_large", ["head", "features.4", "aspp"], weights=str(tmp_path / "dlv3mb.pth"))
    with torch.no_grad():
        feats = seg.backbone(x)
        out = ext(x)
        assert_features_close(out["features.4"], feats["aux"])
        assert_features_close(out["aspp"], seg.classifier[0](feats["out"]))
        head = seg.classifier
        assert_features_close(out["head"], head[3](head[2](head[1](head[0](feats["out"])))))

    det = fcos_resnet50_fpn(weights=None, weights_backbone=None).eval()
    torch.save(det.state_dict(), tmp_path / "fcos.pt")
    ext = B.create_backbone("fcos_resnet50_fpn", ["fpn.p7", "fpn.0", "body.layer1"], weights=str(tmp_path / "fcos.pt"))
    with torch.no_grad():
        out = ext(x)
        ref = det.backbone(x)
        assert_features_close(out["fpn.0"], ref["0"])
        assert_features_close(out["fpn.p7"], ref["p7"])
        body = det.backbone.body
        assert_features_close(out["body.layer1"], body.layer1(body.maxpool(body.relu(body.bn1(body.conv1(x))))))


def test_hub_timm_from_hf_cache_without_network(no_network, empty_hub_caches, tmp_path):
    """weights="hub" for a new timm backbone reads the tag's repo from the local HF cache (seeded here)."""
    import timm

    name = "mobilenetv3_large_100"
    torch.manual_seed(7)
    sd = timm.create_model(name, pretrained=False).state_dict()
    repo_id = seed_hf_cache(empty_hub_caches, HUB_TAGS[name], sd)
    torch.save(sd, tmp_path / "same.pth")
    ext = B.create_backbone(name, ["blocks.2"], weights="hub")
    assert ext.weights == "hub" and ext.pretrained and repo_id in ext.weights_detail
    ref = B.create_backbone(name, ["blocks.2"], weights=str(tmp_path / "same.pth"))
    with torch.no_grad():
        assert_features_close(ext(_x())["blocks.2"], ref(_x())["blocks.2"])


def test_hub_torchvision_from_torch_cache_without_network(no_network, empty_hub_caches):
    """weights="hub" for a new torchvision backbone reads the DEFAULT weights' file from the torch cache."""
    from torchvision.models.segmentation import DeepLabV3_MobileNet_V3_Large_Weights, deeplabv3_mobilenet_v3_large

    torch.manual_seed(8)
    model = deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, aux_loss=True).eval()
    url = DeepLabV3_MobileNet_V3_Large_Weights.DEFAULT.url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    assert str(cached).startswith(str(empty_hub_caches))
    cached.parent.mkdir(parents=True)
    torch.save(model.state_dict(), cached)
    ext = B.create_backbone("deeplabv3_mobilenet_v3_large", ["aspp"], weights="hub")
    assert ext.weights == "hub" and ext.pretrained and "DeepLabV3_MobileNet_V3_Large" in ext.weights_detail
    with torch.no_grad():
        assert_features_close(ext(_x())["aspp"], model.classifier[0](model.backbone(_x())["out"]))


@pytest.mark.parametrize(
    "name,layer", [("convnext_tiny", "stages.1"), ("fcn_resnet101", "layer1"), ("fcos_resnet50_fpn", "fpn.p6")]
)
def test_hub_offline_fails_fast(name, layer, no_network, empty_hub_caches):
    from anoseg.errors import WeightsError

    with pytest.raises(WeightsError, match=r"could not fetch .* from the model hub .*offline\?"):
        B.create_backbone(name, [layer], weights="hub")
