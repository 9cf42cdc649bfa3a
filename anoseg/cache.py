"""Feature cache: each backbone layer's maps are computed once per (backbone, weights, layer,
image size, category, split, dataset content) and shared by every trial that needs them.

- Per layer, not per layer subset: trials with [blocks.1, blocks.2] and [blocks.2, blocks.4]
  share blocks.2.
- fp16 `.npy` files, read memory-mapped; written to a temporary name and renamed, so a
  reader never sees half an entry. A lock file per entry makes concurrent trials (also on
  other nodes of a shared file system) compute it once: the second waits, then reads.
- Bounded: after a write, the least recently used entries go until the cache fits
  `max_bytes` (a read refreshes an entry's time).
- Honest cost: an entry stores how long its extraction took (seconds per image); a hit
  adds that time back, so `fit_seconds` and `ms_per_image` do not depend on cache state.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import torch

from anoseg.files import write_atomic, write_text_atomic
DEFAULT_MAX_BYTES = 20 * 2**30
FORMAT = 1


@dataclass(frozen=True)
class CacheKey:
    backbone: str
    weights: str  # provenance string of the loaded weights (random init includes the seed)
    layer: str
    image_size: int
    category: str
    split: str  # "train" | "test"
    fingerprint: str  # content hash of the category's files

    def digest(self) -> str:
        text = json.dumps([FORMAT, *self.__dict__.values()])
        return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


@dataclass
class CachedLayer:
    maps: torch.Tensor  # (N, C, h, w) float16, memory-mapped
    seconds_per_image: float  # what extracting it cost when it was computed


class FeatureCache:
    """A folder of cached layer maps. `FeatureCache(None)` is a disabled cache."""

    def __init__(self, root: str | Path | None, max_bytes: int = DEFAULT_MAX_BYTES):
        self.root = Path(root) if root else None
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.root is not None

    def _paths(self, key: CacheKey) -> tuple[Path, Path]:
        digest = key.digest()
        folder = self.root / digest[:2]
        return folder / f"{digest}.npy", folder / f"{digest}.json"

    def get(self, key: CacheKey, count: bool = True) -> CachedLayer | None:
        """The entry for `key`, or None (missing or damaged: never stale data). `count` updates hits/misses."""
        found = self._read(key) if self.enabled else None
        if count and self.enabled:
            self.hits += found is not None
            self.misses += found is None
        return found

    def _read(self, key: CacheKey) -> CachedLayer | None:
        data, meta = self._paths(key)
        try:
            info = json.loads(meta.read_text())
            array = np.load(data, mmap_mode="c")  # copy-on-write: torch gets a writable view, the file stays
        except (OSError, ValueError):
            return None
        if info.get("key") != key.__dict__ or list(array.shape) != info.get("shape"):
            return None
        now = time.time()
        os.utime(data, (now, now))
        return CachedLayer(torch.from_numpy(array), float(info["seconds_per_image"]))

    def put(self, key: CacheKey, maps: torch.Tensor, seconds_per_image: float) -> None:
        if not self.enabled:
            return
        data, meta = self._paths(key)
        data.parent.mkdir(parents=True, exist_ok=True)
        array = maps.detach().to("cpu", torch.float16).numpy()
        write_atomic(data, lambda fh: np.save(fh, array))
        info = {"key": key.__dict__, "shape": list(array.shape), "seconds_per_image": seconds_per_image,
                "created": time.time()}
        write_text_atomic(meta, json.dumps(info))
        self.evict()

    @contextmanager
    def lock(self, keys: list[CacheKey]) -> Iterator[None]:
        """Hold the entries' locks while computing them, so concurrent trials compute them once."""
        if not self.enabled or not keys:
            yield
            return
        self.root.mkdir(parents=True, exist_ok=True)
        name = hashlib.blake2b("|".join(sorted(k.digest() for k in keys)).encode(), digest_size=8).hexdigest()
        lock_dir = self.root / "locks"
        lock_dir.mkdir(exist_ok=True)
        with open(lock_dir / f"{name}.lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def entries(self) -> list[Path]:
        if not self.enabled or not self.root.is_dir():
            return []
        return [p for p in self.root.glob("*/*.npy")]

    def evict(self) -> None:
        """Delete least recently used entries until the cache fits max_bytes."""
        entries = sorted(((p.stat().st_mtime, p.stat().st_size, p) for p in self.entries()), key=lambda t: t[0])
        total = sum(size for _, size, _ in entries)
        for _, size, path in entries:
            if total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            path.with_suffix(".json").unlink(missing_ok=True)
            total -= size


def cached_layer_maps(
    cache: FeatureCache,
    keys: Mapping[str, CacheKey],
    compute,
) -> tuple[dict[str, torch.Tensor], float]:
    """Layer maps for `keys` ({layer: key}), computing the missing ones with `compute(layers)`.

    `compute(missing_layers) -> (maps {layer: tensor}, seconds_per_image)`. Returns the maps
    as float16 (memory-mapped on a hit: nothing is read until used; always fp16 so results do
    not depend on whether the cache is on; consumers convert what they use to float32) and the
    extraction cost per image (measured now, or as stored with the entries; the
    largest over the layers, i.e. the forward pass to the deepest one).
    """
    found = {layer: cache.get(key) for layer, key in keys.items()}
    missing = [layer for layer, hit in found.items() if hit is None]
    if missing and cache.enabled:
        with cache.lock([keys[layer] for layer in missing]):
            found.update({layer: cache.get(keys[layer], count=False) for layer in missing})  # made meanwhile?
            missing = [layer for layer, hit in found.items() if hit is None]
            if missing:
                maps, seconds = compute(missing)
                for layer in missing:
                    cache.put(keys[layer], maps[layer], seconds)
                    found[layer] = CachedLayer(maps[layer].half(), seconds)
    elif missing:
        maps, seconds = compute(missing)
        found.update({layer: CachedLayer(maps[layer].half(), seconds) for layer in missing})
    seconds = max(hit.seconds_per_image for hit in found.values())
    return {layer: hit.maps for layer, hit in found.items()}, seconds
