"""The head protocol, the head registry and the map post-processing every head shares."""
from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar

import torch
import torch.nn.functional as F
from torchvision.transforms.functional import gaussian_blur

from anoseg.errors import ConfigError

MAP_SIGMA = 4.0


class Head(ABC):
    """Models normal features; scores test features per position.

    Hyper-parameters are constructor arguments (validated there, scikit-learn
    style); learned state lives in `fit` and round-trips through
    `state_dict()` / `load_state_dict()` as tensors and plain numbers only.
    """

    name: ClassVar[str]
    patch_size: int = 1  # neighbourhood the feature extractor averages over before the head sees it

    @abstractmethod
    def fit(self, features: torch.Tensor) -> None:
        """Learn from defect-free features (N, C, H, W)."""

    @abstractmethod
    def score(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Patch-level anomaly maps (N, H, W) and image scores (N,) or None (= max of the final map)."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]: ...

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def get_params(self) -> dict[str, Any]:
        return {p: getattr(self, p) for p in inspect.signature(type(self).__init__).parameters if p != "self"}

    @staticmethod
    def _check_features(features: torch.Tensor) -> None:
        if features.ndim != 4:
            raise ConfigError(f"features must be (N, C, H, W), got shape {tuple(features.shape)}")


HEADS: dict[str, type[Head]] = {}


def register_head(name: str) -> Callable[[type[Head]], type[Head]]:
    """Class decorator: adding a head is one file with this decorator and an import in heads/__init__."""

    def wrap(cls: type[Head]) -> type[Head]:
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


def create_head(name: str, **params: Any) -> Head:
    """Build a head by registry name; unknown names or settings are a ConfigError listing the allowed ones."""
    cls = _head_class(name)
    allowed = head_defaults(name)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ConfigError(f"head {name!r} has no setting {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    return cls(**params)


def _head_class(name: str) -> type[Head]:
    if name not in HEADS:
        raise ConfigError(f"head {name!r} is unknown; allowed: {', '.join(sorted(HEADS))}")
    return HEADS[name]


def check_param(head: str, param: str, value: Any, ok: bool, allowed: str) -> None:
    """Raise a ConfigError naming the head setting and its allowed values unless `ok`."""
    if not ok:
        raise ConfigError(f"head {head!r}: {param} must be {allowed}, got {value!r}")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def anomaly_maps(patch_maps: torch.Tensor, size: int, sigma: float = MAP_SIGMA) -> torch.Tensor:
    """Upsample patch maps (N, h, w) bilinearly to `size` x `size` and smooth with a Gaussian (sigma 4)."""
    maps = F.interpolate(patch_maps[:, None].float(), size=(size, size), mode="bilinear", align_corners=False)
    if sigma > 0:
        kernel = 2 * int(4.0 * sigma + 0.5) + 1
        maps = gaussian_blur(maps, kernel_size=[kernel, kernel], sigma=[sigma, sigma])
    return maps[:, 0]


def final_maps(head: Head, features: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Score features: anomaly maps (N, size, size) and image scores (the head's own, else the map maximum)."""
    patch_maps, image_scores = head.score(features)
    maps = anomaly_maps(patch_maps, size)
    return maps, maps.amax(dim=(1, 2)) if image_scores is None else image_scores
