"""Imports point down only (STYLE.md, issue 8): sandbox <- services <- surfaces (handlers, mcp) <- app <- cli,
the client stands alone, and no module imports itself back through another.

Read from the source with :mod:`ast`, not by importing: every ``import`` of a ``kernelhub`` module counts, at
module level, inside a function (a lazy import is still a dependency) and under ``TYPE_CHECKING`` (a type from a
layer above is one too). Only the cycle check leaves ``TYPE_CHECKING`` imports out, since they never run.
"""

from __future__ import annotations

import ast
import dataclasses
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import kernelhub

PACKAGE = Path(kernelhub.__file__).parent

#: Each layer's rank; a module may import its own layer's modules and those of lower ranks. ``shared`` holds
#: what every layer may use (the error family, the shapes, config parsing, untrusted JSON, log redaction).
RANKS = {"shared": 0, "sandbox": 1, "services": 2, "surfaces": 3, "app": 4, "cli": 5}

#: The client is shipped alone (``pip install kernelhub``): it may import these and its own package only.
CLIENT_MAY_IMPORT = {"kernelhub", "kernelhub.errors", "kernelhub.models"}
#: What the client alone installs, as import names: pyproject's ``dependencies`` (httpx2, websockets) and the
#: two that httpx2 brings and the client's transport uses (httpcore2, anyio).
CLIENT_DISTRIBUTIONS = {"httpx2", "websockets", "httpcore2", "anyio"}


def layer(module: str) -> str:
    """The layer of a ``kernelhub`` module, from its dotted name."""
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else ""
    if top in ("", "errors", "models", "settings", "json_input", "redaction"):
        return "shared"
    if top in ("sandbox", "services", "client", "app"):
        return top
    if top in ("handlers", "mcp", "server"):
        return "surfaces"
    if top in ("cli", "__main__", "testing"):
        return "cli"
    raise AssertionError(f"{module} belongs to no layer: name its layer in tests/test_layers.py")


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__.py``)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = modules()


@dataclasses.dataclass(frozen=True)
class Import:
    """One ``kernelhub`` module that ``source`` imports, at ``line``; ``typing`` if under ``TYPE_CHECKING``."""

    source: str
    target: str
    line: int
    typing: bool


def _targets(module: str, path: Path, node: ast.Import | ast.ImportFrom) -> Iterator[str]:
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
        return
    if node.level:
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    for alias in node.names:
        # `from . import tools` imports the module kernelhub.mcp.tools, not only its package.
        yield f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base


def imports(module: str, path: Path) -> list[Import]:
    """The ``kernelhub`` modules ``module`` imports, wherever the statement is."""
    found: list[Import] = []

    def visit(node: ast.AST, typing: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for statement in child.body:
                    visit_one(statement, True)
                for statement in child.orelse:
                    visit_one(statement, typing)
            else:
                visit_one(child, typing)

    def visit_one(node: ast.AST, typing: bool) -> None:
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.extend(Import(module, target, node.lineno, typing) for target in _targets(module, path, node)
                         if target.split(".")[0] == "kernelhub")
        else:
            visit(node, typing)

    visit(ast.parse(path.read_text(), str(path)), False)
    return found


ALL_IMPORTS = [found for module, path in MODULES.items() for found in imports(module, path)]


def _where(found: Import) -> str:
    return f"{MODULES[found.source].relative_to(PACKAGE.parent)}:{found.line} imports {found.target}"


def test_every_import_names_a_module_of_the_package() -> None:
    # A target that is no module would make the checks below pass vacuously.
    unknown = [_where(found) for found in ALL_IMPORTS if found.target not in MODULES]
    assert not unknown, unknown
    assert {layer(module) for module in MODULES} == set(RANKS) | {"client"}


def test_imports_point_down() -> None:
    upward = []
    for found in ALL_IMPORTS:
        source, target = layer(found.source), layer(found.target)
        if source == "client":
            allowed = target == "client" or found.target in CLIENT_MAY_IMPORT
        elif target == "client":  # a library below the surfaces: MCP may proxy to a gateway with it
            allowed = RANKS[source] >= RANKS["surfaces"]
        else:
            allowed = RANKS[target] <= RANKS[source]
        if not allowed:
            upward.append(f"{_where(found)} ({source} -> {target})")
    assert not upward, "\n".join(upward)


def test_the_client_needs_nothing_of_the_server() -> None:
    # What `pip install kernelhub` ships: the client and the modules it may import. Their own imports must be
    # the standard library's or the client's dependencies (the install test proves it with a real venv).
    shipped = [m for m in MODULES if layer(m) == "client"] + sorted(CLIENT_MAY_IMPORT)
    foreign = []
    for module in shipped:
        for node in ast.walk(ast.parse(MODULES[module].read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in CLIENT_DISTRIBUTIONS | {"kernelhub"}:
                    foreign.append(f"{module}:{node.lineno} imports {name}")
    assert not foreign, foreign


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_no_import_cycle() -> None:
    graph: dict[str, set[str]] = {module: set() for module in MODULES}
    for found in ALL_IMPORTS:
        if found.typing or found.target == found.source:
            continue
        graph[found.source].add(found.target)
        # Importing a.b.c runs a/__init__.py and a/b/__init__.py first, unless the importer is inside them.
        parts = found.target.split(".")
        for n in range(1, len(parts)):
            parent = ".".join(parts[:n])
            if not found.source.startswith(parent + ".") and parent != found.source:
                graph[found.source].add(parent)
    cycles = _cycles(graph)
    assert not cycles, "\n".join(" <-> ".join(cycle) for cycle in cycles)


@pytest.mark.parametrize(("graph", "expected"), [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ({"a": {"b"}, "b": set()}, []),
])
def test_the_cycle_finder_finds_cycles(graph: dict[str, set[str]], expected: list[list[str]]) -> None:
    assert _cycles(graph) == expected


def test_the_layer_check_sees_an_upward_import(tmp_path: Path) -> None:
    # The checks read real statements: one lazy import of the app from a service is found as such.
    source = tmp_path / "probe.py"
    source.write_text("def later():\n    from ..app import KernelHubApp\n")
    (found,) = imports("kernelhub.services.probe", source)
    assert (found.target, found.line, found.typing) == ("kernelhub.app", 2, False)
    assert RANKS[layer(found.target)] > RANKS[layer(found.source)]
