"""Checks every trainable head's tests make: a saved and reloaded model scores exactly as the fitted one."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch


def assert_save_load_identical(config: Mapping[str, Any], data_root: Path, folder: Path, size: int,
                               category: str = "brick") -> tuple[Any, Any]:
    """Fit `config` on `category`, save it to `folder`, load it back: identical maps and scores on the test
    images, the head's name recorded, an AUPRO in [0, 1]. Returns (fitted, loaded) for further checks."""
    from anoseg.data import load_test
    from anoseg.model import fit_model, load_model

    model = fit_model(dict(config), data_root, category, out_dir=folder)
    images = load_test(data_root, category, size).images
    maps, scores = model.predict(images)
    loaded = load_model(folder)
    maps2, scores2 = loaded.predict(images)
    assert torch.equal(maps, maps2) and torch.equal(scores, scores2)
    assert loaded.info["head"]["name"] == config["head"]["name"] and 0 <= loaded.metrics["aupro"] <= 1
    return model, loaded
