"""The end of a search: the chosen configurations evaluated once on the test part, with intervals and ties.

During a holdout search (``selection.protocol: holdout``, :mod:`anoseg.holdout`) every trial is ranked on
the validation part of each category's test images. :func:`finalize_run` (run when a search finishes, or by
``anoseg search finalize RUN`` for a stopped or resumed run) then takes the top ``selection.top_k`` completed
trials by the first objective (and, with several objectives, the Pareto set), fits each once more (features
from the cache) and scores every test image (:func:`anoseg.assess.assess_config`):

- the validation figures with bootstrap intervals (``selection.bootstrap`` resamples, paired across
  trials), and each trial's paired difference with the best: a trial whose difference interval holds 0 is
  *tied* with the best;
- the chosen trial: the best, or with ``prefer: cheapest_tied`` the tied trial with the lowest ms_per_image
  (the one-standard-error rule);
- the test figures (and intervals) of every finalised trial: the only figures of the run measured on images
  that chose nothing.

With ``protocol: test`` the one part is the test set the trials were ranked on: the intervals and ties are
computed there and every output says "selected on the test set".

The result goes to run.json (``final``), each finalised trial's record (``final``), trials.parquet
(``test/<metric>`` columns, ``tied``, interval columns) and from there to status, export and the dashboard.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from anoseg.errors import AnosegError
from anoseg.holdout import TEST, VALIDATION, Protocol
from anoseg.metrics import QUALITY_METRICS
from search.run_dir import COMPLETED, RunDir

__all__ = ["FinalizeError", "finalize_run", "run_selection", "ranked_records", "pareto_front", "selected_on", "reported_on"]

Progress = Callable[[str], None]


class FinalizeError(AnosegError):
    """Nothing to finalise (no completed trial), or the run cannot be finalised as asked."""


def run_selection(meta: Mapping[str, Any], space: Any) -> dict[str, Any]:
    """The selection a run was started with: run.json's (a run from before the protocols ranked on the test
    set: protocol test), the space's settings filling in the rest."""
    recorded = dict(meta.get("selection") or {"protocol": "test"})
    recorded.pop("split", None)
    return {**space.selection, **recorded}


SELECTED_ON = {"holdout": "the validation part", "test": "the test set",
               "synthetic": "the synthetic validation set (generated defects on held-out good images)",
               "few_shot": "the few-shot validation set (a few real defects per type + generated defects)"}
REPORTED_ON = {"holdout": "the test part (never used to choose)", "test": "the test set (selected on the test set)",
               "synthetic": "the real test images (never used to choose)",
               "few_shot": "the remaining real test images (never used to choose)"}


def selected_on(protocol: str) -> str:
    """What a run's trials were ranked on, in words."""
    return SELECTED_ON[protocol]


def reported_on(protocol: str) -> str:
    """What a run's final figures are measured on, in words."""
    return REPORTED_ON[protocol]


def _value(record: Mapping[str, Any], name: str) -> float | None:
    value = (record.get("metrics") or {}).get(name)
    return None if value is None or (isinstance(value, float) and np.isnan(value)) else float(value)


def ranked_records(records: Sequence[Mapping[str, Any]], metric: str, mode: str) -> list[Mapping[str, Any]]:
    """The completed trials (duplicates counted once) with `metric`, best first."""
    done = [r for r in records if r.get("status") == COMPLETED and not r.get("duplicate_of")
            and _value(r, metric) is not None]
    return sorted(done, key=lambda r: -_value(r, metric) if mode == "max" else _value(r, metric))


def pareto_front(records: Sequence[Mapping[str, Any]], objectives: Sequence[Mapping[str, str]]
                 ) -> list[Mapping[str, Any]]:
    """The non-dominated records (every objective present), in the given order."""
    def key(rec: Mapping[str, Any]) -> tuple[float, ...] | None:
        values = [_value(rec, o["metric"]) for o in objectives]
        if any(v is None for v in values):
            return None
        return tuple(-v if o["mode"] == "max" else v for v, o in zip(values, objectives))  # minimise all

    keyed = [(rec, key(rec)) for rec in records]
    keyed = [(rec, k) for rec, k in keyed if k is not None]
    return [rec for rec, k in keyed
            if not any(all(a <= b for a, b in zip(other, k)) and other != k for _, other in keyed)]


