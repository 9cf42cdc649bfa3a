"""BatchNorm folding for frozen inference: conv -> BatchNorm pairs become one convolution.

In eval mode a BatchNorm is a per-channel affine map, so it can be folded into the weights and
bias of the convolution that feeds it. The folded network skips one full-size pass (and one
full-size activation) per pair: faster, and a smaller memory peak (bench/backbone_folding.py).
torch.fx finds the pairs, so only a conv whose output feeds nothing but its BatchNorm is folded.
"""
from __future__ import annotations

import warnings

from torch import nn


def count_batchnorms(module: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def fold_batchnorm(body: nn.Module) -> nn.Module | None:
    """A copy of `body` (eval mode) with every foldable conv -> BatchNorm pair folded, or None where
    torch.fx cannot trace it or nothing folds (the caller then keeps `body`)."""
    from torch.fx.experimental.optimization import fuse

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            folded = fuse(body.eval())
    except Exception:  # noqa: BLE001 - untraceable (data-dependent control flow): run unfolded
        return None
    if count_batchnorms(folded) == count_batchnorms(body):
        return None
    return folded.eval().requires_grad_(False)
