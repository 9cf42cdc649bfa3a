"""STFPM (Wang et al. 2021): a student network learns to reproduce a frozen teacher's features.

- Student: the backbone's own architecture, up to the deepest selected layer, from random init
  (seeded), trained on the normal images so that its maps on the selected layers match the
  teacher's after channel-wise L2 normalisation. Defects, never seen in training, are where the
  two disagree.
- Loss per layer: 0.5 / (h w) * sum over the batch and positions of ||t - s||^2 (t, s
  normalised), as in the paper's reference code; layers weighted by `layer_weights`.
- Anomaly map: per layer and position 0.5 ||t - s||^2, resized (bilinear) to the finest selected
  grid and summed with `layer_weights`. The paper multiplies the layer maps instead; a sum stays
  meaningful with discrepancy scaling, whose standardised values can be negative.
- Discrepancy scaling (option): `holdout` of the training images is kept out of training; after
  every epoch the per-position mean and standard deviation of each layer's discrepancy on them
  standardise the maps, (d - mean) / std. This removes what the student never learns even on
  normal images (borders, fine texture) and sharpens the maps. The std is floored at 10% of its
  layer mean: a few held-out images make single-position estimates noisy.

Settings: epochs; lr (None: the optimizer's usual rate, sgd 0.4 as in the paper, adam 0.001);
batch_size; optimizer "sgd" (momentum 0.9, weight decay 1e-4, as in the paper) or "adam";
layer_weights "equal", "shallow" / "deep" (a linear ramp favouring the first / last selected layer) or
comma-separated numbers, one per selected layer ("1,1,0.5");
discrepancy_scaling; holdout (share of the training images, with discrepancy scaling); seed.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from anoseg.errors import ConfigError
from anoseg.heads.base import SEED, TrainableHead, head_defaults, is_int, is_number, register_head

DEFAULT_LR = {"sgd": 0.4, "adam": 1e-3}
STD_FLOOR = 0.1  # discrepancy std floor, as a share of the layer's mean std
WEIGHT_SCHEMES = ("equal", "shallow", "deep")


def _numbers(value: Any) -> list[float]:
    """"1,0.5" or [1, 0.5] -> [1.0, 0.5]; [] unless non-negative numbers, not all zero."""
    parts = value.split(",") if isinstance(value, str) else value
    try:
        weights = [float(p) for p in parts]
    except (TypeError, ValueError):
        return []
    return weights if weights and all(w >= 0 for w in weights) and sum(weights) > 0 else []


def layer_weights_for(value: Any, layers: list[str]) -> list[float]:
    """The weight of each selected layer (shallow to deep): "equal" 1 each; "shallow" L, ..., 1 and "deep"
    1, ..., L (normalised to mean 1); or the given numbers, one per layer."""
    n = len(layers)
    if value == "equal":
        return [1.0] * n
    if value in ("shallow", "deep"):
        ramp = [2.0 * (i + 1) / (n + 1) for i in range(n)]
        return ramp[::-1] if value == "shallow" else ramp
    weights = _numbers(value)
    if len(weights) != n:
        raise ConfigError(f"head 'stfpm': layer_weights {value!r} has {len(weights)} values but the trial selects "
                          f"{n} layers ({', '.join(layers)})")
    return weights


@register_head("stfpm")
class STFPM(TrainableHead):
    constraints = {
        "epochs": (lambda v: is_int(v) and 1 <= v <= 10000, "an integer in [1, 10000]"),
        "lr": (lambda v: v is None or (is_number(v) and 0 < v <= 10), "null or a number in (0, 10]"),
        "batch_size": (lambda v: is_int(v) and 1 <= v <= 4096, "an integer in [1, 4096]"),
        "optimizer": (lambda v: v in tuple(DEFAULT_LR), " or ".join(DEFAULT_LR)),
        "discrepancy_scaling": (lambda v: isinstance(v, bool), "true or false"),
        "holdout": (lambda v: is_number(v) and 0 < v < 1, "a number in (0, 1)"),
        "seed": SEED,
        "layer_weights": (lambda v: v in WEIGHT_SCHEMES or bool(_numbers(v)),
                          f"one of {', '.join(WEIGHT_SCHEMES)} or comma-separated non-negative numbers, one per "
                          "selected layer, not all zero (e.g. \"1,1,0.5\")"),
    }
    fitted_attributes = ("student_",)
    student_: torch.nn.Module | None = None  # the backbone's architecture up to the deepest selected layer
    optimizer_: torch.optim.Optimizer | None
    layers_: list[str]  # the selected layers, shallow to deep
    weights_: list[float]  # their weights
    device_: torch.device
    generator_: torch.Generator  # shuffles the training images
    input_mean_: torch.Tensor  # (1, 3, 1, 1) the backbone's input normalisation
    input_std_: torch.Tensor
    stats_: dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer -> (mean, std) of the discrepancy per position

    def __init__(self, epochs: int = 20, lr: float | None = None, batch_size: int = 16, optimizer: str = "sgd",
                 layer_weights: str = "equal", discrepancy_scaling: bool = False, holdout: float = 0.2,
                 seed: int = 0):
        self.epochs, self.lr, self.batch_size, self.optimizer = epochs, lr, batch_size, optimizer
        self.layer_weights, self.discrepancy_scaling, self.holdout, self.seed = (
            layer_weights, discrepancy_scaling, holdout, seed)

    # ------------------------------------------------------------------ set-up
    @classmethod
    def effective_params(cls, params: Mapping[str, Any], n_channels: int) -> dict[str, Any]:
        """lr null is the optimizer's usual rate; holdout matters only with discrepancy scaling."""
        out = super().effective_params(params, n_channels)
        if out["lr"] is None:
            out["lr"] = DEFAULT_LR.get(out["optimizer"])
        if not out["discrepancy_scaling"]:
            out["holdout"] = head_defaults(cls.name)["holdout"]
        return out

    def setup(self, backbone: torch.nn.Module, device: torch.device | str) -> STFPM:
        from anoseg.backbones import create_backbone

        self._validate_params()
        self.layers_ = list(backbone.layers)
        self.weights_ = layer_weights_for(self.layer_weights, self.layers_)
        self.device_ = torch.device(device)
        self.generator_ = torch.Generator().manual_seed(self.seed)
        self.stats_ = {}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            student = create_backbone(backbone.name, self.layers_, "none")
        student.body.requires_grad_(True)
        self.student_ = student.to(self.device_)
        self.input_mean_ = torch.tensor(backbone.mean, device=self.device_).view(1, 3, 1, 1)
        self.input_std_ = torch.tensor(backbone.std, device=self.device_).view(1, 3, 1, 1)
        params = [p for p in self.student_.body.parameters() if p.requires_grad]
        lr = self.lr or DEFAULT_LR[self.optimizer]
        if self.optimizer == "sgd":
            self.optimizer_ = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)
        else:
            self.optimizer_ = torch.optim.Adam(params, lr=lr)
        return self

    def holdout_count(self, n_train: int) -> int:
        if not self.discrepancy_scaling:
            return 0
        count = max(2, round(self.holdout * n_train))
        if n_train - count < 2:
            raise ConfigError(f"head 'stfpm': discrepancy_scaling keeps {count} of {n_train} training images back "
                              "(holdout); at least 2 must remain for training: lower holdout or add images")
        return count

    def cpu_copy(self) -> STFPM:
        """A copy for scoring on the CPU: its own CPU student and statistics, no optimizer."""
        self._check_fitted("cpu_copy")
        head = copy.copy(self)
        head.student_ = copy.deepcopy(self.student_).to("cpu").float()
        head.optimizer_ = None
        head.device_ = torch.device("cpu")
        head.input_mean_, head.input_std_ = self.input_mean_.cpu(), self.input_std_.cpu()
        head.stats_ = {layer: (mean.cpu(), std.cpu()) for layer, (mean, std) in self.stats_.items()}
        return head

    # ------------------------------------------------------------------ training
    def _student_maps(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = images.to(self.device_, non_blocking=True)
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        return self.student_((x - self.input_mean_) / self.input_std_)

    def _discrepancies(self, images: torch.Tensor, layer_maps: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per layer 0.5 ||t - s||^2 per position, (N, h, w)."""
        student = self._student_maps(images)
        out = {}
        for layer in self.layers_:
            t = F.normalize(layer_maps[layer].to(self.device_).float(), dim=1)
            s = F.normalize(student[layer], dim=1)
            out[layer] = 0.5 * (t - s).square().sum(dim=1)
        return out

    def train_epoch(self, images: torch.Tensor, layer_maps: Mapping[str, torch.Tensor]) -> float:
        self._check_fitted("train_epoch")
        self.student_.body.train(True)
        order = torch.randperm(len(images), generator=self.generator_)
        batches = list(order.split(self.batch_size))
        if len(batches) > 1 and len(batches[-1]) == 1:  # BatchNorm cannot train on one sample
            batches[-2] = torch.cat(batches[-2:])
            batches.pop()
        total = 0.0
        for index in batches:
            disc = self._discrepancies(images[index], {k: layer_maps[k][index] for k in self.layers_})
            loss = sum(w * d.sum() / (d.shape[1] * d.shape[2]) for w, d in zip(self.weights_, disc.values()))
            self.optimizer_.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer_.step()
            total += float(loss.detach())
        self.student_.body.train(False)
        return total / len(images)

    @torch.no_grad()
    def calibrate(self, images: torch.Tensor, layer_maps: Mapping[str, torch.Tensor]) -> None:
        if not self.discrepancy_scaling:
            return
        self._check_fitted("calibrate")
        parts: dict[str, list[torch.Tensor]] = {layer: [] for layer in self.layers_}
        for first in range(0, len(images), self.batch_size):
            sl = slice(first, first + self.batch_size)
            for layer, d in self._discrepancies(images[sl], {k: layer_maps[k][sl] for k in self.layers_}).items():
                parts[layer].append(d)
        for layer, chunks in parts.items():
            d = torch.cat(chunks)
            std = d.std(dim=0)
            self.stats_[layer] = (d.mean(dim=0), std.clamp_min(STD_FLOOR * float(std.mean()) + 1e-12))

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def score_images(self, images: torch.Tensor, layer_maps: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, None]:
        self._check_fitted("score_images")
        self.student_.body.train(False)
        if self.discrepancy_scaling and not self.stats_:
            raise RuntimeError("stfpm: discrepancy_scaling needs calibrate() on held-out images before scoring")
        disc = self._discrepancies(images, layer_maps)
        grid = max((d.shape[-2:] for d in disc.values()), key=lambda s: s[0] * s[1])
        total = None
        for w, (layer, d) in zip(self.weights_, disc.items()):
            if self.discrepancy_scaling:
                mean, std = self.stats_[layer]
                d = (d - mean.to(d.device)) / std.to(d.device)
            if d.shape[-2:] != grid:
                d = F.interpolate(d[:, None], size=tuple(grid), mode="bilinear", align_corners=False)[:, 0]
            total = w * d if total is None else total + w * d
        return total, None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        self._check_fitted("state_dict")
        state: dict[str, Any] = {f"student.{k}": v for k, v in self.student_.state_dict().items()}
        for layer, (mean, std) in self.stats_.items():
            state[f"stats_mean.{layer}"], state[f"stats_std.{layer}"] = mean, std
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_fitted("load_state_dict")
        self.student_.load_state_dict({k[len("student."):]: v for k, v in state.items() if k.startswith("student.")})
        self.stats_ = {layer: (state[f"stats_mean.{layer}"], state[f"stats_std.{layer}"])
                       for layer in self.layers_ if f"stats_mean.{layer}" in state}

    def training_state(self) -> dict[str, Any]:
        """Weights, optimizer, shuffling state and statistics as CPU copies (for checkpoints)."""
        return _to_cpu({"model": self.state_dict(), "optimizer": self.optimizer_.state_dict(),
                        "generator": self.generator_.get_state()})

    def load_training_state(self, state: Mapping[str, Any]) -> None:
        self.load_state_dict(dict(state["model"]))
        self.optimizer_.load_state_dict(state["optimizer"])
        self.generator_.set_state(state["generator"])


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value
