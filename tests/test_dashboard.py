"""The run dashboard on a synthetic run folder: sections, figures, failures, a run with nothing finished,
the selection protocol (holdout, synthetic, few_shot or test), the finalised trials (validation vs test) and
the scatter of their validation against test figures with Kendall's tau.

No Ray and no browser here (tests/test_dashboard_browser.py renders the page in Chromium).
"""
from __future__ import annotations

import copy
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import optuna
import plotly.graph_objects as go
import pytest
import yaml
from plotly.offline import get_plotlyjs
from scipy.stats import kendalltau, spearmanr

from anoseg.metrics import CATEGORY_METRICS, QUALITY_METRICS
from search.dashboard import FIGURE_IDS, SECTION_IDS, load_run, write_dashboard
from search.dashboard.data import (error_line, example_category, final_table, load_study, param_importances,
                                   pareto_mask, tied_with_best)
from search.dashboard.figures import (GREY, NA, NO_VALUE, TIED_NAME, agreement_figure,
                                      build_figures, category_heatmap, comparison_figure, final_figure,
                                      history_figure, importance_figure, parallel_figure, pareto_figure)
from search.dashboard.page import failures_html, summary_html
from search.finalize import reported_on, selected_on
from search.run_dir import RunDir
from search.space_optuna import distributions, layer_choice
from search.space_schema import validate_space
from tests.search_helpers import TINY_SPACE

CATEGORIES = ["brick", "grass", "gravel", "washer"]
FAILED_ERROR = "DataError: cannot read image /data/washer/test/good/000.png: cannot identify image file"
CRASH_ERROR = ("Failure # 1 (occurred at 2026-01-01_00-00-00)\nTraceback (most recent call last):\n"
               "  File \"/x/ray/worker.py\", line 1, in run\n    raise WorkerCrashedError()\n"
               "ray.exceptions.WorkerCrashedError: The worker died unexpectedly while executing this task.")
#: The random-init resnet18 configuration the examples test refits (fast on the CPU).
RESNET_CONFIG = {"backbone": {"name": "resnet18", "weights": "none"}, "layers": ["layer1", "layer2"], "image_size": 64,
                 "head": {"name": "padim", "n_features": 16}}
PLOTLY_JS_MARK = "* plotly.js v"  # the licence header that opens the embedded bundle


def _space_dict(data_root: str) -> dict[str, Any]:
    space = copy.deepcopy(TINY_SPACE)
    space["name"] = "synth"
    space["dataset"] = {"root": data_root, "categories": CATEGORIES, "image_size": 64}
    return space


def _params(i: int) -> dict[str, Any]:
    layers = [["layer1"], ["layer1", "layer2"]][i % 2]
    params: dict[str, Any] = {"backbone": "resnet18", "resnet18.layers": layer_choice(layers)}
    if i % 3 == 2:
        params.update({"head": "patchcore", "patchcore.coreset_ratio": round(0.01 * (1 + i % 5), 4)})
    else:
        params.update({"head": "padim", "padim.n_features": 8 + (7 * i) % 57})
    return params


def _config(params: dict[str, Any]) -> dict[str, Any]:
    head = params["head"]
    settings = {k.split(".", 1)[1]: v for k, v in params.items() if k.startswith(f"{head}.")}
    return {"backbone": {"name": "resnet18", "weights": "none"}, "layers": params["resnet18.layers"].split("+"),
            "image_size": 64, "head": {"name": head, **settings}, "batch_size": 16, "seed": 0, "device": "cpu"}


def _per_category(rng: np.random.Generator, quality: float, n: int) -> dict[str, dict[str, float]]:
    """Every metric of anoseg.metrics per category: aupro noisy around `quality`, the other quality metrics
    derived from it, the costs random."""
    def one() -> dict[str, float]:
        values = {m: min(1.0, quality + 0.01 * i) for i, m in enumerate(QUALITY_METRICS)}
        values.update({"aupro": float(np.clip(quality + rng.normal(0, 0.02), 0, 1)), "miss_rate_0.05": 1 - quality,
                       "fit_seconds": float(rng.uniform(0.2, 2)), "ms_per_image": float(rng.uniform(5, 60))})
        return values

    return {cat: one() for cat in CATEGORIES[:n]}


def _means(per_category: dict[str, dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([m[k] for m in per_category.values()])) for k in CATEGORY_METRICS}


