"""The dashboard page: one self-contained HTML file, plotly.js embedded once in the head.

Sections (:data:`SECTION_IDS`): the run summary (with the selection protocol and, once the run is
finalised, the chosen trial on the validation set and the test part, and finalising's notes), the figures of
:mod:`search.dashboard.figures`, the failed trials and the anomaly maps of the best trial (:mod:`search.examples`, the only part
that needs the model stack, imported when examples are drawn).
"""
from __future__ import annotations

import html
import logging
import math
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import optuna
import pandas as pd
import plotly
import yaml
from plotly.offline import get_plotlyjs

import anoseg
from anoseg.files import write_text_atomic
from anoseg.metrics import CATEGORY_METRICS
from search.dashboard.data import (FAILED_STATUSES, RunData, error_line, example_category, has_validation, load_run,
                                   missing, params_of, prepare, reported_part, status_counts, tied_with_best,
                                   wall_seconds)
from search.dashboard.figures import FIGURE_IDS, STATUS_COLORS, build_figures, part_name
from search.finalize import reported_on, selected_on
from search.run_dir import RUNNING, STOPPED, best_trial
from search.space_optuna import describe
from search.storage import StorageError, mask, run_storage

DASHBOARD_FILE = "dashboard.html"
SECTION_IDS = ("summary", *FIGURE_IDS, "failures", "examples")
PLOT_CONFIG = {"displaylogo": False, "responsive": True}

logger = logging.getLogger(__name__)


def _e(value: Any) -> str:
    return html.escape(str(value))


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours} h {minutes:02d} min" if hours else (f"{minutes} min {secs:02d} s" if minutes else f"{secs} s")


def _fmt(value: Any, digits: int = 4) -> str:
    if missing(value):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return _e(value)


def metrics_table(record: Mapping[str, Any], categories: Sequence[str]) -> str:
    """Per-category and mean metrics of one trial."""
    per = record.get("per_category", {})
    head = "".join(f"<th>{_e(k)}</th>" for k in CATEGORY_METRICS)
    body = []
    for cat in categories:
        if cat in per:
            body.append(f"<tr><td>{_e(cat)}</td>" + "".join(f"<td>{_fmt(per[cat].get(k))}</td>" for k in CATEGORY_METRICS) + "</tr>")
    mean = record.get("metrics", {})
    body.append("<tr class='mean'><td>mean</td>" + "".join(f"<td>{_fmt(mean.get(k))}</td>" for k in CATEGORY_METRICS) + "</tr>")
    return f"<table class='grid'><thead><tr><th>category</th>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def duplicates_text(df: pd.DataFrame) -> str:
    """How many completed trials repeated an effective configuration already run (answered from its record)."""
    n = int(df["duplicate_of"].notna().sum()) if "duplicate_of" in df else 0
    return (f" <span class='muted'>({n} duplicate{'s' if n != 1 else ''}: an effective configuration already "
            "run, answered from its record, not recomputed)</span>") if n else ""


def selection_html(data: RunData) -> str:
    """How the trials were chosen and what the final figures are measured on, in one line."""
    selection, protocol = data.meta.get("selection") or {}, data.protocol
    if has_validation(protocol):
        if protocol == "holdout":
            shown = {"validation share": selection.get("validation_share")}
        else:
            shown = {"good images per category": selection.get("n_images"), "from": selection.get("good_source"),
                     "defect kinds": ", ".join(selection["kinds"]) if selection.get("kinds") else None}
            if protocol == "few_shot":
                shown["real defects per type"] = selection.get("defects_per_type")
        shown = {k: v for k, v in shown.items() if v is not None}
        detail = (" <span class='muted'>(" + ", ".join(f"{k} {_e(v)}" for k, v in shown.items())
                  + f", seed {_e(selection.get('seed', '?'))})</span>") if shown else ""
        return (f"{_e(protocol)}: ranked on {_e(selected_on(protocol))}; final figures on "
                f"{_e(reported_on(protocol))}" + detail)
    why = "the trials were ranked on the images their figures are measured on"
    if not selection and not data.final:
        why += "; a run from before the selection protocol"
    return f"<span class='warn'>selected on the test set: figures optimistic</span> <span class='muted'>({why})</span>"


