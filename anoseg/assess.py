"""The final assessment of a chosen configuration: fitted once per category, scored on every test image, its
metrics on each part of the holdout split and their bootstrap replicates.

What a search ends with (:mod:`search.finalize`): the trials were ranked on the validation part; here the
chosen ones are evaluated once on the test part. ``seg_f1`` on the test part uses the pixel threshold chosen on
the validation part's good images (never on the test part). The bootstrap resamples a part's images within
each stratum (good, each defect type) with indices that depend only on the seed, the category and the part,
so every configuration sees the same resamples: the replicates of two configurations are paired
(:mod:`anoseg.bootstrap`).

Without a holdout split (``protocol: test``) the one part is all test images, named ``test``: the figures
the trials were ranked on, reported with their intervals.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from anoseg import bootstrap
from anoseg.backbones import create_backbone
from anoseg.cache import FeatureCache
from anoseg.config import TrialConfig
from anoseg.data import list_test
from anoseg.features import resolve_device
from anoseg.heads import HEADS, create_head
from anoseg.holdout import TEST, VALIDATION, Holdout
from anoseg.metrics import QUALITY_METRICS
from anoseg.pipeline import FeatureSource, ScoredImages, fit_category, load_category, score_category, score_test, \
    train_epoch, training_source
from anoseg.thresholds import good_threshold

__all__ = ["PartFigures", "CategoryAssessment", "assess_config", "part_resamples"]


@dataclass
class PartFigures:
    """One part's metrics, and the bootstrap replicates of the quality metrics asked for."""

    metrics: dict[str, float]
    replicates: dict[str, np.ndarray] = field(default_factory=dict)  # metric -> (B,)
    n_images: int = 0


@dataclass
class CategoryAssessment:
    """A configuration on one category: figures per part, costs, and what the seg threshold came from."""

    parts: dict[str, PartFigures]
    fit_seconds: float
    ms_per_image: float
    seg_threshold: float
    seg_threshold_method: str
    bootstrap_seconds: float = 0.0


def part_resamples(strata: Sequence[str], n_boot: int, seed: int, category: str, part: str) -> np.ndarray:
    """The bootstrap resamples of one part of one category (the same for every configuration)."""
    return bootstrap.resample_indices(strata, n_boot, bootstrap.category_seed(seed, f"{category}:{part}"))


def assess_config(config: TrialConfig | Mapping[str, Any], data_root: str | Path, categories: Sequence[str],
                  holdout: Holdout | None, metrics: Sequence[str], n_boot: int, seed: int,
                  cache: FeatureCache | None = None,
                  progress: Callable[[str], None] = lambda _msg: None) -> dict[str, CategoryAssessment]:
    """Fit `config` on each category and assess it on every part (see the module docstring); `metrics`: the
    quality metrics to bootstrap (`n_boot` resamples, 0 for none)."""
    cfg = config if isinstance(config, TrialConfig) else TrialConfig.from_dict(config)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    backbone = create_backbone(cfg.backbone.name, cfg.layers, cfg.backbone.weights).to(device)
    source = FeatureSource(backbone, cfg, device, cache)
    wanted = [m for m in metrics if m in QUALITY_METRICS]
    out: dict[str, CategoryAssessment] = {}
    for category in categories:
        scored, fit_seconds = _fit_and_score(cfg, source, data_root, category)
        out[category] = _assess_scored(scored, fit_seconds, category, holdout, wanted, n_boot, seed, data_root)
        progress(f"  {category}: " + ", ".join(f"{part} {m} {fig.metrics[m]:.4f}" for part, fig in
                                                out[category].parts.items() for m in wanted[:1]))
    return out


def _fit_and_score(cfg: TrialConfig, source: FeatureSource, data_root: str | Path,
                   category: str) -> tuple[ScoredImages, float]:
    """Fit the head on the category (a trainable head: all its epochs) and score all its test images."""
    head = create_head(cfg.head_name, **cfg.head_params)
    if not HEADS[cfg.head_name].trainable:
        fit_seconds = fit_category(head, source, data_root, category)
        return score_test(head, source, data_root, category, holdout=None), fit_seconds
    head.setup(source.backbone, source.device)
    with training_source(source) as training:
        data = load_category(training, data_root, category, head.holdout_count)
        seconds = data.train_seconds_per_image * len(data.train_images)
        for _ in range(head.epochs):
            seconds += train_epoch(head, data, training.device)[1]
        return score_category(head, training, data), seconds


def _assess_scored(scored: ScoredImages, fit_seconds: float, category: str, holdout: Holdout | None,
                   metrics: Sequence[str], n_boot: int, seed: int, data_root: str | Path) -> CategoryAssessment:
    if holdout is None:
        parts = {TEST: np.arange(len(scored.labels))}
    else:
        paths, defect_types = list_test(data_root, category)  # the order the scored images are in
        parts = holdout.split(paths, defect_types, category)
    chooser = parts.get(VALIDATION, parts[TEST])  # the seg threshold comes from these images' good maps
    threshold, method = good_threshold(scored.subset(chooser).good_maps().numpy())
    figures: dict[str, PartFigures] = {}
    boot_seconds = 0.0
    for part, index in parts.items():
        subset = scored.subset(index)
        figures[part] = PartFigures(subset.metrics(pixel_threshold=threshold), n_images=len(index))
        if n_boot and metrics:
            begun = time.perf_counter()
            resamples = part_resamples(subset.defect_types, n_boot, seed, category, part)
            figures[part].replicates = {
                m: bootstrap.replicates(m, resamples, labels=subset.labels, scores=subset.scores.numpy(),
                                        masks=subset.masks.numpy(), maps=subset.maps.numpy(),
                                        pixel_threshold=threshold)
                for m in metrics}
            boot_seconds += time.perf_counter() - begun
    where = "validation" if VALIDATION in parts else "test"
    return CategoryAssessment(figures, round(fit_seconds, 4), round(scored.ms_per_image, 3), threshold,
                              f"{method} of the {where} part's good images", round(boot_seconds, 4))
