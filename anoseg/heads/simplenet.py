"""SimpleNet (Liu et al. CVPR 2023): a feature adaptor and a discriminator told normal from noised features.

- Features: the frozen backbone's selected layers combined on the finest grid, each position averaged
  over its 3 x 3 neighbourhood (`patch_size` 3, PatchCore's locally aware features, as in the paper),
  standardised per channel (mean and std of the category's training features, measured in the first
  epoch and kept with the weights). They come from the cached layer maps: no extra backbone pass.
- Adaptor: one linear map per position (a 1x1 convolution) to `adaptor_dim` channels (null: as many as
  it gets, as the paper keeps the dimension); Xavier-normal init as in the reference code.
- Discriminator: a 2-layer MLP per position (1x1 convolutions): Linear(d, d) -> LeakyReLU(0.2) ->
  Linear(d, 1). The paper's BatchNorm between the two is left out: scores would depend on the batch.
- Training: the adapted normal features are the positives; the same adapted features plus Gaussian
  noise the negatives (drawn in the adapted space, so no forward pass is needed). The noise std is
  `noise_std` times each adapted channel's std over the step's positions (not a fixed number as in the
  paper): with a fixed std the adaptor learns to shrink the features until any noise stands out, and
  the anomalies shrink with them (measured: AUPRO falls from 0.71 to 0.57 as the loss reaches 0).
  Loss: the paper's truncated L1 with margin 0.5, mean(max(0, 0.5 - D(normal))) + mean(max(0, 0.5 +
  D(noisy))), its gradient flowing into the adaptor too. Adam (weight decay 1e-5) on both networks.
- Score: -D(adapted feature) per position (higher = more anomalous); image score = map maximum.

ONNX: the scoring (combine, standardise, adapt, discriminate) traced as is.

Settings: epochs; lr (Adam); noise_std (relative to the adapted features' spread); adaptor_dim (null: the
combined channel count); batch_size (training images per step, every position of them); seed (init,
shuffling and noise). Defaults from the embedded dataset (12 training images per category, mean AUPRO
over its 5 categories): the paper's settings (noise 0.015 fixed, 8 images per step, 20 epochs) 0.35;
relative noise 1 and 40 epochs of 2 images per step 0.76 (noise 2: 0.65; noise 0.5, 20 epochs: 0.64).
"""
from __future__ import annotations

import copy
from typing import Any, Mapping

import torch
from torch import nn

from anoseg.features import combine_layers
from anoseg.heads.base import SEED, TrainableHead, is_int, is_number, register_head
from anoseg.heads.stfpm import _to_cpu

MARGIN = 0.5  # the truncated L1's margin (the paper's th)
WEIGHT_DECAY = 1e-5
LEAKY_SLOPE = 0.2


class SimpleNetModel(nn.Module):
    """Adaptor + discriminator on positions: (..., C) -> adapted (..., d) -> D (...,)."""

    def __init__(self, in_channels: int, adaptor_dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_channels))  # per-channel standardisation of the features
        self.register_buffer("std", torch.zeros(in_channels))  # 0 until measured (first epoch)
        self.adaptor = nn.Linear(in_channels, adaptor_dim)
        self.discriminator = nn.Sequential(nn.Linear(adaptor_dim, adaptor_dim), nn.LeakyReLU(LEAKY_SLOPE),
                                           nn.Linear(adaptor_dim, 1))
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_normal_(module.weight)
                nn.init.zeros_(module.bias)

    def adapt(self, features: torch.Tensor) -> torch.Tensor:
        return self.adaptor((features - self.mean) / self.std)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.discriminator(self.adapt(features))[..., 0]


