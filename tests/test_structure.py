"""The structure the code promises: no import cycle in anoseg/ or search/ (function-local imports
included), anoseg never imports search, and the run-folder readers load no model stack."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("anoseg", "search")
HEAVY = ("torch", "timm", "torchvision", "ray")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its code (top level, functions, TYPE_CHECKING).

    `from pkg import name` points at pkg.name when that is a module, else at pkg. A submodule's implicit
    import of its parent package is not an edge (every package's __init__ would otherwise close a loop)."""
    files = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolve against this module's package
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[:len(base) - node.level + 1]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                targets = [f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in files else prefix
                           for alias in node.names]
            else:
                continue
            edges.update(t for t in targets if t in files and t != name)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_in_anoseg_or_search():
    graph = import_graph()
    assert len(graph) > 40 and "anoseg.pipeline" in graph["anoseg.trial"]  # the graph is really read
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_anoseg_never_imports_search():
    graph = import_graph()
    offenders = {m: sorted(t for t in edges if t.split(".")[0] == "search")
                 for m, edges in graph.items() if m.split(".")[0] == "anoseg"}
    assert {m: t for m, t in offenders.items() if t} == {}


def heavy_modules_after(code: str) -> list[str]:
    """Run `code` in a fresh interpreter and list which of torch, timm, torchvision, ray it imported."""
    probe = f"{code}\nimport sys\nprint(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return eval(out.stdout.strip().splitlines()[-1])  # noqa: S307 - our own printout of a list of names


def test_status_and_export_of_a_finished_run_leave_torch_unimported(tmp_path):
    from tests.test_dashboard import make_run

    run = make_run(tmp_path, running=0)
    code = (f"from anoseg.cli import main\n"
            f"assert main(['search', 'status', {str(run)!r}]) == 0\n"
            f"assert main(['export', {str(run)!r}, '--out', {str(tmp_path / 'best.yaml')!r}]) == 0")
    assert heavy_modules_after(code) == []
    assert (tmp_path / "best.yaml").is_file()