def make_run(root: Path, data_root: str | Path = "/nonexistent/data", *, completed: int = 6, stopped: int = 2,
             failed: bool = True, running: int = 1, best_config: dict[str, Any] | None = None, name: str = "synth",
             protocol: str | None = None) -> Path:
    """A run folder as a search leaves it: run.json, space.yaml, records and a matching Optuna study.

    `completed` trials saw every category, `stopped` ones 1-2, one `failed` (an unreadable image), one
    `error` (a crashed worker) and one `lost` record when `failed`, `running` ones mid-way. The best
    completed trial gets `best_config` as its recorded configuration when given. With `protocol` ("holdout",
    "synthetic", "few_shot" or "test") run.json records the selection settings; without, the run is one from before selection
    existed. :func:`finalize_fake` then adds what ``anoseg search finalize`` writes.
    """
    rng = np.random.default_rng(0)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    path = root / name
    path.mkdir(parents=True)
    space = _space_dict(str(data_root))
    if protocol:
        space["selection"] = {"protocol": protocol, "validation_share": 0.5, "seed": 0, "top_k": 3, "bootstrap": 200}
    (path / "space.yaml").write_text(yaml.safe_dump(space, sort_keys=False))
    run = RunDir(path)
    run.write_space(validate_space(space, "synth.yaml"))
    meta = {"name": name, "run_path": str(path.resolve()), "space_source": "synth.yaml", "data_root": str(data_root),
            "categories": CATEGORIES, "objectives": [{"metric": "aupro", "mode": "max"}],
            "study_name": f"{name}-20260101-000000", "storage": run.study_url, "address": None,
            "created": 1.7e9, "status": "running" if running else "finished", "last_start": 1.7e9, "wall_seconds": 93.0}
    if protocol:
        meta["selection"] = {**validate_space(space, "synth.yaml").selection, "split": {c: {} for c in CATEGORIES}}
    run.write_meta(meta)
    dists = distributions(validate_space(space, "synth.yaml"))
    study = optuna.create_study(study_name=meta["study_name"], storage=meta["storage"], direction="maximize")

    def add(trial_id: str, i: int, status: str, n_done: int, quality: float, **extra: Any) -> dict[str, Any]:
        params = _params(i)
        per = _per_category(rng, quality, n_done)
        fields: dict[str, Any] = {"status": status, "started": 1.7e9 + 10 * i, "params": params, "per_category": per,
                                  "metrics": {**_means(per), "peak_rss_mb": 900.0, "peak_gpu_mb": None} if per else {},
                                  "step": n_done, "config": _config(params), **extra}
        if status != "running":
            fields["ended"] = 1.7e9 + 10 * i + 5
        record = run.update_record(trial_id, **fields)
        trial_dists = {k: dists[k] for k in params}
        if status == "completed":
            study.add_trial(optuna.trial.create_trial(params=params, distributions=trial_dists, value=record["metrics"]["aupro"]))
        elif status == "stopped":
            study.add_trial(optuna.trial.create_trial(params=params, distributions=trial_dists, state=optuna.trial.TrialState.PRUNED,
                                                      intermediate_values={n_done: record["metrics"]["aupro"]}))
        elif status in ("failed", "error"):
            study.add_trial(optuna.trial.create_trial(params=params, distributions=trial_dists, state=optuna.trial.TrialState.FAIL))
        return record

    i = 0
    for k in range(completed):
        add(f"c{k:07d}", i, "completed", 4, 0.80 + 0.03 * k, stop_reason="evaluated every category")
        i += 1
    if completed and best_config is not None:  # the last completed trial is the best one
        run.update_record(f"c{completed - 1:07d}", config=best_config)
    for k in range(stopped):
        add(f"s{k:07d}", i, "stopped", 1 + k % 2, 0.7, stop_reason=f"stopped early after {1 + k % 2}/4 categories")
        i += 1
    if failed:
        add("f0000000", i, "failed", 3, 0.85, error=FAILED_ERROR, stop_reason="raised an error")
        add("e0000000", i + 1, "error", 0, 0.0, error=CRASH_ERROR, stop_reason="crashed after 3 retries")
        add("l0000000", i + 2, "lost", 0, 0.0, stop_reason="started just before the driver died")
        i += 3
    for k in range(running):
        add(f"r{k:07d}", i, "running", k % 2, 0.9)
        i += 1
    run.write_table()
    return path


