"""Layers point down (DESIGN.md property 10), checked over the package's import graph.

Every ``import`` counts, also those inside functions (a lazy import is still a
dependency); only imports under ``if TYPE_CHECKING:`` are left out. The graph must have
no cycle, and these rules hold: models and objectives never import engines; nothing in
the library imports the CLI; nothing below the run module imports the launcher.
"""

from __future__ import annotations

import ast
from pathlib import Path

import locallearn

ROOT = Path(locallearn.__file__).parent
LAUNCHER = "locallearn.distributed.launch"
ABOVE_LAUNCHER = {"locallearn.runner", "locallearn.train", "locallearn.cli", "locallearn.__main__",
                  LAUNCHER}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package modules ``path`` imports (at any depth, type-only imports aside)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_only(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in found if m in modules}


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in ROOT.rglob("*.py")}
    modules = set(paths)
    graph = {m: imports_of(p, modules) - {m} for m, p in paths.items()}
    for m in graph:  # importing a.b runs a/__init__.py: not an edge we hold against a.b's users
        graph[m] = {d for d in graph[m] if not m.startswith(d + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (found := dfs(d)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := dfs(m)):
            return found
    return None


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_models_and_objectives_never_import_engines():
    bad = {(m, d) for m, deps in import_graph().items() for d in deps
           if m.startswith(("locallearn.models", "locallearn.objectives"))
           and d.startswith("locallearn.engines")}
    assert not bad


def test_the_library_never_imports_the_cli():
    bad = {m for m, deps in import_graph().items()
           if "locallearn.cli" in deps and m not in ("locallearn.__main__",)}
    assert not bad


def test_nothing_below_the_run_module_imports_the_launcher():
    bad = {m for m, deps in import_graph().items() if LAUNCHER in deps and m not in ABOVE_LAUNCHER}
    assert not bad


def test_the_checker_finds_a_cycle_when_there_is_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
