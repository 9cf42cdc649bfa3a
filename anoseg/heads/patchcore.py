"""PatchCore (Roth et al. 2022): a coreset memory bank of locally aware patch features.

Features arrive already averaged over a `patch_size` neighbourhood. The memory
bank is a greedy k-center coreset chosen in a random projection; a test patch
scores its mean distance to the `k` nearest bank entries, and the image score is
the largest patch score re-weighted by how isolated its nearest entry is.

ONNX (`onnx_feature_scorer`): distances to the memory bank by the matmul expansion
|a|^2 - 2 a.b + |b|^2 (as the torch head computes them), TopK for the k nearest, Max/ArgMax for the
image score, and the re-weighting exactly as the torch head does it: the nearest bank entry of the
most anomalous patch, its `reweight_neighbours` nearest bank entries (TopK), and 1 - softmax of the
distances. The whole (N * h * w) x bank distance matrix is materialised (the torch head works in
chunks of 4096 rows).
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from anoseg.errors import ConfigError
from anoseg.heads.base import SEED, Head, head_defaults, is_int, is_number, register_head

CHUNK = 4096  # rows per distance block: bounds memory at CHUNK x bank size


def knn(queries: torch.Tensor, bank: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Distances and indices of the k nearest bank rows for every query, computed in chunks.

    The k smallest of |b|^2 - 2 q.b (one fused addmm) per row are the nearest; the query's
    |q|^2 and the square root are added for those k only, not for the whole chunk x bank
    matrix. As fast as faiss's exact IndexFlatL2 on the CPU (bench/knn_faiss.py).
    """
    bank_sq = bank.square().sum(1)[None]
    dists, idx = [], []
    for start in range(0, len(queries), CHUNK):
        q = queries[start:start + CHUNK]
        partial, i = torch.addmm(bank_sq, q, bank.T, alpha=-2).topk(k, dim=1, largest=False)
        dists.append((partial + q.square().sum(1, keepdim=True)).clamp_min_(0).sqrt_())
        idx.append(i)
    return torch.cat(dists), torch.cat(idx)


def greedy_coreset(
    x: torch.Tensor | Sequence[torch.Tensor], n: int, projection_dim: int, generator: torch.Generator,
) -> torch.Tensor:
    """Indices of `n` rows of x (one matrix, or the rows of several stacked) chosen by greedy
    k-center selection in a random projection. Parts are projected one by one straight into the
    projected matrix, so the unprojected rows are never stacked (only when they are no wider than
    `projection_dim`, which makes no projection)."""
    parts = [x] if isinstance(x, torch.Tensor) else list(x)
    dim = parts[0].shape[1]
    if dim > projection_dim:
        proj = torch.randn(dim, projection_dim, generator=generator).to(parts[0].device) / projection_dim**0.5
        x = torch.empty(sum(len(p) for p in parts), projection_dim, dtype=proj.dtype, device=proj.device)
        first = 0
        for part in parts:
            torch.mm(part, proj, out=x[first:first + len(part)])
            first += len(part)
    else:
        x = parts[0] if len(parts) == 1 else torch.cat(parts)
    selected = torch.empty(n, dtype=torch.long)
    current = int(torch.randint(len(x), (1,), generator=generator))
    min_dist = torch.full((len(x),), float("inf"), device=x.device)
    sq_norms = x.square().sum(1)
    for i in range(n):
        selected[i] = current
        d2 = sq_norms - 2 * (x @ x[current]) + sq_norms[current]
        torch.minimum(min_dist, d2, out=min_dist)
        current = int(min_dist.argmax())
    return selected


