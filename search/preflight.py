"""Preflight: before a search starts or resumes, check that every trial will find what it needs, on the driver
and on every node of the Ray cluster, and refuse to start (exit status 2, one table) when something is missing.

Checks, each a plain function returning a :class:`Row`:

* ``weights`` (one row per backbone of the space): :func:`anoseg.backbones.weights_source` says where the
  weights come from and whether they are here (offline package installed; hub file in the Hugging Face or
  torch hub cache; a file readable; none = random init); hub weights that are not cached pass when the hub
  answers within a few seconds (a TCP connection, never a download), else fail.
* ``data``: the dataset root and every category's ``train/good`` (one file read) and ``test`` folders.
* ``results``: the run folder is writable (a new run: the nearest existing folder above it, which a worker
  must see at the same path as the driver); ``cache``: the feature cache folder likewise (when enabled).
* ``storage`` (driver only: trials never open it): the Optuna storage opens and lists its studies; a SQLite
  or journal file that does not exist yet needs a writable folder.

With ``--address`` (or RAY_ADDRESS) the node checks also run as one small Ray task per alive node
(:func:`search.tune_adapter.run_on_every_node`, no CPU reserved, pinned to the node). A backbone whose
weights are missing on any node fails the preflight, or with ``--skip-missing-backbones`` is dropped from
the space (:meth:`Preflight.admit`). The table goes to the terminal and to ``preflight.txt`` in the run
folder. Nothing here imports Ray, torch or Optuna until a check needs them.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from anoseg.errors import AnosegError
from search.space_schema import SearchSpace
from search.storage import StudyStorage

__all__ = ["OK", "WARN", "FAIL", "PREFLIGHT_FILE", "Row", "NodePlan", "Preflight", "PreflightError",
           "check_weights", "check_data", "check_folder", "check_storage", "node_checks", "run_preflight",
           "format_table"]

OK, WARN, FAIL = "ok", "warn", "FAIL"
PREFLIGHT_FILE = "preflight.txt"
#: Seconds the Optuna storage may take to open and list its studies (a database server that never answers).
STORAGE_TIMEOUT_S = 20.0
#: Seconds every node gets for its checks (starting a worker process and importing torch included).
NODE_TIMEOUT_S = 120.0
DRIVER = "driver"


class PreflightError(AnosegError):
    """A preflight check failed: the search does not start. The message holds the table."""


@dataclass(frozen=True)
class Row:
    """One check on one node. ``backbone``: set on weights rows (what --skip-missing-backbones drops)."""

    check: str
    subject: str
    status: str
    detail: str
    node: str = ""
    seconds: float = 0.0
    backbone: str | None = None


@dataclass(frozen=True)
class NodePlan:
    """What a node checks: the space's backbones ``{name: weights}``, the dataset, and the folders trials write
    ``[(check, absolute path, anchor)]``, where ``anchor`` is the deepest folder of the path that exists on the
    driver (a node must see it too)."""

    backbones: dict[str, str]
    data_root: str
    categories: list[str]
    folders: list[tuple[str, str, str | None]] = field(default_factory=list)
    test_required: bool = True  # False: the selection protocol validates on generated defects


# ----------------------------------------------------------------------------------------------- checks


def _timed(check: str, subject: str, fn: Callable[..., Row | list[Row]], *args: Any) -> list[Row]:
    """``fn(*args)``'s rows with their time (rows that timed themselves keep theirs); a check that raises is a
    failed row, not a crash."""
    started = time.perf_counter()
    try:
        out = fn(*args)
    except Exception as exc:  # noqa: BLE001
        out = Row(check, subject, FAIL, f"the check itself failed: {type(exc).__name__}: {exc}")
    rows = out if isinstance(out, list) else [out]
    seconds = (time.perf_counter() - started) / max(1, len(rows))
    return [dataclasses.replace(r, seconds=r.seconds or seconds) for r in rows]


def _host_key(url: str) -> tuple[str, str | None, int | None]:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme, parts.hostname, parts.port


def check_weights(backbones: Mapping[str, str]) -> list[Row]:
    """One row per backbone: its weights are on this machine, or (hub) the hub answers now. Each host is
    probed once (a few seconds at most when it does not answer)."""
    from anoseg.backbones import weights as weights_module
    from anoseg.backbones import weights_source

    answers: dict[tuple, bool] = {}

    def reach(url: str) -> bool:
        key = _host_key(url)
        if key not in answers:
            answers[key] = weights_module.can_reach(url)
        return answers[key]

    rows = []
    for name, weights in backbones.items():
        started = time.perf_counter()
        try:
            source = weights_source(name, weights)
        except Exception as exc:  # noqa: BLE001
            rows.append(Row("weights", name, FAIL, f"{weights}: {type(exc).__name__}: {exc}", backbone=name,
                            seconds=time.perf_counter() - started))
            continue
        what = f"{source.kind}: {source.where}"
        if source.present:
            size = f" ({weights_module.format_size(source.size)})" if source.size is not None else ""
            status, detail = OK, f"{what}: {source.detail}{size}"
        elif source.kind == "hub":
            can, why = weights_module.fetchable(source, reach)
            status, detail = (OK if can else FAIL), f"{what}: {source.detail}; {why}"
        else:
            status, detail = FAIL, f"{what}: {source.detail}"
        rows.append(Row("weights", name, status, detail, backbone=name, seconds=time.perf_counter() - started))
    return rows


def _why(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def check_data(root: str, categories: Sequence[str], test_required: bool = True) -> Row:
    """The dataset root and each category's train/good (its first file read) and test folders (optional
    with `test_required` False)."""
    path = Path(root)
    if not path.is_dir():
        return Row("data", root, FAIL, f"{root} is not visible here (no such folder): every node must mount the "
                                       "dataset at the same path")
    if not os.access(path, os.R_OK | os.X_OK):
        return Row("data", root, FAIL, f"{root} is not readable here")
    problems: list[str] = []
    images = 0
    for category in categories:
        train, test = path / category / "train" / "good", path / category / "test"
        try:
            files = [entry.path for entry in os.scandir(train) if entry.is_file()]
        except OSError as exc:
            problems.append(f"{category}: {train}: {_why(exc)}")
            continue
        if not files:
            problems.append(f"{category}: {train} holds no files")
            continue
        try:
            with open(files[0], "rb") as fh:
                fh.read(1)
        except OSError as exc:
            problems.append(f"{category}: cannot read {files[0]}: {_why(exc)}")
            continue
        if (test_required or test.exists()) and (not test.is_dir() or not os.access(test, os.R_OK | os.X_OK)):
            problems.append(f"{category}: {test} is missing or not readable")
            continue
        images += len(files)
    if problems:
        more = f" (+{len(problems) - 4} more)" if len(problems) > 4 else ""
        return Row("data", root, FAIL, "; ".join(problems[:4]) + more)
    shown = ", ".join(categories[:6]) + (", ..." if len(categories) > 6 else "")
    return Row("data", root, OK, f"{len(categories)} categories readable ({shown}); {images} training images")


def existing_anchor(path: str | Path) -> Path:
    """The deepest folder of ``path`` that exists here (``path`` itself when it is a folder)."""
    base = Path(path)
    while not base.is_dir() and base.parent != base:
        base = base.parent
    return base


def check_folder(check: str, path: str, anchor: str | None = None) -> Row:
    """``path`` (or, before it exists, the nearest existing folder above it) takes a new file: one is created
    and deleted. ``anchor``: a folder the driver sees, which must be visible here too."""
    target = Path(path)
    if anchor is not None and not Path(anchor).is_dir():
        return Row(check, path, FAIL, f"{anchor} is not visible here (the driver sees it): every node must mount "
                                      "it at the same path")
    if target.exists() and not target.is_dir():
        return Row(check, path, FAIL, f"{target} is a file, not a folder")
    base = existing_anchor(target)
    try:
        fd, probe = tempfile.mkstemp(prefix=".anoseg-preflight-", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return Row(check, path, FAIL, f"{base} is not writable here ({_why(exc)})")
    return Row(check, path, OK, "writable" if base == target else f"writable (created under {base})")


def _with_timeout(fn: Callable[[], Any], seconds: float) -> Any:
    """``fn()`` in a daemon thread: its result, its exception, or TimeoutError after ``seconds`` (a database
    server that never answers must not hold the search, nor the process at exit)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True, name="anoseg-preflight-storage")
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {seconds:.0f} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def check_storage(storage: StudyStorage, study_name: str | None = None,
                  timeout_s: float = STORAGE_TIMEOUT_S) -> Row:
    """The Optuna storage opens and lists its studies (``study_name``: a resumed run's study should be there);
    a SQLite or journal file that does not exist yet needs only a writable folder."""
    subject = storage.description
    path = storage.path
    if path is not None and not path.is_file():
        folder = check_folder("storage", str(path.parent))
        detail = ("a new study file; its folder is " + folder.detail) if folder.status == OK else folder.detail
        return Row("storage", subject, folder.status, detail)

    def studies() -> list[str]:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opened = storage.open(readonly=storage.is_file)
            return [s.study_name for s in opened.get_all_studies()]

    try:
        names = _with_timeout(studies, timeout_s)
    except Exception as exc:  # noqa: BLE001
        text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        return Row("storage", subject, FAIL, f"cannot open it: {type(exc).__name__}: {text}")
    detail = f"opened: {len(names)} {'study' if len(names) == 1 else 'studies'}"
    status = OK
    if study_name is not None:
        if study_name in names:
            detail += f", {study_name} among them"
        else:
            status, detail = WARN, detail + f"; the run's study {study_name} is not among them (a new one is created)"
    if path is not None:  # SQLite and the journal write next to the file (journals, locks)
        folder = check_folder("storage", str(path.parent))
        if folder.status != OK:
            return Row("storage", subject, FAIL, f"{detail}, but {folder.detail}")
    return Row("storage", subject, status, detail)


