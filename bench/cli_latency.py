"""Latency of the run-folder readers: `anoseg search status`, `anoseg export` and `anoseg dashboard
--examples 0` on a finished run, each as a whole process, several times, medians.

    python bench/cli_latency.py --run results/quick-XXXX [--repeats 5] [--out bench/results/cli_latency.json]
        [--before-root /path/to/older/checkout --before-run /path/to/its/run]

Run it on the folder a `make demo` left. Prints one JSON object: the setting, the machine, per command
its wall times, median and which of torch / timm / torchvision / ray it imported (read from
`python -X importtime`). With --before-root, the same commands of an older checkout of anoseg (imported
from there through PYTHONPATH, on its own run folder) are timed side by side and the ratios given. The
commands alternate (status, export, dashboard, status, ...; before, after) so machine noise hits all.
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


def time_command(args: list[str], root: Path = ROOT) -> tuple[float, set[str]]:
    """Wall seconds of `python -X importtime -m anoseg.cli ARGS` with anoseg from `root`, and which heavy
    packages it imported."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(root)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "anoseg.cli", *args], cwd=root,
                          capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"anoseg {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}")
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    return seconds, {name for name in HEAVY if name in imported}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a finished search run folder (e.g. the one `make demo` wrote)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--before-root", help="an older checkout of this project to time side by side")
    parser.add_argument("--before-run", help="a finished run folder written by that checkout")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    variants = {"after": (ROOT, Path(args.run).resolve())}
    if args.before_root:
        if not args.before_run:
            parser.error("--before-root needs --before-run")
        variants = {"before": (Path(args.before_root).resolve(), Path(args.before_run).resolve()), **variants}
    for _, run in variants.values():
        if not (run / "run.json").is_file():
            parser.error(f"{run} is not a search run folder (no run.json); run `make demo` first")
    times: dict[str, dict[str, list[float]]] = {v: {} for v in variants}
    heavy: dict[str, dict[str, list[str]]] = {v: {} for v in variants}
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(args.repeats):
            for variant, (root, run) in variants.items():
                for name, cmd in commands(run, Path(folder)).items():
                    seconds, imported = time_command(cmd, root)
                    times[variant].setdefault(name, []).append(round(seconds, 3))
                    heavy[variant][name] = sorted(imported)

    def commit(root: Path) -> str:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True).stdout.strip()

    result = {
        "benchmark": "cli_latency",
        "setting": {"repeats": args.repeats,
                    **{v: {"root": str(root), "commit": commit(root), "run": str(run),
                           "trials": len(list((run / "trials").glob("*.json")))} for v, (root, run) in variants.items()}},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        **{variant: {name: {"median_s": round(statistics.median(ts), 3), "min_s": min(ts), "max_s": max(ts),
                            "seconds": ts, "heavy_imports": heavy[variant][name]} for name, ts in by_name.items()}
           for variant, by_name in times.items()},
    }
    if "before" in times:
        result["speed-up (before / after median)"] = {
            name: round(statistics.median(times["before"][name]) / statistics.median(times["after"][name]), 2)
            for name in times["after"]}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
