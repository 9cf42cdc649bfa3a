"""A fitted anomaly model of one category: fit it, predict with it, save it and load it back.

Thresholds are chosen on the category's test set: ``image`` is the image-score threshold of the best
image F1 (an image is *fail* when its score is >= it), ``pixel`` the anomaly-map threshold of the best
pixel F1 (see :mod:`anoseg.thresholds`). The files of a saved model: :mod:`anoseg.model_folder`.

Images: :meth:`FittedModel.predict` takes a float tensor (N, 3, S, S) in [0, 1] at the model's image
size S (a (3, S, S) tensor is one image); anything else is a DataError saying what was expected.
:meth:`FittedModel.predict_files` reads files of any size and mode exactly as the dataset loader
does (:mod:`anoseg.data.images`). Maps come back at S x S.
"""
from __future__ import annotations

import datetime as _dt
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

import anoseg
from anoseg.backbones import create_backbone
from anoseg.config import TrialConfig
from anoseg.data import category_fingerprint, load_images, load_test, load_train, resolve_categories
from anoseg.errors import DataError
from anoseg.features import resolve_device, synchronize
from anoseg.heads import AnyHead, create_head
from anoseg.metrics import evaluate
from anoseg.model_folder import BACKBONE_PREFIX, FORMAT, FORMAT_VERSION, HEAD_PREFIX, MODEL_FILE, WEIGHTS_FILE, \
    ModelError, read_model_info, read_model_tensors, write_model_folder
from anoseg.pipeline import MAP_SIGMA, FeatureSource, fit_feature_head, patch_scores, score_batches, train_head
from anoseg.thresholds import choose_thresholds

__all__ = ["FittedModel", "ModelError", "fit_model", "load_model"]


