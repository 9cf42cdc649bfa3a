"""The `anoseg` command line: data, backbones, heads, evaluate, fit, predict, export-onnx, plus plugin commands.

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

from anoseg.errors import AnosegError, ConfigError, DataError

#: Number formats of the table columns that are not fractions in [0, 1] (those get ".3f").
TABLE_FORMATS = {"fit_seconds": ".2f", "ms_per_image": ".1f"}


def table_columns() -> tuple[tuple[str, str], ...]:
    """The columns of the evaluate / fit table: every per-category metric of :data:`anoseg.metrics.METRICS`
    (quality, then cost), in its order, as (metric, number format)."""
    from anoseg.metrics import METRICS

    return tuple((m.name, TABLE_FORMATS.get(m.name, ".3f")) for m in METRICS if m.kind in ("quality", "cost"))


def format_table(per_category: dict[str, dict[str, float]], mean: dict[str, float]) -> str:
    """A fixed-width table: one row per category plus the mean row (a missing figure is "-")."""
    from anoseg.metrics import metric

    columns = [(key, fmt, max(9, len(metric(key).label))) for key, fmt in table_columns()]
    width = max(8, *(len(c) for c in per_category))
    header = f"{'category':<{width}}  " + "  ".join(f"{metric(key).label:>{w}}" for key, _, w in columns)
    rule = "-" * len(header)
    rows = [header, rule]
    for name, metrics in [*per_category.items(), (None, None), ("mean", mean)]:
        if name is None:
            rows.append(rule)
            continue
        cells = [f"{'-':>{w}}" if metrics.get(key) is None else f"{metrics[key]:>{w}{fmt}}" for key, fmt, w in columns]
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


def _with_device(cfg: Any, device: str | None, source: str) -> Any:
    return cfg if not device else type(cfg).from_dict({**cfg.to_dict(), "device": device}, source=source)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from anoseg.data import resolve_categories
    from anoseg.exported import read_exported
    from anoseg.result import EPOCHS_UNIT, TrialReport, mean_metrics
    from anoseg.trial import run_trial

    exported = read_exported(args.config)  # a plain configuration or an `anoseg export` file
    if exported.kind == "per_category":  # each category with its own configuration
        categories = resolve_categories(args.data, args.categories or list(exported.entries))
        missing = [c for c in categories if c not in exported.entries]
        if missing:
            raise ConfigError(f"{args.config} has no configuration for {', '.join(missing)}; "
                              f"it has: {', '.join(exported.entries)}")
        configs = {c: _with_device(exported.config(c), args.device, str(args.config)) for c in categories}
    else:
        cfg = _with_device(exported.select(trial=args.trial), args.device, str(args.config))
        categories = resolve_categories(args.data, args.categories)
        configs = {c: cfg for c in categories}
    if any(c.backbone.weights == "none" for c in configs.values()):
        print("note: weights: none -> random-init backbone; results say nothing about pretrained quality", file=sys.stderr)

    done = [0]

    def progress(report: TrialReport) -> None:
        mean = report.mean
        if report.fidelity_unit == EPOCHS_UNIT:  # a trainable head: every category after each epoch
            print(f"[epoch {report.fidelity}/{report.fidelity_total}] loss {report.loss:.4f}, mean image AUROC "
                  f"{mean['image_auroc']:.3f}, pixel AUROC {mean['pixel_auroc']:.3f}, AUPRO {mean['aupro']:.3f}",
                  file=sys.stderr, flush=True)
            return
        done[0] += 1
        m = report.per_category[report.category]
        print(f"[{done[0]}/{len(categories)}] {report.category}: image AUROC {m['image_auroc']:.3f}, "
              f"pixel AUROC {m['pixel_auroc']:.3f}, AUPRO {m['aupro']:.3f}", file=sys.stderr, flush=True)

    from anoseg.cache import FeatureCache

    cache = FeatureCache(args.cache)
    first = next(iter(configs.values()))
    if all(c == first for c in configs.values()):  # one configuration: one backbone for every category
        cfg = first
        trial = run_trial(cfg, args.data, categories, report=progress, cache=cache)
        result = trial.to_dict()
        print(f"backbone {cfg.backbone.name} ({trial.weights}), layers {', '.join(cfg.layers)}, "
              f"head {cfg.head_name}, image size {cfg.image_size}")
    else:
        parts = {c: run_trial(configs[c], args.data, [c], report=progress, cache=cache) for c in categories}
        per_category = {c: r.per_category[c] for c, r in parts.items()}
        result = {
            "config": {c: configs[c].to_dict() for c in categories},
            "weights": {c: r.weights for c, r in parts.items()},
            "pretrained": {c: r.pretrained for c, r in parts.items()},
            "categories": per_category,
            "mean": mean_metrics(per_category),
            "peak_memory": parts[categories[-1]].report.memory,
        }
        for c in categories:
            cfg = configs[c]
            print(f"{c}: backbone {cfg.backbone.name} ({result['weights'][c]}), layers {', '.join(cfg.layers)}, "
                  f"head {cfg.head_name}, image size {cfg.image_size}")
    print(format_table(result["categories"], result["mean"]))
    if cache.enabled:
        print(f"feature cache {args.cache}: {cache.hits} hits, {cache.misses} misses", file=sys.stderr)
    print(f"peak memory: {result['peak_memory']['peak_rss_mb']:.0f} MiB RSS"
          + (f", {result['peak_memory']['peak_gpu_mb']:.0f} MiB GPU" if result["peak_memory"]["peak_gpu_mb"] else ""))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return 0


def _entry_key(exported: Any, category: str, trial: str | None) -> str:
    """The entry of an exported file that `select(category, trial)` reads."""
    return {"single": "", "per_category": category}.get(exported.kind, trial or "")


def fit_holdout(selection: dict[str, Any], validation_share: float | None, split_seed: int | None) -> Any:
    """The holdout split `anoseg fit` chooses its thresholds with: the exported file's selection (its
    validation_share and seed, under protocol holdout), overridden by --validation-share / --split-seed;
    the defaults (0.5, 0) otherwise."""
    from anoseg.holdout import Holdout

    default = Holdout()
    chosen = selection if selection.get("protocol") == "holdout" else {}
    share = chosen.get("validation_share", default.validation_share) if validation_share is None else validation_share
    seed = chosen.get("seed", default.seed) if split_seed is None else split_seed
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 < float(share) < 1.0:
        raise ConfigError(f"the validation share must lie strictly between 0 and 1; got {share!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"the split seed must be an integer; got {seed!r}")
    return Holdout(float(share), seed)


def _at_thresholds(metrics: dict[str, Any], level: str) -> str:
    parts = [f"{name} {metrics[f'{level}_{key}']:.3f}" if metrics.get(f"{level}_{key}") is not None else f"{name} -"
             for key, name in (("f1", "F1"), ("precision", "precision"), ("recall", "recall"))]
    return f"{level} " + ", ".join(parts)


def cmd_fit(args: argparse.Namespace) -> int:
    from anoseg.exported import read_exported
    from anoseg.model import fit_model

    exported = read_exported(args.config)
    cfg = exported.select(category=args.category, trial=args.trial)
    selection = exported.selection(_entry_key(exported, args.category, args.trial))
    holdout = fit_holdout(selection, args.validation_share, args.split_seed)
    out = Path(args.out) if args.out else Path("models") / args.category
    if cfg.backbone.weights == "none":
        print("note: weights: none -> random-init backbone (the model folder says pretrained: false)", file=sys.stderr)
    if selection.get("protocol") == "test":
        print("note: the search chose this configuration on all test images (selection.protocol: test): the test "
              "part's figures below saw that choice, so they are optimistic", file=sys.stderr)
    print(f"split: holdout, validation share {holdout.validation_share:g}, seed {holdout.seed}"
          + (" (from the exported selection)" if selection.get("protocol") == "holdout"
             and args.validation_share is None and args.split_seed is None else ""), file=sys.stderr)
    model = fit_model(cfg, args.data, args.category, out, device=args.device, holdout=holdout,
                      progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    m, t = model.metrics, model.thresholds
    print(f"{args.category}: backbone {cfg.backbone.name} ({model.info['backbone']['weights']}), "
          f"layers {', '.join(cfg.layers)}, head {cfg.head_name}, image size {cfg.image_size}")
    on = model.info.get("metrics_on", "the test images")
    if "aupro" in m:
        print(f"metrics of the {on}:")
        print(format_table({args.category: m}, m).rsplit("\n", 2)[0])
    print(f"thresholds: image score >= {t['image']:.6g} -> fail; map pixel >= {t['pixel']:.6g} -> anomalous")
    chosen_on = t.get("chosen_on") or {}
    print(f"  chosen by {t.get('method')}" + (f" ({chosen_on['n_good']} good, {chosen_on['n_defective']} defective "
                                              "images)" if "n_good" in chosen_on else ""))
    print(f"at these thresholds on the {on}: {_at_thresholds(m, 'image')}; {_at_thresholds(m, 'pixel')}")
    for note in model.info.get("metrics_notes") or []:
        print(f"note: {note}", file=sys.stderr)
    print(f"saved {out}/ (model.json, weights.safetensors)")
    return 0


def _collect_images(inputs: Sequence[str]) -> list[Path]:
    """Files as given; folders contribute their image files, recursively (skipping *_mask files)."""
    from anoseg.data import IMAGE_SUFFIXES

    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                           and not p.stem.endswith("_mask"))
            if not found:
                raise DataError(f"folder {item} holds no image files ({', '.join(IMAGE_SUFFIXES)})")
            files.extend(found)
        else:
            files.append(item)
    return list(dict.fromkeys(files))


def _unique_names(paths: Sequence[Path]) -> list[str]:
    """Output names from the file names, with parent folders prepended until every name is unique."""
    depth = 1
    longest = max(len(p.parts) for p in paths)
    while True:
        names = ["_".join(p.with_suffix("").parts[-depth:]).lstrip("/_") or "image" for p in paths]
        if len(set(names)) == len(names) or depth >= longest:
            break
        depth += 1
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return unique


def cmd_predict(args: argparse.Namespace) -> int:
    import csv

    import numpy as np
    import torch
    from PIL import Image

    from anoseg.metrics import LOW_FPR_LIMIT, aupro, evaluate, f1_max, pixel_auroc, seg_f1
    from anoseg.data import find_mask, read_images, read_mask
    from anoseg.model import load_model
    from anoseg.overlays import overlay

    model = load_model(args.model, device=args.device)
    files = _collect_images(args.images)
    size = model.image_size
    images, ok, errors = read_images(files, size)
    for path, message in errors.items():
        print(f"anoseg: warning: {message} (skipped)", file=sys.stderr)
    if not ok:
        raise DataError(f"none of the {len(files)} images could be read; first: {next(iter(errors.values()))}")
    masks = None
    mask_files: list[Path | None] = []
    if args.masks:
        masks_dir = Path(args.masks)
        if not masks_dir.is_dir():
            raise DataError(f"--masks {masks_dir} is not a folder")
        mask_files = [find_mask(p, masks_dir) for p in ok]
        masks = torch.stack([torch.zeros(size, size, dtype=torch.bool) if m is None else torch.from_numpy(read_mask(m, size))
                             for m in mask_files])
    maps, scores = model.predict(images, batch_size=args.batch_size)
    verdicts = model.verdicts(scores)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = dict(zip(ok, _unique_names(ok)))
    span = model.info.get("map_range") or {}
    low = span.get("good_median") if span.get("good_median") is not None else span.get("min", float(maps.min()))
    high = span.get("max", float(maps.max()))
    for i, path in enumerate(ok):
        picture = overlay(images[i], maps[i], low, high, None if masks is None else masks[i])
        Image.fromarray(picture).save(out / f"{names[path]}.png")
        if args.save_maps:
            np.save(out / f"{names[path]}.npy", maps[i].numpy())
    fields = ["file", "score", "verdict", "overlay"] + (["mask", "label"] if masks is not None else []) + ["error"]
    with (out / "scores.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        index = {p: i for i, p in enumerate(ok)}
        for path in files:
            if path in index:
                i = index[path]
                row = {"file": str(path), "score": f"{float(scores[i]):.6g}", "verdict": verdicts[i],
                       "overlay": f"{names[path]}.png", "error": ""}
                if masks is not None:
                    row["mask"] = str(mask_files[i]) if mask_files[i] else ""
                    row["label"] = "defective" if bool(masks[i].any()) else "good"
            else:
                row = {"file": str(path), "score": "", "verdict": "unreadable", "overlay": "", "error": errors[path]}
            writer.writerow(row)
    n_fail = verdicts.count("fail")
    print(f"{len(ok)} images: {len(ok) - n_fail} pass, {n_fail} fail (fail: score >= {model.thresholds['image']:.6g}, "
          f"the {model.info.get('category') or 'model'}'s image threshold); overlays and scores.csv in {out}/")

    if masks is not None:
        labels = masks.flatten(1).any(dim=1).numpy()
        n_bad = int(labels.sum())
        unmasked = [p for p, m in zip(ok, mask_files) if m is None and p.parent.name != "good"]
        if unmasked:
            print(f"note: {len(unmasked)} of {len(ok)} images (outside good/ folders) have no mask under {args.masks}, "
                  f"counted as defect-free: {', '.join(map(str, unmasked[:3]))}{', ...' if len(unmasked) > 3 else ''}",
                  file=sys.stderr)
        seg_threshold = model.thresholds.get("seg", model.thresholds["pixel"])  # older model folders: no "seg"
        if n_bad == 0:
            print(f"no metrics: none of the {len(ok)} images has a defect in its mask; "
                  f"{n_fail} of {len(ok)} defect-free images fail (false alarms)")
            metrics: dict[str, float] = {}
        elif n_bad == len(ok):
            print("only defective images: pixel-level metrics only (image metrics need defect-free images too)")
            metrics = {"pixel_auroc": pixel_auroc(masks, maps), "aupro": aupro(masks, maps),
                       "pixel_f1_max": f1_max(masks, maps), "aupro_0.05": aupro(masks, maps, LOW_FPR_LIMIT),
                       "seg_f1": seg_f1(masks, maps, seg_threshold)}
        else:  # seg_f1 at the threshold `anoseg fit` chose for it on the validation part's good pixels
            metrics = evaluate(maps, scores, masks, labels, pixel_threshold=seg_threshold)
        if metrics:
            predicted = np.array([v == "fail" for v in verdicts])
            metrics["image_accuracy_at_threshold"] = float((predicted == labels).mean())
            if n_bad < len(ok):
                metrics["false_alarm_rate_at_threshold"] = float(predicted[~labels].mean())
            if n_bad:
                metrics["miss_rate_at_threshold"] = float((~predicted[labels]).mean())
            print("  ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
            (out / "metrics.json").write_text(json.dumps(
                {"images": len(ok), "defective": n_bad, "thresholds": model.thresholds, "metrics": metrics}, indent=2))
            print(f"wrote {out / 'metrics.json'}")
    if errors:
        raise DataError(f"{len(errors)} of {len(files)} images could not be read (the others were processed): "
                        + "; ".join(errors.values()))
    return 0


def _check_images(model: Any, count: int = 4) -> tuple[Any, str]:
    """Up to `count` test images of the model's own category when its data are here, else seeded noise."""
    import torch

    from anoseg.data import IMAGE_SUFFIXES
    from anoseg.data import read_images

    data = model.info.get("data") or {}
    test_dir = Path(str(data.get("root", ""))) / str(data.get("category", "")) / "test"
    if data.get("root") and test_dir.is_dir():
        firsts = []
        for folder in sorted(p for p in test_dir.iterdir() if p.is_dir()):
            files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            firsts.extend(files[:1])
        if firsts:
            images, ok, _ = read_images(firsts[:count], model.image_size)
            if ok:
                return images, f"{len(ok)} test images of {data.get('category')}"
    s = model.image_size
    return torch.rand(2, 3, s, s, generator=torch.Generator().manual_seed(0)), "2 random images"


