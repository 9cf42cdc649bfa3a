"""Helpers shared by the search tests: a tiny, fast space on the synthetic dataset."""
from __future__ import annotations

import contextlib
import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
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


def kill_search_when(cmd: list[str], ready: Callable[[], bool], timeout: float) -> str:
    """Run `anoseg search run` as a subprocess and SIGKILL it, with every process it started, once `ready()`;
    returns what it printed.

    Ray's workers are the raylet's children and would otherwise live on for a few seconds after the
    driver died; they are killed too, so that a resume right after this sees a dead search only.
    """
    import psutil

    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + timeout
    while not ready() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    if proc.poll() is not None:
        pytest.fail(f"the search ended before it could be killed:\n{proc.stdout.read().decode()[-3000:]}")
    family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    os.killpg(proc.pid, signal.SIGKILL)
    for member in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    psutil.wait_procs(family, timeout=30)
    proc.wait()
    os.set_blocking(proc.stdout.fileno(), False)  # a Ray process that escaped the kill may hold the pipe open
    try:
        return (proc.stdout.read() or b"").decode(errors="replace")
    except BlockingIOError:
        return ""


def resume_search_cli(run_path: Path, timeout: float) -> subprocess.CompletedProcess:
    """`anoseg search resume run_path`, asserted to succeed; on a timeout it and its Ray processes are killed."""
    cmd = [sys.executable, "-m", "anoseg.cli", "search", "resume", str(run_path)]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"resume did not end within {timeout} s:\n{out[-3000:]}\n{err[-3000:]}")
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
