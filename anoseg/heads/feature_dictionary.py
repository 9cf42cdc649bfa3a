"""CNN feature dictionary (Napoletano et al. 2018; the baseline of the MVTec AD paper).

Every feature-map position of a normal training image is a patch descriptor
(its receptive field is the patch). Fitting:
1. a seeded random subset of at most `max_samples` training positions (PCA and
   k-means both use it);
2. PCA on it, keeping the fewest components whose explained variance reaches
   `variance` (0.95 as in the paper; 1 keeps them all), no whitening;
3. k-means with `k` centres on the projected descriptors (seeded); `k` is
   capped at the number of samples;
4. the dictionary: per centre, the projected training descriptor nearest to it
   (`entries: nearest`, as the paper and the MVTec AD baseline do, so every
   entry is a real normal patch) or the centres themselves (`entries: centres`).

Scoring projects each position's descriptor with the same PCA; its anomaly
score is the Euclidean distance to the nearest dictionary entry. The image
score is the maximum of the final smoothed map (score() returns None).

Fitting uses scikit-learn (PCA, KMeans with n_init=1 and k-means++ seeding)
on the CPU in float64; the learned mean, axes and dictionary are float32
tensors on the features' device, and scoring is torch there (matmul-expanded
distances in blocks of bounded memory).
"""
from __future__ import annotations

from typing import Any

import torch
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA

from anoseg.errors import ConfigError
from anoseg.heads.base import SEED, Head, is_int, is_number, register_head

ENTRIES = ("nearest", "centres")
BLOCK = 1 << 24  # entries per distance block: bounds memory at ~64 MiB of float32 whatever the sizes


def nearest(queries: torch.Tensor, bank: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared Euclidean distance to and index of the nearest bank row for every query row.

    The matmul expansion |q|^2 - 2 q.b + |b|^2 (clamped at 0), in blocks of queries of at most
    BLOCK distances.
    """
    bank_sq = bank.square().sum(1)
    rows = max(1, BLOCK // max(len(bank), 1))
    dists, idx = [], []
    for start in range(0, len(queries), rows):
        q = queries[start:start + rows]
        d2 = torch.addmm(bank_sq[None], q, bank.T, alpha=-2).add_(q.square().sum(1, keepdim=True)).clamp_min_(0)
        d, i = d2.min(dim=1)
        dists.append(d)
        idx.append(i)
    return torch.cat(dists), torch.cat(idx)


@register_head("feature_dictionary")
class FeatureDictionary(Head):
    constraints = {
        "variance": (lambda v: is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
        "k": (lambda v: is_int(v) and 1 <= v <= 10_000, "an integer in [1, 10000]"),
        "entries": (lambda v: v in ENTRIES, "one of " + ", ".join(ENTRIES)),
        "max_samples": (lambda v: is_int(v) and v >= 100, "an integer >= 100"),
        "seed": SEED,
    }
    fitted_attributes = ("dictionary_",)
    pca_mean_: torch.Tensor | None = None  # (C,)
    components_: torch.Tensor | None = None  # (d, C), rows orthonormal
    dictionary_: torch.Tensor | None = None  # (k, d) in PCA coordinates

    def __init__(
        self,
        variance: float = 0.95,
        k: int = 50,
        entries: str = "nearest",
        max_samples: int = 100_000,
        seed: int = 0,
    ):
        self.variance = variance
        self.k = k
        self.entries = entries
        self.max_samples = max_samples
        self.seed = seed

    @staticmethod
    def _positions(features: torch.Tensor) -> torch.Tensor:
        return features.float().permute(0, 2, 3, 1).reshape(-1, features.shape[1])

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.pca_mean_.to(x.device)) @ self.components_.to(x.device).T

    def fit(self, features: torch.Tensor) -> FeatureDictionary:
        self._validate_params()
        self._check_features(features)
        x = self._positions(features)
        if len(x) < 2:
            raise ConfigError("feature_dictionary needs at least 2 training positions")
        generator = torch.Generator().manual_seed(self.seed)
        if len(x) > self.max_samples:
            x = x[torch.randperm(len(x), generator=generator)[: self.max_samples].to(x.device)]
        data = x.detach().cpu().double().numpy()
        n, c = data.shape
        # covariance_eigh: eigendecomposition of the C x C covariance, fast for n >> C
        pca = PCA(n_components=self.variance if self.variance < 1 else None,
                  svd_solver="covariance_eigh" if n >= 2 * c else "full").fit(data)
        projected = pca.transform(data)
        kmeans = KMeans(n_clusters=min(self.k, n), n_init=1, random_state=self.seed).fit(projected)
        entries = kmeans.cluster_centers_
        if self.entries == "nearest":
            _, idx = nearest(torch.from_numpy(entries), torch.from_numpy(projected))
            entries = projected[idx.numpy()]
        self.pca_mean_ = torch.from_numpy(pca.mean_).float().to(x.device)
        self.components_ = torch.from_numpy(pca.components_).float().contiguous().to(x.device)
        self.dictionary_ = torch.from_numpy(entries).float().contiguous().to(x.device)
        return self

    def score(self, features: torch.Tensor) -> tuple[torch.Tensor, None]:
        self._check_fitted("score")
        self._check_features(features)
        if features.shape[1] != self.pca_mean_.shape[0]:
            raise ConfigError(f"feature_dictionary was fitted on {self.pca_mean_.shape[0]} channels, "
                              f"got {features.shape[1]}")
        n, _, h, w = features.shape
        projected = self._project(self._positions(features))
        d2, _ = nearest(projected, self.dictionary_.to(features.device))
        return d2.sqrt().reshape(n, h, w), None

    def state_dict(self) -> dict[str, Any]:
        return {"pca_mean": self.pca_mean_, "components": self.components_, "dictionary": self.dictionary_}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pca_mean_, self.components_, self.dictionary_ = state["pca_mean"], state["components"], state["dictionary"]
