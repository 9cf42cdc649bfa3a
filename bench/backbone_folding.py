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
from anoseg.backbones.folding import count_batchnorms  # noqa: E402
from machine_info import machine  # noqa: E402

CASES = {
    "resnet18": ["layer1", "layer2", "layer3"],
    "wide_resnet50_2": ["layer2", "layer3"],
    "hrnet_w18": ["stage2", "stage3"],
    "deeplabv3_resnet50": ["layer2", "layer3"],
    "fcos_resnet50_fpn": ["body.layer2", "fpn.0"],
    "tf_efficientnet_lite0": ["blocks.1", "blocks.2", "blocks.4"],
}


def _status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def forward_peak(run) -> tuple[float, float, dict]:
    """Seconds and peak resident MiB above the start of one call of `run`."""
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status_mib("VmRSS")
    start = time.perf_counter()
    out = run()
    seconds = time.perf_counter() - start
    return seconds, _status_mib("VmHWM") - before, out


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
    rel = max(float((outputs["folded"][k] - outputs["unfolded"][k]).abs().max()
                    / outputs["unfolded"][k].abs().max().clamp_min(1e-12)) for k in layers)
    return {"layers": layers, "batchnorms_folded": folds, "unfolded_s": round(med["unfolded"], 4),
            "folded_s": round(med["folded"], 4), "speedup_folded": round(med["unfolded"] / med["folded"], 2),
            "unfolded_peak_mib": round(peak["unfolded"], 1), "folded_peak_mib": round(peak["folded"], 1),
            "peak_ratio_folded": round(peak["folded"] / max(peak["unfolded"], 1e-9), 2),
            "max_rel_feature_diff": float(f"{rel:.2e}")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--backbones", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "backbone_folding.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batch = torch.rand(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    batch = batch.contiguous(memory_format=torch.channels_last)
    results = {}
    for name in args.backbones:
        results[name] = compare(name, CASES[name], batch, args.repeats)
        print(f"{name}: {results[name]}", file=sys.stderr, flush=True)
    report = {"benchmark": "backbone_folding", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "setting": {"threads": args.threads, "repeats": args.repeats, "batch": args.batch, "size": args.size,
                          "weights": "none (random init, randomised BatchNorm statistics)", "device": "cpu",
                          "memory_format": "channels_last"},
              "machine": machine(), "results": results}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
