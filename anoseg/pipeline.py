"""The one fit -> score path: a feature source (frozen backbone + feature cache + timing) and a head.

Every caller goes through here: a search trial (:mod:`anoseg.trial`), ``fit`` and ``predict``
(:mod:`anoseg.model`), the ONNX graph (its post-processing) and the benchmarks.

- :class:`FeatureSource`: the backbone's selected layer maps of images, streamed a batch at a time
  (``fit`` / ``predict``: float32, never stored), or of a whole dataset split through the feature
  cache (trials: fp16, images decoded only on a miss, the extraction time kept with the entry so
  costs do not depend on cache state).
- A feature head is fitted on batches of layer maps (:func:`fit_feature_head`); a trainable head
  (STFPM) is trained epoch by epoch on a category's cached maps (:func:`load_category`,
  :func:`train_epoch`, :func:`train_head`).
- :func:`score_batch` scores one batch: the head's patch maps, upsampled and smoothed
  (:func:`anomaly_maps`), and image scores (the head's own, else the map maximum).

Costs: ``fit_seconds`` = backbone forward over the training images + head fit (+ training epochs);
``ms_per_image`` = backbone forward + scoring + map post-processing per test image. Image decoding
is not counted.
"""
from __future__ import annotations

import math
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from anoseg.cache import CacheKey, FeatureCache, cached_layer_maps
from anoseg.config import TrialConfig
from anoseg.data import category_fingerprint, list_test, load_images, load_test, load_train
from anoseg.data.mvtec import TestSplit
from anoseg.features import combine_layers, extract_layers, iter_layer_maps, layer_map_batches, synchronize, \
    total_channels
from anoseg.heads import AnyHead, Head, TrainableHead
from anoseg.holdout import VALIDATION, Protocol
from anoseg.metrics import evaluate

MAP_SIGMA = 4.0
LayerMaps = Mapping[str, torch.Tensor]
Progress = Callable[[str], None]


# --------------------------------------------------------------------------- post-processing


