"""Every head on the embedded dataset: image AUROC, pixel AUROC, AUPRO, seg F1, fit seconds, ms per image.

    python bench/heads_table.py [--categories brick washer board] [--size 128] [--out bench/results/heads_table.json]

One fixed configuration per head (no search, so no selection: every test image is reported) on
tf_efficientnet_lite0 with its offline ImageNet weights, layers blocks.1 + blocks.2 (+ blocks.4 for the
trainable heads' teacher), through ``anoseg.trial.run_trial`` (the search's own path, features cached). The
trainable heads train for a CPU budget (``EPOCHS``), fewer epochs than their defaults: their figures are a
floor. seg_f1 = pixel F1 at mean + 3 std of the good test images' pixels. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine_info import machine  # noqa: E402

LAYERS = ["blocks.1", "blocks.2"]
HEADS = {
    "padim": {"n_features": 100},
    "patchcore": {"coreset_ratio": 0.1},
    "gaussian_ad": {},
    "feature_dictionary": {},
    "stfpm": {"epochs": 10, "batch_size": 8},
    "stfpm_seg": {"stfpm_epochs": 10, "seg_epochs": 10, "batch_size": 8},
    "cse": {"epochs": 10},
    "simplenet": {"epochs": 20},
}
COLUMNS = ("image_auroc", "pixel_auroc", "aupro", "seg_f1", "fit_seconds", "ms_per_image")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--categories", nargs="+", default=["brick", "washer", "board"])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--heads", nargs="+", default=list(HEADS))
    parser.add_argument("--data", type=Path, default=ROOT / "results" / "data" / "synthetic")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "heads_table.json")
    args = parser.parse_args()
    import torch

    from anoseg.cache import FeatureCache
    from anoseg.trial import run_trial

    torch.set_num_threads(2)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="anoseg-heads-") as folder:
        cache = FeatureCache(folder)
        for head in args.heads:
            config = {"backbone": {"name": "tf_efficientnet_lite0", "weights": "offline"}, "layers": LAYERS,
                      "image_size": args.size, "head": {"name": head, **HEADS[head]}, "batch_size": 16, "seed": 0,
                      "device": "cpu"}
            started = time.perf_counter()
            result = run_trial(config, args.data, args.categories, cache=cache)
            rows[head] = {**{k: round(result.mean[k], 4) for k in COLUMNS}, "settings": HEADS[head],
                          "wall_seconds": round(time.perf_counter() - started, 1)}
            print(head, json.dumps(rows[head]), flush=True)
    report = {"bench": "heads_table",
              "setting": {"backbone": "tf_efficientnet_lite0 (offline ImageNet weights)", "layers": LAYERS,
                          "image_size": args.size, "categories": args.categories, "reported_on": "all test images"},
              "machine": machine(), "heads": rows}
    text = json.dumps(report, indent=2)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
