from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from anoseg.data import MVTEC_CATEGORIES, category_fingerprint, list_categories, load_test, load_train, resolve_categories
from anoseg.errors import DataError
from tests.conftest import write_png


def test_official_category_names():
    assert len(MVTEC_CATEGORIES) == 15 and "metal_nut" in MVTEC_CATEGORIES and "bottle" in MVTEC_CATEGORIES


def test_loads_train_and_test_in_mvtec_layout(tiny_mvtec):
    assert list_categories(tiny_mvtec) == ["widget"]
    train = load_train(tiny_mvtec, "widget", 32)
    assert train.shape == (3, 3, 32, 32) and train.dtype == torch.float32
    assert 0.0 <= float(train.min()) and float(train.max()) <= 1.0
    test = load_test(tiny_mvtec, "widget", 32)
    assert test.images.shape == (4, 3, 32, 32)  # grayscale defect images become RGB
    assert test.defect_types == ["crack", "crack", "good", "good"]
    assert test.labels.tolist() == [1, 1, 0, 0]
    assert test.masks.dtype == torch.bool and test.masks.shape == (4, 32, 32)
    assert test.masks[:2].flatten(1).any(1).all() and not test.masks[2:].any()
    # 10x10 of 40x40 resized to 32 with nearest neighbour: 8x8 pixels
    assert int(test.masks[0].sum()) == 64


def test_resolve_categories(tiny_mvtec):
    assert resolve_categories(tiny_mvtec, None) == ["widget"]
    assert resolve_categories(tiny_mvtec, "all") == ["widget"]
    assert resolve_categories(tiny_mvtec, "widget") == ["widget"]
    with pytest.raises(DataError, match="bottle.*available: widget"):
        resolve_categories(tiny_mvtec, ["bottle"])


def test_missing_root_is_clear(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        list_categories(tmp_path / "nope")


def test_defect_image_without_mask_names_the_file(tiny_mvtec):
    (tiny_mvtec / "widget" / "ground_truth" / "crack" / "001_mask.png").unlink()
    with pytest.raises(DataError, match=r"crack/001.png has no mask.*001_mask.png"):
        load_test(tiny_mvtec, "widget", 32)


def test_unreadable_image_names_the_file(tiny_mvtec):
    bad = tiny_mvtec / "widget" / "train" / "good" / "001.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot read image .*001.png"):
        load_train(tiny_mvtec, "widget", 32)


def test_empty_train_set_is_clear(tiny_mvtec):
    for p in (tiny_mvtec / "widget" / "train" / "good").iterdir():
        p.unlink()
    with pytest.raises(DataError, match="has no images"):
        load_train(tiny_mvtec, "widget", 32)


def test_mask_of_wrong_size_is_clear(tiny_mvtec):
    write_png(tiny_mvtec / "widget" / "ground_truth" / "crack" / "000_mask.png", np.zeros((20, 20), np.uint8))
    with pytest.raises(DataError, match="000_mask.png is 20x20 but its image"):
        load_test(tiny_mvtec, "widget", 32)


def test_fingerprint_tracks_content(tiny_mvtec, tmp_path_factory):
    before = category_fingerprint(tiny_mvtec, "widget")
    copy = tmp_path_factory.mktemp("copy")
    shutil.copytree(tiny_mvtec / "widget", copy / "widget")
    assert category_fingerprint(copy, "widget") == before  # same content elsewhere: same fingerprint
    write_png(tiny_mvtec / "widget" / "train" / "good" / "000.png", np.zeros((40, 40, 3), np.uint8))
    assert category_fingerprint(tiny_mvtec, "widget") != before