def cmd_export_onnx(args: argparse.Namespace) -> int:
    import importlib.util

    from anoseg.model import load_model
    from anoseg.onnx_export import compare_with_torch, export_onnx

    model = load_model(args.model, device="cpu")
    out = export_onnx(model, args.out, opset=args.opset)
    extra = Path(str(out) + ".data")
    print(f"wrote {out}" + (f" (+ {extra.name})" if extra.exists() else "")
          + f": input image (N, 3, {model.image_size}, {model.image_size}) in [0, 1] -> anomaly_map "
          f"(N, {model.image_size}, {model.image_size}), score (N,); opset {args.opset}; "
          f"fail when score >= {model.thresholds['image']:.6g} (also in the ONNX metadata)")
    if args.no_check:
        return 0
    if importlib.util.find_spec("onnxruntime") is None:
        print("note: onnxruntime is not installed: the graph was not checked against torch", file=sys.stderr)
        return 0
    images, what = _check_images(model)
    diff = compare_with_torch(model, out, images)
    ok = diff["map_rel_diff"] <= args.tolerance and diff["score_rel_diff"] <= args.tolerance
    print(f"check on {what} (onnxruntime CPU vs torch): map max abs diff {diff['map_max_abs_diff']:.3g} "
          f"({diff['map_rel_diff']:.2g} of the map range), score max abs diff {diff['score_max_abs_diff']:.3g} "
          f"({diff['score_rel_diff']:.2g} relative): " + ("ok" if ok else f"EXCEEDS the tolerance {args.tolerance:g}"))
    return 0 if ok else 1


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
    synth.add_argument("--test-per-defect", type=int, default=8, help="test images per defect kind")
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
    ev.add_argument("--cache", metavar="DIR", help="feature cache folder shared between runs (default: no cache)")
    ev.add_argument("--trial", help="with a Pareto export (anoseg export): the trial id to evaluate")
    ev.set_defaults(func=cmd_evaluate)

    fit = sub.add_parser("fit", help="fit a configuration on one category and save the model folder")
    fit.add_argument("--config", required=True, help="trial configuration or `anoseg export` YAML")
    fit.add_argument("--data", required=True, help="dataset root in the MVTec AD layout")
    fit.add_argument("--category", required=True, help="the category to fit (train/good); its test images are "
                     "split into a validation part (chooses the thresholds) and a test part (the reported metrics)")
    fit.add_argument("--out", help="model folder to write (default: models/<category>)")
    fit.add_argument("--trial", help="with a Pareto export: the trial id to fit")
    fit.add_argument("--device", help="override the config's device (auto, cpu, cuda)")
    fit.add_argument("--validation-share", type=float, metavar="SHARE",
                     help="share of each stratum of the test images in the validation part, in (0, 1) (default: "
                     "the exported file's selection.validation_share, else 0.5)")
    fit.add_argument("--split-seed", type=int, metavar="SEED",
                     help="seed of the validation / test split (default: the exported file's selection.seed, else 0)")
    fit.set_defaults(func=cmd_fit)

    pr = sub.add_parser("predict", help="anomaly maps, scores and pass/fail verdicts for images")
    pr.add_argument("--model", required=True, help="model folder written by `anoseg fit`")
    pr.add_argument("images", nargs="+", help="image files or folders (searched recursively); any size, "
                    "resized to the model's image size; grayscale / RGBA become RGB")
    pr.add_argument("--out", required=True, help="folder for the overlay PNGs, scores.csv (and metrics.json)")
    pr.add_argument("--masks", help="ground-truth masks: an MVTec ground_truth/ folder (<defect>/<stem>_mask.png) "
                    "or a flat folder of <stem>_mask.png; images without a mask count as defect-free")
    pr.add_argument("--save-maps", action="store_true", help="also write each anomaly map as <name>.npy (float32)")
    pr.add_argument("--batch-size", type=int, help="images per forward pass (default: the config's)")
    pr.add_argument("--device", help="auto, cpu or cuda (default: the config's)")
    pr.set_defaults(func=cmd_predict)

    ox = sub.add_parser("export-onnx", help="export a model folder as one ONNX graph (image -> map, score)")
    ox.add_argument("--model", required=True, help="model folder written by `anoseg fit`")
    ox.add_argument("--out", required=True, help="the .onnx file to write")
    ox.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 17; default 18)")
    ox.add_argument("--no-check", action="store_true", help="skip the onnxruntime-vs-torch check")
    ox.add_argument("--tolerance", type=float, default=1e-3,
                    help="largest accepted difference, relative to the map range / score (default 1e-3)")
    ox.set_defaults(func=cmd_export_onnx)

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
