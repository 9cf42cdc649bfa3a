"""stfpm_seg against plain STFPM: pixel F1 at a threshold chosen on validation images, AUPRO, and the bank's speed-up.

Usage: python bench/stfpm_seg_vs_stfpm.py [--categories brick washer grass --size 128 --stfpm-epochs 8
       --seg-epochs 12 --bank-size 48 --seed 0]

Data: the embedded synthetic dataset (anoseg.data.synthetic.generate, seed --seed, --size px, --n-train
training images, --n-test-good good and --n-test-per-defect images per defect type in the test split), backbone
tf_efficientnet_lite0 (pretrained, layers blocks.1 + blocks.2), on the CPU unless --device.

Per category, ONE stfpm_seg head is trained epoch by epoch through anoseg.pipeline (load_category, train_epoch,
score_category, as a trial does). Its STFPM phase is a plain ``stfpm`` head with the same settings (the same
scores, tests/test_stfpm_seg.py checks it), so "stfpm" below is that head's scores after --stfpm-epochs epochs;
"stfpm_seg" is the segmentation network (the head's defaults: with_features) after --seg-epochs more, and
"stfpm_seg_without_features" the same on the discrepancy maps alone (trained from the same frozen STFPM);
"sigmoid_maps": the same network's maps as probabilities instead of logits. The test images are split by
anoseg.holdout.Holdout() into a validation and a test part: the pixel threshold is the F1-max threshold on the
validation part (anoseg.thresholds.f1_max_threshold), pixel F1 is measured at it on the test part; AUPRO
(FPR <= 0.3) and the oracle pixel F1-max are of the test part. Maps are the pipeline's (upsampled, Gaussian sigma 4).

Speed-up: a segmentation epoch on the bank's stored inputs against the same epoch plus the forward pass
(backbone + frozen student over the bank) it would need each epoch without the bank, and plus the defect
generation too (a bank drawn anew each epoch). Prints one JSON object and writes it to
bench/results/stfpm_seg_vs_stfpm.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from anoseg import metrics  # noqa: E402
from anoseg.backbones import create_backbone  # noqa: E402
from anoseg.cache import FeatureCache  # noqa: E402
from anoseg.config import TrialConfig  # noqa: E402
from anoseg.heads import create_head  # noqa: E402
from anoseg.holdout import TEST, VALIDATION, Holdout  # noqa: E402
from anoseg.pipeline import FeatureSource, ScoredImages, load_category, score_category, train_epoch  # noqa: E402
from anoseg.thresholds import f1_max_threshold  # noqa: E402
from machine_info import machine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "stfpm_seg_vs_stfpm.json"
BACKBONE, LAYERS = "tf_efficientnet_lite0", ["blocks.1", "blocks.2"]


def quality(scored: ScoredImages, parts: dict[str, np.ndarray]) -> dict[str, float]:
    """Pixel F1 on the test part at the validation part's F1-max threshold, AUPRO and oracle F1-max of the test part."""
    val, test = (torch.as_tensor(parts[p], dtype=torch.long) for p in (VALIDATION, TEST))
    _, threshold = f1_max_threshold(scored.masks[val].numpy(), scored.maps[val].numpy())
    truth, predicted = scored.masks[test].numpy().astype(bool), scored.maps[test].numpy() >= threshold
    tp = int((truth & predicted).sum())
    f1 = 2 * tp / (int(truth.sum()) + int(predicted.sum())) if truth.any() or predicted.any() else 0.0
    return {"pixel_f1_at_val_threshold": round(f1, 4),
            "aupro": round(metrics.aupro(scored.masks[test].numpy(), scored.maps[test].numpy()), 4),
            "pixel_f1_max_oracle": round(metrics.f1_max(scored.masks[test].numpy(), scored.maps[test].numpy()), 4)}


