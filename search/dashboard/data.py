"""The run data the dashboard shows, computed from the run folder (no plotly).

:func:`load_run` reads run.json, the trial records and the search space once into a
:class:`RunData`; the rest derives what the page needs from it (trial table, status counts, top
trials, the Pareto front, wall time, the Optuna study and its parameter importances).
The space is the run folder's stored copy (:meth:`search.run_dir.RunDir.space`).

Selection protocol (:data:`search.finalize.SELECTED_ON`): under ``holdout``, ``synthetic`` and ``few_shot``
every trial's figures in the table were measured on a validation set (the validation part of the test
images; generated defects on held-out good images; those plus a few real defects per type) and only the
finalised trials (run.json ``final``, :mod:`search.finalize`) have figures on the real test part; under
``test`` (and in runs from before ``selection`` existed) the trials were ranked on the test set itself.
:attr:`RunData.part` names what the table's figures were measured on, in the words of
:func:`search.finalize.selected_on`.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import optuna
import pandas as pd

from anoseg.metrics import CATEGORY_METRICS, COST_METRICS, MEMORY_METRICS, QUALITY_METRICS
from search.finalize import reported_on, selected_on
from search.run_dir import COMPLETED, ERROR, FAILED, LOST, RUNNING, STOPPED, RunDir, collate
from search.space_optuna import distributions, trial_config
from search.space_schema import SearchSpace
from search.storage import run_storage

STATUS_ORDER = (COMPLETED, STOPPED, RUNNING, FAILED, ERROR, LOST)
FAILED_STATUSES = (FAILED, ERROR, LOST)
NUMERIC_COLUMNS = (*CATEGORY_METRICS, *MEMORY_METRICS, "wall_seconds")
TOP_N = 10
MIN_IMPORTANCE_TRIALS = 2


@dataclass
class RunData:
    """Everything the dashboard shows, read once from the run folder."""

    path: Path
    meta: dict[str, Any]
    records: list[dict[str, Any]]
    df: pd.DataFrame
    space: SearchSpace | None = None
    space_error: str | None = None

    @property
    def categories(self) -> list[str]:
        return list(self.meta.get("categories", []))

    @property
    def objectives(self) -> list[dict[str, str]]:
        return list(self.meta.get("objectives") or [{"metric": "aupro", "mode": "max"}])

    @property
    def metric(self) -> str:
        return self.objectives[0]["metric"]

    @property
    def mode(self) -> str:
        return self.objectives[0]["mode"]

    @property
    def final(self) -> dict[str, Any] | None:
        """run.json's ``final`` section (:func:`search.finalize.finalize_run`), or None before finalising."""
        return self.meta.get("final") or None

    @property
    def protocol(self) -> str:
        """How the trials were ranked: "holdout", "synthetic", "few_shot" (on a validation set) or "test" (on the
        test set; also a run from before selection)."""
        return (self.final or {}).get("protocol") or (self.meta.get("selection") or {}).get("protocol") or "test"

    @property
    def part(self) -> str:
        """What the trial table's figures were measured on, e.g. "validation part", "synthetic validation set",
        "test set"."""
        return measured_on(self.protocol)

    def record(self, trial_id: str) -> dict[str, Any]:
        return next((r for r in self.records if r["trial_id"] == trial_id), {})

    def config(self, trial_id: str) -> dict[str, Any] | None:
        """The trial's configuration (recorded by the trial, else rebuilt from its parameters)."""
        record = self.record(trial_id)
        if record.get("config"):
            return record["config"]
        if self.space is not None and record.get("params"):
            try:
                return trial_config(self.space, record["params"])
            except Exception:  # noqa: BLE001 - a record from another space version: show what we have
                return None
        return None


def load_run(run_path: str | Path) -> RunData:
    """Read a run folder (tolerates a search still writing it)."""
    run = RunDir.open(run_path)
    meta = run.read_meta()
    records = run.records()
    data = RunData(path=run.path, meta=meta, records=records, df=prepare(collate(records, meta)))
    try:
        data.space = run.space()
    except Exception as exc:  # noqa: BLE001 - the dashboard still renders without the space
        data.space_error = f"{type(exc).__name__}: {exc}"
    return data


def space_distributions(data: RunData) -> dict[str, optuna.distributions.BaseDistribution]:
    """The Optuna distribution of every parameter of the run's space ({} without a usable space)."""
    try:
        return distributions(data.space) if data.space is not None else {}
    except Exception:  # noqa: BLE001
        return {}


def prepare(df: pd.DataFrame) -> pd.DataFrame:
    """The trial table with a 1-based trial number in start order and numeric metric columns."""
    df = df.copy()
    if "number" not in df:
        df.insert(0, "number", np.arange(1, len(df) + 1))
    for column in df.columns:
        if column in NUMERIC_COLUMNS or "/" in column:
            df[column] = pd.to_numeric(df[column], errors="coerce")
    return df


def missing(value: Any) -> bool:
    """None or NaN (a cell the table leaves empty)."""
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def params_of(row: Mapping[str, Any]) -> dict[str, Any]:
    """A table row's Optuna parameters (``param.<name>`` columns that are set)."""
    return {k[len("param."):]: v for k, v in row.items() if k.startswith("param.") and not missing(v)}


