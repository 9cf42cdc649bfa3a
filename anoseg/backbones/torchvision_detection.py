"""torchvision detection backbones (ResNet-50 + FPN; COCO weights for ``weights="hub"``).

Run through ``model.backbone`` directly on the normalised image (no GeneralizedRCNNTransform resize).
Layers: ``body.layer1``..``body.layer4`` (strides 4..32) and the FPN outputs named as the model returns
them: Faster / Mask R-CNN ``fpn.0``..``fpn.3`` (P2-P5, strides 4..32) + ``fpn.pool`` (64); RetinaNet and
FCOS ``fpn.0``..``fpn.2`` (P3-P5, strides 8..32, from layer2..layer4) + ``fpn.p6`` (64), ``fpn.p7`` (128)
(RetinaNet v2 computes P6 from C5, FCOS from P5). All FPN levels have 256 channels. Asking only for body
layers runs only the body up to the deepest one.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Iterable

from torch import Tensor, nn

from anoseg.backbones.registry import register_backbone
from anoseg.backbones.torchvision_common import PlanBody, Step, build_torchvision, mirror_into, torchvision_hub_source

BODY_PLAN = [
    *[Step(None, f"backbone.body.{m}") for m in ("conv1", "bn1", "relu", "maxpool")],
    *[Step(f"body.layer{i}", f"backbone.body.layer{i}") for i in range(1, 5)],
]
BODY_LAYERS = [f"body.layer{i}" for i in range(1, 5)]


class DetectionBody(PlanBody):
    """ResNet body (truncated when no FPN level is wanted) followed, if needed, by the FPN."""

    def __init__(self, model: nn.Module, wanted: Iterable[str]) -> None:
        wanted = set(wanted)
        return_layers = dict(model.backbone.body.return_layers)  # {"layer2": "0", ...}
        use_fpn = any(w.startswith("fpn.") for w in wanted)
        body_wanted = {w for w in wanted if w.startswith("body.")}
        if use_fpn:
            body_wanted |= {f"body.{layer}" for layer in return_layers}
        super().__init__(model, BODY_PLAN, body_wanted)
        self.return_layers = return_layers
        self.use_fpn = use_fpn
        if use_fpn:
            mirror_into(self, model, ["backbone.fpn"])

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        out = self.run_plan(x)
        if self.use_fpn:
            feats = OrderedDict((ret, out[f"body.{layer}"]) for layer, ret in self.return_layers.items())
            for key, value in self.get_submodule("backbone.fpn")(feats).items():
                out[f"fpn.{key}"] = value
        return out


@register_backbone(
    "fasterrcnn_resnet50_fpn_v2",
    family="torchvision-detection",
    description="Faster R-CNN v2 ResNet-50-FPN (torchvision, COCO); body.layer1..4, fpn.0..3 + fpn.pool",
    hub_source=torchvision_hub_source("fasterrcnn_resnet50_fpn_v2"),
)
def _fasterrcnn_resnet50_fpn_v2(layers, weights):
    from torchvision.models.detection import fasterrcnn_resnet50_fpn_v2

    all_layers = BODY_LAYERS + ["fpn.0", "fpn.1", "fpn.2", "fpn.3", "fpn.pool"]
    return build_torchvision(
        "fasterrcnn_resnet50_fpn_v2", fasterrcnn_resnet50_fpn_v2, layers, weights, all_layers, DetectionBody
    )


@register_backbone(
    "retinanet_resnet50_fpn_v2",
    family="torchvision-detection",
    description="RetinaNet v2 ResNet-50-FPN (torchvision, COCO); body.layer1..4, fpn.0..2 (stride 8..32) + fpn.p6, fpn.p7",
    hub_source=torchvision_hub_source("retinanet_resnet50_fpn_v2"),
)
def _retinanet_resnet50_fpn_v2(layers, weights):
    from torchvision.models.detection import retinanet_resnet50_fpn_v2

    all_layers = BODY_LAYERS + ["fpn.0", "fpn.1", "fpn.2", "fpn.p6", "fpn.p7"]
    return build_torchvision(
        "retinanet_resnet50_fpn_v2", retinanet_resnet50_fpn_v2, layers, weights, all_layers, DetectionBody
    )


@register_backbone(
    "maskrcnn_resnet50_fpn_v2",
    family="torchvision-detection",
    description="Mask R-CNN v2 ResNet-50-FPN (torchvision, COCO); body.layer1..4, fpn.0..3 + fpn.pool",
    hub_source=torchvision_hub_source("maskrcnn_resnet50_fpn_v2"),
)
def _maskrcnn_resnet50_fpn_v2(layers, weights):
    from torchvision.models.detection import maskrcnn_resnet50_fpn_v2

    all_layers = BODY_LAYERS + ["fpn.0", "fpn.1", "fpn.2", "fpn.3", "fpn.pool"]
    return build_torchvision(
        "maskrcnn_resnet50_fpn_v2", maskrcnn_resnet50_fpn_v2, layers, weights, all_layers, DetectionBody
    )


@register_backbone(
    "fcos_resnet50_fpn",
    family="torchvision-detection",
    description="FCOS ResNet-50-FPN (torchvision, COCO); body.layer1..4, fpn.0..2 (stride 8..32) + fpn.p6, fpn.p7",
    hub_source=torchvision_hub_source("fcos_resnet50_fpn"),
)
def _fcos_resnet50_fpn(layers, weights):
    from torchvision.models.detection import fcos_resnet50_fpn

    all_layers = BODY_LAYERS + ["fpn.0", "fpn.1", "fpn.2", "fpn.p6", "fpn.p7"]
    return build_torchvision("fcos_resnet50_fpn", fcos_resnet50_fpn, layers, weights, all_layers, DetectionBody)
