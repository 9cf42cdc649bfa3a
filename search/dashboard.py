"""The run dashboard: one self-contained HTML file per search run, readable offline.

``write_dashboard(run_path)`` renders ``<run>/dashboard.html`` from the run folder (run.json, the trial
records, space.yaml and the Optuna study) at any time, also while the search runs. plotly.js is
embedded once, in the page head; every figure is a ``<section>`` with an id (:data:`SECTION_IDS`):

* ``summary``: run name, data root, categories in fidelity order, objectives, trials by status,
  wall time, the best trial with its configuration and metrics;
* ``history``: the objective per trial in start order with the best-so-far line (completed trials;
  trials stopped early greyed with their partial mean);
* ``parallel``: parallel coordinates over backbone, layers, head and head settings, coloured by the
  objective (completed trials);
* ``importance``: Optuna's fANOVA parameter importance on the study, over the parameters every
  complete trial has and per head / per backbone subset;
* ``pareto``: quality vs cost (the first quality objective, default aupro, vs ms per image), the
  non-dominated trials highlighted;
* ``heatmap``: pixel AUPRO per category of the top 10 completed trials;
* ``comparison``: the objective per backbone and per head;
* ``failures``: failed / crashed / lost trials with their error;
* ``examples``: anomaly maps of the best trial on one category (:mod:`search.examples`).

Each figure is built by one function taking the trial table (``RunDir.table()``) and returning a
``go.Figure``; with nothing to show it returns a figure holding a note. No Ray import here.
"""
from __future__ import annotations

import argparse
import html
import logging
import math
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import optuna
import pandas as pd
import plotly
import plotly.graph_objects as go
import yaml
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

import anoseg
from search.run_dir import COMPLETED, ERROR, FAILED, LOST, RUNNING, STOPPED, RunDir, best_trial, collate
from search.space import METRICS, SearchSpace, describe, distributions, short_value, trial_config

DASHBOARD_FILE = "dashboard.html"
FIGURE_IDS = ("history", "parallel", "importance", "pareto", "heatmap", "comparison")
SECTION_IDS = ("summary", *FIGURE_IDS, "failures", "examples")
STATUS_ORDER = (COMPLETED, STOPPED, RUNNING, FAILED, ERROR, LOST)
STATUS_COLORS = {COMPLETED: "#2c6fbb", STOPPED: "#9e9e9e", RUNNING: "#f0a020", FAILED: "#d62728",
                 ERROR: "#8c1c13", LOST: "#7b5e57"}
FAILED_STATUSES = (FAILED, ERROR, LOST)
BEST_COLOR, FRONT_COLOR, GREY = "#e8590c", "#d62728", "#b0b0b0"
TOP_N = 10
MIN_IMPORTANCE_TRIALS = 2
NA = "n/a"
NO_VALUE = "No completed, stopped or running trial with a value yet (failed ones are listed under Failed trials)."
TEMPLATE = "plotly_white"
PLOT_CONFIG = {"displaylogo": False, "responsive": True}
QUALITY_METRICS = tuple(m for m, mode in METRICS.items() if mode == "max")
COST_METRICS = tuple(m for m, mode in METRICS.items() if mode == "min")
SHOWN_METRICS = ("image_auroc", "pixel_auroc", "aupro", "pixel_f1_max", "image_f1_max", "fit_seconds", "ms_per_image")

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- the run


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
        from search.runner import run_space

        data.space = run_space(run)
    except Exception as exc:  # noqa: BLE001 - the dashboard still renders without the space
        data.space_error = f"{type(exc).__name__}: {exc}"
    return data


def prepare(df: pd.DataFrame) -> pd.DataFrame:
    """The trial table with a 1-based trial number in start order and numeric metric columns."""
    df = df.copy()
    if "number" not in df:
        df.insert(0, "number", np.arange(1, len(df) + 1))
    for column in df.columns:
        if column in SHOWN_METRICS or "/" in column or column in ("peak_rss_mb", "peak_gpu_mb", "wall_seconds"):
            df[column] = pd.to_numeric(df[column], errors="coerce")
    return df


def params_of(row: Mapping[str, Any]) -> dict[str, Any]:
    """A table row's Optuna parameters (``param.<name>`` columns that are set)."""
    return {k[len("param."):]: v for k, v in row.items() if k.startswith("param.") and not _missing(v)}



