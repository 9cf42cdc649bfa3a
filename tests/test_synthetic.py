"""Tests of anoseg.data.synthetic: MVTec AD layout, determinism, masks, argument checks."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anoseg.data import synthetic as syn
from anoseg.errors import ConfigError

SMALL = dict(image_size=64, n_train=3, n_test_good=2, n_test_per_defect=2)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "data"
    written = syn.generate(root, seed=0, **SMALL)
    assert written == list(syn.CATEGORIES)
    return root


def test_public_constants() -> None:
    assert syn.TEXTURES == ("brick", "grass", "gravel")
    assert len(syn.OBJECTS) >= 1
    assert syn.CATEGORIES == syn.TEXTURES + syn.OBJECTS
    for cat in syn.CATEGORIES:
        assert len(syn.DEFECTS[cat]) >= 3
        assert "good" not in syn.DEFECTS[cat]


def test_layout(small_root: Path) -> None:
    assert sorted(p.name for p in small_root.iterdir() if p.is_dir()) == sorted(syn.CATEGORIES)
    readme = (small_root / "README.txt").read_text()
    assert "seed = 0" in readme and "image_size = 64" in readme
    for cat in syn.CATEGORIES:
        base = small_root / cat
        assert sorted(p.name for p in base.iterdir()) == ["ground_truth", "test", "train"]
        assert [p.name for p in (base / "train").iterdir()] == ["good"]
        assert sorted(p.name for p in (base / "train" / "good").iterdir()) == ["000.png", "001.png", "002.png"]
        assert sorted(p.name for p in (base / "test").iterdir()) == sorted(("good",) + syn.DEFECTS[cat])
        assert sorted(p.name for p in (base / "test" / "good").iterdir()) == ["000.png", "001.png"]
        # good images have no ground truth folder
        assert sorted(p.name for p in (base / "ground_truth").iterdir()) == sorted(syn.DEFECTS[cat])
        for split_dir in (base / "train" / "good", base / "test" / "good"):
            for p in split_dir.iterdir():
                with Image.open(p) as im:
                    assert im.mode == "RGB" and im.size == (64, 64)
        for defect in syn.DEFECTS[cat]:
            images = sorted((base / "test" / defect).iterdir())
            masks = sorted((base / "ground_truth" / defect).iterdir())
            assert [p.name for p in images] == ["000.png", "001.png"]
            assert [p.name for p in masks] == ["000_mask.png", "001_mask.png"]
            for img_path, mask_path in zip(images, masks):
                with Image.open(img_path) as im, Image.open(mask_path) as mk:
                    assert im.mode == "RGB"
                    assert mk.mode == "L"
                    assert mk.size == im.size == (64, 64)
                    mask = np.asarray(mk)
                assert set(np.unique(mask).tolist()) == {0, 255}, f"{mask_path} not binary 0/255 or empty"


def test_mask_area_fraction(small_root: Path) -> None:
    for cat in syn.CATEGORIES:
        for defect in syn.DEFECTS[cat]:
            for p in (small_root / cat / "ground_truth" / defect).iterdir():
                frac = (np.asarray(Image.open(p)) > 0).mean()
                assert 0.003 <= frac <= 0.08, f"{p}: defect covers {frac:.2%} of the image"


@pytest.mark.parametrize("size", [64, 160])
def test_mask_marks_exactly_the_changed_pixels(size: int) -> None:
    """The defect image equals its defect-free base outside the mask and differs clearly inside."""
    for cat in syn.CATEGORIES:
        for defect in syn.DEFECTS[cat]:
            for i in range(3):
                img, mask = syn._defective(cat, defect, size, syn._rng(5, cat, "test", defect, i))
                base = syn._good(cat, size, syn._rng(5, cat, "test", defect, i))
                a = syn._to_uint8(img).astype(np.int16)
                b = syn._to_uint8(base).astype(np.int16)
                diff = np.abs(a - b)
                where = f"{cat}/{defect}/{i} at {size}px"
                assert mask.any(), where
                assert diff[~mask].max() <= 4, f"{where}: pixels outside the mask changed"
                assert diff[mask].mean() >= 10, f"{where}: defect hardly visible inside the mask"
                assert (diff.max(-1)[mask] >= 8).mean() >= 0.6, f"{where}: mask much larger than the change"


def test_defects_stand_out_from_good_statistics(small_root: Path) -> None:
    """Inside the mask the pixels are further from the good images' mean than outside it."""
    for cat in syn.CATEGORIES:
        goods = np.stack([np.asarray(Image.open(p), dtype=np.float32)
                          for p in sorted((small_root / cat / "train" / "good").iterdir())])
        # textures: mean colour of the good images; object: their mean image (aligned parts)
        mu = goods.mean((0, 1, 2)) if cat in syn.TEXTURES else goods.mean(0)
        for defect in syn.DEFECTS[cat]:
            for p in sorted((small_root / cat / "test" / defect).iterdir()):
                img = np.asarray(Image.open(p), dtype=np.float32)
                mask = np.asarray(Image.open(small_root / cat / "ground_truth" / defect / f"{p.stem}_mask.png")) > 0
                inside = np.abs(img - mu)[mask].mean()
                outside = np.abs(img - mu)[~mask].mean()
                assert inside > outside, f"{cat}/{defect}/{p.name}: defect not distinct ({inside:.1f} vs {outside:.1f})"


