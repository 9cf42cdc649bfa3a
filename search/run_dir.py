"""A search's run folder: metadata, one record per trial, and the collated trial table.

```
results/<name>/
  run.json         data root, category order, objectives, address, times
  space.yaml       the space file as the user wrote it
  space.json       the space validated and normalised once, at the start: what every reader loads
  optuna.db        the Optuna study in SQLite (storage: sqlite, the default on one machine), or
  optuna.journal   the study as an Optuna journal (storage: journal, the default on a cluster); neither
                   when the space names a database server or another file (search.storage)
  tune/            Ray Tune's experiment (restored by `resume`)
  trials/<id>.json one record per trial, rewritten as it progresses (atomic)
  checkpoints/     a trainable head's trial state after its last epoch, while the trial runs
  trials.parquet   the collated table (+ trials.csv), rewritten after every trial; test/<metric> columns
                   for the trials finalised on the test part (search.finalize)
```
Nothing here imports Ray: records are plain JSON written by the driver.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import pandas as pd

from anoseg.errors import AnosegError
from anoseg.files import write_atomic, write_json_atomic
from anoseg.metrics import CATEGORY_METRICS, MEMORY_METRICS
from anoseg.result import TrialReport
from search.space_schema import SearchSpace, load_space

RUN_FILE = "run.json"
SPACE_FILE = "space.yaml"
STORED_SPACE_FILE = "space.json"
TRIALS_DIR = "trials"
CHECKPOINTS_DIR = "checkpoints"
TABLE_FILE = "trials.parquet"
CSV_FILE = "trials.csv"
TUNE_DIR = "tune"
STUDY_FILE = "optuna.db"

# Trial statuses in records and the table.
RUNNING, COMPLETED, STOPPED, FAILED, ERROR = "running", "completed", "stopped", "failed", "error"
LOST = "lost"  # started after Tune's last saved state when the driver died: Tune re-samples it on resume
FINISHED = (COMPLETED, STOPPED, FAILED, ERROR)
REPORT_KEYS = (*CATEGORY_METRICS, *MEMORY_METRICS)


class RunError(AnosegError):
    """A run folder is missing, incomplete or not a search run."""


@dataclass
class RunDir:
    path: Path

    @classmethod
    def open(cls, path: str | Path) -> "RunDir":
        run = cls(Path(path))
        if not (run.path / RUN_FILE).is_file():
            raise RunError(f"{run.path} is not a search run folder (no {RUN_FILE}); start one with `anoseg search run SPACE`")
        return run

    @property
    def tune_dir(self) -> Path:
        return self.path / TUNE_DIR

    @property
    def study_url(self) -> str:
        return f"sqlite:///{(self.path / STUDY_FILE).resolve()}"

    def read_meta(self) -> dict[str, Any]:
        return json.loads((self.path / RUN_FILE).read_text())

    def write_meta(self, meta: Mapping[str, Any]) -> None:
        write_json_atomic(self.path / RUN_FILE, dict(meta))

    def update_meta(self, **changes: Any) -> None:
        self.write_meta({**self.read_meta(), **changes})

    def write_space(self, space: SearchSpace) -> None:
        """Store the validated space, normalised, for every later reader (resume, status, export, dashboard)."""
        write_json_atomic(self.path / STORED_SPACE_FILE, space.to_stored())

    def space(self) -> SearchSpace:
        """The space the run was started with, as validated then: no registry check, no torch. A run folder
        from before space.json existed is validated from its space.yaml instead."""
        stored = self.path / STORED_SPACE_FILE
        if stored.is_file():
            return SearchSpace.from_stored(json.loads(stored.read_text()), source=str(stored))
        path = self.path / SPACE_FILE
        if not path.is_file():
            raise RunError(f"{path} is missing (and so is {STORED_SPACE_FILE}); the run folder is incomplete")
        return load_space(path)

    def checkpoint_path(self, trial_id: str) -> Path:
        """Where a trainable head's trial keeps its state between epochs (see search.tune_adapter)."""
        return self.path / CHECKPOINTS_DIR / f"{trial_id}.pt"

    # --- trial records -------------------------------------------------------------
    def record_path(self, trial_id: str) -> Path:
        return self.path / TRIALS_DIR / f"{trial_id}.json"

    def read_record(self, trial_id: str) -> dict[str, Any] | None:
        path = self.record_path(trial_id)
        return json.loads(path.read_text()) if path.is_file() else None

    def records(self) -> list[dict[str, Any]]:
        folder = self.path / TRIALS_DIR
        if not folder.is_dir():
            return []
        records = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
        return sorted(records, key=lambda r: (r.get("started") or 0, r["trial_id"]))

    def update_record(self, trial_id: str, **changes: Any) -> dict[str, Any]:
        record = self.read_record(trial_id) or {"trial_id": trial_id, "status": RUNNING, "started": time.time(),
                                                 "per_category": {}, "metrics": {}, "step": 0}
        record.update(changes)
        write_json_atomic(self.record_path(trial_id), record)
        return record

    def record_result(self, trial_id: str, params: Mapping[str, Any], result: Mapping[str, Any]) -> dict[str, Any]:
        """Fold one reported result (Ray Tune's flat dict: a finished category, or an epoch of every category)
        into the record. `step` is the trial's fidelity (categories or epochs done), out of `fidelity_total`."""
        record = self.read_record(trial_id) or {}
        report = TrialReport.from_flat(result)
        changes: dict[str, Any] = {
            "params": dict(params),
            "per_category": {**record.get("per_category", {}), **report.per_category},
            "metrics": {**report.mean, **report.memory},
            "step": report.fidelity or int(record.get("step") or 0),
            "categories_done": max(report.categories_done, int(record.get("categories_done") or 0)),
        }
        if report.fidelity_total:
            changes.update(fidelity_total=report.fidelity_total, fidelity_unit=report.fidelity_unit)
        if report.train_share < 1 or record.get("train_share"):
            changes["train_share"] = report.train_share  # fitted on this share of the training images so far
        if report.resumed_from:  # a trainable head's trial continued from its checkpoint
            changes["resumed_from_epoch"] = report.resumed_from
        for key in ("effective_key", "duplicate_of"):
            if result.get(key):
                changes[key] = result[key]
        if result.get("trial_error"):
            changes.update(status=FAILED, error=result["trial_error"], stop_reason="raised an error", ended=time.time())
        if result.get("trial_config"):
            changes["config"] = json.loads(result["trial_config"])
        return self.update_record(trial_id, **changes)

    def completed_record(self, effective_key: str) -> dict[str, Any] | None:
        """The first completed trial (not itself a duplicate) that ran this effective configuration, or None."""
        for record in self.records():
            if (record.get("status") == COMPLETED and record.get("effective_key") == effective_key
                    and not record.get("duplicate_of")):
                return record
        return None

    # --- collation -------------------------------------------------------------------
    def table(self) -> pd.DataFrame:
        return collate(self.records(), self.read_meta())

    def write_table(self) -> pd.DataFrame:
        """Collate every record into trials.parquet and trials.csv (atomic replace)."""
        df = self.table()
        write_atomic(self.path / TABLE_FILE, lambda tmp: df.to_parquet(tmp, index=False), by_name=True)
        write_atomic(self.path / CSV_FILE, lambda tmp: df.to_csv(tmp, index=False), by_name=True)
        return df


