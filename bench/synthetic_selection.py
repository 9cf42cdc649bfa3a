"""Synthetic selection: does ranking trials on generated defects pick what real defects would pick?

    python bench/synthetic_selection.py [--trials 32] [--seed 0] [--out bench/results/synthetic_selection.json]

One search on the embedded dataset (128 px, every category) over a diverse space (three EfficientNet-Lites x
their layer subsets x PaDiM / PatchCore / Gaussian AD / feature dictionary x settings; random sampler, no
early stopping, so every trial completes) under ``selection: {protocol: synthetic}``: each trial is ranked on
20 training images per category held out of fitting and a generated defect on each (anoseg.anomalies, all
kinds). Every completed trial is then finalised (top_k = all) and so also scored on the real test defects.

Reported (AUPRO, the objective):

- ``synthetic``: Kendall tau and Spearman rho between the trials' synthetic-validation and real-test figures,
  overall (mean over categories) and per category; the regret: the real-test AUPRO of the best trial by real
  test minus that of the trial chosen on synthetic validation.
- ``unimitated``: the same, with the real side restricted to the dataset's defect kinds that no generator
  kind imitates (``UNIMITATED``: board's logical defects (a part missing, moved, swapped, rotated), the
  textures' thin scratches, the washer's rim cut): per trial, the mean over those (category, kind) pairs of
  the AUPRO of the good test images and that kind's images. The generator shares no code or recipe with the
  dataset's painter (anoseg/data/synthetic.py); these kinds guard against agreement by resemblance.
- ``few_shot``: the same trials ranked on ``selection: {protocol: few_shot, defects_per_type: 1}`` (one real
  defect image per type + the synthetic set), against the remaining real test images.
- ``per_kind``: tau of every real defect kind on its own (synthetic validation of its category against the
  real AUPRO of good + that kind).

Prints one JSON object and writes it to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine_info import machine  # noqa: E402

METRIC = "aupro"
LAYERS = [["blocks.1", "blocks.2"], ["blocks.2", "blocks.4"], ["blocks.1", "blocks.2", "blocks.4"]]
SPACE = {
    "dataset": {"categories": "all", "image_size": 128},
    "objective": [{"metric": METRIC, "mode": "max"}],
    "sampler": {"name": "random"},
    "scheduler": {"name": "none"},
    "budget": {"max_concurrent": 2},
    "trial": {"batch_size": 16, "seed": 0, "device": "cpu"},
    "space": {
        "backbones": {"tf_efficientnet_lite0": {"weights": "offline", "layers": LAYERS},
                      "tf_efficientnet_lite1": {"weights": "offline", "layers": LAYERS},
                      "tf_efficientnet_lite2": {"weights": "offline", "layers": LAYERS[:2]}},
        "heads": {"padim": {"n_features": {"type": "int", "low": 16, "high": 128}},
                  "patchcore": {"coreset_ratio": {"type": "float", "low": 0.01, "high": 0.1, "log": True},
                                "k": {"type": "categorical", "choices": [1, 3]}, "patch_size": 3},
                  "gaussian_ad": {"shrinkage": {"type": "categorical", "choices": ["ledoit_wolf", 0.1, 0.5]}},
                  "feature_dictionary": {"k": {"type": "int", "low": 8, "high": 64}}},
    },
}
UNIMITATED = {"board": ["missing", "moved", "swapped", "rotated"], "brick": ["scratch"], "grass": ["scratch"],
              "gravel": ["scratch"], "washer": ["cut"]}


def agreement(validation: list[float], test: list[float]) -> dict:
    """Kendall tau, Spearman rho and the regret of choosing on `validation`, judged on `test`."""
    from scipy.stats import kendalltau, spearmanr

    chosen = int(np.argmax(validation))
    return {"kendall_tau": round(float(kendalltau(validation, test).statistic), 4),
            "spearman": round(float(spearmanr(validation, test).statistic), 4),
            "regret": round(float(max(test) - test[chosen]), 4), "n_trials": len(test)}


def per_kind_aupro(configs: dict[str, dict], data: Path, categories: list[str], cache_dir: str | None,
                   selection: dict) -> dict[str, dict[str, dict[str, float]]]:
    """{trial: {category: {kind: AUPRO of the good test images + that kind's}}}, fitted as under `selection`."""
    from anoseg.backbones import create_backbone
    from anoseg.cache import FeatureCache
    from anoseg.config import TrialConfig
    from anoseg.heads import create_head
    from anoseg.holdout import Protocol
    from anoseg.metrics import aupro
    from anoseg.pipeline import FeatureSource, fit_category, score_test

    protocol = Protocol.from_selection(selection)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for tid, raw in configs.items():
        cfg = TrialConfig.from_dict(raw)
        backbone = create_backbone(cfg.backbone.name, cfg.layers, cfg.backbone.weights)
        source = FeatureSource(backbone, cfg, __import__("torch").device("cpu"), FeatureCache(cache_dir))
        out[tid] = {}
        for category in categories:
            head = create_head(cfg.head_name, **cfg.head_params)
            fit_category(head, source, data, category, protocol=protocol)
            real = score_test(head, source, data, category, protocol, part=None)
            types = np.asarray(real.defect_types)
            out[tid][category] = {}
            for kind in sorted(set(types) - {"good"}):
                pick = np.flatnonzero((types == "good") | (types == kind))
                out[tid][category][kind] = aupro(real.masks[pick].numpy(), real.maps[pick].numpy())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=ROOT / "results" / "data" / "synthetic")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "synthetic_selection.json")
    args = parser.parse_args()
    if not args.data.is_dir():
        sys.exit(f"no dataset at {args.data}: run `anoseg data synth {args.data}` first")
    from anoseg.assess import assess_config
    from anoseg.cache import FeatureCache
    from anoseg.holdout import Protocol
    from search.finalize import ranked_records
    from search.runner import start_search

    started = time.perf_counter()
    selection = {"protocol": "synthetic", "n_images": 20, "seed": args.seed, "top_k": 1000, "bootstrap": 0}
    with tempfile.TemporaryDirectory(prefix="anoseg-synthetic-") as folder:
        space = {**SPACE, "name": "synthetic-selection", "dataset": {**SPACE["dataset"], "root": str(args.data)},
                 "sampler": {"name": "random", "seed": args.seed}, "selection": selection,
                 "budget": {**SPACE["budget"], "trials": args.trials}}
        path = Path(folder) / "space.yaml"
        path.write_text(yaml.safe_dump(space))
        run = start_search(path, data=str(args.data), results=Path(folder) / "results")
        meta = run.read_meta()
        search_seconds = meta["wall_seconds"]
        categories = meta["categories"]
        entries = {e["trial_id"]: e for e in meta["final"]["trials"]}
        records = {r["trial_id"]: r for r in ranked_records(run.records(), METRIC, "max")}
        ids = [tid for tid in records if tid in entries]
        val = [entries[t]["validation"][METRIC] for t in ids]
        test = [entries[t]["test"][METRIC] for t in ids]
        result: dict = {"synthetic": {"overall": agreement(val, test), "per_category": {
            c: agreement([entries[t]["validation_per_category"][c][METRIC] for t in ids],
                         [entries[t]["test_per_category"][c][METRIC] for t in ids]) for c in categories}}}

        configs = {t: records[t]["config"] for t in ids}
        kinds = per_kind_aupro(configs, args.data, categories, meta["cache_dir"], selection)
        pairs = [(c, k) for c in categories for k in UNIMITATED.get(c, []) if k in kinds[ids[0]][c]]
        unimitated = [float(np.mean([kinds[t][c][k] for c, k in pairs])) for t in ids]
        result["unimitated"] = {"kinds": [f"{c}/{k}" for c, k in pairs], **agreement(val, unimitated)}
        result["per_kind"] = {
            f"{c}/{k}": agreement([entries[t]["validation_per_category"][c][METRIC] for t in ids],
                                  [kinds[t][c][k] for t in ids])["kendall_tau"]
            for c in categories for k in sorted(kinds[ids[0]][c])}

        few = {**selection, "protocol": "few_shot", "defects_per_type": 1}
        cache = FeatureCache(meta["cache_dir"])
        few_val, few_test = [], []
        for t in ids:
            assessed = assess_config(configs[t], args.data, categories, Protocol.from_selection(few), [METRIC], 0,
                                     args.seed, cache)
            few_val.append(float(np.mean([a.parts["validation"].metrics[METRIC] for a in assessed.values()])))
            few_test.append(float(np.mean([a.parts["test"].metrics[METRIC] for a in assessed.values()])))
        result["few_shot"] = {"defects_per_type": 1, **agreement(few_val, few_test)}
    targets = {"kendall_tau >= 0.5": result["unimitated"]["kendall_tau"] >= 0.5 and
               result["synthetic"]["overall"]["kendall_tau"] >= 0.5,
               "regret <= 0.02": result["unimitated"]["regret"] <= 0.02 and
               result["synthetic"]["overall"]["regret"] <= 0.02}
    report = {
        "bench": "synthetic_selection",
        "setting": {"metric": METRIC, "trials": args.trials, "completed": len(ids), "seed": args.seed,
                    "selection": selection, "image_size": 128, "data": "embedded dataset",
                    "space": "3 EfficientNet-Lites x layer subsets x padim/patchcore/gaussian_ad/feature_dictionary"},
        "machine": machine(),
        **result,
        "targets_met": targets,
        "search_wall_seconds": round(search_seconds, 1),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    text = json.dumps(report, indent=2)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