@dataclass
class FittedModel:
    """A backbone + fitted head for one category, with its thresholds; see the module docstring."""

    config: TrialConfig
    backbone: torch.nn.Module
    head: AnyHead
    device: torch.device
    info: dict[str, Any] = field(default_factory=dict)  # the model.json content (without the tensors)

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def category(self) -> str | None:
        return self.info.get("category")

    @property
    def thresholds(self) -> dict[str, float]:
        return dict(self.info.get("thresholds") or {})

    @property
    def metrics(self) -> dict[str, float]:
        return dict(self.info.get("metrics") or {})

    def to(self, device: str | torch.device) -> "FittedModel":
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.backbone.to(self.device)
        return self

    def check_images(self, images: Any) -> torch.Tensor:
        """`images` as (N, 3, S, S) float in [0, 1], or a DataError saying what is wrong."""
        s = self.image_size
        want = f"a float tensor (N, 3, {s}, {s}) of RGB images in [0, 1]"
        if not isinstance(images, torch.Tensor):
            raise DataError(f"predict expects {want}; got {type(images).__name__} (use predict_files for files)")
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[1] != 3:
            raise DataError(
                f"predict expects {want}; got shape {tuple(images.shape)} "
                "(convert grayscale / RGBA / other channel counts to RGB first; predict_files does it)"
            )
        if tuple(images.shape[-2:]) != (s, s):
            raise DataError(
                f"this model was fitted at {s}x{s}; got images of {images.shape[-2]}x{images.shape[-1]} "
                "(resize them first; predict_files resizes any size)"
            )
        if len(images) == 0:
            raise DataError("predict got no images (N = 0)")
        if not images.is_floating_point():
            raise DataError(f"predict expects {want}; got dtype {images.dtype} (divide 8-bit images by 255)")
        low, high = float(images.min()), float(images.max())
        if not (np.isfinite(low) and np.isfinite(high)) or low < -1e-3 or high > 1 + 1e-3:
            raise DataError(f"predict expects {want}; got values in [{low:g}, {high:g}]"
                            + (" (divide 8-bit values by 255)" if high > 1.5 else ""))
        return images

    @torch.inference_mode()
    def predict(self, images: torch.Tensor, batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Anomaly maps (N, S, S) and image scores (N,) on the CPU for images (N, 3, S, S) in [0, 1]."""
        images = self.check_images(images)
        size = batch_size or self.config.batch_size
        stream = FeatureSource(self.backbone, self.config, self.device).stream(images, size)
        batches = ((maps, images[first:first + size]) for first, maps in zip(range(0, len(images), size), stream))
        maps, scores, _ = score_batches(self.head, batches, self.config, self.device)
        return maps, scores

    def predict_files(self, paths: Sequence[str | Path]) -> tuple[torch.Tensor, torch.Tensor]:
        """Maps and scores for image files of any size (RGB-converted, resized to S x S); an unreadable
        file is a DataError naming it."""
        return self.predict(load_images(paths, self.image_size))

    def verdicts(self, scores: torch.Tensor) -> list[str]:
        """"fail" where the image score reaches the image threshold, else "pass"."""
        t = self.thresholds["image"]
        return ["fail" if float(s) >= t else "pass" for s in scores]

    def save(self, out_dir: str | Path) -> Path:
        """Write the model folder (model.json and weights.safetensors) into `out_dir`."""
        self.info = write_model_folder(out_dir, self.info, self.backbone.state_dict(), self.head.state_dict(),
                                       self.config.head_name)
        return Path(out_dir)


def _backbone_info(backbone: Any, cfg: TrialConfig) -> dict[str, Any]:
    return {
        "name": cfg.backbone.name,
        "weights": getattr(backbone, "weights", cfg.backbone.weights),
        "weights_detail": getattr(backbone, "weights_detail", ""),
        "pretrained": bool(getattr(backbone, "pretrained", cfg.backbone.weights != "none")),
        "layers": list(cfg.layers),
        "channels": dict(getattr(backbone, "channels", {})),
        "strides": dict(getattr(backbone, "strides", {})),
        "mean": list(backbone.mean),
        "std": list(backbone.std),
        "size_divisor": int(getattr(backbone, "size_divisor", 1)),
        "state_dict_prefix": BACKBONE_PREFIX,
    }


def fit_model(
    config: TrialConfig | Mapping[str, Any],
    data_root: str | Path,
    category: str,
    out_dir: str | Path | None = None,
    device: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> FittedModel:
    """Fit backbone + head on `category`'s train/good images, evaluate on its test set, choose the
    thresholds there and (with `out_dir`) save the model folder. Returns the FittedModel."""
    say = progress or (lambda _msg: None)
    cfg = config if isinstance(config, TrialConfig) else TrialConfig.from_dict(config)
    resolve_categories(data_root, [category])
    dev = resolve_device(device or cfg.device)
    torch.manual_seed(cfg.seed)
    backbone = create_backbone(cfg.backbone.name, cfg.layers, cfg.backbone.weights).to(dev)
    head = create_head(cfg.head_name, **cfg.head_params)
    source = FeatureSource(backbone, cfg, dev)
    if head.trainable:
        say(f"training {cfg.head_name} for {head.epochs} epochs on the training images of {category} "
            f"({cfg.backbone.name}, {backbone.weights})")
        fit_seconds, n_train = train_head(head, source, data_root, category, say)
    else:
        train = load_train(data_root, category, cfg.image_size)
        say(f"fitting {cfg.head_name} on {len(train)} training images of {category} ({cfg.backbone.name}, {backbone.weights})")
        synchronize(dev)
        start = time.perf_counter()
        fit_feature_head(head, source.stream(train), cfg.layers)
        synchronize(dev)
        fit_seconds = time.perf_counter() - start
        n_train = len(train)
        del train

    model = FittedModel(cfg, backbone, head, dev)
    test = load_test(data_root, category, cfg.image_size)
    say(f"evaluating on {len(test.images)} test images")
    start = time.perf_counter()
    maps, scores = model.predict(test.images)
    synchronize(dev)
    ms_per_image = (time.perf_counter() - start) * 1000 / len(test.images)

    labels = np.asarray(test.labels).astype(bool)
    metrics: dict[str, float] = {}
    if labels.any() and not labels.all():
        metrics = evaluate(maps, scores, test.masks, test.labels)
    thresholds = choose_thresholds(labels, scores.numpy(), test.masks.numpy(), maps.numpy(), "the test set")
    metrics.update(fit_seconds=round(fit_seconds, 4), ms_per_image=round(ms_per_image, 3))
    good = ~labels
    model.info = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "anoseg_version": anoseg.__version__,
        "torch_version": torch.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "category": category,
        "config": cfg.to_dict(),
        "image_size": cfg.image_size,
        "preprocessing": {
            "input": "RGB float in [0, 1], (N, 3, S, S) with S = image_size",
            "files": "PIL convert('RGB'), bilinear resize to image_size x image_size",
            "normalisation": "(x - backbone.mean) / backbone.std",
        },
        "backbone": _backbone_info(backbone, cfg),
        "head": {"name": cfg.head_name, "params": head.get_params(), "state_dict_prefix": HEAD_PREFIX},
        "postprocessing": {"upsample": "bilinear to image_size", "gaussian_sigma": MAP_SIGMA,
                           "image_score": "head" if _head_scores(model, test.images[:1]) else "map maximum"},
        "thresholds": thresholds,
        "map_range": {"min": float(maps.min()), "max": float(maps.max()),
                      "good_median": float(maps[torch.from_numpy(good)].median()) if good.any() else None,
                      "good_max": float(maps[torch.from_numpy(good)].max()) if good.any() else None},
        "metrics": metrics,
        "data": {"root": str(Path(data_root).resolve()), "category": category,
                 "fingerprint": category_fingerprint(data_root, category),
                 "n_train": n_train, "n_test": int(len(labels)), "n_test_defective": int(labels.sum())},
    }
    if out_dir is not None:
        model.save(out_dir)
    return model


def _head_scores(model: FittedModel, image: torch.Tensor) -> bool:
    """Whether the head gives its own image score (else the score is the map maximum)."""
    with torch.inference_mode():
        layer_maps = next(FeatureSource(model.backbone, model.config, model.device).stream(image))
        return patch_scores(model.head, layer_maps, model.config.layers, image)[1] is not None


def load_model(path: str | Path, device: str | None = None, verify: bool = True) -> FittedModel:
    """Rebuild a saved model from model.json + weights.safetensors (no pickle anywhere).

    The backbone is built without weights and receives the saved state dict; the head is created
    with the saved settings and receives its tensors. `verify` checks the weights file's SHA-256.
    """
    folder = Path(path)
    info = read_model_info(folder)
    state, head_state = read_model_tensors(folder, info, verify)
    weights_path = folder / WEIGHTS_FILE
    cfg = TrialConfig.from_dict(info["config"], source=f"{folder / MODEL_FILE}: config")
    dev = resolve_device(device or cfg.device)
    bb_info = info["backbone"]
    backbone = create_backbone(cfg.backbone.name, cfg.layers, "none")
    result = backbone.load_state_dict(state, strict=False)
    # A backbone built without pretrained weights may use BatchNorm where the pretrained build froze it
    # (torchvision detection models): only BatchNorm's step counters may be missing then.
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise ModelError(
            f"{weights_path} does not fit backbone {cfg.backbone.name} {list(cfg.layers)}: "
            f"{len(missing)} missing tensors (e.g. {missing[:3]}), "
            f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:3]})"
        )
    backbone.mean = tuple(float(v) for v in bb_info["mean"])
    backbone.std = tuple(float(v) for v in bb_info["std"])
    backbone.weights = f"{bb_info.get('weights')} (saved in {WEIGHTS_FILE})"
    backbone.weights_detail = bb_info.get("weights_detail", "")
    backbone.pretrained = bool(bb_info.get("pretrained"))
    backbone.to(dev)

    head_info = info["head"]
    head = create_head(head_info["name"], **head_info.get("params", {}))
    if head.trainable:
        head.setup(backbone, dev)  # builds the network the saved weights go into
    head.load_state_dict({k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in head_state.items()})
    return FittedModel(cfg, backbone, head, dev, info)
