"""The packages' import graph, read from the source: no circles, and dependencies one way
(``methods`` at the bottom, ``fatr`` on ``methods`` only, ``bench`` on both). Inside ``bench``
the same holds for its rooms: the shared basics at the bottom, ``measure`` on them, ``report``
and ``train`` on ``measure``, and the jobs and commands at the top level on everything.

Every import counts: those inside functions (they run, only later) and those under
``if TYPE_CHECKING:`` (they never run, but a type one module needs from another is a
dependency all the same, and a circle of them is a circle in the design: the shared type
belongs in a module both import).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("methods", "fatr", "bench")
ALLOWED = {"methods": {"methods"}, "fatr": {"methods", "fatr"}, "bench": {"methods", "fatr", "bench"}}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.AST, modules: set[str]) -> set[str]:
    """The project modules a source file imports, anywhere in it (type-only imports included)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] in PACKAGES)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] in PACKAGES:
                for a in node.names:  # ``from bench import leaderboard`` imports a module
                    sub = f"{node.module}.{a.name}"
                    found.add(sub if sub in modules else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))]
    modules = {_module_name(p) for p in files}
    return {_module_name(p): _imports(ast.parse(p.read_text()), modules) & modules for p in files}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module, or a module importing itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_type_only_imports_count():
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from bench.measure.subject import Subject\n"
    assert _imports(ast.parse(source), {"bench.measure.subject"}) == {"bench.measure.subject"}


def test_no_import_circles_in_methods_fatr_bench():
    graph = import_graph()
    assert "bench.job" in graph and "methods.base" in graph and "fatr.reducer" in graph
    assert cycles(graph) == []


def test_dependencies_point_one_way():
    wrong = [
        f"{mod} imports {dep}"
        for mod, deps in import_graph().items()
        for dep in sorted(deps)
        if dep.split(".")[0] not in ALLOWED[mod.split(".")[0]]
    ]
    assert wrong == []


BENCH_BASICS = {
    "bench.config",
    "bench.errors",
    "bench.terminal",
    "bench.finite",
    "bench.data",
    "bench.models",
    "bench.sources",
    "bench.store",
    "bench.results_io",
    "bench.sweep_id",
    "bench.allocator",
}
"""Top-level ``bench`` modules every room may use; the other top-level modules are the jobs
and commands (``job``, ``budget``, ``validate``, ``callbacks``, ``run``, ``finetune``, ...)."""
BENCH_ALLOWED = {
    "basics": {"methods", "fatr", "basics"},
    "measure": {"methods", "fatr", "basics", "measure"},
    "report": {"methods", "basics", "measure", "report"},
    "train": {"methods", "fatr", "basics", "measure", "train"},
}


def bench_room(module: str) -> str:
    """``measure``, ``report``, ``train``, ``basics``, ``commands`` (bench's top level) or the package."""
    parts = module.split(".")
    if parts[0] != "bench":
        return parts[0]
    if len(parts) > 2 and parts[1] in ("measure", "report", "train"):
        return parts[1]
    return "basics" if module in BENCH_BASICS else "commands"


def test_bench_rooms_depend_one_way():
    graph = import_graph()
    rooms = {bench_room(m) for m in graph if m.startswith("bench.")}
    assert {"measure", "report", "train", "basics", "commands"} <= rooms
    wrong = [
        f"{mod} imports {dep}"
        for mod, deps in graph.items()
        if bench_room(mod) in BENCH_ALLOWED
        for dep in sorted(deps)
        if bench_room(dep) not in BENCH_ALLOWED[bench_room(mod)]
    ]
    assert wrong == []


def test_the_room_check_finds_a_wrong_way_import():
    assert bench_room("bench.measure.latency") == "measure" and bench_room("bench.job") == "commands"
    assert bench_room("bench.train_throughput") == "commands" and bench_room("bench.store") == "basics"
    assert "report" not in BENCH_ALLOWED["measure"] and "commands" not in BENCH_ALLOWED["train"]


def test_the_measurement_and_report_modules_import_alone():
    """A fresh interpreter per group of modules that used to be circular: each imports first."""
    for module in ("bench.leaderboard", "bench.report.scaling", "bench.job"):
        out = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=REPO, capture_output=True, text=True)
        assert out.returncode == 0, f"import {module}: {out.stderr[-1500:]}"


def test_every_reducer_documents_its_constructor_arguments():
    """timm style: each reducer's docstring has an ``Args:`` block naming every argument."""
    import importlib
    import inspect
    import pkgutil

    import fatr
    import methods
    from methods import TokenReducer

    missing, checked = [], []
    for pkg in (methods, fatr):
        for info in pkgutil.iter_modules(pkg.__path__, pkg.__name__ + "."):
            for cls in vars(importlib.import_module(info.name)).values():
                if not (inspect.isclass(cls) and issubclass(cls, TokenReducer) and cls.__module__ == info.name):
                    continue
                doc = inspect.getdoc(cls) or ""
                args = doc.split("Args:", 1)[1] if "Args:" in doc else None
                params = [p for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"]
                names = [p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
                documented = set(re.findall(r"^ *\**(\w+):", args, flags=re.M)) if args is not None else set()
                checked.append(cls.__qualname__)
                if args is None or not set(names) <= documented:
                    missing.append(f"{cls.__qualname__} ({', '.join(sorted(set(names) - documented)) or 'no Args:'})")
    assert len(checked) >= 10 and "FATR" in checked and "ToMe" in checked
    assert missing == []
