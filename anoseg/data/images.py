"""Reading image and mask files: the one reader behind the dataset loader and `predict`.

Images: PIL ``convert("RGB")`` (grayscale and RGBA become RGB) and a bilinear resize to a square
size. Masks: any non-zero pixel is anomalous, nearest-neighbour resize.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from anoseg.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def _open(path: Path, mode: str, what: str = "image") -> Image.Image:
    if not path.is_file():
        raise DataError(f"cannot read {what} {path}: " + ("it is a folder" if path.is_dir() else "no such file"))
    try:
        with Image.open(path) as img:
            return img.convert(mode)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"cannot read {what} {path}: {exc}") from None


def read_image(path: str | Path, size: int) -> np.ndarray:
    """One image file as (size, size, 3) uint8 RGB."""
    img = _open(Path(path), "RGB").resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def to_tensor(arrays: Sequence[np.ndarray], size: int) -> torch.Tensor:
    """uint8 (S, S, 3) images -> (N, 3, S, S) float in [0, 1]."""
    if not arrays:
        return torch.empty(0, 3, size, size)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255.0)


def load_images(paths: Sequence[str | Path], size: int) -> torch.Tensor:
    """Images as (N, 3, size, size) float in [0, 1], decoded in threads; an unreadable file is a
    DataError naming it."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        return to_tensor(list(pool.map(lambda p: read_image(p, size), paths)), size)


def read_images(paths: Sequence[str | Path], size: int) -> tuple[torch.Tensor, list[Path], dict[Path, str]]:
    """Images as (N, 3, size, size), leaving out unreadable files: (images, the files read,
    {unreadable file: error message})."""
    arrays, ok, errors = [], [], {}
    for p in map(Path, paths):
        try:
            arrays.append(read_image(p, size))
            ok.append(p)
        except DataError as exc:
            errors[p] = str(exc)
    return to_tensor(arrays, size), ok, errors


def read_mask(path: str | Path, size: int, image_path: str | Path | None = None) -> np.ndarray:
    """A mask file as (size, size) bool; with `image_path`, a mask of another size than its image is a DataError."""
    path = Path(path)
    mask = _open(path, "L", "mask")
    if image_path is not None:
        with Image.open(image_path) as img:
            if img.size != mask.size:
                raise DataError(f"mask {path} is {mask.size[0]}x{mask.size[1]} but its image {image_path} is "
                                f"{img.size[0]}x{img.size[1]}")
    return np.asarray(mask.resize((size, size), Image.NEAREST)) > 0


def find_mask(image_path: Path, masks_dir: Path) -> Path | None:
    """The ground-truth mask of `image_path` under `masks_dir`, or None (= defect-free).

    Looked up, in order: ``<masks>/<image's folder name>/<stem>_mask.png`` (the MVTec AD
    ``ground_truth/<defect>/`` layout), ``<masks>/<stem>_mask.png`` and ``<masks>/<stem>.png``
    (flat folders). Any image suffix is accepted for the mask.
    """
    stem = image_path.stem
    for folder, name in ((masks_dir / image_path.parent.name, f"{stem}_mask"), (masks_dir, f"{stem}_mask"),
                         (masks_dir, stem)):
        for suffix in (".png", *[s for s in IMAGE_SUFFIXES if s != ".png"]):
            candidate = folder / f"{name}{suffix}"
            if candidate.is_file() and candidate.resolve() != image_path.resolve():
                return candidate
    return None