def finalize_fake(path: Path, top_k: int = 3, *, parts: Sequence[str] | None = None, notes: Sequence[str] = (),
                  test_offsets: Sequence[float] | None = None) -> dict[str, Any]:
    """What search.finalize writes for the top `top_k` completed trials (run.json ``final``, each record's
    ``final``, the table's finalised columns), with made-up test figures: the second trial is tied with the
    best, the third is not; the best is chosen. `parts` defaults to validation and test under every protocol
    but test (["validation"]: a dataset without real defects, with `notes` saying so); the test figure of the
    trial of search rank r is its validation figure plus ``test_offsets[r - 1]`` (default ``-0.01 * r``).
    Returns ``final``."""
    run = RunDir(path)
    meta = run.read_meta()
    protocol = (meta.get("selection") or {}).get("protocol", "test")
    parts = list(parts or (["validation", "test"] if protocol != "test" else ["test"]))
    done = [r for r in run.records() if r["status"] == "completed"]
    ranked = sorted(done, key=lambda r: -r["metrics"]["aupro"])[:top_k]
    best = ranked[0]["trial_id"]
    trials = []
    for rank, rec in enumerate(ranked, start=1):
        searched = rec["metrics"]["aupro"]  # what the trial was ranked on: validation part (holdout) or test set
        offset = test_offsets[rank - 1] if test_offsets is not None else -0.01 * rank
        figures = {"validation": searched, "test": searched + offset} if protocol != "test" else {"test": searched}
        figures = {part: value for part, value in figures.items() if part in parts}
        entry: dict[str, Any] = {"trial_id": rec["trial_id"], "search_rank": rank, "tied": rank <= 2,
                                 "difference_interval": [-0.02 * rank, 0.0 if rank == 1 else 0.03 - 0.02 * rank],
                                 "compared_with": best}
        for part, value in figures.items():
            entry[part] = {**rec["metrics"], "aupro": value}
            entry[f"{part}_interval"] = {"aupro": [value - 0.02, value + 0.01 * rank]}
        trials.append(entry)
    final = {"protocol": protocol, "objective": {"metric": "aupro", "mode": "max"}, "objectives": meta["objectives"],
             "prefer": "best", "chosen": best, "best_by_search": best, "pareto": [], "bootstrap": 200, "level": 0.95,
             "parts": parts, "notes": list(notes), "trials": trials, "seconds": 12.0, "bootstrap_seconds": 3.1}
    for entry in trials:
        run.update_record(entry["trial_id"], final={**entry, "chosen": entry["trial_id"] == best, "protocol": protocol})
    run.update_meta(final=final)
    run.write_table()
    return final


@pytest.fixture
def run_path(tmp_path: Path) -> Path:
    return make_run(tmp_path)


def test_dashboard_has_every_section_once_with_plotly_embedded_once(run_path):
    out = write_dashboard(run_path, examples=0)
    assert out == run_path / "dashboard.html"
    page = out.read_text()
    for sid in SECTION_IDS:
        assert page.count(f"<section id='{sid}'>") == 1, sid
    for fid in FIGURE_IDS:
        assert page.count(f'id="{fid}-plot"') == 1, fid
    assert page.count(PLOTLY_JS_MARK) == 1, "plotly.js must be embedded exactly once"
    own = page.replace(get_plotlyjs(), "")  # the page without the bundle (which names URLs it never loads here)
    assert "<script src=" not in own and "https://" not in own, "the page must not load anything from the network"
    # header: run facts and the best trial
    assert "brick → grass → gravel → washer" in page and "aupro (max)" in page
    for text in ("6 completed", "2 stopped", "1 running", "1 failed", "1 error", "1 lost"):
        assert text in page, text
    assert "Best trial <code>c0000005</code>" in page
    # failures: the count, the error messages (the crash reduced to its exception line), the stop reasons
    assert "Failed trials (3)" in page and "3 failed trials (of 12)" in page
    assert error_line(FAILED_ERROR) in page.replace("&#x27;", "'")
    assert "ray.exceptions.WorkerCrashedError: The worker died unexpectedly" in page
    assert "crashed after 3 retries" in page and "raised an error" in page
    assert "Examples skipped" in page
    assert "anoseg 0.1.0" in page and "Generated " in page


