"""Searches with a trainable head (STFPM): ASHA over epochs, and a killed search continuing a trial from its checkpoint."""
from __future__ import annotations

import sys
from collections import Counter

import optuna
import pytest

from search.runner import start_search
from tests.search_helpers import kill_search_when, read_records, resume_search_cli, write_space

pytestmark = pytest.mark.slow

STFPM_SPACE = {
    "backbones": {"resnet18": {"weights": "none", "layers": [["layer1", "layer2"]]}},
    "heads": {"stfpm": {"epochs": 4, "batch_size": 8,
                        "optimizer": {"type": "categorical", "choices": ["sgd", "adam"]},
                        "layer_weights": {"type": "categorical", "choices": ["equal", "deep"]}}},
}


@pytest.fixture(scope="module", autouse=True)
def embedded_ray():
    import ray

    ray.shutdown()
    yield
    ray.shutdown()


def test_asha_stops_stfpm_trials_by_epoch_and_optuna_stays_honest(synthetic_root, tmp_path):
    space = write_space(tmp_path, space=STFPM_SPACE, budget={"trials": 4, "max_concurrent": 2})
    run = start_search(space, data=str(synthetic_root), results=tmp_path / "results")
    df = run.table()
    assert len(df) == 4 and set(df["status"]) <= {"completed", "stopped"}
    completed, stopped = df[df["status"] == "completed"], df[df["status"] == "stopped"]
    assert len(completed) >= 1
    assert (completed["fidelity"] == "4/4 epochs").all() and (completed["stop_reason"] == "trained 4 epochs").all()
    assert stopped["stop_reason"].str.match(r"stopped early after [123]/4 epochs").all()
    assert (df["categories_done"] == 5).all()  # every epoch evaluates every category
    assert completed[["brick/aupro", "washer/aupro", "aupro"]].notna().all().all()
    meta = run.read_meta()
    study = optuna.load_study(study_name=meta["study_name"], storage=meta["storage"])
    assert Counter(t.state.name for t in study.trials) == Counter({"COMPLETE": len(completed), "PRUNED": len(stopped)})


def test_killed_search_continues_the_stfpm_trial_from_its_last_epoch(synthetic_root, tmp_path):
    space_dict = {**STFPM_SPACE, "heads": {"stfpm": {**STFPM_SPACE["heads"]["stfpm"], "epochs": 12, "optimizer": "sgd",
                                                      "layer_weights": "equal"}}}
    space = write_space(tmp_path, space=space_dict, budget={"trials": 1, "max_concurrent": 1}, scheduler={"name": "none"})
    results = tmp_path / "results"
    run_path = results / "tiny"
    cmd = [sys.executable, "-m", "anoseg.cli", "search", "run", str(space), "--data", str(synthetic_root),
           "--results", str(results)]
    def epochs_done() -> int:
        return max((int(r.get("step") or 0) for r in read_records(run_path).values()), default=0)

    kill_search_when(cmd, lambda: epochs_done() >= 3, timeout=300)
    killed_at = epochs_done()
    assert 3 <= killed_at < 12, "the trial must be killed mid-way for this test to mean anything"

    resumed = resume_search_cli(run_path, timeout=400)
    records = list(read_records(run_path).values())
    assert len(records) == 1, (resumed.stdout[-4000:] + resumed.stderr[-4000:], records)
    (record,) = records
    assert record["status"] == "completed" and record["step"] == 12, record
    # The trial went on from its checkpoint, not from epoch 0. The worker may have saved an epoch or so that the
    # driver had not recorded yet when it was killed (the same state a resumed trial reaches: training is seeded).
    assert killed_at <= record["resumed_from_epoch"] <= killed_at + 2, (killed_at, record)
    assert 0 <= record["metrics"]["aupro"] <= 1
