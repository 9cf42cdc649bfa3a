"""Anomaly heads: one file each, registered by name."""
from __future__ import annotations

from anoseg.heads.base import HEADS, AnyHead, Head, HeadBase, TrainableHead, create_head, head_defaults, register_head
from anoseg.heads import (  # noqa: F401  (registers the heads)
    cse, feature_dictionary, gaussian_ad, padim, patchcore, simplenet, stfpm, stfpm_seg,
)

__all__ = ["HEADS", "AnyHead", "Head", "HeadBase", "TrainableHead", "create_head", "head_defaults", "register_head"]
