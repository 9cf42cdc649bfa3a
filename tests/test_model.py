"""anoseg.model: fit -> save -> load round trip, the folder format, thresholds chosen on the validation part
only (never on the test part they are reported on), bad input; the `predict` command."""
from __future__ import annotations

import csv
import json
import shutil
import struct

import numpy as np
import pytest
import torch
from PIL import Image

import anoseg.data.images
import anoseg.model
from anoseg.cli import main
from anoseg.data import list_test, load_test
from anoseg.errors import DataError
from anoseg.holdout import Holdout, Protocol
from anoseg.metrics import evaluate
from anoseg.model import FittedModel, fit_model, load_model, part_metrics, part_thresholds
from anoseg.model_folder import MODEL_FILE, WEIGHTS_FILE, ModelError
from anoseg.thresholds import choose_thresholds, f1_max_threshold, good_threshold

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
    assert t["method"] == "f1_max on the validation part" and np.isfinite(t["image"]) and np.isfinite(t["pixel"])
    paths, defect_types = list_test(synthetic_root, "brick")
    parts = Holdout().split(paths, defect_types, "brick")
    n_bad = sum(defect_types[i] != "good" for i in parts["validation"])
    assert t["chosen_on"]["part"] == "validation"
    assert (t["chosen_on"]["n_good"], t["chosen_on"]["n_defective"]) == (len(parts["validation"]) - n_bad, n_bad)
    split = info["split"]
    assert (split["protocol"], split["validation_share"], split["seed"]) == ("holdout", 0.5, 0)
    names = [f"{p.parent.name}/{p.name}" for p in paths]
    assert split["validation"] == [names[i] for i in parts["validation"]]
    assert split["test"] == [names[i] for i in parts["test"]]
    assert info["metrics_on"] == f"test part ({len(parts['test'])} images)"
    assert len(info["data"]["fingerprint"]) == 32 and info["data"]["n_train"] > 0
    # safetensors: an 8-byte header length, then a JSON header; tensors are prefixed backbone./head.
    raw = (folder / WEIGHTS_FILE).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    keys = [k for k in header if k != "__metadata__"]
    assert any(k.startswith("backbone.") for k in keys) and any(k.startswith("head.") for k in keys)
    assert all(k.startswith(("backbone.", "head.")) for k in keys)
    assert b"\x80\x04" not in raw[:8 + n]  # no pickle protocol marker in the header
    # the metrics are the final assessment's figures of the test part (anoseg search finalize; cost aside,
    # seg_f1 aside: there it is read at mean + 3 std of the validation part's good pixels)
    from anoseg.assess import assess_config

    final = assess_config({**BASE, "head": HEADS[head]}, synthetic_root, ["brick"], Protocol(), [], 0, 0)
    test_part = final["brick"].parts["test"].metrics
    for key in ("image_auroc", "pixel_auroc", "aupro", "pixel_f1_max", "image_f1_max", "aupro_0.05", "miss_rate_0.05"):
        assert info["metrics"][key] == pytest.approx(test_part[key], abs=2e-3), key


def _parts(root, category="brick", holdout=Holdout()):
    paths, defect_types = list_test(root, category)
    return paths, defect_types, holdout.split(paths, defect_types, category)


def test_thresholds_are_f1_max_on_the_validation_part_and_metrics_of_the_test_part(fitted, synthetic_root):
    model, _ = fitted["patchcore"]
    test = load_test(synthetic_root, "brick", 64)
    _, _, parts = _parts(synthetic_root)
    maps, scores = model.predict(test.images)
    val, rest = (torch.as_tensor(parts[p]) for p in ("validation", "test"))
    labels = np.asarray(test.labels)
    # chosen on the validation part: its F1-max thresholds, not those of all test images
    f1, image_t = f1_max_threshold(labels[val], scores[val].numpy())
    _, pixel_t = f1_max_threshold(test.masks[val].numpy(), maps[val].numpy())
    t = model.thresholds
    assert (t["image"], t["pixel"]) == (image_t, pixel_t) and t["chosen_on"]["image_f1"] == f1
    assert (image_t, pixel_t) != (f1_max_threshold(labels, scores.numpy())[1],
                                  f1_max_threshold(test.masks.numpy(), maps.numpy())[1])
    # reported on the test part: evaluate() with seg_f1 at mean + 3 std of the validation part's good pixels
    # (as a search measures it), and F1 / precision / recall at the chosen thresholds
    m = model.metrics
    seg_t, _ = good_threshold(maps[val][torch.as_tensor(labels[val] == 0)].numpy())
    expected = evaluate(maps[rest], scores[rest], test.masks[rest], labels[rest], pixel_threshold=seg_t)
    for key, value in expected.items():
        assert m[key] == pytest.approx(value, abs=1e-9), key
    failed = scores[rest].numpy().astype(np.float64) >= image_t
    truth = labels[rest].astype(bool)
    tp = int((failed & truth).sum())
    assert m["image_precision"] == pytest.approx(tp / failed.sum())
    assert m["image_recall"] == pytest.approx(tp / truth.sum())
    assert m["image_f1"] == pytest.approx(2 * tp / (failed.sum() + truth.sum()))
    predicted = maps[rest].numpy() >= pixel_t
    anomalous = test.masks[rest].numpy()
    assert m["pixel_f1"] == pytest.approx(2 * (predicted & anomalous).sum() / (predicted.sum() + anomalous.sum()))
    assert t["seg"] == pytest.approx(seg_t) and 0 <= m["pixel_precision"] <= 1
    assert m["image_false_alarm_rate"] == pytest.approx(failed[~truth].mean())
    verdicts = model.verdicts(scores)
    assert verdicts == ["fail" if float(s) >= image_t else "pass" for s in scores]