def test_dashboard_out_path_and_rerender_while_running(run_path, tmp_path):
    out = write_dashboard(run_path, out=tmp_path / "elsewhere" / "d.html", examples=0)
    assert out.is_file() and not (run_path / "dashboard.html").exists()
    assert "The search is still running" in out.read_text()
    # a trial finishes: the next render shows it
    RunDir(run_path).update_record("r0000000", status="failed", error="OSError: disk full", ended=time.time())
    assert "OSError: disk full" in write_dashboard(run_path, out=out, examples=0).read_text()


def test_run_with_no_finished_trial_renders(tmp_path):
    path = make_run(tmp_path, completed=0, stopped=0, failed=False, running=2)
    page = write_dashboard(path, examples=4).read_text()
    assert "No trial has evaluated every category yet" in page
    assert NO_VALUE in page or "No completed trial yet." in page
    assert "parameter importance needs at least 2" in page
    assert "No completed trial yet: examples come" in page
    for sid in SECTION_IDS:
        assert f"<section id='{sid}'>" in page


def test_empty_run_without_records_or_study(tmp_path):
    path = tmp_path / "empty"
    RunDir(path).write_meta({"name": "empty", "data_root": "/nowhere", "categories": ["a", "b"],
                             "objectives": [{"metric": "aupro", "mode": "max"}], "study_name": "empty-1",
                             "storage": f"sqlite:///{(path / 'optuna.db').resolve()}", "status": "running"})
    page = write_dashboard(path, examples=0).read_text()
    assert "the Optuna study could not be read" in page and "space.yaml is missing" in page
    assert not (path / "optuna.db").exists(), "reading the dashboard must not create a study database"
    assert page.count(PLOTLY_JS_MARK) == 1


def test_missing_data_root_gives_a_note(run_path):
    page = write_dashboard(run_path, examples=2).read_text()
    assert "The data root /nonexistent/data is not available here: no examples." in page


def test_examples_on_the_synthetic_dataset(tmp_path, synthetic_root):
    path = make_run(tmp_path, data_root=synthetic_root, best_config=RESNET_CONFIG, failed=False, running=0)
    page = write_dashboard(path, examples=1).read_text()
    assert page.count('<img src="data:image/png;base64,') == 1
    assert "fitted again on <b>" in page and "image score" in page


# ----------------------------------------------------------------------------------------------- figures


@pytest.fixture
def table(run_path):
    return load_run(run_path).df


def _has_data(fig: go.Figure) -> bool:
    return isinstance(fig, go.Figure) and len(fig.data) > 0


def test_history_figure(table):
    fig = history_figure(table, "aupro", "max")
    assert _has_data(fig)
    names = [t.name for t in fig.data]
    assert "completed" in names and "best so far" in names and any(n.startswith("stopped early") for n in names)
    best = next(t for t in fig.data if t.name == "best so far")
    assert list(best.y) == sorted(best.y), "best so far never decreases for a max objective"
    stopped = next(t for t in fig.data if t.name.startswith("stopped early"))
    assert stopped.marker.color == GREY


def test_parallel_figure_encodes_categories_and_conditional_settings(table, run_path):
    space = load_run(run_path).space
    fig = parallel_figure(table, "aupro", "max", distributions(space))
    assert _has_data(fig)
    dims = {d.label: d for d in fig.data[0].dimensions}
    assert {"backbone", "layers", "head", "padim.n_features", "patchcore.coreset_ratio", "aupro"} <= set(dims)
    assert list(dims["head"].ticktext) == ["padim", "patchcore"]
    assert NA in dims["padim.n_features"].ticktext  # a patchcore trial has no n_features
    assert len(dims["aupro"].values) == 6


def test_importance_per_common_and_per_head_parameters(run_path):
    study = load_study(load_run(run_path).meta)
    sets, notes = param_importances(study)
    labels = [s.label for s in sets]
    assert labels[0] == "all 6 complete trials"
    assert set(sets[0].importances) <= {"head", "resnet18.layers", "backbone"} and "head" in sets[0].importances
    padim = next(s for s in sets if s.label.startswith("head = padim"))
    assert "padim.n_features" in padim.importances
    assert abs(sum(padim.importances.values()) - 1) < 1e-6
    assert _has_data(importance_figure(sets, "aupro", notes))


