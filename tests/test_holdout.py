"""The holdout protocol's split: stratified, deterministic, disjoint, every defect type with 2+ images in both
parts, and a clear error for a category too small to split."""
from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from anoseg.errors import DataError
from anoseg.holdout import TEST, VALIDATION, Holdout, split_test


def listing(counts: dict[str, int]) -> tuple[list[str], list[str]]:
    names, strata = [], []
    for stratum, n in counts.items():
        for i in range(n):
            names.append(f"{stratum}/{i:03d}.png")
            strata.append(stratum)
    return names, strata


COUNTS = {"good": 10, "crack": 8, "hole": 5, "stain": 2, "cut": 1, "fold": 1, "glue": 1}


def test_split_is_disjoint_complete_and_stratified():
    names, strata = listing(COUNTS)
    parts = split_test(names, strata, 0.5, seed=0, category="tile")
    val, test = set(parts[VALIDATION].tolist()), set(parts[TEST].tolist())
    assert not val & test and val | test == set(range(len(names)))
    per_part = {part: Counter(strata[i] for i in index) for part, index in parts.items()}
    for stratum, n in COUNTS.items():
        if n >= 2:  # in both parts, at the share (rounded)
            assert per_part[VALIDATION][stratum] >= 1 and per_part[TEST][stratum] >= 1
            assert per_part[VALIDATION][stratum] == min(n - 1, max(1, round(0.5 * n)))
    singles = [s for s, n in COUNTS.items() if n == 1]  # dealt out in turn, validation first
    assert [per_part[VALIDATION][s] for s in sorted(singles)] == [1, 0, 1]


def test_split_is_deterministic_and_independent_of_listing_order():
    names, strata = listing(COUNTS)
    first = split_test(names, strata, 0.5, seed=3, category="tile")
    order = list(range(len(names)))
    random.Random(1).shuffle(order)
    shuffled = split_test([names[i] for i in order], [strata[i] for i in order], 0.5, seed=3, category="tile")
    as_names = lambda parts, ns: {p: sorted(ns[i] for i in idx) for p, idx in parts.items()}  # noqa: E731
    assert as_names(first, names) == as_names(shuffled, [names[i] for i in order])
    again = split_test(names, strata, 0.5, seed=3, category="tile")
    assert all(np.array_equal(first[p], again[p]) for p in first)
    other_seed = split_test(names, strata, 0.5, seed=4, category="tile")
    assert not np.array_equal(first[VALIDATION], other_seed[VALIDATION])


def test_share_moves_images_between_parts():
    names, strata = listing({"good": 20, "crack": 20})
    small = split_test(names, strata, 0.25, seed=0)
    large = split_test(names, strata, 0.75, seed=0)
    assert len(small[VALIDATION]) == 10 and len(large[VALIDATION]) == 30


@pytest.mark.parametrize("counts, part", [
    ({"good": 1, "crack": 5}, "test"),  # one good image: one part has none
    ({"good": 5, "crack": 1}, "test"),  # one defective image
    ({"good": 4}, "validation"),  # no defects at all
])
def test_a_category_too_small_to_split_is_a_clear_error(counts, part):
    names, strata = listing(counts)
    with pytest.raises(DataError) as failed:
        split_test(names, strata, 0.5, seed=0, category="screw")
    text = str(failed.value)
    assert "category screw is too small to split" in text and "protocol: test" in text
    assert ", ".join(f"{s} {n}" for s, n in sorted(counts.items())) in text


def test_bad_share_is_an_error():
    names, strata = listing({"good": 4, "crack": 4})
    with pytest.raises(DataError, match="validation_share"):
        split_test(names, strata, 1.0, seed=0)


def test_holdout_on_the_embedded_dataset(synthetic_root):
    from anoseg.data import list_categories, list_test

    for category in list_categories(synthetic_root):
        paths, types = list_test(synthetic_root, category)
        files = Holdout(0.5, 0).files(paths, types, category)
        assert sorted(files[VALIDATION] + files[TEST]) == sorted(f"{p.parent.name}/{p.name}" for p in paths)
        for part in (VALIDATION, TEST):
            kinds = {name.split("/")[0] for name in files[part]}
            assert kinds == set(types), (category, part)  # every defect type of the dataset in both parts


