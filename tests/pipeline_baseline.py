"""Metrics every head reached before the one-pipeline restructuring, to hold the pipeline to them.

`python tests/pipeline_baseline.py` re-records tests/data/pipeline_baseline.json (only when a change
is meant to alter the numbers); tests/test_pipeline_regression.py compares against it.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

BASELINE = Path(__file__).parent / "data" / "pipeline_baseline.json"
CATEGORIES = ["brick", "washer"]
QUALITY = ("image_auroc", "pixel_auroc", "aupro", "pixel_f1_max", "image_f1_max")
DATASET = {"seed": 0, "image_size": 128, "n_train": 12, "n_test_good": 4, "n_test_per_defect": 2}


def config(head: dict[str, Any]) -> dict[str, Any]:
    return {"backbone": {"name": "tf_efficientnet_lite0", "weights": "offline"}, "layers": ["blocks.1", "blocks.2"],
            "image_size": 64, "head": head, "batch_size": 8, "seed": 0, "device": "cpu"}


CONFIGS: dict[str, dict[str, Any]] = {
    "padim": config({"name": "padim", "n_features": 40}),
    "patchcore": config({"name": "patchcore", "coreset_ratio": 0.1, "k": 3}),
    "gaussian_ad": config({"name": "gaussian_ad"}),
    "feature_dictionary": config({"name": "feature_dictionary", "k": 8}),
    "stfpm": config({"name": "stfpm", "epochs": 2, "discrepancy_scaling": True, "holdout": 0.25}),
}


def measure(data_root: Path) -> dict[str, Any]:
    """Per head: run_trial's quality metrics per category, and a fitted model's metrics and scores."""
    from anoseg.data import load_test
    from anoseg.model import fit_model
    from anoseg.trial import run_trial

    out: dict[str, Any] = {}
    for name, cfg in CONFIGS.items():
        result = run_trial(cfg, data_root, CATEGORIES)
        model = fit_model(cfg, data_root, CATEGORIES[0], holdout=None)  # all test images, as recorded
        test = load_test(data_root, CATEGORIES[0], cfg["image_size"])
        maps, scores = model.predict(test.images)
        out[name] = {
            "trial": {c: {k: m[k] for k in QUALITY} for c, m in result.per_category.items()},
            "fit": {k: model.metrics[k] for k in QUALITY},
            "predict": {"scores": [float(s) for s in scores], "map_sum": float(maps.double().sum())},
        }
    return out


def main() -> int:
    from anoseg.data.synthetic import generate

    with tempfile.TemporaryDirectory() as folder:
        generate(Path(folder), **DATASET)
        values = measure(Path(folder))
    BASELINE.parent.mkdir(parents=True, exist_ok=True)
    BASELINE.write_text(json.dumps(values, indent=1) + "\n")
    print(f"wrote {BASELINE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
