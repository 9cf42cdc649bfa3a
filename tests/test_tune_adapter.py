"""Units of the Ray adapter that need no running search: replay and the recorder."""
from __future__ import annotations

import pytest

from search import tune_adapter
from search.run_dir import RunDir
from search.space_schema import validate_space
from tests.search_helpers import TINY_SPACE

CATS = ["brick", "grass", "gravel", "washer"]


def finished_record(status="completed", step=4):
    per_category = {c: {"image_auroc": 0.5 + i / 10, "aupro": 0.4 + i / 10, "fit_seconds": 1.0, "ms_per_image": 2.0}
                    for i, c in enumerate(CATS[:step])}
    metrics = {"aupro": sum(m["aupro"] for m in per_category.values()) / step}
    return {"trial_id": "abc", "status": status, "step": step, "per_category": per_category, "metrics": metrics,
            "categories_done": step, "fidelity_total": 4, "fidelity_unit": "categories",
            "config": {"backbone": {"name": "resnet18"}}, "error": "DataError: boom" if status == "failed" else None}


@pytest.fixture
def reports(monkeypatch):
    sent = []
    monkeypatch.setattr(tune_adapter.tune, "report", lambda metrics: sent.append(dict(metrics)))
    return sent


def test_replay_re_reports_the_stored_last_result(reports):
    space = validate_space(TINY_SPACE, "tiny.yaml")
    tune_adapter.replay(finished_record(), space)
    assert len(reports) == 1 and reports[0]["replayed"]
    last = reports[0]
    assert last["fidelity"] == 4 and last["fidelity_total"] == 4 and last["categories_done"] == 4
    assert tune_adapter.finished_all(last)
    assert last["brick/aupro"] == 0.4 and last["washer/aupro"] == pytest.approx(0.7)
    assert last["aupro"] == pytest.approx((0.4 + 0.5 + 0.6 + 0.7) / 4)


def test_replay_of_a_failed_trial_reports_its_error(reports):
    space = validate_space(TINY_SPACE, "tiny.yaml")
    tune_adapter.replay(finished_record("failed", step=2), space)
    assert len(reports) == 1 and reports[0]["fidelity"] == 2
    assert reports[0]["trial_error"] == "DataError: boom" and reports[0]["replayed"]


def test_a_trainable_heads_checkpoint_round_trips(tmp_path):
    import torch

    path = RunDir(tmp_path).checkpoint_path("abc")
    assert tune_adapter.load_checkpoint(path) is None  # a fresh trial
    tune_adapter.save_checkpoint(path, {"epoch": 3, "heads": {"brick": {"w": torch.ones(2)}}})
    state = tune_adapter.load_checkpoint(path)
    assert state["epoch"] == 3 and torch.equal(state["heads"]["brick"]["w"], torch.ones(2))
    assert [p.name for p in path.parent.iterdir()] == ["abc.pt"]  # no temporary file left
    path.write_bytes(b"half a file")
    assert tune_adapter.load_checkpoint(path) is None  # damaged: the trial starts over


class FakeTrial:
    def __init__(self, trial_id, config):
        self.trial_id, self.config = trial_id, config


def test_recorder_keeps_finished_records_and_marks_lost_ones(tmp_path):
    run = RunDir(tmp_path)
    run.write_meta({"categories": CATS})
    recorder = tune_adapter.RunRecorder(str(tmp_path), budget=3, metric="aupro", mode="max")
    run.update_record("done", **{k: v for k, v in finished_record().items() if k != "trial_id"}, ended=123.0)
    trial = FakeTrial("done", {"backbone": "resnet18", "head": "padim"})
    recorder.on_trial_start(0, [], trial)
    recorder.on_trial_result(0, [], trial, {"replayed": True, "category": "brick", "brick/aupro": 0.0, "categories_done": 1})
    recorder.on_trial_complete(0, [], trial)
    kept = run.read_record("done")
    assert kept["status"] == "completed" and kept["ended"] == 123.0 and kept["replays"] == 1
    assert kept["per_category"]["brick"]["aupro"] == 0.4

    stopped = FakeTrial("partial", {"backbone": "resnet18", "head": "padim"})
    recorder.on_trial_start(0, [], stopped)
    recorder.on_trial_result(0, [], stopped, {"category": "brick", "brick/aupro": 0.9, "aupro": 0.9, "categories_done": 1,
                                              "fidelity": 1, "fidelity_total": 4, "fidelity_unit": "categories"})
    recorder.on_trial_complete(0, [], stopped)
    partial = run.read_record("partial")
    assert partial["status"] == "stopped" and partial["stop_reason"] == "stopped early after 1/4 categories"

    epochs = FakeTrial("epochs", {"backbone": "resnet18", "head": "stfpm"})  # a trainable head: every category per epoch
    recorder.on_trial_start(0, [], epochs)
    every = {f"{c}/aupro": 0.8 - 0.1 * i for i, c in enumerate(CATS)}
    recorder.on_trial_result(0, [], epochs, {**every, "aupro": 0.65, "categories_done": 4,
                                             "fidelity": 2, "fidelity_total": 2, "fidelity_unit": "epochs",
                                             "resumed_from": 1})
    recorder.on_trial_complete(0, [], epochs)
    done = run.read_record("epochs")
    assert done["status"] == "completed" and done["stop_reason"] == "trained 2 epochs"
    assert done["per_category"] == {c: {"aupro": 0.8 - 0.1 * i} for i, c in enumerate(CATS)}
    assert done["resumed_from_epoch"] == 1 and done["categories_done"] == 4

    recorder.on_trial_start(0, [], FakeTrial("orphan", {}))
    recorder.on_experiment_end([trial, stopped])
    assert run.read_record("orphan")["status"] == "lost"
    table = run.table()
    assert set(table["status"]) == {"completed", "stopped", "lost"}
    assert set(table["fidelity"]) >= {"4/4 categories", "1/4 categories", "2/2 epochs"}
