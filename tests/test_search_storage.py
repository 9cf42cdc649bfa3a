"""Real searches on every study storage: kill + resume on the journal and on a real PostgreSQL server, two
journals side by side, and optuna-dashboard reading SQLite and journal runs with its own storage loading.

The PostgreSQL test starts a throw-away server (tests/postgres_server.py; `make postgres` installs Debian's
package). Without one it is skipped with the reason, except in CI (CI set), where it must run.
"""
from __future__ import annotations

import io
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pytest

from search.run_dir import RunDir
from search.runner import start_search
from search.storage import JOURNAL_FILE, SQLITE_FILE, run_storage
from tests.postgres_server import Unavailable, postgres_server
from tests.search_helpers import kill_search_when, read_records, resume_search_cli, write_space

pytestmark = pytest.mark.slow

PASSWORD = "an0seg-{test}@pw:/%"  # URL-special characters and braces, all handled
PASSWORD_VAR = "ANOSEG_TEST_PG_PASSWORD"
OPTUNA_STATE = {"completed": "COMPLETE", "stopped": "PRUNED", "failed": "FAIL", "error": "FAIL"}


@pytest.fixture(scope="module", autouse=True)
def embedded_ray():
    import ray

    ray.shutdown()
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def postgres():
    """A throw-away PostgreSQL server for this module; skipped (with the reason) where none can start."""
    try:
        server = postgres_server(PASSWORD)
        yield server.__enter__()
    except Unavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the PostgreSQL test, but no server could start: {exc}")
        pytest.skip(f"no PostgreSQL server here: {exc}")
    else:
        server.__exit__(None, None, None)


def _finished(run_path: Path) -> dict[str, dict]:
    return read_records(run_path, ("completed", "stopped", "failed"))


def _search_cmd(space: Path, data: Path, results: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "anoseg.cli", "search", "run", str(space), "--data", str(data),
            "--results", str(results), *extra]


def kill_and_resume(space: Path, data: Path, results: Path, trials: int) -> tuple[Path, str]:
    """Start the search, SIGKILL it after 2 finished trials, resume it; asserts nothing finished was lost or
    re-run. Returns the run folder and everything both commands printed."""
    run_path = results / "tiny"
    printed = kill_search_when(_search_cmd(space, data, results), lambda: len(_finished(run_path)) >= 2, timeout=240)
    before = _finished(run_path)
    assert 2 <= len(before) < trials, "the search must be killed mid-way for this test to mean anything"
    resumed = resume_search_cli(run_path, timeout=400)
    after = _finished(run_path)
    assert len(after) == trials, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    for trial_id, record in before.items():
        assert after[trial_id]["ended"] == record["ended"] and after[trial_id]["metrics"] == record["metrics"]
    assert f"{trials} trials of {trials}" in resumed.stdout
    return run_path, printed + resumed.stdout + resumed.stderr


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return str(a) == str(b)


def _params_key(params: dict[str, Any]) -> str:
    return json.dumps({k: float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
                       for k, v in sorted(params.items())}, sort_keys=True)


def assert_study_matches_table(study: optuna.Study, run: RunDir, metric: str = "aupro") -> None:
    """The study's trials are trials.parquet's: every completed trial COMPLETE with its value, every stopped one
    PRUNED with its last value, every failed one FAIL, with the same parameters; the only others are FAIL
    trials that Optuna handed out after Tune's last saved state before a kill (at most one per running slot
    beyond the lost records), and none is left RUNNING."""
    df = pd.read_parquet(run.path / "trials.parquet")
    records = {r["trial_id"]: r for r in run.records()}
    expected: Counter = Counter()
    values: dict[tuple[str, str], list[float]] = {}
    for row in df.itertuples():
        if row.status not in OPTUNA_STATE:
            continue
        key = (OPTUNA_STATE[row.status], _params_key(records[row.trial_id]["params"]))
        expected[key] += 1
        if row.status in ("completed", "stopped"):
            values.setdefault(key, []).append(getattr(row, metric))
    trials = study.get_trials(deepcopy=False)
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    got = Counter((t.state.name, _params_key(t.params)) for t in trials)
    extra = got - expected
    assert expected - got == Counter(), f"trials of the table missing from the study: {expected - got}"
    assert all(state == "FAIL" for state, _ in extra), f"study trials the table does not have: {extra}"
    lost = int((df["status"] == "lost").sum())
    assert sum(extra.values()) <= lost + run.space().budget["max_concurrent"]
    for t in trials:
        key = (t.state.name, _params_key(t.params))
        if key in values:
            value = t.value if t.state.name == "COMPLETE" else t.intermediate_values[max(t.intermediate_values)]
            assert any(_same(value, v) for v in values[key]), (key, value, values[key])


