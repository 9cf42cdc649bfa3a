"""The head protocol, the settings check and the head registry.

A head is a scikit-learn style estimator: its constructor stores the settings exactly as given;
`constraints` declares what each setting allows and `_validate_params()` checks them (at
`create_head` and at the start of `fit` / `fit_batches` / `setup`); what fitting learns lives in
attributes ending in "_", declared on the class; `fit` returns the head; scoring before any of
`fitted_attributes` is set raises NotFittedError. `onnx_scorer(layers)` gives the head's scoring as
an ONNX-friendly module (its own rewrite, else its scoring traced as is).
"""
from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Mapping, Sequence, Union

import torch
from torch import nn

from anoseg.errors import ConfigError, NotFittedError
from anoseg.features import combine_layers

if TYPE_CHECKING:
    from typing_extensions import Self


Constraint = tuple[Callable[[Any], bool], str]  # (predicate on the value, the allowed values in words)
Scores = tuple[torch.Tensor, Union[torch.Tensor, None]]  # patch maps (N, h, w), image scores (N,) or None


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


SEED: Constraint = (lambda v: is_int(v) and v >= 0, "a non-negative integer")


class HeadBase(ABC):
    """What every head has: a registry name, settings as constructor arguments (stored as given,
    checked against `constraints`) and learned state that round-trips through `state_dict()` /
    `load_state_dict()` as tensors and plain numbers only."""

    name: ClassVar[str]
    trainable: ClassVar[bool] = False  # True: a TrainableHead (trains on images for `epochs` epochs)
    constraints: ClassVar[dict[str, Constraint]] = {}  # setting -> (predicate, allowed values in words)
    fitted_attributes: ClassVar[tuple[str, ...]] = ()  # learned attributes (class default None) set once fitted
    fit_call: ClassVar[str]  # what makes the head fitted, for NotFittedError
    has_onnx_rewrite: ClassVar[bool] = False  # onnx_scorer() is a rewrite (else the scoring traced as is)
    patch_size: int = 1  # neighbourhood the feature extractor averages over before the head sees it

    @abstractmethod
    def state_dict(self) -> dict[str, Any]: ...

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    @abstractmethod
    def cpu_copy(self) -> Self:
        """A copy of the fitted head that scores on the CPU in float32 (the original stays as it is)."""

    @abstractmethod
    def onnx_scorer(self, layers: Sequence[str]) -> nn.Module:
        """The head's scoring as a module on the CPU (float32) that ONNX can export:
        forward(images (N, 3, S, S) in [0, 1], layer maps {layer: (N, C, h, w)}) -> (patch maps
        (N, h', w'), image scores (N,) or None), as the head scores the selected `layers`."""

    @classmethod
    def effective_params(cls, params: Mapping[str, Any], n_channels: int) -> dict[str, Any]:
        """The settings as the head would run them on `n_channels` combined channels: every setting, defaults
        filled in; a head clamps what it would clamp and puts settings it would ignore at their defaults,
        so two settings with the same effective form give the same results (the search answers the second
        from the first)."""
        return {**head_defaults(cls.name), **params}

    def get_params(self) -> dict[str, Any]:
        """The constructor settings, as given."""
        return {p: getattr(self, p) for p in inspect.signature(type(self).__init__).parameters if p != "self"}

    def _validate_params(self) -> None:
        """ConfigError naming the first setting that breaks its constraint and what it allows."""
        for param, (ok, allowed) in self.constraints.items():
            value = getattr(self, param)
            if not ok(value):
                raise ConfigError(f"head {self.name!r}: {param} must be {allowed}, got {value!r}")

    def _check_fitted(self, method: str) -> None:
        """NotFittedError unless every one of `fitted_attributes` is set."""
        if any(getattr(self, attr) is None for attr in self.fitted_attributes):
            raise NotFittedError(f"head {self.name!r} is not fitted: call {self.fit_call} before {method}()")


class Head(HeadBase):
    """Models normal features; scores test features per position (fit once on the training features)."""

    fit_call = "fit() (or load_state_dict())"

    @abstractmethod
    def fit(self, features: torch.Tensor) -> Self:
        """Learn from defect-free features (N, C, H, W); returns the head."""

    def fit_batches(self, batches: Iterable[torch.Tensor]) -> Self:
        """Learn from defect-free features given in batches (each (n, C, H, W)); by default they are
        concatenated and passed to `fit`. A head that can accumulate overrides it to keep memory flat."""
        self._validate_params()
        return self.fit(torch.cat(list(batches)))

    def input_channels(self, n_channels: int) -> torch.Tensor | None:
        """Which of the `n_channels` combined channels the head reads (sorted indices), None: all.

        `head_features` builds only these, so a head that uses a subset never costs the full map.
        """
        return None

    @abstractmethod
    def score(self, features: torch.Tensor) -> Scores:
        """Patch-level anomaly maps (N, H, W) and image scores (N,) or None (= max of the final map)."""

    def onnx_scorer(self, layers: Sequence[str]) -> nn.Module:
        self._check_fitted("onnx_scorer")
        return LayerScorer(self.onnx_feature_scorer(), layers, self.patch_size)

    def onnx_feature_scorer(self) -> nn.Module:
        """A module mapping all combined features (N, C, h, w) to `score()`'s output, on the CPU.
        Default: `score()` of a CPU copy, traced as is; a head whose scoring ONNX cannot take
        (triangular solves, loops over chunks) overrides it with a rewrite."""
        return TracedScorer(self.cpu_copy())

    def cpu_copy(self) -> Self:
        self._check_fitted("cpu_copy")
        head = type(self)(**self.get_params())
        head.load_state_dict({k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in self.state_dict().items()})
        return head

    @staticmethod
    def _check_features(features: torch.Tensor) -> None:
        if features.ndim != 4:
            raise ConfigError(f"features must be (N, C, H, W), got shape {tuple(features.shape)}")


