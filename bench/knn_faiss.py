"""PatchCore's nearest-neighbour search: anoseg's chunked torch kNN vs faiss (exact, IndexFlatL2).

    python bench/knn_faiss.py [--repeats 3] [--threads 2]

Does faiss pay on the CPU? Both compute exact Euclidean kNN with a matrix product; this measures
them side by side (alternating, median of --repeats) on PatchCore-sized problems: memory banks
of 10% of a category's training patches, queries = the patches of a batch of test images, at the
feature widths of resnet18 layer2+3 (384) and wide_resnet50_2 layer2+3 (1536). faiss-cpu is
installed into ~/.cache/anoseg/bench/faiss (pip --target) on first use, not into the project.
Prints one JSON object: setting, machine, per case the times, the ratio torch/faiss, and whether
the neighbours agree (same indices, distances equal to 1e-3 relative).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FAISS_DIR = Path.home() / ".cache" / "anoseg" / "bench" / "faiss"
from machine_info import machine  # noqa: E402  (bench/ is on sys.path when run as a script)
CASES = [  # (name, bank rows, queries, dims, k)
    ("resnet18 l2+3, 32x32 grid, bank 12k", 12_288, 8_192, 384, 1),
    ("resnet18 l2+3, k=9", 12_288, 8_192, 384, 9),
    ("wide_resnet50_2 l2+3, 28x28 grid, bank 16k", 15_680, 6_272, 1536, 1),
]


def import_faiss():
    try:
        import faiss  # noqa: F401
    except ImportError:
        if not FAISS_DIR.is_dir():
            print(f"installing faiss-cpu into {FAISS_DIR}", file=sys.stderr)
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(FAISS_DIR), "faiss-cpu"],
                           check=True)
        sys.path.insert(0, str(FAISS_DIR))
    import faiss

    return faiss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    faiss = import_faiss()
    import numpy as np
    import torch

    from anoseg.heads.patchcore import knn

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    results = []
    for name, n_bank, n_query, dims, k in CASES:
        gen = torch.Generator().manual_seed(0)
        bank = torch.randn(n_bank, dims, generator=gen)
        queries = torch.randn(n_query, dims, generator=gen) * 1.1
        times: dict[str, list[float]] = {"torch": [], "faiss": []}
        out = {}
        for r in range(args.repeats):
            for side in (("torch", "faiss") if r % 2 == 0 else ("faiss", "torch")):
                start = time.perf_counter()
                if side == "torch":
                    d, i = knn(queries, bank, k)
                    out[side] = (d.numpy(), i.numpy())
                else:
                    index = faiss.IndexFlatL2(dims)
                    index.add(bank.numpy())
                    d2, i = index.search(queries.numpy(), k)
                    out[side] = (np.sqrt(np.maximum(d2, 0)), i)
                times[side].append(time.perf_counter() - start)
            print(f"{name}: repeat {r + 1}/{args.repeats}", file=sys.stderr, flush=True)
        (dt, it), (df, i_f) = out["torch"], out["faiss"]
        med = {side: statistics.median(v) for side, v in times.items()}
        results.append({
            "case": name, "bank": n_bank, "queries": n_query, "dims": dims, "k": k,
            "torch_s": round(med["torch"], 4), "faiss_s": round(med["faiss"], 4),
            "torch_over_faiss": round(med["torch"] / med["faiss"], 3),
            "same_indices": float((it == i_f).mean()),
            "max_rel_distance_diff": float(np.abs(dt - df).max() / np.abs(dt).max()),
        })
    report = {
        "benchmark": "knn_faiss", "date": time.strftime("%Y-%m-%d"),
        "setting": {"repeats": args.repeats, "threads": args.threads, "faiss": faiss.__version__,
                    "index": "IndexFlatL2 (exact)", "anoseg": "anoseg.heads.patchcore.knn (chunks of 4096 rows)"},
        "machine": machine(),
        "results": results,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