# ----------------------------------------------------------------------------------------------- journal


def test_journal_search_is_killed_and_resumed(synthetic_root, tmp_path):
    space = write_space(tmp_path, storage="journal", budget={"trials": 6, "max_concurrent": 2},
                        scheduler={"name": "none"})
    run_path, _ = kill_and_resume(space, synthetic_root, tmp_path / "results", trials=6)
    run = RunDir.open(run_path)
    meta = run.read_meta()
    assert meta["storage"] == f"journal://{(run_path / JOURNAL_FILE).resolve()}" == meta["storage_url"]
    assert (run_path / JOURNAL_FILE).is_file() and not (run_path / SQLITE_FILE).exists()
    study = run_storage(meta).load_study(meta["study_name"])
    assert Counter(t.state.name for t in study.trials)["COMPLETE"] == 6
    assert_study_matches_table(study, run)


def test_two_searches_write_journals_side_by_side(synthetic_root, tmp_path):
    """Two searches with different names, at the same time, in one results folder: each its own journal."""
    space = write_space(tmp_path, storage="journal", budget={"trials": 3, "max_concurrent": 1},
                        scheduler={"name": "none"})
    results = tmp_path / "results"
    procs = {name: subprocess.Popen(_search_cmd(space, synthetic_root, results, "--name", name),
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name in ("left", "right")}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=500)
        assert proc.returncode == 0, f"{name}:\n{out[-4000:]}"
    names = set()
    for name in procs:
        run = RunDir.open(results / name)
        meta = run.read_meta()
        storage = run_storage(meta)
        assert storage.path == (results / name / JOURNAL_FILE).resolve()
        summaries = optuna.get_all_study_summaries(storage.open(readonly=True))
        assert [s.study_name for s in summaries] == [meta["study_name"]]  # only its own study
        study = storage.load_study(meta["study_name"])
        assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
        assert_study_matches_table(study, run)
        names.add(meta["study_name"])
    assert len(names) == 2
    assert sorted(p.name for p in results.iterdir()) == ["left", "right"]


# ----------------------------------------------------------------------------------------------- PostgreSQL


def test_postgres_search_is_killed_and_resumed_and_never_writes_the_password(postgres, synthetic_root, tmp_path,
                                                                              monkeypatch):
    from urllib.parse import quote

    from anoseg.cli import main

    monkeypatch.setenv(PASSWORD_VAR, PASSWORD)
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray-pg-"))  # the searches' Ray logs, to look for the password
    monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))
    url = postgres.url(f"${{{PASSWORD_VAR}}}")
    space = write_space(tmp_path, storage=url, budget={"trials": 6, "max_concurrent": 2}, scheduler={"name": "none"})
    try:
        run_path, printed = kill_and_resume(space, synthetic_root, tmp_path / "results", trials=6)
        run = RunDir.open(run_path)
        meta = run.read_meta()
        assert meta["storage"] == postgres.url("***") and meta["storage_url"] == url
        assert not (run_path / SQLITE_FILE).exists() and not (run_path / JOURNAL_FILE).exists()

        # the study in PostgreSQL, read straight from the server, matches trials.parquet
        study = optuna.load_study(study_name=meta["study_name"], storage=postgres.url())
        assert Counter(t.state.name for t in study.trials)["COMPLETE"] == 6
        assert_study_matches_table(study, run)
        with postgres.connect() as conn, conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM trials JOIN studies USING (study_id) WHERE study_name = %s",
                        (meta["study_name"],))
            assert cur.fetchone()[0] == len(study.trials)

        # the readers open the same study; what they print and write shows the password masked
        captured = io.StringIO()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(sys, "stdout", captured)
            assert main(["search", "status", str(run_path)]) == 0
            assert main(["export", str(run_path), "--out", str(tmp_path / "best.yaml")]) == 0
            assert main(["dashboard", str(run_path), "--examples", "0"]) == 0
        page = (run_path / "dashboard.html").read_text()
        assert "the Optuna study could not be read" not in page
        assert postgres.url("***") in captured.getvalue() and f'optuna-dashboard "{url}"' in captured.getvalue()
        assert "anoseg:***@" in (tmp_path / "best.yaml").read_text()

        texts = {"search output": printed, "status/export/dashboard output": captured.getvalue()}
        files = [*run_path.rglob("*"), *ray_tmp.rglob("*"), tmp_path / "best.yaml", space]
        texts.update({str(p): p.read_bytes().decode("latin-1") for p in files if p.is_file() and not p.is_symlink()})
        assert len(texts) > 20 and any("tune" in name and name.endswith(".pkl") for name in texts)
        for form in {PASSWORD, quote(PASSWORD, safe=""), quote(PASSWORD)}:
            leaks = [name for name, text in texts.items() if form in text]
            assert leaks == [], f"the password ({'encoded' if form != PASSWORD else 'as is'}) is in {leaks}"
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- optuna-dashboard


