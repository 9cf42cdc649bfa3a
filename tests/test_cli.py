from __future__ import annotations

import json
import subprocess
import sys

import yaml

from anoseg.cli import main

RANDOM_INIT = {
    "backbone": {"name": "resnet18", "weights": "none"},
    "layers": ["layer1", "layer2"],
    "image_size": 64,
    "head": {"name": "patchcore", "coreset_ratio": 0.05},
}


def test_backbones_lists_registry_and_layers(capsys):
    assert main(["backbones"]) == 0
    out = capsys.readouterr().out
    assert "tf_efficientnet_lite0" in out and "hrnet_w18" in out and "fasterrcnn_resnet50_fpn_v2" in out
    assert main(["backbones", "--layers", "resnet18"]) == 0
    out = capsys.readouterr().out
    assert "layer2" in out and "128" in out


def test_unknown_backbone_is_one_clear_line(capsys):
    assert main(["backbones", "--layers", "resnet999"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("anoseg: error:") and "resnet999" in err and "Traceback" not in err


def test_heads_lists_settings(capsys):
    assert main(["heads"]) == 0
    assert "coreset_ratio=0.1" in capsys.readouterr().out


def test_evaluate_prints_table_and_writes_json(synthetic_root, tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(RANDOM_INIT))
    out_json = tmp_path / "out" / "result.json"
    code = main(["evaluate", "--config", str(cfg), "--data", str(synthetic_root), "--categories", "brick,washer", "--json", str(out_json)])
    assert code == 0
    captured = capsys.readouterr()
    assert "[1/2] brick" in captured.err and "random-init" in captured.err
    assert "AUPRO@0.3" in captured.out and "mean" in captured.out
    result = json.loads(out_json.read_text())
    assert set(result["categories"]) == {"brick", "washer"}
    keys = {"image_auroc", "pixel_auroc", "aupro", "pixel_f1_max", "fit_seconds", "ms_per_image"}
    assert keys <= set(result["categories"]["brick"]) and keys <= set(result["mean"])
    assert result["config"]["head"]["name"] == "patchcore" and result["pretrained"] is False


def test_evaluate_bad_config_exits_2(synthetic_root, tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({**RANDOM_INIT, "layers": ["layer9"]}))
    assert main(["evaluate", "--config", str(cfg), "--data", str(synthetic_root)]) == 2
    err = capsys.readouterr().err
    assert "cfg.yaml" in err and "layer9" in err and "layer1" in err


def test_data_synth_and_console_script(tmp_path):
    out = tmp_path / "data"
    proc = subprocess.run(
        [sys.executable, "-m", "anoseg.cli", "data", "synth", str(out), "--size", "64", "--categories", "grass",
         "--train", "2", "--test-good", "1", "--test-per-defect", "1"],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert (out / "grass" / "train" / "good").is_dir() and "wrote 1 categories" in proc.stdout
    again = subprocess.run([sys.executable, "-m", "anoseg.cli", "data", "synth", str(out), "--categories", "grass"],
                           capture_output=True, text=True, check=False)
    assert again.returncode == 2 and "overwrite" in again.stderr


def test_tables_show_every_per_category_metric():
    from anoseg.cli import format_table, table_columns
    from anoseg.metrics import CATEGORY_METRICS, METRICS

    assert [key for key, _ in table_columns()] == list(CATEGORY_METRICS)
    row = {m: 0.5 for m in CATEGORY_METRICS}
    header = format_table({"brick": row}, row).splitlines()[0]
    for m in METRICS:
        if m.name in CATEGORY_METRICS:
            assert m.label in header
    assert "AUPRO@0.05" in header and "segF1" in header and "miss@5%FA" in header


def _export(tmp_path, selection=None, **entry):
    path = tmp_path / "best.yaml"
    document = {**RANDOM_INIT, "head": {"name": "padim", "n_features": 32}, "device": "cpu", **entry}
    if selection is not None:
        document["selection"] = selection
    path.write_text(yaml.safe_dump(document))
    return path


def _holdout_used(monkeypatch, tmp_path, synthetic_root, config, *options):
    """The Holdout `anoseg fit` hands to fit_model (which is stopped there)."""
    import anoseg.model
    from anoseg.errors import DataError

    seen = []

    def stop(*args, holdout=None, **kwargs):
        seen.append(holdout)
        raise DataError("stopped by the test")

    monkeypatch.setattr(anoseg.model, "fit_model", stop)
    assert main(["fit", "--config", str(config), "--data", str(synthetic_root), "--category", "brick",
                 "--out", str(tmp_path / "m"), *options]) == 2
    return seen[0]


def test_fit_takes_the_split_from_the_exported_selection_and_the_options(monkeypatch, tmp_path, synthetic_root,
                                                                         capsys):
    from anoseg.holdout import Holdout

    holdout = {"protocol": "holdout", "validation_share": 0.3, "seed": 7, "selected_on": "the validation part"}
    exported = _export(tmp_path, holdout)
    assert _holdout_used(monkeypatch, tmp_path, synthetic_root, exported) == Holdout(0.3, 7)
    assert "validation share 0.3, seed 7 (from the exported selection)" in capsys.readouterr().err
    assert _holdout_used(monkeypatch, tmp_path, synthetic_root, exported,
                         "--validation-share", "0.6") == Holdout(0.6, 7)
    assert _holdout_used(monkeypatch, tmp_path, synthetic_root, exported, "--split-seed", "2") == Holdout(0.3, 2)
    # a plain configuration file, or a search that chose on the test set: the default split
    assert _holdout_used(monkeypatch, tmp_path, synthetic_root, _export(tmp_path)) == Holdout()
    capsys.readouterr()
    on_test = _export(tmp_path, {"protocol": "test"})
    assert _holdout_used(monkeypatch, tmp_path, synthetic_root, on_test, "--split-seed", "4") == Holdout(0.5, 4)
    assert "selection.protocol: test" in capsys.readouterr().err
    # per-category exports carry a selection per category
    per_category = tmp_path / "per_cat.yaml"
    per_category.write_text(yaml.safe_dump({"categories": {"brick": {**yaml.safe_load(exported.read_text()),
                                                                     "selection": {**holdout, "seed": 9}}}}))
    assert _holdout_used(monkeypatch, tmp_path, synthetic_root, per_category) == Holdout(0.3, 9)


def test_fit_rejects_a_bad_validation_share(tmp_path, synthetic_root, capsys):
    assert main(["fit", "--config", str(_export(tmp_path)), "--data", str(synthetic_root), "--category", "brick",
                 "--out", str(tmp_path / "m"), "--validation-share", "1.5"]) == 2
    err = capsys.readouterr().err
    assert "validation share must lie strictly between 0 and 1" in err and "1.5" in err
    assert not (tmp_path / "m").exists()


def test_fit_prints_the_threshold_method_and_the_test_part_figures(tmp_path, synthetic_root, capsys):
    selection = {"protocol": "holdout", "validation_share": 0.5, "seed": 3}
    out = tmp_path / "m"
    assert main(["fit", "--config", str(_export(tmp_path, selection)), "--data", str(synthetic_root),
                 "--category", "brick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    info = json.loads((out / "model.json").read_text())
    assert (info["split"]["validation_share"], info["split"]["seed"]) == (0.5, 3)
    assert "chosen by f1_max on the validation part" in printed
    m = info["metrics"]
    assert f"at these thresholds on the {info['metrics_on']}: image F1 {m['image_f1']:.3f}, precision " \
           f"{m['image_precision']:.3f}, recall {m['image_recall']:.3f}; pixel F1 {m['pixel_f1']:.3f}" in printed
    assert "metrics of the test part (" in printed and "segF1" in printed
