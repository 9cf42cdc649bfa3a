"""Gaussian AD (Rippel et al. 2020): Mahalanobis distance to a shrinkage Gaussian of pre-trained features.

The paper pools each selected layer globally over positions, fits one
multivariate Gaussian per layer with Ledoit-Wolf shrinkage covariance and sums
the per-layer Mahalanobis distances into an image score. It has no anomaly map.
This head adapts it to the project's protocol as follows.

Combined channels, one Gaussian. A head receives the layers already
concatenated on the finest grid, (N, C, H, W), and does not know where one
layer's channels end. The head therefore fits ONE Gaussian over the combined
channels. The paper's sum over layers is the special case of a block-diagonal
precision (no cross-layer covariance); a full covariance over the concatenation
keeps the cross-layer correlations the sum throws away, and Ledoit-Wolf
shrinkage keeps it well conditioned with few training images. When C is large,
`n_features` picks a seeded random channel subset (as PaDiM does); by default
every channel is used up to MAX_FEATURES (a random subset of that size beyond).

Two Gaussians, image and map.
- Image score (as in the paper): the Mahalanobis distance of the image's
  globally pooled feature vector (`pool`: mean as in the paper, or max) to a
  Gaussian fitted on the N pooled training vectors.
- Anomaly map: the Mahalanobis distance of every position's feature vector to
  a second, position-level Gaussian fitted on all N*H*W training position
  vectors. Scoring positions under the pooled-feature Gaussian would be a
  distribution mismatch: a pooled vector averages H*W positions, so its
  covariance is (for weakly correlated positions) about 1/(H*W) of the spread
  of single positions and has a different shape (the within-image variation is
  averaged out), which would put every position of a good image far from it.
  The position-level Gaussian models exactly the vectors it scores, and its
  covariance is estimated from N*H*W samples instead of N. It is one
  Gaussian shared by all positions (PaDiM fits one per position): it needs no
  fixed grid or alignment, but cannot flag a feature that is normal elsewhere
  in the image and only out of place where it is.

Both covariances use the same `shrinkage`: "ledoit_wolf" estimates the
coefficient in closed form for each, a number in [0, 1] fixes it; either way the
covariance is (1 - a) S + a tr(S)/p I, S the maximum-likelihood covariance. The
numbers are scikit-learn's LedoitWolf / ShrunkCovariance (the tests check them
against it to 1e-10), computed in torch: float64 sums over blocks of rows on the
features' device. On the CPU that is as fast as scikit-learn (~0.3 s for 40k
positions x 176 channels); unlike scikit-learn it never holds the n x C data and
its square as float64 arrays (2.6 GB for 164k positions x 1024 channels), and it
runs on the GPU when the features are there. Covariances are factored once
(Cholesky, float64, stored float32) and distances are triangular solves, never
an explicit inverse. Distances are plain Mahalanobis distances (square roots),
as in the paper.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from anoseg.errors import ConfigError
from anoseg.heads.base import SEED, Head, head_defaults, is_int, is_number, register_head

MAX_FEATURES = 1024  # channel cap when n_features is None
POOLS = ("mean", "max")
CHUNK = 65536  # rows per block in covariance sums and triangular solves


def shrunk_covariance(x: torch.Tensor, shrinkage: str | float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mean (d,), shrunk covariance (d, d) and the shrinkage used, from rows x (n, d); float64 on x's device.

    The covariance is (1 - a) S + a tr(S)/d I with S the maximum-likelihood covariance (1/n). For
    "ledoit_wolf", a is the Ledoit-Wolf closed form exactly as scikit-learn's `ledoit_wolf_shrinkage`
    computes it; a number is used as given (scikit-learn's ShrunkCovariance). Sums run over blocks
    of CHUNK rows, so memory stays at a few d x d matrices whatever n is.
    """
    n, d = x.shape
    mean = x.sum(0, dtype=torch.float64) / n
    s = x.new_zeros((d, d), dtype=torch.float64)  # sum of centred outer products
    b = x.new_zeros((d, d), dtype=torch.float64)  # the same for the squared centred rows
    for start in range(0, n, CHUNK):
        xc = x[start:start + CHUNK].double() - mean
        s += xc.T @ xc
        if shrinkage == "ledoit_wolf":
            xc2 = xc.square()
            b += xc2.T @ xc2
    emp_cov = s / n
    trace = emp_cov.diagonal().sum()
    mu = trace / d
    if shrinkage == "ledoit_wolf":
        if d == 1:
            used = 0.0
        else:
            delta_ = emp_cov.square().sum()
            beta = (b.sum() / n - delta_) / (d * n)
            delta = (delta_ - 2 * mu * trace + d * mu**2) / d
            beta = torch.minimum(beta, delta)
            used = 0.0 if float(beta) == 0 else float(beta / delta)
    else:
        used = float(shrinkage)
    cov = (1 - used) * emp_cov
    cov.diagonal().add_(used * mu)
    return mean, cov, used


