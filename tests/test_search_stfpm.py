"""Searches with a trainable head (STFPM): ASHA over epochs, and a killed search continuing a trial from its checkpoint."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter

import optuna
import pytest

from search.runner import start_search
from tests.search_helpers import read_records, write_space

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
    assert (df["categories_done"] == 4).all()  # every epoch evaluates every category
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
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 300

    def epochs_done() -> int:
        return max((int(r.get("step") or 0) for r in read_records(run_path).values()), default=0)

    while epochs_done() < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    if proc.poll() is not None:
        pytest.fail(f"the search ended before it could be killed:\n{proc.stdout.read().decode()[-3000:]}")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = epochs_done()
    assert 3 <= killed_at < 12, "the trial must be killed mid-way for this test to mean anything"

    resumed = subprocess.run([sys.executable, "-m", "anoseg.cli", "search", "resume", str(run_path)],
                             capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    (record,) = read_records(run_path).values()
    assert record["status"] == "completed" and record["step"] == 12, record
    # Tune's last saved checkpoint is at most one epoch behind the record: the trial went on from there
    # The trial went on from its checkpoint, not from epoch 0. The killed driver's worker lives on a moment and
    # may save the epoch it was training (the same state a resumed trial would reach: training is seeded).
    assert killed_at <= record["resumed_from_epoch"] <= killed_at + 2, (killed_at, record)
    assert 0 <= record["metrics"]["aupro"] <= 1
