"""What the backbone benchmarks share: the command line, the feature check and the JSON report."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from machine_info import machine

ROOT = Path(__file__).resolve().parents[1]


def parse_args(doc: str, cases: dict, default_batch: int, benchmark: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=default_batch)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--backbones", nargs="+", default=list(cases), choices=list(cases))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / f"{benchmark}.json"))
    return parser.parse_args()


def max_relative_diff(reference: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> float:
    """The largest |other - reference| over all layers, relative to each layer's largest |reference|."""
    rel = max(float((other[k] - reference[k]).abs().max() / reference[k].abs().max().clamp_min(1e-12))
              for k in reference)
    return float(f"{rel:.2e}")


def run_cases(args: argparse.Namespace, cases: dict, benchmark: str, batch: torch.Tensor,
              measure: Callable[[str, list, torch.Tensor, int], dict], setting: dict) -> None:
    """Measure every requested backbone, then write and print the report."""
    results = {}
    for name in args.backbones:
        results[name] = measure(name, cases[name], batch, args.repeats)
        print(f"{name}: {results[name]}", file=sys.stderr, flush=True)
    report = {"benchmark": benchmark, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "setting": {"threads": args.threads, "repeats": args.repeats, "batch": args.batch, "size": args.size,
                          **setting},
              "machine": machine(), "results": results}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
