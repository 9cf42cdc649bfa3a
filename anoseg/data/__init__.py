"""Datasets in the MVTec AD layout: the real loader and a synthetic generator (`anoseg.data.synthetic`)."""
from __future__ import annotations

from anoseg.data.mvtec import (
    MVTEC_CATEGORIES,
    TestSplit,
    category_fingerprint,
    list_categories,
    load_images,
    load_test,
    load_train,
    resolve_categories,
)

__all__ = [
    "MVTEC_CATEGORIES",
    "TestSplit",
    "category_fingerprint",
    "list_categories",
    "load_images",
    "load_test",
    "load_train",
    "resolve_categories",
]
