"""anoseg.model: fit -> save -> load round trip, the folder format, bad input; the `predict` command."""
from __future__ import annotations

import csv
import json
import shutil
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from anoseg.cli import main
from anoseg.data import load_test
from anoseg.errors import DataError
from anoseg.model import FittedModel, fit_model, load_model
from anoseg.model_folder import MODEL_FILE, WEIGHTS_FILE, ModelError
from anoseg.thresholds import f1_max_threshold
from anoseg.trial import run_trial

BASE = {"backbone": {"name": "resnet18", "weights": "none"}, "layers": ["layer1", "layer2"], "image_size": 64,
        "device": "cpu"}
HEADS = {
    "patchcore": {"name": "patchcore", "coreset_ratio": 0.05},
    "padim": {"name": "padim", "n_features": 32},
}


@pytest.fixture(scope="module")
def fitted(synthetic_root, tmp_path_factory) -> dict[str, tuple[FittedModel, object]]:
    """Both heads fitted on brick and saved: {head: (model, folder)}."""
    out = {}
    for name, head in HEADS.items():
        folder = tmp_path_factory.mktemp(f"model_{name}")
        out[name] = (fit_model({**BASE, "head": head}, synthetic_root, "brick", folder), folder)
    return out


@pytest.fixture(scope="module")
def test_images(synthetic_root) -> torch.Tensor:
    return load_test(synthetic_root, "brick", 64).images


@pytest.mark.parametrize("head", list(HEADS))
def test_save_load_gives_identical_predictions(fitted, test_images, head, monkeypatch):
    model, folder = fitted[head]

    def no_pickle(*args, **kwargs):
        raise AssertionError("load_model must not call torch.load")

    monkeypatch.setattr(torch, "load", no_pickle)
    loaded = load_model(folder, device="cpu")
    maps_a, scores_a = model.predict(test_images)
    maps_b, scores_b = loaded.predict(test_images)
    assert torch.equal(maps_a, maps_b) and torch.equal(scores_a, scores_b)
    assert maps_a.shape == (len(test_images), 64, 64) and scores_a.shape == (len(test_images),)
    assert loaded.thresholds == model.thresholds and loaded.category == "brick"
    assert loaded.backbone.pretrained is False and "none" in loaded.backbone.weights


@pytest.mark.parametrize("head", list(HEADS))
def test_model_folder_format(fitted, synthetic_root, head):
    model, folder = fitted[head]
    assert sorted(p.name for p in folder.iterdir()) == [MODEL_FILE, WEIGHTS_FILE]
    info = json.loads((folder / MODEL_FILE).read_text())  # plain JSON
    assert info["format"] == "anoseg-model" and info["format_version"].startswith("1.")
    assert info["anoseg_version"] and info["category"] == "brick" and info["image_size"] == 64
    assert info["config"]["head"] == HEADS[head] and info["config"]["layers"] == ["layer1", "layer2"]
    bb = info["backbone"]
    assert bb["name"] == "resnet18" and bb["pretrained"] is False and "none" in bb["weights"]
    assert len(bb["mean"]) == 3 and len(bb["std"]) == 3 and bb["layers"] == ["layer1", "layer2"]
    assert info["head"]["name"] == head and info["head"]["params"]
    t = info["thresholds"]
    assert t["method"].startswith("f1_max") and np.isfinite(t["image"]) and np.isfinite(t["pixel"])
    assert len(info["data"]["fingerprint"]) == 32 and info["data"]["n_train"] > 0
    # safetensors: an 8-byte header length, then a JSON header; tensors are prefixed backbone./head.
    raw = (folder / WEIGHTS_FILE).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    keys = [k for k in header if k != "__metadata__"]
    assert any(k.startswith("backbone.") for k in keys) and any(k.startswith("head.") for k in keys)
    assert all(k.startswith(("backbone.", "head.")) for k in keys)
    assert b"\x80\x04" not in raw[:8 + n]  # no pickle protocol marker in the header
    # the metrics are those of the search's trial on that category (cost aside; trials may compute
    # with float16-cached features, hence not bit-exact)
    trial = run_trial({**BASE, "head": HEADS[head]}, synthetic_root, ["brick"]).per_category["brick"]
    for key in ("image_auroc", "pixel_auroc", "aupro", "pixel_f1_max", "image_f1_max"):
        assert info["metrics"][key] == pytest.approx(trial[key], abs=2e-3)


