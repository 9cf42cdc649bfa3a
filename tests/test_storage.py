"""The study storage (search.storage): the forms of `storage:`, the cluster default, passwords never on disk.

Fast: no search runs here (tests/test_search_storage.py runs real ones on SQLite, the journal and PostgreSQL).
"""
from __future__ import annotations

import json
import pickle

import cloudpickle
import optuna
import pytest
import yaml

from anoseg.cli import main
from anoseg.errors import ConfigError
from search.dashboard import write_dashboard
from search.dashboard.data import load_study
from search.export import export_run
from search.runner import resume_search, start_search, summary
from search.space_schema import load_space
from search.storage import (JOURNAL_FILE, SQLITE_FILE, StorageError, StudyStorage, check_spec, expand, mask,
                            on_cluster, resolve_storage, run_storage)
from tests.search_helpers import write_space

SECRET = "pa{ss}@w:o/rd%41"  # every character that needs care in a URL, and braces (RDBStorage formats its URL)
TEMPLATE = "postgresql+psycopg2://anoseg:${ANOSEG_TEST_DB_PASSWORD}@db.example:5432/anoseg"


@pytest.fixture
def secret_env(monkeypatch):
    monkeypatch.setenv("ANOSEG_TEST_DB_PASSWORD", SECRET)
    return SECRET


@pytest.mark.parametrize("spec, cluster, kind, url", [
    (None, False, "sqlite", "sqlite:///{run}/optuna.db"),
    (None, True, "journal", "journal://{run}/optuna.journal"),  # the cluster default
    ("sqlite", True, "sqlite", "sqlite:///{run}/optuna.db"),  # named explicitly: kept on a cluster too
    ("journal", False, "journal", "journal://{run}/optuna.journal"),
    ("journal:///shared/studies.journal", False, "journal", "journal:///shared/studies.journal"),
    ("sqlite:////shared/s.db", False, "sqlite", "sqlite:////shared/s.db"),
    ("postgresql://anoseg@db/anoseg", True, "postgresql", "postgresql://anoseg@db/anoseg"),
    ("mysql+pymysql://u:${PW}@db/x", False, "mysql", "mysql+pymysql://u:${PW}@db/x"),
])
def test_every_form_resolves(tmp_path, spec, cluster, kind, url):
    storage = resolve_storage(spec, tmp_path / "run", cluster=cluster)
    assert storage.kind == kind and storage.url == url.replace("{run}", str((tmp_path / "run").resolve()))
    assert StudyStorage.parse(storage.url) == storage  # run.json's storage_url opens the same storage


def test_relative_sqlite_file_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_storage("sqlite:///studies/x.db", "run", cluster=False).path == tmp_path / "studies" / "x.db"


