"""`anoseg search run | status | resume | finalize`, `anoseg weights list | fetch`, `anoseg export` and `anoseg dashboard`,
plugged into the anoseg CLI through an entry point."""
from __future__ import annotations

import argparse
import sys

from anoseg.metrics import METRIC_NAMES


def cmd_run(args: argparse.Namespace) -> int:
    from search.runner import start_search, summary

    run = start_search(args.space, data=args.data, name=args.name, results=args.results, address=args.address,
                       skip_missing_backbones=args.skip_missing_backbones)
    print(summary(run))
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from search.runner import resume_search, summary

    run = resume_search(args.run, address=args.address)
    print(summary(run))
    return 0


def cmd_finalize(args: argparse.Namespace) -> int:
    from search.finalize import finalize_run
    from search.run_dir import RunDir
    from search.runner import summary

    run = RunDir.open(args.run)
    finalize_run(run, top_k=args.top_k)
    print(summary(run))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from search.run_dir import RunDir
    from search.runner import summary

    print(summary(RunDir.open(args.run)))
    return 0


def cmd_weights_list(args: argparse.Namespace) -> int:
    from search.space_weights import list_command

    list_command(args.items, args.cache)
    return 0


def cmd_weights_fetch(args: argparse.Namespace) -> int:
    from search.space_weights import fetch_command

    fetch_command(args.items, args.cache)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from search.export import export_run

    result = export_run(args.run, args.out, objective=args.objective, mode=args.mode, per_category=args.per_category)
    print(result.summary())
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from pathlib import Path

    from search.dashboard import write_dashboard

    path = write_dashboard(args.run, Path(args.out) if args.out else None, examples=args.examples)
    print(f"wrote {path}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `search` command group to the anoseg CLI."""
    search = sub.add_parser("search", help="architecture / hyper-parameter search with Ray Tune + Optuna")
    commands = search.add_subparsers(dest="search_command", required=True)

    run = commands.add_parser("run", help="start a search from a space file")
    run.add_argument("space", help="search space YAML, e.g. spaces/quick.yaml")
    run.add_argument("--data", help="dataset root (overrides dataset.root of the space)")
    run.add_argument("--name", help="run name: results go to <results>/<name>/ (default: the space's name)")
    run.add_argument("--results", default="results", help="folder holding run folders (default: results)")
    run.add_argument("--address", help="Ray cluster address (e.g. auto); default: an embedded Ray on this machine")
    run.add_argument("--skip-missing-backbones", action="store_true",
                     help="drop the backbones whose weights the preflight finds missing (on any node) from the space "
                          "instead of refusing to start")
    run.set_defaults(func=cmd_run)

    status = commands.add_parser("status", help="trials done / running / failed and the best so far")
    status.add_argument("run", help="run folder, e.g. results/quick")
    status.set_defaults(func=cmd_status)

    resume = commands.add_parser("resume", help="continue a killed or interrupted search")
    resume.add_argument("run", help="run folder, e.g. results/quick")
    resume.add_argument("--address", help="Ray cluster address (default: the one the run started with)")
    resume.set_defaults(func=cmd_resume)

    finalize = commands.add_parser("finalize", help="evaluate a run's chosen trials once on the test part, with "
                                   "intervals and ties (done when a search finishes; for a stopped run, or again)")
    finalize.add_argument("run", help="run folder, e.g. results/quick")
    finalize.add_argument("--top-k", type=int, help="finalise this many trials by the first objective (default: "
                          "the space's selection.top_k)")
    finalize.set_defaults(func=cmd_finalize)

    weights = sub.add_parser("weights", help="the backbone weights of search spaces: where from, whether here, "
                             "fetch them into the caches").add_subparsers(dest="weights_command", required=True)
    listing = weights.add_parser("list", help="per backbone of a space: where its weights come from and whether "
                                 "they are on this machine (no network)")
    listing.add_argument("items", nargs="+", metavar="SPACE_OR_BACKBONE",
                         help="space files (their backbones with their weights) or backbone names (hub weights)")
    listing.add_argument("--cache", metavar="DIR", help="look in DIR/torch and DIR/huggingface/hub instead of the "
                         "torch / Hugging Face caches (as written by `weights fetch --cache DIR`)")
    listing.set_defaults(func=cmd_weights_list)
    fetch = weights.add_parser("fetch", help="download every weight the spaces need into the torch / Hugging Face "
                               "caches (on a machine with network), printing what and how large")
    fetch.add_argument("items", nargs="+", metavar="SPACE_OR_BACKBONE",
                       help="space files (their backbones with their weights) or backbone names (hub weights)")
    fetch.add_argument("--cache", metavar="DIR", help="download into DIR/torch and DIR/huggingface/hub (the layout "
                       "of ~/.cache: mount it on the workers, or set XDG_CACHE_HOME=DIR there)")
    fetch.set_defaults(func=cmd_weights_fetch)

    export = sub.add_parser("export", help="write a search run's best configuration (YAML with metrics and provenance)")
    export.add_argument("run", help="run folder, e.g. results/quick")
    export.add_argument("--out", required=True, help="YAML file to write, e.g. best.yaml")
    export.add_argument("--objective", help="rank by this metric instead of the run's objective(s): "
                        + ", ".join(METRIC_NAMES))
    export.add_argument("--mode", choices=["max", "min"], help="max or min (default: the run's, or the metric's natural one)")
    export.add_argument("--per-category", action="store_true",
                        help="the best trial of each category (by <category>/<metric>), under `categories:`")
    export.set_defaults(func=cmd_export)

    dashboard = sub.add_parser("dashboard", help="write a run's self-contained HTML dashboard")
    dashboard.add_argument("run", help="run folder, e.g. results/quick")
    dashboard.add_argument("--out", help="HTML file to write (default: in the run folder)")
    dashboard.add_argument("--examples", type=int, default=4, help="example anomaly maps of the best trial (default 4)")
    dashboard.set_defaults(func=cmd_dashboard)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: anoseg search ...")
