"""Cost of bootstrap replicates of AUPRO: anoseg.bootstrap.replicates against the metric of each concatenated replicate.

Usage: python bench/bootstrap_cost.py [--n 25 --sizes 128 256 --boots 100 200 --repeats 3 --naive 5 --seed 0]

Data: the maps and blob masks of bench/metrics.py (float32 maps with 3 decimals, masks on every other
image), stratified resamples (good / defective). For each size and B: the median seconds of
``replicates("aupro", ...)`` over the repeats, and the naive cost: anoseg.metrics.aupro on the
concatenated images of the first `--naive` replicates, scaled to B; with the largest difference between the two
on those replicates. Prints one JSON object and writes it to bench/results/bootstrap_cost.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from anoseg import metrics  # noqa: E402
from anoseg.bootstrap import replicates, resample_indices  # noqa: E402
from machine_info import machine  # noqa: E402
from metrics import make_data  # noqa: E402  (bench/metrics.py)

RESULTS = Path(__file__).resolve().parent / "results" / "bootstrap_cost.json"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=25)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--boots", type=int, nargs="+", default=[100, 200])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--naive", type=int, default=5, help="replicates timed with the naive concatenation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--metric", default="aupro")
    args = parser.parse_args(argv)
    limit = {"aupro": 0.3, "aupro_0.05": 0.05}[args.metric]

    runs = []
    for size in args.sizes:
        masks, maps = make_data(args.n, size, args.seed)
        labels = masks.reshape(args.n, -1).any(axis=1)
        scores = maps.reshape(args.n, -1).max(axis=1)
        strata = np.where(labels, "defective", "good")
        replicates(args.metric, resample_indices(strata, 2, 0), labels=labels, scores=scores, masks=masks, maps=maps)
        for n_boot in args.boots:
            rows = resample_indices(strata, n_boot, args.seed)
            times, values = [], None
            for _ in range(args.repeats):
                start = time.perf_counter()
                values = replicates(args.metric, rows, labels=labels, scores=scores, masks=masks, maps=maps)
                times.append(time.perf_counter() - start)
            start = time.perf_counter()
            naive = [metrics.aupro(masks[r], maps[r], limit) for r in rows[: args.naive]]
            naive_s = (time.perf_counter() - start) / len(naive) * n_boot
            median_s = statistics.median(times)
            runs.append({
                "n_images": args.n, "size": size, "n_boot": n_boot, "metric": args.metric,
                "replicates_median_s": round(median_s, 4),
                "naive_scaled_s": round(naive_s, 3),
                "speedup": round(naive_s / median_s, 1),
                "max_abs_diff_first_replicates": float(np.max(np.abs(values[: args.naive] - np.array(naive)))),
            })

    result = {
        "setting": {
            "n_images": args.n, "sizes": args.sizes, "n_boots": args.boots, "metric": args.metric,
            "fpr_limit": limit, "repeats": args.repeats, "naive_replicates_timed": args.naive, "seed": args.seed,
            "machine": {**machine(), "numpy": np.__version__},
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
        "runs": runs,
    }
    text = json.dumps(result, indent=2)
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text + "\n")


if __name__ == "__main__":
    main()
