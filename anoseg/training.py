"""Trainable heads (STFPM) in a trial: every category's head trained one epoch at a time, in lockstep.

After every epoch every category's head is evaluated and the trial reports the means over all
categories: fidelity = epochs, so ASHA compares trials after equal training. One head object
trains the categories in turn; each category's training state (weights, optimizer, shuffling,
statistics) waits on the CPU between its turns, so the device holds one student at a time, and
those states together are the trial's checkpoint (a resumed trial continues from the last epoch).

The frozen backbone's maps come from the feature cache (a temporary one when the cache is off),
so the backbone runs once per image, not once per epoch; a category's maps are read back only
for its turn. Images stay in memory as 8-bit.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from anoseg.cache import CacheKey, FeatureCache
from anoseg.config import TrialConfig
from anoseg.data import load_images, load_test, load_train
from anoseg.data.mvtec import TestSplit
from anoseg.errors import ConfigError
from anoseg.features import synchronize
from anoseg.heads import TrainableHead, create_head, final_maps
from anoseg.metrics import evaluate


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] float images -> uint8 (exact for images decoded from 8-bit files)."""
    return (images * 255).round_().to(torch.uint8)


@dataclass
class CategoryData:
    """One category's images (8-bit) and the cache keys of the backbone's maps of them."""

    name: str
    keys: Callable[[str], dict[str, CacheKey]]
    train_images: torch.Tensor  # (N, 3, S, S) uint8, all training images
    train_index: torch.Tensor  # the ones the head trains on
    holdout_index: torch.Tensor  # the ones it calibrates on (may be empty)
    test: TestSplit
    test_images: torch.Tensor
    train_seconds_per_image: float  # backbone forward pass, from the cache entry
    test_seconds_per_image: float


def load_category(
    backbone: torch.nn.Module, cfg: TrialConfig, data_root: str | Path, category: str, device: torch.device,
    cache: FeatureCache, holdout: int | Callable[[int], int],
) -> CategoryData:
    """Read a category's images, make sure the backbone's maps of them are cached, split off the hold-out."""
    from anoseg.trial import _layer_maps, cache_keys

    keys = cache_keys(backbone, cfg, data_root, category, cache)
    train = load_train(data_root, category, cfg.image_size)
    _, train_seconds = _layer_maps(backbone, cfg, cache, keys("train"), lambda: train, device)
    test = load_test(data_root, category, cfg.image_size, with_images=False)
    test_images = load_images(test.paths, cfg.image_size)
    _, test_seconds = _layer_maps(backbone, cfg, cache, keys("test"), lambda: test_images, device)
    n_holdout = holdout(len(train)) if callable(holdout) else holdout
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed))
    return CategoryData(category, keys, to_uint8(train), order[n_holdout:].sort().values,
                        order[:n_holdout].sort().values, test, to_uint8(test_images), train_seconds, test_seconds)