def with_value(df: pd.DataFrame, status: str, metric: str) -> pd.DataFrame:
    """The trials of `status` that have a value of `metric`."""
    if df.empty or metric not in df:
        return df.iloc[0:0]
    return df[(df["status"] == status) & df[metric].notna()]


def status_counts(df: pd.DataFrame) -> dict[str, int]:
    """Trials per status: the known statuses in display order, then any other."""
    counts = df["status"].value_counts().to_dict() if not df.empty else {}
    return {s: int(counts.get(s, 0)) for s in (*STATUS_ORDER, *sorted(set(counts) - set(STATUS_ORDER)))}


def top_trials(df: pd.DataFrame, metric: str, mode: str, n: int = TOP_N) -> pd.DataFrame:
    """The n best completed trials by `metric` (ties keep start order)."""
    done = with_value(prepare(df), COMPLETED, metric)
    return done.sort_values(metric, ascending=mode == "min", kind="stable").head(n)


def wall_seconds(meta: Mapping[str, Any], now: float | None = None) -> float | None:
    """Time spent searching: the finished segments, plus the current one while the run is running."""
    done = float(meta.get("wall_seconds") or 0.0)
    if meta.get("status") == "running" and meta.get("last_start"):
        return done + (now or time.time()) - float(meta["last_start"])
    return done or None


def error_line(text: Any) -> str:
    """The telling line of an error text: the message itself, not a traceback header."""
    if missing(text) or not str(text).strip():
        return ""
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    first = lines[0]
    if first.startswith(("Traceback", "Failure #")) and len(lines) > 1:
        first = next((line for line in reversed(lines) if not line.startswith(("File ", "^", "~"))), lines[-1])
    return first[:300]


def example_category(best: Mapping[str, Any], categories: Sequence[str], metric: str = "aupro") -> tuple[str, str]:
    """The category where the trial was worst by `metric` (its weak spot), with why; else the first one."""
    scored = [(best.get(f"{c}/{metric}"), c) for c in categories if not missing(best.get(f"{c}/{metric}"))]
    if scored:
        value, category = min(scored)
        return category, f"the category where this trial is worst ({metric} {value:.3f})"
    return categories[0], "the first category of the fidelity order"


# ----------------------------------------------------------------------------------------------- selection


def has_validation(protocol: str) -> bool:
    """Whether the trials were ranked on a validation set apart from the real test part (every protocol but test)."""
    return protocol != "test"


def short_words(words: str) -> str:
    """A few words of :func:`selected_on` / :func:`reported_on`, without "the " and the parenthesis."""
    return words.removeprefix("the ").split(" (")[0]


def measured_on(protocol: str) -> str:
    """What a run's trials were ranked (and their table figures measured) on, in a few words, e.g.
    "validation part", "synthetic validation set", "test set"."""
    return short_words(selected_on(protocol))


def reported_part(protocol: str) -> str:
    """What a run's final figures are measured on, in a few words, e.g. "test part", "real test images"."""
    return short_words(reported_on(protocol))


def tied_with_best(final: Mapping[str, Any]) -> list[str]:
    """The finalised trials whose difference with the best holds 0, the best itself left out."""
    return [t["trial_id"] for t in final.get("trials", [])
            if t.get("tied") and t["trial_id"] != t.get("compared_with", final.get("best_by_search"))]


def final_table(final: Mapping[str, Any], metric: str) -> pd.DataFrame:
    """One row per finalised trial in search-rank order: trial_id, search_rank, chosen, tied and, per part
    of ``final["parts"]``, the value of `metric` with its interval (``<part>``, ``<part>_low``, ``<part>_high``;
    NaN when missing)."""
    tied = set(tied_with_best(final))
    rows = []
    for trial in sorted(final.get("trials", []), key=lambda t: t.get("search_rank", math.inf)):
        row = {"trial_id": trial["trial_id"], "search_rank": trial.get("search_rank"),
               "chosen": trial["trial_id"] == final.get("chosen"), "tied": trial["trial_id"] in tied}
        for part in final.get("parts", []):
            low, high = (trial.get(f"{part}_interval") or {}).get(metric) or (None, None)
            row.update({part: (trial.get(part) or {}).get(metric), f"{part}_low": low, f"{part}_high": high})
        rows.append(row)
    df = pd.DataFrame(rows)
    numeric = [c for c in df.columns if c not in ("trial_id", "chosen", "tied")]
    df[numeric] = df[numeric].apply(pd.to_numeric, errors="coerce")
    return df


MIN_AGREEMENT_TRIALS = 3


def rank_agreement(x: Sequence[float], y: Sequence[float]) -> tuple[float, float] | None:
    """Kendall's tau and Spearman's rho of paired values (:mod:`scipy.stats`); None with fewer than
    :data:`MIN_AGREEMENT_TRIALS` pairs (NaN where the values do not vary)."""
    if len(x) < MIN_AGREEMENT_TRIALS:
        return None
    from scipy.stats import kendalltau, spearmanr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a constant input: NaN, said in the title
        return float(kendalltau(x, y).statistic), float(spearmanr(x, y).statistic)


