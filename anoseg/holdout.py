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

__all__ = ["PARTS", "VALIDATION", "TEST", "PROTOCOLS", "Holdout", "Protocol", "split_test", "file_names"]

VALIDATION, TEST = "validation", "test"
PARTS = (VALIDATION, TEST)
GOOD = "good"
#: How a search chooses and reports (``selection.protocol``); see :class:`Protocol`.
PROTOCOLS = ("holdout", "test", "synthetic", "few_shot")
GOOD_SOURCES = ("train", "test")
#: The generator's defect kinds (:data:`anoseg.anomalies.KINDS`, named here so that reading a space file
#: imports no torch).
DEFECT_KINDS = ("patch", "texture", "cutpaste", "cutpaste_scar", "intensity", "blur", "noise")


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
                "defective (each part needs both: at least 2 good and 2 defective test images); use selection: "
                "{protocol: synthetic} (generated defects, no real one needed) or {protocol: test}")


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


def file_names(paths: Sequence[Path | str]) -> list[str]:
    """``<defect>/<file>`` of each test image path (unique within a category)."""
    return [f"{Path(p).parent.name}/{Path(p).name}" for p in paths]


def _ranked(names: Sequence[str], seed: int, category: str, stratum: str) -> list[int]:
    return sorted(range(len(names)), key=lambda i: _rank(seed, category, stratum, names[i]))


@dataclass(frozen=True)
class Protocol:
    """What a search ranks its trials on (the *validation set*) and what it reports on (the *test part*).

    - ``holdout``: the validation part of each category's test images (:func:`split_test`); the test part is
      the rest.
    - ``test``: all test images, for ranking and reporting alike (selected on the test set).
    - ``synthetic``: no real defect is used to choose. ``n_images`` good images (held out of fitting from
      train/good, or taken from test/good with ``good_source: test``) and a generated defect on each of them
      (:mod:`anoseg.anomalies`, ``kinds``) are the validation set; every real test image (except test/good
      images used as bases) is the test part. A category needs no defective image at all.
    - ``few_shot``: as ``synthetic``, plus ``defects_per_type`` real defective images of each defect type in
      the validation set; the remaining real test images are the test part.

    The real images' split depends only on file names and the seed (:func:`_rank`), never on listing order.
    """

    name: str = "holdout"
    validation_share: float = 0.5
    seed: int = 0
    n_images: int = 20
    kinds: tuple[str, ...] | None = None
    good_source: str = "train"
    defects_per_type: int = 1

    @classmethod
    def from_selection(cls, selection: Mapping[str, object]) -> "Protocol":
        """The protocol of a space's (normalised) ``selection`` section."""
        kinds = selection.get("kinds")
        return cls(str(selection.get("protocol", "holdout")), float(selection.get("validation_share", 0.5)),
                   int(selection.get("seed", 0)), int(selection.get("n_images", 20)),
                   tuple(kinds) if kinds else None, str(selection.get("good_source", "train")),
                   int(selection.get("defects_per_type", 1)))

    @property
    def synthetic(self) -> bool:
        """Whether the validation set holds generated defects."""
        return self.name in ("synthetic", "few_shot")

    @property
    def ranking_part(self) -> str:
        """The part of the real test images that trials are ranked on (with the synthetic set, if any)."""
        return TEST if self.name == "test" else VALIDATION

    def real_parts(self, paths: Sequence[Path | str], defect_types: Sequence[str],
                   category: str) -> dict[str, np.ndarray]:
        """The real test images of each part (``{"test": all}`` for protocol test)."""
        names, n = file_names(paths), len(paths)
        if self.name == "test":
            return {TEST: np.arange(n)}
        if self.name == "holdout":
            return split_test(names, defect_types, self.validation_share, self.seed, category)
        bases = set(self.test_good_bases(paths, defect_types, category).tolist())  # in the synthetic set
        shots = self._few_shot_defects(names, defect_types, category) if self.name == "few_shot" else []
        used = bases | set(shots)
        return {VALIDATION: np.asarray(sorted(shots), dtype=int),
                TEST: np.asarray([i for i in range(n) if i not in used], dtype=int)}

    def _few_shot_defects(self, names: Sequence[str], defect_types: Sequence[str], category: str) -> list[int]:
        by_type: dict[str, list[int]] = {}
        for i, kind in enumerate(defect_types):
            if kind != GOOD:
                by_type.setdefault(kind, []).append(i)
        if not by_type:
            raise DataError(f"category {category or '?'} has no defective test image: few_shot validates on "
                            f"{self.defects_per_type} real defect(s) per type; use selection: {{protocol: synthetic}}")
        chosen = []
        for kind, members in sorted(by_type.items()):
            ranked = sorted(members, key=lambda i: _rank(self.seed, category, kind, names[i]))
            chosen += ranked[:self.defects_per_type]
        return chosen

    def test_good_bases(self, paths: Sequence[Path | str], defect_types: Sequence[str],
                        category: str) -> np.ndarray:
        """With ``good_source: test``: the good test images the synthetic set is made from (sorted indices)."""
        if not self.synthetic or self.good_source != "test":
            return np.zeros(0, dtype=int)
        names = file_names(paths)
        good = [i for i, kind in enumerate(defect_types) if kind == GOOD]
        if len(good) < 2:
            raise DataError(f"category {category or '?'} has {len(good)} good test image(s): good_source: test "
                            "needs at least 2 (or use good_source: train)")
        ranked = sorted(good, key=lambda i: _rank(self.seed, category, GOOD, names[i]))
        return np.sort(np.asarray(ranked[:self.n_images], dtype=int))

    def train_held_out(self, n_train: int, category: str) -> np.ndarray:
        """The training images held out of fitting as the synthetic set's good images (sorted indices)."""
        if not self.synthetic or self.good_source != "train":
            return np.zeros(0, dtype=int)
        n = min(self.n_images, n_train // 2)
        if n < 2:
            raise DataError(f"category {category or '?'} has {n_train} training image(s): the {self.name} protocol "
                            f"holds up to half of them (n_images {self.n_images}) out of fitting and needs at least "
                            "2; add training images or use good_source: test")
        order = sorted(range(n_train), key=lambda i: _rank(self.seed, category, "train", str(i)))
        return np.sort(np.asarray(order[:n], dtype=int))

    def generator_seed(self, category: str) -> int:
        """The defect generator's seed for one category (stable across machines)."""
        digest = hashlib.blake2b(f"{self.seed}\0{category}\0defects".encode(), digest_size=4).digest()
        return int.from_bytes(digest, "big")

    def key(self) -> str:
        """What the synthetic set depends on besides the data (a feature-cache split name)."""
        text = f"{self.good_source}|{self.n_images}|{','.join(self.kinds or ())}|{self.seed}"
        return "synthetic-" + hashlib.blake2b(text.encode(), digest_size=6).hexdigest()
