"""How hard is the embedded synthetic dataset? The demo space's configurations, evaluated on it.

    .venv/bin/python bench/dataset_difficulty.py [--seed 0] [--image-size 128] [--space spaces/quick.yaml]
        [--heads padim patchcore] [--categories brick ...] [--data DIR] [--out bench/results/dataset_difficulty.json]

Setting. The dataset is generated with ``anoseg.data.synthetic.generate``'s defaults and ``--seed``
(what ``anoseg data synth`` / ``make demo`` writes) into a temporary folder (``--data DIR`` evaluates an
existing one instead), and the configurations are evaluated at ``--image-size`` px, 128 like the demo
search. Configurations: a fixed, representative sample of the demo space (spaces/quick.yaml): every
backbone x every layer subset listed there (with its weights: offline ImageNet weights) x the heads
{padim n_features 16, 64, 128; patchcore coreset_ratio 0.01 and 0.1 x k 1 and 3, patch_size 3}; the
space file's trial settings (batch size, seed). Every configuration runs
``anoseg.trial.run_trial(config, root, categories=None, cache=FeatureCache(tmp))``: one feature cache for
the whole run, so configurations sharing a backbone layer extract it once (``seconds`` is the wall time
of one configuration and so depends on the cache; the trial's own fit_seconds / ms_per_image do not).

Prints one JSON object (also written to --out): setting, machine, per configuration its mean and
per-category AUPRO / pixel AUROC / image AUROC and seconds, and a summary: per head and overall the
best / median / worst mean AUPRO, per category the best AUPRO (and the configuration reaching it), and
whether the targets hold: best mean AUPRO <= 0.95 and median <= best - 0.03 (a search over this space
has something to find). Progress goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from machine_info import machine  # noqa: E402

HEAD_SAMPLE: dict[str, list[dict]] = {
    "padim": [{"name": "padim", "n_features": n} for n in (16, 64, 128)],
    "patchcore": [{"name": "patchcore", "coreset_ratio": r, "k": k, "patch_size": 3}
                  for r in (0.01, 0.1) for k in (1, 3)],
}
METRICS = ("aupro", "pixel_auroc", "image_auroc")
TARGET_BEST_MAX = 0.95
TARGET_GAP_MIN = 0.03


def configurations(space_file: Path, image_size: int, heads: list[str]) -> list[dict]:
    raw = yaml.safe_load(space_file.read_text())
    trial = raw.get("trial") or {}
    out = []
    for name, spec in raw["space"]["backbones"].items():
        for layers in spec["layers"]:
            for head in heads:
                for head_cfg in HEAD_SAMPLE[head]:
                    out.append({"backbone": {"name": name, "weights": spec.get("weights", "offline")},
                                "layers": list(layers), "image_size": image_size, "head": dict(head_cfg),
                                "batch_size": trial.get("batch_size", 16), "seed": trial.get("seed", 0),
                                "device": "cpu"})
    return out


def label(cfg: dict) -> str:
    head = ",".join(f"{k}={v}" for k, v in cfg["head"].items() if k != "name")
    return f"{cfg['backbone']['name']} [{','.join(cfg['layers'])}] {cfg['head']['name']}({head})"


def spread(values: list[float]) -> dict:
    return {"best": round(max(values), 4), "median": round(statistics.median(values), 4),
            "worst": round(min(values), 4), "n": len(values)}


def summarize(rows: list[dict]) -> dict:
    heads = sorted({r["config"]["head"]["name"] for r in rows})
    overall = spread([r["mean"]["aupro"] for r in rows])
    per_category: dict[str, dict] = {}
    for r in rows:
        for cat, m in r["per_category"].items():
            best = per_category.get(cat)
            if best is None or m["aupro"] > best["best_aupro"]:
                per_category[cat] = {"best_aupro": m["aupro"], "config": r["label"]}
    for cat, entry in per_category.items():
        values = [r["per_category"][cat]["aupro"] for r in rows]
        entry.update(median_aupro=round(statistics.median(values), 4), worst_aupro=round(min(values), 4))
    targets = {
        f"best_mean_aupro_at_most_{TARGET_BEST_MAX}": overall["best"] <= TARGET_BEST_MAX,
        f"median_at_least_{TARGET_GAP_MIN}_below_best": round(overall["best"] - overall["median"], 4) >= TARGET_GAP_MIN,
    }
    return {"aupro_per_head": {h: spread([r["mean"]["aupro"] for r in rows if r["config"]["head"]["name"] == h])
                               for h in heads},
            "aupro_overall": overall, "best_minus_median": round(overall["best"] - overall["median"], 4),
            "best_config": max(rows, key=lambda r: r["mean"]["aupro"])["label"],
            "per_category": per_category, "targets": targets, "targets_hold": all(targets.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    parser.add_argument("--image-size", type=int, default=128, help="evaluation image size (the demo's 128)")
    parser.add_argument("--space", default=str(ROOT / "spaces" / "quick.yaml"))
    parser.add_argument("--heads", nargs="+", default=list(HEAD_SAMPLE), choices=list(HEAD_SAMPLE))
    parser.add_argument("--categories", nargs="+", default=None, help="default: all")
    parser.add_argument("--data", default=None, help="evaluate this dataset instead of generating one")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()

    import torch

    from anoseg.cache import FeatureCache
    from anoseg.data.synthetic import generate
    from anoseg.trial import run_trial

    configs = configurations(Path(args.space), args.image_size, args.heads)
    with tempfile.TemporaryDirectory(prefix="anoseg-difficulty-") as tmp:
        gen_seconds = None
        if args.data:
            root = Path(args.data)
        else:
            root = Path(tmp) / "data"
            start = time.perf_counter()
            generate(root, seed=args.seed)
            gen_seconds = round(time.perf_counter() - start, 2)
            print(f"generated the dataset in {gen_seconds} s", file=sys.stderr)
        cache = FeatureCache(Path(tmp) / "cache")
        rows = []
        total = time.perf_counter()
        for i, cfg in enumerate(configs, start=1):
            start = time.perf_counter()
            result = run_trial(cfg, root, categories=args.categories, cache=cache)
            seconds = time.perf_counter() - start
            per_cat = {c: {k: round(float(m[k]), 4) for k in METRICS} for c, m in result.per_category.items()}
            mean = {k: round(float(result.mean[k]), 4) for k in METRICS}
            rows.append({"label": label(cfg), "config": cfg, "mean": mean, "per_category": per_cat,
                         "seconds": round(seconds, 2)})
            cats = " ".join(f"{c}={m['aupro']:.3f}" for c, m in per_cat.items())
            print(f"[{i}/{len(configs)}] {label(cfg)}: aupro {mean['aupro']:.4f} ({cats}) {seconds:.1f} s",
                  file=sys.stderr)
        total = time.perf_counter() - total
    out = {
        "setting": {"dataset": "anoseg.data.synthetic.generate(defaults)" if not args.data else str(args.data),
                    "seed": args.seed, "image_size": args.image_size, "space": str(Path(args.space).name),
                    "categories": args.categories or "all", "configurations": len(configs),
                    "head_sample": {h: HEAD_SAMPLE[h] for h in args.heads}, "generate_seconds": gen_seconds,
                    "evaluate_seconds": round(total, 1), "torch_threads": torch.get_num_threads()},
        "machine": machine(),
        "configurations": rows,
        "summary": summarize(rows),
    }
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
