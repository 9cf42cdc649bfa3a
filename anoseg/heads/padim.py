"""PaDiM (Defard et al. 2021): a Gaussian per feature position, scored by Mahalanobis distance.

A random subset of `n_features` channels keeps the covariances small; only
those channels are ever combined (`input_channels`). Fit and score are batched
over positions: one Cholesky factor per position, covariances a chunk of
positions at a time, and triangular solves instead of explicit inverses.
"""
from __future__ import annotations

from typing import Any

import torch

from anoseg.errors import ConfigError
from anoseg.heads.base import Head, check_param, is_int, is_number, register_head

CHUNK_ELEMENTS = 2 ** 22  # fit: positions per chunk such that its covariances / centred copy stay below this (16 MiB)


@register_head("padim")
class PaDiM(Head):
    def __init__(self, n_features: int = 100, epsilon: float = 0.01, seed: int = 0):
        check_param("padim", "n_features", n_features, is_int(n_features) and 1 <= n_features <= 4096, "an integer in [1, 4096]")
        check_param("padim", "epsilon", epsilon, is_number(epsilon) and 0 < epsilon <= 10, "a number in (0, 10]")
        check_param("padim", "seed", seed, is_int(seed) and seed >= 0, "a non-negative integer")
        self.n_features = n_features
        self.epsilon = float(epsilon)
        self.seed = seed
        self.channels: torch.Tensor | None = None  # sorted indices into the combined channels
        self.in_channels: int | None = None  # how many combined channels it chose from
        self.mean: torch.Tensor | None = None  # (P, d)
        self.cholesky: torch.Tensor | None = None  # (P, d, d) lower factor of the covariance
        self.shape: tuple[int, int] | None = None

    def input_channels(self, n_channels: int) -> torch.Tensor:
        """The random `n_features` of the `n_channels` combined channels (fixed by `seed`)."""
        if self.mean is not None:  # fitted: the channels it was fitted on
            if self.in_channels is not None and n_channels != self.in_channels:
                raise ConfigError(f"padim was fitted on {self.in_channels} combined channels, got {n_channels}")
            return self.channels
        generator = torch.Generator().manual_seed(self.seed)
        self.channels = torch.randperm(n_channels, generator=generator)[:min(self.n_features, n_channels)].sort().values
        self.in_channels = n_channels
        return self.channels

    def _positions(self, features: torch.Tensor) -> torch.Tensor:
        """(N, C or d, H, W) -> (d, N, H*W) float32: the chosen channels (selected here unless `head_features`
        already did), positions last."""
        n, c, h, w = features.shape
        if c != len(self.channels):
            if c != self.in_channels:
                raise ConfigError(f"padim expects {self.in_channels} combined channels (or its {len(self.channels)} "
                                  f"chosen ones), got {c}")
            features = features.index_select(1, self.channels.to(features.device))
        return features.float().reshape(n, -1, h * w).transpose(0, 1)

    def fit(self, features: torch.Tensor) -> None:
        self._check_features(features)
        n, c, h, w = features.shape
        if n < 2:
            raise ConfigError("padim needs at least 2 training images to estimate a covariance")
        if self.channels is None or c not in (len(self.channels), self.in_channels):
            self.mean = None
            self.input_channels(c)
        x = self._positions(features)  # (d, N, P)
        d, positions = x.shape[0], h * w
        mean = x.mean(dim=1)  # (d, P)
        chol = torch.empty(positions, d, d, device=x.device)
        # Covariances a chunk of positions at a time: the (P, d, N) centred copy never exists whole.
        chunk = max(1, min(positions, CHUNK_ELEMENTS // (d * max(d, n))))
        for first in range(0, positions, chunk):
            part = slice(first, first + chunk)
            centred = (x[:, :, part] - mean[:, None, part]).permute(2, 0, 1).contiguous()  # (p, d, N)
            cov = centred @ centred.transpose(1, 2)
            cov.div_(n - 1).diagonal(dim1=1, dim2=2).add_(self.epsilon)
            factor, info = torch.linalg.cholesky_ex(cov)
            if int(info.max()) > 0:
                raise ConfigError("padim: covariance is not positive definite; raise epsilon")
            chol[part] = factor
        self.mean, self.cholesky, self.shape = mean.T.contiguous(), chol, (h, w)

    def score(self, features: torch.Tensor) -> tuple[torch.Tensor, None]:
        self._check_features(features)
        if self.mean is None:
            raise RuntimeError("padim: score() before fit()")
        n, _, h, w = features.shape
        if (h, w) != tuple(self.shape):
            raise ConfigError(f"padim was fitted on a {self.shape[0]}x{self.shape[1]} feature grid, got {h}x{w}")
        mean, chol = self.mean.to(features.device), self.cholesky.to(features.device)
        diff = self._positions(features).permute(2, 0, 1).contiguous().sub_(mean[..., None])  # (P, d, N)
        whitened = torch.linalg.solve_triangular(chol, diff, upper=False)
        dist = whitened.square().sum(dim=1).sqrt()  # (P, N)
        return dist.T.reshape(n, h, w), None

    def state_dict(self) -> dict[str, Any]:
        return {"channels": self.channels, "in_channels": self.in_channels, "mean": self.mean, "cholesky": self.cholesky,
                "shape": list(self.shape)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.channels, self.mean, self.cholesky = state["channels"], state["mean"], state["cholesky"]
        self.shape = tuple(state["shape"])
        self.in_channels = int(state["in_channels"]) if state.get("in_channels") is not None else None
