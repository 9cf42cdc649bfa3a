"""Export a search run's best configuration(s) as YAML: `anoseg export RUN --out best.yaml`.

Only COMPLETED trials (every category evaluated) count. Three kinds of file:

* one objective (the run's, or ``--objective`` / ``--mode``): the best trial. The TrialConfig
  fields sit at the top level, followed by three information sections, ``provenance`` (run name and
  path, trial id, study name, objective and value, data root, categories, anoseg version, date),
  ``selection`` (the protocol, its validation share and seed: ``anoseg fit`` chooses its thresholds on the
  same validation part) and ``metrics`` (``measured_on``, ``mean`` and ``per_category``: the figures the
  search ranked on; once the run is finalised (:mod:`search.finalize`) also ``interval``, ``tied_with_best``
  and ``test``: the test part's figures with their intervals)::

      backbone: {name: tf_efficientnet_lite1, weights: offline}
      layers: [blocks.1, blocks.2]
      image_size: 128
      head: {name: padim, n_features: 124}
      batch_size: 16
      seed: 0
      device: auto
      provenance: {...}
      selection: {protocol: holdout, validation_share: 0.5, seed: 0, ...}
      metrics: {measured_on: the validation part, mean: {...}, per_category: {...}, interval: {...},
                tied_with_best: true, test: {measured_on: the test part ..., mean: {...}, interval: {...}}}

  With a finalised run and the run's objective, the trial is the finalised choice (``selection.prefer``).

* ``--per-category``: the best trial of each category by ``<category>/<metric>`` under
  ``categories: {<category>: <configuration as above>}`` (plus a top-level ``provenance``);
* several objectives in the run (and no ``--objective``): the Pareto set, the completed trials no
  other completed trial dominates, best first by the first objective, under ``pareto: [...]``.

``anoseg fit`` / ``anoseg evaluate`` read every kind (:func:`anoseg.exported.read_exported`): the
information sections are skipped, a per-category file takes ``--category``, a Pareto file ``--trial``.
"""
from __future__ import annotations

import datetime as _dt
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import anoseg
from anoseg.config import TrialConfig
from anoseg.errors import ConfigError
from anoseg.exported import write_exported
from anoseg.metrics import CATEGORY_METRICS, METRIC_NAMES, MODES, metric as metric_info
from search.finalize import reported_on, selected_on
from search.run_dir import COMPLETED, RunDir, RunError
from search.storage import mask