def _label(value: Any) -> str:
    """A category label; a whole float (an int choice read back from a table with gaps) loses its ".0"."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def _missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _rows(df: pd.DataFrame, status: str, metric: str) -> pd.DataFrame:
    if df.empty or metric not in df:
        return df.iloc[0:0]
    return df[(df["status"] == status) & df[metric].notna()]


# ----------------------------------------------------------------------------------------------- figures


def note_figure(text: str, title: str = "", height: int = 220) -> go.Figure:
    """A figure holding only a note (nothing to plot yet)."""
    fig = go.Figure()
    fig.add_annotation(text=text, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                       font={"size": 15, "color": "#555"})
    fig.update_layout(template=TEMPLATE, title=title or None, height=height,
                      xaxis={"visible": False}, yaxis={"visible": False}, margin={"l": 20, "r": 20, "t": 50, "b": 20})
    return fig


def history_figure(df: pd.DataFrame, metric: str = "aupro", mode: str = "max") -> go.Figure:
    """The objective of every finished trial in start order, with the best completed trial so far."""
    df = prepare(df)
    title = f"{metric} ({mode}) per trial, in start order"
    done, stopped, running = _rows(df, COMPLETED, metric), _rows(df, STOPPED, metric), _rows(df, RUNNING, metric)
    if done.empty and stopped.empty and running.empty:
        return note_figure(NO_VALUE, title)
    fig = go.Figure()
    if not running.empty:
        fig.add_trace(go.Scatter(
            x=running["number"], y=running[metric], mode="markers", name="running (mean so far)",
            marker={"color": STATUS_COLORS[RUNNING], "size": 9, "symbol": "diamond-open", "line": {"width": 2}},
            customdata=np.stack([running["trial_id"], running["categories_done"].astype(str)], axis=1),
            hovertemplate=f"trial %{{customdata[0]}} (#%{{x}}), running, %{{customdata[1]}} categories done<br>"
                          f"{metric} %{{y:.4f}} (mean so far)<extra></extra>",
        ))
    if not stopped.empty:
        fig.add_trace(go.Scatter(
            x=stopped["number"], y=stopped[metric], mode="markers", name="stopped early (partial mean, not comparable)",
            marker={"color": GREY, "size": 8, "symbol": "circle-open", "line": {"width": 2}},
            customdata=np.stack([stopped["trial_id"], [describe(params_of(r)) for _, r in stopped.iterrows()],
                                 stopped["categories_done"].astype(str)], axis=1),
            hovertemplate="trial %{customdata[0]} (#%{x}), stopped after %{customdata[2]} categories<br>"
                          f"{metric} %{{y:.4f}} (mean so far)<br>%{{customdata[1]}}<extra></extra>",
        ))
    if not done.empty:
        fig.add_trace(go.Scatter(
            x=done["number"], y=done[metric], mode="markers", name="completed",
            marker={"color": STATUS_COLORS[COMPLETED], "size": 9},
            customdata=np.stack([done["trial_id"], [describe(params_of(r)) for _, r in done.iterrows()]], axis=1),
            hovertemplate=f"trial %{{customdata[0]}} (#%{{x}})<br>{metric} %{{y:.4f}}<br>%{{customdata[1]}}<extra></extra>",
        ))
        values = done[metric].to_numpy(dtype=float)
        best = np.maximum.accumulate(values) if mode == "max" else np.minimum.accumulate(values)
        xs = [*done["number"].tolist(), int(df["number"].max())]
        fig.add_trace(go.Scatter(x=xs, y=[*best, best[-1]], mode="lines", line={"shape": "hv", "color": BEST_COLOR, "width": 2},
                                 name="best so far", hoverinfo="skip"))
        top = int(np.argmax(values) if mode == "max" else np.argmin(values))
        fig.add_trace(go.Scatter(x=[done["number"].iloc[top]], y=[values[top]], mode="markers", name="best trial",
                                 marker={"color": BEST_COLOR, "size": 16, "symbol": "star", "line": {"color": "white", "width": 1}},
                                 hovertemplate=f"best: trial {done['trial_id'].iloc[top]}<br>{metric} %{{y:.4f}}<extra></extra>"))
    fig.update_layout(template=TEMPLATE, title=title, height=420, hovermode="closest",
                      legend={"orientation": "h", "yanchor": "bottom", "y": 1.0, "x": 0},
                      margin={"l": 60, "r": 20, "t": 80, "b": 50})
    fig.update_xaxes(title="trial (start order)", rangemode="tozero", dtick=max(1, int(df["number"].max()) // 20 or 1))
    fig.update_yaxes(title=metric)
    return fig


def _dimension(label: str, values: Sequence[Any], dist: Any = None) -> dict[str, Any]:
    """A parallel-coordinates axis: categories as ticks, numbers (log10 for log ranges), n/a below the range."""
    present = [v for v in values if not _missing(v)]
    has_na = len(present) < len(values)
    categorical = isinstance(dist, optuna.distributions.CategoricalDistribution) or any(
        isinstance(v, (str, bool)) for v in present)
    if categorical:
        order = [_label(c) for c in getattr(dist, "choices", [])]
        seen = {_label(v) for v in present}
        labels = [NA] if has_na else []
        labels += [c for c in order if c in seen] + sorted(seen - set(order))
        index = {name: i for i, name in enumerate(labels)}
        encoded = [index[NA if _missing(v) else _label(v)] for v in values]
        return {"label": label, "values": encoded, "tickvals": list(range(len(labels))), "ticktext": labels,
                "range": [-0.25, max(len(labels) - 1, 0) + 0.25]}
    log = bool(getattr(dist, "log", False))
    numbers = np.array([float(v) for v in present]) if present else np.array([0.0])
    low = float(getattr(dist, "low", numbers.min()))
    high = float(getattr(dist, "high", numbers.max()))
    low, high = min(low, numbers.min()), max(high, numbers.max())
    to_axis = (lambda x: math.log10(x)) if log and low > 0 else (lambda x: x)
    lo, hi = to_axis(low), to_axis(high)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    span = hi - lo
    na_at = lo - 0.15 * span
    encoded = [na_at if _missing(v) else to_axis(float(v)) for v in values]
    ticks = list(np.linspace(lo, hi, 5))
    text = [short_value(10 ** t if log and low > 0 else (round(t) if isinstance(dist, optuna.distributions.IntDistribution) else t))
            for t in ticks]
    if has_na:
        ticks, text = [na_at, *ticks], [NA, *text]
    return {"label": label, "values": encoded, "tickvals": ticks, "ticktext": text,
            "range": [na_at if has_na else lo, hi]}


def parallel_figure(df: pd.DataFrame, metric: str = "aupro", mode: str = "max",
                    dists: Mapping[str, Any] | None = None) -> go.Figure:
    """Parallel coordinates of the completed trials: backbone, layers, head, head settings, objective."""
    df = prepare(df)
    title = f"Completed trials: parameters coloured by {metric}"
    done = _rows(df, COMPLETED, metric)
    if done.empty:
        return note_figure("No completed trial yet.", title)
    dists = dict(dists or {})
    params = [c[len("param."):] for c in done.columns if c.startswith("param.") and done[c].notna().any()]
    layer_keys = [p for p in params if p.endswith(".layers")]
    dims = []
    if "backbone" in params:
        dims.append(_dimension("backbone", done["param.backbone"].tolist(), dists.get("backbone")))
    if layer_keys:
        layers = [next((row[f"param.{k}"] for k in layer_keys if not _missing(row[f"param.{k}"])), None)
                  for _, row in done.iterrows()]
        dims.append(_dimension("layers", layers))
    if "head" in params:
        dims.append(_dimension("head", done["param.head"].tolist(), dists.get("head")))
    for key in sorted(p for p in params if p not in ("backbone", "head") and p not in layer_keys):
        dims.append(_dimension(key, done[f"param.{key}"].tolist(), dists.get(key)))
    values = done[metric].to_numpy(dtype=float)
    dims.append({"label": metric, "values": values, "range": [float(values.min()), float(values.max())]
                 if values.max() > values.min() else [float(values.min()) - 0.01, float(values.max()) + 0.01]})
    fig = go.Figure(go.Parcoords(
        dimensions=dims, labelangle=0, labelside="top",
        line={"color": values, "colorscale": "Viridis", "reversescale": mode == "min", "showscale": True,
              "colorbar": {"title": {"text": metric}, "thickness": 14}},
        labelfont={"size": 13}, tickfont={"size": 11}, rangefont={"size": 1, "color": "rgba(0,0,0,0)"},
    ))
    fig.update_layout(template=TEMPLATE, title=f"{title} ({len(done)} trials; n/a = setting of another head)",
                      height=460, margin={"l": 150, "r": 60, "t": 110, "b": 40})
    return fig


@dataclass
class ImportanceSet:
    """Importances of some parameters over a subset of the complete trials."""

    label: str
    n_trials: int
    importances: dict[str, float] = field(default_factory=dict)


def load_study(meta: Mapping[str, Any]) -> optuna.Study:
    """The run's Optuna study (read only; a missing sqlite file is an error, not a new empty database)."""
    storage = str(meta.get("storage") or "")
    if storage.startswith("sqlite:///"):
        db = Path(storage[len("sqlite:///"):])
        if not db.is_file():
            raise FileNotFoundError(f"the study database {db} does not exist")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return optuna.load_study(study_name=meta["study_name"], storage=storage)


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


