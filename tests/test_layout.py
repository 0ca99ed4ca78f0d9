"""The package's import graph has no cycles: each module can be read knowing only what it imports.

Every import counts: those inside functions (a lazy import is still a dependency, only a later one),
and those under `if TYPE_CHECKING:` (which never run, but a reader must still know the module they name).
"""

import ast
from collections.abc import Collection, Iterator
from pathlib import Path

import qubax

ROOT = Path(qubax.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def import_nodes(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import in the tree, at any depth."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child
        yield from import_nodes(child)


def imported(module: str, node: ast.Import | ast.ImportFrom, modules: Collection[str], package: str) -> Iterator[str]:
    """Which of `modules` an import statement in `module` (part of `package`) loads: `from p import m`
    is module `p.m` when there is one, otherwise a name defined in `p`."""
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names if alias.name in modules)
        return
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    source = (f"{package}.{node.module}" if node.module else package) if node.level else node.module or ""
    if source not in modules:
        return
    for alias in node.names:
        yield f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets = {target for node in import_nodes(tree) for target in imported(module, node, MODULES, package)}
        graph[module] = targets - {module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each group of modules that import each other (a strongly connected component
    of more than one module, by Tarjan's algorithm), named module by module back to its start."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in sorted(graph[module]):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            group = set()
            while (member := stack.pop()) != module:
                group.add(member)
            group.add(module)
            if len(group) > 1:
                groups.append(group)

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return [cycle_in(graph, group) for group in groups]


def cycle_in(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """The shortest way from the group's first module back to itself, through the group only."""
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for module in frontier:
            for target in sorted(graph[module] & group):
                if target == start:
                    return [*paths[module], start]
                if target not in paths:
                    paths[target] = [*paths[module], target]
                    following.append(target)
        frontier = following
    raise AssertionError(f"{sorted(group)} is not a cycle")


def test_the_package_has_no_import_cycles() -> None:
    graph = import_graph()
    assert sum(map(len, graph.values())) > len(graph)  # the walk sees the package's own imports
    found = [" -> ".join(cycle) for cycle in cycles(graph)]
    assert not found, "import cycles in src/qubax:\n" + "\n".join(found)


def test_the_graph_sees_every_kind_of_import() -> None:
    """The walker itself: plain, from-, relative, lazy and TYPE_CHECKING imports all count."""
    source = """
import qubax.db
from qubax import errors
from qubax.providers import pool, Provider
from . import settings
from .providers.http import Http
from .. import outside
import os, qubax.missing
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    from qubax import admin
else:
    from qubax import logs
def later():
    from qubax.storage import Storage
"""
    modules = {"qubax", "qubax.app", "qubax.db", "qubax.errors", "qubax.logs", "qubax.settings", "qubax.storage"}
    modules |= {"qubax.providers", "qubax.providers.pool", "qubax.providers.http", "qubax.admin"}
    nodes = import_nodes(ast.parse(source))
    found = {target for node in nodes for target in imported("qubax.app", node, modules, "qubax")}
    assert found == {
        "qubax.db",
        "qubax.errors",
        "qubax.providers.pool",
        "qubax.providers",
        "qubax.settings",
        "qubax.providers.http",
        "qubax.logs",
        "qubax.storage",
        "qubax.admin",
    }
    nested = ast.parse("from . import http\nfrom ..errors import UpstreamError\nfrom .pool import KeyPool")
    assert {
        target
        for node in import_nodes(nested)
        for target in imported("qubax.providers.bfl", node, modules, "qubax.providers")
    } == {"qubax.providers.http", "qubax.errors", "qubax.providers.pool"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