PADIM = {**BASE, "head": HEADS["padim"]}


def _copy_category(root, tmp_path, category="brick"):
    data = tmp_path / "data"
    shutil.copytree(root / category, data / category)
    return data


def _noise(path, seed):
    with Image.open(path) as img:
        size = img.size
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def test_thresholds_read_no_test_part_image(synthetic_root, tmp_path):
    data = _copy_category(synthetic_root, tmp_path)
    before = fit_model(PADIM, data, "brick")
    paths, defect_types, parts = _parts(data)
    for i in parts["test"]:  # every image the metrics are reported on becomes noise
        _noise(paths[i], int(i))
    after = fit_model(PADIM, data, "brick")
    assert after.thresholds == before.thresholds  # chosen without them
    assert after.metrics["image_auroc"] != before.metrics["image_auroc"]  # ... though the metrics read them
    assert after.split == before.split
    # one defective image of the validation part changes: the thresholds change
    changed = next(i for i in parts["validation"] if defect_types[i] != "good")
    _noise(paths[changed], 1)
    again = fit_model(PADIM, data, "brick")
    assert (again.thresholds["image"], again.thresholds["pixel"]) != (before.thresholds["image"],
                                                                      before.thresholds["pixel"])


def test_threshold_selection_reads_only_validation_images(synthetic_root, monkeypatch):
    read = []
    original_read = anoseg.data.images.read_image
    original_choose = anoseg.model.part_thresholds
    seen_when_chosen = []

    def recording_read(path, size):
        read.append(path)
        return original_read(path, size)

    def recording_choose(*args, **kwargs):
        seen_when_chosen.extend(read)
        return original_choose(*args, **kwargs)

    monkeypatch.setattr(anoseg.data.images, "read_image", recording_read)
    monkeypatch.setattr(anoseg.model, "part_thresholds", recording_choose)
    model = fit_model(PADIM, synthetic_root, "brick")
    paths, _, parts = _parts(synthetic_root)
    test_dir = synthetic_root / "brick" / "test"
    chosen_from = {p for p in seen_when_chosen if test_dir in p.parents}
    assert chosen_from == {paths[i] for i in parts["validation"]}
    assert {p for p in read if test_dir in p.parents} == set(paths)  # the test part is read afterwards
    assert model.thresholds["chosen_on"]["part"] == "validation"


def test_good_only_thresholds_when_the_part_has_no_defective_image():
    rng = np.random.default_rng(0)
    scores, maps = rng.random(6), rng.random((6, 8, 8)).astype(np.float32)
    masks = np.zeros((6, 8, 8), bool)
    t = part_thresholds(np.zeros(6), scores, masks, maps, "validation", "the validation part")
    assert t["image"] == good_threshold(scores)[0] and t["pixel"] == good_threshold(maps)[0]
    assert t["method"].startswith("mean + 3 std of the good images of the validation part (it holds no defective")
    assert t["chosen_on"] == {"part": "validation", "n_good": 6, "n_defective": 0}
    # with defective images: F1-max there; good_only: from the good ones alone
    labels = np.array([0, 0, 0, 1, 1, 1])
    masks[3:, 2:5, 2:5] = True
    f1 = part_thresholds(labels, scores, masks, maps, "validation", "the validation part")
    expected = choose_thresholds(labels, scores, masks, maps, "the validation part")
    assert (f1["image"], f1["pixel"], f1["method"]) == (expected["image"], expected["pixel"], expected["method"])
    assert f1["chosen_on"]["image_f1"] == expected["image_f1"] and f1["chosen_on"]["n_defective"] == 3
    good = part_thresholds(labels, scores, masks, maps, "all", "all test images", good_only=True)
    assert good["image"] == good_threshold(scores[:3])[0] and good["pixel"] == good_threshold(maps[:3])[0]