def gaussian_smooth(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of (N, 1, H, W) maps, kernel 2*round(4 sigma)+1, reflected border.

    The same as torchvision's `gaussian_blur` with that kernel, as two 1-D passes: 2k instead of
    k^2 multiply-adds per pixel (k = 33 at sigma 4).
    """
    radius = int(4.0 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    padded = F.pad(maps, (radius, radius, radius, radius), mode="reflect")
    rows = F.conv2d(padded, kernel.view(1, 1, 1, -1))
    return F.conv2d(rows, kernel.view(1, 1, -1, 1))


def anomaly_maps(patch_maps: torch.Tensor, size: int, sigma: float = MAP_SIGMA) -> torch.Tensor:
    """Upsample patch maps (N, h, w) bilinearly to `size` x `size` and smooth with a Gaussian (sigma 4)."""
    maps = F.interpolate(patch_maps[:, None].float(), size=(size, size), mode="bilinear", align_corners=False)
    return gaussian_smooth(maps, sigma)[:, 0] if sigma > 0 else maps[:, 0]


# --------------------------------------------------------------------------- a head on layer maps


def head_features(head: Head, layer_maps: LayerMaps, layers: Sequence[str]) -> torch.Tensor:
    """What a feature head fits on and scores: `layers` combined on one grid (float32), averaged over
    its patch size, only the channels it reads."""
    return combine_layers(layer_maps, layers, head.patch_size, head.input_channels(total_channels(layer_maps, layers)))


def fit_feature_head(head: Head, batches: Iterable[LayerMaps], layers: Sequence[str],
                     device: torch.device | str | None = None) -> Head:
    """Fit a feature head on batches of layer maps ({layer: (n, C, h, w)}), each turned into head
    features (on `device`, default where the maps are) only when the head asks for it."""
    return head.fit_batches(head_features(head, maps, layers).to(device or next(iter(maps.values())).device)
                            for maps in batches)


def patch_scores(head: AnyHead, layer_maps: LayerMaps, layers: Sequence[str], images: torch.Tensor | None = None,
                 device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The head's patch maps (N, h, w) and own image scores (or None) for one batch; see score_batch."""
    if head.trainable:
        if images is None:
            raise ValueError(f"head {head.name!r} scores images: pass them too")
        return head.score_images(images, layer_maps)
    features = head_features(head, layer_maps, layers)
    return head.score(features if device is None else features.to(device))


def score_batch(head: AnyHead, layer_maps: LayerMaps, layers: Sequence[str], size: int,
                images: torch.Tensor | None = None, device: torch.device | str | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Score one batch: anomaly maps (N, size, size) and image scores (the head's own, else the map maximum).

    A feature head scores the selected layers combined on one grid; a trainable head scores the
    images (N, 3, S, S) against the backbone's maps. `device`: where a feature head scores (default:
    where the maps are).
    """
    patch_maps, image_scores = patch_scores(head, layer_maps, layers, images, device)
    maps = anomaly_maps(patch_maps, size)
    return maps, maps.amax(dim=(1, 2)) if image_scores is None else image_scores


def score_batches(head: AnyHead, batches: Iterable[tuple[LayerMaps, torch.Tensor | None]], cfg: TrialConfig,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Score (layer maps, images or None) batches: maps and scores on the CPU, and the seconds it took."""
    synchronize(device)
    start = time.perf_counter()
    maps_out, scores_out = [], []
    for layer_maps, images in batches:
        maps, scores = score_batch(head, layer_maps, cfg.layers, cfg.image_size, images=images, device=device)
        maps_out.append(maps.float().cpu())
        scores_out.append(scores.float().cpu())
    synchronize(device)
    return torch.cat(maps_out), torch.cat(scores_out), time.perf_counter() - start


# --------------------------------------------------------------------------- where layer maps come from


@dataclass
class SplitMaps:
    """A dataset split's layer maps (fp16, memory-mapped on a cache hit) and their extraction cost."""

    maps: dict[str, torch.Tensor]
    seconds_per_image: float

    def __len__(self) -> int:
        return len(next(iter(self.maps.values())))

    def batches(self, batch_size: int, index: torch.Tensor | None = None) -> Iterator[dict[str, torch.Tensor]]:
        maps = self.maps if index is None else {layer: m[index] for layer, m in self.maps.items()}
        return layer_map_batches(maps, batch_size)


class FeatureSource:
    """A frozen backbone's selected layers for one trial configuration, optionally through the feature cache."""

    def __init__(self, backbone: torch.nn.Module, cfg: TrialConfig, device: torch.device,
                 cache: FeatureCache | None = None) -> None:
        self.backbone, self.cfg, self.device = backbone, cfg, device
        self.cache = cache or FeatureCache(None)

    def stream(self, images: torch.Tensor, batch_size: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """The layer maps of images (N, 3, S, S) in [0, 1], float32 on the device, a batch at a time."""
        return iter_layer_maps(self.backbone, images, batch_size or self.cfg.batch_size, self.device)

    def keys(self, data_root: str | Path, category: str, split: str) -> dict[str, CacheKey]:
        """{layer: the cache key of that layer's maps of `category`'s `split`}."""
        fingerprint = category_fingerprint(data_root, category) if self.cache.enabled else ""
        bb, cfg = self.backbone, self.cfg
        weights_id = bb.weights if bb.pretrained else f"{bb.weights} seed={cfg.seed}"
        return {layer: CacheKey(cfg.backbone.name, weights_id, layer, cfg.image_size, category, split, fingerprint)
                for layer in cfg.layers}

    def split(self, data_root: str | Path, category: str, split: str,
              load: Callable[[], torch.Tensor]) -> SplitMaps:
        """The split's layer maps from the cache, or computed from `load()` (images decoded only then)."""

        def compute(layers: list[str]) -> tuple[dict[str, torch.Tensor], float]:
            images = load()
            synchronize(self.device)
            start = time.perf_counter()
            maps = extract_layers(self.backbone, images, self.cfg.batch_size, self.device)
            synchronize(self.device)
            return {layer: maps[layer] for layer in layers}, (time.perf_counter() - start) / len(images)

        maps, seconds = cached_layer_maps(self.cache, self.keys(data_root, category, split), compute)
        return SplitMaps(maps, seconds)


# --------------------------------------------------------------------------- feature heads


def training_subset(n_train: int, share: float, seed: int) -> torch.Tensor | None:
    """The training images a fit at `share` uses: the first ceil(share * n) of a seeded permutation, in
    order (nested: a larger share holds a smaller one's); None for all of them."""
    if share >= 1:
        return None
    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed))
    return order[:max(2, math.ceil(share * n_train))].sort().values


@dataclass
class ScoredImages:
    """Anomaly maps and image scores of some of a category's test images, with their ground truth."""

    maps: torch.Tensor  # (n, S, S) float32
    scores: torch.Tensor  # (n,)
    masks: torch.Tensor  # (n, S, S) bool
    labels: np.ndarray  # (n,) 1 = defective
    defect_types: list[str]
    ms_per_image: float  # backbone forward + scoring + post-processing

    def subset(self, index: np.ndarray) -> "ScoredImages":
        at = torch.as_tensor(index, dtype=torch.long)
        return ScoredImages(self.maps[at], self.scores[at], self.masks[at], self.labels[index],
                            [self.defect_types[i] for i in index], self.ms_per_image)

    def good_maps(self) -> torch.Tensor:
        """The maps of the good images (what a threshold from good images only is chosen on)."""
        return self.maps[torch.as_tensor(self.labels == 0)]

    def metrics(self, pixel_threshold: float | None = None) -> dict[str, float]:
        """Every quality metric (:func:`anoseg.metrics.evaluate`); `pixel_threshold`: seg_f1's threshold, by
        default chosen on these images' good maps."""
        return evaluate(self.maps, self.scores, self.masks, self.labels, pixel_threshold=pixel_threshold)


    @staticmethod
    def join(parts: Sequence["ScoredImages"]) -> "ScoredImages":
        """One set of several (e.g. real validation images and generated ones); the cost is per image over all."""
        sizes = [len(p.labels) for p in parts]
        ms = sum(p.ms_per_image * n for p, n in zip(parts, sizes)) / max(1, sum(sizes))
        return ScoredImages(torch.cat([p.maps for p in parts]), torch.cat([p.scores for p in parts]),
                            torch.cat([p.masks for p in parts]), np.concatenate([p.labels for p in parts]),
                            [t for p in parts for t in p.defect_types], ms)


def real_index(test: TestSplit, category: str, protocol: Protocol | None, part: str | None) -> np.ndarray | None:
    """The real test images of `part` under `protocol` (None: all of them)."""
    if protocol is None or part is None:
        return None
    return protocol.real_parts(test.paths, test.defect_types, category).get(part, np.zeros(0, dtype=int))


def fit_index(n_train: int, train_share: float, seed: int, held_out: np.ndarray) -> torch.Tensor | None:
    """The training images a head is fitted on: all but the `held_out` ones (the synthetic set's good images),
    and of those the `train_share` subset (:func:`training_subset`); None for all."""
    kept = np.setdiff1d(np.arange(n_train), held_out)
    subset = training_subset(len(kept), train_share, seed)
    if subset is None:
        return None if len(kept) == n_train else torch.as_tensor(kept)
    return torch.as_tensor(kept)[subset]


def fit_category(head: Head, source: FeatureSource, data_root: str | Path, category: str,
                 train_share: float = 1.0, protocol: Protocol | None = None) -> float:
    """Fit a feature head on one category's training images (or a share of them, never those the protocol
    holds out); returns the fit seconds (backbone forward, as measured when cached, + head fit)."""
    cfg, device = source.cfg, source.device
    train = source.split(data_root, category, "train", lambda: load_train(data_root, category, cfg.image_size))
    held_out = protocol.train_held_out(len(train), category) if protocol else np.zeros(0, dtype=int)
    subset = fit_index(len(train), train_share, cfg.seed, held_out)
    n_used = len(train) if subset is None else len(subset)
    synchronize(device)
    start = time.perf_counter()
    fit_feature_head(head, train.batches(cfg.batch_size, subset), cfg.layers, device)
    synchronize(device)
    return train.seconds_per_image * n_used + time.perf_counter() - start


def score_test(head: Head, source: FeatureSource, data_root: str | Path, category: str,
               protocol: Protocol | None = None, part: str | None = VALIDATION) -> ScoredImages:
    """Score a fitted feature head on the category's real test images (only `part` of them under a
    protocol; part None: all); the images are decoded only when their features are not cached."""
    cfg = source.cfg
    test = load_test(data_root, category, cfg.image_size, with_images=False, required=not _optional(protocol))
    index = real_index(test, category, protocol, part)
    if not test.paths or (index is not None and not len(index)):
        return ScoredImages(*_nothing_scored(cfg.image_size))
    test_maps = source.split(data_root, category, "test", lambda: load_images(test.paths, cfg.image_size))
    at = None if index is None else torch.as_tensor(index, dtype=torch.long)
    maps, scores, seconds = score_batches(head, ((b, None) for b in test_maps.batches(cfg.batch_size, at)), cfg,
                                          source.device)
    ms = (test_maps.seconds_per_image + seconds / len(maps)) * 1000
    return ScoredImages(maps, scores, *_ground_truth(test, index), ms)


def _ground_truth(test: TestSplit, index: np.ndarray | None) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """The masks, labels and defect types of the test images at `index` (all for None)."""
    if index is None:
        return test.masks, test.labels, list(test.defect_types)
    return test.masks[torch.as_tensor(index, dtype=torch.long)], test.labels[index], \
        [test.defect_types[i] for i in index]


def _optional(protocol: Protocol | None) -> bool:
    """Whether real test images are optional (a protocol that validates on generated defects)."""
    return protocol is not None and protocol.synthetic


def _nothing_scored(size: int) -> tuple:
    return (torch.zeros(0, size, size), torch.zeros(0), torch.zeros(0, size, size, dtype=torch.bool),
            np.zeros(0, dtype=int), [], 0.0)


def score_synthetic(head: Head, source: FeatureSource, data_root: str | Path, category: str,
                    protocol: Protocol) -> ScoredImages:
    """Score a fitted feature head on the protocol's synthetic set (good images and a generated defect on each)."""
    cfg = source.cfg
    made = synthetic_set(data_root, category, cfg.image_size, protocol)
    maps_of = source.split(data_root, category, protocol.key(), lambda: made.images)
    maps, scores, seconds = score_batches(head, ((b, None) for b in maps_of.batches(cfg.batch_size)), cfg,
                                          source.device)
    ms = (maps_of.seconds_per_image + seconds / len(maps)) * 1000
    return ScoredImages(maps, scores, made.masks, made.labels, made.defect_types, ms)


def score_validation(head: Head, source: FeatureSource, data_root: str | Path, category: str,
                     protocol: Protocol | None) -> ScoredImages:
    """What trials are ranked on: all test images (no protocol), or the protocol's ranking part of the real
    test images together with its synthetic set."""
    if protocol is None:
        return score_test(head, source, data_root, category)
    parts = [score_test(head, source, data_root, category, protocol, protocol.ranking_part)]
    if protocol.synthetic:
        parts.append(score_synthetic(head, source, data_root, category, protocol))
    return ScoredImages.join([p for p in parts if len(p.labels)])


def evaluate_category(head: Head, source: FeatureSource, data_root: str | Path, category: str,
                      train_share: float = 1.0, protocol: Protocol | None = None) -> dict[str, float]:
    """Fit a feature head on one category's training images (or a share of them) and evaluate it on what the
    protocol ranks on (:func:`score_validation`; all test images without one)."""
    fit_seconds = fit_category(head, source, data_root, category, train_share, protocol)
    scored = score_validation(head, source, data_root, category, protocol)
    return {**scored.metrics(), "fit_seconds": round(fit_seconds, 4), "ms_per_image": round(scored.ms_per_image, 3)}


# --------------------------------------------------------------------------- the synthetic set


@dataclass
class SyntheticSet:
    """A protocol's generated validation images of one category: the good bases, then a defect on each."""

    images: torch.Tensor  # (2n, 3, S, S) float in [0, 1]
    masks: torch.Tensor  # (2n, S, S) bool
    labels: np.ndarray  # (2n,)
    defect_types: list[str]  # "good", then "synthetic:<kind>"


_SYNTHETIC: dict[tuple, SyntheticSet] = {}


def synthetic_set(data_root: str | Path, category: str, size: int, protocol: Protocol) -> SyntheticSet:
    """The synthetic set (deterministic; made once per process and dataset content): the good base images
    (training images held out of fitting, or good test images with ``good_source: test``) and, for each, a
    generated defect (:mod:`anoseg.anomalies`) with the category's other training images as its patch pool."""
    key = (str(Path(data_root).resolve()), category, size, protocol.key(), category_fingerprint(data_root, category))
    if key not in _SYNTHETIC:
        from anoseg.anomalies import DefectConfig, generate_batch

        train = load_train(data_root, category, size)
        held_out = protocol.train_held_out(len(train), category)
        if protocol.good_source == "train":
            bases, pool = train[torch.as_tensor(held_out)], train[torch.as_tensor(np.setdiff1d(np.arange(len(train)),
                                                                                                held_out))]
        else:
            paths, types = list_test(data_root, category, required=False)
            chosen = protocol.test_good_bases(paths, types, category)
            bases, pool = load_images([paths[i] for i in chosen], size), train
        defective, masks, kinds = generate_batch(bases, len(bases), seed=protocol.generator_seed(category),
                                                 config=DefectConfig(kinds=protocol.kinds), pool=pool)
        n = len(bases)
        _SYNTHETIC[key] = SyntheticSet(
            torch.cat([bases, defective]), torch.cat([torch.zeros(n, size, size, dtype=torch.bool), masks]),
            np.concatenate([np.zeros(n, dtype=int), np.ones(n, dtype=int)]),
            ["good"] * n + [f"synthetic:{kind}" for kind in kinds])
    return _SYNTHETIC[key]


# --------------------------------------------------------------------------- trainable heads


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] float images -> uint8 (exact for images decoded from 8-bit files)."""
    return (images * 255).round_().to(torch.uint8)


@dataclass
class CategoryData:
    """One category's images (8-bit), the cached backbone maps of them, and the hold-out split."""

    name: str
    train_images: torch.Tensor  # (N, 3, S, S) uint8, all training images
    train_index: torch.Tensor  # the ones the head trains on
    holdout_index: torch.Tensor  # the ones it calibrates on (may be empty)
    test: TestSplit
    test_images: torch.Tensor
    eval_index: np.ndarray | None  # the test images it is evaluated on (None: all)
    train_maps: Callable[[], SplitMaps]  # read back from the cache for each turn
    test_maps: Callable[[], SplitMaps]
    train_seconds_per_image: float  # backbone forward pass, as measured when the maps were cached
    test_seconds_per_image: float
    synthetic: SyntheticSet | None = None  # generated validation images it is evaluated on too
    synthetic_maps: Callable[[], SplitMaps] | None = None


