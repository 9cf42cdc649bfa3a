"""A fitted anomaly model of one category: fit it, predict with it, save it and load it back.

Thresholds never see the test images they are reported on. The category's test images are split by
the holdout protocol (:class:`anoseg.holdout.Holdout`: stratified, deterministic) into a validation
part and a test part. The thresholds are chosen on the validation part only: ``image`` is the
image-score threshold of the best image F1 there (an image is *fail* when its score is >= it),
``pixel`` the anomaly-map threshold of the best pixel F1 there (:func:`anoseg.thresholds.choose_thresholds`);
a validation part without defective images gives thresholds from its good images only
(:func:`anoseg.thresholds.thresholds_from_good`: mean + 3 std, as MVTec AD 2). The model's ``metrics`` are
those of the test part: every metric of :func:`anoseg.metrics.evaluate` (seg_f1 at the chosen pixel
threshold) and the F1, precision and recall of images and pixels at the chosen thresholds. A category
too small to split (or ``holdout=None``) gets thresholds from its good test images only and metrics of
all its test images, labelled so. model.json records the split, how each threshold was chosen
(``thresholds.method``, ``thresholds.chosen_on``) and which images the metrics are of (``metrics_on``).
The files of a saved model: :mod:`anoseg.model_folder`.

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
from anoseg.data import category_fingerprint, list_test, load_images, load_test, load_train, resolve_categories
from anoseg.errors import DataError
from anoseg.features import resolve_device, synchronize
from anoseg.heads import AnyHead, create_head
from anoseg.holdout import TEST, VALIDATION, Holdout
from anoseg.metrics import LOW_FPR_LIMIT, aupro, evaluate, f1_max, pixel_auroc, seg_f1
from anoseg.model_folder import BACKBONE_PREFIX, FORMAT, FORMAT_VERSION, HEAD_PREFIX, MODEL_FILE, WEIGHTS_FILE, \
    ModelError, read_model_info, read_model_tensors, write_model_folder
from anoseg.pipeline import MAP_SIGMA, FeatureSource, fit_feature_head, patch_scores, score_batches, train_head
from anoseg.thresholds import choose_thresholds, good_threshold, thresholds_from_good

__all__ = ["FittedModel", "Holdout", "ModelError", "fit_model", "load_model", "part_metrics",
           "part_thresholds"]


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
        """The figures of the test part (``info["metrics_on"]`` says which images; older folders: all)."""
        return dict(self.info.get("metrics") or {})

    @property
    def split(self) -> dict[str, Any]:
        """How the test images were split for the thresholds ({} for folders written before the split)."""
        return dict(self.info.get("split") or {})

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


#: What the metrics are of when the category's test images are not split.
NO_SPLIT_TOO_SMALL = "the category is too small to split"
NO_SPLIT_ASKED = "no holdout split was asked for"


def part_thresholds(labels: Any, scores: Any, masks: Any, maps: Any, part: str, where: str,
                    good_only: bool = False) -> dict[str, Any]:
    """The image and pixel thresholds chosen on one part of the test images, and how.

    With good and defective images (and not `good_only`): F1-max there (:func:`choose_thresholds`);
    with good images only, or `good_only`: from the good images alone (:func:`thresholds_from_good`,
    mean + 3 std); with defective images only: the highest scores (nothing seen fails). The result has
    ``image``, ``pixel``, ``method`` and ``chosen_on: {part, n_good, n_defective}`` plus, for F1-max,
    the image F1 / precision / recall and the pixel F1 reached on that part (in ``chosen_on``).
    `where` names the part in the method text.
    """
    labels = np.asarray(labels).astype(bool).reshape(-1)
    scores = _numpy(scores).reshape(-1)
    maps = _numpy(maps)
    good = ~labels
    if good.any() and (good_only or not labels.any()):
        why = "" if labels.any() else " (it holds no defective image)"
        chosen = thresholds_from_good(scores[good], maps[good], where + why)
    else:
        chosen = choose_thresholds(labels, scores, _numpy(masks).astype(bool), maps, where)
    figures = {k: chosen.pop(k) for k in ("image_f1", "image_precision", "image_recall", "pixel_f1") if k in chosen}
    chosen["chosen_on"] = {"part": part, "n_good": int(good.sum()), "n_defective": int(labels.sum()), **figures}
    return chosen


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _at_threshold(truth: np.ndarray, values: np.ndarray, threshold: float) -> dict[str, float]:
    """F1, precision and recall of ``value >= threshold`` (compared in float64, as :meth:`FittedModel.verdicts`
    does); precision only when something is flagged, F1 and recall only when something is positive."""
    flagged = values.astype(np.float64, copy=False) >= float(threshold)
    tp = int(np.count_nonzero(flagged & truth))
    n_flagged, n_positive = int(np.count_nonzero(flagged)), int(np.count_nonzero(truth))
    out: dict[str, float] = {}
    if n_positive:
        out["f1"] = 2.0 * tp / (n_flagged + n_positive)
    if n_flagged:
        out["precision"] = tp / n_flagged
    if n_positive:
        out["recall"] = tp / n_positive
    return out


def part_metrics(labels: Any, scores: Any, masks: Any, maps: Any, image_threshold: float,
                 pixel_threshold: float, seg_threshold: float | None = None) -> tuple[dict[str, float], list[str]]:
    """The figures of one part of the test images at the given thresholds, and notes on what could not be
    computed and why.

    With good and defective images: every metric of :func:`anoseg.metrics.evaluate` (seg_f1 at
    `seg_threshold`, by default `pixel_threshold`); with defective images only, its pixel-level metrics. Always what is defined of
    ``image_f1`` / ``image_precision`` / ``image_recall`` and ``pixel_f1`` / ``pixel_precision`` /
    ``pixel_recall`` at the thresholds, and ``image_false_alarm_rate`` (share of good images that fail)
    when there are good images.
    """
    labels = np.asarray(labels).astype(bool).reshape(-1)
    scores, maps, masks = _numpy(scores).reshape(-1), _numpy(maps), _numpy(masks).astype(bool)
    notes: list[str] = []
    n_bad = int(labels.sum())
    seg_threshold = pixel_threshold if seg_threshold is None else seg_threshold
    if 0 < n_bad < len(labels):
        metrics = evaluate(maps, scores, masks, labels, pixel_threshold=seg_threshold)
    elif n_bad == 0:
        metrics = {}
        notes.append(f"the {len(labels)} images hold no defective image: AUROC, AUPRO, F1, recall and miss rate "
                     "need one (only the false-alarm rate is reported)")
    else:
        metrics = {"pixel_auroc": pixel_auroc(masks, maps), "aupro": aupro(masks, maps),
                   "pixel_f1_max": f1_max(masks, maps), "aupro_0.05": aupro(masks, maps, LOW_FPR_LIMIT),
                   "seg_f1": seg_f1(masks, maps, seg_threshold)}
        notes.append(f"the {len(labels)} images are all defective: image AUROC, image F1 max, miss rate and the "
                     "false-alarm rate need good images too (pixel-level metrics only)")
    for level, truth, values, threshold in (("image", labels, scores, image_threshold),
                                            ("pixel", masks, maps, pixel_threshold)):
        figures = _at_threshold(truth, values, threshold)
        metrics.update({f"{level}_{k}": v for k, v in figures.items()})
        if "precision" not in figures and truth.any():
            notes.append(f"{level}_precision: nothing reaches the {level} threshold {threshold:.6g} (undefined)")
    if n_bad < len(labels):
        metrics["image_false_alarm_rate"] = float(np.mean(scores[~labels].astype(np.float64) >= image_threshold))
    return metrics, notes


def _split_parts(paths: Sequence[Path], defect_types: Sequence[str], category: str, holdout: Holdout | None,
                 say: Callable[[str], None]) -> tuple[dict[str, np.ndarray] | None, str]:
    """The holdout split of the test images, or (None, why not) when there is none."""
    if holdout is None:
        return None, NO_SPLIT_ASKED
    try:
        return holdout.split(paths, defect_types, category), ""
    except DataError as exc:
        if "too small to split" not in str(exc):
            raise
        say(f"warning: {exc}. Falling back: the thresholds come from the good test images only (mean + 3 std) "
            "and the metrics are those of all test images, which then chose the thresholds too")
        return None, NO_SPLIT_TOO_SMALL


def _score_images(model: "FittedModel", paths: Sequence[Path], index: np.ndarray
                  ) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor]:
    """(maps, scores, prediction seconds, first image) of the test images at `index` (only those are read)."""
    images = load_images([paths[i] for i in index], model.image_size)
    start = time.perf_counter()
    maps, scores = model.predict(images)
    synchronize(model.device)
    return maps, scores, time.perf_counter() - start, images[:1]


def _file_name(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


def fit_model(
    config: TrialConfig | Mapping[str, Any],
    data_root: str | Path,
    category: str,
    out_dir: str | Path | None = None,
    device: str | None = None,
    progress: Callable[[str], None] | None = None,
    holdout: Holdout | None = Holdout(),
) -> FittedModel:
    """Fit backbone + head on `category`'s train/good images, choose the thresholds on the validation part
    of its test images (`holdout`'s split), report the metrics of the test part and (with `out_dir`) save
    the model folder. Returns the FittedModel; see the module docstring.

    `holdout=None`, or a category too small to split (a warning through `progress`): thresholds from the
    good test images only, metrics of all test images.
    """
    say = progress or (lambda _msg: None)
    cfg = config if isinstance(config, TrialConfig) else TrialConfig.from_dict(config)
    resolve_categories(data_root, [category])
    paths, defect_types = list_test(data_root, category)
    parts, no_split = _split_parts(paths, defect_types, category, holdout, say)
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
    truth = load_test(data_root, category, cfg.image_size, with_images=False)  # masks and labels, no image read
    labels, masks = np.asarray(truth.labels).astype(bool), truth.masks
    everything = np.arange(len(paths))
    if parts is not None:
        chooser, reported = parts[VALIDATION], parts[TEST]
        chosen_where, part = "the validation part", VALIDATION
        metrics_on = f"test part ({len(reported)} images)"
        say(f"choosing the thresholds on the {len(chooser)} validation images")
    else:
        chooser = reported = everything
        chosen_where, part = f"all test images (no holdout: {no_split})", "all test images"
        metrics_on = f"all test images (no holdout: {no_split})"
        say(f"choosing the thresholds on the good ones of all {len(paths)} test images ({no_split})")
    maps, scores, seconds, first = _score_images(model, paths, chooser)
    thresholds = part_thresholds(labels[chooser], scores, masks[torch.as_tensor(chooser)], maps, part, chosen_where,
                                 good_only=parts is None)
    map_range = {"min": float(maps.min()), "max": float(maps.max()), "of": chosen_where}
    good = torch.from_numpy(~labels[chooser])
    map_range.update(good_median=float(maps[good].median()) if good.any() else None,
                     good_max=float(maps[good].max()) if good.any() else None)
    n_scored = len(chooser)
    seg = good_threshold(maps[good].numpy()) if good.any() else (thresholds["pixel"], "the model's pixel threshold")
    if parts is not None:
        say(f"evaluating on the {len(reported)} images of the test part")
        maps, scores, more, _ = _score_images(model, paths, reported)
        seconds, n_scored = seconds + more, n_scored + len(reported)
    metrics, notes = part_metrics(labels[reported], scores, masks[torch.as_tensor(reported)], maps,
                                  thresholds["image"], thresholds["pixel"], seg_threshold=seg[0])
    thresholds.update(seg=seg[0], seg_method=f"{seg[1]} of {chosen_where}")
    if "seg_f1" in metrics:
        notes.append(f"seg_f1 is read at {seg[1]} of {chosen_where} ({seg[0]:.6g}, as in a search); pixel_f1 at "
                     f"the model's pixel threshold ({thresholds['method']})")
    metrics.update(fit_seconds=round(fit_seconds, 4), ms_per_image=round(seconds * 1000 / n_scored, 3))
    if parts is not None:
        split = {"protocol": "holdout", "validation_share": holdout.validation_share, "seed": holdout.seed,
                 **{name: [_file_name(paths[i]) for i in parts[name]] for name in (VALIDATION, TEST)}}
    else:
        split = {"protocol": "none", "reason": no_split}
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
                           "image_score": "head" if _head_scores(model, first) else "map maximum"},
        "thresholds": thresholds,
        "split": split,
        "map_range": map_range,
        "metrics_on": metrics_on,
        "metrics": metrics,
        "metrics_notes": notes,
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