@register_head("simplenet")
class SimpleNet(TrainableHead):
    constraints = {
        "epochs": (lambda v: is_int(v) and 1 <= v <= 10000, "an integer in [1, 10000]"),
        "lr": (lambda v: is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
        "noise_std": (lambda v: is_number(v) and 0 < v <= 10, "a number in (0, 10]"),
        "adaptor_dim": (lambda v: v is None or (is_int(v) and 1 <= v <= 8192), "null or an integer in [1, 8192]"),
        "batch_size": (lambda v: is_int(v) and 1 <= v <= 4096, "an integer in [1, 4096]"),
        "seed": SEED,
    }
    fitted_attributes = ("model_",)
    patch_size = 3
    model_: SimpleNetModel | None = None
    optimizer_: torch.optim.Optimizer | None
    layers_: list[str]  # the selected layers, shallow to deep
    device_: torch.device
    generator_: torch.Generator  # shuffling and noise (CPU)

    def __init__(self, epochs: int = 40, lr: float = 1e-3, noise_std: float = 1.0, adaptor_dim: int | None = None,
                 batch_size: int = 2, seed: int = 0):
        self.epochs, self.lr, self.noise_std, self.adaptor_dim, self.batch_size, self.seed = (
            epochs, lr, noise_std, adaptor_dim, batch_size, seed)

    @classmethod
    def effective_params(cls, params: Mapping[str, Any], n_channels: int) -> dict[str, Any]:
        """adaptor_dim null is the combined channel count."""
        out = super().effective_params(params, n_channels)
        if out["adaptor_dim"] is None:
            out["adaptor_dim"] = n_channels
        return out

    def setup(self, backbone: torch.nn.Module, device: torch.device | str) -> SimpleNet:
        self._validate_params()
        self.layers_ = list(backbone.layers)
        self.device_ = torch.device(device)
        self.generator_ = torch.Generator().manual_seed(self.seed)
        channels = sum(backbone.channels[layer] for layer in self.layers_)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.model_ = SimpleNetModel(channels, self.adaptor_dim or channels).to(self.device_)
        self.optimizer_ = torch.optim.Adam(self.model_.parameters(), lr=self.lr, weight_decay=WEIGHT_DECAY)
        return self

    def cpu_copy(self) -> SimpleNet:
        """A copy for scoring on the CPU: its own CPU networks, no optimizer."""
        self._check_fitted("cpu_copy")
        head = copy.copy(self)
        head.model_ = copy.deepcopy(self.model_).to("cpu").float()
        head.optimizer_ = None
        head.device_ = torch.device("cpu")
        return head

    def _features(self, layer_maps: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """(N, h, w, C): the selected layers on the finest grid, 3 x 3 averaged, positions last-but-one."""
        maps = {layer: layer_maps[layer].to(self.device_) for layer in self.layers_}
        return combine_layers(maps, self.layers_, self.patch_size).permute(0, 2, 3, 1)

    # ------------------------------------------------------------------ training
    def train_epoch(self, images: torch.Tensor, layer_maps: Mapping[str, torch.Tensor]) -> float:
        self._check_fitted("train_epoch")
        self.model_.train(True)
        if not bool(self.model_.std.any()):
            self._standardisation(layer_maps)
        order = torch.randperm(len(images), generator=self.generator_)
        total, steps = 0.0, 0
        for index in order.split(self.batch_size):
            features = self._features({k: layer_maps[k][index] for k in self.layers_})
            adapted = self.model_.adapt(features.reshape(-1, features.shape[-1]))
            scale = self.noise_std * adapted.detach().std(dim=0, correction=0)  # relative to the features' spread
            noise = torch.randn(adapted.shape, generator=self.generator_).to(self.device_) * scale
            scores = self.model_.discriminator(torch.cat([adapted, adapted + noise]))[:, 0]
            true, fake = scores[:len(adapted)], scores[len(adapted):]
            loss = (MARGIN - true).clamp_min(0).mean() + (MARGIN + fake).clamp_min(0).mean()
            self.optimizer_.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer_.step()
            total, steps = total + float(loss.detach()), steps + 1
        self.model_.train(False)
        return total / steps

    @torch.no_grad()
    def _standardisation(self, layer_maps: Mapping[str, torch.Tensor]) -> None:
        """Per-channel mean and std of the training features (std floored at 1e-6), kept with the model."""
        n = len(layer_maps[self.layers_[0]])
        total, total_sq, count = 0.0, 0.0, 0
        for first in range(0, n, self.batch_size):
            f = self._features({k: layer_maps[k][first:first + self.batch_size] for k in self.layers_}).double()
            f = f.reshape(-1, f.shape[-1])
            total, total_sq, count = total + f.sum(0), total_sq + f.square().sum(0), count + len(f)
        mean = total / count
        std = (total_sq / count - mean.square()).clamp_min(0).sqrt().clamp_min(1e-6)
        self.model_.mean.copy_(mean.float())
        self.model_.std.copy_(std.float())

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def score_images(self, images: torch.Tensor, layer_maps: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, None]:
        self._check_fitted("score_images")
        if not torch.compiler.is_compiling() and not bool(self.model_.std.any()):  # (ONNX export traces it)
            raise RuntimeError("simplenet: not trained yet: train at least one epoch (or load_state_dict) first")
        self.model_.train(False)
        return -self.model_(self._features(layer_maps)), None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        self._check_fitted("state_dict")
        return dict(self.model_.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_fitted("load_state_dict")
        self.model_.load_state_dict(state)

    def training_state(self) -> dict[str, Any]:
        """Weights, optimizer and random state as CPU copies (for checkpoints)."""
        return _to_cpu({"model": self.state_dict(), "optimizer": self.optimizer_.state_dict(),
                        "generator": self.generator_.get_state()})

    def load_training_state(self, state: Mapping[str, Any]) -> None:
        self.load_state_dict(dict(state["model"]))
        self.optimizer_.load_state_dict(state["optimizer"])
        self.generator_.set_state(state["generator"])