def _get(app: Any, path: str) -> Any:
    """GET `path` from a WSGI app; the JSON it answers."""
    from wsgiref.util import setup_testing_defaults

    environ: dict[str, Any] = {"PATH_INFO": path, "REQUEST_METHOD": "GET"}
    setup_testing_defaults(environ)
    status: list[str] = []
    body = b"".join(app(environ, lambda s, headers, exc_info=None: status.append(s)))
    assert status and status[0].startswith("200"), (path, status, body[:500])
    return json.loads(body)


@pytest.mark.parametrize("storage", ["sqlite", "journal"])
def test_optuna_dashboard_lists_the_run_as_recorded(synthetic_root, tmp_path, storage):
    """optuna-dashboard's own loading (the argument `search status` prints, as its command line takes it) and its
    API: the study, every trial with its parameters, value and state. Trials on a backbone whose weights file is
    damaged FAIL (the preflight only sees that it is there and readable), ASHA prunes some, the rest COMPLETE."""
    from optuna_dashboard import wsgi

    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes(b"not a state dict")
    space = {"backbones": {"resnet18": {"weights": "none", "layers": [["layer1"], ["layer1", "layer2"]]},
                           "resnet50": {"weights": str(damaged), "layers": [["layer1"]]}},
             "heads": {"padim": {"n_features": {"type": "int", "low": 8, "high": 64}}}}
    # one trial at a time with a seeded sampler: the same trials, values and ASHA decisions on every run
    path = write_space(tmp_path, storage=storage, space=space, budget={"trials": 10, "max_concurrent": 1},
                       sampler={"name": "random", "seed": 0},
                       scheduler={"name": "asha", "grace_period": 1, "reduction_factor": 4})
    run = start_search(path, data=str(synthetic_root), results=tmp_path / "results")
    meta = run.read_meta()
    argument = run_storage(meta).dashboard_argument()
    assert argument == (f"sqlite:///{(run.path / SQLITE_FILE).resolve()}" if storage == "sqlite"
                        else str((run.path / JOURNAL_FILE).resolve()))

    app = wsgi(argument)
    studies = _get(app, "/api/studies")["study_summaries"]
    assert [s["study_name"] for s in studies] == [meta["study_name"]]
    detail = _get(app, f"/api/studies/{studies[0]['study_id']}")
    shown = detail["trials"]

    records = run.records()
    assert len(shown) == len(records) == 10
    df = pd.read_parquet(run.path / "trials.parquet")
    assert set(df["status"]) == {"completed", "stopped", "failed"}, "the run must have every state for this test"
    expected = Counter()
    for record in records:
        state = OPTUNA_STATE[record["status"]].capitalize()
        value = record["metrics"].get("aupro") if record["status"] in ("completed", "stopped") else None
        params = {k: str(v) for k, v in record["params"].items()}
        expected[(state, json.dumps(params, sort_keys=True), None if value is None else round(value, 9))] += 1
    got = Counter()
    for trial in shown:
        params = {p["name"]: p["param_external_value"] for p in trial["params"]}
        values = trial.get("values")
        got[(trial["state"], json.dumps(params, sort_keys=True), round(values[0], 9) if values else None)] += 1
    assert got == expected
    assert {"Complete", "Pruned", "Fail"} == {t["state"] for t in shown}
    assert all(t["params"] and all(p["param_external_value"] for p in t["params"]) for t in shown)