def importance_figure(sets: Sequence[ImportanceSet], metric: str = "aupro", notes: Sequence[str] = (),
                      evaluator: str = "fANOVA") -> go.Figure:
    """One horizontal bar panel per set of trials (see :func:`param_importances`)."""
    title = f"{evaluator} importance for {metric}, per set of complete trials, on the parameters the set shares"
    if not sets:
        return note_figure("<br>".join(notes) or "No parameter importance yet.", title)
    cols = min(3, len(sets))
    rows = math.ceil(len(sets) / cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[s.label for s in sets],
                        horizontal_spacing=0.22, vertical_spacing=0.4 / rows)
    for i, item in enumerate(sets):
        names = list(item.importances)[::-1]
        values = [item.importances[n] for n in names]
        fig.add_trace(go.Bar(x=values, y=names, orientation="h", marker={"color": STATUS_COLORS[COMPLETED] if i == 0 else "#6a9fd8"},
                             text=[f"{v:.0%}" for v in values], textposition="outside", cliponaxis=False, showlegend=False,
                             hovertemplate="%{y}: %{x:.3f}<extra>" + html.escape(item.label) + "</extra>"),
                      row=i // cols + 1, col=i % cols + 1)
    fig.update_xaxes(range=[0, 1.12], tickvals=[0, 0.5, 1], tickformat=".0%")
    fig.update_yaxes(automargin=True)
    fig.update_annotations(font={"size": 12})
    footer = ("skipped: " + "; ".join(notes)) if notes else ""
    if footer:
        fig.add_annotation(text=html.escape(footer)[:300], x=0, y=-0.12 if rows == 1 else -0.06, xref="paper", yref="paper",
                           showarrow=False, xanchor="left", font={"size": 11, "color": "#777"})
    fig.update_layout(template=TEMPLATE, title={"text": title, "font": {"size": 15}}, height=110 + 250 * rows,
                      margin={"l": 20, "r": 20, "t": 90, "b": 60 if notes else 30})
    return fig


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


def pareto_figure(df: pd.DataFrame, quality: tuple[str, str] = ("aupro", "max"),
                  cost: tuple[str, str] = ("ms_per_image", "min")) -> go.Figure:
    """Quality vs cost of the completed trials, the non-dominated ones highlighted and joined."""
    df = prepare(df)
    (qm, qmode), (cm, cmode) = quality, cost
    title = f"{qm} vs {cm}: the Pareto front of the completed trials"
    done = _rows(df, COMPLETED, qm)
    done = done[done[cm].notna()] if cm in done else done.iloc[0:0]
    if done.empty:
        return note_figure("No completed trial yet.", title)
    front = pareto_mask(done[qm], done[cm], qmode, cmode)

    def hover(rows: pd.DataFrame) -> tuple[np.ndarray, str]:
        data = np.stack([rows["trial_id"], [describe(params_of(r)) for _, r in rows.iterrows()],
                         rows["fit_seconds"].map(lambda v: "?" if _missing(v) else f"{v:.2f}")], axis=1)
        template = (f"trial %{{customdata[0]}}<br>{qm} %{{y:.4f}}, {cm} %{{x:.3g}}<br>fit %{{customdata[2]}} s"
                    "<br>%{customdata[1]}<extra></extra>")
        return data, template

    fig = go.Figure()
    rest = done[~front]
    if not rest.empty:
        data, template = hover(rest)
        fig.add_trace(go.Scatter(x=rest[cm], y=rest[qm], mode="markers", name="dominated",
                                 marker={"color": GREY, "size": 9}, customdata=data, hovertemplate=template))
    best = done[front].sort_values(cm)
    data, template = hover(best)
    fig.add_trace(go.Scatter(x=best[cm], y=best[qm], mode="lines+markers+text", name=f"Pareto front ({len(best)})",
                             line={"shape": "hv" if cmode == "min" and qmode == "max" else "linear", "color": FRONT_COLOR, "dash": "dot"},
                             marker={"color": FRONT_COLOR, "size": 12, "line": {"color": "white", "width": 1}},
                             text=best["trial_id"], textposition="top left", textfont={"size": 10, "color": "#444"},
                             customdata=data, hovertemplate=template))
    fig.update_layout(template=TEMPLATE, title=title, height=440,
                      legend={"orientation": "h", "yanchor": "bottom", "y": 1.0, "x": 0},
                      margin={"l": 60, "r": 20, "t": 80, "b": 50})
    low, high = float(done[cm].min()), float(done[cm].max())
    log = low > 0 and high / low >= 4
    fig.update_xaxes(title=f"{cm} ({'lower' if cmode == 'min' else 'higher'} is better)" + (", log scale" if log else ""))
    if log:
        ticks = log_ticks(low, high)
        fig.update_xaxes(type="log", tickvals=ticks, ticktext=[short_value(float(t)) for t in ticks])
    fig.update_yaxes(title=f"{qm} ({'higher' if qmode == 'max' else 'lower'} is better)")
    return fig


def log_ticks(low: float, high: float) -> list[float]:
    """1-2-5 ticks covering [low, high] (every integer multiple when that gives fewer than 3)."""
    exponents = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
    for mantissas in ((1, 2, 5), tuple(range(1, 10))):
        ticks = [m * 10.0 ** e for e in exponents for m in mantissas if low * 0.95 <= m * 10.0 ** e <= high * 1.05]
        if len(ticks) >= 3:
            break
    return ticks


def top_trials(df: pd.DataFrame, metric: str, mode: str, n: int = TOP_N) -> pd.DataFrame:
    """The n best completed trials by `metric` (ties keep start order)."""
    done = _rows(prepare(df), COMPLETED, metric)
    return done.sort_values(metric, ascending=mode == "min", kind="stable").head(n)


def category_heatmap(df: pd.DataFrame, categories: Sequence[str] | None = None, metric: str = "aupro",
                     mode: str = "max", top: int = TOP_N, cell_metric: str = "aupro") -> go.Figure:
    """Per-category `cell_metric` (pixel AUPRO) of the `top` completed trials by the objective."""
    df = prepare(df)
    title = f"Pixel {cell_metric.upper() if cell_metric == 'aupro' else cell_metric} per category, top {top} completed trials by {metric}"
    best = top_trials(df, metric, mode, top)
    if categories is None or not len(categories):
        categories = [c.split("/")[0] for c in df.columns if c.endswith(f"/{cell_metric}")]
    categories = [c for c in categories if f"{c}/{cell_metric}" in df]
    if best.empty or not categories:
        return note_figure("No completed trial yet.", title)
    rows = [*categories, "mean"]
    z = [[row[f"{c}/{cell_metric}"] for _, row in best.iterrows()] for c in categories]
    z.append(best[cell_metric].tolist() if cell_metric in best else [np.nanmean(col) for col in zip(*z)])
    labels = [f"{rank}. {tid}" for rank, tid in enumerate(best["trial_id"], start=1)]
    configs = [describe(params_of(r)) for _, r in best.iterrows()]
    custom = [[configs[j] for j in range(len(labels))] for _ in rows]
    fig = go.Figure(go.Heatmap(
        z=z, x=labels, y=rows, colorscale="Viridis", colorbar={"title": {"text": cell_metric}, "thickness": 14},
        text=[[("" if _missing(v) else f"{v:.3f}") for v in r] for r in z], texttemplate="%{text}",
        textfont={"size": 11}, customdata=custom, xgap=2, ygap=2,
        hovertemplate="%{x}<br>%{y}: %{z:.4f}<br>%{customdata}<extra></extra>",
    ))
    fig.update_layout(template=TEMPLATE, title=title, height=150 + 42 * len(rows),
                      margin={"l": 90, "r": 20, "t": 60, "b": 90})
    fig.update_yaxes(autorange="reversed", title="category (fidelity order)")
    fig.update_xaxes(title="trial (rank by the objective)", tickangle=-30)
    return fig


def comparison_figure(df: pd.DataFrame, metric: str = "aupro", mode: str = "max") -> go.Figure:
    """The objective per backbone and per head (boxes over completed trials, stopped ones as grey rings)."""
    df = prepare(df)
    title = f"{metric} per backbone and per head"
    done, stopped = _rows(df, COMPLETED, metric), _rows(df, STOPPED, metric)
    if done.empty and stopped.empty:
        return note_figure(NO_VALUE, title)
    fig = make_subplots(rows=1, cols=2, subplot_titles=("per backbone", "per head"), horizontal_spacing=0.1)
    legend = {"completed": False, "stopped": False}
    for col, key in enumerate(("param.backbone", "param.head"), start=1):
        if key not in df:
            continue
        groups = sorted({str(v) for v in pd.concat([done[key], stopped[key]]).dropna()})
        for group in groups:
            rows = done[done[key].astype(str) == group]
            if not rows.empty:
                fig.add_trace(go.Box(
                    x=[group] * len(rows), y=rows[metric], name="completed", legendgroup="completed",
                    showlegend=not legend["completed"], boxpoints="all", jitter=0.35, pointpos=0,
                    marker={"color": STATUS_COLORS[COMPLETED], "size": 7}, line={"color": STATUS_COLORS[COMPLETED]},
                    fillcolor="rgba(44,111,187,0.12)", customdata=np.stack([rows["trial_id"], [describe(params_of(r)) for _, r in rows.iterrows()]], axis=1),
                    hovertemplate=f"trial %{{customdata[0]}}<br>{metric} %{{y:.4f}}<br>%{{customdata[1]}}<extra></extra>",
                ), row=1, col=col)
                legend["completed"] = True
            part = stopped[stopped[key].astype(str) == group]
            if not part.empty:
                fig.add_trace(go.Scatter(
                    x=[group] * len(part), y=part[metric], mode="markers", name="stopped early (partial mean)",
                    legendgroup="stopped", showlegend=not legend["stopped"],
                    marker={"color": GREY, "size": 8, "symbol": "circle-open", "line": {"width": 2}},
                    customdata=np.stack([part["trial_id"], part["categories_done"].astype(str)], axis=1),
                    hovertemplate=f"trial %{{customdata[0]}}, stopped after %{{customdata[1]}} categories<br>{metric} %{{y:.4f}}<extra></extra>",
                ), row=1, col=col)
                legend["stopped"] = True
    fig.update_yaxes(title=metric, row=1, col=1)
    fig.update_layout(template=TEMPLATE, title=title, height=440, boxmode="overlay",
                      legend={"orientation": "h", "yanchor": "bottom", "y": 1.1, "x": 1, "xanchor": "right"},
                      margin={"l": 60, "r": 20, "t": 90, "b": 60})
    return fig


# ----------------------------------------------------------------------------------------------- HTML parts


def _e(value: Any) -> str:
    return html.escape(str(value))


def error_line(text: Any) -> str:
    """The telling line of an error text: the message itself, not a traceback header."""
    if _missing(text) or not str(text).strip():
        return ""
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    first = lines[0]
    if first.startswith(("Traceback", "Failure #")) and len(lines) > 1:
        first = next((line for line in reversed(lines) if not line.startswith(("File ", "^", "~"))), lines[-1])
    return first[:300]


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours} h {minutes:02d} min" if hours else (f"{minutes} min {secs:02d} s" if minutes else f"{secs} s")