def finalize_run(run: RunDir, *, top_k: int | None = None, progress: Progress = print) -> dict[str, Any]:
    """Evaluate the chosen trials of `run` on the test part (see the module docstring); returns ``final``."""
    from anoseg import bootstrap
    from anoseg.assess import assess_config
    from anoseg.cache import FeatureCache

    started = time.perf_counter()
    meta, space = run.read_meta(), run.space()
    selection = run_selection(meta, space)
    protocol = selection["protocol"]
    plan = None if protocol == "test" else Protocol.from_selection(selection)
    objectives = list(meta["objectives"])
    primary = objectives[0]
    ranked = ranked_records(run.records(), primary["metric"], primary["mode"])
    if not ranked:
        raise FinalizeError(f"{run.path}: no completed trial to finalise (a trial completes when it has evaluated "
                            "every category); see `anoseg search status`")
    k = top_k or int(selection["top_k"])
    candidates = list(ranked[:k])
    front = pareto_front(ranked, objectives) if len(objectives) > 1 else []
    candidates += [r for r in front if r not in candidates]
    wanted = [o["metric"] for o in objectives if o["metric"] in QUALITY_METRICS]
    n_boot, level = int(selection["bootstrap"]), float(selection["level"])
    cache = FeatureCache(meta.get("cache_dir"), max_bytes=int(space.cache["max_gb"] * 2**30))
    rank_part = VALIDATION if protocol != "test" else TEST
    progress(f"finalising {len(candidates)} trial(s) of {run.path}: ranked on {selected_on(protocol)}, "
             f"reported on {reported_on(protocol)}; {n_boot} bootstrap resamples")
    assessed: dict[str, Any] = {}
    for rec in candidates:
        progress(f"{rec['trial_id']}: fitting and scoring every test image")
        assessed[rec["trial_id"]] = assess_config(rec["config"], meta["data_root"], meta["categories"],
                                                  plan, wanted, n_boot, int(selection["seed"]), cache,
                                                  progress)
    bootstrap_seconds = sum(c.bootstrap_seconds for a in assessed.values() for c in a.values())

    def part_mean(tid: str, part: str) -> dict[str, float]:
        """The quality metrics' means over categories (the costs are the search's, measured alike for all)."""
        per_category = [c.parts[part].metrics for c in assessed[tid].values()]
        return {m: float(np.mean([p[m] for p in per_category])) for m in per_category[0]}

    def part_replicates(tid: str, part: str, metric: str) -> np.ndarray | None:
        if not n_boot or metric not in wanted:
            return None
        return bootstrap.mean_over_categories([c.parts[part].replicates[metric] for c in assessed[tid].values()])

    first = next(iter(assessed.values()))  # every trial has the same parts: they depend on the data only
    parts = [p for p in (VALIDATION, TEST) if all(p in c.parts for c in first.values())]
    notes = sorted({f"{category}: {note}" for category, c in first.items() for note in c.notes})
    if TEST not in parts and protocol != "test":
        notes.append("no test figures: not every category has both good and defective real test images to "
                     "report on (the choice rests on the validation set alone)")
    trials: dict[str, dict[str, Any]] = {}
    for rec in candidates:
        tid = rec["trial_id"]
        entry: dict[str, Any] = {"trial_id": tid, "search_rank": ranked.index(rec) + 1}
        for part in parts:
            entry[part] = part_mean(tid, part)
            entry[f"{part}_per_category"] = {c: a.parts[part].metrics for c, a in assessed[tid].items()}
            entry[f"{part}_interval"] = {m: list(bootstrap.interval(reps, level)) for m in wanted
                                         if (reps := part_replicates(tid, part, m)) is not None}
        entry["seg_threshold"] = {c: {"value": a.seg_threshold, "method": a.seg_threshold_method}
                                  for c, a in assessed[tid].items()}
        trials[tid] = entry

    ties = _ties(trials, candidates, rank_part, primary, wanted, n_boot, level, part_replicates)
    for tid, tie in ties.items():
        trials[tid].update(tie)
    chosen = _choose(candidates, trials, selection["prefer"], primary)
    final = {
        "protocol": protocol,
        "selected_on": selected_on(protocol),
        "reported_on": reported_on(protocol),
        "objective": primary,
        "objectives": objectives,
        "prefer": selection["prefer"],
        "chosen": chosen,
        "best_by_search": ranked[0]["trial_id"],
        "pareto": [r["trial_id"] for r in front],
        "bootstrap": n_boot,
        "level": level,
        "parts": parts,
        "notes": notes,
        "trials": [trials[r["trial_id"]] for r in candidates],
        "seconds": round(time.perf_counter() - started, 3),
        "bootstrap_seconds": round(bootstrap_seconds, 3),
        "finalized": time.time(),
    }
    for tid, entry in trials.items():
        run.update_record(tid, final={**entry, "chosen": tid == chosen, "protocol": protocol})
    for record in run.records():  # finalised before (another top_k): no longer part of the verdict
        if record.get("final") and record["trial_id"] not in trials:
            run.update_record(record["trial_id"], final=None)
    run.update_meta(final=final)
    run.write_table()
    return final


def _ties(trials: Mapping[str, dict[str, Any]], candidates: Sequence[Mapping[str, Any]], part: str,
          primary: Mapping[str, str], wanted: Sequence[str], n_boot: int, level: float,
          part_replicates: Callable[[str, str, str], np.ndarray | None]) -> dict[str, dict[str, Any]]:
    """Each trial's paired difference with the best on `part` (the primary objective) and whether it is tied."""
    from anoseg import bootstrap

    metric = primary["metric"]
    if not n_boot or metric not in wanted:
        return {r["trial_id"]: {"tied": None} for r in candidates}
    replicates = {r["trial_id"]: part_replicates(r["trial_id"], part, metric) for r in candidates}
    point = {tid: trials[tid][part][metric] for tid in replicates}
    compared = bootstrap.compare(replicates, primary["mode"], point, level)
    best = next(c.trial for c in compared if c.best)
    return {c.trial: {"tied": bool(c.tied), "difference_interval": [c.diff_low, c.diff_high], "compared_with": best}
            for c in compared}


def _choose(candidates: Sequence[Mapping[str, Any]], trials: Mapping[str, Mapping[str, Any]], prefer: str,
            primary: Mapping[str, str]) -> str:
    """The search's best, or with cheapest_tied the tied trial with the lowest ms_per_image (as the search
    measured it)."""
    if prefer != "cheapest_tied":
        return candidates[0]["trial_id"]
    tied = [r for r in candidates if trials[r["trial_id"]].get("tied")] or [candidates[0]]
    return min(tied, key=lambda r: (_value(r, "ms_per_image") or float("inf"), candidates.index(r)))["trial_id"]