def test_thresholds_separate_the_test_set(fitted, synthetic_root):
    model, _ = fitted["patchcore"]
    test = load_test(synthetic_root, "brick", 64)
    maps, scores = model.predict(test.images)
    f1, threshold = f1_max_threshold(test.labels, scores.numpy())
    assert threshold == model.thresholds["image"] and f1 == pytest.approx(model.metrics["image_f1_max"])
    verdicts = model.verdicts(scores)
    assert set(verdicts) <= {"pass", "fail"}


def test_f1_max_threshold_lies_between_the_classes():
    f1, t = f1_max_threshold([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9])
    assert f1 == 1.0 and t == pytest.approx(0.5)
    f1, t = f1_max_threshold([0, 1], [0.5, 0.5])  # ties: both flagged
    assert f1 == pytest.approx(2 / 3) and t == 0.5


@pytest.mark.parametrize("bad, message", [
    (torch.rand(2, 4, 64, 64), "(2, 4, 64, 64)"),
    (torch.rand(2, 2, 64, 64), "(2, 2, 64, 64)"),
    (torch.rand(2, 1, 64, 64), "RGB"),
    (torch.rand(2, 3, 80, 64), "80x64"),
    ((torch.rand(1, 3, 64, 64) * 255).to(torch.uint8), "uint8"),
    (torch.rand(1, 3, 64, 64) * 255, "[0, 1]"),
    (np.zeros((1, 3, 64, 64), np.float32), "ndarray"),
])
def test_tensor_api_rejects_wrong_images(fitted, bad, message):
    model, _ = fitted["padim"]
    with pytest.raises(DataError) as info:
        model.predict(bad)
    assert message in str(info.value) and "64" in str(info.value)


def test_single_image_and_files_of_any_size_and_mode(fitted, tmp_path, test_images):
    model, _ = fitted["padim"]
    maps, scores = model.predict(test_images[0])  # (3, S, S) = one image
    assert maps.shape == (1, 64, 64) and scores.shape == (1,)
    rng = np.random.default_rng(0)
    paths = [tmp_path / "gray.png", tmp_path / "rgba.png", tmp_path / "big.jpg"]
    Image.fromarray(rng.integers(0, 255, (50, 70), dtype=np.uint8)).save(paths[0])
    Image.fromarray(rng.integers(0, 255, (64, 64, 4), dtype=np.uint8), "RGBA").save(paths[1])
    Image.fromarray(rng.integers(0, 255, (300, 200, 3), dtype=np.uint8)).save(paths[2])
    maps, scores = model.predict_files(paths)
    assert maps.shape == (3, 64, 64) and torch.isfinite(scores).all()
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="broken.png"):
        model.predict_files([paths[0], tmp_path / "broken.png"])


