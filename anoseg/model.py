"""A fitted anomaly model of one category: fit it, save it as a folder, load it back, predict.

```
models/brick/
  model.json           format + version, the trial configuration, backbone (name, weights provenance,
                       layers, normalisation), image size, head (name, settings, non-tensor state),
                       decision thresholds, metrics reached on the category's test set, data fingerprint
  weights.safetensors  the backbone's state dict (keys "backbone.*") and the head's tensors ("head.*")
```

The folder is self-contained: the backbone weights travel with it, so loading needs neither the
weights package nor the network (a ``pretrained: false`` model says so in model.json). Loading reads
JSON and safetensors only -- nothing is unpickled.

Thresholds are chosen on the category's test set: ``image`` is the image-score threshold of the best
image F1 (an image is *fail* when its score is >= it), ``pixel`` the anomaly-map threshold of the best
pixel F1. Each lies midway between the F1-max score and the next lower score seen, so the test-set
decisions are those of the F1-max point.

Images: :meth:`FittedModel.predict` takes a float tensor (N, 3, S, S) in [0, 1] at the model's image
size S (a (3, S, S) tensor is one image); anything else is a DataError saying what was expected.
:meth:`FittedModel.predict_files` reads files of any size and mode: PIL ``convert("RGB")`` (grayscale
and RGBA become RGB) and a bilinear resize to S x S, exactly as the dataset loader does for training.
Maps come back at S x S.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

import anoseg
from anoseg.config import TrialConfig
from anoseg.errors import AnosegError, ConfigError, DataError

MODEL_FILE = "model.json"
WEIGHTS_FILE = "weights.safetensors"
FORMAT = "anoseg-model"
FORMAT_VERSION = "1.0"  # major.minor: a different major version cannot be read
BACKBONE_PREFIX = "backbone."
HEAD_PREFIX = "head."
#: Sections of an exported configuration (`anoseg export`) that are not TrialConfig fields.
EXPORT_SECTIONS = ("provenance", "metrics")


class ModelError(AnosegError):
    """A model folder is missing, incomplete, corrupted or of another format version."""


# --------------------------------------------------------------------------- exported configurations


@dataclass
class ExportedFile:
    """An `anoseg export` YAML file (or a plain trial configuration).

    kind: "single" (one configuration), "per_category" (``categories: {name: config}``) or "pareto"
    (``pareto: [config, ...]``). ``entries`` maps a key (category name or trial id; "" for single)
    to the raw configuration with its provenance / metrics sections.
    """

    path: Path
    kind: str
    entries: dict[str, dict[str, Any]]
    header: dict[str, Any] = field(default_factory=dict)

    def config(self, key: str = "") -> TrialConfig:
        raw = {k: v for k, v in self.entries[key].items() if k not in EXPORT_SECTIONS}
        where = str(self.path) if self.kind == "single" else f"{self.path}: {self._section}.{key}"
        return TrialConfig.from_dict(raw, source=where)

    @property
    def _section(self) -> str:
        return "categories" if self.kind == "per_category" else "pareto"

    def select(self, category: str | None = None, trial: str | None = None) -> TrialConfig:
        """The one configuration to use: per-category files need `category`, Pareto files `trial`."""
        if self.kind == "single":
            return self.config()
        if self.kind == "per_category":
            if category is None:
                raise ConfigError(f"{self.path} holds one configuration per category "
                                  f"({', '.join(self.entries)}); choose one with --category")
            if category not in self.entries:
                raise ConfigError(f"{self.path} has no configuration for category {category!r}; "
                                  f"it has: {', '.join(self.entries)}")
            return self.config(category)
        if trial is None:
            raise ConfigError(f"{self.path} holds the Pareto set of {len(self.entries)} configurations "
                              f"(trials {', '.join(self.entries)}); choose one with --trial")
        if trial not in self.entries:
            raise ConfigError(f"{self.path} has no trial {trial!r}; it has: {', '.join(self.entries)}")
        return self.config(trial)

    def metrics(self, key: str = "") -> dict[str, Any]:
        return dict(self.entries[key].get("metrics") or {})


def read_exported(path: str | Path) -> ExportedFile:
    """Read an exported configuration (single, per-category or Pareto) or a plain trial configuration."""
    from anoseg.config import read_yaml

    path = Path(path)
    raw = read_yaml(path)
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: expected a mapping (a trial configuration or an `anoseg export` file)")
    header = dict(raw.get("provenance") or {}) if ("categories" in raw or "pareto" in raw) else {}
    if "categories" in raw:
        cats = raw["categories"]
        if not isinstance(cats, Mapping) or not cats or not all(isinstance(v, Mapping) for v in cats.values()):
            raise ConfigError(f"{path}: categories must map each category name to its configuration")
        return ExportedFile(path, "per_category", {str(k): dict(v) for k, v in cats.items()}, header)
    if "pareto" in raw:
        items = raw["pareto"]
        if not isinstance(items, list) or not items or not all(isinstance(v, Mapping) for v in items):
            raise ConfigError(f"{path}: pareto must be a non-empty list of configurations")
        entries = {}
        for i, item in enumerate(items):
            key = str((item.get("provenance") or {}).get("trial_id") or i)
            entries[key] = dict(item)
        return ExportedFile(path, "pareto", entries, header)
    return ExportedFile(path, "single", {"": dict(raw)}, dict(raw.get("provenance") or {}))


def load_exported(path: str | Path, category: str | None = None, trial: str | None = None) -> TrialConfig:
    """The TrialConfig of an `anoseg export` file (provenance and metrics sections ignored) or of a
    plain configuration file. Per-category files need `category`, Pareto files `trial` (a trial id)."""
    return read_exported(path).select(category, trial)


# --------------------------------------------------------------------------- images


def read_image(path: str | Path, size: int) -> torch.Tensor:
    """One image file as (3, size, size) float in [0, 1]: PIL convert("RGB"), bilinear resize (as training)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"cannot read image {path}: " + ("it is a folder" if path.is_dir() else "no such file"))
    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None
    array = np.asarray(rgb.resize((size, size), Image.BILINEAR), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def read_images(
    paths: Sequence[str | Path], size: int, skip_unreadable: bool = False
) -> tuple[torch.Tensor, list[Path], dict[Path, str]]:
    """Images as (N, 3, size, size); with `skip_unreadable`, unreadable files are left out and returned
    as {path: error message} instead of raising a DataError naming the first one."""
    tensors, ok, errors = [], [], {}
    for p in map(Path, paths):
        try:
            tensors.append(read_image(p, size))
            ok.append(p)
        except DataError as exc:
            if not skip_unreadable:
                raise
            errors[p] = str(exc)
    images = torch.stack(tensors) if tensors else torch.empty(0, 3, size, size)
    return images, ok, errors


# --------------------------------------------------------------------------- thresholds


def f1_max_threshold(labels: Any, scores: Any) -> tuple[float, float]:
    """(best F1, threshold) over thresholds ``score >= t``; the threshold lies midway between the F1-max
    score and the next lower score present (any class), so the decisions on these data are unchanged."""
    labels = np.asarray(labels, dtype=bool).reshape(-1)
    scores = np.asarray(scores).reshape(-1)
    if not labels.any():
        raise DataError("a threshold by F1 needs at least one positive (defective) sample")
    pos = np.sort(scores[labels])
    neg = np.sort(scores[~labels])
    candidates = np.unique(pos)
    tp = pos.size - np.searchsorted(pos, candidates, side="left")
    fp = neg.size - np.searchsorted(neg, candidates, side="left")
    f1 = 2.0 * tp / (tp + fp + pos.size)
    best = int(np.argmax(f1))
    t = candidates[best]
    below = max(pos[pos < t].max(initial=-np.inf), neg[neg < t].max(initial=-np.inf))
    threshold = float(t) if not np.isfinite(below) else float((float(t) + float(below)) / 2)
    return float(f1[best]), threshold


# --------------------------------------------------------------------------- the model


@dataclass
class FittedModel:
    """A backbone + fitted head for one category, with its thresholds; see the module docstring."""

    config: TrialConfig
    backbone: torch.nn.Module
    head: Any  # anoseg.heads.Head
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
        from anoseg.features import resolve_device

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
        from anoseg.features import extract_layers
        from anoseg.heads import final_maps

        images = self.check_images(images)
        batch_size = batch_size or self.config.batch_size
        maps_out, scores_out = [], []
        for first in range(0, len(images), batch_size):
            batch = images[first:first + batch_size]
            layer_maps = extract_layers(self.backbone, batch, batch_size, self.device)
            maps, scores = final_maps(self.head, layer_maps, self.config.layers, self.image_size, images=batch)
            maps_out.append(maps.float().cpu())
            scores_out.append(scores.float().cpu())
        return torch.cat(maps_out), torch.cat(scores_out)

    def predict_files(self, paths: Sequence[str | Path]) -> tuple[torch.Tensor, torch.Tensor]:
        """Maps and scores for image files of any size (RGB-converted, resized to S x S); an unreadable
        file is a DataError naming it."""
        images, _, _ = read_images(paths, self.image_size)
        return self.predict(images)

    def verdicts(self, scores: torch.Tensor) -> list[str]:
        """"fail" where the image score reaches the image threshold, else "pass"."""
        t = self.thresholds["image"]
        return ["fail" if float(s) >= t else "pass" for s in scores]

    # ---------------------------------------------------------------- saving
    def tensors(self) -> dict[str, torch.Tensor]:
        """Everything saved to weights.safetensors: backbone state dict and head tensors, prefixed."""
        out = {BACKBONE_PREFIX + k: v for k, v in self.backbone.state_dict().items()}
        out.update({HEAD_PREFIX + k: v for k, v in self.head.state_dict().items() if isinstance(v, torch.Tensor)})
        return {k: v.detach().to("cpu").contiguous().clone() for k, v in out.items()}

    def save(self, out_dir: str | Path) -> Path:
        """Write model.json and weights.safetensors into `out_dir` (created; existing files replaced)."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        head_state = {k: v for k, v in self.head.state_dict().items() if not isinstance(v, torch.Tensor)}
        try:
            json.dumps(head_state)
        except TypeError as exc:
            raise ModelError(f"head {self.config.head_name!r}: state_dict() holds a value that is neither a tensor "
                             f"nor JSON ({exc}); it cannot be saved without pickling") from None
        tensors = self.tensors()
        fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{WEIGHTS_FILE}.")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"format": FORMAT, "format_version": FORMAT_VERSION})
            digest = _sha256(Path(tmp))
            os.chmod(tmp, _file_mode())
            os.replace(tmp, out / WEIGHTS_FILE)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        info = dict(self.info)
        layouts = {k: order for k, v in self.head.state_dict().items()
                   if isinstance(v, torch.Tensor) and (order := _dim_order(v)) is not None}
        info["head"] = {**info.get("head", {}), "state": head_state,
                        "tensors": sorted(k[len(HEAD_PREFIX):] for k in tensors if k.startswith(HEAD_PREFIX)),
                        "layouts": layouts}
        info["files"] = {WEIGHTS_FILE: {"sha256": digest, "bytes": (out / WEIGHTS_FILE).stat().st_size,
                                        "tensors": len(tensors)}}
        self.info = info
        _write_json_atomic(out / MODEL_FILE, info)
        return out


def _dim_order(t: torch.Tensor) -> list[int] | None:
    """For a dense tensor stored in another dimension order than row-major (e.g. a column-major
    Cholesky factor), that order (outermost first); None for row-major or non-dense tensors.

    Saved tensors are row-major; loading restores the order, so that the reloaded head computes
    with the same memory layout and therefore the same roundings as the fitted one."""
    if t.ndim < 2 or t.is_contiguous():
        return None
    order = sorted(range(t.ndim), key=lambda d: (-t.stride(d), d))
    return order if t.permute(order).is_contiguous() else None


def _with_dim_order(t: torch.Tensor, order: Sequence[int] | None) -> torch.Tensor:
    if not order or len(order) != t.ndim:
        return t
    inverse = [0] * len(order)
    for position, dim in enumerate(order):
        inverse[dim] = position
    return t.permute(list(order)).contiguous().permute(inverse)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _file_mode() -> int:
    """rw-r--r--: mkstemp makes owner-only files, a model folder is meant to be shared."""
    return 0o644


def _write_json_atomic(path: Path, payload: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        json.dump(payload, fh, indent=2)
        fh.write("\n")
    os.chmod(tmp, _file_mode())
    os.replace(tmp, path)


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


# --------------------------------------------------------------------------- fit


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
    from anoseg.backbones import create_backbone
    from anoseg.data import category_fingerprint, load_test, load_train, resolve_categories
    from anoseg.features import iter_layer_maps, resolve_device, synchronize
    from anoseg.heads import create_head, fit_head
    from anoseg.metrics import evaluate

    say = progress or (lambda _msg: None)
    cfg = config if isinstance(config, TrialConfig) else TrialConfig.from_dict(config)
    resolve_categories(data_root, [category])
    dev = resolve_device(device or cfg.device)
    torch.manual_seed(cfg.seed)
    backbone = create_backbone(cfg.backbone.name, cfg.layers, cfg.backbone.weights).to(dev)
    head = create_head(cfg.head_name, **cfg.head_params)

    if head.trainable:
        from anoseg.training import fit_trainable

        say(f"training {cfg.head_name} for {head.epochs} epochs on the training images of {category} "
            f"({cfg.backbone.name}, {backbone.weights})")
        fit_seconds, n_train = fit_trainable(head, backbone, cfg, data_root, category, dev, say)
    else:
        train = load_train(data_root, category, cfg.image_size)
        say(f"fitting {cfg.head_name} on {len(train)} training images of {category} ({cfg.backbone.name}, {backbone.weights})")
        synchronize(dev)
        start = time.perf_counter()
        fit_head(head, iter_layer_maps(backbone, train, cfg.batch_size, dev), cfg.layers)
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
    thresholds: dict[str, Any]
    if labels.any() and not labels.all():
        metrics = evaluate(maps, scores, test.masks, test.labels)
        image_f1, image_t = f1_max_threshold(labels, scores.numpy())
        pixel_f1, pixel_t = f1_max_threshold(test.masks.numpy(), maps.numpy())
        predicted = scores.numpy() >= image_t
        thresholds = {
            "image": image_t, "pixel": pixel_t, "method": "f1_max on the test set",
            "image_f1": image_f1, "pixel_f1": pixel_f1,
            "image_precision": float((predicted & labels).sum() / max(1, predicted.sum())),
            "image_recall": float((predicted & labels).sum() / labels.sum()),
        }
    else:  # no defective (or no good) test image: the best we can do is the highest normal score
        thresholds = {"image": float(scores.max()), "pixel": float(maps.max()),
                      "method": "max of the test scores (the test set lacks defective or good images)"}
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
        "postprocessing": {"upsample": "bilinear to image_size", "gaussian_sigma": _map_sigma(),
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
    from anoseg.features import extract_layers
    from anoseg.heads.base import patch_scores

    with torch.inference_mode():
        layer_maps = extract_layers(model.backbone, image, 1, model.device)
        return patch_scores(model.head, layer_maps, model.config.layers, image)[1] is not None


def _map_sigma() -> float:
    from anoseg.heads.base import MAP_SIGMA

    return float(MAP_SIGMA)




# --------------------------------------------------------------------------- load


def read_model_info(path: str | Path) -> dict[str, Any]:
    """model.json of a model folder, checked for format and version; ModelError otherwise."""
    folder = Path(path)
    if not folder.exists():
        raise ModelError(f"model folder {folder} does not exist (create one with `anoseg fit`)")
    if not folder.is_dir():
        raise ModelError(f"{folder} is not a model folder (expected a folder with {MODEL_FILE} and {WEIGHTS_FILE})")
    info_path = folder / MODEL_FILE
    if not info_path.is_file():
        raise ModelError(f"{folder} is not a complete model folder: {MODEL_FILE} is missing "
                         f"(expected {MODEL_FILE} and {WEIGHTS_FILE}, written by `anoseg fit`)")
    try:
        info = json.loads(info_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{info_path} is not valid JSON ({exc}); the model folder is corrupted") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ModelError(f"{info_path} is not an anoseg model description (format {FORMAT!r} expected)")
    version = str(info.get("format_version", "?"))
    if version.split(".")[0] != FORMAT_VERSION.split(".")[0]:
        raise ModelError(
            f"{folder} is a model of format version {version} (written by anoseg "
            f"{info.get('anoseg_version', '?')}); this anoseg {anoseg.__version__} reads format "
            f"{FORMAT_VERSION.split('.')[0]}.x: fit the model again with this version"
        )
    for key in ("config", "backbone", "head", "thresholds"):
        if key not in info:
            raise ModelError(f"{info_path} lacks the {key!r} section; the model folder is corrupted")
    return info


def load_model(path: str | Path, device: str | None = None, verify: bool = True) -> FittedModel:
    """Rebuild a saved model from model.json + weights.safetensors (no pickle anywhere).

    The backbone is built without weights and receives the saved state dict; the head is created
    with the saved settings and receives its tensors. `verify` checks the weights file's SHA-256.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from anoseg.backbones import create_backbone
    from anoseg.features import resolve_device
    from anoseg.heads import create_head

    folder = Path(path)
    info = read_model_info(folder)
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        raise ModelError(f"{folder} is not a complete model folder: {WEIGHTS_FILE} is missing")
    expected = (info.get("files") or {}).get(WEIGHTS_FILE, {}).get("sha256")
    if verify and expected and _sha256(weights_path) != expected:
        raise ModelError(f"{weights_path} does not match the checksum in {MODEL_FILE} (corrupted or replaced)")
    try:
        tensors = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"cannot read {weights_path}: {exc}") from None

    cfg = TrialConfig.from_dict(info["config"], source=f"{folder / MODEL_FILE}: config")
    dev = resolve_device(device or cfg.device)
    bb_info = info["backbone"]
    backbone = create_backbone(cfg.backbone.name, cfg.layers, "none")
    state = {k[len(BACKBONE_PREFIX):]: v for k, v in tensors.items() if k.startswith(BACKBONE_PREFIX)}
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
    head_state: dict[str, Any] = dict(head_info.get("state") or {})
    for name in head_info.get("tensors", []):
        key = HEAD_PREFIX + name
        if key not in tensors:
            raise ModelError(f"{weights_path} lacks the head tensor {key!r}; the model folder is corrupted")
        head_state[name] = _with_dim_order(tensors[key], (head_info.get("layouts") or {}).get(name)).to(dev)
    head.load_state_dict(head_state)
    return FittedModel(cfg, backbone, head, dev, info)


