"""The `anoseg search` commands: bad input stops before anything launches; status reads a run folder."""
from __future__ import annotations

import pandas as pd
import pytest
import yaml

from anoseg.cli import main
from search.run_dir import RunDir
from tests.search_helpers import TINY_SPACE, write_space


@pytest.mark.parametrize(
    "change, message",
    [
        ({"sampler": {"name": "bayes"}}, "sampler"),
        ({"objective": [{"metric": "accuracy", "mode": "max"}]}, "accuracy"),
        ({"budget": {"trials": 0, "max_concurrent": 1}}, "budget.trials"),
        ({"space": {"backbones": {"resnet18": {"weights": "none", "layers": [["layer7"]]}}, "heads": {"padim": None}}}, "layer7"),
        ({"space": {"backbones": {"resnet18": {"weights": "none", "layers": [["layer1"]]}},
                    "heads": {"patchcore": {"coreset_ratio": {"type": "float", "low": 0.1, "high": 2.0}}}}}, "coreset_ratio"),
        ({"objective": [{"metric": "aupro", "mode": "max"}, {"metric": "ms_per_image", "mode": "min"}]}, "asha"),
    ],
)
def test_bad_space_fails_before_anything_launches(tmp_path, synthetic_root, capsys, change, message):
    space = write_space(tmp_path, **change)
    results = tmp_path / "results"
    code = main(["search", "run", str(space), "--data", str(synthetic_root), "--results", str(results)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("anoseg: error:") and message in err and "tiny.yaml" in err
    assert not results.exists(), "nothing may be created for an invalid space"


def test_missing_dataset_fails_before_anything_launches(tmp_path, capsys):
    space = write_space(tmp_path)
    assert main(["search", "run", str(space), "--data", str(tmp_path / "nope"), "--results", str(tmp_path / "r")]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_status_of_a_run_folder(tmp_path, capsys):
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    (run.path / "space.yaml").write_text(yaml.safe_dump({**TINY_SPACE, "dataset": {**TINY_SPACE["dataset"]}}))
    run.write_meta({"name": "run", "data_root": "/data", "categories": ["a", "b"], "status": "running",
                    "objectives": [{"metric": "aupro", "mode": "max"}], "storage": "sqlite:///x.db", "study_name": "s"})
    params = {"backbone": "resnet18", "resnet18.layers": "layer1", "head": "padim", "padim.n_features": 8}
    for i, (status, aupro) in enumerate([("completed", 0.8), ("completed", 0.9), ("stopped", 0.95), ("failed", None)]):
        run.update_record(f"t{i}", status=status, params=params, step=2 if status == "completed" else 1,
                          metrics={"aupro": aupro, "fit_seconds": 1.0, "ms_per_image": 2.0},
                          error="DataError: cannot read image x.png" if status == "failed" else None)
    assert main(["search", "status", str(run.path)]) == 0
    out = capsys.readouterr().out
    assert "4 trials of 6" in out and "2 completed, 1 stopped" in out and "1 failed" in out
    assert "best so far: trial t1" in out  # the stopped trial's higher partial value does not count
    assert "on the test set" in out  # a run from before the selection protocols ranked on the test set
    assert "cannot read image" in out


def test_status_of_a_non_run_folder_is_clear(tmp_path, capsys):
    assert main(["search", "status", str(tmp_path)]) == 2
    assert "not a search run folder" in capsys.readouterr().err


def test_a_categorical_setting_of_mixed_types_collates_into_parquet(tmp_path):
    from search.run_dir import collate

    records = [{"trial_id": f"t{i}", "status": "completed", "params": {"gaussian_ad.shrinkage": value},
                "metrics": {"aupro": 0.5}} for i, value in enumerate(["ledoit_wolf", 0.1, 0.5])]
    df = collate(records, {"categories": []})
    df.to_parquet(tmp_path / "t.parquet")  # pyarrow refuses a column of str and float
    assert pd.read_parquet(tmp_path / "t.parquet")["param.gaussian_ad.shrinkage"].tolist() == ["ledoit_wolf", "0.1", "0.5"]