# ----------------------------------------------------------------------------------------------- quality vs cost


def quality_and_cost(objectives: Iterable[Mapping[str, str]]) -> tuple[tuple[str, str], tuple[str, str]]:
    """The Pareto axes: the first quality objective (else aupro) and the first cost objective (else ms_per_image)."""
    objectives = list(objectives)
    quality = next(((o["metric"], o["mode"]) for o in objectives if o["metric"] in QUALITY_METRICS), ("aupro", "max"))
    cost = next(((o["metric"], o["mode"]) for o in objectives if o["metric"] in COST_METRICS), ("ms_per_image", "min"))
    return quality, cost


def pareto_mask(quality: Sequence[float], cost: Sequence[float], quality_mode: str = "max",
                cost_mode: str = "min") -> np.ndarray:
    """True where no other point is at least as good on both axes and better on one."""
    q = np.asarray(quality, dtype=float) * (1 if quality_mode == "max" else -1)
    c = np.asarray(cost, dtype=float) * (1 if cost_mode == "min" else -1)
    keep = np.ones(len(q), dtype=bool)
    for i in range(len(q)):
        dominated = (q >= q[i]) & (c <= c[i]) & ((q > q[i]) | (c < c[i]))
        keep[i] = not dominated.any()
    return keep


# ----------------------------------------------------------------------------------------------- the study


@dataclass
class ImportanceSet:
    """Importances of some parameters over a subset of the complete trials."""

    label: str
    n_trials: int
    importances: dict[str, float] = field(default_factory=dict)


def load_study(meta: Mapping[str, Any]) -> optuna.Study:
    """The run's Optuna study in whichever storage run.json records (read only; a missing sqlite or journal
    file is an error, not a new empty study)."""
    return run_storage(meta).load_study(meta["study_name"])


def param_importances(study: optuna.Study, objective_index: int = 0,
                      evaluator: optuna.importance.BaseImportanceEvaluator | None = None,
                      min_trials: int = MIN_IMPORTANCE_TRIALS) -> tuple[list[ImportanceSet], list[str]]:
    """fANOVA importances over the complete trials, on the parameters each set of trials shares.

    The space is conditional (a head's settings exist only in that head's trials), and Optuna's
    evaluators need parameters every assessed trial has. So: one set over all complete trials on the
    parameters they all have (backbone, head, ...), then one set per head and per backbone over that
    subset's trials on the parameters those share (e.g. the head's settings, the backbone's layers).
    Parameters with one value in a set are left out. Returns the sets and notes on skipped ones.
    """
    from optuna.trial import TrialState

    def target_value(trial: optuna.trial.FrozenTrial) -> float:
        values = trial.values or []
        return float(values[objective_index]) if len(values) > objective_index and values[objective_index] is not None else math.nan

    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if math.isfinite(target_value(t))]
    if len(complete) < min_trials:
        return [], [f"{len(complete)} complete trial{'s' if len(complete) != 1 else ''} in the study; "
                    f"parameter importance needs at least {min_trials}."]
    subsets: list[tuple[str, list[optuna.trial.FrozenTrial]]] = [(f"all {len(complete)} complete trials", complete)]
    for key in ("head", "backbone"):
        for value in sorted({str(t.params[key]) for t in complete if key in t.params}):
            members = [t for t in complete if str(t.params.get(key)) == value]
            if len(members) < len(complete):
                subsets.append((f"{key} = {value}: {len(members)} trials", members))
    sets, notes = [], []
    for label, members in subsets:
        if len(members) < min_trials:
            notes.append(f"{label}: too few for importance")
            continue
        common = set.intersection(*(set(t.params) for t in members))
        varying = sorted(p for p in common if len({repr(t.params[p]) for t in members}) > 1)
        if not varying:
            notes.append(f"{label}: no parameter varies")
            continue
        numbers = {t.number for t in members}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                importances = optuna.importance.get_param_importances(
                    study, evaluator=evaluator or optuna.importance.FanovaImportanceEvaluator(seed=0), params=varying,
                    target=lambda t: target_value(t) if t.number in numbers else math.nan)
        except Exception as exc:  # noqa: BLE001 - one set failing must not hide the others
            notes.append(f"{label}: {type(exc).__name__}: {exc}")
            continue
        if not all(math.isfinite(v) for v in importances.values()):
            notes.append(f"{label}: the objective does not vary")
            continue
        sets.append(ImportanceSet(label, len(members), dict(importances)))
    return sets, notes


def run_importances(data: RunData) -> tuple[list[ImportanceSet], list[str]]:
    """:func:`param_importances` of the run's first objective; a note when the study cannot be read."""
    try:
        return param_importances(load_study(data.meta), objective_index=0)
    except Exception as exc:  # noqa: BLE001 - no study (yet), another storage unreachable, ...
        return [], [f"the Optuna study could not be read: {type(exc).__name__}: {exc}"]