def test_importance_needs_two_complete_trials(tmp_path):
    study = optuna.create_study()
    study.add_trial(optuna.trial.create_trial(params={"x": 1.0}, distributions={"x": optuna.distributions.FloatDistribution(0, 2)}, value=1.0))
    sets, notes = param_importances(study)
    assert sets == [] and "needs at least 2" in notes[0]
    fig = importance_figure(sets, "aupro", notes)
    assert "needs at least 2" in fig.layout.annotations[0].text


def test_pareto_figure_and_mask(table):
    mask = pareto_mask([0.9, 0.8, 0.95, 0.7], [10, 5, 20, 30])
    assert mask.tolist() == [True, True, True, False]
    fig = pareto_figure(table)
    assert _has_data(fig)
    front = next(t for t in fig.data if t.name.startswith("Pareto front"))
    xs, ys = np.array(front.x, dtype=float), np.array(front.y, dtype=float)
    assert (np.diff(xs) >= 0).all() and (np.diff(ys) >= 0).all(), "along the front, more cost buys more quality"
    assert "resnet18 [" in front.customdata[0][1]  # hover shows the configuration


def test_category_heatmap(table):
    fig = category_heatmap(table, CATEGORIES, "aupro", "max", top=4)
    assert _has_data(fig)
    heat = fig.data[0]
    assert list(heat.y) == [*CATEGORIES, "mean"] and len(heat.x) == 4
    assert heat.x[0] == "1. c0000005"
    assert category_heatmap(table, CATEGORIES, "aupro", "max").data[0].z is not None


def test_comparison_figure(table):
    fig = comparison_figure(table, "aupro", "max")
    assert _has_data(fig)
    assert {t.x[0] for t in fig.data if t.type == "box"} == {"resnet18", "padim", "patchcore"}


def test_failures_html_and_error_line(table):
    text = failures_html(table)
    assert "3 failed trials" in text and "f0000000" in text and "e0000000" in text and "l0000000" in text
    assert error_line(CRASH_ERROR).startswith("ray.exceptions.WorkerCrashedError")
    assert error_line("ValueError: bad\nmore") == "ValueError: bad"
    assert error_line(None) == ""


def test_figures_on_an_empty_table_hold_a_note():
    from search.run_dir import collate

    empty = collate([], {"categories": CATEGORIES})
    for fig in (history_figure(empty), parallel_figure(empty), pareto_figure(empty),
                category_heatmap(empty, CATEGORIES), comparison_figure(empty)):
        assert isinstance(fig, go.Figure) and not fig.data and fig.layout.annotations


def test_example_category_is_the_weakest():
    row = {"brick/aupro": 0.9, "grass/aupro": 0.7, "gravel/aupro": None}
    assert example_category(row, ["brick", "grass", "gravel"])[0] == "grass"
    assert example_category({}, ["brick", "grass"])[0] == "brick"


HEAVY = ("torch", "timm", "torchvision", "ray")


def _heavy_imports(code: str) -> list[str]:
    """The model-stack / Ray modules a fresh interpreter has imported after running `code`."""
    probe = f"{code}\nimport sys; print(sorted(set({HEAVY!r}) & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout.strip().splitlines()[-1])


def test_dashboard_and_examples_import_without_the_model_stack():
    assert _heavy_imports("import search.dashboard, search.examples") == []


def test_dashboard_without_examples_imports_no_model_stack(run_path, tmp_path):
    code = f"import search.dashboard as d; d.write_dashboard({str(run_path)!r}, {str(tmp_path / 'd.html')!r}, examples=0)"
    assert _heavy_imports(code) == []


def test_cli_entry(run_path, tmp_path):
    from anoseg.cli import main

    out = tmp_path / "cli.html"
    assert main(["dashboard", str(run_path), "--out", str(out), "--examples", "0"]) == 0
    assert out.is_file() and "<section id='history'>" in out.read_text()


def test_duplicates_are_marked(run_path):
    run = RunDir(run_path)
    run.update_record("c0000001", duplicate_of="c0000000")
    page = write_dashboard(run_path, examples=0).read_text()
    assert "1 duplicate: an effective configuration already run" in page
    assert "duplicate of c0000000" in page and "duplicate (answered from a record)" in page
    fresh = write_dashboard(make_run(run_path.parent, name="plain"), examples=0).read_text()
    assert "duplicate of c" not in fresh and "already run, answered from its record" not in fresh


