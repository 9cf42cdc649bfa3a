"""Search throughput: the demo space, N trials, feature cache off vs on, in one run.

    python bench/search_throughput.py [--trials 20] [--repeats 3] [--space spaces/quick.yaml]

Prints one JSON object: the setting, the machine, and per mode the wall time, trials/hour,
the share of wall time spent outside trials (actor start, suggest, reporting, collation; Ray
itself is started once before timing), the median trial wall time, and the on/off ratio. Modes
alternate (off, on, off, on, ...) so machine noise hits both; each mode starts from an empty
cache and an empty run folder, and both modes use the same seed, so they run the same trials
(as far as the sampler sees the same results: cache-on metrics equal cache-off metrics).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from search.run_dir import RunDir  # noqa: E402
from search.runner import start_search  # noqa: E402
from machine_info import machine  # noqa: E402


def one_search(space_file: Path, data: str, trials: int, cache: bool, workdir: Path, tag: str) -> dict:
    raw = yaml.safe_load(space_file.read_text())
    raw["budget"] = {**raw.get("budget", {}), "trials": trials, "time_limit_s": None}
    raw["cache"] = {"enabled": cache, "path": None, "max_gb": 20}
    raw["name"] = tag
    space = workdir / f"{tag}.yaml"
    space.write_text(yaml.safe_dump(raw))
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # the search's progress lines; stdout is the JSON
        run = start_search(space, data=data, results=workdir / "results")
    wall = time.perf_counter() - start
    df = RunDir(run.path).table()
    concurrency = raw["budget"].get("max_concurrent", 1)
    busy = df["wall_seconds"].sum()
    return {
        "wall_s": round(wall, 2),
        "trials_finished": int(df["status"].isin(["completed", "stopped", "failed"]).sum()),
        "trials_per_hour": round(len(df) / wall * 3600, 1),
        "median_trial_wall_s": round(float(df["wall_seconds"].median()), 3),
        "outside_trials_share": round(max(0.0, 1 - busy / concurrency / wall), 3),
        "best_aupro": round(float(df.loc[df["status"] == "completed", "aupro"].max()), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--space", default=str(ROOT / "spaces" / "quick.yaml"))
    parser.add_argument("--data", default=str(ROOT / "results" / "data" / "synthetic"))
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not Path(args.data).is_dir():
        from anoseg.data.synthetic import generate

        generate(args.data)
    from search.tune_adapter import init_ray

    init_ray(None)  # started once, before timing: both modes run on the same warm Ray
    runs: dict[str, list[dict]] = {"cache_off": [], "cache_on": []}
    with tempfile.TemporaryDirectory(prefix="anoseg-bench-") as tmp:
        for rep in range(args.repeats):
            for mode in ("cache_off", "cache_on"):
                workdir = Path(tmp) / f"{mode}-{rep}"
                workdir.mkdir()
                runs[mode].append(one_search(Path(args.space), args.data, args.trials, mode == "cache_on", workdir,
                                             f"{mode}-{rep}"))
                shutil.rmtree(workdir / "results", ignore_errors=True)
    med = {mode: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for mode, rs in runs.items()}
    print(json.dumps({
        "benchmark": "search_throughput",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "setting": {"space": os.path.relpath(args.space, ROOT), "trials": args.trials, "repeats": args.repeats,
                    "data": os.path.relpath(args.data, ROOT)},
        "machine": machine(),
        "median": med,
        "runs": runs,
        "ratio_trials_per_hour_on_over_off": round(med["cache_on"]["trials_per_hour"] / med["cache_off"]["trials_per_hour"], 2),
    }, indent=2))


if __name__ == "__main__":
    main()