def node_checks(plan: NodePlan) -> list[Row]:
    """Every check a node runs for a search (what the Ray task runs on each node, and the driver itself)."""
    rows = _timed("weights", ", ".join(plan.backbones), check_weights, plan.backbones)
    rows += _timed("data", plan.data_root, check_data, plan.data_root, plan.categories, plan.test_required)
    for check, path, anchor in plan.folders:
        rows += _timed(check, path, check_folder, check, path, anchor)
    return rows


# ----------------------------------------------------------------------------------------------- report


def format_table(rows: Sequence[Row]) -> str:
    """One fixed-width table, node by node (a node named on its first row), check by check."""
    header = ("node", "check", "subject", "status", "time", "detail")
    cells = []
    last = None
    for row in rows:
        node = row.node if row.node != last else ""
        last = row.node
        cells.append((node, row.check, row.subject, row.status, f"{row.seconds:.2f}s", row.detail))
    widths = [max(len(header[i]), *(len(c[i]) for c in cells)) if cells else len(header[i]) for i in range(5)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header[:5], widths)) + "  " + header[5]]
    lines += ["  ".join(c.ljust(w) for c, w in zip(cell[:5], widths)) + "  " + cell[5] for cell in cells]
    return "\n".join(lines)


@dataclass
class Preflight:
    """The rows of every node, the wall time, and what to do with them."""

    rows: list[Row]
    seconds: float
    nodes: list[str]
    dropped: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[Row]:
        return [r for r in self.rows if r.status == FAIL]

    def missing_backbones(self) -> list[str]:
        """Backbones whose weights failed on at least one node, in the space's order."""
        return list(dict.fromkeys(r.backbone for r in self.failed if r.backbone))

    def headline(self) -> str:
        failed = self.failed
        checks = f"{len(self.rows)} checks on {len(self.nodes)} node{'s' if len(self.nodes) != 1 else ''}"
        outcome = f"{len(failed)} failed" if failed else "all passed"
        if self.dropped:
            outcome += f"; dropped {len(self.dropped)} backbone{'s' if len(self.dropped) != 1 else ''} " \
                       f"whose weights are missing: {', '.join(self.dropped)}"
        return f"preflight: {checks} in {self.seconds:.2f} s: {outcome}"

    def text(self) -> str:
        return self.headline() + "\n" + format_table(self.rows)

    def write(self, run_path: Path) -> None:
        """preflight.txt in the run folder (best effort: an unwritable folder is what the table says)."""
        try:
            (Path(run_path) / PREFLIGHT_FILE).write_text(self.text() + "\n")
        except OSError:
            pass

    def admit(self, space: SearchSpace, *, skip_missing_backbones: bool = False, resume: bool = False) -> SearchSpace:
        """The space to search: as it is when every check passed; without the backbones whose weights are
        missing with ``skip_missing_backbones`` (when nothing else failed and some backbone is left);
        otherwise PreflightError with the table."""
        failed = self.failed
        if not failed:
            return space
        missing = self.missing_backbones()
        others = [r for r in failed if not r.backbone]
        if skip_missing_backbones and not others and len(missing) < len(space.backbones):
            self.dropped = missing
            kept = {name: entry for name, entry in space.backbones.items() if name not in missing}
            return dataclasses.replace(space, backbones=kept)
        what = sorted({r.check for r in failed})
        where = sorted({r.node for r in failed})
        lines = [f"preflight failed: {len(failed)} of {len(self.rows)} checks ({', '.join(what)}) on "
                 f"{', '.join(where)}; the search was not {'resumed' if resume else 'started'}", self.text()]
        if missing:
            if skip_missing_backbones and others:
                lines.append("--skip-missing-backbones drops backbones only; the other failures above remain")
            elif skip_missing_backbones:
                lines.append("--skip-missing-backbones would leave no backbone")
            lines.append(f"missing weights ({', '.join(missing)}): run `anoseg weights fetch SPACE` on a machine "
                         "with network and mount its caches on every node (README: Running on a cluster)"
                         + ("" if resume else ", or rerun with --skip-missing-backbones to search the others")
                         + (" (a resumed search keeps its space: start a new one with --skip-missing-backbones)"
                            if resume else ""))
        raise PreflightError("\n".join(lines))


