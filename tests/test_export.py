"""`anoseg export` (search/export.py): best trial, per category, Pareto set, errors; and the end-to-end
flow export -> fit -> predict -> export-onnx on the command line."""
from __future__ import annotations

import csv
import json
import sys
import types

import pytest
import yaml

from anoseg.cli import main
from anoseg.config import TrialConfig
from anoseg.exported import load_exported, read_exported
from search.export import export_run, pareto_records
from search.run_dir import RunDir
from tests.search_helpers import TINY_SPACE

RANDOM_INIT = {
    "backbone": {"name": "resnet18", "weights": "none"},
    "layers": ["layer1", "layer2"],
    "image_size": 64,
    "head": {"name": "patchcore", "coreset_ratio": 0.05},
    "batch_size": 16,
    "seed": 0,
    "device": "cpu",
}
PADIM = {**RANDOM_INIT, "layers": ["layer1"], "head": {"name": "padim", "n_features": 16}}
PARAMS = {"backbone": "resnet18", "resnet18.layers": "layer1+layer2", "head": "patchcore",
          "patchcore.coreset_ratio": 0.05}


def make_run(tmp_path, trials, objectives=({"metric": "aupro", "mode": "max"},), categories=("brick", "washer"),
             name="run"):
    """A run folder written by hand: trials = [(trial_id, status, mean metrics, per-category metrics, config)]."""
    run = RunDir(tmp_path / name)
    run.path.mkdir(parents=True)
    (run.path / "space.yaml").write_text(yaml.safe_dump(TINY_SPACE))
    run.write_meta({"name": name, "data_root": "/data", "categories": list(categories), "status": "finished",
                    "objectives": [dict(o) for o in objectives], "storage": "sqlite:///x.db", "study_name": f"{name}-1"})
    for i, (trial_id, status, metrics, per_category, config) in enumerate(trials):
        changes = {"status": status, "params": PARAMS, "metrics": metrics, "per_category": per_category,
                   "step": len(per_category), "started": 1000.0 + i}
        if config is not None:
            changes["config"] = config
        run.update_record(trial_id, **changes)
    return run


def cats(**values):
    """per_category dict: cats(brick=0.9, washer=0.8) -> {brick: {aupro: 0.9, ...}, ...}"""
    return {c: {"aupro": v, "pixel_auroc": v, "ms_per_image": 10.0} for c, v in values.items()}