# --------------------------------------------------------------------------- overlays and masks


def heat_colours(values: np.ndarray) -> np.ndarray:
    """A jet-like colour map: values in [0, 1] (H, W) -> RGB floats in [0, 1] (H, W, 3)."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    centres = np.array([3.0, 2.0, 1.0])  # red, green, blue peaks along 4v
    return np.clip(1.5 - np.abs(4.0 * v - centres), 0.0, 1.0)


def overlay(image: torch.Tensor, amap: torch.Tensor, low: float, high: float,
            mask: torch.Tensor | np.ndarray | None = None) -> np.ndarray:
    """The image (3, S, S) in [0, 1] with the anomaly map (S, S) as a heat map, uint8 (S, S, 3).

    The map is scaled from `low` (transparent) to `high` (opaque red); with a ground-truth `mask`
    (S, S) its outline is drawn in green.
    """
    from scipy import ndimage

    img = image.detach().cpu().permute(1, 2, 0).numpy().astype(np.float32)
    v = (amap.detach().cpu().numpy().astype(np.float32) - low) / max(high - low, 1e-12)
    v = np.clip(v, 0.0, 1.0)
    alpha = 0.65 * v[..., None]
    out = img * (1 - alpha) + heat_colours(v) * alpha
    if mask is not None:
        m = np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask).astype(bool)
        edge = m & ~ndimage.binary_erosion(m, border_value=0)
        out[edge] = (0.0, 1.0, 0.0)
    return (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8)


def find_mask(image_path: Path, masks_dir: Path) -> Path | None:
    """The ground-truth mask of `image_path` under `masks_dir`, or None (= defect-free).

    Looked up, in order: ``<masks>/<image's folder name>/<stem>_mask.png`` (the MVTec AD
    ``ground_truth/<defect>/`` layout), ``<masks>/<stem>_mask.png`` and ``<masks>/<stem>.png``
    (flat folders). Any image suffix is accepted for the mask.
    """
    from anoseg.data.mvtec import IMAGE_SUFFIXES

    stem = image_path.stem
    for folder, name in ((masks_dir / image_path.parent.name, f"{stem}_mask"), (masks_dir, f"{stem}_mask"),
                         (masks_dir, stem)):
        for suffix in (".png", *[s for s in IMAGE_SUFFIXES if s != ".png"]):
            candidate = folder / f"{name}{suffix}"
            if candidate.is_file() and candidate.resolve() != image_path.resolve():
                return candidate
    return None


def read_mask(path: Path, size: int) -> torch.Tensor:
    """A mask file as (size, size) bool: any non-zero pixel is anomalous (nearest-neighbour resize)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            mask = img.convert("L").resize((size, size), Image.NEAREST)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"cannot read mask {path}: {exc}") from None
    return torch.from_numpy(np.asarray(mask) > 0)
