"""Tests of anoseg.anomalies: the deterministic synthetic defect generator."""
from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from anoseg import anomalies as A
from anoseg.errors import ConfigError

SIZE = 64


def _textured(seed: int = 0, size: int = SIZE) -> torch.Tensor:
    """A smooth, structured good image (gradients, waves, checkers) in [0, 1], float32."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    rng = np.random.default_rng(seed)
    a, b = rng.uniform(5, 15, size=2)
    img = np.stack([0.2 + 0.5 * xx, 0.5 + 0.3 * np.sin(a * yy + b * xx),
                    0.3 + 0.2 * ((np.floor(xx * 8) + np.floor(yy * 8)) % 2)], 0)
    return torch.from_numpy(img).float()


def _images() -> dict[str, torch.Tensor]:
    tex = _textured()
    return {
        "float32": tex,
        "float64": tex.double(),
        "flat": torch.full((3, SIZE, SIZE), 0.5),            # blur / intensity need the nudge here
        "black": torch.zeros((3, SIZE, SIZE)),               # clipping at 0
        "white": torch.ones((3, SIZE, SIZE)),                # clipping at 1
        "uint8": (tex * 255).round().to(torch.uint8),
        "uint8_flat": torch.full((3, SIZE, SIZE), 255, dtype=torch.uint8),
        "gray": tex[:1].clone(),                             # one channel
    }


def _pool(channels: int = 3) -> list[torch.Tensor]:
    return [_textured(1, 48)[:channels], _textured(2, SIZE)[:channels]]


def _check_exact(base: torch.Tensor, out: torch.Tensor, mask: torch.Tensor) -> None:
    """The mask is exactly the changed pixels, each changed by >= MIN_CHANGE; shape/dtype/range kept."""
    assert out.shape == base.shape and out.dtype == base.dtype
    assert mask.shape == base.shape[1:] and mask.dtype == torch.bool
    assert mask.any()
    changed = (out != base).any(0)
    assert torch.equal(changed, mask), f"{int((changed ^ mask).sum())} pixels where mask != changed"
    assert torch.equal(out[:, ~mask], base[:, ~mask])
    if base.dtype == torch.uint8:
        assert int((out.int() - base.int()).abs().amax(0)[mask].min()) >= 2
    else:
        assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
        assert float((out.double() - base.double()).abs().amax(0)[mask].min()) >= A.MIN_CHANGE


# ------------------------------------------------------------------ determinism
def test_same_seed_same_output_and_different_seed_different_output() -> None:
    img = _textured()
    for name, base in (("float", img), ("uint8", (img * 255).round().to(torch.uint8))):
        runs = [A.generate(base, seed=s, pool=_pool()) for s in (3, 3, 4)]
        (o1, m1, k1), (o2, m2, k2), (o3, m3, _) = runs
        assert torch.equal(o1, o2) and torch.equal(m1, m2) and k1 == k2, name
        assert not (torch.equal(o1, o3) and torch.equal(m1, m3)), name
    # bitwise also per kind, and across seeds every kind gives different outputs
    for kind in A.KINDS:
        cfg = A.DefectConfig(kinds=(kind,))
        a = A.generate(img, seed=11, config=cfg, pool=_pool())
        b = A.generate(img, seed=11, config=cfg, pool=_pool())
        c = A.generate(img, seed=12, config=cfg, pool=_pool())
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), kind
        assert not torch.equal(a[0], c[0]), kind


# ------------------------------------------------------------------ exact masks, every kind
@pytest.mark.parametrize("kind", A.KINDS)
def test_mask_is_exactly_the_changed_pixels(kind: str) -> None:
    cfg = A.DefectConfig(kinds=(kind,))
    for name, base in _images().items():
        pool = _pool(base.shape[0])
        if base.dtype == torch.uint8:
            pool = [(p * 255).round().to(torch.uint8) for p in pool]
        for seed in range(8):
            before = base.clone()
            out, mask, got = A.generate(base, seed=seed, config=cfg, pool=pool)
            assert got == kind
            assert torch.equal(base, before), "the input was modified"
            try:
                _check_exact(base, out, mask)
            except AssertionError as exc:
                raise AssertionError(f"{kind} on {name}, seed {seed}: {exc}") from None


def test_numpy_input_is_accepted() -> None:
    base = _textured().numpy()
    out, mask, _ = A.generate(base, seed=0)
    _check_exact(torch.from_numpy(base), out, mask)


# ------------------------------------------------------------------ area
@pytest.mark.parametrize("area", [(0.001, 0.004), (0.2, 0.4), (0.002, 0.15)])
def test_area_within_configured_range(area: tuple[float, float]) -> None:
    img = _textured()
    n = SIZE * SIZE
    lo, hi = math.ceil(area[0] * n), math.floor(area[1] * n)
    cfg = A.DefectConfig(area=area)
    sizes = []
    for seed in range(60):
        _, mask, kind = A.generate(img, seed=seed, config=cfg, pool=_pool())
        k = int(mask.sum())
        assert lo <= k <= hi, f"{kind}, seed {seed}: {k} pixels not in [{lo}, {hi}]"
        sizes.append(k)
    # draws spread over the range (log-uniform), not stuck at one end
    assert max(sizes) > 1.5 * min(sizes)


def test_scar_is_thin_and_long() -> None:
    img = _textured(size=128)
    cfg = A.DefectConfig(kinds=("cutpaste_scar",), area=(0.002, 0.01))
    for seed in range(20):
        _, mask, _ = A.generate(img, seed=seed, config=cfg)
        ys, xs = np.nonzero(mask.numpy())
        ev = np.linalg.eigvalsh(np.cov(np.stack([ys, xs]).astype(float)))
        assert math.sqrt(ev[1] / max(ev[0], 1e-6)) > 2.5, f"seed {seed}: scar not elongated"


# ------------------------------------------------------------------ kinds and weights
def test_kinds_option_restricts_kinds() -> None:
    img = _textured()
    cfg = A.DefectConfig(kinds=("blur", "noise"))
    got = {A.generate(img, seed=s, config=cfg)[2] for s in range(40)}
    assert got == {"blur", "noise"}
    every = {A.generate(img, seed=s, pool=_pool())[2] for s in range(120)}
    assert every == set(A.KINDS)


def test_weights_respected() -> None:
    img = torch.full((3, 16, 16), 0.4)
    cfg = A.DefectConfig(kinds=("intensity", "noise", "blur"), weights=(3.0, 1.0, 0.0))
    kinds = [A.generate(img, seed=s, config=cfg)[2] for s in range(400)]
    assert "blur" not in kinds
    share = kinds.count("intensity") / len(kinds)
    assert 0.65 < share < 0.85, share
    # mapping form: unnamed kinds keep weight 1, a 0 weight is never drawn
    cfg = A.DefectConfig(weights={"texture": 0, "cutpaste": 0, "cutpaste_scar": 0})
    kinds = {A.generate(img, seed=s, config=cfg, pool=[img * 0.5])[2] for s in range(150)}
    assert kinds == {"patch", "intensity", "blur", "noise"}
    assert cfg.weights == (1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0)


# ------------------------------------------------------------------ pool / patch
def test_patch_needs_a_pool() -> None:
    img = _textured()
    with pytest.raises(ConfigError, match="pool"):
        A.generate(img, seed=0, config=A.DefectConfig(kinds=("patch",)))
    # the input itself does not count as "another" good image
    with pytest.raises(ConfigError, match="pool"):
        A.generate(img, seed=0, config=A.DefectConfig(kinds=("patch", "blur")), pool=[img.clone()])
    # default kinds: patch is left out without a pool
    kinds = {A.generate(img, seed=s)[2] for s in range(100)}
    assert "patch" not in kinds and kinds == set(A.KINDS) - {"patch"}
    # ... and an all-patch default weighting cannot be drawn
    only_patch = {k: (1.0 if k == "patch" else 0.0) for k in A.KINDS}
    with pytest.raises(ConfigError, match="weight"):
        A.generate(img, seed=0, config=A.DefectConfig(weights=only_patch))


def test_patch_fill_comes_from_the_pool() -> None:
    img = torch.full((3, SIZE, SIZE), 0.2)
    other = torch.tensor([0.9, 0.1, 0.6]).view(3, 1, 1).expand(3, 40, 40).contiguous()  # any size
    cfg = A.DefectConfig(kinds=("patch",), opacity=(1.0, 1.0))
    for seed in range(5):
        out, mask, _ = A.generate(img, seed=seed, config=cfg, pool=[other])
        assert torch.allclose(out[:, mask], other[:, :1, 0].expand(-1, int(mask.sum())), atol=1e-6)


# ------------------------------------------------------------------ foreground
def test_foreground_respected() -> None:
    img = _textured()
    fg = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    fg[8:40, 20:60] = True
    for kind in A.KINDS:
        cfg = A.DefectConfig(kinds=(kind,), area=(0.01, 0.25))
        for seed in range(6):
            out, mask, _ = A.generate(img, seed=seed, config=cfg, pool=_pool(), foreground=fg)
            assert not (mask & ~fg).any(), f"{kind} seed {seed} outside the foreground"
            _check_exact(img, out, mask)
    # a foreground smaller than the smallest area is a clear error
    tiny = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    tiny[0, :3] = True
    with pytest.raises(ConfigError, match="foreground"):
        A.generate(img, seed=0, config=A.DefectConfig(area=(0.01, 0.1)), foreground=tiny)
    with pytest.raises(ConfigError, match="foreground"):
        A.generate(img, seed=0, foreground=torch.ones(10, 10, dtype=torch.bool))


def _disk_image(size: int = 96) -> tuple[torch.Tensor, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    disk = (yy - 0.45 * size) ** 2 + (xx - 0.55 * size) ** 2 < (0.3 * size) ** 2
    rng = np.random.default_rng(5)
    img = np.where(disk[None], np.array([0.75, 0.55, 0.3])[:, None, None], np.array([0.2, 0.22, 0.25])[:, None, None])
    img = np.clip(img + 0.015 * rng.standard_normal(img.shape), 0, 1)
    return torch.from_numpy(img).float(), disk


def test_foreground_mask_recovers_a_disk() -> None:
    img, disk = _disk_image()
    fg = A.foreground_mask(img).numpy()
    iou = (fg & disk).sum() / (fg | disk).sum()
    assert iou > 0.9, iou
    fg8 = A.foreground_mask((img * 255).round().to(torch.uint8)).numpy()
    assert (fg8 & disk).sum() / (fg8 | disk).sum() > 0.9
    # nothing found (uniform image): the whole image
    assert A.foreground_mask(torch.full((3, 32, 32), 0.3)).all()


def test_defects_on_an_object_with_its_estimated_foreground() -> None:
    img, disk = _disk_image()
    fg = A.foreground_mask(img)
    outs, masks, kinds = A.generate_batch([img], 12, seed=1, foreground=fg)
    assert not (masks & ~fg).any()
    for out, mask in zip(outs, masks):
        _check_exact(img, out, mask)


# ------------------------------------------------------------------ batch
def test_generate_batch_cycles_and_is_deterministic() -> None:
    goods = [_textured(i) for i in range(3)]
    cfg = A.DefectConfig(area=(0.01, 0.1))
    outs, masks, kinds = A.generate_batch(goods, 7, seed=9, config=cfg, pool=_pool())
    assert outs.shape == (7, 3, SIZE, SIZE) and masks.shape == (7, SIZE, SIZE) and len(kinds) == 7
    for i in range(7):
        base = goods[i % 3]
        _check_exact(base, outs[i], masks[i])
        single = A.generate(base, seed=A.batch_seed(9, i), config=cfg, pool=_pool())
        assert torch.equal(single[0], outs[i]) and torch.equal(single[1], masks[i]) and single[2] == kinds[i]
    again = A.generate_batch(torch.stack(goods), 7, seed=9, config=cfg, pool=_pool())
    assert torch.equal(again[0], outs) and torch.equal(again[1], masks) and again[2] == kinds
    other = A.generate_batch(goods, 7, seed=10, config=cfg, pool=_pool())
    assert not torch.equal(other[0], outs)
    # items derived from the same good image still differ
    assert not torch.equal(masks[0], masks[3])
    # per-image foregrounds
    fgs = torch.zeros(3, SIZE, SIZE, dtype=torch.bool)
    fgs[0, :32], fgs[1, 32:], fgs[2, :, :32] = True, True, True
    _, masks, _ = A.generate_batch(goods, 6, seed=0, config=cfg, foreground=fgs)
    for i in range(6):
        assert not (masks[i] & ~fgs[i % 3]).any()


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("kwargs, words", [
    ({"kinds": ("scratch",)}, ["DefectConfig.kinds", "'scratch'", "cutpaste_scar"]),
    ({"kinds": ()}, ["DefectConfig.kinds", "empty"]),
    ({"kinds": ("blur", "blur")}, ["DefectConfig.kinds", "repeated"]),
    ({"kinds": ("blur", "noise"), "weights": (1.0,)}, ["DefectConfig.weights", "2 kinds"]),
    ({"kinds": ("blur",), "weights": (-1.0,)}, ["DefectConfig.weights", ">= 0"]),
    ({"kinds": ("blur", "noise"), "weights": (0, 0)}, ["DefectConfig.weights", "all weights are 0"]),
    ({"weights": (1.0,) * 7}, ["DefectConfig.weights", "explicit kinds"]),
    ({"kinds": ("blur",), "weights": {"noise": 1.0}}, ["DefectConfig.weights", "'noise'", "blur"]),
    ({"weights": {"blur": float("nan")}}, ["DefectConfig.weights", "finite"]),
    ({"area": (0.2, 0.1)}, ["DefectConfig.area", "min must be <= max"]),
    ({"area": (0.0, 0.1)}, ["DefectConfig.area", "(0, 0.5]"]),
    ({"area": (0.1, 0.9)}, ["DefectConfig.area", "(0, 0.5]"]),
    ({"area": 0.1}, ["DefectConfig.area", "(min, max)"]),
    ({"opacity": (0.5, 1.5)}, ["DefectConfig.opacity", "(0, 1]"]),
])
def test_config_errors_are_clear(kwargs: dict, words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        A.DefectConfig(**kwargs)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_argument_errors() -> None:
    img = _textured()
    with pytest.raises(ConfigError, match="seed"):
        A.generate(img, seed=-1)
    with pytest.raises(ConfigError, match="shape"):
        A.generate(img[0], seed=0)
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        A.generate(img * 2, seed=0)
    with pytest.raises(ConfigError, match="uint8 or float"):
        A.generate(img.to(torch.int32), seed=0)
    with pytest.raises(ConfigError, match="unknown field"):
        A.generate(img, seed=0, config={"kind": ("blur",)})
    with pytest.raises(ConfigError, match="channels"):
        A.generate(img, seed=0, pool=[img[:1]])
    with pytest.raises(ConfigError, match="n must be"):
        A.generate_batch([img], 0, seed=0)
    with pytest.raises(ConfigError, match="all must match"):
        A.generate_batch([img, img.double()], 2, seed=0)
    # a mapping config works like the dataclass
    a = A.generate(img, seed=2, config={"kinds": ["noise"], "area": (0.01, 0.02)})
    b = A.generate(img, seed=2, config=A.DefectConfig(kinds=("noise",), area=(0.01, 0.02)))
    assert torch.equal(a[0], b[0]) and a[2] == "noise"


# ------------------------------------------------------------------ independence from the dataset painter
def test_no_code_shared_with_the_dataset_painter() -> None:
    source = Path(A.__file__).read_text(encoding="utf-8")
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert not (node.module or "").startswith("anoseg.data"), node.module
        if isinstance(node, ast.Import):
            assert not any(a.name.startswith("anoseg.data") for a in node.names)
    # no scikit-image photos (the painter's textures) and none of its helpers
    assert "skimage" not in source
    for helper in ("_blob", "_stroke", "_curve_points", "_random_crop", "_smooth_field"):
        assert helper not in source


def test_perlin_noise_is_smooth_and_seeded() -> None:
    a = A.perlin_noise((64, 64), (4, 4), np.random.default_rng(0))
    b = A.perlin_noise((64, 64), (4, 4), np.random.default_rng(0))
    assert np.array_equal(a, b) and a.std() > 0.05
    assert np.abs(np.diff(a, axis=0)).max() < 0.2 and np.abs(np.diff(a, axis=1)).max() < 0.2
