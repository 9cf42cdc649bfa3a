"""Units of the Ray adapter that need no running search: replay and the recorder."""
from __future__ import annotations

import pytest

from search import tune_adapter
from search.run_dir import RunDir
from search.space import validate_space
from tests.search_helpers import TINY_SPACE

CATS = ["brick", "grass", "gravel", "washer"]


def finished_record(status="completed", step=4):
    per_category = {c: {"image_auroc": 0.5 + i / 10, "aupro": 0.4 + i / 10, "fit_seconds": 1.0, "ms_per_image": 2.0}
                    for i, c in enumerate(CATS[:step])}
    return {"trial_id": "abc", "status": status, "step": step, "per_category": per_category,
            "config": {"backbone": {"name": "resnet18"}}, "error": "DataError: boom" if status == "failed" else None}


@pytest.fixture
def reports(monkeypatch):
    sent = []
    monkeypatch.setattr(tune_adapter.tune, "report", lambda metrics: sent.append(dict(metrics)))
    return sent


def test_replay_re_reports_stored_results_in_order(reports):
    space = validate_space(TINY_SPACE, "tiny.yaml")
    tune_adapter.replay(finished_record(), CATS, space)
    assert [r["categories_done"] for r in reports] == [1, 2, 3, 4]
    assert all(r["replayed"] for r in reports)
    assert reports[0]["brick/aupro"] == 0.4 and reports[-1]["washer/aupro"] == pytest.approx(0.7)
    assert reports[-1]["aupro"] == pytest.approx((0.4 + 0.5 + 0.6 + 0.7) / 4)  # running mean, as run_trial reports


def test_replay_of_a_failed_trial_ends_with_its_error(reports):
    space = validate_space(TINY_SPACE, "tiny.yaml")
    tune_adapter.replay(finished_record("failed", step=2), CATS, space)
    assert [r["categories_done"] for r in reports] == [1, 2, 2]
    assert reports[-1]["trial_error"] == "DataError: boom" and reports[-1]["replayed"]


class FakeTrial:
    def __init__(self, trial_id, config):
        self.trial_id, self.config = trial_id, config


def test_recorder_keeps_finished_records_and_marks_lost_ones(tmp_path):
    run = RunDir(tmp_path)
    run.write_meta({"categories": CATS})
    recorder = tune_adapter.RunRecorder(str(tmp_path), total_steps=4, budget=3, metric="aupro", mode="max")
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
    recorder.on_trial_result(0, [], stopped, {"category": "brick", "brick/aupro": 0.9, "aupro": 0.9, "categories_done": 1})
    recorder.on_trial_complete(0, [], stopped)
    assert run.read_record("partial")["status"] == "stopped"

    recorder.on_trial_start(0, [], FakeTrial("orphan", {}))
    recorder.on_experiment_end([trial, stopped])
    assert run.read_record("orphan")["status"] == "lost"
    assert set(run.table()["status"]) == {"completed", "stopped", "lost"}
