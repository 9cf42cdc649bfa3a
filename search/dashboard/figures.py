"""Every figure of the run dashboard: one function per figure, taking the prepared trial table.

Each returns a ``go.Figure``; with nothing to show, a figure holding a note (:func:`note_figure`).
:func:`build_figures` makes all of them for a run, by section id (:data:`FIGURE_IDS`).

The trial table's figures are labelled with the part they were measured on (`part`: "validation part"
under the holdout protocol, "synthetic validation set" or "few-shot validation set" under synthetic and
few_shot, "test set" under test); only :func:`final_figure` and :func:`agreement_figure` show test-part figures.
"""
from __future__ import annotations

import html
import math
import textwrap
from typing import Any, Mapping, Sequence

import numpy as np
import optuna
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from search.dashboard.data import (MIN_AGREEMENT_TRIALS, TOP_N, ImportanceSet, RunData, final_table, has_validation,
                                   measured_on, missing, params_of, pareto_mask, prepare, quality_and_cost,
                                   rank_agreement, reported_part, run_importances, space_distributions, top_trials,
                                   with_value)
from search.finalize import reported_on
from search.run_dir import COMPLETED, ERROR, FAILED, LOST, RUNNING, STOPPED
from search.space_optuna import describe, short_value

FIGURE_IDS = ("final", "agreement", "history", "parallel", "importance", "pareto", "heatmap", "comparison")
STATUS_COLORS = {COMPLETED: "#2c6fbb", STOPPED: "#9e9e9e", RUNNING: "#f0a020", FAILED: "#d62728",
                 ERROR: "#8c1c13", LOST: "#7b5e57"}
BEST_COLOR, FRONT_COLOR, GREY = "#e8590c", "#d62728", "#b0b0b0"
NA = "n/a"
NO_VALUE = "No completed, stopped or running trial with a value yet (failed ones are listed under Failed trials)."
TEMPLATE = "plotly_white"
PART_COLORS = {"validation": "#2c6fbb", "test": "#e8590c"}
TIED_NAME = "tied with the best (difference interval holds 0)"


def build_figures(data: RunData) -> dict[str, go.Figure]:
    """Every figure of the dashboard, by section id."""
    metric, mode, part = data.metric, data.mode, data.part
    sets, notes = run_importances(data)
    return {
        "final": final_figure(data.final, metric, mode, data.protocol, str(data.path)),
        "agreement": agreement_figure(data.final, metric, mode, data.protocol),
        "history": history_figure(data.df, metric, mode, part),
        "parallel": parallel_figure(data.df, metric, mode, space_distributions(data), part),
        "importance": importance_figure(sets, metric, notes, part=part),
        "pareto": pareto_figure(data.df, *quality_and_cost(data.objectives), part=part),
        "heatmap": category_heatmap(data.df, data.categories, metric, mode, TOP_N, part=part),
        "comparison": comparison_figure(data.df, metric, mode, part),
    }


def on_part(metric: str, part: str = "") -> str:
    """`metric` labelled with the part of the test images it was measured on, e.g. "aupro (validation part)"."""
    return f"{metric} ({part})" if part else metric


def note_figure(text: str, title: str = "", height: int = 220) -> go.Figure:
    """A figure holding only a note (nothing to plot yet)."""
    fig = go.Figure()
    fig.add_annotation(text=text, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                       font={"size": 15, "color": "#555"})
    fig.update_layout(template=TEMPLATE, title=title or None, height=height,
                      xaxis={"visible": False}, yaxis={"visible": False}, margin={"l": 20, "r": 20, "t": 50, "b": 20})
    return fig


def duplicate_note(row: Any) -> str:
    """", duplicate of <trial>" for a trial answered from another's record."""
    original = row.get("duplicate_of")
    return f"<br>duplicate of {original}: same effective configuration" if isinstance(original, str) and original else ""


