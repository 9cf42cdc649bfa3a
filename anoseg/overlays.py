"""Anomaly maps drawn over their images (what `predict` writes)."""
from __future__ import annotations

import numpy as np
import torch


def heat_colours(values: np.ndarray) -> np.ndarray:
    """A jet-like colour map: values in [0, 1] (H, W) -> RGB floats in [0, 1] (H, W, 3)."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    centres = np.array([3.0, 2.0, 1.0])  # red, green, blue peaks along 4v
    return np.clip(1.5 - np.abs(4.0 * v - centres), 0.0, 1.0)


def overlay(image: torch.Tensor, amap: torch.Tensor, low: float, high: float,
            mask: torch.Tensor | np.ndarray | None = None) -> np.ndarray:
    """The image (3, S, S) in [0, 1] with the anomaly map (S, S) as a heat map, uint8 (S, S, 3).

    The map is scaled from `low` (transparent) to `high` (opaque red); with a ground-truth `mask`
    (S, S) its outline is drawn in green.
    """
    from scipy import ndimage

    img = image.detach().cpu().permute(1, 2, 0).numpy().astype(np.float32)
    v = (amap.detach().cpu().numpy().astype(np.float32) - low) / max(high - low, 1e-12)
    v = np.clip(v, 0.0, 1.0)
    alpha = 0.65 * v[..., None]
    out = img * (1 - alpha) + heat_colours(v) * alpha
    if mask is not None:
        m = np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask).astype(bool)
        edge = m & ~ndimage.binary_erosion(m, border_value=0)
        out[edge] = (0.0, 1.0, 0.0)
    return (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8)
