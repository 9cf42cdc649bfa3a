"""PaDiM (Defard et al. 2021): a Gaussian per feature position, scored by Mahalanobis distance.

A random subset of `n_features` channels keeps the covariances small; only
those channels are ever combined (`input_channels`). Fit streams over batches
of training features (running sums, so memory does not grow with the training
set) and is batched over positions: one Cholesky factor per position, built in
place a chunk of positions at a time, and triangular solves instead of explicit
inverses.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch

from anoseg.errors import ConfigError
from anoseg.heads.base import Head, check_param, is_int, is_number, register_head

CHUNK_ELEMENTS = 2 ** 22  # fit: positions per chunk such that its covariances / centred copy stay below this (16 MiB)


def _chunks(positions: int, elements_per_position: int) -> Iterable[slice]:
    """Slices over `positions`, each at most CHUNK_ELEMENTS elements (at least one position)."""
    step = max(1, min(positions, CHUNK_ELEMENTS // elements_per_position))
    return (slice(first, first + step) for first in range(0, positions, step))


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
        self.fit_batches([features])

    def fit_batches(self, batches: Iterable[torch.Tensor]) -> None:
        """Fit from feature batches as they come, in memory that does not grow with the training set.

        Batches are held until they would outgrow the (P, d, d) sums (d images), then folded into
        per-position sums taken about the held images' mean (shifted sums: no cancellation when the
        mean is large against the spread); the sums buffer then becomes the Cholesky factors in
        place. Memory: min(N, d) x d x P floats, a chunk of positions at a time.
        """
        held: list[torch.Tensor] = []  # (d, b, P) batches not yet in the sums
        sums: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # shift (d, P), sum1 (d, P), sum2 (P, d, d)
        grid = None
        n = 0
        for features in batches:
            self._check_features(features)
            _, c, h, w = features.shape
            if grid is None:
                if self.channels is None or c not in (len(self.channels), self.in_channels):
                    self.mean = None
                    self.input_channels(c)
                grid = (h, w)
            elif (h, w) != grid:
                raise ConfigError(f"padim: a training batch has a {h}x{w} feature grid, the first one "
                                  f"{grid[0]}x{grid[1]}")
            held.append(self._positions(features))
            n += held[-1].shape[1]
            if sum(x.shape[1] for x in held) >= len(self.channels):
                sums = self._add_to_sums(sums, held)
        if grid is None:
            raise ConfigError("padim: no training features")
        if n < 2:
            raise ConfigError("padim needs at least 2 training images to estimate a covariance")
        if held:
            sums = self._add_to_sums(sums, held)
        shift, sum1, sum2 = sums
        offset = sum1.T / n  # (P, d): mean - shift
        for part in _chunks(len(sum2), sum2.shape[1] ** 2):
            cov = sum2[part]  # becomes the Cholesky factor, in place
            cov.baddbmm_(offset[part, :, None], offset[part, None, :], alpha=-n)
            cov.div_(n - 1).diagonal(dim1=1, dim2=2).add_(self.epsilon)
            factor, info = torch.linalg.cholesky_ex(cov)
            if int(info.max()) > 0:
                raise ConfigError("padim: covariance is not positive definite; raise epsilon")
            cov.copy_(factor)
        self.mean, self.cholesky, self.shape = (shift + sum1 / n).T.contiguous(), sum2, grid

    @staticmethod
    def _add_to_sums(sums, held: list[torch.Tensor]):
        """Move the held batches (each (d, b, P)) into the running (shift, sum of x - shift, sum of
        outer products), emptying `held`; the first call takes their mean as the shift."""
        if sums is None:
            shift = sum(x.sum(dim=1) for x in held) / sum(x.shape[1] for x in held)  # (d, P)
            d, positions = shift.shape
            sums = shift, torch.zeros_like(shift), torch.zeros(positions, d, d, device=shift.device)
        shift, sum1, sum2 = sums
        while held:
            x = held.pop(0)
            d, b, positions = x.shape
            for part in _chunks(positions, d * max(d, b)):  # the (P, d, b) centred copy never exists whole
                centred = x[:, :, part] - shift[:, None, part]  # (d, b, p)
                sum1[:, part] += centred.sum(dim=1)
                centred = centred.permute(2, 0, 1).contiguous()  # (p, d, b)
                sum2[part].baddbmm_(centred, centred.transpose(1, 2))
            del x
        return sums

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