def load_category(source: FeatureSource, data_root: str | Path, category: str, holdout_count: Callable[[int], int],
                  protocol: Protocol | None = None, part: str = VALIDATION) -> CategoryData:
    """Read a category's images, make sure the backbone's maps of them are cached, split off the training
    images the head calibrates on (`holdout_count`; never those the protocol holds out of fitting), and pick
    what it is evaluated on: `part` of the real test images under `protocol` (all without one), and the
    protocol's synthetic set when `part` is the one it ranks on."""
    cfg = source.cfg
    train = load_train(data_root, category, cfg.image_size)
    test = load_test(data_root, category, cfg.image_size, with_images=False, required=not _optional(protocol))
    test_images = load_images(test.paths, cfg.image_size) if test.paths else torch.zeros(0, 3, cfg.image_size,
                                                                                          cfg.image_size)
    train_seconds = source.split(data_root, category, "train", lambda: train).seconds_per_image
    test_seconds = source.split(data_root, category, "test", lambda: test_images).seconds_per_image \
        if test.paths else 0.0
    held_out = protocol.train_held_out(len(train), category) if protocol else np.zeros(0, dtype=int)
    kept = torch.as_tensor(np.setdiff1d(np.arange(len(train)), held_out))
    n_holdout = holdout_count(len(kept))
    order = kept[torch.randperm(len(kept), generator=torch.Generator().manual_seed(cfg.seed))]
    train_u8, test_u8 = to_uint8(train), to_uint8(test_images)
    data = CategoryData(
        category, train_u8, order[n_holdout:].sort().values, order[:n_holdout].sort().values, test, test_u8,
        real_index(test, category, protocol, part),
        lambda: source.split(data_root, category, "train", lambda: train_u8.float() / 255),
        lambda: source.split(data_root, category, "test", lambda: test_u8.float() / 255), train_seconds,
        test_seconds,
    )
    if protocol is not None and protocol.synthetic and part == protocol.ranking_part:
        made = synthetic_set(data_root, category, cfg.image_size, protocol)
        made_u8 = to_uint8(made.images)
        source.split(data_root, category, protocol.key(), lambda: made.images)
        data.synthetic = SyntheticSet(made_u8, made.masks, made.labels, made.defect_types)
        data.synthetic_maps = lambda: source.split(data_root, category, protocol.key(), lambda: made.images)
    return data