# ----------------------------------------------------------------------------------------------- running


def driver_label() -> str:
    return f"{DRIVER} ({socket.gethostname()})"


def run_preflight(space: SearchSpace, *, data_root: str, categories: Sequence[str], run_path: str | Path,
                  cache_dir: str | None, storage: StudyStorage, address: str | None, cluster: bool,
                  study_name: str | None = None) -> Preflight:
    """Run every check on the driver and, on a cluster (``cluster``: --address or RAY_ADDRESS), on every node
    (connecting to it as the search will). ``study_name``: a resumed run's study."""
    started = time.perf_counter()
    run_path = Path(run_path).resolve()
    folders = [("results", str(run_path))]
    if cache_dir:
        folders.append(("cache", str(Path(cache_dir).resolve())))
    backbones = {name: str(entry["weights"]) for name, entry in space.backbones.items()}
    plan = NodePlan(backbones, str(data_root), list(categories), [(c, p, None) for c, p in folders],
                    test_required=space.protocol is None or not space.protocol.synthetic)
    label = driver_label()
    rows = [dataclasses.replace(r, node=label) for r in node_checks(plan)]
    rows += [dataclasses.replace(r, node=label) for r in _timed("storage", storage.description, check_storage, storage, study_name)]
    nodes = [label]
    if cluster:
        from search import tune_adapter  # Ray: only for a cluster

        tune_adapter.init_ray(address)
        remote_plan = dataclasses.replace(plan, folders=[(c, p, str(existing_anchor(p))) for c, p in folders])
        for node, result in tune_adapter.run_on_every_node(node_checks, remote_plan, timeout_s=NODE_TIMEOUT_S).items():
            nodes.append(node)
            if isinstance(result, BaseException):
                rows.append(Row("node", node, FAIL, f"the checks did not run there: {type(result).__name__}: "
                                                    f"{str(result).strip()[:300]}", node=node))
            else:
                rows += [dataclasses.replace(r, node=node) for r in result]
    return Preflight(rows, time.perf_counter() - started, nodes)