def _interval(values: Any) -> str:
    return f"[{_fmt(float(values[0]))}, {_fmt(float(values[1]))}]" if values and not any(missing(v) for v in values) else "–"


def final_html(data: RunData, now: float | None = None) -> str:
    """The chosen trial's objective on each part with its interval, the trials tied with the best, the bootstrap
    cost and finalising's notes; for a run with a validation set not finalised yet, a note naming
    ``anoseg search finalize``."""
    final = data.final
    if not final:
        if not has_validation(data.protocol):
            return ""
        return (f"<p class='note'>Not finalised yet: every figure on this page was measured on the {_e(data.part)} "
                f"and no trial has been evaluated on the {_e(reported_part(data.protocol))}. A search finalises "
                f"itself when it finishes; otherwise run <code>anoseg search finalize {_e(data.path)}</code>.</p>")
    metric = final.get("objective", {}).get("metric", data.metric)
    chosen = next((t for t in final.get("trials", []) if t["trial_id"] == final.get("chosen")), None)
    if chosen is None:
        return "<p class='note'>run.json's final section names no chosen trial.</p>"
    names = {part: part_name(part, data.protocol) for part in ("validation", "test")}
    if not has_validation(data.protocol):
        names = {"test": "test set (selected on the test set: figures optimistic)"}
    rows = "".join(f"<tr><td>{_e(names.get(part, part))}</td><td>{_fmt((chosen.get(part) or {}).get(metric))}</td>"
                   f"<td>{_interval((chosen.get(f'{part}_interval') or {}).get(metric))}</td></tr>"
                   for part in final.get("parts", []))
    how = ("the cheapest of the trials tied with the best" if final.get("prefer") == "cheapest_tied"
           else "the best of the search")
    return (f"<h3>Chosen trial <code>{_e(chosen['trial_id'])}</code> ({how}), {_e(metric)}</h3>"
            f"<table class='grid final'><thead><tr><th>measured on</th><th>{_e(metric)}</th>"
            f"<th>{float(final.get('level', 0.95)):.0%} interval</th></tr></thead><tbody>{rows}</tbody></table>"
            f"<p>{ties_text(final)}. <span class='muted'>{bootstrap_cost(final, wall_seconds(data.meta, now))}</span></p>"
            + notes_html(final))


def notes_html(final: Mapping[str, Any]) -> str:
    """Finalising's notes (e.g. no test figures: the dataset has no real defects), as a list; "" without."""
    notes = final.get("notes") or []
    if not notes:
        return ""
    return "<div class='note'><b>Notes</b><ul>" + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul></div>"


def ties_text(final: Mapping[str, Any]) -> str:
    """How many finalised trials are tied with the best (their difference interval holds 0), and which."""
    if not final.get("bootstrap"):
        return "No bootstrap (selection.bootstrap: 0): no intervals and no ties"
    tied = tied_with_best(final)
    named = f" ({', '.join(_e(t) for t in tied)})" if tied else ""
    return f"{len(tied)} of the other {len(final.get('trials', [])) - 1} finalised trials tied with the best{named}"


def bootstrap_cost(final: Mapping[str, Any], wall: float | None) -> str:
    """The bootstrap's resamples and seconds, as a share of the search's wall time."""
    seconds = float(final.get("bootstrap_seconds") or 0.0)
    share = f" ({seconds / wall:.1%} of the search's wall time, {_duration(wall)})" if wall else ""
    return (f"Bootstrap: {int(final.get('bootstrap') or 0)} resamples, {seconds:.1f} s{share}; "
            f"finalising took {_duration(final.get('seconds'))}.")


