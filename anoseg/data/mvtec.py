"""Loader for datasets in the MVTec AD layout.

```
<root>/<category>/train/good/*.png
<root>/<category>/test/good/*.png
<root>/<category>/test/<defect>/<id>.png
<root>/<category>/ground_truth/<defect>/<id>_mask.png
```
Any category folder in this layout works (a user's own product too). Images are
returned as float tensors in [0, 1], resized to a square `size`; masks are
resized with nearest neighbour. Normalisation belongs to the backbone.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from anoseg.data.images import IMAGE_SUFFIXES, load_images, read_mask
from anoseg.errors import DataError

MVTEC_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)
GOOD = "good"


@dataclass
class TestSplit:
    """The test images of one category with their ground truth."""

    images: torch.Tensor | None  # (N, 3, S, S) float in [0, 1]; None when loaded without images
    masks: torch.Tensor  # (N, S, S) bool
    labels: np.ndarray  # (N,) 1 = defective
    defect_types: list[str]
    paths: list[Path]


def _root(root: str | Path) -> Path:
    path = Path(root)
    if not path.is_dir():
        raise DataError(f"dataset root {path} does not exist or is not a folder")
    return path


def list_categories(root: str | Path) -> list[str]:
    """Every folder under `root` that holds `train/good`, sorted by name."""
    return sorted(p.name for p in _root(root).iterdir() if (p / "train" / GOOD).is_dir())


def resolve_categories(root: str | Path, categories: Sequence[str] | str | None = None) -> list[str]:
    """Validate a category selection; None, "all" or empty means every category under `root`."""
    available = list_categories(root)
    if isinstance(categories, str):
        categories = [c.strip() for c in categories.split(",") if c.strip()]
    if not categories or list(categories) == ["all"]:
        if not available:
            raise DataError(f"no category folder with train/good under {root} (expected the MVTec AD layout)")
        return available
    missing = [c for c in categories if c not in available]
    if missing:
        raise DataError(
            f"category {', '.join(missing)} not found under {root}; available: {', '.join(available) or 'none'}"
        )
    return list(dict.fromkeys(categories))


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _category_dir(root: str | Path, category: str) -> Path:
    folder = _root(root) / category
    if not folder.is_dir():
        raise DataError(f"category {category!r} not found under {root}; available: {', '.join(list_categories(root)) or 'none'}")
    return folder


def load_train(root: str | Path, category: str, size: int) -> torch.Tensor:
    """The defect-free training images of `category`, (N, 3, size, size) in [0, 1]."""
    folder = _category_dir(root, category) / "train" / GOOD
    if not folder.is_dir():
        raise DataError(f"{folder} is missing: every category needs train/good with defect-free images")
    paths = _image_files(folder)
    if not paths:
        raise DataError(f"the training set {folder} has no images ({', '.join(IMAGE_SUFFIXES)})")
    return load_images(paths, size)


def list_test(root: str | Path, category: str, required: bool = True) -> tuple[list[Path], list[str]]:
    """The test image files of `category` and their defect types (``good`` for the good ones), sorted.
    `required=False`: a missing or empty test folder gives no images instead of a DataError (a search that
    validates on generated defects needs none)."""
    test_dir = _category_dir(root, category) / "test"
    if not test_dir.is_dir():
        if not required:
            return [], []
        raise DataError(f"{test_dir} is missing: every category needs a test folder (or search it with "
                        "selection: {protocol: synthetic}, which needs none)")
    paths: list[Path] = []
    defect_types: list[str] = []
    for defect_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        for image_path in _image_files(defect_dir):
            paths.append(image_path)
            defect_types.append(defect_dir.name)
    if not paths and required:
        raise DataError(f"the test set {test_dir} has no images")
    return paths, defect_types


def load_test(root: str | Path, category: str, size: int, with_images: bool = True,
              required: bool = True) -> TestSplit:
    """Test images with masks (empty for good images), labels and defect types.

    `with_images=False` reads only the ground truth (for cached features); `required=False`: no test
    images is an empty split, not an error.
    """
    cat_dir = _category_dir(root, category)
    paths, defect_types = list_test(root, category, required)
    if not paths:
        return TestSplit(torch.zeros(0, 3, size, size) if with_images else None, torch.zeros(0, size, size, dtype=torch.bool),
                         np.zeros(0, dtype=int), [], [])
    mask_paths: list[Path | None] = []
    for image_path, defect in zip(paths, defect_types):
        if defect == GOOD:
            mask_paths.append(None)
            continue
        mask_path = cat_dir / "ground_truth" / defect / f"{image_path.stem}_mask.png"
        if not mask_path.is_file():
            raise DataError(f"defect image {image_path} has no mask: expected {mask_path}")
        mask_paths.append(mask_path)
    images = load_images(paths, size) if with_images else None
    masks = np.stack([
        np.zeros((size, size), bool) if m is None else read_mask(m, size, image_path=p)
        for m, p in zip(mask_paths, paths)
    ])
    labels = np.array([int(d != GOOD) for d in defect_types])
    return TestSplit(images, torch.from_numpy(masks), labels, defect_types, paths)


_FINGERPRINTS: dict[tuple, str] = {}


def category_fingerprint(root: str | Path, category: str) -> str:
    """A content hash of every file of a category: equal data gives an equal fingerprint on any node.

    Hashing reads every byte, so the result is remembered for the process while no file's
    path, size or modification time changes.
    """
    cat_dir = _category_dir(root, category)
    files = sorted(p for p in cat_dir.rglob("*") if p.is_file())
    signature = (str(cat_dir.resolve()), *((p.as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    if signature in _FINGERPRINTS:
        return _FINGERPRINTS[signature]
    digest = hashlib.blake2b(digest_size=16)
    for path in files:
        digest.update(path.relative_to(cat_dir).as_posix().encode() + b"\0")
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    _FINGERPRINTS[signature] = digest.hexdigest()
    return _FINGERPRINTS[signature]
