"""Where a search keeps its Optuna study: the one place that turns the space's ``storage`` into a storage.

Forms of ``storage`` in a space file:

* ``null`` (the default): ``sqlite`` when the search runs on this machine, ``journal`` when ``--address`` (or
  ``RAY_ADDRESS``) points it at a running Ray cluster, whose run folder sits on a shared file system.
* ``sqlite``: ``optuna.db`` in the run folder (Optuna's RDBStorage on SQLite).
* ``journal``: ``optuna.journal`` in the run folder (Optuna's JournalStorage with a JournalFileBackend and its
  symlink lock). SQLite's file locking is unreliable on NFS and EFS; the journal only appends and locks with an
  atomic symlink, which NFS supports, so it is what a run folder on a share should use.
* ``sqlite:///file.db`` (relative to the working directory) or ``sqlite:////abs/file.db``;
  ``journal:///abs/file.journal`` (one journal file may hold the studies of several searches).
* ``postgresql[+driver]://...``, ``mysql[+driver]://...``: a database server.

Passwords. A URL may not hold a password as text: write it as an environment variable reference,
``postgresql://anoseg:${ANOSEG_DB_PASSWORD}@db-host:5432/anoseg``, or leave it out and let the driver find it
(``PGPASSWORD``, ``~/.pgpass``). ``${NAME}`` references are expanded (the value percent-encoded inside the
``user:password@`` part) only when the storage is opened, in memory; everything written to disk or printed
(space.yaml and space.json in the run folder, run.json, Ray Tune's pickled searcher in ``tune/``, the logs,
status, export and the dashboards) holds the URL with its references unexpanded or the password masked as
``***``. Resume, status and the dashboards need the same variable set. Why not accept a password in the file
and mask the copies: the space file itself is then a secret (it gets committed, mailed, copied into run
folders), and a resume needs the password from the environment anyway, as no file of the run may hold it.

This module imports Optuna only when a storage is opened, so readers that only describe the storage
(``search status``, ``export``) stay light.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping
from urllib.parse import quote

from anoseg.errors import AnosegError

if TYPE_CHECKING:
    import optuna

__all__ = [
    "SQLITE_FILE", "JOURNAL_FILE", "KINDS", "StorageError", "StudyStorage", "check_spec", "mask",
    "resolve_storage", "run_storage", "storage_meta", "expand", "env_references",
]

SQLITE_FILE = "optuna.db"
JOURNAL_FILE = "optuna.journal"
KINDS = ("sqlite", "journal", "postgresql", "mysql")
MASK = "***"
SPEC_TEXT = ("null (SQLite in the run folder; a journal file there when --address points at a Ray cluster), "
             "sqlite, journal, sqlite:///<file>, journal:///<absolute file>, postgresql[+driver]://..., "
             "mysql[+driver]://...")
_SPEC_RE = re.compile(r"^(sqlite|journal|sqlite:///.+|journal:///.+|(postgresql|mysql)(\+\w+)?://.+)$", re.S)
_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_ENV_ONLY_RE = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*\}$")
_URL_RE = re.compile(r"^(?P<scheme>[A-Za-z][\w+.-]*)://(?P<rest>.*)$", re.S)
_PASSWORD_PARAM_RE = re.compile(r"(?P<key>[?&](?:password|passwd|pwd)=)(?P<value>[^&#]*)", re.I)


class StorageError(AnosegError):
    """A study storage that cannot be used: a bad URL, an unset environment variable, a missing file."""


# ----------------------------------------------------------------------------------------------- URLs


def _split(url: str) -> tuple[str, str | None, str | None, str] | None:
    """(scheme, user, password, rest) of ``scheme://[user[:password]@]rest``; None if it is no URL.

    The user info ends at the *last* ``@`` (as SQLAlchemy reads it), so a password holding an ``@`` is
    masked whole; anything after an ``@`` in a query string is masked too (more, never less)."""
    match = _URL_RE.match(url)
    if match is None:
        return None
    rest = match["rest"]
    if "@" not in rest:
        return match["scheme"], None, None, rest
    userinfo, _, host = rest.rpartition("@")
    user, colon, password = userinfo.partition(":")
    return match["scheme"], user, password if colon else None, host


def mask(url: str | None) -> str | None:
    """The URL with its password (and any ``password=`` parameter) replaced by ``***``."""
    if url is None:
        return None
    parts = _split(url)
    if parts is None:
        return url
    scheme, user, password, rest = parts
    rest = _PASSWORD_PARAM_RE.sub(lambda m: m["key"] + MASK, rest)
    if user is None:
        return f"{scheme}://{rest}"
    return f"{scheme}://{user}{':' + MASK if password is not None else ''}@{rest}"


def literal_password(url: str) -> bool:
    """Whether the URL holds a password as text (anything but one ``${NAME}`` reference or nothing)."""
    parts = _split(url)
    if parts is None:
        return False
    _, _, password, rest = parts
    values = [password] if password else []
    values += [m["value"] for m in _PASSWORD_PARAM_RE.finditer(rest) if m["value"]]
    return any(not _ENV_ONLY_RE.match(v) for v in values)


def env_references(url: str) -> list[str]:
    """The environment variables a URL refers to (``${NAME}``), in order, once each."""
    return list(dict.fromkeys(_ENV_RE.findall(url)))


def expand(url: str) -> str:
    """The URL with every ``${NAME}`` replaced by the variable's value (percent-encoded inside
    ``user:password@``, so a password may hold ``@ : / %``); StorageError naming unset variables."""
    missing = [name for name in env_references(url) if name not in os.environ]
    if missing:
        raise StorageError(f"the study storage {mask(url)} needs the environment variable"
                           f"{'s' if len(missing) > 1 else ''} {', '.join(missing)} (set "
                           f"{'them' if len(missing) > 1 else 'it'} to the database password; anoseg never "
                           "writes it to a file)")
    parts = _split(url)
    if parts is None or parts[1] is None:
        return _ENV_RE.sub(lambda m: os.environ[m[1]], url)
    scheme, user, password, rest = parts
    encoded = lambda text: _ENV_RE.sub(lambda m: quote(os.environ[m[1]], safe=""), text)  # noqa: E731
    userinfo = encoded(user) + (":" + encoded(password) if password is not None else "")
    rest = _PASSWORD_PARAM_RE.sub(lambda m: m["key"] + encoded(m["value"]), rest)
    return f"{scheme}://{userinfo}@{_ENV_RE.sub(lambda m: os.environ[m[1]], rest)}"


def check_spec(spec: Any) -> str | None:
    """The space file's ``storage`` checked: one of the forms, no password as text. The error message shows
    the value masked (it may hold a password)."""
    if spec is None:
        return None
    if not isinstance(spec, str) or not _SPEC_RE.match(spec):
        shown = mask(spec) if isinstance(spec, str) else spec
        raise ValueError(f"must be {SPEC_TEXT}, got {shown!r}")
    if literal_password(spec):
        raise ValueError(f"holds a password as text ({mask(spec)}); write it as an environment variable reference, "
                         "e.g. postgresql://user:${ANOSEG_DB_PASSWORD}@host/db, and set that variable where the "
                         "search runs and where it is read (resume, status, dashboard). anoseg copies the space "
                         "file into the run folder and never writes a password to a file")
    return spec


# ----------------------------------------------------------------------------------------------- storages


@dataclass(frozen=True)
class StudyStorage:
    """One study storage. ``url`` is resolved (absolute file paths) and holds ``${NAME}`` references
    unexpanded: safe to write down, and all that is needed to open the storage again."""

    kind: str  # sqlite | journal | postgresql | mysql
    url: str

    @classmethod
    def parse(cls, url: str) -> "StudyStorage":
        """A resolved URL (``sqlite:///...``, ``journal:///...``, ``postgresql://...``, ``mysql://...``)."""
        scheme = url.split("://", 1)[0].split("+", 1)[0] if "://" in url else ""
        if scheme not in KINDS:
            raise StorageError(f"unknown study storage {mask(url)!r}; expected {SPEC_TEXT}")
        return cls(scheme, url)

    @property
    def description(self) -> str:
        """The URL with the password masked: what run.json, the logs and the dashboards show."""
        return mask(self.url) or ""

    @property
    def path(self) -> Path | None:
        """The file of a sqlite or journal storage."""
        if self.kind == "sqlite":
            return Path(self.url[len("sqlite:///"):])
        if self.kind == "journal":
            return Path(self.url[len("journal://"):])
        return None

    @property
    def is_file(self) -> bool:
        return self.kind in ("sqlite", "journal")

    def dashboard_argument(self) -> str:
        """What to give optuna-dashboard on the command line (a database URL with the password variable
        for the shell to expand, in double quotes; a journal file's path)."""
        if self.kind == "journal":
            return str(self.path)
        return f'"{self.url}"' if env_references(self.url) else self.url

    def missing_variables(self) -> list[str]:
        return [name for name in env_references(self.url) if name not in os.environ]

    def open(self, *, readonly: bool = False) -> "optuna.storages.BaseStorage":
        """The Optuna storage. `readonly`: a missing sqlite or journal file is an error instead of a new,
        empty study database."""
        import optuna

        path = self.path
        if readonly and path is not None and not path.is_file():
            raise StorageError(f"the study {'database' if self.kind == 'sqlite' else 'journal'} {path} does not exist")
        if self.kind == "journal":
            from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

            # The symlink lock is atomic on NFS (v2 and later); a lock left by a killed driver is taken over
            # after its grace period. optuna-dashboard reads a journal file with the same lock.
            path.parent.mkdir(parents=True, exist_ok=True)
            backend = JournalFileBackend(str(path), lock_obj=JournalFileSymlinkLock(str(path), grace_period=30))
            return optuna.storages.JournalStorage(backend)
        if self.kind == "sqlite":
            return optuna.storages.RDBStorage(self.url)
        return _env_rdb_storage_class()(self.url)

    def load_study(self, study_name: str) -> "optuna.Study":
        """The study, read only (a missing file is an error, never a new empty database)."""
        import warnings

        import optuna

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return optuna.load_study(study_name=study_name, storage=self.open(readonly=True))


_ENV_RDB_STORAGE: type | None = None


def _env_rdb_storage_class() -> type:
    """An RDBStorage built from a URL with ``${NAME}`` references that never pickles the expanded URL.

    Ray Tune pickles its searcher, Optuna's storage included, into the run folder (``tune/tuner.pkl``,
    ``tune/searcher-state-*.pkl``); this one pickles the unexpanded URL and expands it again when unpickled
    (a resumed search), so the password stays in the environment."""
    global _ENV_RDB_STORAGE
    if _ENV_RDB_STORAGE is None:
        import optuna

        class EnvRDBStorage(optuna.storages.RDBStorage):
            def __init__(self, template: str, **kwargs: Any) -> None:
                self._url_template = template
                # RDBStorage formats its URL ({SCHEMA_VERSION}): braces of the password are doubled
                super().__init__(expand(template).replace("{", "{{").replace("}", "}}"), **kwargs)

            def __getstate__(self) -> dict[Any, Any]:
                state = super().__getstate__()
                state["url"] = None
                return state

            def __setstate__(self, state: dict[Any, Any]) -> None:
                state = {**state, "url": expand(state["_url_template"])}
                super().__setstate__(state)

            def __repr__(self) -> str:
                return f"EnvRDBStorage({mask(self._url_template)!r})"

        EnvRDBStorage.__module__ = __name__
        EnvRDBStorage.__qualname__ = "EnvRDBStorage"
        _ENV_RDB_STORAGE = EnvRDBStorage
    return _ENV_RDB_STORAGE


def __getattr__(name: str) -> Any:
    """``search.storage.EnvRDBStorage``, defined on first use (it needs Optuna); pickle finds it here."""
    if name == "EnvRDBStorage":
        return _env_rdb_storage_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def on_cluster(address: str | None) -> bool:
    """Whether a search with this --address runs on a running Ray cluster (Ray also follows RAY_ADDRESS)."""
    return bool(address or os.environ.get("RAY_ADDRESS"))


def resolve_storage(spec: str | None, run_path: str | Path, *, cluster: bool) -> StudyStorage:
    """The storage of a new search: the space's ``storage`` (see :func:`check_spec`) in run folder `run_path`;
    `cluster`: the search runs on a Ray cluster (the default is then the journal)."""
    run_path = Path(run_path).resolve()
    spec = check_spec(spec) or ("journal" if cluster else "sqlite")
    if spec == "sqlite":
        return StudyStorage("sqlite", f"sqlite:///{run_path / SQLITE_FILE}")
    if spec == "journal":
        return StudyStorage("journal", f"journal://{run_path / JOURNAL_FILE}")
    if spec.startswith("sqlite:///"):
        return StudyStorage("sqlite", f"sqlite:///{Path(spec[len('sqlite:///'):]).resolve()}")
    if spec.startswith("journal:///"):
        return StudyStorage("journal", f"journal://{Path(spec[len('journal://'):]).resolve()}")
    return StudyStorage.parse(spec)


def storage_meta(storage: StudyStorage) -> dict[str, str]:
    """What run.json records: ``storage`` (masked, for people) and ``storage_url`` (unexpanded, to open it)."""
    return {"storage": storage.description, "storage_url": storage.url}


def run_storage(meta: Mapping[str, Any]) -> StudyStorage:
    """The storage a run used, from its run.json (``storage_url``; a run from before it: ``storage``)."""
    url = meta.get("storage_url") or meta.get("storage")
    if not url:
        raise StorageError("run.json names no study storage")
    if MASK in url and "storage_url" not in meta:
        raise StorageError(f"run.json holds only the masked study storage {url}")
    return StudyStorage.parse(str(url))
