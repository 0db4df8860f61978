"""The package's import graph has no cycles, errors sit at its bottom, and no module below the CLI imports it.

Read from the source (module-level imports, those under ``if TYPE_CHECKING:`` left out): what a reader sees.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

import evomerge

ROOT = Path(evomerge.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(tree: ast.Module, name: str, is_package: bool) -> set[str]:
    """evomerge modules a module imports at its top level (a package's submodules named in `from pkg import x`)."""
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        nodes = [node] if isinstance(node, (ast.Import, ast.ImportFrom)) else []
        for statement in nodes:
            if isinstance(statement, ast.Import):
                found.update(alias.name for alias in statement.names)
            else:
                package = name if is_package else name.rpartition(".")[0]
                for _ in range(statement.level - 1):
                    package = package.rpartition(".")[0]
                source = statement.module if not statement.level else ".".join(filter(None, [package, statement.module]))
                found.add(source)
                found.update(f"{source}.{alias.name}" for alias in statement.names)
    return {module for module in found if module.startswith("evomerge")}


def import_graph() -> nx.DiGraph:
    paths = {module_name(path): path for path in ROOT.rglob("*.py")}
    graph = nx.DiGraph()
    graph.add_nodes_from(paths)
    for name, path in paths.items():
        for target in imported(ast.parse(path.read_text()), name, path.name == "__init__.py"):
            if target in paths and target != name:
                graph.add_edge(name, target)
    return graph


GRAPH = import_graph()
CLI = {name for name in GRAPH if name == "evomerge.cli" or name.endswith(".command")}


def test_no_import_cycles():
    cycles = list(nx.simple_cycles(GRAPH))
    assert not cycles, f"import cycles: {cycles[:3]}"


def test_errors_are_at_the_bottom():
    assert not list(GRAPH.successors("evomerge.errors"))


@pytest.mark.parametrize("module", sorted(set(GRAPH) - CLI - {"evomerge.cli"}))
def test_low_modules_never_import_the_cli(module):
    assert not set(GRAPH.successors(module)) & CLI, f"{module} imports {set(GRAPH.successors(module)) & CLI}"


def test_the_graph_sees_imports():
    """The walk itself works: known edges are there (a graph without edges would pass every test above)."""
    assert GRAPH.has_edge("evomerge.recipe", "evomerge.merge.methods")
    assert GRAPH.has_edge("evomerge.merge.methods.ties", "evomerge.merge.methods.registry")
    assert GRAPH.has_edge("evomerge.cli", "evomerge.errors")