def _fmt(value: Any, digits: int = 4) -> str:
    if _missing(value):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return _e(value)


def status_counts(df: pd.DataFrame) -> dict[str, int]:
    counts = df["status"].value_counts().to_dict() if not df.empty else {}
    return {s: int(counts.get(s, 0)) for s in (*STATUS_ORDER, *sorted(set(counts) - set(STATUS_ORDER)))}


def wall_seconds(meta: Mapping[str, Any], now: float | None = None) -> float | None:
    """Time spent searching: the finished segments, plus the current one while the run is running."""
    done = float(meta.get("wall_seconds") or 0.0)
    if meta.get("status") == "running" and meta.get("last_start"):
        return done + (now or time.time()) - float(meta["last_start"])
    return done or None


def metrics_table(record: Mapping[str, Any], categories: Sequence[str]) -> str:
    """Per-category and mean metrics of one trial."""
    per = record.get("per_category", {})
    head = "".join(f"<th>{_e(k)}</th>" for k in SHOWN_METRICS)
    body = []
    for cat in categories:
        if cat in per:
            body.append(f"<tr><td>{_e(cat)}</td>" + "".join(f"<td>{_fmt(per[cat].get(k))}</td>" for k in SHOWN_METRICS) + "</tr>")
    mean = record.get("metrics", {})
    body.append("<tr class='mean'><td>mean</td>" + "".join(f"<td>{_fmt(mean.get(k))}</td>" for k in SHOWN_METRICS) + "</tr>")
    return f"<table class='grid'><thead><tr><th>category</th>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def summary_html(data: RunData) -> str:
    """Run facts, trials by status, the best trial with its configuration and metrics."""
    meta, df = data.meta, data.df
    counts = status_counts(df)
    badges = "".join(f"<span class='badge' style='background:{STATUS_COLORS.get(s, '#555')}'>{n} {_e(s)}</span>"
                     for s, n in counts.items())
    budget = data.space.budget.get("trials") if data.space else None
    objectives = ", ".join(f"{o['metric']} ({o['mode']})" for o in data.objectives)
    facts = [
        ("run", f"{_e(meta.get('name', data.path.name))} <span class='muted'>({_e(data.path.resolve())})</span>"),
        ("status", _e(meta.get("status", "?"))),
        ("data root", _e(meta.get("data_root", "?"))),
        ("categories", " → ".join(_e(c) for c in data.categories) + " <span class='muted'>(fidelity order)</span>"),
        ("objectives", _e(objectives)),
        ("trials", f"{len(df)}{f' of {budget}' if budget else ''} &nbsp; {badges}"),
        ("wall time", _duration(wall_seconds(meta)) + (" (still running)" if meta.get("status") == "running" else "")),
    ]
    if data.space is not None:
        sampler = ", ".join(f"{k}={v}" for k, v in data.space.sampler.items() if v is not None)
        scheduler = ", ".join(f"{k}={v}" for k, v in data.space.scheduler.items())
        facts.append(("sampler / scheduler", _e(f"{sampler} / {scheduler}")))
    elif data.space_error:
        facts.append(("space", f"<span class='warn'>{_e(data.space_error)}</span>"))
    facts.append(("study", f"{_e(meta.get('study_name', '?'))} <span class='muted'>in {_e(meta.get('storage', '?'))}</span>"))
    rows = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in facts)
    parts = [f"<table class='kv'>{rows}</table>"]
    if meta.get("status") == "running" or counts.get(RUNNING):
        parts.append(f"<p class='note'>The search is still running ({counts.get(RUNNING, 0)} trial(s) in progress): "
                     "this page shows the state when it was generated; generate it again to update.</p>")
    best = best_trial(df, data.metric, data.mode) if not df.empty else None
    if best is None:
        parts.append("<p class='note big'>No trial has evaluated every category yet, so there is no best trial. "
                     f"{counts.get(RUNNING, 0)} running, {counts.get(STOPPED, 0)} stopped early, "
                     f"{sum(counts.get(s, 0) for s in FAILED_STATUSES)} failed.</p>")
        return "\n".join(parts)
    record = data.record(best["trial_id"])
    config = data.config(best["trial_id"])
    config_text = yaml.safe_dump(config, sort_keys=False, default_flow_style=False).strip() if config else describe(params_of(best))
    parts.append(
        f"<h3>Best trial <code>{_e(best['trial_id'])}</code> by {_e(data.metric)} ({_e(data.mode)}): "
        f"{_fmt(best[data.metric])}</h3>"
        f"<div class='two'><div><h4>configuration</h4><pre>{_e(config_text)}</pre></div>"
        f"<div><h4>metrics</h4>{metrics_table(record, data.categories)}"
        f"<p class='muted'>wall time of the trial: {_duration(best.get('wall_seconds'))}; "
        f"peak memory {_fmt(best.get('peak_rss_mb'), 0)} MiB</p></div></div>")
    return "\n".join(parts)


