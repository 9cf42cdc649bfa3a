"""Backbone forward pass in NCHW vs NHWC (channels_last) memory format, side by side.

Usage: python bench/backbone_memory_format.py [--threads 2] [--repeats 5] [--batch 8] [--size 256]

Random-init weights (speed does not depend on them); each repeat runs both formats back to back,
medians reported. Prints JSON: per backbone the seconds per batch, the speed-up and the largest
difference of the features relative to their magnitude. anoseg's extractors run NHWC except
where this shows no gain (ConvNeXt).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from anoseg.backbones import create_backbone  # noqa: E402
from machine_info import machine  # noqa: E402

CASES = {
    "resnet18": ["layer1", "layer2", "layer3"],
    "wide_resnet50_2": ["layer2", "layer3"],
    "tf_efficientnet_lite0": ["blocks.1", "blocks.2", "blocks.4"],
    "deeplabv3_mobilenet_v3_large": ["features.4", "aspp"],
    "hrnet_w18": ["stage2", "stage3"],
    "fcos_resnet50_fpn": ["body.layer2", "fpn.0"],
    "convnext_tiny": ["stages.0", "stages.1", "stages.2"],
}


@torch.inference_mode()
def time_formats(name: str, layers: list[str], batch: torch.Tensor, repeats: int) -> dict:
    torch.manual_seed(0)
    extractor = create_backbone(name, layers, "none")
    body = extractor.body
    times: dict[str, list[float]] = {"nchw": [], "nhwc": []}
    outputs = {}
    for _ in range(repeats + 1):  # the first round warms up and is dropped
        for fmt, memory_format in (("nchw", torch.contiguous_format), ("nhwc", torch.channels_last)):
            body.to(memory_format=memory_format)
            x = batch.contiguous(memory_format=memory_format)
            start = time.perf_counter()
            out = body(x)
            times[fmt].append(time.perf_counter() - start)
            outputs[fmt] = {layer: out[layer].contiguous() for layer in layers}
    med = {fmt: statistics.median(t[1:]) for fmt, t in times.items()}
    rel = max(float((outputs["nhwc"][k] - outputs["nchw"][k]).abs().max() / outputs["nchw"][k].abs().max().clamp_min(1e-12))
              for k in layers)
    return {"layers": layers, "nchw_s": round(med["nchw"], 4), "nhwc_s": round(med["nhwc"], 4),
            "speedup_nhwc": round(med["nchw"] / med["nhwc"], 2), "max_rel_feature_diff": float(f"{rel:.2e}"),
            "extractor_uses_nhwc": extractor.channels_last}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--backbones", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "backbone_memory_format.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batch = torch.rand(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    results = {}
    for name in args.backbones:
        results[name] = time_formats(name, CASES[name], batch, args.repeats)
        print(f"{name}: {results[name]}", file=sys.stderr, flush=True)
    report = {"benchmark": "backbone_memory_format", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "setting": {"threads": args.threads, "repeats": args.repeats, "batch": args.batch, "size": args.size,
                          "weights": "none (random init)", "device": "cpu"},
              "machine": machine(), "results": results}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
