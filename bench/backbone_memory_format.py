"""Backbone forward pass in NCHW vs NHWC (channels_last) memory format, side by side.

Usage: python bench/backbone_memory_format.py [--threads 2] [--repeats 5] [--batch 8] [--size 256]

Random-init weights (speed does not depend on them); each repeat runs both formats back to back,
medians reported. Prints JSON: per backbone the seconds per batch, the speed-up and the largest
difference of the features relative to their magnitude. anoseg's extractors run NHWC except
where this shows no gain (ConvNeXt).
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from anoseg.backbones import create_backbone  # noqa: E402
from backbone_bench import max_relative_diff, parse_args, run_cases  # noqa: E402

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
    return {"layers": layers, "nchw_s": round(med["nchw"], 4), "nhwc_s": round(med["nhwc"], 4),
            "speedup_nhwc": round(med["nchw"] / med["nhwc"], 2),
            "max_rel_feature_diff": max_relative_diff(outputs["nchw"], outputs["nhwc"]),
            "extractor_uses_nhwc": extractor.channels_last}


def main() -> None:
    args = parse_args(__doc__, CASES, default_batch=8, benchmark="backbone_memory_format")
    torch.set_num_threads(args.threads)
    batch = torch.rand(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    run_cases(args, CASES, "backbone_memory_format", batch, time_formats,
              {"weights": "none (random init)", "device": "cpu"})


if __name__ == "__main__":
    main()
