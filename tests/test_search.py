"""End-to-end searches on an embedded Ray: records, Optuna states, failures, kill + resume."""
from __future__ import annotations

import shutil
import sys
from collections import Counter
from pathlib import Path

import optuna
import pandas as pd
import pytest

from search.run_dir import RunDir
from search.runner import start_search, summary
from tests.search_helpers import kill_search_when, read_records, resume_search_cli, write_space

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def embedded_ray():
    import ray

    ray.shutdown()
    yield
    ray.shutdown()


def study_of(run: RunDir) -> optuna.Study:
    meta = run.read_meta()
    return optuna.load_study(study_name=meta["study_name"], storage=meta["storage"])


def test_search_records_every_trial_and_keeps_optuna_honest(synthetic_root, tmp_path):
    run = start_search(write_space(tmp_path), data=str(synthetic_root), results=tmp_path / "results")
    df = pd.read_parquet(run.path / "trials.parquet")
    assert (run.path / "trials.csv").is_file() and (run.path / "space.yaml").is_file()
    assert len(df) == 6 and df["trial_id"].is_unique
    assert set(df["status"]) <= {"completed", "stopped"} and "completed" in set(df["status"])
    completed = df[df["status"] == "completed"]
    assert (completed["categories_done"] == 5).all()  # board, brick, grass, gravel, washer
    assert completed[["brick/aupro", "washer/aupro", "aupro", "fit_seconds", "ms_per_image"]].notna().all().all()
    stopped = df[df["status"] == "stopped"]
    assert (stopped["categories_done"] < 5).all()
    assert stopped["stop_reason"].str.startswith("stopped early").all()
    assert any(c.startswith("param.") for c in df.columns)

    # Optuna: only trials that saw every category are COMPLETE; ASHA-stopped ones are PRUNED with their value
    states = Counter(t.state.name for t in study_of(run).trials)
    assert states == Counter({"COMPLETE": len(completed), "PRUNED": len(stopped)})
    for trial in study_of(run).trials:
        if trial.state.name == "PRUNED":
            assert trial.intermediate_values, "a pruned trial keeps its last reported value"
    text = summary(run)
    assert "chosen (best): trial" in text and "6 trials of 6" in text and "on the validation part" in text


def test_failing_trial_is_recorded_and_the_search_goes_on(synthetic_root, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synthetic_root, data)
    broken = sorted((data / "washer" / "test" / "good").glob("*.png"))[0]
    broken.write_bytes(b"definitely not a png")
    space = write_space(tmp_path, scheduler={"name": "none"}, budget={"trials": 3, "max_concurrent": 2})
    run = start_search(space, data=str(data), results=tmp_path / "results")
    df = run.table()
    assert len(df) == 3
    assert (df["status"] == "failed").all()  # every trial reaches washer and fails there
    assert df["error"].str.contains("cannot read image").all() and df["error"].str.contains(broken.name).all()
    assert (df["categories_done"] == 4).all()  # the four categories before washer are kept
    assert {t.state.name for t in study_of(run).trials} == {"FAIL"}


def _finished(run_path: Path) -> dict[str, dict]:
    return read_records(run_path, ("completed", "stopped", "failed"))


def test_killed_search_resumes_without_losing_or_repeating_trials(synthetic_root, tmp_path):
    space = write_space(tmp_path, budget={"trials": 8, "max_concurrent": 2}, scheduler={"name": "none"})
    results = tmp_path / "results"
    run_path = results / "tiny"
    cmd = [sys.executable, "-m", "anoseg.cli", "search", "run", str(space), "--data", str(synthetic_root), "--results", str(results)]
    kill_search_when(cmd, lambda: len(_finished(run_path)) >= 2, timeout=240)
    before = _finished(run_path)
    assert 2 <= len(before) < 8, "the search must be killed mid-way for this test to mean anything"

    resumed = resume_search_cli(run_path, timeout=400)
    after = _finished(run_path)
    assert len(after) == 8, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    for trial_id, record in before.items():  # nothing finished before the kill was lost or re-run
        assert after[trial_id]["ended"] == record["ended"]
        assert after[trial_id]["metrics"] == record["metrics"]
    study = study_of(RunDir.open(run_path))
    states = Counter(t.state.name for t in study.trials)
    # the 8 trials complete; a trial Optuna handed out after the last saved state is failed, never left running
    assert states["COMPLETE"] == 8 and set(states) <= {"COMPLETE", "FAIL"}
    assert "8 trials of 8" in resumed.stdout


def test_same_effective_configuration_is_computed_once(synthetic_root, tmp_path):
    """resnet18's layer1 has 64 channels: PaDiM with n_features 64, 100 or 128 runs the same configuration."""
    space = {"backbones": {"resnet18": {"weights": "none", "layers": [["layer1"]]}},
             "heads": {"padim": {"n_features": {"type": "categorical", "choices": [64, 100, 128]}}}}
    path = write_space(tmp_path, space=space, sampler={"name": "grid", "seed": 0}, scheduler={"name": "none"},
                       budget={"trials": 3, "max_concurrent": 1})
    run = start_search(path, data=str(synthetic_root), results=tmp_path / "results")
    records = sorted(read_records(run.path).values(), key=lambda r: r["started"])
    assert [r["status"] for r in records] == ["completed"] * 3
    first, *rest = records
    assert "duplicate_of" not in first and len({r["effective_key"] for r in records}) == 1
    assert sorted(r["params"]["padim.n_features"] for r in records) == [64, 100, 128]
    for dup in rest:  # answered from the first trial's record, not recomputed
        assert dup["duplicate_of"] == first["trial_id"] and dup["stop_reason"].startswith("duplicate of")
        assert dup["per_category"] == first["per_category"] and dup["metrics"]["aupro"] == first["metrics"]["aupro"]
    # Optuna still receives every value, so the sampler is not misled
    values = [t.value for t in study_of(run).trials]
    assert len(values) == 3 and len(set(values)) == 1 and values[0] == first["metrics"]["aupro"]
    df = pd.read_parquet(run.path / "trials.parquet")
    assert df["duplicate_of"].notna().sum() == 2
    assert "2 of the completed were duplicates" in summary(run)


def test_effective_configuration_clamps_and_ignores_what_the_head_would():
    from anoseg.trial import config_key, effective_config

    base = {"backbone": {"name": "resnet18", "weights": "none"}, "layers": ["layer1"], "image_size": 64}
    key = lambda head: config_key(effective_config({**base, "head": head}))  # noqa: E731
    assert key({"name": "padim", "n_features": 64}) == key({"name": "padim", "n_features": 128, "seed": 3})
    assert key({"name": "padim", "n_features": 32}) != key({"name": "padim", "n_features": 33})
    assert key({"name": "padim"}) == key({"name": "padim", "n_features": 100, "epsilon": 0.01})
    assert key({"name": "stfpm", "holdout": 0.3}) == key({"name": "stfpm"})
    assert key({"name": "stfpm", "holdout": 0.3, "discrepancy_scaling": True}) != key(
        {"name": "stfpm", "discrepancy_scaling": True})
    assert key({"name": "patchcore", "projection_dim": 64}) == key({"name": "patchcore"})  # 64 channels: no projection