def shrunk_gaussian(x: torch.Tensor, shrinkage: str | float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mean (d,) and lower Cholesky factor (d, d) of the shrunk covariance (float32) and the shrinkage used."""
    mean, cov, used = shrunk_covariance(x, shrinkage)
    chol, info = torch.linalg.cholesky_ex(cov)
    if int(info) > 0:
        raise ConfigError(
            f"gaussian_ad: the covariance of {x.shape[0]} vectors of {x.shape[1]} channels is singular with "
            f"shrinkage {used:.3g}; use shrinkage: ledoit_wolf or a larger number, or fewer n_features"
        )
    return mean.float(), chol.float(), used


def mahalanobis(x: torch.Tensor, mean: torch.Tensor, chol: torch.Tensor) -> torch.Tensor:
    """Mahalanobis distances of rows x (M, d) to N(mean, L L^T), via solves with L in chunks of rows."""
    out = []
    for start in range(0, len(x), CHUNK):
        diff = (x[start:start + CHUNK] - mean).T  # (d, m)
        out.append(torch.linalg.solve_triangular(chol, diff, upper=False).square().sum(0).sqrt())
    return torch.cat(out) if out else x.new_zeros(0)


@register_head("gaussian_ad")
class GaussianAD(Head):
    constraints = {
        "shrinkage": (lambda v: v == "ledoit_wolf" or (is_number(v) and 0 <= v <= 1),
                      '"ledoit_wolf" or a number in [0, 1]'),
        "n_features": (lambda v: v is None or (is_int(v) and 1 <= v <= 4096),
                       f"null (all channels, at most {MAX_FEATURES}) or an integer in [1, 4096]"),
        "pool": (lambda v: v in POOLS, "one of " + ", ".join(POOLS)),
        "seed": SEED,
    }
    fitted_attributes = ("image_cholesky_", "patch_cholesky_")
    n_channels_: int | None = None  # C of the features fitted on
    channels_: torch.Tensor | None = None  # the channels it reads, sorted
    image_mean_: torch.Tensor | None = None  # (d,) Gaussian of pooled vectors
    image_cholesky_: torch.Tensor | None = None  # (d, d)
    patch_mean_: torch.Tensor | None = None  # (d,) Gaussian of position vectors
    patch_cholesky_: torch.Tensor | None = None  # (d, d)
    image_shrinkage_: float | None = None
    patch_shrinkage_: float | None = None

    def __init__(
        self,
        shrinkage: str | float = "ledoit_wolf",
        n_features: int | None = None,
        pool: str = "mean",
        seed: int = 0,
    ):
        self.shrinkage = shrinkage
        self.n_features = n_features
        self.pool = pool
        self.seed = seed

    @classmethod
    def effective_params(cls, params: Mapping[str, Any], n_channels: int) -> dict[str, Any]:
        """n_features (None: up to MAX_FEATURES) is capped at the channels there are; all of them is None,
        and then the seed picks nothing."""
        out = super().effective_params(params, n_channels)
        if min(out["n_features"] or MAX_FEATURES, n_channels) >= n_channels:
            out.update(n_features=None, seed=head_defaults(cls.name)["seed"])
        return out

    def _select(self, features: torch.Tensor) -> torch.Tensor:
        return features.index_select(1, self.channels_.to(features.device)).float()

    def _pooled(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)) if self.pool == "mean" else x.amax(dim=(2, 3))

    @staticmethod
    def _positions(x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])

    def fit(self, features: torch.Tensor) -> GaussianAD:
        self._validate_params()
        self._check_features(features)
        n, c = features.shape[:2]
        if n < 2:
            raise ConfigError("gaussian_ad needs at least 2 training images to estimate a covariance")
        self.n_channels_ = c
        d = min(self.n_features or MAX_FEATURES, c)
        if d < c:
            generator = torch.Generator().manual_seed(self.seed)
            self.channels_ = torch.randperm(c, generator=generator)[:d].sort().values
        else:
            self.channels_ = torch.arange(c)
        x = self._select(features)
        self.image_mean_, self.image_cholesky_, self.image_shrinkage_ = shrunk_gaussian(self._pooled(x), self.shrinkage)
        self.patch_mean_, self.patch_cholesky_, self.patch_shrinkage_ = shrunk_gaussian(self._positions(x),
                                                                                        self.shrinkage)
        return self

    def score(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_fitted("score")
        self._check_features(features)
        if features.shape[1] != self.n_channels_:
            raise ConfigError(f"gaussian_ad was fitted on {self.n_channels_} channels, got {features.shape[1]}")
        n, _, h, w = features.shape
        device = features.device
        x = self._select(features)
        maps = mahalanobis(self._positions(x), self.patch_mean_.to(device), self.patch_cholesky_.to(device))
        image_scores = mahalanobis(self._pooled(x), self.image_mean_.to(device), self.image_cholesky_.to(device))
        return maps.reshape(n, h, w), image_scores

    def state_dict(self) -> dict[str, Any]:
        return {
            "n_channels": self.n_channels_,
            "channels": self.channels_,
            "image_mean": self.image_mean_,
            "image_cholesky": self.image_cholesky_,
            "patch_mean": self.patch_mean_,
            "patch_cholesky": self.patch_cholesky_,
            "image_shrinkage": self.image_shrinkage_,
            "patch_shrinkage": self.patch_shrinkage_,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.n_channels_, self.channels_ = int(state["n_channels"]), state["channels"]
        self.image_mean_, self.image_cholesky_ = state["image_mean"], state["image_cholesky"]
        self.patch_mean_, self.patch_cholesky_ = state["patch_mean"], state["patch_cholesky"]
        self.image_shrinkage_, self.patch_shrinkage_ = state["image_shrinkage"], state["patch_shrinkage"]
