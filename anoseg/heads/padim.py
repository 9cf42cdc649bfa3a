"""PaDiM (Defard et al. 2021): a Gaussian per feature position, scored by Mahalanobis distance.

A random subset of `n_features` channels keeps the covariances small. Fit and
score are batched over positions: one Cholesky factor per position, and
triangular solves instead of explicit inverses.
"""
from __future__ import annotations

from typing import Any

import torch

from anoseg.errors import ConfigError
from anoseg.heads.base import Head, check_param, is_int, is_number, register_head


@register_head("padim")
class PaDiM(Head):
    def __init__(self, n_features: int = 100, epsilon: float = 0.01, seed: int = 0):
        check_param("padim", "n_features", n_features, is_int(n_features) and 1 <= n_features <= 4096, "an integer in [1, 4096]")
        check_param("padim", "epsilon", epsilon, is_number(epsilon) and 0 < epsilon <= 10, "a number in (0, 10]")
        check_param("padim", "seed", seed, is_int(seed) and seed >= 0, "a non-negative integer")
        self.n_features = n_features
        self.epsilon = float(epsilon)
        self.seed = seed
        self.channels: torch.Tensor | None = None
        self.mean: torch.Tensor | None = None  # (P, d)
        self.cholesky: torch.Tensor | None = None  # (P, d, d) lower factor of the covariance
        self.shape: tuple[int, int] | None = None

    def _select(self, features: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (P, d, N) with the chosen channel subset."""
        n, _, h, w = features.shape
        x = features.index_select(1, self.channels.to(features.device)).float()
        return x.reshape(n, -1, h * w).permute(2, 1, 0)

    def fit(self, features: torch.Tensor) -> None:
        self._check_features(features)
        n, c, h, w = features.shape
        if n < 2:
            raise ConfigError("padim needs at least 2 training images to estimate a covariance")
        generator = torch.Generator().manual_seed(self.seed)
        d = min(self.n_features, c)
        self.channels = torch.randperm(c, generator=generator)[:d].sort().values
        self.shape = (h, w)
        x = self._select(features)  # (P, d, N)
        mean = x.mean(dim=2, keepdim=True)
        x = x - mean
        cov = x @ x.transpose(1, 2) / (n - 1)
        cov.diagonal(dim1=1, dim2=2).add_(self.epsilon)
        chol, info = torch.linalg.cholesky_ex(cov)
        if int(info.max()) > 0:
            raise ConfigError("padim: covariance is not positive definite; raise epsilon")
        self.mean, self.cholesky = mean[..., 0], chol

    def score(self, features: torch.Tensor) -> tuple[torch.Tensor, None]:
        self._check_features(features)
        if self.mean is None:
            raise RuntimeError("padim: score() before fit()")
        n, _, h, w = features.shape
        if (h, w) != tuple(self.shape):
            raise ConfigError(f"padim was fitted on a {self.shape[0]}x{self.shape[1]} feature grid, got {h}x{w}")
        mean, chol = self.mean.to(features.device), self.cholesky.to(features.device)
        diff = self._select(features) - mean[..., None]  # (P, d, N)
        whitened = torch.linalg.solve_triangular(chol, diff, upper=False)
        dist = whitened.square().sum(dim=1).sqrt()  # (P, N)
        return dist.T.reshape(n, h, w), None

    def state_dict(self) -> dict[str, Any]:
        return {"channels": self.channels, "mean": self.mean, "cholesky": self.cholesky, "shape": list(self.shape)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.channels, self.mean, self.cholesky = state["channels"], state["mean"], state["cholesky"]
        self.shape = tuple(state["shape"])