def not_finalised_text(protocol: str, run_path: str = "RUN") -> str:
    """The note of a run not finalised yet, naming the command that finalises it."""
    if has_validation(protocol):
        what = (f"Not finalised yet: the trials were ranked on the {measured_on(protocol)}<br>"
                f"and none has been evaluated on the {reported_part(protocol)}.")
    else:
        what = "Not finalised yet (no intervals, no ties); the trials were selected on the test set."
    command = f"anoseg search finalize {html.escape(run_path)}"
    return f"{what}<br>A search finalises itself when it finishes; otherwise run<br>{command}"


def part_name(part: str, protocol: str) -> str:
    """A finalised part's legend entry."""
    if not has_validation(protocol):
        return "test set (ranked and reported on it)"
    if part == "validation":
        return f"{measured_on(protocol)} (ranked on)"
    return reported_on(protocol).removeprefix("the ")


def final_title(final: Mapping[str, Any], metric: str, protocol: str) -> str:
    """The validation-vs-test figure's title: what was ranked on, what is reported on, the intervals."""
    intervals = (f"{float(final.get('level', 0.95)):.0%} bootstrap intervals" if final.get("bootstrap")
                 else "no bootstrap intervals (selection.bootstrap: 0)")
    if has_validation(protocol):
        parts = " vs ".join(part_name(p, protocol) for p in final.get("parts") or ["validation"])
        return f"{metric} of the finalised trials<br><sup>{parts}, {intervals}</sup>"
    return f"{metric} of the finalised trials<br><sup>selected on the test set: figures optimistic; {intervals}</sup>"


def interval_trace(table: pd.DataFrame, part: str, x: np.ndarray, name: str, metric: str) -> go.Scatter:
    """One part's values of the finalised trials with their intervals as error bars."""
    y = table[part].to_numpy(dtype=float)
    low, high = table[f"{part}_low"].to_numpy(dtype=float), table[f"{part}_high"].to_numpy(dtype=float)
    spans = [("–" if math.isnan(lo) else f"[{lo:.4f}, {hi:.4f}]") for lo, hi in zip(low, high)]
    return go.Scatter(
        x=x, y=y, mode="markers", name=name, marker={"color": PART_COLORS.get(part, GREY), "size": 10},
        error_y={"type": "data", "symmetric": False, "array": high - y, "arrayminus": y - low,
                 "visible": bool(np.isfinite(low).any()), "thickness": 1.5, "width": 5},
        customdata=np.stack([table["trial_id"], spans], axis=1),
        hovertemplate=f"trial %{{customdata[0]}}<br>{metric} on the {part}: %{{y:.4f}}<br>"
                      "interval %{customdata[1]}<extra></extra>")


def final_figure(final: Mapping[str, Any] | None, metric: str = "aupro", mode: str = "max",
                 protocol: str = "holdout", run_path: str = "RUN") -> go.Figure:
    """The objective of each finalised trial on every part (validation, test) with its bootstrap interval, in
    search-rank order; the chosen trial starred and shaded, the trials tied with the best ringed."""
    if not final:
        return note_figure(not_finalised_text(protocol, run_path), f"{metric} of the finalised trials", height=260)
    metric, mode = final.get("objective", {}).get("metric", metric), final.get("objective", {}).get("mode", mode)
    title = final_title(final, metric, protocol)
    table = final_table(final, metric)
    parts = list(final.get("parts") or ["test"])
    if table.empty or not all(p in table for p in parts):
        return note_figure("run.json's final section holds no finalised trial.", title)
    positions = np.arange(len(table), dtype=float)
    x = {part: positions + 0.15 * (i - (len(parts) - 1) / 2) for i, part in enumerate(parts)}
    ranked_on, reported_on = parts[0], parts[-1]
    fig = go.Figure([interval_trace(table, part, x[part], part_name(part, protocol), metric) for part in parts])
    tied = table["tied"].to_numpy(dtype=bool)
    if tied.any():
        fig.add_trace(go.Scatter(x=x[ranked_on][tied], y=table[ranked_on][tied], mode="markers", name=TIED_NAME,
                                 marker={"symbol": "circle-open", "size": 20, "color": "#444", "line": {"width": 2}},
                                 hoverinfo="skip"))
    chosen = table["chosen"].to_numpy(dtype=bool)
    if chosen.any():
        at = float(positions[chosen][0])
        fig.add_vrect(x0=at - 0.4, x1=at + 0.4, fillcolor=BEST_COLOR, opacity=0.1, line_width=0, layer="below")
        fig.add_trace(go.Scatter(x=x[reported_on][chosen], y=table[reported_on][chosen], mode="markers",
                                 name=f"chosen: {table['trial_id'][chosen].iloc[0]}", hoverinfo="skip",
                                 marker={"symbol": "star", "size": 18, "color": BEST_COLOR, "line": {"color": "white", "width": 1}}))
    labels = [f"{'?' if missing(r) else int(r)}. {t}" for r, t in zip(table["search_rank"], table["trial_id"])]
    fig.update_layout(template=TEMPLATE, title={"text": title, "font": {"size": 15}}, height=460, hovermode="closest",
                      legend={"orientation": "h", "yanchor": "bottom", "y": 1.0, "x": 0},
                      margin={"l": 60, "r": 20, "t": 110, "b": 80})
    fig.update_xaxes(title="finalised trial (rank in the search)", tickvals=positions, ticktext=labels, tickangle=-30,
                     range=[-0.6, len(table) - 0.4])
    fig.update_yaxes(title=f"{metric}, {'higher' if mode == 'max' else 'lower'} is better")
    return fig