def test_part_metrics_report_what_one_class_allows():
    scores, maps = np.array([0.1, 0.4, 0.6, 0.9]), np.random.default_rng(1).random((4, 8, 8)).astype(np.float32)
    masks = np.zeros((4, 8, 8), bool)
    metrics, notes = part_metrics(np.zeros(4), scores, masks, maps, 0.5, 0.5)
    assert metrics == {"image_precision": 0.0, "pixel_precision": 0.0, "image_false_alarm_rate": 0.5}
    assert "image_auroc" not in metrics and any("no defective image" in n for n in notes)
    masks[:, :4] = True
    metrics, notes = part_metrics(np.ones(4), scores, masks, maps, 0.5, 0.5)
    assert {"pixel_auroc", "aupro", "pixel_f1_max", "aupro_0.05", "seg_f1", "image_recall", "pixel_f1"} <= set(metrics)
    assert "image_auroc" not in metrics and "image_false_alarm_rate" not in metrics
    assert any("all defective" in n for n in notes)
    metrics, notes = part_metrics(np.ones(4), scores, masks, maps, 2.0, 0.5)  # nothing fails
    assert metrics["image_recall"] == 0 and "image_precision" not in metrics
    assert any("image_precision" in n for n in notes)


@pytest.mark.parametrize("holdout, why", [(Holdout(), "too small to split"), (None, "no holdout split was asked")])
def test_a_category_without_a_split_uses_good_test_images(tiny_mvtec, holdout, why):
    crack = tiny_mvtec / "widget" / "test" / "crack"
    (crack / "001.png").unlink()  # one defective image: the test part would have none
    (tiny_mvtec / "widget" / "ground_truth" / "crack" / "001_mask.png").unlink()
    said = []
    model = fit_model(PADIM, tiny_mvtec, "widget", progress=said.append, holdout=holdout)
    t, info = model.thresholds, model.info
    assert why in t["method"] and t["method"].startswith("mean + 3 std of the good images of all test images")
    assert t["chosen_on"] == {"part": "all test images", "n_good": 2, "n_defective": 1}
    assert why in info["metrics_on"] and info["metrics_on"].startswith("all test images (no holdout: ")
    assert info["split"]["protocol"] == "none" and why in info["split"]["reason"]
    test = load_test(tiny_mvtec, "widget", 64)
    maps, scores = model.predict(test.images)
    good = test.labels == 0
    assert t["image"] == pytest.approx(good_threshold(scores[torch.as_tensor(good)])[0], rel=1e-6)
    assert 0 <= model.metrics["image_auroc"] <= 1
    assert any("too small to split" in s and s.startswith("warning:") for s in said) == (holdout is not None)


def test_model_folders_written_before_the_split_still_load(fitted, tmp_path, test_images):
    model, folder = fitted["padim"]
    target = _copy(folder, tmp_path)
    info = json.loads((target / MODEL_FILE).read_text())
    for key in ("split", "metrics_on", "metrics_notes"):
        info.pop(key)
    info["thresholds"] = {"image": info["thresholds"]["image"], "pixel": info["thresholds"]["pixel"],
                          "method": "f1_max on the test set", "image_f1": 1.0, "pixel_f1": 0.5}
    info["map_range"].pop("of")
    (target / MODEL_FILE).write_text(json.dumps(info))
    old = load_model(target, device="cpu")
    assert old.split == {} and old.thresholds["method"] == "f1_max on the test set"
    assert torch.equal(old.predict(test_images)[1], model.predict(test_images)[1])
    assert old.verdicts(model.predict(test_images)[1]) == model.verdicts(model.predict(test_images)[1])


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
    paths, _, parts = _parts(synthetic_root)
    test_part = [str(paths[i]) for i in parts["test"]]
    out = tmp_path / "maps"
    assert main(["predict", "--model", str(folder), *test_part, "--out", str(out),
                 "--masks", str(synthetic_root / "brick" / "ground_truth"), "--save-maps"]) == 0
    printed = capsys.readouterr().out
    assert "pass" in printed and "aupro" in printed
    rows = list(csv.DictReader((out / "scores.csv").open()))
    n = len(test_part)
    assert len(rows) == n and {r["verdict"] for r in rows} <= {"pass", "fail"}
    names = [r["overlay"] for r in rows]
    assert len(set(names)) == n  # good/000.png and hole/000.png do not collide
    for r in rows:
        picture = Image.open(out / r["overlay"])
        assert picture.size == (64, 64) and picture.mode == "RGB"
        assert np.load(out / r["overlay"].replace(".png", ".npy")).shape == (64, 64)
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert {"image_auroc", "pixel_auroc", "aupro", "pixel_f1_max", "image_f1_max"} <= set(metrics)
    # the metrics equal the fit's own evaluation on the same images (the test part)
    info = json.loads((folder / MODEL_FILE).read_text())
    for key in ("aupro", "image_auroc", "seg_f1"):
        assert metrics[key] == pytest.approx(info["metrics"][key], abs=1e-6), key


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