def _copy(folder, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(folder, target)
    return target


@pytest.mark.parametrize("damage, message", [
    ("version", "format version 2.0"),
    ("no_weights", "weights.safetensors is missing"),
    ("no_json", "model.json is missing"),
    ("bad_json", "not valid JSON"),
    ("checksum", "checksum"),
    ("not_a_folder", "does not exist"),
])
def test_bad_model_folders_are_clear_errors(fitted, tmp_path, capsys, damage, message):
    _, folder = fitted["padim"]
    target = _copy(folder, tmp_path)
    if damage == "version":
        info = json.loads((target / MODEL_FILE).read_text())
        info["format_version"] = "2.0"
        (target / MODEL_FILE).write_text(json.dumps(info))
    elif damage == "no_weights":
        (target / WEIGHTS_FILE).unlink()
    elif damage == "no_json":
        (target / MODEL_FILE).unlink()
    elif damage == "bad_json":
        (target / MODEL_FILE).write_text("{")
    elif damage == "checksum":
        raw = bytearray((target / WEIGHTS_FILE).read_bytes())
        raw[-1] ^= 0xFF
        (target / WEIGHTS_FILE).write_bytes(bytes(raw))
    else:
        target = tmp_path / "nowhere"
    with pytest.raises(ModelError, match=message):
        load_model(target)
    assert main(["predict", "--model", str(target), str(target), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("anoseg: error:") and message in err and "Traceback" not in err


def test_predict_writes_overlays_scores_and_metrics(fitted, synthetic_root, tmp_path, capsys):
    _, folder = fitted["patchcore"]
    test_dir = synthetic_root / "brick" / "test"
    out = tmp_path / "maps"
    assert main(["predict", "--model", str(folder), str(test_dir), "--out", str(out),
                 "--masks", str(synthetic_root / "brick" / "ground_truth"), "--save-maps"]) == 0
    printed = capsys.readouterr().out
    assert "pass" in printed and "aupro" in printed
    rows = list(csv.DictReader((out / "scores.csv").open()))
    n = len(list(test_dir.rglob("*.png")))
    assert len(rows) == n and {r["verdict"] for r in rows} <= {"pass", "fail"}
    names = [r["overlay"] for r in rows]
    assert len(set(names)) == n  # good/000.png and hole/000.png do not collide
    for r in rows:
        picture = Image.open(out / r["overlay"])
        assert picture.size == (64, 64) and picture.mode == "RGB"
        assert np.load(out / r["overlay"].replace(".png", ".npy")).shape == (64, 64)
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert {"image_auroc", "pixel_auroc", "aupro", "pixel_f1_max", "image_f1_max"} <= set(metrics)
    # the metrics equal the fit's own evaluation on the same images
    info = json.loads((folder / MODEL_FILE).read_text())
    assert metrics["aupro"] == pytest.approx(info["metrics"]["aupro"], abs=1e-6)


def test_predict_with_flat_masks_of_defective_images_only(fitted, synthetic_root, tmp_path, capsys):
    _, folder = fitted["padim"]
    flat = tmp_path / "flat"
    flat.mkdir()
    images = []
    for defect in sorted(p for p in (synthetic_root / "brick" / "test").iterdir() if p.name != "good"):
        image = defect / "000.png"
        shutil.copy(image, flat / f"{defect.name}.png")
        shutil.copy(synthetic_root / "brick" / "ground_truth" / defect.name / "000_mask.png",
                    flat / f"{defect.name}_mask.png")
        images.append(flat / f"{defect.name}.png")
    out = tmp_path / "maps"
    assert main(["predict", "--model", str(folder), str(flat), "--out", str(out), "--masks", str(flat)]) == 0
    printed = capsys.readouterr().out
    assert "pixel-level metrics only" in printed
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert "aupro" in metrics and "image_auroc" not in metrics
    assert len(list(csv.DictReader((out / "scores.csv").open()))) == len(images)  # *_mask files are no inputs


def test_predict_names_unreadable_files_and_processes_the_others(fitted, synthetic_root, tmp_path, capsys):
    _, folder = fitted["padim"]
    good = synthetic_root / "brick" / "test" / "good" / "000.png"
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG garbage")
    out = tmp_path / "maps"
    assert main(["predict", "--model", str(folder), str(good), str(broken), str(tmp_path / "missing.png"),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "broken.png" in err and "missing.png" in err and "2 of 3 images could not be read" in err
    rows = {r["file"]: r for r in csv.DictReader((out / "scores.csv").open())}
    assert rows[str(good)]["verdict"] in ("pass", "fail") and (out / rows[str(good)]["overlay"]).is_file()
    assert rows[str(broken)]["verdict"] == "unreadable" and "broken.png" in rows[str(broken)]["error"]


def test_fit_command_with_a_per_category_export_needs_the_category(synthetic_root, tmp_path, capsys):
    import yaml

    cfg = {**BASE, "head": HEADS["padim"]}
    path = tmp_path / "per_cat.yaml"
    path.write_text(yaml.safe_dump({"categories": {"washer": {**cfg, "provenance": {"trial_id": "x"}}}}))
    assert main(["fit", "--config", str(path), "--data", str(synthetic_root), "--category", "brick",
                 "--out", str(tmp_path / "m")]) == 2
    assert "no configuration for category 'brick'" in capsys.readouterr().err