def test_export_picks_the_best_completed_trial(tmp_path, capsys):
    run = make_run(tmp_path, [
        ("a", "completed", {"aupro": 0.80, "pixel_auroc": 0.95, "ms_per_image": 5.0}, cats(brick=0.8, washer=0.8), RANDOM_INIT),
        ("b", "completed", {"aupro": 0.90, "pixel_auroc": 0.90, "ms_per_image": 9.0}, cats(brick=0.9, washer=0.9), PADIM),
        ("c", "stopped", {"aupro": 0.99, "ms_per_image": 1.0}, cats(brick=0.99), RANDOM_INIT),  # partial: not exported
        ("d", "failed", {}, {}, None),
    ])
    out = tmp_path / "best.yaml"
    assert main(["export", str(run.path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "trial b" in printed and "aupro (max)" in printed
    text = out.read_text()
    assert text.startswith("# anoseg export")
    doc = yaml.safe_load(text)
    assert doc["head"] == {"name": "padim", "n_features": 16}
    prov = doc["provenance"]
    assert prov["trial_id"] == "b" and prov["run"] == "run" and prov["study_name"] == "run-1"
    assert prov["run_path"] == str(run.path.resolve()) and prov["anoseg_version"] and prov["exported"]
    assert prov["objective"][0]["value"] == 0.9
    assert doc["metrics"]["mean"]["aupro"] == 0.9 and doc["metrics"]["per_category"]["washer"]["aupro"] == 0.9
    # TrialConfig fields at the top level: the loader skips provenance/metrics
    cfg = load_exported(out)
    assert cfg == TrialConfig.from_dict(PADIM)

    # another objective and mode
    result = export_run(run.path, tmp_path / "fast.yaml", objective="ms_per_image")
    assert result.trials == ["a"] and result.objectives == [{"metric": "ms_per_image", "mode": "min"}]
    assert export_run(run.path, tmp_path / "x.yaml", objective="pixel_auroc").trials == ["a"]
    assert export_run(run.path, tmp_path / "x.yaml", objective="pixel_auroc", mode="min").trials == ["b"]
    assert export_run(run.path, tmp_path / "x.yaml", mode="min").trials == ["a"]  # the run's objective, other mode


def test_export_rebuilds_a_config_missing_from_the_record(tmp_path):
    run = make_run(tmp_path, [("a", "completed", {"aupro": 0.5}, cats(brick=0.5, washer=0.5), None)])
    export_run(run.path, tmp_path / "best.yaml")
    cfg = load_exported(tmp_path / "best.yaml")
    assert cfg.backbone.name == "resnet18" and cfg.layers == ("layer1", "layer2")
    assert cfg.head_name == "patchcore" and cfg.image_size == TINY_SPACE["dataset"]["image_size"]


def test_export_per_category(tmp_path, capsys):
    run = make_run(tmp_path, [
        ("a", "completed", {"aupro": 0.85}, cats(brick=0.95, washer=0.75), RANDOM_INIT),
        ("b", "completed", {"aupro": 0.86}, cats(brick=0.80, washer=0.92), PADIM),
    ])
    out = tmp_path / "per_cat.yaml"
    assert main(["export", str(run.path), "--out", str(out), "--per-category"]) == 0
    assert "brick: a" in capsys.readouterr().out
    doc = yaml.safe_load(out.read_text())
    assert set(doc["categories"]) == {"brick", "washer"}
    assert doc["categories"]["brick"]["provenance"]["trial_id"] == "a"
    assert doc["categories"]["washer"]["provenance"]["trial_id"] == "b"
    assert doc["categories"]["washer"]["metrics"]["category"]["aupro"] == 0.92
    assert load_exported(out, category="brick") == TrialConfig.from_dict(RANDOM_INIT)
    assert load_exported(out, category="washer") == TrialConfig.from_dict(PADIM)
    with pytest.raises(Exception, match="--category"):
        load_exported(out)
    with pytest.raises(Exception, match="grass"):
        load_exported(out, category="grass")


def test_export_pareto_set_with_two_objectives(tmp_path, capsys):
    objectives = ({"metric": "aupro", "mode": "max"}, {"metric": "ms_per_image", "mode": "min"})
    run = make_run(tmp_path, [
        ("a", "completed", {"aupro": 0.90, "ms_per_image": 10.0}, cats(brick=0.9, washer=0.9), RANDOM_INIT),
        ("b", "completed", {"aupro": 0.80, "ms_per_image": 5.0}, cats(brick=0.8, washer=0.8), PADIM),
        ("c", "completed", {"aupro": 0.70, "ms_per_image": 20.0}, cats(brick=0.7, washer=0.7), PADIM),  # dominated
        ("d", "completed", {"aupro": 0.90, "ms_per_image": 12.0}, cats(brick=0.9, washer=0.9), PADIM),  # by a
        ("e", "completed", {"aupro": 0.95, "ms_per_image": 30.0}, cats(brick=0.95, washer=0.95), PADIM),
    ], objectives=objectives)
    out = tmp_path / "pareto.yaml"
    assert main(["export", str(run.path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Pareto set of 3" in printed
    doc = yaml.safe_load(out.read_text())
    assert [item["provenance"]["trial_id"] for item in doc["pareto"]] == ["e", "a", "b"]  # best aupro first
    exported = read_exported(out)
    assert exported.kind == "pareto" and list(exported.entries) == ["e", "a", "b"]
    assert load_exported(out, trial="a") == TrialConfig.from_dict(RANDOM_INIT)
    with pytest.raises(Exception, match="--trial"):
        load_exported(out)
    # one objective picked from a multi-objective run: a single best
    assert export_run(run.path, tmp_path / "one.yaml", objective="ms_per_image").kind == "single"
    assert [r["trial_id"] for r in pareto_records(run.records(), objectives)] == ["e", "a", "b"]


@pytest.mark.parametrize("setup, args, message", [
    ("no_completed", [], "no completed trial"),
    ("normal", ["--objective", "image_f1_max"], "never measured"),
    ("normal", ["--objective", "accuracy"], "is not a metric; measured in"),
    ("normal", ["--objective", "peak_rss_mb"], "pixel_auroc, aupro, ms_per_image"),
    ("not_a_run", [], "not a search run folder"),
])
def test_export_errors_are_one_clear_line(tmp_path, capsys, setup, args, message):
    if setup == "not_a_run":
        path = tmp_path
    elif setup == "no_completed":
        path = make_run(tmp_path, [("a", "stopped", {"aupro": 0.5}, cats(brick=0.5), RANDOM_INIT),
                                   ("b", "failed", {}, {}, None)]).path
    else:
        path = make_run(tmp_path, [("a", "completed", {"aupro": 0.5, "pixel_auroc": 0.9, "ms_per_image": 3.0},
                                    cats(brick=0.5, washer=0.5), RANDOM_INIT)]).path
    out = tmp_path / "out.yaml"
    assert main(["export", str(path), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("anoseg: error:") and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_dashboard_command_calls_write_dashboard(tmp_path, monkeypatch, capsys):
    calls = []

    def write_dashboard(run_path, out=None, examples=4):
        calls.append((run_path, out, examples))
        return tmp_path / "d.html"

    monkeypatch.setitem(sys.modules, "search.dashboard", types.SimpleNamespace(write_dashboard=write_dashboard))
    assert main(["dashboard", "results/x", "--out", str(tmp_path / "d.html"), "--examples", "2"]) == 0
    assert calls == [("results/x", tmp_path / "d.html", 2)] and "d.html" in capsys.readouterr().out
    assert main(["dashboard", "results/x"]) == 0 and calls[-1] == ("results/x", None, 4)


def test_end_to_end_export_fit_predict_onnx(tmp_path, synthetic_root, capsys):
    """export (hand-made run, random-init config) -> fit -> predict -> export-onnx, all on the command line."""
    run = make_run(tmp_path, [
        ("a", "completed", {"aupro": 0.7}, cats(brick=0.7, washer=0.7), PADIM),
        ("b", "completed", {"aupro": 0.8}, cats(brick=0.8, washer=0.8), RANDOM_INIT),
    ])
    best = tmp_path / "best.yaml"
    assert main(["export", str(run.path), "--out", str(best)]) == 0

    # the exported file is a valid `evaluate` config as it is
    assert main(["evaluate", "--config", str(best), "--data", str(synthetic_root), "--categories", "brick"]) == 0
    assert "AUPRO@0.3" in capsys.readouterr().out

    model_dir = tmp_path / "models" / "brick"
    assert main(["fit", "--config", str(best), "--data", str(synthetic_root), "--category", "brick",
                 "--out", str(model_dir)]) == 0
    out = capsys.readouterr().out
    assert "thresholds" in out and "saved" in out
    info = json.loads((model_dir / "model.json").read_text())
    assert info["config"]["head"]["name"] == "patchcore" and info["backbone"]["pretrained"] is False

    test_dir = synthetic_root / "brick" / "test"
    images = [test_dir / "good" / "000.png", *sorted((test_dir).glob("[!g]*/000.png"))]
    maps = tmp_path / "maps"
    assert main(["predict", "--model", str(model_dir), *map(str, images), "--out", str(maps),
                 "--masks", str(synthetic_root / "brick" / "ground_truth")]) == 0
    printed = capsys.readouterr().out
    assert "aupro" in printed and (maps / "metrics.json").is_file()
    rows = list(csv.DictReader((maps / "scores.csv").open()))
    assert len(rows) == len(images) and all((maps / r["overlay"]).is_file() for r in rows)
    assert rows[0]["label"] == "good" and all(r["label"] == "defective" for r in rows[1:])

    onnx_path = tmp_path / "brick.onnx"
    pytest.importorskip("onnxruntime")
    assert main(["export-onnx", "--model", str(model_dir), "--out", str(onnx_path)]) == 0
    printed = capsys.readouterr().out
    assert onnx_path.is_file() and "check on" in printed and ": ok" in printed


def test_evaluate_a_per_category_export_uses_each_categorys_configuration(tmp_path, synthetic_root, capsys):
    run = make_run(tmp_path, [
        ("a", "completed", {"aupro": 0.85}, cats(brick=0.95, washer=0.75), RANDOM_INIT),
        ("b", "completed", {"aupro": 0.86}, cats(brick=0.80, washer=0.92), PADIM),
    ])
    per_cat = tmp_path / "per_cat.yaml"
    export_run(run.path, per_cat, per_category=True)
    result_json = tmp_path / "result.json"
    assert main(["evaluate", "--config", str(per_cat), "--data", str(synthetic_root), "--json", str(result_json)]) == 0
    out = capsys.readouterr().out
    assert "brick: backbone resnet18" in out and "washer: backbone resnet18" in out
    result = json.loads(result_json.read_text())
    assert result["config"]["brick"]["head"]["name"] == "patchcore"
    assert result["config"]["washer"]["head"]["name"] == "padim"
    assert set(result["categories"]) == {"brick", "washer"} and "aupro" in result["mean"]
    # a category the file lacks is a clear error
    assert main(["evaluate", "--config", str(per_cat), "--data", str(synthetic_root), "--categories", "grass"]) == 2
    assert "no configuration for grass" in capsys.readouterr().err
