"""The head protocol, the head registry and the map post-processing every head shares."""
from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Iterable, Mapping, Sequence, Union

import torch
import torch.nn.functional as F

from anoseg.errors import ConfigError
from anoseg.features import combine_layers, total_channels

MAP_SIGMA = 4.0


class HeadBase(ABC):
    """What every head has: a registry name, settings as constructor arguments (validated there,
    scikit-learn style) and learned state that round-trips through `state_dict()` /
    `load_state_dict()` as tensors and plain numbers only."""

    name: ClassVar[str]
    trainable: ClassVar[bool] = False  # True: a TrainableHead (trains on images for `epochs` epochs)
    patch_size: int = 1  # neighbourhood the feature extractor averages over before the head sees it

    @abstractmethod
    def state_dict(self) -> dict[str, Any]: ...

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def get_params(self) -> dict[str, Any]:
        return {p: getattr(self, p) for p in inspect.signature(type(self).__init__).parameters if p != "self"}


class Head(HeadBase):
    """Models normal features; scores test features per position (fit once on the training features)."""

    @abstractmethod
    def fit(self, features: torch.Tensor) -> None:
        """Learn from defect-free features (N, C, H, W)."""

    def fit_batches(self, batches: Iterable[torch.Tensor]) -> None:
        """Learn from defect-free features given in batches (each (n, C, H, W)); by default they are
        concatenated and passed to `fit`. A head that can accumulate overrides it to keep memory flat."""
        self.fit(torch.cat(list(batches)))

    def input_channels(self, n_channels: int) -> torch.Tensor | None:
        """Which of the `n_channels` combined channels the head reads (sorted indices), None: all.

        `head_features` builds only these, so a head that uses a subset never costs the full map.
        """
        return None

    @abstractmethod
    def score(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Patch-level anomaly maps (N, H, W) and image scores (N,) or None (= max of the final map)."""

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
    epochs: int

    @abstractmethod
    def setup(self, backbone: torch.nn.Module, device: torch.device) -> None:
        """Build the trainable parts for this (frozen) backbone; before training or load_state_dict."""

    @abstractmethod
    def train_epoch(self, images: torch.Tensor, layer_maps: Mapping[str, torch.Tensor]) -> float:
        """One pass over the training images; returns the mean loss."""

    def calibrate(self, images: torch.Tensor, layer_maps: Mapping[str, torch.Tensor]) -> None:
        """Statistics on held-out normal images, after an epoch (optional)."""

    @abstractmethod
    def score_images(
        self, images: torch.Tensor, layer_maps: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Patch-level anomaly maps (N, h, w) and image scores (N,) or None (= max of the final map)."""

    @abstractmethod
    def training_state(self) -> dict[str, Any]: ...

    @abstractmethod
    def load_training_state(self, state: Mapping[str, Any]) -> None: ...

    def holdout_count(self, n_train: int) -> int:
        """How many of `n_train` training images to keep back for `calibrate` (0: none)."""
        return 0


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
    """Build a head by registry name; unknown names or settings are a ConfigError listing the allowed ones."""
    cls = _head_class(name)
    allowed = head_defaults(name)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ConfigError(f"head {name!r} has no setting {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    return cls(**params)


def _head_class(name: str) -> type[HeadBase]:
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
    return gaussian_smooth(maps, sigma)[:, 0] if sigma > 0 else maps[:, 0]


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


def patch_scores(
    head: AnyHead, layer_maps: Mapping[str, torch.Tensor], layers: Sequence[str],
    images: torch.Tensor | None = None, device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The head's patch maps (N, h, w) and own image scores (or None) for one batch; see final_maps."""
    if head.trainable:
        if images is None:
            raise ValueError(f"head {head.name!r} scores images: pass them too")
        return head.score_images(images, layer_maps)
    features = head_features(head, layer_maps, layers)
    return head.score(features if device is None else features.to(device))


def fit_head(
    head: Head, layer_map_batches: Iterable[Mapping[str, torch.Tensor]], layers: Sequence[str],
    device: torch.device | str | None = None,
) -> None:
    """Fit a feature head on batches of layer maps ({layer: (n, C, h, w)}), each turned into head
    features (on `device`, default where the maps are) only when the head asks for it."""
    head.fit_batches(head_features(head, maps, layers).to(device or next(iter(maps.values())).device)
                     for maps in layer_map_batches)


def head_features(head: Head, layer_maps: Mapping[str, torch.Tensor], layers: Sequence[str]) -> torch.Tensor:
    """What a feature head fits on and scores: `layers` combined on one grid (float32), averaged over
    its patch size, only the channels it reads."""
    return combine_layers(layer_maps, layers, head.patch_size, head.input_channels(total_channels(layer_maps, layers)))


def final_maps(
    head: AnyHead, layer_maps: Mapping[str, torch.Tensor], layers: Sequence[str], size: int,
    images: torch.Tensor | None = None, device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score one batch: anomaly maps (N, size, size) and image scores (the head's own, else the map maximum).

    A feature head scores the selected layers combined on one grid; a trainable head scores the
    images (N, 3, S, S) in [0, 1] against the backbone's maps. `device`: where a feature head
    scores (default: where the maps are).
    """
    patch_maps, image_scores = patch_scores(head, layer_maps, layers, images, device)
    maps = anomaly_maps(patch_maps, size)
    return maps, maps.amax(dim=(1, 2)) if image_scores is None else image_scores