def test_the_defect_kinds_named_here_are_the_generators():
    from anoseg.anomalies import KINDS
    from anoseg.holdout import DEFECT_KINDS

    assert DEFECT_KINDS == KINDS


# --------------------------------------------------------------------------- the protocols

from anoseg.holdout import Protocol  # noqa: E402


def test_synthetic_protocol_keeps_every_real_image_for_the_test_part():
    names, strata = listing(COUNTS)
    parts = Protocol("synthetic", n_images=6).real_parts(names, strata, "tile")
    assert len(parts[VALIDATION]) == 0 and parts[TEST].tolist() == list(range(len(names)))
    assert Protocol("synthetic").real_parts([], [], "tile")[TEST].tolist() == []  # no real test image at all


def test_synthetic_protocol_with_test_good_bases_takes_them_out_of_the_test_part():
    names, strata = listing(COUNTS)
    protocol = Protocol("synthetic", n_images=4, good_source="test")
    bases = protocol.test_good_bases(names, strata, "tile")
    assert len(bases) == 4 and all(strata[i] == "good" for i in bases)
    parts = protocol.real_parts(names, strata, "tile")
    assert not set(bases) & set(parts[TEST].tolist()) and len(parts[TEST]) == len(names) - 4


def test_few_shot_validates_on_k_real_defects_per_type():
    names, strata = listing(COUNTS)
    parts = Protocol("few_shot", defects_per_type=1, seed=2).real_parts(names, strata, "tile")
    chosen = Counter(strata[i] for i in parts[VALIDATION])
    assert chosen == Counter({kind: 1 for kind in COUNTS if kind != "good"})
    assert sorted(parts[VALIDATION].tolist() + parts[TEST].tolist()) == list(range(len(names)))
    again = Protocol("few_shot", defects_per_type=1, seed=2).real_parts(names, strata, "tile")
    assert np.array_equal(parts[VALIDATION], again[VALIDATION])
    with pytest.raises(DataError, match="no defective test image.*protocol: synthetic"):
        Protocol("few_shot").real_parts(*listing({"good": 5}), "tile")


def test_training_images_held_out_for_the_synthetic_set():
    protocol = Protocol("synthetic", n_images=20)
    held = protocol.train_held_out(30, "tile")
    assert len(held) == 15 and held.tolist() == sorted(set(held.tolist()))  # at most half of them
    assert np.array_equal(held, protocol.train_held_out(30, "tile"))
    assert len(Protocol("holdout").train_held_out(30, "tile")) == 0
    with pytest.raises(DataError, match="has 3 training image"):
        protocol.train_held_out(3, "tile")


def test_fitting_never_uses_the_held_out_images():
    from anoseg.pipeline import fit_index

    held = np.array([1, 4, 7])
    used = fit_index(10, 1.0, 0, held)
    assert sorted(used.tolist()) == [0, 2, 3, 5, 6, 8, 9]
    half = fit_index(10, 0.5, 0, held)
    assert set(half.tolist()) <= set(used.tolist()) and len(half) == 4
    assert fit_index(10, 1.0, 0, np.zeros(0, dtype=int)) is None


def test_the_synthetic_set_is_deterministic_and_its_masks_are_the_changes(synthetic_root):
    from anoseg.pipeline import _SYNTHETIC, synthetic_set

    protocol = Protocol("synthetic", n_images=4, kinds=("intensity", "cutpaste"))
    first = synthetic_set(synthetic_root, "brick", 64, protocol)
    _SYNTHETIC.clear()
    again = synthetic_set(synthetic_root, "brick", 64, protocol)
    assert torch_equal(first.images, again.images) and torch_equal(first.masks, again.masks)
    assert first.labels.tolist() == [0] * 4 + [1] * 4
    assert all(t.split(":")[1] in ("intensity", "cutpaste") for t in first.defect_types[4:])
    changed = (first.images[4:] != first.images[:4]).any(dim=1)
    assert torch_equal(changed, first.masks[4:])  # each defect sits on its own base image, nothing else moved


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))
