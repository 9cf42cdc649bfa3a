"""Anomaly heads: one file each, registered by name."""
from __future__ import annotations

from anoseg.heads.base import HEADS, Head, anomaly_maps, create_head, final_maps, head_defaults, register_head
from anoseg.heads import feature_dictionary, gaussian_ad, padim, patchcore  # noqa: F401  (registers the heads)

__all__ = ["HEADS", "Head", "anomaly_maps", "create_head", "final_maps", "head_defaults", "register_head"]
