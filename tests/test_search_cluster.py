"""A search on a local 2-node Ray cluster survives losing a worker node mid-search."""
from __future__ import annotations

import threading
import time

import pytest

from search.runner import start_search
from tests.search_helpers import read_records, write_space

pytestmark = pytest.mark.slow


def test_search_survives_a_lost_node(synthetic_root, tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    worker = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    space = write_space(tmp_path, scheduler={"name": "none"}, budget={"trials": 6, "max_concurrent": 2})
    results = tmp_path / "results"
    run_path = results / "tiny"
    outcome: dict = {}

    def search() -> None:
        try:
            outcome["run"] = start_search(space, data=str(synthetic_root), results=results, address=cluster.address)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            outcome["error"] = exc

    thread = threading.Thread(target=search)
    thread.start()
    try:
        deadline = time.time() + 180
        finished_before: dict = {}
        while time.time() < deadline and thread.is_alive():
            records = read_records(run_path)
            running = [r for r in records.values() if r["status"] == "running"]
            finished_before = {k: r for k, r in records.items() if r["status"] == "completed"}
            if finished_before and len(running) == 2:  # one of the two runs on the worker node
                break
            time.sleep(0.05)
        assert finished_before, "no trial finished before the node was removed"
        cluster.remove_node(worker)
        thread.join(timeout=400)
        assert not thread.is_alive(), "search did not finish after losing a node"
        assert "error" not in outcome, outcome.get("error")
    finally:
        ray.shutdown()
        cluster.shutdown()

    records = read_records(run_path)
    assert len(records) == 6
    assert outcome["run"].read_meta()["storage"].startswith("journal://"), "the cluster default is the journal"
    assert (run_path / "optuna.journal").is_file() and not (run_path / "optuna.db").exists()
    assert all(r["status"] == "completed" for r in records.values()), {k: r["status"] for k, r in records.items()}
    assert any(r.get("retries", 0) >= 1 for r in records.values()), "the lost node's trial was retried"
    for trial_id, rec in finished_before.items():
        assert records[trial_id]["ended"] == rec["ended"] and records[trial_id]["metrics"] == rec["metrics"]
