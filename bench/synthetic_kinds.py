"""Which generated defect kinds rank configurations as the real defects do, on textures and on objects?

    python bench/synthetic_kinds.py [--configs 29] [--seed 0] [--out bench/results/synthetic_kinds.json]

The follow-up study of bench/synthetic_selection.py. ``--configs`` distinct configurations drawn at random
(Optuna's random sampler) from the same diverse space; each is fitted once per category of the embedded
dataset (128 px) without the 20 training images the synthetic protocol holds out, then scored on the real
test images and on one synthetic set per generator kind (the 20 held-out good images, and one defect of
that kind on each). Per category and candidate kind set (each kind alone, and all kinds together) the
trials' synthetic AUPRO is compared with their real test AUPRO: Kendall tau and the regret (real AUPRO of
the best trial by real test minus that of the trial chosen on the synthetic set).

Choosing the kinds on the same real defects one then reports would repeat the selection bias this round
removes, so each category's kind set is chosen leave-one-category-out: the set with the highest mean tau
on the *other* categories of its type (textures: brick, grass, gravel; objects: board, washer). The
``loco`` figures use those choices; ``all_kinds`` is the default (every kind).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine_info import machine  # noqa: E402
from synthetic_selection import SPACE, agreement  # noqa: E402

TYPES = {"brick": "texture", "grass": "texture", "gravel": "texture", "board": "object", "washer": "object"}
METRIC = "aupro"


def draw_configs(n: int, seed: int) -> list[dict]:
    """`n` configurations with distinct effective forms, drawn by Optuna's random sampler from SPACE."""
    import optuna

    from anoseg.trial import config_key, effective_config
    from search.space_optuna import define_by_run, trial_config
    from search.space_schema import validate_space

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = validate_space({**SPACE, "name": "kinds", "dataset": {**SPACE["dataset"], "root": "unused"}})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    suggest, configs, keys = define_by_run(space), [], set()
    while len(configs) < n:
        trial = study.ask()
        suggest(trial)
        cfg = trial_config(space, trial.params)
        key = config_key(effective_config(cfg))
        study.tell(trial, 0.0)
        if key not in keys:
            keys.add(key)
            configs.append(cfg)
    return configs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", type=int, default=29)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=ROOT / "results" / "data" / "synthetic")
    parser.add_argument("--cache", type=Path, default=None, help="a feature cache folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "synthetic_kinds.json")
    args = parser.parse_args()
    import tempfile

    import torch

    from anoseg.anomalies import KINDS
    from anoseg.backbones import create_backbone
    from anoseg.cache import FeatureCache
    from anoseg.config import TrialConfig
    from anoseg.heads import create_head
    from anoseg.holdout import Protocol
    from anoseg.metrics import aupro
    from anoseg.pipeline import FeatureSource, ScoredImages, fit_category, score_synthetic, score_test

    torch.set_num_threads(2)
    started = time.perf_counter()
    categories = list(TYPES)
    base = Protocol("synthetic", n_images=20, seed=args.seed)
    by_kind = {kind: Protocol("synthetic", n_images=20, seed=args.seed, kinds=(kind,)) for kind in KINDS}
    configs = draw_configs(args.configs, args.seed)
    # values[candidate][category] = per-config synthetic AUPRO; real[category] = per-config real AUPRO
    candidates = [*KINDS, "all"]
    values = {c: {cat: [] for cat in categories} for c in candidates}
    real = {cat: [] for cat in categories}
    with tempfile.TemporaryDirectory(prefix="anoseg-kinds-") as folder:
        cache = FeatureCache(args.cache or folder)
        for i, raw in enumerate(configs):
            cfg = TrialConfig.from_dict(raw)
            source = FeatureSource(create_backbone(cfg.backbone.name, cfg.layers, cfg.backbone.weights), cfg,
                                   torch.device("cpu"), cache)
            for cat in categories:
                head = create_head(cfg.head_name, **cfg.head_params)
                fit_category(head, source, args.data, cat, protocol=base)
                scored = score_test(head, source, args.data, cat)
                real[cat].append(aupro(scored.masks.numpy(), scored.maps.numpy()))
                sets = {kind: score_synthetic(head, source, args.data, cat, protocol) for kind, protocol in by_kind.items()}
                for kind, s in sets.items():
                    values[kind][cat].append(aupro(s.masks.numpy(), s.maps.numpy()))
                n = len(sets[KINDS[0]].labels) // 2  # the same good bases in every kind's set
                defects = [s.subset(np.arange(n, 2 * n)) for s in sets.values()]
                union = ScoredImages.join([sets[KINDS[0]].subset(np.arange(n)), *defects])
                values["all"][cat].append(aupro(union.masks.numpy(), union.maps.numpy()))
            print(f"[{i + 1}/{len(configs)}] {cfg.backbone.name} {'+'.join(cfg.layers)} {cfg.head_name}", flush=True)

    table = {c: {cat: agreement(values[c][cat], real[cat]) for cat in categories} for c in candidates}
    loco_choice = {}
    for cat in categories:
        others = [o for o in categories if o != cat and TYPES[o] == TYPES[cat]]
        loco_choice[cat] = max(candidates, key=lambda c: np.mean([table[c][o]["kendall_tau"] for o in others]))
    real_mean = list(np.mean([real[cat] for cat in categories], axis=0))

    def overall(choice: dict[str, str]) -> dict:
        synthetic = list(np.mean([values[choice[cat]][cat] for cat in categories], axis=0))
        return agreement(synthetic, real_mean)

    report = {
        "bench": "synthetic_kinds",
        "setting": {"configs": len(configs), "seed": args.seed, "n_images": 20, "image_size": 128, "metric": METRIC,
                    "types": TYPES},
        "machine": machine(),
        "per_kind": {c: {cat: table[c][cat]["kendall_tau"] for cat in categories} for c in candidates},
        "per_kind_regret": {c: {cat: table[c][cat]["regret"] for cat in categories} for c in candidates},
        "per_type_mean_tau": {c: {t: round(float(np.mean([table[c][cat]["kendall_tau"] for cat in categories
                                                          if TYPES[cat] == t])), 4) for t in ("texture", "object")}
                              for c in candidates},
        "loco_choice": loco_choice,
        "loco": {"per_category": {cat: table[loco_choice[cat]][cat] for cat in categories},
                 "overall": overall(loco_choice)},
        "all_kinds": {"per_category": {cat: table["all"][cat] for cat in categories},
                      "overall": overall({cat: "all" for cat in categories})},
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    text = json.dumps(report, indent=2)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
