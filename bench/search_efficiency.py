"""Search efficiency: how much compute each way of searching needs to find a configuration within
0.005 AUPRO of the best of the space, on the embedded dataset.

    python bench/search_efficiency.py [--seeds 0 1 2] [--time-limit 240] [--out bench/results/search_efficiency.json]

One fixed space (three EfficientNet-Lite backbones with their layer subsets x PaDiM / PatchCore x their
settings, 128 px, every category of the embedded dataset), searched by:

- ``default``: TPE + ASHA over categories + feature cache + dedup (what `anoseg search run` does);
- ``default+shares``: the same with ASHA rungs over 25% / 50% / 100% of the training images too;
- ``random``: random search, no early stopping, no feature cache, no dedup;
- ``grid``: every backbone x layer subset x head at the heads' default settings, each evaluated once on
  every category, one after another, no early stopping, no feature cache (anomalib's benchmark pipeline is
  such a loop), one thread each like a search trial with cpu: 1. The 16 configurations are run once; each
  seed orders them differently (a seeded shuffle),
  since the order is all a seed changes in a grid. (Optuna's grid sampler is not used: over a conditional
  space it enumerates every backbone's layer choice for every trial, so its first 16 points are not the 16
  configurations.)

Each search but the grid runs for the same wall-clock limit, two trials at a time, per seed. Compute =
trial-seconds (each trial's wall time, summed in the order the trials end). For each run the best
completed AUPRO is traced against cumulative trial-seconds and against wall seconds; the reference is the
best AUPRO any run reached; the compute to come within 0.005 of it is where each run's trace first gets
there (null: never). Prints one JSON object and draws the traces (`--png`, default next to `--out`).
"""
from __future__ import annotations

import argparse
import copy
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

BACKBONES = {
    "tf_efficientnet_lite0": [["blocks.1", "blocks.2"], ["blocks.2", "blocks.4"], ["blocks.1", "blocks.2", "blocks.4"]],
    "tf_efficientnet_lite1": [["blocks.1", "blocks.2"], ["blocks.2", "blocks.4"], ["blocks.1", "blocks.2", "blocks.4"]],
    "tf_efficientnet_lite2": [["blocks.1", "blocks.2"], ["blocks.2", "blocks.4"]],
}
HEADS = {
    "padim": {"n_features": {"type": "int", "low": 16, "high": 128, "step": 16}},
    "patchcore": {"coreset_ratio": {"type": "float", "low": 0.01, "high": 0.1, "step": 0.01},
                  "k": {"type": "categorical", "choices": [1, 3]}, "patch_size": 3},
}
TOLERANCE = 0.005
METRIC = "aupro"


def space_file(method: str, seed: int, data: str, time_limit: float) -> dict:
    space = {
        "name": f"{method}-{seed}".replace("+", "_"),
        "dataset": {"root": data, "categories": "all", "image_size": 128},
        "objective": [{"metric": METRIC, "mode": "max"}],
        "budget": {"trials": 1000, "max_concurrent": 2, "time_limit_s": time_limit},
        "resources": {"cpu": 1, "gpu": 0},
        "trial": {"batch_size": 16, "seed": 0, "device": "cpu"},
        "space": {"backbones": {b: {"weights": "offline", "layers": layers} for b, layers in BACKBONES.items()},
                  "heads": copy.deepcopy(HEADS)},
    }
    if method.startswith("default"):
        space["sampler"] = {"name": "tpe", "seed": seed, "multivariate": True, "constant_liar": True,
                            "n_startup_trials": 5}
        space["scheduler"] = {"name": "asha", "grace_period": 1, "reduction_factor": 2,
                              **({"train_shares": [0.25, 0.5, 1]} if method == "default+shares" else {})}
    elif method == "random":
        space.update(sampler={"name": "random", "seed": seed}, scheduler={"name": "none"}, dedup=False,
                     cache={"enabled": False})
    else:
        raise ValueError(method)
    return space


def trace(run_path: Path) -> dict:
    """Best completed AUPRO against cumulative trial-seconds and wall seconds, trials in the order they ended."""
    from search.run_dir import RunDir

    run = RunDir(run_path)
    meta = run.read_meta()
    records = [r for r in run.records() if r.get("ended") and r.get("started")]
    records.sort(key=lambda r: r["ended"])
    start = meta.get("last_start") or meta["created"]
    compute, best, points = 0.0, None, []
    for r in records:
        compute += r["ended"] - r["started"]
        value = (r.get("metrics") or {}).get(METRIC)
        if r.get("status") == "completed" and value is not None:
            best = value if best is None else max(best, value)
        points.append({"trial_seconds": round(compute, 2), "wall_seconds": round(r["ended"] - start, 2),
                       "best": best})
    counts: dict[str, int] = {}
    for r in records:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return {"trials": len(records), "statuses": counts, "duplicates": sum(bool(r.get("duplicate_of")) for r in records),
            "trial_seconds": round(compute, 2), "best": best, "trace": points}


