"""A throw-away PostgreSQL server for tests and benchmarks: initdb into a temporary folder, a free port on
127.0.0.1, a password-protected user, stopped and deleted at the end.

Uses Debian's ``postgresql`` package (``make postgres`` installs it): the binaries under
``/usr/lib/postgresql/<version>/bin`` (or initdb/pg_ctl on PATH). PostgreSQL refuses to run as root, so as
root the server runs as the ``postgres`` user the package creates (``runuser``), in a folder chowned to it.
"""
from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

USER = "anoseg"
DATABASE = "anoseg"


class Unavailable(RuntimeError):
    """No PostgreSQL server can be started here (the reason is the message)."""


@dataclass
class Server:
    host: str
    port: int
    user: str
    password: str
    database: str

    def url(self, password: str | None = None) -> str:
        """A SQLAlchemy URL with `password` as written (default: the real one, percent-encoded)."""
        from urllib.parse import quote

        text = quote(self.password, safe="") if password is None else password
        return f"postgresql+psycopg2://{self.user}:{text}@{self.host}:{self.port}/{self.database}"

    def connect(self):  # noqa: ANN201 - a psycopg2 connection
        import psycopg2

        return psycopg2.connect(host=self.host, port=self.port, user=self.user, password=self.password,
                                dbname=self.database)


def bindir() -> Path:
    """The folder of initdb and pg_ctl; Unavailable when PostgreSQL is not installed."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[4]))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).parent
    raise Unavailable("PostgreSQL is not installed (no initdb under /usr/lib/postgresql/*/bin or on PATH); "
                      "`make postgres` installs Debian's postgresql package")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_server_user() -> tuple[list[str], int | None, int | None]:
    """The command prefix to run PostgreSQL's binaries, and the uid/gid to give its folder (None: ours)."""
    if os.geteuid() != 0:
        return [], None, None
    try:
        entry = pwd.getpwnam("postgres")
    except KeyError:
        raise Unavailable("running as root and there is no 'postgres' user to run the server as (PostgreSQL "
                          "refuses to run as root)") from None
    runuser = shutil.which("runuser")
    if runuser:
        return [runuser, "-u", "postgres", "--"], entry.pw_uid, entry.pw_gid
    su = shutil.which("su")
    if su:
        return [su, "postgres", "-s", "/bin/sh", "-c", 'exec "$0" "$@"'], entry.pw_uid, entry.pw_gid
    raise Unavailable("running as root without runuser or su to start the server as 'postgres'")


def _run(cmd: list[str], what: str, cwd: Path) -> None:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=cwd)  # a folder the server user can read
    if out.returncode != 0:
        raise Unavailable(f"{what} failed ({out.returncode}): {(out.stdout + out.stderr)[-2000:]}")


@contextlib.contextmanager
def postgres_server(password: str | None = None, *, fsync: bool = False) -> Iterator[Server]:
    """Start a server (Unavailable when that is impossible here), yield it, then stop it and delete its folder.

    The user ``anoseg`` logs in with `password` (scram-sha-256, over TCP on 127.0.0.1 only) and owns the
    database ``anoseg``. `fsync`: flush commits to disk as a real server does (off: faster tests)."""
    try:
        import psycopg2  # noqa: F401 - the driver Optuna's SQLAlchemy URL needs
    except ImportError:
        raise Unavailable("the psycopg2 driver is not installed (pip install psycopg2-binary; it is in the dev "
                          "extra)") from None
    bins = bindir()
    prefix, uid, gid = _as_server_user()
    password = password or secrets.token_urlsafe(16)
    folder = Path(tempfile.mkdtemp(prefix="anoseg-pg-"))  # short: the socket path must stay under 108 bytes
    data = folder / "data"
    pwfile = folder / "pw"
    pwfile.write_text(password + "\n")
    if uid is not None:
        for path in (folder, pwfile):
            os.chown(path, uid, gid)
    port = _free_port()
    started = False
    try:
        _run([*prefix, str(bins / "initdb"), "-D", str(data), "-U", USER, f"--pwfile={pwfile}",
              "--auth=scram-sha-256", "-E", "UTF8"], "initdb", folder)
        pwfile.unlink()
        options = (f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={folder} "
                   f"-c fsync={'on' if fsync else 'off'}")
        _run([*prefix, str(bins / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(folder / "log"),
              "-w", "-t", "60", "start"], "pg_ctl start", folder)
        started = True
        server = Server("127.0.0.1", port, USER, password, "postgres")
        deadline = time.time() + 30
        while True:
            try:
                conn = server.connect()
                break
            except Exception:  # noqa: BLE001 - not accepting connections yet
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE {DATABASE} OWNER {USER}")
        conn.close()
        server.database = DATABASE
        yield server
    finally:
        if started:
            subprocess.run([*prefix, str(bins / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                           capture_output=True, timeout=120, cwd=folder)
        shutil.rmtree(folder, ignore_errors=True)