def agreement_title(metric: str, n: int, agreement: tuple[float, float] | None) -> str:
    """The scatter's title: Kendall's tau and Spearman's rho, or why they are undefined."""
    if agreement is None:
        what = (f"Kendall's tau undefined: {n} finalised trial{'s' if n != 1 else ''} with both figures, "
                f"needs at least {MIN_AGREEMENT_TRIALS}")
    elif not all(math.isfinite(v) for v in agreement):
        what = f"Kendall's tau undefined: the values do not vary ({n} finalised trials)"
    else:
        what = f"Kendall's tau {agreement[0]:.2f}, Spearman {agreement[1]:.2f} over {n} finalised trials"
    return f"{metric} of the finalised trials, validation vs test<br><sup>{what}</sup>"


def _errors(table: pd.DataFrame, part: str) -> dict[str, Any]:
    """Error bars of one part's values from their intervals (hidden without intervals)."""
    value, low, high = (table[c].to_numpy(dtype=float) for c in (part, f"{part}_low", f"{part}_high"))
    return {"type": "data", "symmetric": False, "array": high - value, "arrayminus": value - low,
            "visible": bool(np.isfinite(low).any()), "thickness": 1.2, "width": 4, "color": "#8aa9cc"}


def agreement_figure(final: Mapping[str, Any] | None, metric: str = "aupro", mode: str = "max",
                     protocol: str = "holdout") -> go.Figure:
    """Each finalised trial's objective on the validation set (x) against the real test part (y), with their
    intervals as error bars, Kendall's tau and Spearman's rho in the title, the chosen trial starred and the
    trials tied with the best ringed: how far the ranking on the validation set carries to the test part."""
    title = f"{metric} of the finalised trials, validation vs test"
    if not has_validation(protocol):
        return note_figure("Selected on the test set: there is no validation set to compare the test figures with.",
                           title)
    if not final:
        return note_figure(f"Not finalised yet: no trial has figures on the {reported_part(protocol)}.", title)
    metric, mode = final.get("objective", {}).get("metric", metric), final.get("objective", {}).get("mode", mode)
    if not {"validation", "test"} <= set(final.get("parts") or []):
        notes = [html.escape(line) for note in final.get("notes") or [] for line in textwrap.wrap(note, 110)]
        return note_figure("<br>".join(["No test figures: nothing to compare the validation figures with.", *notes]),
                           title, height=220 + 18 * len(notes))
    table = final_table(final, metric)
    table = table[table["validation"].notna() & table["test"].notna()].reset_index(drop=True)
    if table.empty:
        return note_figure("run.json's final section holds no trial with both figures.", title)
    x, y = table["validation"].to_numpy(dtype=float), table["test"].to_numpy(dtype=float)
    fig = go.Figure()
    low, high = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
    fig.add_trace(go.Scatter(x=[low, high], y=[low, high], mode="lines", name="y = x", hoverinfo="skip",
                             line={"color": GREY, "dash": "dot", "width": 1}))
    fig.add_trace(go.Scatter(
        x=x, y=y, mode="markers+text", name="finalised trials", text=table["trial_id"], textposition="top right",
        textfont={"size": 10, "color": "#444"}, marker={"color": PART_COLORS["validation"], "size": 10},
        error_x=_errors(table, "validation"), error_y=_errors(table, "test"),
        customdata=np.stack([table["trial_id"], table["search_rank"].map(lambda r: "?" if missing(r) else int(r))],
                            axis=1),
        hovertemplate=f"trial %{{customdata[0]}} (rank %{{customdata[1]}} in the search)<br>{metric}: validation "
                      "%{x:.4f}, test %{y:.4f}<extra></extra>"))
    tied = table["tied"].to_numpy(dtype=bool)
    if tied.any():
        fig.add_trace(go.Scatter(x=x[tied], y=y[tied], mode="markers", name=TIED_NAME, hoverinfo="skip",
                                 marker={"symbol": "circle-open", "size": 20, "color": "#444", "line": {"width": 2}}))
    chosen = table["chosen"].to_numpy(dtype=bool)
    if chosen.any():
        fig.add_trace(go.Scatter(x=x[chosen], y=y[chosen], mode="markers", hoverinfo="skip",
                                 name=f"chosen: {table['trial_id'][chosen].iloc[0]}",
                                 marker={"symbol": "star", "size": 18, "color": BEST_COLOR,
                                         "line": {"color": "white", "width": 1}}))
    better = "higher" if mode == "max" else "lower"
    fig.update_layout(template=TEMPLATE, title={"text": agreement_title(metric, len(table), rank_agreement(x, y)),
                                                "font": {"size": 15}},
                      height=460, hovermode="closest",
                      legend={"orientation": "h", "yanchor": "bottom", "y": 1.0, "x": 0},
                      margin={"l": 60, "r": 20, "t": 110, "b": 60})
    fig.update_xaxes(title=f"{metric} on the {part_name('validation', protocol)}, {better} is better")
    fig.update_yaxes(title=f"{metric} on the {part_name('test', protocol)}")
    return fig