class TrainableHead(HeadBase):
    """A head with a network of its own, trained on the images for `epochs` epochs.

    The trial trains it epoch by epoch and evaluates after every epoch (fidelity = epochs, so
    ASHA can stop it); `training_state()` / `load_training_state()` carry everything a resumed
    trial needs to continue (weights, optimizer, random state), `state_dict()` only what scoring
    needs. Inputs: images (N, 3, S, S) in [0, 1] and the frozen backbone's maps {layer: (N, C, h, w)}.
    """

    trainable = True
    fit_call = "setup(backbone, device)"
    epochs: int

    @abstractmethod
    def setup(self, backbone: torch.nn.Module, device: torch.device | str) -> Self:
        """Build the trainable parts for this (frozen) backbone, before training or load_state_dict;
        returns the head."""

    @abstractmethod
    def train_epoch(self, images: torch.Tensor, layer_maps: Mapping[str, torch.Tensor]) -> float:
        """One pass over the training images; returns the mean loss."""

    def calibrate(self, images: torch.Tensor, layer_maps: Mapping[str, torch.Tensor]) -> None:
        """Statistics on held-out normal images, after an epoch (optional)."""

    @abstractmethod
    def score_images(self, images: torch.Tensor, layer_maps: Mapping[str, torch.Tensor]) -> Scores:
        """Patch-level anomaly maps (N, h, w) and image scores (N,) or None (= max of the final map)."""

    @abstractmethod
    def training_state(self) -> dict[str, Any]: ...

    @abstractmethod
    def load_training_state(self, state: Mapping[str, Any]) -> None: ...

    def holdout_count(self, n_train: int) -> int:
        """How many of `n_train` training images to keep back for `calibrate` (0: none)."""
        return 0

    def onnx_scorer(self, layers: Sequence[str]) -> nn.Module:
        self._check_fitted("onnx_scorer")
        return TracedImageScorer(self.cpu_copy())


class LayerScorer(nn.Module):
    """A feature head's ONNX scorer on layer maps: the selected layers combined on one grid (all
    channels, averaged over the head's patch size), then the head's feature scorer."""

    def __init__(self, scorer: nn.Module, layers: Sequence[str], patch_size: int) -> None:
        super().__init__()
        self.scorer, self.layers, self.patch_size = scorer, list(layers), patch_size

    def forward(self, images: torch.Tensor, layer_maps: Mapping[str, torch.Tensor]) -> Scores:
        return self.scorer(combine_layers(layer_maps, self.layers, self.patch_size))


class TracedScorer(nn.Module):
    """A feature head's own score(), traced as is."""

    def __init__(self, head: Head) -> None:
        super().__init__()
        self.head = head

    def forward(self, features: torch.Tensor) -> Scores:
        return self.head.score(features)


class TracedImageScorer(nn.Module):
    """A trainable head's own score_images(), traced as is; its networks are registered here, so
    their weights are the graph's parameters."""

    def __init__(self, head: TrainableHead) -> None:
        super().__init__()
        self.head = head
        self.networks = nn.ModuleDict({k: v for k, v in vars(head).items() if isinstance(v, nn.Module)})

    def forward(self, images: torch.Tensor, layer_maps: Mapping[str, torch.Tensor]) -> Scores:
        return self.head.score_images(images, layer_maps)


AnyHead = Union[Head, TrainableHead]
HEADS: dict[str, type[HeadBase]] = {}


def register_head(name: str) -> Callable[[type[HeadBase]], type[HeadBase]]:
    """Class decorator: adding a head is one file with this decorator and an import in heads/__init__."""

    def wrap(cls: type[HeadBase]) -> type[HeadBase]:
        if name in HEADS:
            raise ValueError(f"head {name!r} registered twice")
        cls.name = name
        HEADS[name] = cls
        return cls

    return wrap


def head_defaults(name: str) -> dict[str, Any]:
    """The hyper-parameters of a head with their defaults."""
    cls = _head_class(name)
    params = inspect.signature(cls.__init__).parameters
    return {p: v.default for p, v in params.items() if p != "self"}


def create_head(name: str, **params: Any) -> AnyHead:
    """Build a head by registry name, its settings validated: unknown names or settings, or values
    out of range, are a ConfigError listing the allowed ones."""
    cls = _head_class(name)
    allowed = head_defaults(name)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ConfigError(f"head {name!r} has no setting {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    head = cls(**params)
    head._validate_params()
    return head


def _head_class(name: str) -> type[HeadBase]:
    if name not in HEADS:
        raise ConfigError(f"head {name!r} is unknown; allowed: {', '.join(sorted(HEADS))}")
    return HEADS[name]