def test_deterministic(tmp_path: Path, small_root: Path) -> None:
    again = tmp_path / "again"
    syn.generate(again, seed=0, **SMALL)
    assert _files(again) == _files(small_root)
    other = tmp_path / "other"
    syn.generate(other, seed=1, **SMALL)
    a, b = _files(other), _files(small_root)
    assert a.keys() == b.keys()
    pngs = [k for k in a if k.endswith(".png") and "ground_truth" not in k]
    assert all(a[k] != b[k] for k in pngs), "a different seed must give different images"


def test_category_does_not_depend_on_other_categories(tmp_path: Path, small_root: Path) -> None:
    assert syn.generate(tmp_path, seed=0, categories=["washer", "grass"], **SMALL) == ["washer", "grass"]
    for cat in ("washer", "grass"):
        assert _files(tmp_path / cat) == _files(small_root / cat)
    assert not (tmp_path / "brick").exists()


def test_categories_argument(tmp_path: Path) -> None:
    assert syn.generate(tmp_path / "a", categories="gravel", **SMALL) == ["gravel"]
    assert syn.generate(tmp_path / "b", categories=("brick", "brick"), **SMALL) == ["brick"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(categories=["carpet"]), "brick, grass, gravel"),
        (dict(categories=[]), "empty"),
        (dict(categories=[3]), "unknown"),
        (dict(image_size=31), "image_size"),
        (dict(image_size=0), "image_size"),
        (dict(image_size=100_000), "image_size"),
        (dict(image_size=64.0), "integer"),
        (dict(image_size="64"), "integer"),
        (dict(image_size=True), "integer"),
        (dict(n_train=0), "n_train"),
        (dict(n_test_good=0), "n_test_good"),
        (dict(n_test_per_defect=-1), "n_test_per_defect"),
        (dict(seed=-1), "seed"),
        (dict(seed=1.5), "seed"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    args = dict(SMALL, **kwargs)
    root = tmp_path / "data"
    with pytest.raises(ConfigError, match=message):
        syn.generate(root, **args)
    assert not root.exists(), "nothing may be written when the arguments are bad"


def test_root_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match="not a folder"):
        syn.generate(f, **SMALL)


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    syn.generate(tmp_path, categories=["washer"], **SMALL)
    before = _files(tmp_path)
    with pytest.raises(ConfigError, match=r"washer.*overwrite=True"):
        syn.generate(tmp_path, categories=["brick", "washer"], seed=3, **SMALL)
    # checked before writing anything: brick was not written, washer untouched
    assert _files(tmp_path) == before
    assert not (tmp_path / "brick").exists()
    # an empty category folder is fine
    (tmp_path / "grass").mkdir()
    assert syn.generate(tmp_path, categories=["grass"], **SMALL) == ["grass"]
    # overwrite replaces the folder, stale files included
    stale = tmp_path / "washer" / "test" / "bent"
    stale.mkdir()
    (stale / "000.png").write_bytes(b"old")
    syn.generate(tmp_path, categories=["washer"], seed=3, overwrite=True, **SMALL)
    assert not stale.exists()
    assert "seed = 3" in (tmp_path / "README.txt").read_text()
    ref = tmp_path / "ref"
    syn.generate(ref, categories=["washer"], seed=3, **SMALL)
    assert _files(tmp_path / "washer") == _files(ref / "washer")