def history_figure(df: pd.DataFrame, metric: str = "aupro", mode: str = "max", part: str = "") -> go.Figure:
    """The objective of every finished trial in start order, with the best completed trial so far."""
    df = prepare(df)
    title = f"{on_part(metric, part)}, {mode}, per trial in start order"
    done, stopped, running = (with_value(df, status, metric) for status in (COMPLETED, STOPPED, RUNNING))
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
            customdata=np.stack([done["trial_id"], [describe(params_of(r)) + duplicate_note(r) for _, r in done.iterrows()]],
                                axis=1),
            hovertemplate=f"trial %{{customdata[0]}} (#%{{x}})<br>{metric} %{{y:.4f}}<br>%{{customdata[1]}}<extra></extra>",
        ))
        duplicates = done[done["duplicate_of"].notna()] if "duplicate_of" in done else done.iloc[0:0]
        if not duplicates.empty:
            fig.add_trace(go.Scatter(
                x=duplicates["number"], y=duplicates[metric], mode="markers", name="duplicate (answered from a record)",
                marker={"color": "white", "size": 5, "symbol": "x-thin", "line": {"color": "white", "width": 2}},
                hoverinfo="skip"))
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
    fig.update_yaxes(title=on_part(metric, part))
    return fig


def _label(value: Any) -> str:
    """A category label; a whole float (an int choice read back from a table with gaps) loses its ".0"."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def _dimension(label: str, values: Sequence[Any], dist: Any = None) -> dict[str, Any]:
    """A parallel-coordinates axis: categories as ticks, numbers (log10 for log ranges), n/a below the range."""
    present = [v for v in values if not missing(v)]
    has_na = len(present) < len(values)
    categorical = isinstance(dist, optuna.distributions.CategoricalDistribution) or any(
        isinstance(v, (str, bool)) for v in present)
    if categorical:
        order = [_label(c) for c in getattr(dist, "choices", [])]
        seen = {_label(v) for v in present}
        labels = [NA] if has_na else []
        labels += [c for c in order if c in seen] + sorted(seen - set(order))
        index = {name: i for i, name in enumerate(labels)}
        encoded = [index[NA if missing(v) else _label(v)] for v in values]
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
    encoded = [na_at if missing(v) else to_axis(float(v)) for v in values]
    ticks = list(np.linspace(lo, hi, 5))
    text = [short_value(10 ** t if log and low > 0 else (round(t) if isinstance(dist, optuna.distributions.IntDistribution) else t))
            for t in ticks]
    if has_na:
        ticks, text = [na_at, *ticks], [NA, *text]
    return {"label": label, "values": encoded, "tickvals": ticks, "ticktext": text,
            "range": [na_at if has_na else lo, hi]}


def parallel_figure(df: pd.DataFrame, metric: str = "aupro", mode: str = "max",
                    dists: Mapping[str, Any] | None = None, part: str = "") -> go.Figure:
    """Parallel coordinates of the completed trials: backbone, layers, head, head settings, objective."""
    df = prepare(df)
    title = f"Completed trials: parameters coloured by {on_part(metric, part)}"
    done = with_value(df, COMPLETED, metric)
    if done.empty:
        return note_figure("No completed trial yet.", title)
    dists = dict(dists or {})
    params = [c[len("param."):] for c in done.columns if c.startswith("param.") and done[c].notna().any()]
    layer_keys = [p for p in params if p.endswith(".layers")]
    dims = []
    if "backbone" in params:
        dims.append(_dimension("backbone", done["param.backbone"].tolist(), dists.get("backbone")))
    if layer_keys:
        layers = [next((row[f"param.{k}"] for k in layer_keys if not missing(row[f"param.{k}"])), None)
                  for _, row in done.iterrows()]
        dims.append(_dimension("layers", layers))
    if "head" in params:
        dims.append(_dimension("head", done["param.head"].tolist(), dists.get("head")))
    for key in sorted(p for p in params if p not in ("backbone", "head") and p not in layer_keys):
        dims.append(_dimension(key, done[f"param.{key}"].tolist(), dists.get(key)))
    values = done[metric].to_numpy(dtype=float)
    dims.append({"label": on_part(metric, part), "values": values, "range": [float(values.min()), float(values.max())]
                 if values.max() > values.min() else [float(values.min()) - 0.01, float(values.max()) + 0.01]})
    fig = go.Figure(go.Parcoords(
        dimensions=dims, labelangle=0, labelside="top",
        line={"color": values, "colorscale": "Viridis", "reversescale": mode == "min", "showscale": True,
              "colorbar": {"title": {"text": on_part(metric, part)}, "thickness": 14}},
        labelfont={"size": 13}, tickfont={"size": 11}, rangefont={"size": 1, "color": "rgba(0,0,0,0)"},
    ))
    fig.update_layout(template=TEMPLATE, title=f"{title} ({len(done)} trials; n/a = setting of another head)",
                      height=460, margin={"l": 150, "r": 60, "t": 110, "b": 40})
    return fig


def importance_figure(sets: Sequence[ImportanceSet], metric: str = "aupro", notes: Sequence[str] = (),
                      evaluator: str = "fANOVA", part: str = "") -> go.Figure:
    """One horizontal bar panel per set of trials (see :func:`param_importances`)."""
    title = f"{evaluator} importance for {on_part(metric, part)}, per set of complete trials, on the parameters the set shares"
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


def pareto_figure(df: pd.DataFrame, quality: tuple[str, str] = ("aupro", "max"),
                  cost: tuple[str, str] = ("ms_per_image", "min"), part: str = "") -> go.Figure:
    """Quality vs cost of the completed trials, the non-dominated ones highlighted and joined."""
    df = prepare(df)
    (qm, qmode), (cm, cmode) = quality, cost
    title = f"{on_part(qm, part)} vs {cm}: the Pareto front of the completed trials"
    done = with_value(df, COMPLETED, qm)
    done = done[done[cm].notna()] if cm in done else done.iloc[0:0]
    if done.empty:
        return note_figure("No completed trial yet.", title)
    front = pareto_mask(done[qm], done[cm], qmode, cmode)

    def hover(rows: pd.DataFrame) -> tuple[np.ndarray, str]:
        data = np.stack([rows["trial_id"], [describe(params_of(r)) for _, r in rows.iterrows()],
                         rows["fit_seconds"].map(lambda v: "?" if missing(v) else f"{v:.2f}")], axis=1)
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
    fig.update_yaxes(title=f"{on_part(qm, part)}, {'higher' if qmode == 'max' else 'lower'} is better")
    return fig


def log_ticks(low: float, high: float) -> list[float]:
    """1-2-5 ticks covering [low, high] (every integer multiple when that gives fewer than 3)."""
    exponents = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
    for mantissas in ((1, 2, 5), tuple(range(1, 10))):
        ticks = [m * 10.0 ** e for e in exponents for m in mantissas if low * 0.95 <= m * 10.0 ** e <= high * 1.05]
        if len(ticks) >= 3:
            break
    return ticks


def category_heatmap(df: pd.DataFrame, categories: Sequence[str] | None = None, metric: str = "aupro",
                     mode: str = "max", top: int = TOP_N, cell_metric: str = "aupro", part: str = "") -> go.Figure:
    """Per-category `cell_metric` (pixel AUPRO) of the `top` completed trials by the objective."""
    df = prepare(df)
    name = on_part(cell_metric.upper() if cell_metric == "aupro" else cell_metric, part)
    title = f"Pixel {name} per category, top {top} completed trials by {metric}"
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
        z=z, x=labels, y=rows, colorscale="Viridis", colorbar={"title": {"text": on_part(cell_metric, part)}, "thickness": 14},
        text=[[("" if missing(v) else f"{v:.3f}") for v in r] for r in z], texttemplate="%{text}",
        textfont={"size": 11}, customdata=custom, xgap=2, ygap=2,
        hovertemplate="%{x}<br>%{y}: %{z:.4f}<br>%{customdata}<extra></extra>",
    ))
    fig.update_layout(template=TEMPLATE, title=title, height=150 + 42 * len(rows),
                      margin={"l": 90, "r": 20, "t": 60, "b": 90})
    fig.update_yaxes(autorange="reversed", title="category (fidelity order)")
    fig.update_xaxes(title="trial (rank by the objective)", tickangle=-30)
    return fig


def comparison_figure(df: pd.DataFrame, metric: str = "aupro", mode: str = "max", part: str = "") -> go.Figure:
    """The objective per backbone and per head (boxes over completed trials, stopped ones as grey rings)."""
    df = prepare(df)
    title = f"{on_part(metric, part)} per backbone and per head"
    done, stopped = with_value(df, COMPLETED, metric), with_value(df, STOPPED, metric)
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
            cut = stopped[stopped[key].astype(str) == group]
            if not cut.empty:
                fig.add_trace(go.Scatter(
                    x=[group] * len(cut), y=cut[metric], mode="markers", name="stopped early (partial mean)",
                    legendgroup="stopped", showlegend=not legend["stopped"],
                    marker={"color": GREY, "size": 8, "symbol": "circle-open", "line": {"width": 2}},
                    customdata=np.stack([cut["trial_id"], cut["categories_done"].astype(str)], axis=1),
                    hovertemplate=f"trial %{{customdata[0]}}, stopped after %{{customdata[1]}} categories<br>{metric} %{{y:.4f}}<extra></extra>",
                ), row=1, col=col)
                legend["stopped"] = True
    fig.update_yaxes(title=on_part(metric, part), row=1, col=1)
    fig.update_layout(template=TEMPLATE, title=title, height=440, boxmode="overlay",
                      legend={"orientation": "h", "yanchor": "bottom", "y": 1.1, "x": 1, "xanchor": "right"},
                      margin={"l": 60, "r": 20, "t": 90, "b": 60})
    return fig
