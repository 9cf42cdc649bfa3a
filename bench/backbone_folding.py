"""Backbone forward pass with and without BatchNorm folding, side by side.

Usage: python bench/backbone_folding.py [--threads 2] [--repeats 5] [--batch 16] [--size 256]

Random-init weights with randomised BatchNorm statistics (so folding changes real numbers); both
variants run channels-last as the extractors do, alternating, one warm-up round dropped, medians
reported. Memory: the peak resident memory one forward adds (VmHWM reset through
/proc/self/clear_refs before each forward), median over the repeats. Prints JSON: per backbone
seconds per batch, speed-up, activation peak of each variant, their ratio and the largest
difference of the features relative to their magnitude.
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
from anoseg.backbones.folding import count_batchnorms  # noqa: E402
from backbone_bench import max_relative_diff, parse_args, run_cases  # noqa: E402
from machine_info import proc_status_mib  # noqa: E402

CASES = {
    "resnet18": ["layer1", "layer2", "layer3"],
    "wide_resnet50_2": ["layer2", "layer3"],
    "hrnet_w18": ["stage2", "stage3"],
    "deeplabv3_resnet50": ["layer2", "layer3"],
    "fcos_resnet50_fpn": ["body.layer2", "fpn.0"],
    "tf_efficientnet_lite0": ["blocks.1", "blocks.2", "blocks.4"],
}


def forward_peak(run) -> tuple[float, float, dict]:
    """Seconds and peak resident MiB above the start of one call of `run`."""
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = proc_status_mib()["VmRSS"]
    start = time.perf_counter()
    out = run()
    seconds = time.perf_counter() - start
    return seconds, proc_status_mib()["VmHWM"] - before, out


@torch.inference_mode()
def compare(name: str, layers: list[str], batch: torch.Tensor, repeats: int) -> dict:
    torch.manual_seed(0)
    variants = {"unfolded": create_backbone(name, layers, "none"), "folded": None}
    g = torch.Generator().manual_seed(1)
    for m in variants["unfolded"].body.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    extractor = variants["unfolded"]
    extractor.fold_batchnorm = True
    folded_body = extractor._inference_body()
    extractor.fold_batchnorm = False
    folds = count_batchnorms(extractor.body) - count_batchnorms(folded_body)
    runs = {"unfolded": lambda: extractor.body(batch), "folded": lambda: folded_body(batch)}
    times: dict[str, list[float]] = {k: [] for k in runs}
    peaks: dict[str, list[float]] = {k: [] for k in runs}
    outputs = {}
    for _ in range(repeats + 1):  # the first round warms up and is dropped
        for variant, run in runs.items():
            seconds, peak, out = forward_peak(run)
            times[variant].append(seconds)
            peaks[variant].append(peak)
            outputs[variant] = {layer: out[layer].contiguous() for layer in layers}
            del out
    med = {k: statistics.median(v[1:]) for k, v in times.items()}
    peak = {k: statistics.median(v[1:]) for k, v in peaks.items()}
    return {"layers": layers, "batchnorms_folded": folds, "unfolded_s": round(med["unfolded"], 4),
            "folded_s": round(med["folded"], 4), "speedup_folded": round(med["unfolded"] / med["folded"], 2),
            "unfolded_peak_mib": round(peak["unfolded"], 1), "folded_peak_mib": round(peak["folded"], 1),
            "peak_ratio_folded": round(peak["folded"] / max(peak["unfolded"], 1e-9), 2),
            "max_rel_feature_diff": max_relative_diff(outputs["unfolded"], outputs["folded"])}


def main() -> None:
    args = parse_args(__doc__, CASES, default_batch=16, benchmark="backbone_folding")
    torch.set_num_threads(args.threads)
    batch = torch.rand(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    batch = batch.contiguous(memory_format=torch.channels_last)
    run_cases(args, CASES, "backbone_folding", batch, compare,
              {"weights": "none (random init, randomised BatchNorm statistics)", "device": "cpu",
               "memory_format": "channels_last"})


if __name__ == "__main__":
    main()
