"""Tests of anoseg.data.synthetic: MVTec AD layout, determinism, exact masks, logical defects, defect
strengths, nuisances of good images, argument checks."""
from __future__ import annotations

import inspect
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
    assert syn.OBJECTS == ("washer", "board")
    assert syn.CATEGORIES == syn.TEXTURES + syn.OBJECTS
    for cat in syn.CATEGORIES:
        assert len(syn.DEFECTS[cat]) >= 3
        assert "good" not in syn.DEFECTS[cat]
    for cat in syn.TEXTURES:  # subtle kinds: thin scratches, small holes, smudges, slight colour shifts
        assert {"scratch", "hole", "stain", "color"} <= set(syn.DEFECTS[cat])
    assert {"scratch", "smudge"} <= set(syn.DEFECTS["washer"])
    assert syn.LOGICAL_DEFECTS == {"board": ("missing", "moved", "swapped", "rotated")}
    assert syn.DEFECTS["board"] == syn.LOGICAL_DEFECTS["board"]


def test_defaults_write_at_least_8_images_per_defect_kind() -> None:
    from anoseg.cli import build_parser

    params = inspect.signature(syn.generate).parameters
    assert params["n_test_per_defect"].default >= 8
    args = build_parser().parse_args(["data", "synth", "out"])
    assert args.test_per_defect == params["n_test_per_defect"].default
    assert (args.size, args.train, args.test_good) == (params["image_size"].default, params["n_train"].default,
                                                         params["n_test_good"].default)


def test_layout(small_root: Path) -> None:
    assert sorted(p.name for p in small_root.iterdir() if p.is_dir()) == sorted(syn.CATEGORIES)
    readme = (small_root / "README.txt").read_text()
    assert "seed = 0" in readme and "image_size = 64" in readme and "board: missing, moved" in readme
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
                assert 0.001 <= frac <= 0.08, f"{p}: defect covers {frac:.2%} of the image"


