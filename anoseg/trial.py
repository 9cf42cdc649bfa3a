"""One search trial: fit and evaluate a configuration category by category.

`run_trial` is a plain function (no Ray): the search wraps it, tests call it.
"""
from __future__ import annotations

import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from anoseg.backbones import create_backbone
from anoseg.config import TrialConfig
from anoseg.data import load_test, load_train, resolve_categories
from anoseg.features import combine_layers, extract_layers, resolve_device
from anoseg.heads import anomaly_maps, create_head
from anoseg.metrics import evaluate

METRIC_KEYS = ("image_auroc", "pixel_auroc", "aupro", "pixel_f1_max", "image_f1_max")
COST_KEYS = ("fit_seconds", "ms_per_image")
Report = Callable[[dict[str, Any], int], None]


def peak_memory_mb(device: torch.device) -> dict[str, float | None]:
    """Peak resident memory of this process (and peak GPU memory allocated on CUDA), in MiB."""
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_mb = rss_kb / 1024 if sys.platform != "darwin" else rss_kb / 2**20
    gpu = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"peak_rss_mb": round(rss_mb, 1), "peak_gpu_mb": None if gpu is None else round(gpu, 1)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def evaluate_category(
    backbone: torch.nn.Module, cfg: TrialConfig, data_root: str | Path, category: str, device: torch.device
) -> dict[str, float]:
    """Fit the head on one category's train set and evaluate on its test set."""
    head = create_head(cfg.head_name, **cfg.head_params)
    train = load_train(data_root, category, cfg.image_size)
    _sync(device)
    start = time.perf_counter()
    features = combine_layers(extract_layers(backbone, train, cfg.batch_size, device), cfg.layers, head.patch_size)
    head.fit(features)
    _sync(device)
    fit_seconds = time.perf_counter() - start
    del features, train

    test = load_test(data_root, category, cfg.image_size)
    start = time.perf_counter()
    maps_list, scores_list = [], []
    for first in range(0, len(test.images), cfg.batch_size):
        batch = test.images[first:first + cfg.batch_size]
        features = combine_layers(extract_layers(backbone, batch, cfg.batch_size, device), cfg.layers, head.patch_size)
        patch_maps, image_scores = head.score(features)
        maps = anomaly_maps(patch_maps, cfg.image_size)
        maps_list.append(maps.cpu())
        scores_list.append((maps.amax(dim=(1, 2)) if image_scores is None else image_scores).cpu())
    _sync(device)
    ms_per_image = (time.perf_counter() - start) * 1000 / len(test.images)

    metrics = evaluate(torch.cat(maps_list), torch.cat(scores_list), test.masks, test.labels)
    return {**metrics, "fit_seconds": round(fit_seconds, 4), "ms_per_image": round(ms_per_image, 3)}


def mean_metrics(per_category: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    keys = [k for k in (*METRIC_KEYS, *COST_KEYS) if all(k in m for m in per_category.values())]
    return {k: float(np.mean([m[k] for m in per_category.values()])) for k in keys}


def run_trial(
    config: TrialConfig | Mapping[str, Any],
    data_root: str | Path,
    categories: Sequence[str] | str | None = None,
    report: Report | None = None,
) -> dict[str, Any]:
    """Evaluate `config` on each category in order, calling `report(metrics, step)` after each.

    `metrics` holds the running means over the categories done so far, the
    finished category's own metrics as `<category>/<metric>`, `category`,
    `categories_done` and the peak memory so far (`peak_rss_mb`, `peak_gpu_mb`);
    `step` is the number of categories done (the fidelity unit for ASHA).
    Returns {"config", "weights", "pretrained", "categories": {name: metrics}, "mean", "peak_memory"}.
    """
    cfg = config if isinstance(config, TrialConfig) else TrialConfig.from_dict(config)
    names = resolve_categories(data_root, categories)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    backbone = create_backbone(cfg.backbone.name, cfg.layers, cfg.backbone.weights).to(device)

    per_category: dict[str, dict[str, float]] = {}
    for step, category in enumerate(names, start=1):
        per_category[category] = evaluate_category(backbone, cfg, data_root, category, device)
        if report is not None:
            running = mean_metrics(per_category)
            done = {f"{category}/{k}": v for k, v in per_category[category].items()}
            memory = peak_memory_mb(device)
            report({**running, **done, **memory, "category": category, "categories_done": step}, step)
    return {
        "config": cfg.to_dict(),
        "weights": backbone.weights,
        "pretrained": backbone.pretrained,
        "categories": per_category,
        "mean": mean_metrics(per_category),
        "peak_memory": peak_memory_mb(device),
    }
