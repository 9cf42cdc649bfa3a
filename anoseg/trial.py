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
from anoseg.cache import CacheKey, FeatureCache, cached_layer_maps
from anoseg.data import category_fingerprint, load_images, load_test, load_train, resolve_categories
from anoseg.features import extract_layers, layer_map_batches, resolve_device, synchronize
from anoseg.heads import HEADS, create_head, final_maps, fit_head
from anoseg.metrics import evaluate

METRIC_KEYS = ("image_auroc", "pixel_auroc", "aupro", "pixel_f1_max", "image_f1_max")
COST_KEYS = ("fit_seconds", "ms_per_image")
Report = Callable[[dict[str, Any], int], None]
Checkpoint = Callable[[dict[str, Any]], None]


def peak_memory_mb(device: torch.device) -> dict[str, float | None]:
    """Peak resident memory of this process (and peak GPU memory allocated on CUDA), in MiB."""
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_mb = rss_kb / 1024 if sys.platform != "darwin" else rss_kb / 2**20
    gpu = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"peak_rss_mb": round(rss_mb, 1), "peak_gpu_mb": None if gpu is None else round(gpu, 1)}


def _layer_maps(
    backbone: torch.nn.Module, cfg: TrialConfig, cache: FeatureCache, keys: dict[str, CacheKey],
    load_images: Callable[[], torch.Tensor], device: torch.device,
) -> tuple[dict[str, torch.Tensor], float]:
    """The selected layers' maps of one split, from the cache or computed (images loaded only then)."""

    def compute(layers: list[str]) -> tuple[dict[str, torch.Tensor], float]:
        images = load_images()
        synchronize(device)
        start = time.perf_counter()
        maps = extract_layers(backbone, images, cfg.batch_size, device)
        synchronize(device)
        return {layer: maps[layer] for layer in layers}, (time.perf_counter() - start) / len(images)

    return cached_layer_maps(cache, keys, compute)


def cache_keys(
    backbone: torch.nn.Module, cfg: TrialConfig, data_root: str | Path, category: str, cache: FeatureCache,
) -> Callable[[str], dict[str, CacheKey]]:
    """split -> {layer: the cache key of that layer's maps of `category`'s split}."""
    fingerprint = category_fingerprint(data_root, category) if cache.enabled else ""
    weights_id = backbone.weights if backbone.pretrained else f"{backbone.weights} seed={cfg.seed}"

    def keys(split: str) -> dict[str, CacheKey]:
        return {layer: CacheKey(cfg.backbone.name, weights_id, layer, cfg.image_size, category, split, fingerprint)
                for layer in cfg.layers}

    return keys


def evaluate_category(
    backbone: torch.nn.Module, cfg: TrialConfig, data_root: str | Path, category: str, device: torch.device,
    cache: FeatureCache | None = None,
) -> dict[str, float]:
    """Fit the head on one category's train set and evaluate on its test set.

    Costs: `fit_seconds` = feature extraction of the train set + head fit; `ms_per_image` =
    feature extraction + scoring + map post-processing per test image. Image decoding is not
    counted; a feature-cache hit counts the extraction time measured when the entry was made.
    """
    cache = cache or FeatureCache(None)
    head = create_head(cfg.head_name, **cfg.head_params)
    keys = cache_keys(backbone, cfg, data_root, category, cache)
    train_maps, train_seconds = _layer_maps(
        backbone, cfg, cache, keys("train"), lambda: load_train(data_root, category, cfg.image_size), device)
    n_train = len(next(iter(train_maps.values())))
    synchronize(device)
    start = time.perf_counter()
    fit_head(head, layer_map_batches(train_maps, cfg.batch_size), cfg.layers, device)
    synchronize(device)
    fit_seconds = train_seconds * n_train + time.perf_counter() - start
    del train_maps

    test = load_test(data_root, category, cfg.image_size, with_images=False)
    test_maps, test_seconds = _layer_maps(
        backbone, cfg, cache, keys("test"), lambda: load_images(test.paths, cfg.image_size), device)
    start = time.perf_counter()
    maps_list, scores_list = [], []
    for batch in layer_map_batches(test_maps, cfg.batch_size):
        maps, scores = final_maps(head, batch, cfg.layers, cfg.image_size, device=device)
        maps_list.append(maps.cpu())
        scores_list.append(scores.cpu())
    synchronize(device)
    ms_per_image = (test_seconds + (time.perf_counter() - start) / len(test.paths)) * 1000

    metrics = evaluate(torch.cat(maps_list), torch.cat(scores_list), test.masks, test.labels)
    return {**metrics, "fit_seconds": round(fit_seconds, 4), "ms_per_image": round(ms_per_image, 3)}


def head_is_trainable(name: str) -> bool:
    return bool(getattr(HEADS.get(name), "trainable", False))


def mean_metrics(per_category: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    keys = [k for k in (*METRIC_KEYS, *COST_KEYS) if all(k in m for m in per_category.values())]
    return {k: float(np.mean([m[k] for m in per_category.values()])) for k in keys}


def run_trial(
    config: TrialConfig | Mapping[str, Any],
    data_root: str | Path,
    categories: Sequence[str] | str | None = None,
    report: Report | None = None,
    cache: FeatureCache | None = None,
    checkpoint: Checkpoint | None = None,
    resume: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate `config` on each category in order, calling `report(metrics, step)` after each.

    `metrics` holds the running means over the categories done so far, the
    finished category's own metrics as `<category>/<metric>`, `category`,
    `categories_done` and the peak memory so far (`peak_rss_mb`, `peak_gpu_mb`);
    `step` = `fidelity` is the number of categories done (the fidelity unit for ASHA), out of
    `fidelity_total`, in `fidelity_unit` "categories".
    A trainable head (STFPM) instead trains every category's head one epoch at a time and
    reports after every epoch, with every category evaluated: `step` = `fidelity` = epochs done,
    `fidelity_unit` "epochs" (see anoseg.training). Before each such report it calls
    `checkpoint(state)` with a state that `resume=state` continues from (a resumed search).
    `cache` shares backbone features between trials (see anoseg.cache); results are the same
    with and without it.
    Returns {"config", "weights", "pretrained", "categories": {name: metrics}, "mean", "peak_memory"}.
    """
    cfg = config if isinstance(config, TrialConfig) else TrialConfig.from_dict(config)
    names = resolve_categories(data_root, categories)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    backbone = create_backbone(cfg.backbone.name, cfg.layers, cfg.backbone.weights).to(device)

    if head_is_trainable(cfg.head_name):
        from anoseg.training import train_trial

        per_category = train_trial(backbone, cfg, data_root, names, device, cache, report, checkpoint, resume)
    else:
        per_category = {}
        for step, category in enumerate(names, start=1):
            per_category[category] = evaluate_category(backbone, cfg, data_root, category, device, cache)
            if report is not None:
                done = {f"{category}/{k}": v for k, v in per_category[category].items()}
                report({**mean_metrics(per_category), **done, **peak_memory_mb(device), "category": category,
                        "categories_done": step, "fidelity": step, "fidelity_total": len(names),
                        "fidelity_unit": "categories"}, step)
    return {
        "config": cfg.to_dict(),
        "weights": backbone.weights,
        "pretrained": backbone.pretrained,
        "categories": per_category,
        "mean": mean_metrics(per_category),
        "peak_memory": peak_memory_mb(device),
    }