def _maps(backbone: torch.nn.Module, cfg: TrialConfig, cache: FeatureCache, keys: dict[str, CacheKey],
          images: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    from anoseg.trial import _layer_maps

    return _layer_maps(backbone, cfg, cache, keys, lambda: images.float() / 255, device)[0]


def _select(maps: Mapping[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
    return {layer: m[index] for layer, m in maps.items()}


def train_category_epoch(
    head: TrainableHead, backbone: torch.nn.Module, cfg: TrialConfig, data: CategoryData, cache: FeatureCache,
    device: torch.device,
) -> tuple[float, float]:
    """One epoch of `head` on `data` plus its calibration; returns (mean loss, seconds)."""
    maps = _maps(backbone, cfg, cache, data.keys("train"), data.train_images, device)
    synchronize(device)
    start = time.perf_counter()
    loss = head.train_epoch(data.train_images[data.train_index], _select(maps, data.train_index))
    if len(data.holdout_index):
        head.calibrate(data.train_images[data.holdout_index], _select(maps, data.holdout_index))
    synchronize(device)
    return loss, time.perf_counter() - start


def score_category(
    head: TrainableHead, backbone: torch.nn.Module, cfg: TrialConfig, data: CategoryData, cache: FeatureCache,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Anomaly maps and image scores of the category's test images, and the scoring seconds per image."""
    maps = _maps(backbone, cfg, cache, data.keys("test"), data.test_images, device)
    synchronize(device)
    start = time.perf_counter()
    maps_out, scores_out = [], []
    for first in range(0, len(data.test_images), cfg.batch_size):
        sl = slice(first, first + cfg.batch_size)
        amaps, scores = final_maps(head, {k: m[sl] for k, m in maps.items()}, cfg.layers, cfg.image_size,
                                   images=data.test_images[sl])
        maps_out.append(amaps.cpu())
        scores_out.append(scores.cpu())
    synchronize(device)
    return torch.cat(maps_out), torch.cat(scores_out), (time.perf_counter() - start) / len(data.test_images)


def train_trial(
    backbone: torch.nn.Module, cfg: TrialConfig, data_root: str | Path, names: Sequence[str], device: torch.device,
    cache: FeatureCache | None, report: Callable[[dict[str, Any], int], None] | None,
    checkpoint: Callable[[dict[str, Any]], None] | None, resume: Mapping[str, Any] | None,
) -> dict[str, dict[str, float]]:
    """Train and evaluate a trainable head on every category, epoch by epoch; see the module docstring.

    Per category: `fit_seconds` = backbone forward over the training images + training and
    calibration time of the epochs so far; `ms_per_image` = backbone forward + scoring per test image.
    """
    from anoseg.trial import mean_metrics, peak_memory_mb

    head = create_head(cfg.head_name, **cfg.head_params)
    assert isinstance(head, TrainableHead)
    head.setup(backbone, device)
    scratch = None
    if cache is None or not cache.enabled:  # the backbone's maps are needed every epoch: keep them on disk
        scratch = tempfile.TemporaryDirectory(prefix="anoseg-features-")
        cache = FeatureCache(scratch.name)
    try:
        data = {c: load_category(backbone, cfg, data_root, c, device, cache, head.holdout_count) for c in names}
        initial = head.training_state()
        state: dict[str, Any] = {"epoch": 0, "epochs": head.epochs, "categories": list(names),
                                 "heads": {c: initial for c in names}, "train_seconds": {c: 0.0 for c in names},
                                 "per_category": {}}
        if resume:
            check_resume(resume, state)
            state = {**state, **resume}
        per_category: dict[str, dict[str, float]] = dict(state["per_category"])
        for epoch in range(int(state["epoch"]) + 1, head.epochs + 1):
            losses = []
            for c in names:
                head.load_training_state(state["heads"][c])
                loss, seconds = train_category_epoch(head, backbone, cfg, data[c], cache, device)
                losses.append(loss)
                state["train_seconds"][c] += seconds
                state["heads"][c] = head.training_state()
                maps, scores, score_seconds = score_category(head, backbone, cfg, data[c], cache, device)
                metrics = evaluate(maps, scores, data[c].test.masks, data[c].test.labels)
                fit = data[c].train_seconds_per_image * len(data[c].train_images) + state["train_seconds"][c]
                ms = (data[c].test_seconds_per_image + score_seconds) * 1000
                per_category[c] = {**metrics, "fit_seconds": round(fit, 4), "ms_per_image": round(ms, 3),
                                   "loss": loss}
            state.update(epoch=epoch, per_category=per_category)
            if checkpoint is not None:
                checkpoint(state)
            if report is not None:
                own = {f"{c}/{k}": v for c, m in per_category.items() for k, v in m.items()}
                report({**mean_metrics(per_category), **own, **peak_memory_mb(device), "epoch": epoch,
                        "loss": sum(losses) / len(losses), "categories_done": len(names), "fidelity": epoch,
                        "fidelity_total": head.epochs, "fidelity_unit": "epochs",
                        "resumed_from": int(resume["epoch"]) if resume else 0}, epoch)
        return per_category
    finally:
        if scratch is not None:
            scratch.cleanup()


def check_resume(resume: Mapping[str, Any], fresh: Mapping[str, Any]) -> None:
    """A checkpoint must belong to this trial: same categories, same number of epochs."""
    for key in ("categories", "epochs"):
        have = resume.get(key)
        if (list(have or []) if key == "categories" else have) != fresh[key]:
            raise ConfigError(f"the checkpoint to resume from has {key} {resume.get(key)!r}, this trial {fresh[key]!r}")


def fit_trainable(
    head: TrainableHead, backbone: torch.nn.Module, cfg: TrialConfig, data_root: str | Path, category: str,
    device: torch.device, progress: Callable[[str], None] = lambda _msg: None,
) -> tuple[float, int]:
    """Train `head` on one category for all its epochs (for `anoseg fit`); returns (fit seconds, training images)."""
    head.setup(backbone, device)
    with tempfile.TemporaryDirectory(prefix="anoseg-features-") as folder:
        cache = FeatureCache(folder)
        data = load_category(backbone, cfg, data_root, category, device, cache, head.holdout_count)
        seconds = data.train_seconds_per_image * len(data.train_images)
        for epoch in range(1, head.epochs + 1):
            loss, epoch_seconds = train_category_epoch(head, backbone, cfg, data, cache, device)
            seconds += epoch_seconds
            progress(f"epoch {epoch}/{head.epochs}: loss {loss:.4f} ({epoch_seconds:.1f} s)")
    return seconds, len(data.train_index)
