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