def train_epoch(head: TrainableHead, data: CategoryData, device: torch.device) -> tuple[float, float]:
    """One epoch of `head` on `data` plus its calibration; returns (mean loss, seconds)."""
    maps = data.train_maps().maps
    synchronize(device)
    start = time.perf_counter()
    loss = head.train_epoch(data.train_images[data.train_index], {k: m[data.train_index] for k, m in maps.items()})
    if len(data.holdout_index):
        head.calibrate(data.train_images[data.holdout_index], {k: m[data.holdout_index] for k, m in maps.items()})
    synchronize(device)
    return loss, time.perf_counter() - start


def score_category(head: TrainableHead, source: FeatureSource, data: CategoryData) -> ScoredImages:
    """Anomaly maps and image scores of what the category is evaluated on: its real test images at
    ``data.eval_index`` and its synthetic set, if any."""
    at = None if data.eval_index is None else torch.as_tensor(data.eval_index, dtype=torch.long)
    parts = []
    if len(data.test_images) and (at is None or len(at)):
        images = data.test_images if at is None else data.test_images[at]
        parts.append(_score_images(head, source, images, data.test_maps().batches(source.cfg.batch_size, at),
                                   data.test_seconds_per_image, _ground_truth(data.test, data.eval_index)))
    if data.synthetic is not None and data.synthetic_maps is not None:
        made, maps_of = data.synthetic, data.synthetic_maps()
        parts.append(_score_images(head, source, made.images, maps_of.batches(source.cfg.batch_size),
                                   maps_of.seconds_per_image, (made.masks, made.labels, made.defect_types)))
    return ScoredImages.join(parts)