def take_rows(parts: Sequence[torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    """Rows `rows` (indices into the parts stacked) of the stacked parts, without stacking them."""
    ends = torch.tensor([len(p) for p in parts]).cumsum(0)
    part_of = torch.searchsorted(ends, rows, right=True)
    out = torch.empty(len(rows), parts[0].shape[1], dtype=parts[0].dtype, device=parts[0].device)
    for i, part in enumerate(parts):
        mask = part_of == i
        if mask.any():
            local = rows[mask] - (ends[i] - len(part))
            out[mask.to(out.device)] = part.index_select(0, local.to(part.device))
    return out


@register_head("patchcore")
class PatchCore(Head):
    constraints = {
        "coreset_ratio": (lambda v: is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
        "k": (lambda v: is_int(v) and 1 <= v <= 64, "an integer in [1, 64]"),
        "reweight_neighbours": (lambda v: is_int(v) and 0 <= v <= 64,
                                "an integer in [0, 64] (0 turns re-weighting off)"),
        "patch_size": (lambda v: is_int(v) and v in (1, 3, 5, 7), "one of 1, 3, 5, 7"),
        "projection_dim": (lambda v: is_int(v) and v >= 8, "an integer >= 8"),
        "seed": SEED,
    }
    fitted_attributes = ("memory_bank_",)
    has_onnx_rewrite = True
    memory_bank_: torch.Tensor | None = None  # (M, C) the coreset of training patches

    def __init__(
        self,
        coreset_ratio: float = 0.1,
        k: int = 1,
        reweight_neighbours: int = 9,
        patch_size: int = 3,
        projection_dim: int = 128,
        seed: int = 0,
    ):
        self.coreset_ratio = coreset_ratio
        self.k = k
        self.reweight_neighbours = reweight_neighbours
        self.patch_size = patch_size
        self.projection_dim = projection_dim
        self.seed = seed

    @classmethod
    def effective_params(cls, params: Mapping[str, Any], n_channels: int) -> dict[str, Any]:
        """Patches no wider than projection_dim are not projected: projection_dim does not matter then."""
        out = super().effective_params(params, n_channels)
        if n_channels <= out["projection_dim"]:
            out["projection_dim"] = head_defaults(cls.name)["projection_dim"]
        return out

    @staticmethod
    def _patches(features: torch.Tensor) -> torch.Tensor:
        return features.float().permute(0, 2, 3, 1).reshape(-1, features.shape[1])

    def fit(self, features: torch.Tensor) -> PatchCore:
        return self.fit_batches([features])

    def fit_batches(self, batches: Iterable[torch.Tensor]) -> PatchCore:
        """Collect the patches of every batch, choose the coreset over all of them (projected a batch
        at a time) and keep its rows: the patches are never stacked into one more copy."""
        self._validate_params()
        parts = []
        for features in batches:
            self._check_features(features)
            parts.append(self._patches(features))
        if not parts:
            raise ConfigError("patchcore: no training features")
        total = sum(len(p) for p in parts)
        n = max(1, min(total, round(self.coreset_ratio * total)))
        if n < total:
            generator = torch.Generator().manual_seed(self.seed)
            bank = take_rows(parts, greedy_coreset(parts, n, self.projection_dim, generator))
        else:
            bank = parts[0] if len(parts) == 1 else torch.cat(parts)
        self.memory_bank_ = bank.contiguous()
        return self

    def score(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_fitted("score")
        self._check_features(features)
        n, _, h, w = features.shape
        bank = self.memory_bank_.to(features.device)
        patches = self._patches(features)
        k = min(self.k, len(bank))
        dists, idx = knn(patches, bank, k)
        patch_scores = dists.mean(1).reshape(n, h * w)
        image_scores, argmax = patch_scores.max(dim=1)
        b = min(self.reweight_neighbours, len(bank))
        if b > 1:
            rows = torch.arange(n, device=patches.device) * (h * w) + argmax
            worst = patches[rows]  # (n, C): the most anomalous patch of each image
            nearest = bank[idx[rows, 0]]  # its nearest bank entry m*
            _, support = knn(nearest, bank, b)  # m* and its neighbours in the bank
            d = torch.linalg.vector_norm(worst[:, None] - bank[support], dim=2)
            image_scores = image_scores * (1 - torch.softmax(d, dim=1)[:, 0])
        return patch_scores.reshape(n, h, w), image_scores

    def onnx_feature_scorer(self) -> PatchCoreScorer:
        return PatchCoreScorer(self)

    def state_dict(self) -> dict[str, Any]:
        return {"memory_bank": self.memory_bank_}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.memory_bank_ = state["memory_bank"]


class PatchCoreScorer(nn.Module):
    """PatchCore's k-NN patch scores and re-weighted image score with matmuls, TopK and Gather (on the CPU)."""

    def __init__(self, head: PatchCore) -> None:
        super().__init__()
        bank = head.memory_bank_.detach().cpu().float().contiguous().clone()
        self.register_buffer("bank", bank)  # (M, C)
        self.register_buffer("bank_sq", bank.square().sum(1))  # (M,)
        self.k = min(int(head.k), len(bank))
        self.b = min(int(head.reweight_neighbours), len(bank))

    def _distances(self, a: Tensor) -> Tensor:
        """Euclidean distances of rows of a (..., C) to every bank row: (..., M)."""
        d2 = a.square().sum(-1, keepdim=True) - 2 * torch.matmul(a, self.bank.T) + self.bank_sq
        return d2.clamp_min(0).sqrt()

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        n, c, h, w = features.shape
        patches = features.permute(0, 2, 3, 1).reshape(n, h * w, c)
        dists, idx = self._distances(patches).topk(self.k, dim=-1, largest=False)  # (N, hw, k)
        patch_scores = dists.mean(-1)  # (N, hw)
        image_scores, argmax = patch_scores.max(dim=1)  # (N,)
        if self.b > 1:
            worst = patches.gather(1, argmax[:, None, None].expand(n, 1, c))[:, 0]  # (N, C)
            nearest_idx = idx[:, :, 0].gather(1, argmax[:, None])[:, 0]  # (N,) m* of each image
            nearest = self.bank.index_select(0, nearest_idx)  # (N, C)
            support = self._distances(nearest).topk(self.b, dim=-1, largest=False).indices  # (N, b)
            neighbours = self.bank.index_select(0, support.reshape(-1)).reshape(n, self.b, c)
            d = (worst[:, None, :] - neighbours).square().sum(-1).sqrt()  # (N, b)
            image_scores = image_scores * (1 - torch.softmax(d, dim=1)[:, 0])
        return patch_scores.reshape(n, h, w), image_scores