def failures_html(df: pd.DataFrame) -> str:
    """A table of failed, crashed and lost trials (id, status, error line, stop reason), full error folded."""
    df = prepare(df)
    bad = df[df["status"].isin(FAILED_STATUSES)] if not df.empty else df
    if bad.empty:
        return f"<p class='count'>0 failed trials (of {len(df)}).</p>"
    rows = []
    for _, row in bad.iterrows():
        full = "" if _missing(row.get("error")) else str(row["error"]).strip()
        details = f"<details><summary>full error</summary><pre>{_e(full)}</pre></details>" if "\n" in full else ""
        rows.append(
            f"<tr class='{_e(row['status'])}'><td><code>{_e(row['trial_id'])}</code></td><td>{_e(row['status'])}</td>"
            f"<td>{int(row.get('categories_done') or 0)}</td>"
            f"<td class='err'>{_e(error_line(full)) or '–'}{details}</td><td>{_e(row.get('stop_reason') or '–')}</td>"
            f"<td>{_e(describe(params_of(row)))}</td></tr>")
    return (f"<p class='count'>{len(bad)} failed trial{'s' if len(bad) != 1 else ''} (of {len(df)}).</p>"
            "<table class='grid failures'><thead><tr><th>trial</th><th>status</th><th>categories done</th>"
            "<th>error</th><th>stop reason</th><th>configuration</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def example_category(best: Mapping[str, Any], categories: Sequence[str], metric: str = "aupro") -> tuple[str, str]:
    """The category where the trial was worst by `metric` (its weak spot), with why; else the first one."""
    scored = [(best.get(f"{c}/{metric}"), c) for c in categories if not _missing(best.get(f"{c}/{metric}"))]
    if scored:
        value, category = min(scored)
        return category, f"the category where this trial is worst ({metric} {value:.3f})"
    return categories[0], "the first category of the fidelity order"


def examples_html(data: RunData, n: int = 4) -> str:
    """Anomaly maps of the best trial, fitted again on one category; a note when that cannot be done."""
    if n <= 0:
        return "<p class='note'>Examples skipped (examples=0).</p>"
    best = best_trial(data.df, data.metric, data.mode) if not data.df.empty else None
    if best is None:
        return "<p class='note'>No completed trial yet: examples come with the first trial that evaluates every category.</p>"
    root = data.meta.get("data_root")
    if not root or not Path(root).is_dir():
        return f"<p class='note'>The data root {_e(root)} is not available here: no examples.</p>"
    config = data.config(best["trial_id"])
    if not config or not data.categories:
        return "<p class='note'>The best trial's configuration is unknown: no examples.</p>"
    category, why = example_category(best, data.categories)
    try:
        from search.examples import anomaly_examples

        shown = anomaly_examples(config, root, category, n)
    except Exception as exc:  # noqa: BLE001 - the page must still render
        logger.warning("examples failed: %s", exc)
        return f"<p class='note'>Examples could not be made: {_e(type(exc).__name__)}: {_e(exc)}</p>"
    if not shown.examples:
        return f"<p class='note'>{_e(category)} has no defective test image.</p>"
    lo, hi = shown.map_range
    intro = (f"<p>Best trial <code>{_e(best['trial_id'])}</code> fitted again on <b>{_e(category)}</b> ({_e(why)}); "
             f"{len(shown.examples)} of its {shown.n_defective} defective test images, round-robin over the defect types "
             "(not hand-picked). Left: the image with the ground-truth outline; right: the anomaly map over it "
             f"(alpha 0.5), one colour scale for the whole test set: "
             f"<span class='cbar'></span> {lo:.3g} … {hi:.3g}.")
    if shown.normal_score_max is not None:
        intro += (f" Image scores: highest defect-free test image {shown.normal_score_max:.3g}, "
                  f"lowest defective {shown.defect_score_min:.3g}.")
    cards = "".join(
        f'<figure><img src="{ex.data_uri()}" alt="{_e(ex.path)}"><figcaption>'
        f"<b>{_e(ex.defect)}</b> {_e(ex.path)}"
        f" · image score <b>{ex.score:.3g}</b></figcaption></figure>" for ex in shown.examples)
    return f"{intro}</p><div class='examples'>{cards}</div>"


# ----------------------------------------------------------------------------------------------- the page

CSS = """
:root { --fg:#1f2933; --muted:#6b7280; --line:#e5e7eb; --bg:#f5f6f8; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif; color:var(--fg); background:var(--bg); }
header, main, footer { max-width:1280px; margin:0 auto; padding:0 20px; }
header h1 { margin:22px 0 4px; font-size:24px; }
nav { margin:6px 0 14px; } nav a { margin-right:14px; white-space:nowrap; color:#2c6fbb; text-decoration:none; } nav a:hover { text-decoration:underline; }
section { background:#fff; border:1px solid var(--line); border-radius:8px; padding:14px 18px; margin:0 0 16px; }
section h2 { margin:0 0 8px; font-size:18px; } h3 { font-size:16px; margin:16px 0 8px; } h4 { margin:6px 0; font-size:13px; color:var(--muted); }
.muted { color:var(--muted); } .warn { color:#b45309; }
.note { background:#fff8e1; border-left:4px solid #f0a020; padding:8px 12px; } .note.big { font-size:15px; }
.badge { display:inline-block; color:#fff; border-radius:10px; padding:1px 9px; margin-right:5px; font-size:12px; }
table { border-collapse:collapse; } table.kv th { text-align:left; padding:3px 14px 3px 0; color:var(--muted); font-weight:600; vertical-align:top; white-space:nowrap; }
table.kv td { padding:3px 0; }
table.grid { font-size:13px; width:100%; } table.grid th, table.grid td { border-bottom:1px solid var(--line); padding:4px 8px; text-align:left; vertical-align:top; }
table.grid th { background:#f9fafb; } table.grid tr.mean td { font-weight:600; }
table.failures td.err { font-family:ui-monospace,Menlo,Consolas,monospace; font-size:12px; color:#b91c1c; max-width:520px; word-break:break-word; }
pre { background:#f9fafb; border:1px solid var(--line); border-radius:6px; padding:8px 10px; overflow:auto; font-size:12px; max-height:360px; }
.two { display:grid; grid-template-columns: minmax(260px, 1fr) 2fr; gap:18px; }
.plot { width:100%; }
.examples { display:flex; flex-wrap:wrap; gap:14px; } figure { margin:0; } figure img { display:block; max-width:100%; border:1px solid var(--line); }
figcaption { font-size:12px; color:var(--muted); margin-top:4px; }
.cbar { display:inline-block; width:90px; height:10px; vertical-align:middle; border:1px solid var(--line);
        background:linear-gradient(90deg,#30123b,#4145ab,#4675ed,#39a2fc,#1bcfd4,#24eca6,#61fc6c,#a4fc3b,#d1e834,#f3c63a,#fe9b2d,#f36315,#d93806,#b11901,#7a0402); }
footer { color:var(--muted); font-size:12px; padding-bottom:24px; }
"""

SECTION_TITLES = {
    "summary": "Run",
    "history": "Optimisation history",
    "parallel": "Parallel coordinates",
    "importance": "Parameter importance",
    "pareto": "Quality vs cost",
    "heatmap": "Per-category AUPRO of the best trials",
    "comparison": "Backbones and heads",
    "failures": "Failed trials",
    "examples": "Anomaly maps of the best trial",
}


def figures(data: RunData) -> dict[str, go.Figure]:
    """Every figure of the dashboard, by section id."""
    metric, mode = data.metric, data.mode
    try:
        dists = distributions(data.space) if data.space is not None else {}
    except Exception:  # noqa: BLE001
        dists = {}
    try:
        study = load_study(data.meta)
        sets, notes = param_importances(study, objective_index=0)
    except Exception as exc:  # noqa: BLE001 - no study (yet), another storage unreachable, ...
        sets, notes = [], [f"the Optuna study could not be read: {type(exc).__name__}: {exc}"]
    return {
        "history": history_figure(data.df, metric, mode),
        "parallel": parallel_figure(data.df, metric, mode, dists),
        "importance": importance_figure(sets, metric, notes),
        "pareto": pareto_figure(data.df, *quality_and_cost(data.objectives)),
        "heatmap": category_heatmap(data.df, data.categories, metric, mode, TOP_N),
        "comparison": comparison_figure(data.df, metric, mode),
    }


def quality_and_cost(objectives: Iterable[Mapping[str, str]]) -> tuple[tuple[str, str], tuple[str, str]]:
    """The Pareto axes: the first quality objective (else aupro) and the first cost objective (else ms_per_image)."""
    objectives = list(objectives)
    quality = next(((o["metric"], o["mode"]) for o in objectives if o["metric"] in QUALITY_METRICS), ("aupro", "max"))
    cost = next(((o["metric"], o["mode"]) for o in objectives if o["metric"] in COST_METRICS), ("ms_per_image", "min"))
    return quality, cost


def render_html(data: RunData, examples: int = 4, now: float | None = None) -> str:
    """The whole page as a string."""
    now = time.time() if now is None else now
    figs = figures(data)
    sections = [("summary", summary_html(data))]
    for fid, fig in figs.items():
        sections.append((fid, fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"{fid}-plot",
                                          config=PLOT_CONFIG, default_height=f"{fig.layout.height or 450}px")))
    n_failed = int(data.df["status"].isin(FAILED_STATUSES).sum()) if not data.df.empty else 0
    sections.append(("failures", failures_html(data.df)))
    sections.append(("examples", examples_html(data, examples)))
    titles = dict(SECTION_TITLES, failures=f"Failed trials ({n_failed})")
    nav = " ".join(f"<a href='#{sid}'>{_e(titles[sid])}</a>" for sid, _ in sections)
    body = "\n".join(f"<section id='{sid}'><h2>{_e(titles[sid])}</h2>\n<div class='plot'>{content}</div></section>"
                     if sid in FIGURE_IDS else f"<section id='{sid}'><h2>{_e(titles[sid])}</h2>\n{content}</section>"
                     for sid, content in sections)
    name = data.meta.get("name", data.path.name)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(now))
    plotly_js = get_plotlyjs()
    return (
        "<!DOCTYPE html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>\n"
        f"<title>anoseg search · {_e(name)}</title>\n<style>{CSS}</style>\n"
        f"<script type='text/javascript'>{plotly_js}</script>\n</head>\n<body>\n"
        f"<header><h1>Search run {_e(name)}</h1><nav>{nav}</nav></header>\n<main>\n{body}\n</main>\n"
        f"<footer>Generated {_e(stamp)} by anoseg {_e(anoseg.__version__)} (search/dashboard.py) · "
        f"plotly {_e(plotly.__version__)} · optuna {_e(optuna.__version__)} · from {_e(data.path.resolve())}</footer>\n"
        "</body>\n</html>\n"
    )


def write_dashboard(run_path: str | Path, out: Path | None = None, examples: int = 4) -> Path:
    """Render the run folder `run_path` into one self-contained HTML file (default ``<run>/dashboard.html``).

    Works at any time, also while the search runs. `examples` defective test images of the best trial
    are rendered (0 skips the refit). Returns the file written (atomically).
    """
    data = load_run(run_path)
    target = Path(out) if out is not None else data.path / DASHBOARD_FILE
    page = render_html(data, examples)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(page)
    os.chmod(tmp, 0o644)
    os.replace(tmp, target)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m search.dashboard RUN [--out FILE] [--examples N]``."""
    parser = argparse.ArgumentParser(prog="python -m search.dashboard", description=write_dashboard.__doc__.splitlines()[0])
    parser.add_argument("run", help="run folder, e.g. results/quick")
    parser.add_argument("--out", type=Path, help="HTML file to write (default: <run>/dashboard.html)")
    parser.add_argument("--examples", type=int, default=4, help="anomaly-map examples of the best trial (0: none)")
    args = parser.parse_args(argv)
    print(write_dashboard(args.run, args.out, args.examples))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
