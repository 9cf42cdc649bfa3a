"""Feature extraction: backbone layers -> one (N, C, H, W) map on a common grid."""
from __future__ import annotations

from typing import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" picks CUDA when present; an explicit "cuda" without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        from anoseg.errors import ConfigError

        raise ConfigError(f"device {name!r} requested but no CUDA GPU is available; use device: auto or cpu")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work, so wall-clock timings measure it (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def iter_layer_maps(
    backbone: torch.nn.Module,
    images: torch.Tensor,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Iterator[dict[str, torch.Tensor]]:
    """Run `backbone` over images (N, 3, H, W) in [0, 1] a batch at a time; yields {layer: (n, C, h, w)}
    on `device` per batch. The backbone's own mean/std normalisation is applied here."""
    mean = torch.tensor(backbone.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(backbone.std, device=device).view(1, 3, 1, 1)
    for start in range(0, len(images), batch_size):
        with torch.inference_mode():
            batch = (images[start:start + batch_size].to(device, non_blocking=True) - mean) / std
            maps = {layer: fmap.to(dtype) for layer, fmap in backbone(batch).items()}
        yield maps


def extract_layers(
    backbone: torch.nn.Module,
    images: torch.Tensor,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Run `backbone` over images (N, 3, H, W) in [0, 1]; returns {layer: (N, C, h, w)} on `device`
    (see iter_layer_maps)."""
    chunks: dict[str, list[torch.Tensor]] = {}
    for maps in iter_layer_maps(backbone, images, batch_size, device, dtype):
        for layer, fmap in maps.items():
            chunks.setdefault(layer, []).append(fmap)
    return {layer: torch.cat(parts) for layer, parts in chunks.items()}


def layer_map_batches(layer_maps: Mapping[str, torch.Tensor], batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """{layer: (N, ...)} -> {layer: (n, ...)} slices of at most `batch_size` images (views, no copy)."""
    n = len(next(iter(layer_maps.values())))
    for start in range(0, n, batch_size):
        yield {layer: fmap[start:start + batch_size] for layer, fmap in layer_maps.items()}


def combine_layers(
    layer_maps: Mapping[str, torch.Tensor],
    layers: Sequence[str] | None = None,
    patch_size: int = 1,
    channels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Concatenate layers on the grid of the finest one (bilinear resize), as float32.

    `patch_size` > 1 first averages every position over its patch_size x
    patch_size neighbourhood (PatchCore's locally aware patch features). The
    border is zero-padded, as in the PatchCore reference code: averaging over
    fewer cells there instead makes corner features noisier and, with few
    training images, lets them dominate the image score.

    `channels` (sorted indices into the concatenation): build only those, in that
    order; equal to combining everything and then selecting them, without ever
    holding the full (N, C, H, W) map.
    """
    layers = list(layers or layer_maps)
    grid = max((layer_maps[name].shape[-2:] for name in layers), key=lambda s: s[0] * s[1])
    parts = []
    offset = 0
    for name in layers:
        fmap = layer_maps[name]
        width = fmap.shape[1]
        if channels is not None:
            local = channels[(channels >= offset) & (channels < offset + width)] - offset
            offset += width
            if local.numel() == 0:
                continue
            fmap = fmap.index_select(1, local.to(fmap.device))
        fmap = fmap.float()
        if patch_size > 1:
            fmap = F.avg_pool2d(fmap, patch_size, stride=1, padding=patch_size // 2, count_include_pad=True)
        if fmap.shape[-2:] != grid:
            fmap = F.interpolate(fmap, size=tuple(grid), mode="bilinear", align_corners=False)
        parts.append(fmap)
    return torch.cat(parts, dim=1)


def total_channels(layer_maps: Mapping[str, torch.Tensor], layers: Sequence[str] | None = None) -> int:
    """Channels of the combined map of `layers`."""
    return sum(layer_maps[name].shape[1] for name in (layers or layer_maps))