# ----------------------------------------------------------------------------------------------- selection protocol


def _trace(fig: go.Figure, name: str) -> Any:
    return next(t for t in fig.data if t.name and t.name.startswith(name))


@pytest.fixture
def holdout_run(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    path = make_run(tmp_path, protocol="holdout", running=0)
    return path, finalize_fake(path)


def test_final_figure_holdout_has_intervals_chosen_and_tied(holdout_run):
    path, final = holdout_run
    data = load_run(path)
    assert data.protocol == "holdout" and data.part == "validation part"
    assert {"chosen", "tied", "test/aupro", "aupro_low", "test/aupro_high"} <= set(data.df.columns)
    fig = build_figures(data)["final"]
    assert "validation part (ranked on) vs test part (never used to choose)" in fig.layout.title.text
    by_id = {t["trial_id"]: t for t in final["trials"]}
    order = [t["trial_id"] for t in sorted(final["trials"], key=lambda t: t["search_rank"])]
    for part, name in (("validation", "validation part"), ("test", "test part")):
        trace = _trace(fig, name)
        low, high = np.array([by_id[t][f"{part}_interval"]["aupro"] for t in order]).T
        y = np.array(trace.y, dtype=float)
        assert np.allclose(y, [by_id[t][part]["aupro"] for t in order])
        assert trace.error_y.visible and np.allclose(y + np.array(trace.error_y.array), high)
        assert np.allclose(y - np.array(trace.error_y.arrayminus), low)
    assert list(fig.layout.xaxis.ticktext) == [f"{i}. {t}" for i, t in enumerate(order, start=1)]
    chosen = _trace(fig, "chosen: ")
    assert chosen.name == f"chosen: {final['chosen']}"
    assert list(chosen.y) == [by_id[final["chosen"]]["test"]["aupro"]]  # starred on the reported part
    assert fig.layout.shapes, "the chosen trial's column is shaded"
    tied = _trace(fig, TIED_NAME)
    assert tied_with_best(final) == [order[1]]  # the best itself is not counted
    assert list(tied.y) == [by_id[order[1]]["validation"]["aupro"]]
    table = final_table(final, "aupro")
    assert table["chosen"].tolist() == [True, False, False] and table["tied"].tolist() == [False, True, False]


def test_summary_and_labels_holdout(holdout_run):
    path, final = holdout_run
    page = write_dashboard(path, examples=0).read_text()
    assert page.count("<section id='final'>") == 1 and "<h2>Validation vs test</h2>" in page
    assert "ranked on the validation part; final figures on the test part" in page
    chosen = next(t for t in final["trials"] if t["trial_id"] == final["chosen"])
    assert f"Chosen trial <code>{final['chosen']}</code>" in page
    for part in ("validation", "test"):
        low, high = chosen[f"{part}_interval"]["aupro"]
        assert f"{chosen[part]['aupro']:.4f}</td><td>[{low:.4f}, {high:.4f}]" in page, part
    tied = tied_with_best(final)[0]
    assert f"1 of the other 2 finalised trials tied with the best ({tied})" in page
    assert "Bootstrap: 200 resamples, 3.1 s (3.3% of the search's wall time" in page
    assert "selected on the test set" not in page and "Not finalised yet" not in page
    # the table's figures say they were measured on the validation part
    assert "on the validation part: " in page and "metrics on the validation part" in page
    figs = build_figures(load_run(path))
    for fid in ("history", "parallel", "importance", "pareto", "heatmap", "comparison"):
        assert "(validation part)" in figs[fid].layout.title.text, fid
    assert figs["history"].layout.yaxis.title.text == "aupro (validation part)"


def test_protocol_test_is_selected_on_the_test_set(tmp_path):
    path = make_run(tmp_path, protocol="test", running=0)
    final = finalize_fake(path)
    data = load_run(path)
    fig = final_figure(data.final, protocol=data.protocol)
    assert "selected on the test set" in fig.layout.title.text
    series = [t for t in fig.data if t.error_y and t.error_y.visible]
    assert len(series) == 1 and series[0].name.startswith("test set")
    low, high = next(t for t in final["trials"] if t["search_rank"] == 1)["test_interval"]["aupro"]
    assert np.isclose(series[0].y[0] + series[0].error_y.array[0], high)
    assert np.isclose(series[0].y[0] - series[0].error_y.arrayminus[0], low)
    page = write_dashboard(path, examples=0).read_text()
    assert "selected on the test set: figures optimistic" in page and "final figures on the test part" not in page
    assert "Finalised trials (selected on the test set)" in page
    assert "aupro (test set)" in page and "(validation part)" not in page


def test_unfinalised_holdout_run_names_the_finalize_command(tmp_path):
    path = make_run(tmp_path, protocol="holdout", running=0)
    data = load_run(path)
    fig = build_figures(data)["final"]
    assert not fig.data and f"anoseg search finalize {path}" in fig.layout.annotations[0].text
    summary = summary_html(data)
    assert "Not finalised yet" in summary and f"anoseg search finalize {path}" in summary
    assert "ranked on the validation part; final figures on the test part" in summary


def test_old_run_without_selection_counts_as_selected_on_the_test_set(run_path):
    data = load_run(run_path)
    assert data.protocol == "test" and data.final is None
    summary = summary_html(data)
    assert "selected on the test set: figures optimistic" in summary and "before the selection protocol" in summary
    assert "Not finalised yet" not in summary
    fig = build_figures(data)["final"]
    assert "anoseg search finalize" in fig.layout.annotations[0].text


# ----------------------------------------------------------------------------------------------- synthetic, few_shot


@pytest.mark.parametrize("protocol", ["synthetic", "few_shot"])
def test_summary_and_labels_use_the_protocols_words(tmp_path, protocol):
    path = make_run(tmp_path, protocol=protocol, running=0)
    data = load_run(path)
    assert data.part == selected_on(protocol).removeprefix("the ").split(" (")[0]
    assert "validation set" in data.part and data.part != "validation part"
    unfinalised = summary_html(data)
    assert "Not finalised yet" in unfinalised and f"measured on the {data.part}" in unfinalised
    assert f"anoseg search finalize {path}" in build_figures(data)["final"].layout.annotations[0].text
    final = finalize_fake(path)
    data = load_run(path)
    summary = summary_html(data)
    assert f"ranked on {selected_on(protocol)}; final figures on {reported_on(protocol)}" in summary.replace("&#x27;", "'")
    assert "good images per category 20" in summary
    assert ("real defects per type 1" in summary) == (protocol == "few_shot")
    assert f"<td>{data.part} (ranked on)</td>" in summary
    assert f"<td>{reported_on(protocol).removeprefix('the ')}</td>" in summary
    assert "selected on the test set" not in summary and "validation part" not in summary
    assert f"Best trial <code>c0000005</code> by aupro (max) on the {data.part}" in summary
    figs = build_figures(data)
    assert f"{data.part} (ranked on) vs {reported_on(protocol).removeprefix('the ')}" in figs["final"].layout.title.text
    assert {t.name for t in figs["final"].data} >= {f"{data.part} (ranked on)", reported_on(protocol).removeprefix("the ")}
    for fid in ("history", "parallel", "importance", "pareto", "heatmap", "comparison"):
        assert f"({data.part})" in figs[fid].layout.title.text, fid
    page = write_dashboard(path, examples=0).read_text()
    assert "<h2>Validation vs test</h2>" in page and "Finalised trials (selected on the test set)" not in page
    assert len(_trace(figs["agreement"], "finalised trials").x) == len(final["trials"])


# ----------------------------------------------------------------------------------------------- validation vs test scatter


def test_agreement_figure_follows_the_final_figure():
    assert FIGURE_IDS.index("agreement") == FIGURE_IDS.index("final") + 1


@pytest.mark.parametrize("protocol", ["synthetic", "holdout"])
def test_agreement_scatter_with_kendall_tau(tmp_path, protocol):
    path = make_run(tmp_path, protocol=protocol, running=0)
    final = finalize_fake(path, top_k=5, test_offsets=[-0.08, 0.0, -0.05, 0.01, 0.0])
    data = load_run(path)
    fig = build_figures(data)["agreement"]
    order = sorted(final["trials"], key=lambda t: t["search_rank"])
    x, y = [t["validation"]["aupro"] for t in order], [t["test"]["aupro"] for t in order]
    points = _trace(fig, "finalised trials")
    assert np.allclose(np.array(points.x, dtype=float), x) and np.allclose(np.array(points.y, dtype=float), y)
    assert list(points.text) == [t["trial_id"] for t in order]
    tau, rho = kendalltau(x, y).statistic, spearmanr(x, y).statistic
    assert -1 < tau < 1, "the made-up figures disagree in part"
    assert f"Kendall's tau {tau:.2f}, Spearman {rho:.2f} over 5 finalised trials" in fig.layout.title.text
    # error bars from both parts' intervals
    for axis, part, values in (("error_x", "validation", x), ("error_y", "test", y)):
        bars = getattr(points, axis)
        low, high = np.array([t[f"{part}_interval"]["aupro"] for t in order]).T
        assert bars.visible and np.allclose(np.array(values) + np.array(bars.array), high)
        assert np.allclose(np.array(values) - np.array(bars.arrayminus), low)
    chosen = _trace(fig, "chosen: ")
    assert chosen.name == f"chosen: {final['chosen']}" and list(chosen.x) == [x[0]] and list(chosen.y) == [y[0]]
    assert list(_trace(fig, TIED_NAME).x) == [x[1]]
    words = data.part
    assert fig.layout.xaxis.title.text.startswith(f"aupro on the {words} (ranked on)")
    assert fig.layout.yaxis.title.text == f"aupro on the {reported_on(protocol).removeprefix('the ')}"
    page = write_dashboard(path, examples=0).read_text()
    assert page.count('id="agreement-plot"') == 1 and "Validation vs test: rank agreement" in page
    assert page.index("<section id='final'>") < page.index("<section id='agreement'>") < page.index("<section id='history'>")


@pytest.mark.parametrize("top_k", [1, 2])
def test_agreement_tau_undefined_with_fewer_than_three_trials(tmp_path, top_k):
    path = make_run(tmp_path, protocol="synthetic", running=0)
    finalize_fake(path, top_k=top_k)
    fig = build_figures(load_run(path))["agreement"]
    assert len(_trace(fig, "finalised trials").x) == top_k
    title = fig.layout.title.text
    assert "Kendall's tau undefined" in title and f"{top_k} finalised trial" in title and "at least 3" in title
    assert "Spearman" not in title


def test_agreement_tau_undefined_when_the_values_do_not_vary():
    trials = [{"trial_id": f"t{i}", "search_rank": i, "validation": {"aupro": 0.9}, "test": {"aupro": 0.8 + 0.01 * i}}
              for i in range(1, 4)]
    final = {"objective": {"metric": "aupro", "mode": "max"}, "parts": ["validation", "test"], "trials": trials,
             "chosen": "t1", "best_by_search": "t1"}
    fig = agreement_figure(final, protocol="holdout")
    assert "the values do not vary" in fig.layout.title.text
    assert not _trace(fig, "finalised trials").error_x.visible  # no intervals, no error bars


def test_run_without_real_defects_shows_the_notes_and_no_scatter(tmp_path):
    path = make_run(tmp_path, protocol="synthetic", running=0)
    note = ("no test figures: not every category has both good and defective real test images to report on "
            "(the choice rests on the validation set alone)")
    final = finalize_fake(path, parts=["validation"], notes=["brick: no defective test image", note])
    assert all("test" not in t for t in final["trials"])
    data = load_run(path)
    figs = build_figures(data)
    scatter = figs["agreement"]
    assert not scatter.data and "No test figures" in scatter.layout.annotations[0].text
    assert "brick: no defective test image" in scatter.layout.annotations[0].text
    assert _trace(figs["final"], f"{data.part} (ranked on)").y is not None  # the validation figures still show
    summary = summary_html(data)
    assert "<b>Notes</b>" in summary and "<li>brick: no defective test image</li>" in summary
    assert "the choice rests on the validation set alone" in summary
    assert f"<td>{data.part} (ranked on)</td>" in summary and "never used to choose)</td>" not in summary
    page = write_dashboard(path, examples=0).read_text()
    assert page.count("<section id='agreement'>") == 1


def test_agreement_notes_for_test_protocol_and_unfinalised_runs(tmp_path):
    path = make_run(tmp_path, protocol="test", running=0)
    finalize_fake(path)
    fig = build_figures(load_run(path))["agreement"]
    assert not fig.data and "Selected on the test set" in fig.layout.annotations[0].text
    assert "Not finalised yet" in agreement_figure(None, protocol="few_shot").layout.annotations[0].text
