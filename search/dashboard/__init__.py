"""The run dashboard: one self-contained HTML file per search run, readable offline.

``write_dashboard(run_path)`` renders ``<run>/dashboard.html`` from the run folder (run.json, the
trial records, space.yaml and the Optuna study) at any time, also while the search runs:

* :mod:`search.dashboard.data`: the run data, computed from the run folder (no plotly);
* :mod:`search.dashboard.figures`: every Plotly figure, from the prepared trial table;
* :mod:`search.dashboard.page`: the HTML page (summary, figures, failed trials, examples).

No Ray and no model stack: only the anomaly-map examples (:mod:`search.examples`) fit a model.
"""
from search.dashboard.data import RunData, load_run
from search.dashboard.figures import FIGURE_IDS
from search.dashboard.page import DASHBOARD_FILE, SECTION_IDS, render_html, write_dashboard

__all__ = ["DASHBOARD_FILE", "FIGURE_IDS", "SECTION_IDS", "RunData", "load_run", "render_html", "write_dashboard"]
