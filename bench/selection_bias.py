"""Selection bias: how much choosing on the images one reports inflates the reported figure.

    python bench/selection_bias.py [--seeds 0 1 2] [--trials 20] [--out bench/results/selection_bias.json]

For each seed: the demo search (spaces/quick.yaml: three EfficientNet-Lites x layer subsets x PaDiM /
PatchCore, TPE, 128 px, every category of the embedded dataset) without early stopping (so that every trial
completes and competes; ``--asha`` keeps the demo's ASHA) under the holdout protocol with that seed for the
sampler and the split, then every completed trial finalised (top_k = all): each is fitted once more and
scored on the validation part and on the test part of every category.

- ``holdout``: the test-part AUPRO of the trial chosen on the validation part: what the holdout protocol
  reports.
- ``selected_on_test``: the best test-part AUPRO over the same trials: what ``protocol: test`` reports when
  it ranks and reports on the same images (here the test part, so both figures are on the same images and
  the difference is the selection alone).
- ``optimism`` = selected_on_test - holdout; ``validation_gap`` = the chosen trial's validation AUPRO minus
  its test AUPRO (what reporting the figure it was chosen on would add); ``tied``: trials whose paired
  bootstrap difference with the validation-best holds 0; ``bootstrap_share``: bootstrap seconds / search wall
  seconds.

Prints one JSON object (medians over seeds and every seed's figures) and writes it to ``--out``.
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

from machine_info import machine  # noqa: E402

METRIC = "aupro"


def run_seed(seed: int, trials: int, data: Path, folder: Path, asha: bool) -> dict:
    from search.finalize import finalize_run
    from search.runner import start_search

    space = yaml.safe_load((ROOT / "spaces" / "quick.yaml").read_text())
    space["name"] = f"bias-{seed}"
    space["sampler"]["seed"] = seed
    space["budget"]["trials"] = trials
    if not asha:
        space["scheduler"] = {"name": "none"}
    space["selection"] = {"protocol": "holdout", "validation_share": 0.5, "seed": seed, "top_k": 1000,
                          "bootstrap": 200}
    path = folder / f"bias-{seed}.yaml"
    path.write_text(yaml.safe_dump(space))
    started = time.perf_counter()
    run = start_search(path, data=str(data), results=folder / "results")
    search_seconds = run.read_meta()["wall_seconds"]
    final = finalize_run(run, progress=lambda _msg: None) if "final" not in run.read_meta() else run.read_meta()["final"]
    entries = final["trials"]
    chosen = next(e for e in entries if e["trial_id"] == final["chosen"])
    by_test = max(entries, key=lambda e: e["test"][METRIC])
    return {
        "seed": seed,
        "finalised_trials": len(entries),
        "holdout": round(chosen["test"][METRIC], 4),
        "selected_on_test": round(by_test["test"][METRIC], 4),
        "optimism": round(by_test["test"][METRIC] - chosen["test"][METRIC], 4),
        "chosen_validation": round(chosen["validation"][METRIC], 4),
        "validation_gap": round(chosen["validation"][METRIC] - chosen["test"][METRIC], 4),
        "chosen_test_interval": [round(v, 4) for v in chosen["test_interval"][METRIC]],
        "same_trial": chosen["trial_id"] == by_test["trial_id"],
        "tied_with_validation_best": sum(bool(e.get("tied")) for e in entries) - 1,
        "test_best_was_tied_on_validation": bool(by_test.get("tied")),
        "search_wall_seconds": round(search_seconds, 1),
        "bootstrap_seconds": final["bootstrap_seconds"],
        "bootstrap_share": round(final["bootstrap_seconds"] / search_seconds, 4),
        "wall_seconds": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--asha", action="store_true", help="keep the demo's ASHA (fewer trials complete)")
    parser.add_argument("--data", type=Path, default=ROOT / "results" / "data" / "synthetic")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "selection_bias.json")
    args = parser.parse_args()
    if not args.data.is_dir():
        sys.exit(f"no dataset at {args.data}: run `anoseg data synth {args.data}` first")
    with tempfile.TemporaryDirectory(prefix="anoseg-bias-") as folder:
        runs = [run_seed(seed, args.trials, args.data, Path(folder), args.asha) for seed in args.seeds]
    summary = {key: round(statistics.median(r[key] for r in runs), 4)
               for key in ("holdout", "selected_on_test", "optimism", "validation_gap", "bootstrap_share")}
    result = {
        "bench": "selection_bias",
        "setting": {"space": "spaces/quick.yaml", "scheduler": "asha" if args.asha else "none", "metric": METRIC, "trials": args.trials, "seeds": args.seeds,
                    "validation_share": 0.5, "bootstrap": 200, "data": "embedded dataset, 128 px"},
        "machine": machine(),
        "median": summary,
        "runs": runs,
    }
    text = json.dumps(result, indent=2)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
