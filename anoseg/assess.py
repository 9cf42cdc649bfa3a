"""The final assessment of a chosen configuration: fitted once per category, scored on every test image (and
on the protocol's synthetic set), its metrics on each part and their bootstrap replicates.

What a search ends with (:mod:`search.finalize`): the trials were ranked on the validation set (the validation
part of the real test images and, for the synthetic and few_shot protocols, the generated defects); here the
chosen ones are evaluated once on the real test part. ``seg_f1`` on the test part uses the pixel threshold
chosen on the validation set's good images (never on the test part). The bootstrap resamples a part's images within
each stratum (good, each defect type) with indices that depend only on the seed, the category and the part,
so every configuration sees the same resamples: the replicates of two configurations are paired
(:mod:`anoseg.bootstrap`).

Without a holdout split (``protocol: test``) the one part is all test images, named ``test``: the figures
the trials were ranked on, reported with their intervals.
"""
from __future__ import annotations

import dataclasses
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
from anoseg.holdout import TEST, VALIDATION, Protocol
from anoseg.metrics import QUALITY_METRICS
from anoseg.pipeline import FeatureSource, ScoredImages, fit_category, load_category, score_category, score_synthetic, \
    score_test, train_epoch, training_source
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
    notes: list[str] = field(default_factory=list)  # parts without figures, and why


def part_resamples(strata: Sequence[str], n_boot: int, seed: int, category: str, part: str) -> np.ndarray:
    """The bootstrap resamples of one part of one category (the same for every configuration)."""
    return bootstrap.resample_indices(strata, n_boot, bootstrap.category_seed(seed, f"{category}:{part}"))


def assess_config(config: TrialConfig | Mapping[str, Any], data_root: str | Path, categories: Sequence[str],
                  protocol: Protocol | None, metrics: Sequence[str], n_boot: int, seed: int,
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
        real, synthetic, fit_seconds = _fit_and_score(cfg, source, data_root, category, protocol)
        parts = _parts(real, synthetic, data_root, category, protocol)
        out[category] = _assess_parts(parts, fit_seconds, real.ms_per_image, category, wanted, n_boot, seed)
        progress(f"  {category}: " + ", ".join(f"{part} {m} {fig.metrics[m]:.4f}" for part, fig in
                                                out[category].parts.items() for m in wanted[:1]) +
                 "".join(f"; {note}" for note in out[category].notes))
    return out


def _fit_and_score(cfg: TrialConfig, source: FeatureSource, data_root: str | Path, category: str,
                   protocol: Protocol | None) -> tuple[ScoredImages, ScoredImages | None, float]:
    """Fit the head on the category (a trainable head: all its epochs; never on the images the protocol holds
    out) and score all its real test images, and the protocol's synthetic set if it has one."""
    head = create_head(cfg.head_name, **cfg.head_params)
    with_synthetic = protocol is not None and protocol.synthetic
    if not HEADS[cfg.head_name].trainable:
        fit_seconds = fit_category(head, source, data_root, category, protocol=protocol)
        real = score_test(head, source, data_root, category, protocol, part=None)
        synthetic = score_synthetic(head, source, data_root, category, protocol) if with_synthetic else None
        return real, synthetic, fit_seconds
    head.setup(source.backbone, source.device)
    with training_source(source) as training:
        data = load_category(training, data_root, category, head.holdout_count, protocol)
        seconds = data.train_seconds_per_image * len(data.train_images)
        for _ in range(head.epochs):
            seconds += train_epoch(head, data, training.device)[1]
        real = score_category(head, training, dataclasses.replace(data, eval_index=None, synthetic=None))
        synthetic = score_category(head, training, dataclasses.replace(
            data, eval_index=np.zeros(0, dtype=int))) if data.synthetic is not None else None
        return real, synthetic, seconds


def _parts(real: ScoredImages, synthetic: ScoredImages | None, data_root: str | Path, category: str,
           protocol: Protocol | None) -> dict[str, ScoredImages]:
    """The scored images of each part: what the trials were ranked on (``validation``: real validation images
    and the synthetic set) and the real test part (``test``); protocol test: one part, all test images."""
    if protocol is None:
        return {TEST: real}
    paths, defect_types = list_test(data_root, category, required=not protocol.synthetic)
    index = protocol.real_parts(paths, defect_types, category)
    validation = [real.subset(index[VALIDATION])] + ([synthetic] if synthetic is not None else [])
    return {VALIDATION: ScoredImages.join([p for p in validation if len(p.labels)]), TEST: real.subset(index[TEST])}


def _assess_parts(parts: Mapping[str, ScoredImages], fit_seconds: float, ms_per_image: float, category: str,
                  metrics: Sequence[str], n_boot: int, seed: int) -> CategoryAssessment:
    chooser = parts.get(VALIDATION, parts[TEST])  # the seg threshold comes from these images' good maps
    threshold, method = good_threshold(chooser.good_maps().numpy())
    figures: dict[str, PartFigures] = {}
    notes: list[str] = []
    boot_seconds = 0.0
    for part, scored in parts.items():
        n_bad = int(scored.labels.sum())
        if n_bad == 0 or n_bad == len(scored.labels):
            notes.append(f"no {part} figures: its {len(scored.labels)} images hold {n_bad} defective (the metrics "
                         "need good and defective images)")
            continue
        figures[part] = PartFigures(scored.metrics(pixel_threshold=threshold), n_images=len(scored.labels))
        if n_boot and metrics:
            begun = time.perf_counter()
            resamples = part_resamples(scored.defect_types, n_boot, seed, category, part)
            figures[part].replicates = {
                m: bootstrap.replicates(m, resamples, labels=scored.labels, scores=scored.scores.numpy(),
                                        masks=scored.masks.numpy(), maps=scored.maps.numpy(),
                                        pixel_threshold=threshold)
                for m in metrics}
            boot_seconds += time.perf_counter() - begun
    where = "validation set" if VALIDATION in parts else "test set"
    return CategoryAssessment(figures, round(fit_seconds, 4), round(ms_per_image, 3), threshold,
                              f"{method} of the {where}'s good images", round(boot_seconds, 4), notes)
