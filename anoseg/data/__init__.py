"""Datasets in the MVTec AD layout: the loader, the image and mask reader, and a synthetic generator
(`anoseg.data.synthetic`)."""
from __future__ import annotations

from anoseg.data.images import IMAGE_SUFFIXES, find_mask, load_images, read_images, read_mask
from anoseg.data.mvtec import (
    MVTEC_CATEGORIES,
    TestSplit,
    category_fingerprint,
    list_categories,
    list_test,
    load_test,
    load_train,
    resolve_categories,
)

__all__ = [
    "IMAGE_SUFFIXES",
    "MVTEC_CATEGORIES",
    "TestSplit",
    "category_fingerprint",
    "find_mask",
    "list_categories",
    "list_test",
    "load_images",
    "load_test",
    "load_train",
    "read_images",
    "read_mask",
    "resolve_categories",
]
