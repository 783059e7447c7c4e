"""The packages' import graph, read from the source: no module imports itself through others, and data flows one way
(search_space <- latency_lut <- searchers <- experiments, search.py on top; optuna and ray only where they adapt)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("search_space", "latency_lut", "searchers", "experiments")


def module_files() -> dict[str, Path]:
    """Every module of the packages (and search.py) by dotted name; a package is its __init__."""
    found = {"search": ROOT / "search.py"}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imported_names(path: Path, module: str, is_package: bool) -> set[str]:
    """Dotted names `path` imports anywhere (inside functions too: a deferred import is still a dependency), with
    `from package import name` counted as the submodule when `name` is one. Imports under TYPE_CHECKING are not."""
    tree = ast.parse(path.read_text(), str(path))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    names = set()
    for node in ast.walk(tree):
        if _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            names.add(source)
            names |= {f"{source}.{alias.name}" for alias in node.names}
    return names


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports."""
    files = module_files()
    return {
        module: {name for name in imported_names(path, module, path.name == "__init__.py") if name in files} - {module}
        for module, path in files.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None (depth-first search, modules in sorted order)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_graph_sees_deferred_and_package_imports():
    graph = import_graph()
    assert "experiments.checkpoints" in graph["experiments.factories"]  # imported inside a method
    assert "experiments.training" in graph["search"]
    assert "search_space.arch" in graph["search_space"]


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize(("package", "forbidden"), [
    ("search_space", ("latency_lut", "searchers", "experiments", "search", "optuna", "ray")),
    ("latency_lut", ("searchers", "experiments", "search", "optuna", "ray")),
    ("searchers", ("experiments", "search")),
    ("experiments", ("search",)),
])
def test_data_flows_one_way(package, forbidden):
    files = module_files()
    wrong = sorted(
        f"{module} imports {name}"
        for module, path in files.items() if module == package or module.startswith(package + ".")
        for name in imported_names(path, module, path.name == "__init__.py")
        if name.split(".")[0] in forbidden
    )
    assert not wrong, "; ".join(wrong)
