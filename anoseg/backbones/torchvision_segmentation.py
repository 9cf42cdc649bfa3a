"""torchvision semantic-segmentation models (COCO-with-VOC-labels weights for ``weights="hub"``).

Layers come from ``model.backbone`` (dilated ResNet-50 / ResNet-101: ``layer1``..``layer4`` with strides 4, 8,
8, 8; MobileNetV3-Large: ``features.0``..``features.16``, the backbone's module indices, ``features.13``..``16``
dilated, stride 16) plus the segmentation head's last features before the 1x1 classifier (``head``; DeepLabV3
also ``aspp``, the ASPP output = ``classifier[0]``). Only the modules up to the deepest requested layer are
kept and run.
"""
from __future__ import annotations

from torch import Tensor, nn

from anoseg.backbones.registry import register_backbone
from anoseg.backbones.torchvision_common import PlanBody, Step, build_torchvision, plan_taps, torchvision_hub_source

_RESNET_STEM = [Step(None, f"backbone.{m}") for m in ("conv1", "bn1", "relu", "maxpool")]
_RESNET_LAYERS = [Step(f"layer{i}", f"backbone.layer{i}") for i in range(1, 5)]

_MOBILENET_FEATURES = [Step(f"features.{i}", f"backbone.{i}") for i in range(17)]

_DEEPLABV3_HEAD = [
    Step("aspp", "classifier.0"),  # ASPP: 5 parallel branches -> 1x1 projection (256 ch)
    Step(None, "classifier.1"),
    Step(None, "classifier.2"),
    Step("head", "classifier.3"),  # conv3x3 + BN + ReLU (256 ch), input of the final 1x1 conv
]

DEEPLABV3_PLAN = [*_RESNET_STEM, *_RESNET_LAYERS, *_DEEPLABV3_HEAD]
DEEPLABV3_MOBILENET_PLAN = [*_MOBILENET_FEATURES, *_DEEPLABV3_HEAD]

FCN_PLAN = [
    *_RESNET_STEM,
    *_RESNET_LAYERS,
    Step(None, "classifier.0"),
    Step(None, "classifier.1"),
    Step("head", "classifier.2"),  # conv3x3 + BN + ReLU (512 ch); the following Dropout is a no-op in eval
]


def _lraspp_head(head: nn.Module, high: Tensor) -> Tensor:
    """LR-ASPP's 128-channel high-resolution branch: cbr(x) * scale(x) (before its 1x1 classifier)."""
    return head.cbr(high) * head.scale(high)


LRASPP_PLAN = [*_MOBILENET_FEATURES, Step("head", "classifier", _lraspp_head)]


def _plan_builder(plan):
    return lambda model, wanted: PlanBody(model, plan, wanted)


@register_backbone(
    "deeplabv3_resnet50",
    family="torchvision-segmentation",
    description="DeepLabV3 ResNet-50 (torchvision, COCO/VOC); dilated: layer3/layer4/aspp/head at stride 8",
    hub_source=torchvision_hub_source("deeplabv3_resnet50"),
)
def _deeplabv3_resnet50(layers, weights):
    from torchvision.models.segmentation import deeplabv3_resnet50

    return build_torchvision(
        "deeplabv3_resnet50", deeplabv3_resnet50, layers, weights, plan_taps(DEEPLABV3_PLAN),
        _plan_builder(DEEPLABV3_PLAN), aux_loss=True,
    )


@register_backbone(
    "fcn_resnet50",
    family="torchvision-segmentation",
    description="FCN ResNet-50 (torchvision, COCO/VOC); dilated: layer3/layer4/head at stride 8",
    hub_source=torchvision_hub_source("fcn_resnet50"),
)
def _fcn_resnet50(layers, weights):
    from torchvision.models.segmentation import fcn_resnet50

    return build_torchvision(
        "fcn_resnet50", fcn_resnet50, layers, weights, plan_taps(FCN_PLAN), _plan_builder(FCN_PLAN), aux_loss=True,
    )


@register_backbone(
    "lraspp_mobilenet_v3_large",
    family="torchvision-segmentation",
    description="LR-ASPP MobileNetV3-Large (torchvision, COCO/VOC); layers features.0..16 + head (stride 16)",
    hub_source=torchvision_hub_source("lraspp_mobilenet_v3_large"),
)
def _lraspp_mobilenet_v3_large(layers, weights):
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large

    return build_torchvision(
        "lraspp_mobilenet_v3_large", lraspp_mobilenet_v3_large, layers, weights, plan_taps(LRASPP_PLAN),
        _plan_builder(LRASPP_PLAN),
    )


@register_backbone(
    "deeplabv3_resnet101",
    family="torchvision-segmentation",
    description="DeepLabV3 ResNet-101 (torchvision, COCO/VOC); dilated: layer3/layer4/aspp/head at stride 8",
    hub_source=torchvision_hub_source("deeplabv3_resnet101"),
)
def _deeplabv3_resnet101(layers, weights):
    from torchvision.models.segmentation import deeplabv3_resnet101

    return build_torchvision(
        "deeplabv3_resnet101", deeplabv3_resnet101, layers, weights, plan_taps(DEEPLABV3_PLAN),
        _plan_builder(DEEPLABV3_PLAN), aux_loss=True,
    )


@register_backbone(
    "fcn_resnet101",
    family="torchvision-segmentation",
    description="FCN ResNet-101 (torchvision, COCO/VOC); dilated: layer3/layer4/head at stride 8",
    hub_source=torchvision_hub_source("fcn_resnet101"),
)
def _fcn_resnet101(layers, weights):
    from torchvision.models.segmentation import fcn_resnet101

    return build_torchvision(
        "fcn_resnet101", fcn_resnet101, layers, weights, plan_taps(FCN_PLAN), _plan_builder(FCN_PLAN), aux_loss=True,
    )


@register_backbone(
    "deeplabv3_mobilenet_v3_large",
    family="torchvision-segmentation",
    description="DeepLabV3 MobileNetV3-Large (torchvision, COCO/VOC); layers features.0..16 + aspp, head (stride 16)",
    hub_source=torchvision_hub_source("deeplabv3_mobilenet_v3_large"),
)
def _deeplabv3_mobilenet_v3_large(layers, weights):
    from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large

    return build_torchvision(
        "deeplabv3_mobilenet_v3_large", deeplabv3_mobilenet_v3_large, layers, weights,
        plan_taps(DEEPLABV3_MOBILENET_PLAN), _plan_builder(DEEPLABV3_MOBILENET_PLAN), aux_loss=True,
    )