def grid_configurations() -> list[dict]:
    """Every backbone x layer subset x head of the space, the heads at their default settings."""
    return [{"backbone": {"name": b, "weights": "offline"}, "layers": layers, "image_size": 128,
             "head": {"name": head}, "batch_size": 16, "seed": 0, "device": "cpu"}
            for b, subsets in BACKBONES.items() for layers in subsets for head in HEADS]


def run_grid(data: str, seeds: list[int]) -> dict[str, dict]:
    """Evaluate every grid configuration once (no cache, no early stopping), then trace each seed's order."""
    import numpy as np
    import torch

    from anoseg.trial import run_trial

    torch.set_num_threads(1)  # as a search trial with resources cpu: 1 runs (Ray sets one thread per CPU)
    trials = []
    for cfg in grid_configurations():
        started = time.time()
        result = run_trial(cfg, data)
        trials.append({"seconds": time.time() - started, METRIC: result.mean[METRIC],
                       "config": f"{cfg['backbone']['name']} {'+'.join(cfg['layers'])} {cfg['head']['name']}"})
        print(f"grid: {trials[-1]['config']}: {METRIC} {trials[-1][METRIC]:.4f} in {trials[-1]['seconds']:.1f} s",
              file=sys.stderr, flush=True)
    runs = {}
    for seed in seeds:
        order = np.random.default_rng(seed).permutation(len(trials))
        compute, best, points = 0.0, None, []
        for i in order:
            compute += trials[i]["seconds"]
            best = trials[i][METRIC] if best is None else max(best, trials[i][METRIC])
            points.append({"trial_seconds": round(compute, 2), "wall_seconds": round(compute, 2), "best": best})
        runs[str(seed)] = {"trials": len(trials), "statuses": {"completed": len(trials)}, "duplicates": 0,
                           "trial_seconds": round(compute, 2), "best": best, "trace": points,
                           "search_wall_seconds": round(compute, 1)}
    runs["configurations"] = trials  # type: ignore[assignment]
    return runs


def compute_to_reach(points: list[dict], target: float, key: str) -> float | None:
    for p in points:
        if p["best"] is not None and p["best"] >= target:
            return p[key]
    return None


def draw(result: dict, png: Path) -> None:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    colours = {"default": "#2c6fbb", "default+shares": "#17becf", "random": "#ff7f0e", "grid": "#7f7f7f"}
    fig = make_subplots(rows=1, cols=2, subplot_titles=("best AUPRO vs cumulative trial-seconds",
                                                       "best AUPRO vs wall seconds"))
    for method, runs in result["runs"].items():
        for i, (seed, run) in enumerate(runs.items()):
            pts = [p for p in run["trace"] if p["best"] is not None]
            for col, key in ((1, "trial_seconds"), (2, "wall_seconds")):
                fig.add_trace(go.Scatter(x=[p[key] for p in pts], y=[p["best"] for p in pts], mode="lines",
                                         line={"shape": "hv", "color": colours[method]}, name=method,
                                         legendgroup=method, showlegend=(i == 0 and col == 1), opacity=0.8),
                              row=1, col=col)
    target = result["reference_best"] - TOLERANCE
    for col in (1, 2):
        fig.add_hline(y=target, line={"dash": "dot", "color": "black"}, row=1, col=col)
    fig.update_yaxes(title="best completed AUPRO", row=1, col=1)
    fig.update_xaxes(title="trial-seconds", row=1, col=1)
    fig.update_xaxes(title="wall seconds", row=1, col=2)
    fig.update_layout(template="plotly_white", width=1200, height=480,
                      title=f"search efficiency (dotted: reference best - {TOLERANCE})")
    screenshot(fig, png)


