"""The holdout protocol's split of a category's test images into a validation part and a test part.

A search ranks trials on the validation part only; the chosen configurations are evaluated once on
the test part at the end (``anoseg search finalize``), so the reported figures were never used to
choose. The split is stratified (good images and each defect type are split separately), so both
parts keep the category's mix, and deterministic: it depends only on the file names, the share and
the seed, never on the order the files are listed in or on the machine.

Per stratum of n images: n >= 2 puts ``round(share * n)`` (at least 1, at most n - 1) in the
validation part, so every defect type with two or more images is in both parts; the strata of a
single image are dealt out in turn (by name), to the validation part first. Each part needs at
least one good and one defective image (the metrics need both classes), else the category is too
small to split: a :class:`~anoseg.errors.DataError` naming it and its counts.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from anoseg.errors import DataError

__all__ = ["PARTS", "VALIDATION", "TEST", "Holdout", "split_test"]

VALIDATION, TEST = "validation", "test"
PARTS = (VALIDATION, TEST)
GOOD = "good"


def _rank(seed: int, category: str, stratum: str, name: str) -> bytes:
    """A stable pseudo-random sort key of one file (not Python's salted hash())."""
    return hashlib.blake2b(f"{seed}\0{category}\0{stratum}\0{name}".encode(), digest_size=8).digest()


def split_test(names: Sequence[str], strata: Sequence[str], share: float, seed: int,
               category: str = "") -> dict[str, np.ndarray]:
    """``{"validation": indices, "test": indices}`` (sorted int arrays) of the test images, given each
    image's file name (``<defect>/<file>``: unique within the category) and stratum (``good`` or its
    defect type)."""
    if len(names) != len(strata):
        raise ValueError(f"{len(names)} names but {len(strata)} strata")
    if not 0.0 < share < 1.0:
        raise DataError(f"validation_share must lie strictly between 0 and 1, got {share}")
    by_stratum: dict[str, list[int]] = {}
    for i, stratum in enumerate(strata):
        by_stratum.setdefault(stratum, []).append(i)
    validation: list[int] = []
    singles = sorted(s for s, members in by_stratum.items() if len(members) == 1)
    for stratum, members in sorted(by_stratum.items()):
        if len(members) == 1:
            continue
        ordered = sorted(members, key=lambda i: _rank(seed, category, stratum, names[i]))
        n_validation = min(len(members) - 1, max(1, round(share * len(members))))
        validation += ordered[:n_validation]
    validation += [by_stratum[s][0] for s in singles[::2]]
    in_validation = np.zeros(len(names), dtype=bool)
    in_validation[validation] = True
    parts = {VALIDATION: np.flatnonzero(in_validation), TEST: np.flatnonzero(~in_validation)}
    _check_both_classes(parts, np.asarray([s != GOOD for s in strata]), by_stratum, category)
    return parts


def _check_both_classes(parts: Mapping[str, np.ndarray], defective: np.ndarray,
                        by_stratum: Mapping[str, list[int]], category: str) -> None:
    for part, index in parts.items():
        n_bad = int(defective[index].sum())
        if n_bad == 0 or n_bad == len(index):
            counts = ", ".join(f"{s} {len(m)}" for s, m in sorted(by_stratum.items()))
            raise DataError(
                f"category {category or '?'} is too small to split into validation and test parts: its test "
                f"images are {counts or 'none'}; the {part} part would hold {len(index) - n_bad} good and {n_bad} "
                "defective (each part needs both: at least 2 good and 2 defective test images), or use "
                "selection: {protocol: test}")


@dataclass(frozen=True)
class Holdout:
    """The holdout protocol's settings: the share of each stratum in the validation part, and the seed."""

    validation_share: float = 0.5
    seed: int = 0

    def split(self, paths: Sequence[Path | str], defect_types: Sequence[str], category: str) -> dict[str, np.ndarray]:
        """The parts of one category's test images (paths as the loader lists them, with their defect types)."""
        names = [f"{Path(p).parent.name}/{Path(p).name}" for p in paths]
        return split_test(names, defect_types, self.validation_share, self.seed, category)

    def files(self, paths: Sequence[Path | str], defect_types: Sequence[str], category: str) -> dict[str, list[str]]:
        """The same split as file names ``<defect>/<file>`` (what run.json records)."""
        names = [f"{Path(p).parent.name}/{Path(p).name}" for p in paths]
        parts = split_test(names, defect_types, self.validation_share, self.seed, category)
        return {part: [names[i] for i in index] for part, index in parts.items()}
