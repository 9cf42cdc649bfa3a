"""Latency of the run-folder readers: `anoseg search status`, `anoseg export` and `anoseg dashboard
--examples 0` on a finished run, each as a whole process, several times, medians.

    python bench/cli_latency.py --run results/quick-XXXX [--repeats 5] [--out bench/results/cli_latency.json]

Run it on the folder a `make demo` left. Prints one JSON object: the setting, the machine, per command
its wall times, median and whether torch / ray were imported (read from `python -X importtime`).
The commands alternate (status, export, dashboard, status, ...) so machine noise hits all of them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "ray", "timm", "torchvision")


def commands(run: Path, scratch: Path) -> dict[str, list[str]]:
    return {
        "search status": ["search", "status", str(run)],
        "export": ["export", str(run), "--out", str(scratch / "best.yaml")],
        "dashboard (no examples)": ["dashboard", str(run), "--out", str(scratch / "dashboard.html"), "--examples", "0"],
    }


def time_command(args: list[str]) -> tuple[float, set[str]]:
    """Wall seconds of `python -X importtime -m anoseg.cli ARGS` and which heavy packages it imported."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "anoseg.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"anoseg {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}")
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    return seconds, {name for name in HEAVY if name in imported}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a finished search run folder (e.g. the one `make demo` wrote)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    run = Path(args.run)
    if not (run / "run.json").is_file():
        parser.error(f"{run} is not a search run folder (no run.json); run `make demo` first")
    times: dict[str, list[float]] = {}
    heavy: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory() as folder:
        cmds = commands(run, Path(folder))
        for _ in range(args.repeats):
            for name, cmd in cmds.items():
                seconds, imported = time_command(cmd)
                times.setdefault(name, []).append(round(seconds, 3))
                heavy[name] = sorted(imported)
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    result = {
        "benchmark": "cli_latency",
        "setting": {"run": str(run), "trials": len(list((run / "trials").glob("*.json"))), "repeats": args.repeats,
                    "commit": git},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "commands": {name: {"median_s": round(statistics.median(ts), 3), "min_s": min(ts), "max_s": max(ts),
                            "seconds": ts, "heavy_imports": heavy[name]} for name, ts in times.items()},
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