def _score_images(head: TrainableHead, source: FeatureSource, images: torch.Tensor,
                  layer_batches: Iterator[dict[str, torch.Tensor]], forward_seconds: float,
                  truth: tuple[torch.Tensor, np.ndarray, list[str]]) -> ScoredImages:
    size = source.cfg.batch_size
    batches = ((maps, images[first:first + size]) for first, maps in zip(range(0, len(images), size), layer_batches))
    maps, scores, seconds = score_batches(head, batches, source.cfg, source.device)
    return ScoredImages(maps, scores, *truth, (forward_seconds + seconds / len(images)) * 1000)


def evaluate_trained(head: TrainableHead, source: FeatureSource, data: CategoryData,
                     train_seconds: float) -> dict[str, float]:
    """The metrics and costs of a trainable head after its latest epoch on `data`."""
    scored = score_category(head, source, data)
    fit = data.train_seconds_per_image * len(data.train_images) + train_seconds
    return {**scored.metrics(), "fit_seconds": round(fit, 4), "ms_per_image": round(scored.ms_per_image, 3)}


def train_head(head: TrainableHead, source: FeatureSource, data_root: str | Path, category: str,
               progress: Progress = lambda _msg: None) -> tuple[float, int]:
    """Train `head` on one category for all its epochs (``anoseg fit``); returns (fit seconds, training images).

    The backbone's maps are needed every epoch: they are kept in `source`'s cache, or in a temporary one.
    """
    head.setup(source.backbone, source.device)
    with training_source(source) as source:
        data = load_category(source, data_root, category, head.holdout_count)
        seconds = data.train_seconds_per_image * len(data.train_images)
        for epoch in range(1, head.epochs + 1):
            loss, epoch_seconds = train_epoch(head, data, source.device)
            seconds += epoch_seconds
            progress(f"epoch {epoch}/{head.epochs}: loss {loss:.4f} ({epoch_seconds:.1f} s)")
    return seconds, len(data.train_index)


@contextmanager
def training_source(source: FeatureSource) -> Iterator[FeatureSource]:
    """`source` when its cache is on, else the same source over a temporary cache: a trainable head reads
    the backbone's maps every epoch, so they are computed once and kept on disk."""
    if source.cache.enabled:
        yield source
        return
    with tempfile.TemporaryDirectory(prefix="anoseg-features-") as folder:
        yield FeatureSource(source.backbone, source.cfg, source.device, FeatureCache(folder))