def screenshot(fig, png: Path, chromium: str = "/usr/bin/chromium") -> None:
    """The figure as a PNG, drawn by Debian's Chromium through Playwright (no kaleido, no browser download)."""
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as folder, sync_playwright() as pw:
        html = Path(folder) / "figure.html"
        fig.write_html(str(html), include_plotlyjs=True, full_html=True)
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": fig.layout.width, "height": fig.layout.height})
        page.goto(html.as_uri())
        page.wait_for_selector(".main-svg")
        page.screenshot(path=str(png))
        browser.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["default", "default+shares", "random", "grid"])
    parser.add_argument("--time-limit", type=float, default=240, help="wall seconds per search (not the grid)")
    parser.add_argument("--data", help="dataset root (default: the embedded dataset, generated into a temp folder)")
    parser.add_argument("--out", help="write the JSON here too")
    parser.add_argument("--png", help="draw the traces here (default: --out with .png)")
    parser.add_argument("--merge", help="a previous output: keep its runs of the methods not run now")
    args = parser.parse_args(argv)

    import ray

    from search.runner import start_search
    from search.tune_adapter import init_ray

    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        data = args.data
        if data is None:
            from anoseg.data.synthetic import generate

            data = str(work / "data")
            generate(data, seed=0, image_size=128)
        searched = [m for m in args.methods if m != "grid"]
        runs: dict[str, dict[str, dict]] = {m: {} for m in args.methods}
        if "grid" in args.methods:
            runs["grid"] = run_grid(data, args.seeds)
        if searched:
            init_ray(None)
        for seed in args.seeds:  # methods alternate within a seed, so machine noise hits all of them
            for method in searched:
                path = work / f"{method}-{seed}.yaml"
                path.write_text(yaml.safe_dump(space_file(method, seed, data, args.time_limit)))
                started = time.time()
                run = start_search(path, results=work / "results", name=f"{method}-{seed}".replace("+", "_"))
                runs[method][str(seed)] = {**trace(run.path), "search_wall_seconds": round(time.time() - started, 1)}
                print(f"{method} seed {seed}: best {runs[method][str(seed)]['best']}, "
                      f"{runs[method][str(seed)]['trials']} trials", file=sys.stderr, flush=True)
        ray.shutdown()

    if args.merge:
        previous = json.loads(Path(args.merge).read_text())
        runs = {**{m: r for m, r in previous["runs"].items() if m not in runs}, **runs}
    grid_configs = runs.get("grid", {}).pop("configurations", None)
    reference = max(run["best"] for by_seed in runs.values() for run in by_seed.values() if run["best"] is not None)
    target = reference - TOLERANCE
    summary = {}
    for method, by_seed in runs.items():
        needs = [compute_to_reach(run["trace"], target, "trial_seconds") for run in by_seed.values()]
        walls = [compute_to_reach(run["trace"], target, "wall_seconds") for run in by_seed.values()]
        reached = [n for n in needs if n is not None]
        summary[method] = {
            "reached_target": f"{len(reached)}/{len(needs)} seeds",
            "trial_seconds_to_target": needs, "wall_seconds_to_target": walls,
            "median_trial_seconds_to_target": statistics.median(reached) if len(reached) == len(needs) else None,
            "best": [run["best"] for run in by_seed.values()],
            "trials": [run["trials"] for run in by_seed.values()],
            "duplicates": [run["duplicates"] for run in by_seed.values()],
        }
    ratios = {}
    base = summary.get("default", {}).get("median_trial_seconds_to_target")
    for method, s in summary.items():
        if method == "default" or not base:
            continue
        if s["median_trial_seconds_to_target"]:
            ratios[f"default / {method}"] = round(base / s["median_trial_seconds_to_target"], 3)
        else:  # the method never got there: its whole compute is a lower bound of what it needs
            spent = statistics.median(run["trial_seconds"] for run in runs[method].values())
            ratios[f"default / {method} (never reached; against all it spent)"] = round(base / spent, 3)
    git = __import__("subprocess").run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                       text=True).stdout.strip()
    result = {
        "benchmark": "search_efficiency",
        "setting": {"seeds": args.seeds, "time_limit_s": args.time_limit, "max_concurrent": 2, "image_size": 128,
                    "tolerance": TOLERANCE, "backbones": BACKBONES, "heads": HEADS, "commit": git},
        "machine": machine(),
        "reference_best": reference,
        "summary": summary,
        "compute_ratios (trial-seconds to target)": ratios,
        "grid_configurations": grid_configs,
        "runs": runs,
    }
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
        png = Path(args.png or Path(args.out).with_suffix(".png"))
        try:
            draw(result, png)
        except Exception as exc:  # noqa: BLE001 - the figures are in the JSON either way
            print(f"could not draw {png}: {exc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