def summary_html(data: RunData, now: float | None = None) -> str:
    """Run facts (the selection protocol among them), trials by status, the chosen trial on each part once the
    run is finalised, the best trial of the search with its configuration and metrics."""
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
        ("selection", selection_html(data)),
        ("trials", f"{len(df)}{f' of {budget}' if budget else ''} &nbsp; {badges}" + duplicates_text(df)),
        ("wall time", _duration(wall_seconds(meta, now)) + (" (still running)" if meta.get("status") == "running" else "")),
    ]
    if data.space is not None:
        sampler = ", ".join(f"{k}={v}" for k, v in data.space.sampler.items() if v is not None)
        scheduler = ", ".join(f"{k}={v}" for k, v in data.space.scheduler.items())
        facts.append(("sampler / scheduler", _e(f"{sampler} / {scheduler}")))
    elif data.space_error:
        facts.append(("space", f"<span class='warn'>{_e(data.space_error)}</span>"))
    facts.append(("study", f"{_e(meta.get('study_name', '?'))} <span class='muted'>in {_e(mask(meta.get('storage')) or '?')}</span>"))
    try:
        facts.append(("optuna-dashboard", f"<code>optuna-dashboard {_e(run_storage(meta).dashboard_argument())}</code>"))
    except StorageError:
        pass
    rows = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in facts)
    parts = [f"<table class='kv'>{rows}</table>"]
    if meta.get("status") == "running" or counts.get(RUNNING):
        parts.append(f"<p class='note'>The search is still running ({counts.get(RUNNING, 0)} trial(s) in progress): "
                     "this page shows the state when it was generated; generate it again to update.</p>")
    parts.append(final_html(data, now))
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
        f"<h3>Best trial <code>{_e(best['trial_id'])}</code> by {_e(data.metric)} ({_e(data.mode)}) on the "
        f"{_e(data.part)}: {_fmt(best[data.metric])}</h3>"
        f"<div class='two'><div><h4>configuration</h4><pre>{_e(config_text)}</pre></div>"
        f"<div><h4>metrics on the {_e(data.part)}</h4>{metrics_table(record, data.categories)}"
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
        full = "" if missing(row.get("error")) else str(row["error"]).strip()
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
        from search.examples import TURBO, anomaly_examples

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
             f"<span class='cbar' style='background:linear-gradient(90deg,{','.join(TURBO)})'></span> {lo:.3g} … {hi:.3g}.")
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
.cbar { display:inline-block; width:90px; height:10px; vertical-align:middle; border:1px solid var(--line); }
footer { color:var(--muted); font-size:12px; padding-bottom:24px; }
"""

SECTION_TITLES = {
    "summary": "Run",
    "final": "Validation vs test",
    "agreement": "Validation vs test: rank agreement",
    "history": "Optimisation history",
    "parallel": "Parallel coordinates",
    "importance": "Parameter importance",
    "pareto": "Quality vs cost",
    "heatmap": "Per-category AUPRO of the best trials",
    "comparison": "Backbones and heads",
    "failures": "Failed trials",
    "examples": "Anomaly maps of the best trial",
}


def render_html(data: RunData, examples: int = 4, now: float | None = None) -> str:
    """The whole page as a string."""
    now = time.time() if now is None else now
    figs = build_figures(data)
    sections = [("summary", summary_html(data, now))]
    for fid, fig in figs.items():
        sections.append((fid, fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"{fid}-plot",
                                          config=PLOT_CONFIG, default_height=f"{fig.layout.height or 450}px")))
    n_failed = int(data.df["status"].isin(FAILED_STATUSES).sum()) if not data.df.empty else 0
    sections.append(("failures", failures_html(data.df)))
    sections.append(("examples", examples_html(data, examples)))
    titles = dict(SECTION_TITLES, failures=f"Failed trials ({n_failed})")
    if not has_validation(data.protocol):
        titles["final"] = "Finalised trials (selected on the test set)"
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
        f"<footer>Generated {_e(stamp)} by anoseg {_e(anoseg.__version__)} (search.dashboard) · "
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
    return write_text_atomic(target, page)
