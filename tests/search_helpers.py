"""Helpers shared by the search tests: a tiny, fast space on the synthetic dataset."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

TINY_SPACE: dict[str, Any] = {
    "name": "tiny",
    "dataset": {"root": "unused", "categories": "all", "image_size": 64},
    "objective": [{"metric": "aupro", "mode": "max"}],
    "sampler": {"name": "tpe", "seed": 0, "n_startup_trials": 3},
    "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
    "budget": {"trials": 6, "max_concurrent": 2},
    "resources": {"cpu": 1, "gpu": 0},
    "trial": {"batch_size": 16, "seed": 0, "device": "cpu"},
    "space": {
        "backbones": {"resnet18": {"weights": "none", "layers": [["layer1"], ["layer1", "layer2"]]}},
        "heads": {
            "padim": {"n_features": {"type": "int", "low": 8, "high": 64}},
            "patchcore": {"coreset_ratio": {"type": "float", "low": 0.01, "high": 0.05, "log": True}},
        },
    },
}


def write_space(tmp_path: Path, **changes: Any) -> Path:
    space = copy.deepcopy(TINY_SPACE)
    for key, value in changes.items():
        space[key] = value
    path = tmp_path / f"{space['name']}.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def read_records(run_path: Path, statuses: tuple[str, ...] | None = None) -> dict[str, dict]:
    """Trial records of a run folder by trial id (optionally only those with one of `statuses`).

    Safe to call while a search writes them: a record being replaced is skipped.
    """
    import json

    out = {}
    for p in (run_path / "trials").glob("*.json"):
        try:
            rec = json.loads(p.read_text())
        except (json.JSONDecodeError, OSError):
            continue
        if statuses is None or rec.get("status") in statuses:
            out[rec["trial_id"]] = rec
    return out