@dataclass
class ExportResult:
    """What `export_run` wrote: the file, its kind, the chosen trial ids and a human summary."""

    path: Path
    kind: str  # single | per_category | pareto
    objectives: list[dict[str, str]]
    trials: list[str]
    document: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return "\n".join(self.notes)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def measured_metrics(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """The metrics with a value in at least one of `records` (mean metrics), in the metric list's order."""
    return [m for m in METRIC_NAMES if any(_number((r.get("metrics") or {}).get(m)) is not None for r in records)]


def _objectives(meta: Mapping[str, Any], objective: str | None, mode: str | None,
                measured: list[str], run: RunDir) -> list[dict[str, str]]:
    if mode is not None and mode not in MODES:
        raise ConfigError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if objective is None:
        objs = [dict(o) for o in meta.get("objectives") or []]
        if not objs:
            raise RunError(f"{run.path}/run.json names no objective; pass --objective METRIC")
        if mode is not None:
            if len(objs) > 1:
                raise ConfigError("--mode needs --objective when the run has several objectives")
            objs[0]["mode"] = mode
    else:
        objs = [{"metric": objective, "mode": mode or (metric_info(objective).mode if objective in METRIC_NAMES else "max")}]
    for o in objs:
        if o["metric"] not in METRIC_NAMES:
            raise ConfigError(f"objective {o['metric']!r} is not a metric; measured in {run.path}: "
                              f"{', '.join(measured) or 'none'}")
        if o["metric"] not in measured:
            raise ConfigError(f"objective {o['metric']!r} was never measured in {run.path}; "
                              f"measured metrics: {', '.join(measured) or 'none'}")
    return objs


def _better(a: float, b: float, mode: str) -> bool:
    return a > b if mode == "max" else a < b


def best_record(records: Sequence[Mapping[str, Any]], metric: str, mode: str,
                category: str | None = None) -> Mapping[str, Any] | None:
    """The record with the best value of `metric` (mean, or of `category`); the earliest on ties."""
    best, best_value = None, None
    for rec in records:
        source = (rec.get("per_category") or {}).get(category, {}) if category else rec.get("metrics") or {}
        value = _number(source.get(metric))
        if value is not None and (best_value is None or _better(value, best_value, mode)):
            best, best_value = rec, value
    return best


def pareto_records(records: Sequence[Mapping[str, Any]], objectives: Sequence[Mapping[str, str]]) -> list[Mapping[str, Any]]:
    """Records no other record dominates (no worse in every objective, better in one), best first by the
    first objective. Records missing an objective value are left out."""
    def key(rec: Mapping[str, Any]) -> tuple[float, ...] | None:
        values = [_number((rec.get("metrics") or {}).get(o["metric"])) for o in objectives]
        if any(v is None for v in values):
            return None
        return tuple(-v if o["mode"] == "max" else v for v, o in zip(values, objectives))  # minimise all

    scored = [(rec, k) for rec in records if (k := key(rec)) is not None]
    front = [
        (rec, k) for rec, k in scored
        if not any(all(x <= y for x, y in zip(other, k)) and any(x < y for x, y in zip(other, k))
                   for _, other in scored)
    ]
    return [rec for rec, _ in sorted(front, key=lambda item: item[1])]


def trial_configuration(run: RunDir, record: Mapping[str, Any]) -> dict[str, Any]:
    """The TrialConfig dict of a record: its stored `config`, else rebuilt from its parameters."""
    source = str(run.record_path(record["trial_id"]))
    raw = record.get("config")
    if not raw:
        from search.space_optuna import trial_config

        raw = trial_config(run.space(), record.get("params") or {})
    return TrialConfig.from_dict(raw, source=source, check_registries=False).to_dict()


def _metrics_section(record: Mapping[str, Any], protocol: str, category: str | None = None) -> dict[str, Any]:
    """The search's figures (``measured_on`` says which images) and, once finalised, the test part's with the
    bootstrap intervals and whether the trial is tied with the best."""
    per_category = {c: dict(m) for c, m in (record.get("per_category") or {}).items()}
    mean = {k: v for k, v in (record.get("metrics") or {}).items() if v is not None}
    section: dict[str, Any] = {"measured_on": selected_on(protocol)}
    if category is not None:
        section["category"] = dict(per_category.get(category, {}))
    section.update(mean=mean, per_category=per_category)
    final = record.get("final")
    if final:
        if final.get("validation_interval"):
            section["interval"] = final["validation_interval"]
        section["tied_with_best"] = final.get("tied")
        if protocol != "test" and final.get("test"):
            section["test"] = {"measured_on": reported_on(protocol), "mean": final["test"],
                               "per_category": final.get("test_per_category"),
                               "interval": final.get("test_interval") or {}}
        elif final.get("test_interval"):
            section["interval"] = final["test_interval"]
    return section


def _selection(meta: Mapping[str, Any]) -> dict[str, Any]:
    """How the run chose: what ``anoseg fit`` needs to choose its thresholds on the same validation part."""
    selection = dict(meta.get("selection") or {"protocol": "test"})
    selection.pop("split", None)
    return {**selection, "selected_on": selected_on(selection["protocol"]),
            "reported_on": reported_on(selection["protocol"])}


def _provenance(run: RunDir, meta: Mapping[str, Any], now: str) -> dict[str, Any]:
    return {
        "run": meta.get("name", run.path.name),
        "run_path": str(run.path.resolve()),
        "study_name": meta.get("study_name"),
        "storage": mask(meta.get("storage")),  # run.json's is masked already; an old run's might not be
        "data_root": meta.get("data_root"),
        "categories": list(meta.get("categories") or []),
        "anoseg_version": anoseg.__version__,
        "exported": now,
    }


def _entry(run: RunDir, meta: Mapping[str, Any], record: Mapping[str, Any], objectives: list[dict[str, str]],
           now: str, category: str | None = None, rank: int | None = None) -> dict[str, Any]:
    values = {}
    for o in objectives:
        source = (record.get("per_category") or {}).get(category, {}) if category else record.get("metrics") or {}
        values[o["metric"]] = source.get(o["metric"])
    provenance = {
        **_provenance(run, meta, now),
        "trial_id": record["trial_id"],
        "trial_status": record.get("status"),
        "objective": [{**o, "value": values[o["metric"]],
                       "of": f"category {category}" if category else "mean over categories"} for o in objectives],
        "params": dict(record.get("params") or {}),
    }
    if rank is not None:
        provenance["pareto_rank"] = rank
    protocol = _selection(meta)["protocol"]
    return {**trial_configuration(run, record), "provenance": provenance, "selection": _selection(meta),
            "metrics": _metrics_section(record, protocol, category)}


def _describe(record: Mapping[str, Any], category: str | None = None) -> str:
    cfg = record.get("config") or {}
    head = dict(cfg.get("head") or {})
    name = head.pop("name", (record.get("params") or {}).get("head", "?"))
    settings = ", ".join(f"{k}={v}" for k, v in head.items())
    backbone = (cfg.get("backbone") or {}).get("name", (record.get("params") or {}).get("backbone", "?"))
    layers = "+".join(cfg.get("layers") or [])
    source = (record.get("per_category") or {}).get(category, {}) if category else record.get("metrics") or {}
    metrics = ", ".join(f"{k} {source[k]:.4g}" for k in CATEGORY_METRICS if _number(source.get(k)) is not None)
    return f"{record['trial_id']}: {backbone} [{layers}] {name}({settings}) | {metrics}"


def _selection_notes(run: RunDir, meta: Mapping[str, Any]) -> list[str]:
    protocol = _selection(meta)["protocol"]
    if protocol == "test":
        return ["note: selected on the test set (selection.protocol: test): its figures are optimistic; "
                "selection.protocol: holdout reports on images that chose nothing"]
    if not meta.get("final"):
        return [f"note: the run is not finalised, so its figures are the validation part's only; "
                f"`anoseg search finalize {run.path}` adds the test part's"]
    return []


def export_run(run_path: str | Path, out: str | Path, objective: str | None = None, mode: str | None = None,
               per_category: bool = False) -> ExportResult:
    """Write the best configuration(s) of the run at `run_path` to `out` (YAML); see the module docstring."""
    run = RunDir.open(run_path)
    meta = run.read_meta()
    records = run.records()
    completed = [r for r in records if r.get("status") == COMPLETED]
    if not completed:
        counts: dict[str, int] = {}
        for r in records:
            counts[r.get("status", "?")] = counts.get(r.get("status", "?"), 0) + 1
        have = ", ".join(f"{n} {s}" for s, n in counts.items()) or "no trials"
        raise RunError(f"{run.path} has no completed trial ({have}); only trials that evaluated every category "
                       f"are exported: let the search finish or `anoseg search resume {run.path}`")
    measured = measured_metrics(completed)
    objectives = _objectives(meta, objective, mode, measured, run)
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    out = Path(out)
    notes: list[str] = []
    run_name = meta.get("name", run.path.name)

    if per_category:
        single = objectives[:1]
        if len(objectives) > 1:
            notes.append(f"note: the run has {len(objectives)} objectives; --per-category ranks by the first, "
                         f"{single[0]['metric']} ({single[0]['mode']}); pass --objective to choose another")
        metric, how = single[0]["metric"], single[0]["mode"]
        entries: dict[str, Any] = {}
        for category in meta.get("categories") or []:
            rec = best_record(completed, metric, how, category)
            if rec is None:
                notes.append(f"note: no completed trial has {category}/{metric}; category {category} left out")
                continue
            entries[category] = _entry(run, meta, rec, single, now, category=category)
            notes.append(f"  {category}: {_describe(rec, category)}")
        if not entries:
            raise RunError(f"no completed trial of {run.path} measured {metric} per category")
        document = {"categories": entries,
                    "provenance": {**_provenance(run, meta, now), "per_category": True,
                                   "objective": single}}
        kind, trials = "per_category", [e["provenance"]["trial_id"] for e in entries.values()]
        header = [f"anoseg export: the best trial per category of run {run_name} ({run.path}) by "
                  f"<category>/{metric} ({how}), completed trials only",
                  "use: anoseg fit --config THIS --category CATEGORY --data DATA"]
        notes.insert(0, f"exported the best trial of each of {len(entries)} categories by {metric} ({how}) to {out}")
        objectives = single
    elif len(objectives) > 1:
        front = pareto_records(completed, objectives)
        items = [_entry(run, meta, rec, objectives, now, rank=i) for i, rec in enumerate(front)]
        document = {"pareto": items,
                    "provenance": {**_provenance(run, meta, now), "pareto": True, "objective": objectives}}
        kind, trials = "pareto", [r["trial_id"] for r in front]
        text = ", ".join(f"{o['metric']} ({o['mode']})" for o in objectives)
        header = [f"anoseg export: the Pareto set of run {run_name} ({run.path}) over {text}: "
                  f"{len(front)} non-dominated completed trials, best first by {objectives[0]['metric']}",
                  "use: anoseg fit --config THIS --trial TRIAL_ID --category CATEGORY --data DATA"]
        notes.append(f"the run has {len(objectives)} objectives ({text}): exported the Pareto set of "
                     f"{len(front)} of {len(completed)} completed trials to {out} (a list under `pareto:`; "
                     f"pick one with --trial ID, or export a single best with --objective METRIC)")
        notes.extend(f"  {_describe(rec)}" for rec in front)
    else:
        o = objectives[0]
        final = meta.get("final")
        rec = best_record(completed, o["metric"], o["mode"])
        if final and o == final["objective"]:  # the finalised choice (prefer: cheapest_tied may pick a tied one)
            rec = next((r for r in completed if r["trial_id"] == final["chosen"]), rec)
        if rec is None:  # pragma: no cover - measured_metrics guarantees a value
            raise RunError(f"no completed trial of {run.path} has {o['metric']}")
        document = _entry(run, meta, rec, objectives, now)
        kind, trials = "single", [rec["trial_id"]]
        value = (rec.get("metrics") or {}).get(o["metric"])
        header = [f"anoseg export: the best completed trial of run {run_name} ({run.path}): trial "
                  f"{rec['trial_id']}, {o['metric']} ({o['mode']}) {value:.6g} of {len(completed)} completed trials",
                  "use: anoseg fit --config THIS --category CATEGORY --data DATA   or   "
                  "anoseg evaluate --config THIS --data DATA"]
        notes.append(f"exported trial {rec['trial_id']} of run {run_name}, best of {len(completed)} completed "
                     f"trials by {o['metric']} ({o['mode']}), to {out}")
        notes.append(f"  {_describe(rec)}")
    notes.extend(_selection_notes(run, meta))
    header.append(f"selected on {_selection(meta)['selected_on']}; reported on {_selection(meta)['reported_on']}")
    header.append("the provenance, selection and metrics sections are information only: anoseg's loaders skip them")
    write_exported(out, document, header)
    return ExportResult(out, kind, objectives, trials, document, notes)