def _pair(cat: str, defect: str, size: int, seed: int, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(defective image, its mask, the same image without the defect) as uint8 / bool."""
    img, mask = syn._defective(cat, defect, size, syn._rng(seed, cat, "test", defect, i))
    base = syn._good(cat, size, syn._rng(seed, cat, "test", defect, i))
    return syn._to_uint8(img), mask, syn._to_uint8(base)


@pytest.mark.parametrize("size", [64, 160])
def test_mask_marks_exactly_the_changed_pixels(size: int) -> None:
    """Outside the mask the defect image equals its defect-free version (within one grey level); the
    mask is the changed region, not much more (logical defects: the parts' whole footprints)."""
    for cat in syn.CATEGORIES:
        for defect in syn.DEFECTS[cat]:
            for i in range(3):
                a, mask, b = _pair(cat, defect, size, 5, i)
                diff = np.abs(a.astype(np.int16) - b.astype(np.int16)).max(-1)
                where = f"{cat}/{defect}/{i} at {size}px"
                assert mask.any(), where
                assert diff[~mask].max() <= 1, f"{where}: pixels outside the mask changed"
                if defect in syn.LOGICAL_DEFECTS.get(cat, ()):
                    assert diff[mask].max() >= 40, f"{where}: no part changed"
                else:
                    assert diff[mask].mean() >= 4, f"{where}: defect hardly visible inside the mask"
                    assert (diff[mask] >= 2).mean() >= 0.6, f"{where}: mask much larger than the change"


@pytest.mark.parametrize("defect", syn.LOGICAL_DEFECTS["board"])
def test_logical_defects_mark_where_the_part_should_be_and_where_it_is(defect: str) -> None:
    size = 128
    for i in range(6):
        rng = syn._rng(2, "board", "test", defect, i)
        scene = syn._scene("board", size, rng)
        scene.defect(defect, rng)
        changes = scene.changes
        _, mask, _ = _pair("board", defect, size, 2, i)
        where = f"board/{defect}/{i}"
        if defect == "swapped":
            assert len(changes) == 2, where
            (one, (at_one, now_one)), (two, (at_two, now_two)) = changes.items()
            assert now_one == at_two and now_two == at_one, f"{where}: {one} and {two} did not trade places"
        else:
            assert len(changes) == 1, where
        for name, (should, now) in changes.items():
            assert name in syn._LAYOUT
            assert (mask >= scene.footprint(name, should)).all(), f"{where}: mask misses where {name} should be"
            if defect == "missing":
                assert now is None, where
                continue
            assert (mask >= scene.footprint(name, now)).all(), f"{where}: mask misses where {name} is"
            moved = np.hypot(now[0] - should[0], now[1] - should[1])
            turned = abs(np.rad2deg(now[2] - should[2]))
            if defect == "moved":
                assert moved >= 0.02, where  # board units: at least about 3 px at 128 px
            if defect == "rotated":
                assert moved == 0 and min(abs(turned - 90), abs(turned - 180)) < 1e-6, where
        assert mask.mean() <= 0.08, f"{where}: the mask is about the parts concerned, not the board"


def test_defect_strength_spans_obvious_to_subtle() -> None:
    rng = np.random.default_rng(0)
    draws = np.array([syn._strength(rng) for _ in range(4000)])
    obvious = draws >= 0.75
    assert 0.25 <= obvious.mean() <= 0.35, "about a third of the defects are obvious"
    assert ((draws[~obvious] >= 0.3) & (draws[~obvious] <= 0.6)).all()


def test_subtle_defects_are_fainter_but_still_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    """Per structural kind: the same defect drawn subtle changes the image less than drawn obvious, and
    even subtle it changes its region by a few grey levels (coherently: sensor noise is independent)."""
    def energy(cat: str, defect: str, strength: float) -> tuple[float, float]:
        monkeypatch.setattr(syn, "_strength", lambda rng: strength)
        out = []
        for i in range(4):
            a, mask, b = _pair(cat, defect, 128, 9, i)
            diff = np.abs(a.astype(np.int16) - b.astype(np.int16)).max(-1)
            out.append((diff[mask].sum(), diff[mask].mean()))
        return float(np.mean([e for e, _ in out])), float(min(m for _, m in out))

    for cat in syn.CATEGORIES:
        for defect in syn.DEFECTS[cat]:
            if defect in syn.LOGICAL_DEFECTS.get(cat, ()):
                continue
            subtle, subtle_mean = energy(cat, defect, 0.3)
            obvious, _ = energy(cat, defect, 1.0)
            assert subtle < 0.7 * obvious, f"{cat}/{defect}: subtle {subtle:.0f} vs obvious {obvious:.0f}"
            assert subtle_mean >= 6, f"{cat}/{defect}: a subtle defect changes its pixels by {subtle_mean:.1f} levels"


def test_good_images_carry_nuisances() -> None:
    """Good images (train and test alike) differ in blur, illumination, noise and (objects) pose."""
    size = 128
    for cat in syn.CATEGORIES:
        scenes = [syn._scene(cat, size, syn._rng(0, cat, split, "good", i)) for split in ("train", "test")
                  for i in range(12)]
        blur = [s.camera.blur for s in scenes]
        assert min(blur) < 0.1 and max(blur) > 0.3, cat
        noise = [float(s.camera.noise.std()) for s in scenes]
        assert min(noise) > 0.003 and max(noise) > 0.008, cat
        # illumination: gain and white balance per image, a gradient / vignette across each image
        means = [float(s.camera.light.mean()) for s in scenes]
        assert max(means) - min(means) > 0.05, cat
        spread = [float(s.camera.light.max() / s.camera.light.min()) for s in scenes]
        assert max(spread) > 1.1, cat
        for s in scenes[:3]:
            good = s.camera(s.clean)
            assert np.abs(good - s.clean).mean() > 0.003, f"{cat}: the camera model changes the image"
        if cat == "washer":
            centres = np.array([(s.washer.cy, s.washer.cx) for s in scenes])
            assert centres.std(0).min() > 1.0, "washers shift"
            assert np.ptp([s.washer.rot for s in scenes]) > 1.0, "washers turn"
        if cat == "board":
            centres = np.array([(s.board.cy, s.board.cx) for s in scenes])
            assert centres.std(0).min() > 1.0, "boards shift"
            assert np.ptp([np.rad2deg(s.board.angle) for s in scenes]) > 3.0, "boards turn"
            jitter = np.array([[p[0] - syn._LAYOUT[n][1] for n, p in s.poses.items()] for s in scenes])
            assert jitter.std() > 0.001, "parts sit with a little placement jitter"


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