def collate(records: Iterable[Mapping[str, Any]], meta: Mapping[str, Any]) -> pd.DataFrame:
    """One row per trial: status, stop reason, error, every parameter, means, cost, per-category metrics."""
    categories = meta.get("categories", [])
    rows = []
    for rec in records:
        row: dict[str, Any] = {
            "trial_id": rec["trial_id"],
            "status": rec.get("status"),
            "stop_reason": rec.get("stop_reason"),
            "duplicate_of": rec.get("duplicate_of"),
            "error": rec.get("error"),
            "categories_done": rec.get("categories_done", rec.get("step", 0)),
            "fidelity": f"{rec.get('step', 0)}/{rec.get('fidelity_total') or len(categories)} "
                        f"{rec.get('fidelity_unit') or 'categories'}",
            "started": rec.get("started"),
            "ended": rec.get("ended"),
            "wall_seconds": (rec["ended"] - rec["started"]) if rec.get("ended") and rec.get("started") else None,
        }
        row.update({f"param.{k}": v for k, v in sorted(rec.get("params", {}).items())})
        row.update({k: rec.get("metrics", {}).get(k) for k in REPORT_KEYS})
        for cat in categories:
            for key in CATEGORY_METRICS:
                row[f"{cat}/{key}"] = rec.get("per_category", {}).get(cat, {}).get(key)
        row.update(final_columns(rec.get("final")))
        rows.append(row)
    df = pd.DataFrame(rows)
    for column in [c for c in df.columns if c.startswith("param.")]:
        kinds = {type(v) for v in df[column] if v is not None and v == v}
        if len(kinds) > 1 and not kinds <= {int, float}:  # a categorical of mixed types ("ledoit_wolf", 0.1)
            df[column] = [None if v is None or v != v else str(v) for v in df[column]]
    columns = ["trial_id", "status", "stop_reason", "duplicate_of", "error", "categories_done", "fidelity", "started", "ended", "wall_seconds",
               *REPORT_KEYS]
    return df if not df.empty else pd.DataFrame(columns=columns)


def final_columns(final: Mapping[str, Any] | None) -> dict[str, Any]:
    """A finalised trial's columns (search.finalize): ``chosen``, ``tied``, the validation interval
    ``<metric>_low`` / ``_high``, and its test figures ``test/<metric>`` with ``test/<metric>_low`` / ``_high``."""
    if not final:
        return {}
    row: dict[str, Any] = {"chosen": bool(final.get("chosen")), "tied": final.get("tied")}
    for name, (low, high) in (final.get("validation_interval") or {}).items():
        row[f"{name}_low"], row[f"{name}_high"] = low, high
    row.update({f"test/{key}": (final.get("test") or {}).get(key) for key in CATEGORY_METRICS})
    for name, (low, high) in (final.get("test_interval") or {}).items():
        row[f"test/{name}_low"], row[f"test/{name}_high"] = low, high
    return row


def best_trial(df: pd.DataFrame, metric: str, mode: str) -> pd.Series | None:
    """The best completed trial (all categories evaluated) by `metric`, or None."""
    done = df[(df["status"] == COMPLETED) & df[metric].notna()] if metric in df else df.iloc[0:0]
    if done.empty:
        return None
    return done.loc[done[metric].idxmax() if mode == "max" else done[metric].idxmin()]


def record_report(record: Mapping[str, Any]) -> TrialReport:
    """The last report a trial record holds, typed (to re-report a trial finished before a driver crash)."""
    step = int(record.get("step") or 0)
    memory = {k: v for k, v in (record.get("metrics") or {}).items() if k in MEMORY_METRICS}
    return TrialReport(dict(record.get("per_category") or {}), step, int(record.get("fidelity_total") or step),
                       record.get("fidelity_unit") or "categories", memory)