def test_address_or_ray_address_means_a_cluster(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert not on_cluster(None) and on_cluster("auto") and on_cluster("ray://head:10001")
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")
    assert on_cluster(None)


@pytest.mark.parametrize("url, masked", [
    ("postgresql://u:${PW}@h:5432/db", "postgresql://u:***@h:5432/db"),
    ("postgresql://u:p@ss:w@h/db", "postgresql://u:***@h/db"),  # an unencoded @ in the password: masked whole
    ("postgresql://u@h/db?sslmode=require&password=x", "postgresql://u@h/db?sslmode=require&password=***"),
    ("mysql+pymysql://h/db", "mysql+pymysql://h/db"),
    ("sqlite:////a/optuna.db", "sqlite:////a/optuna.db"),
    ("journal:///a/optuna.journal", "journal:///a/optuna.journal"),
])
def test_mask(url, masked):
    assert mask(url) == masked


@pytest.mark.parametrize("spec", ["postgresql://anoseg:hunter2@db/anoseg", "mysql://u:hunter2@db/x",
                                  "postgresql://u@db/x?password=hunter2", "postgresql://u:${A}hunter2@db/x"])
def test_a_password_as_text_is_refused_without_echoing_it(tmp_path, spec):
    path = write_space(tmp_path, storage=spec)
    with pytest.raises(ConfigError, match=r"storage: holds a password as text.*\$\{ANOSEG_DB_PASSWORD\}") as exc:
        load_space(path)
    assert "hunter2" not in str(exc.value)


@pytest.mark.parametrize("spec", ["redis://u:hunter2@h", "journal://relative.journal", "sqlite:/x.db", "nfs", ""])
def test_unknown_forms_are_refused_masked(tmp_path, spec):
    with pytest.raises(ConfigError, match=r"storage: must be null .*journal.*postgresql") as exc:
        load_space(write_space(tmp_path, storage=spec))
    assert "hunter2" not in str(exc.value)


def test_space_keeps_the_reference_as_written(tmp_path):
    space = load_space(write_space(tmp_path, storage=TEMPLATE))
    assert space.storage == TEMPLATE and space.to_stored()["storage"] == TEMPLATE
    assert check_spec("journal") == "journal" and check_spec(None) is None


def test_expand_encodes_the_password_and_names_unset_variables(secret_env, monkeypatch):
    assert expand(TEMPLATE) == "postgresql+psycopg2://anoseg:pa%7Bss%7D%40w%3Ao%2Frd%2541@db.example:5432/anoseg"
    monkeypatch.delenv("ANOSEG_TEST_DB_PASSWORD")
    with pytest.raises(StorageError, match="ANOSEG_TEST_DB_PASSWORD") as exc:
        expand(TEMPLATE)
    assert "***" in str(exc.value)


def test_database_storage_never_pickles_the_password(tmp_path, monkeypatch):
    """Ray Tune pickles the searcher with its storage into the run folder (tune/): the pickle holds the
    ${VARIABLE}, and unpickling (a resume) expands it again. SQLite stands in for the server here."""
    from search.storage import _env_rdb_storage_class

    monkeypatch.setenv("ANOSEG_TEST_DB_DIR", str(tmp_path))
    storage = _env_rdb_storage_class()("sqlite:///${ANOSEG_TEST_DB_DIR}/x.db")
    study = optuna.create_study(study_name="s", storage=storage)
    study.optimize(lambda t: t.suggest_float("a", 0, 1), n_trials=2)
    for dumps in (pickle.dumps, cloudpickle.dumps):
        blob = dumps(study)
        assert str(tmp_path).encode() not in blob and b"${ANOSEG_TEST_DB_DIR}" in blob
        assert len(pickle.loads(blob).trials) == 2
    monkeypatch.delenv("ANOSEG_TEST_DB_DIR")
    with pytest.raises(StorageError, match="ANOSEG_TEST_DB_DIR"):
        pickle.loads(blob)


@pytest.fixture
def no_fit(monkeypatch):
    """start_search and resume_search without Ray: everything but the search itself (and the preflight, which
    would rightly refuse db.example and ray://head; tests/test_preflight.py covers it)."""
    from search import runner, tune_adapter
    from search.preflight import Preflight

    calls = []
    monkeypatch.setattr(tune_adapter, "fit", lambda space, run, meta, address, resume: calls.append((address, resume)))
    monkeypatch.setattr(runner, "run_preflight", lambda space, **kwargs: Preflight([], 0.0, ["driver"]))
    return calls


def _all_bytes(folder):
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


def test_run_json_and_every_reader_show_the_password_masked(tmp_path, synthetic_root, secret_env, no_fit, capsys):
    run = start_search(write_space(tmp_path, storage=TEMPLATE), data=str(synthetic_root), results=tmp_path / "r")
    meta = run.read_meta()
    assert meta["storage"] == "postgresql+psycopg2://anoseg:***@db.example:5432/anoseg"
    assert meta["storage_url"] == TEMPLATE  # what resume and the readers open: the variable, not its value
    assert run_storage(meta) == StudyStorage("postgresql", TEMPLATE)
    assert yaml.safe_load((run.path / "space.yaml").read_text())["storage"] == TEMPLATE
    assert json.loads((run.path / "space.json").read_text())["storage"] == TEMPLATE

    assert main(["search", "status", str(run.path)]) == 0
    out = capsys.readouterr().out
    assert "study: postgresql+psycopg2://anoseg:***@db.example" in out
    assert f'optuna-dashboard "{TEMPLATE}"' in out  # the shell expands the variable
    page = write_dashboard(run.path, examples=0).read_text()
    assert "anoseg:***@db.example" in page and "the Optuna study could not be read" in page  # no such server
    for text in (out, page, json.dumps(meta)):
        assert SECRET not in text and "pa%7Bss" not in text
    assert SECRET.encode() not in _all_bytes(run.path) and b"pa%7Bss" not in _all_bytes(run.path)


def test_export_provenance_masks_an_old_run_json(tmp_path):
    from tests.test_export import PADIM, cats, make_run

    run = make_run(tmp_path, [("b", "completed", {"aupro": 0.9, "ms_per_image": 9.0}, cats(brick=0.9, washer=0.9),
                               PADIM)])
    run.update_meta(storage="postgresql://u:hunter2@h/db")  # written by an older anoseg
    export_run(run.path, tmp_path / "best.yaml")
    text = (tmp_path / "best.yaml").read_text()
    assert "postgresql://u:***@h/db" in text and "hunter2" not in text


def test_a_new_search_without_the_password_variable_stops_before_anything_is_created(tmp_path, synthetic_root,
                                                                                     monkeypatch, no_fit):
    monkeypatch.delenv("ANOSEG_TEST_DB_PASSWORD", raising=False)
    with pytest.raises(StorageError, match="ANOSEG_TEST_DB_PASSWORD"):
        start_search(write_space(tmp_path, storage=TEMPLATE), data=str(synthetic_root), results=tmp_path / "r")
    assert not (tmp_path / "r").exists() and not no_fit


def test_resume_without_the_password_variable_stops_before_ray(tmp_path, synthetic_root, secret_env, monkeypatch,
                                                               no_fit):
    run = start_search(write_space(tmp_path, storage=TEMPLATE), data=str(synthetic_root), results=tmp_path / "r")
    monkeypatch.delenv("ANOSEG_TEST_DB_PASSWORD")
    with pytest.raises(StorageError, match="needs the environment variable ANOSEG_TEST_DB_PASSWORD"):
        resume_search(run.path)
    assert no_fit == [(None, False)]


def test_the_cluster_default_is_the_journal_and_resume_keeps_it(tmp_path, synthetic_root, no_fit, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    local = start_search(write_space(tmp_path), data=str(synthetic_root), results=tmp_path / "r", name="local")
    cluster = start_search(write_space(tmp_path), data=str(synthetic_root), results=tmp_path / "r", name="cluster",
                           address="ray://head:10001")
    assert run_storage(local.read_meta()).path == (local.path / SQLITE_FILE).resolve()
    assert run_storage(cluster.read_meta()).path == (cluster.path / JOURNAL_FILE).resolve()
    assert cluster.read_meta()["storage"] == f"journal://{(cluster.path / JOURNAL_FILE).resolve()}"
    resume_search(cluster.path, address="")  # resumed without a cluster: the study stays where it is
    assert run_storage(cluster.read_meta()).kind == "journal"
    assert "optuna-dashboard " + str((cluster.path / JOURNAL_FILE).resolve()) in summary(cluster)


def test_readers_never_create_a_missing_journal(tmp_path):
    meta = {"study_name": "s", "storage": f"journal://{tmp_path / 'optuna.journal'}"}
    with pytest.raises(StorageError, match="journal .* does not exist"):
        load_study(meta)
    assert not (tmp_path / "optuna.journal").exists()


def test_journal_storage_round_trip(tmp_path):
    storage = resolve_storage("journal", tmp_path, cluster=False)
    study = optuna.create_study(study_name="s", storage=storage.open(), direction="maximize")
    study.optimize(lambda t: t.suggest_int("n", 1, 9), n_trials=3)
    again = load_study({"study_name": "s", "storage": storage.description})
    assert [t.params for t in again.trials] == [t.params for t in study.trials]