def seg_variant(args: argparse.Namespace, head_params: dict, stfpm_state: dict, source: FeatureSource, data,
                parts: dict[str, np.ndarray]) -> dict:
    """Train a segmentation network on the frozen STFPM of `stfpm_state` and measure it."""
    head = create_head("stfpm_seg", **head_params).setup(source.backbone, source.device)
    head.stfpm_.load_training_state(stfpm_state)
    head.epoch_ = args.stfpm_epochs
    epoch_seconds, losses = [], []
    for _ in range(args.seg_epochs):
        loss, seconds = train_epoch(head, data, source.device)
        epoch_seconds.append(seconds)
        losses.append(round(loss, 4))
    build = head.timing_
    cached = statistics.median(epoch_seconds[1:])  # the first epoch also builds the bank
    logits = quality(score_category(head, source, data), parts)
    head.seg_ = nn.Sequential(head.seg_, nn.Sigmoid())  # the same network scoring probabilities instead
    probabilities = quality(score_category(head, source, data), parts)
    return {
        **logits,
        "sigmoid_maps": probabilities,
        "losses": losses,
        "timing": {"seg_epoch_s": round(cached, 4), "bank_forward_s": round(build["forward"], 4),
                   "bank_generate_s": round(build["generate"], 4),
                   "speedup_vs_forward_per_epoch": round((cached + build["forward"]) / cached, 2),
                   "speedup_vs_generate_and_forward_per_epoch":
                       round((cached + build["forward"] + build["generate"]) / cached, 2)},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--categories", nargs="+", default=["brick", "washer", "grass"])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--n-train", type=int, default=16)
    parser.add_argument("--n-test-good", type=int, default=6)
    parser.add_argument("--n-test-per-defect", type=int, default=4)
    parser.add_argument("--stfpm-epochs", type=int, default=8)
    parser.add_argument("--seg-epochs", type=int, default=12)
    parser.add_argument("--bank-size", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--no-scaling", action="store_true", help="STFPM without discrepancy scaling")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from anoseg.data.synthetic import generate

    torch.manual_seed(args.seed)
    common = {"stfpm_epochs": args.stfpm_epochs, "seg_epochs": args.seg_epochs, "bank_size": args.bank_size,
              "batch_size": args.batch_size, "seed": args.seed, "discrepancy_scaling": not args.no_scaling,
              "holdout": 0.25}
    cfg = TrialConfig.from_dict({"backbone": BACKBONE, "layers": LAYERS, "image_size": args.size, "batch_size": 16,
                                 "device": args.device, "seed": args.seed, "head": {"name": "stfpm_seg", **common}})
    device = torch.device(args.device)
    load = [round(x, 2) for x in os.getloadavg()]  # timings are of a shared machine when this exceeds its CPUs
    start = time.perf_counter()
    per_category = {}
    with tempfile.TemporaryDirectory(prefix="anoseg-stfpm-seg-") as tmp:
        root = Path(tmp) / "data"
        generate(root, seed=args.seed, categories=args.categories, image_size=args.size, n_train=args.n_train,
                 n_test_good=args.n_test_good, n_test_per_defect=args.n_test_per_defect)
        backbone = create_backbone(BACKBONE, LAYERS).to(device)
        source = FeatureSource(backbone, cfg, device, FeatureCache(Path(tmp) / "cache"))
        for category in args.categories:
            head = create_head("stfpm_seg", **common).setup(backbone, device)
            data = load_category(source, root, category, head.holdout_count)
            parts = Holdout().split(data.test.paths, data.test.defect_types, category)
            stfpm_seconds = 0.0
            for _ in range(args.stfpm_epochs):
                stfpm_seconds += train_epoch(head, data, device)[1]
            stfpm_state = head.stfpm_.training_state()
            per_category[category] = {
                "stfpm": {**quality(score_category(head, source, data), parts),
                          "train_s": round(stfpm_seconds, 2)},
                "stfpm_seg": seg_variant(args, common, stfpm_state, source, data, parts),
                "stfpm_seg_without_features": seg_variant(args, {**common, "with_features": False}, stfpm_state,
                                                          source, data, parts),
            }
            print(category, json.dumps(per_category[category]), file=sys.stderr, flush=True)

    methods = list(next(iter(per_category.values())))
    mean = {m: {k: round(statistics.fmean(per_category[c][m][k] for c in per_category), 4)
                for k in ("pixel_f1_at_val_threshold", "aupro", "pixel_f1_max_oracle")} for m in methods}
    speedups = [per_category[c][m]["timing"]["speedup_vs_forward_per_epoch"] for c in per_category
                for m in methods[1:]]
    result = {
        "setting": {
            "dataset": {"generator": "anoseg.data.synthetic.generate", "seed": args.seed, "image_size": args.size,
                        "n_train": args.n_train, "n_test_good": args.n_test_good,
                        "n_test_per_defect": args.n_test_per_defect, "categories": args.categories},
            "backbone": BACKBONE, "layers": LAYERS, "head": {"name": "stfpm_seg", **common},
            "split": "anoseg.holdout.Holdout() (validation share 0.5, seed 0): threshold on validation, "
                     "metrics on test",
            "machine": {**machine(), "device": args.device, "load_average_at_start": load},
            "total_s": round(time.perf_counter() - start, 1),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
        "mean": mean,
        "speedup_vs_forward_per_epoch": {"min": min(speedups), "median": statistics.median(speedups),
                                         "max": max(speedups)},
        "per_category": per_category,
    }
    text = json.dumps(result, indent=2)
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text + "\n")


if __name__ == "__main__":
    main()
