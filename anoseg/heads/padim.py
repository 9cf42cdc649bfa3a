"""PaDiM (Defard et al. 2021): a Gaussian per feature position, scored by Mahalanobis distance.

A random subset of `n_features` channels keeps the covariances small; only
those channels are ever combined (`input_channels`). Fit streams over batches
of training features (running sums, so memory does not grow with the training
set) and is batched over positions: one Cholesky factor per position, built in
place a chunk of positions at a time, and triangular solves instead of explicit
inverses.

ONNX (`onnx_feature_scorer`): the triangular solve with each position's Cholesky factor L becomes
a batched matmul with L^-1, precomputed in float64 (ONNX has no triangular solve).
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from torch import Tensor, nn

from anoseg.errors import ConfigError
from anoseg.heads.base import SEED, Head, head_defaults, is_int, is_number, register_head

CHUNK_ELEMENTS = 2 ** 22  # fit: positions per chunk such that its covariances / centred copy stay below this (16 MiB)


def _chunks(positions: int, elements_per_position: int) -> Iterable[slice]:
    """Slices over `positions`, each at most CHUNK_ELEMENTS elements (at least one position)."""
    step = max(1, min(positions, CHUNK_ELEMENTS // elements_per_position))
    return (slice(first, first + step) for first in range(0, positions, step))


@register_head("padim")
class PaDiM(Head):
    constraints = {
        "n_features": (lambda v: is_int(v) and 1 <= v <= 4096, "an integer in [1, 4096]"),
        "epsilon": (lambda v: is_number(v) and 0 < v <= 10, "a number in (0, 10]"),
        "seed": SEED,
    }
    fitted_attributes = ("mean_", "cholesky_")
    has_onnx_rewrite = True
    channels_: torch.Tensor | None = None  # sorted indices into the combined channels (chosen before fitting)
    in_channels_: int | None = None  # how many combined channels it chose from
    mean_: torch.Tensor | None = None  # (P, d)
    cholesky_: torch.Tensor | None = None  # (P, d, d) lower factor of the covariance
    shape_: tuple[int, int] | None = None  # the feature grid

    def __init__(self, n_features: int = 100, epsilon: float = 0.01, seed: int = 0):
        self.n_features = n_features
        self.epsilon = epsilon
        self.seed = seed

    @classmethod
    def effective_params(cls, params: Mapping[str, Any], n_channels: int) -> dict[str, Any]:
        """n_features is capped at the channels there are; with all of them, the seed picks nothing."""
        out = super().effective_params(params, n_channels)
        if out["n_features"] >= n_channels:
            out.update(n_features=n_channels, seed=head_defaults(cls.name)["seed"])
        return out

    def input_channels(self, n_channels: int) -> torch.Tensor:
        """The random `n_features` of the `n_channels` combined channels (fixed by `seed`)."""
        if self.mean_ is not None:  # fitted: the channels it was fitted on
            if self.in_channels_ is not None and n_channels != self.in_channels_:
                raise ConfigError(f"padim was fitted on {self.in_channels_} combined channels, got {n_channels}")
            return self.channels_
        self._validate_params()  # choosing the channels is the first step of fitting
        generator = torch.Generator().manual_seed(self.seed)
        self.channels_ = torch.randperm(n_channels, generator=generator)[:min(self.n_features, n_channels)].sort().values
        self.in_channels_ = n_channels
        return self.channels_

    def _positions(self, features: torch.Tensor) -> torch.Tensor:
        """(N, C or d, H, W) -> (d, N, H*W) float32: the chosen channels (selected here unless `head_features`
        already did), positions last."""
        n, c, h, w = features.shape
        if c != len(self.channels_):
            if c != self.in_channels_:
                raise ConfigError(f"padim expects {self.in_channels_} combined channels (or its {len(self.channels_)} "
                                  f"chosen ones), got {c}")
            features = features.index_select(1, self.channels_.to(features.device))
        return features.float().reshape(n, -1, h * w).transpose(0, 1)

    def fit(self, features: torch.Tensor) -> PaDiM:
        return self.fit_batches([features])

    def fit_batches(self, batches: Iterable[torch.Tensor]) -> PaDiM:
        """Fit from feature batches as they come, in memory that does not grow with the training set.

        Batches are held until they would outgrow the (P, d, d) sums (d images), then folded into
        per-position sums taken about the held images' mean (shifted sums: no cancellation when the
        mean is large against the spread); the sums buffer then becomes the Cholesky factors in
        place. Memory: min(N, d) x d x P floats, a chunk of positions at a time.
        """
        self._validate_params()
        held: list[torch.Tensor] = []  # (d, b, P) batches not yet in the sums
        sums: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # shift (d, P), sum1 (d, P), sum2 (P, d, d)
        grid = None
        n = 0
        for features in batches:
            self._check_features(features)
            _, c, h, w = features.shape
            if grid is None:
                if self.channels_ is None or c not in (len(self.channels_), self.in_channels_):
                    self.mean_ = None
                    self.input_channels(c)
                grid = (h, w)
            elif (h, w) != grid:
                raise ConfigError(f"padim: a training batch has a {h}x{w} feature grid, the first one "
                                  f"{grid[0]}x{grid[1]}")
            held.append(self._positions(features))
            n += held[-1].shape[1]
            if sum(x.shape[1] for x in held) >= len(self.channels_):
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
        self.mean_, self.cholesky_, self.shape_ = (shift + sum1 / n).T.contiguous(), sum2, grid
        return self

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
        self._check_fitted("score")
        self._check_features(features)
        n, _, h, w = features.shape
        if (h, w) != tuple(self.shape_):
            raise ConfigError(f"padim was fitted on a {self.shape_[0]}x{self.shape_[1]} feature grid, got {h}x{w}")
        mean, chol = self.mean_.to(features.device), self.cholesky_.to(features.device)
        diff = self._positions(features).permute(2, 0, 1).contiguous().sub_(mean[..., None])  # (P, d, N)
        whitened = torch.linalg.solve_triangular(chol, diff, upper=False)
        dist = whitened.square().sum(dim=1).sqrt()  # (P, N)
        return dist.T.reshape(n, h, w), None

    def onnx_feature_scorer(self) -> PadimScorer:
        return PadimScorer(self)

    def state_dict(self) -> dict[str, Any]:
        return {"channels": self.channels_, "in_channels": self.in_channels_, "mean": self.mean_,
                "cholesky": self.cholesky_, "shape": list(self.shape_)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.channels_, self.mean_, self.cholesky_ = state["channels"], state["mean"], state["cholesky"]
        self.shape_ = tuple(state["shape"])
        self.in_channels_ = int(state["in_channels"]) if state.get("in_channels") is not None else None


class PadimScorer(nn.Module):
    """PaDiM's Mahalanobis distances as matmuls with the precomputed inverse Cholesky factors (on the
    CPU), from all combined channels (N, C, h, w)."""

    def __init__(self, head: PaDiM) -> None:
        super().__init__()
        chol = head.cholesky_.detach().to("cpu", torch.float64)
        eye = torch.eye(chol.shape[-1], dtype=torch.float64).expand_as(chol)
        inv = torch.linalg.solve_triangular(chol, eye, upper=False)
        self.register_buffer("channels", head.channels_.detach().cpu().long().clone())
        self.register_buffer("mean", head.mean_.detach().cpu().float().contiguous().clone())  # (P, d)
        self.register_buffer("inv_cholesky", inv.float().contiguous())  # (P, d, d)

    def forward(self, features: Tensor) -> tuple[Tensor, None]:
        n, _, h, w = features.shape
        x = features.index_select(1, self.channels).reshape(n, self.channels.shape[0], h * w)
        diff = x.permute(2, 1, 0) - self.mean[:, :, None]  # (P, d, N)
        whitened = torch.matmul(self.inv_cholesky, diff)  # (P, d, N)
        dist = whitened.square().sum(dim=1).sqrt()  # (P, N)
        return dist.transpose(0, 1).reshape(n, h, w), None
