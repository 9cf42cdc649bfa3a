"""The `anoseg` command line: data, backbones, heads, evaluate, plus command groups from plugins.

Other packages add command groups through the `anoseg.commands` entry point
(a function taking the sub-parser collection); that is how `search` plugs in
without `anoseg` importing it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from importlib.metadata import entry_points
from typing import Any, Sequence

from anoseg.errors import AnosegError

TABLE_COLUMNS = (  # (result key, header, number format)
    ("image_auroc", "img AUROC", ".3f"),
    ("pixel_auroc", "px AUROC", ".3f"),
    ("aupro", "AUPRO@0.3", ".3f"),
    ("pixel_f1_max", "px F1max", ".3f"),
    ("fit_seconds", "fit s", ".2f"),
    ("ms_per_image", "ms/img", ".1f"),
)


def format_table(per_category: dict[str, dict[str, float]], mean: dict[str, float]) -> str:
    """A fixed-width table: one row per category plus the mean row."""
    width = max(8, *(len(c) for c in per_category))
    header = f"{'category':<{width}}  " + "  ".join(f"{title:>9}" for _, title, _ in TABLE_COLUMNS)
    rule = "-" * len(header)
    rows = [header, rule]
    for name, metrics in [*per_category.items(), (None, None), ("mean", mean)]:
        if name is None:
            rows.append(rule)
            continue
        cells = [f"{'-':>9}" if metrics.get(key) is None else f"{metrics[key]:>9{fmt}}" for key, _, fmt in TABLE_COLUMNS]
        rows.append(f"{name:<{width}}  " + "  ".join(cells))
    return "\n".join(rows)


def cmd_data_synth(args: argparse.Namespace) -> int:
    from anoseg.data.synthetic import generate

    categories = args.categories.split(",") if args.categories else None
    written = generate(
        args.out, seed=args.seed, categories=categories, image_size=args.size,
        n_train=args.train, n_test_good=args.test_good, n_test_per_defect=args.test_per_defect,
        overwrite=args.overwrite,
    )
    print(f"wrote {len(written)} categories ({', '.join(written)}) to {args.out}")
    return 0


def cmd_backbones(args: argparse.Namespace) -> int:
    from anoseg.backbones import backbone_layers, list_backbones

    if args.layers:
        layers = backbone_layers(args.layers)
        print(f"{args.layers}: {len(layers)} selectable layers")
        print(f"  {'layer':<16} {'channels':>8} {'stride':>6}")
        for info in layers:
            print(f"  {info.name:<16} {info.channels:>8} {info.stride:>6}")
        return 0
    infos = list_backbones()
    width = max(len(b.name) for b in infos)
    print(f"{'backbone':<{width}}  {'family':<25} offline weights")
    for info in infos:
        print(f"{info.name:<{width}}  {info.family:<25} {'yes' if info.offline_weights else 'no (hub, file or none)'}")
    print("\nweights: offline | hub | none | /path/to/file.pth   (layers: anoseg backbones --layers NAME)")
    return 0


def cmd_heads(args: argparse.Namespace) -> int:
    from anoseg.heads import HEADS, head_defaults

    for name in sorted(HEADS):
        params = ", ".join(f"{k}={v!r}" for k, v in head_defaults(name).items())
        print(f"{name}: {params}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from anoseg.config import load_config
    from anoseg.data import resolve_categories
    from anoseg.trial import run_trial

    cfg = load_config(args.config)
    if args.device:
        cfg = type(cfg).from_dict({**cfg.to_dict(), "device": args.device}, source=str(args.config))
    categories = resolve_categories(args.data, args.categories)
    if cfg.backbone.weights == "none":
        print("note: weights: none -> random-init backbone; results say nothing about pretrained quality", file=sys.stderr)

    def progress(metrics: dict[str, Any], step: int) -> None:
        cat = metrics["category"]
        print(
            f"[{step}/{len(categories)}] {cat}: image AUROC {metrics[f'{cat}/image_auroc']:.3f}, "
            f"pixel AUROC {metrics[f'{cat}/pixel_auroc']:.3f}, AUPRO {metrics[f'{cat}/aupro']:.3f}",
            file=sys.stderr, flush=True,
        )

    result = run_trial(cfg, args.data, categories, report=progress)
    print(f"backbone {cfg.backbone.name} ({result['weights']}), layers {', '.join(cfg.layers)}, "
          f"head {cfg.head_name}, image size {cfg.image_size}")
    print(format_table(result["categories"], result["mean"]))
    print(f"peak memory: {result['peak_memory']['peak_rss_mb']:.0f} MiB RSS"
          + (f", {result['peak_memory']['peak_gpu_mb']:.0f} MiB GPU" if result["peak_memory"]["peak_gpu_mb"] else ""))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anoseg", description="Anomaly segmentation trials and search.")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    synth = data.add_parser("synth", help="write the synthetic dataset in the MVTec AD layout")
    synth.add_argument("out", help="output folder, e.g. results/data/synthetic")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    synth.add_argument("--categories", help="comma-separated subset (default: all)")
    synth.add_argument("--train", type=int, default=40, help="defect-free training images per category")
    synth.add_argument("--test-good", type=int, default=10, help="defect-free test images per category")
    synth.add_argument("--test-per-defect", type=int, default=6, help="test images per defect kind")
    synth.add_argument("--overwrite", action="store_true", help="replace existing category folders")
    synth.set_defaults(func=cmd_data_synth)

    bb = sub.add_parser("backbones", help="list backbones, or one backbone's layers")
    bb.add_argument("--layers", metavar="NAME", help="list the selectable layers of backbone NAME")
    bb.set_defaults(func=cmd_backbones)

    heads = sub.add_parser("heads", help="list heads and their settings with defaults")
    heads.set_defaults(func=cmd_heads)

    ev = sub.add_parser("evaluate", help="fit and evaluate one configuration on a dataset")
    ev.add_argument("--config", required=True, help="trial configuration YAML")
    ev.add_argument("--data", required=True, help="dataset root in the MVTec AD layout")
    ev.add_argument("--categories", help="comma-separated categories (default: every category under --data)")
    ev.add_argument("--json", help="also write the results as JSON to this file")
    ev.add_argument("--device", help="override the config's device (auto, cpu, cuda)")
    ev.set_defaults(func=cmd_evaluate)

    for entry in entry_points(group="anoseg.commands"):
        entry.load()(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except AnosegError as exc:
        print(f"anoseg: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("anoseg: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
