"""The holdout protocol end to end: trials ranked on the validation part, the chosen ones evaluated once on
the test part with intervals and ties; protocol test labelled; a category too small to split refused."""
from __future__ import annotations

import shutil

import pandas as pd
import pytest
import yaml

from anoseg.errors import DataError
from anoseg.holdout import TEST, VALIDATION, Protocol
from anoseg.trial import run_trial
from search.finalize import _choose
from search.run_dir import RunDir
from search.runner import start_search, summary
from tests.search_helpers import write_space

pytestmark = pytest.mark.slow

SPACE = {"sampler": {"name": "random", "seed": 0}, "scheduler": {"name": "none"},
         "budget": {"trials": 4, "max_concurrent": 2},
         "dataset": {"root": "unused", "categories": ["brick", "board"], "image_size": 64},
         "selection": {"protocol": "holdout", "validation_share": 0.5, "seed": 0, "top_k": 3, "bootstrap": 100}}


@pytest.fixture(scope="module", autouse=True)
def embedded_ray():
    import ray

    ray.shutdown()
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def holdout_run(synthetic_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("holdout")
    return start_search(write_space(tmp, **SPACE), data=str(synthetic_root), results=tmp / "results")


def test_the_split_is_recorded_and_trials_see_only_the_validation_part(holdout_run, synthetic_root):
    from anoseg.data import list_test

    meta = holdout_run.read_meta()
    assert meta["selection"]["protocol"] == "holdout"
    for category in ("brick", "board"):
        split = meta["selection"]["split"][category]
        paths, _ = list_test(synthetic_root, category)
        assert sorted(split[VALIDATION] + split[TEST]) == sorted(f"{p.parent.name}/{p.name}" for p in paths)
        assert not set(split[VALIDATION]) & set(split[TEST])
    record = next(r for r in holdout_run.records() if r["status"] == "completed")
    on_validation = run_trial(record["config"], synthetic_root, ["brick", "board"], protocol=Protocol("holdout", 0.5, 0))
    on_everything = run_trial(record["config"], synthetic_root, ["brick", "board"])
    assert on_validation.mean["aupro"] == pytest.approx(record["metrics"]["aupro"], abs=1e-9)
    assert on_everything.mean["aupro"] != pytest.approx(record["metrics"]["aupro"], abs=1e-6)


def test_finalize_reports_the_test_part_with_intervals(holdout_run):
    meta = holdout_run.read_meta()
    final = meta["final"]
    assert final["protocol"] == "holdout" and final["parts"] == [VALIDATION, TEST]
    assert len(final["trials"]) == 3 and final["chosen"] == final["best_by_search"] == final["trials"][0]["trial_id"]
    records = {r["trial_id"]: r for r in holdout_run.records()}
    for entry in final["trials"]:
        # the validation figures are the search's own; the test figures are new images
        assert entry[VALIDATION]["aupro"] == pytest.approx(records[entry["trial_id"]]["metrics"]["aupro"], abs=1e-9)
        assert entry[TEST]["aupro"] != pytest.approx(entry[VALIDATION]["aupro"], abs=1e-6)
        for part in (VALIDATION, TEST):
            low, high = entry[f"{part}_interval"]["aupro"]
            assert low < high and low - 0.05 <= entry[part]["aupro"] <= high + 0.05
        assert isinstance(entry["tied"], bool)
    assert final["trials"][0]["tied"] is True  # the best is tied with itself
    df = pd.read_parquet(holdout_run.path / "trials.parquet")
    finalised = df[df["test/aupro"].notna()]
    assert sorted(finalised["trial_id"]) == sorted(e["trial_id"] for e in final["trials"])
    assert df.loc[df["chosen"].fillna(False).astype(bool), "trial_id"].tolist() == [final["chosen"]]
    text = summary(holdout_run)
    assert "on the validation part" in text and "finalised 3 trials" in text and "<- chosen" in text


def test_export_carries_validation_and_test(holdout_run, tmp_path):
    from search.export import export_run

    export_run(holdout_run.path, tmp_path / "best.yaml")
    doc = yaml.safe_load((tmp_path / "best.yaml").read_text())
    assert doc["selection"]["protocol"] == "holdout" and "split" not in doc["selection"]
    assert doc["metrics"]["measured_on"] == "the validation part"
    assert doc["metrics"]["test"]["measured_on"].startswith("the test part")
    assert set(doc["metrics"]["test"]["interval"]) == {"aupro"} and "tied_with_best" in doc["metrics"]


def test_finalize_again_from_the_cli_with_another_top_k(holdout_run, capsys):
    from anoseg.cli import main

    assert main(["search", "finalize", str(holdout_run.path), "--top-k", "2"]) == 0
    assert len(holdout_run.read_meta()["final"]["trials"]) == 2
    df = pd.read_parquet(holdout_run.path / "trials.parquet")
    assert df["test/aupro"].notna().sum() == 2  # the third trial's earlier test figures are withdrawn
    assert "finalised 2 trials" in capsys.readouterr().out


def test_protocol_test_says_selected_on_the_test_set(synthetic_root, tmp_path):
    run = start_search(write_space(tmp_path, **{**SPACE, "budget": {"trials": 2, "max_concurrent": 2},
                                                "selection": {"protocol": "test", "bootstrap": 50}}),
                       data=str(synthetic_root), results=tmp_path / "results")
    final = run.read_meta()["final"]
    assert final["parts"] == [TEST] and final["selected_on"] == "the test set"
    assert "selected on the test set" in summary(run)


def test_a_category_too_small_to_split_stops_the_search_before_it_starts(synthetic_root, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synthetic_root / "brick", data / "brick")
    for extra in sorted((data / "brick" / "test" / "good").iterdir())[1:]:
        extra.unlink()
    with pytest.raises(DataError, match="category brick is too small to split.*good 1"):
        start_search(write_space(tmp_path, **{**SPACE, "dataset": {**SPACE["dataset"], "categories": ["brick"]}}),
                     data=str(data), results=tmp_path / "results")
    assert not (tmp_path / "results").exists()


def test_cheapest_tied_picks_the_fastest_trial_among_the_tied():
    candidates = [{"trial_id": "a", "metrics": {"ms_per_image": 9.0}}, {"trial_id": "b", "metrics": {"ms_per_image": 3.0}},
                  {"trial_id": "c", "metrics": {"ms_per_image": 1.0}}]
    trials = {"a": {"tied": True}, "b": {"tied": True}, "c": {"tied": False}}
    assert _choose(candidates, trials, "cheapest_tied", {"metric": "aupro", "mode": "max"}) == "b"
    assert _choose(candidates, trials, "best", {"metric": "aupro", "mode": "max"}) == "a"


def good_images_only(synthetic_root, folder):
    """The embedded data with every defect image deleted: brick keeps its good test images, board has no test
    folder at all (a production line before its first defect)."""
    for category in ("brick", "board"):
        shutil.copytree(synthetic_root / category, folder / category)
        shutil.rmtree(folder / category / "ground_truth")
        for defect in (folder / category / "test").iterdir():
            if defect.name != "good":
                shutil.rmtree(defect)
    shutil.rmtree(folder / "board" / "test")
    return folder


def test_a_search_runs_on_good_images_only_with_synthetic_defects(synthetic_root, tmp_path):
    from anoseg.cli import main

    data = good_images_only(synthetic_root, tmp_path / "data")
    space = write_space(tmp_path, **{**SPACE, "selection": {"protocol": "synthetic", "n_images": 4, "top_k": 2,
                                                            "bootstrap": 50}})
    assert main(["search", "run", str(space), "--data", str(data), "--results", str(tmp_path / "results")]) == 0
    run = RunDir.open(tmp_path / "results" / "tiny")
    meta = run.read_meta()
    assert meta["selection"]["split"]["board"] == {"validation": [], "test": [],
                                                   "train_held_out": meta["selection"]["split"]["board"]["train_held_out"]}
    assert len(meta["selection"]["split"]["board"]["train_held_out"]) == 4
    records = [r for r in run.records() if r["status"] == "completed"]
    assert records and all(0 < r["metrics"]["aupro"] <= 1 for r in records)
    final = meta["final"]
    assert final["parts"] == [VALIDATION] and any("no test figures" in n for n in final["notes"])
    assert "generated defects" in summary(run)


def test_without_defects_the_other_protocols_refuse_clearly(synthetic_root, tmp_path):
    data = good_images_only(synthetic_root, tmp_path / "data")
    with pytest.raises(DataError, match="brick is too small to split.*good 4.*protocol: synthetic"):
        start_search(write_space(tmp_path, **SPACE), data=str(data), results=tmp_path / "results")
    with pytest.raises(DataError, match="board/test is missing.*protocol: synthetic"):
        start_search(write_space(tmp_path, **{**SPACE, "dataset": {**SPACE["dataset"], "categories": ["board"]}}),
                     data=str(data), results=tmp_path / "results")
    assert not (tmp_path / "results").exists()
