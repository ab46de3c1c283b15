"""Imports only point down the flow: every import statement in the package (at module level,
inside functions, under ``TYPE_CHECKING``) goes to a module of the same layer or an earlier
one, and no chain of imports comes back to where it started.

Read from the source with ``ast``, so a lazy import inside a function (the usual way a circle
hides) counts like any other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fusesurgery"

# The flow, first to last. A module belongs to the layer of the longest name that prefixes
# its own (``fusesurgery.io.hub_sources`` is ``io``; ``reports.formatting``, a leaf of number
# and size formatting every report shares, is ``base``); the package facade
# (``fusesurgery/__init__.py``) sits above everything and nothing imports it.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("base", ("_version", "errors", "_json", "_lazy", "_sizes", "_plural", "_arguments",
              "_device", "reports.formatting")),
    ("families", ("families",)),
    ("config", ("config",)),
    ("io", ("io",)),
    ("convert", ("convert",)),
    ("modules", ("modules",)),
    ("surgery", ("surgery",)),
    ("write", ("write",)),
    ("validate", ("validate",)),
    ("run", ("run",)),
    ("hf", ("hf",)),
    ("reports", ("reports",)),
    ("hub", ("hub",)),
    ("cli", ("cli", "demo", "__main__")),
    ("testing", ("testing",)),
)


# Known debts, each one lazy import with its reason; anything else that points up or closes a
# circle fails. validate.checks hands a transformers export to hf's checks (the transformers
# row), while hf.validate_export builds on validate's rows and report: untangling it means
# moving the report types below hf. (Merged from the hftrain and hfany work.)
KNOWN_LAZY_UPWARD: frozenset[tuple[str, str]] = frozenset({
    ("fusesurgery.validate.checks", "fusesurgery.hf"),
})


def _known_debt(module: str, target: str, in_function: bool) -> bool:
    return in_function and any(module == source and (target == to or target.startswith(to + "."))
                               for source, to in KNOWN_LAZY_UPWARD)


def _module_names() -> dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("fusesurgery", *path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


MODULES = _module_names()


def layer_of(module: str) -> int:
    """The rank of ``module``'s layer in ``LAYERS`` (the facade ranks above them all)."""
    if module == "fusesurgery":
        return len(LAYERS)
    name = module.removeprefix("fusesurgery.")
    matches = [(len(member), rank) for rank, (_, members) in enumerate(LAYERS)
               for member in members if name == member or name.startswith(member + ".")]
    if not matches:
        raise AssertionError(f"{module} belongs to no layer: add its package to LAYERS")
    return max(matches)[1]


def _is_lazy_facade(module: str, target: str, in_function: bool) -> bool:
    """A package's ``__init__`` importing one of its own submodules inside a function: the
    package's lazy public surface, not something the submodule depends on."""
    return (in_function and MODULES[module].name == "__init__.py"
            and target.startswith(module + "."))


def imports_of(module: str) -> list[tuple[str, int, bool]]:
    """``(imported fusesurgery module, line, inside a function)`` for every import statement
    of ``module``; ``from package import name`` counts as importing ``package.name`` where
    that is a module, else ``package``."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            targets: list[str] = []
            if isinstance(child, ast.Import):
                targets = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                for alias in child.names:
                    full = f"{child.module}.{alias.name}"
                    targets.append(full if full in MODULES else child.module)
            for target in targets:
                if target.split(".")[0] == "fusesurgery" and target in MODULES \
                        and target != module:
                    found.append((target, child.lineno, in_function))
            visit(child, inner)

    visit(tree, False)
    return found


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


def test_imports_only_point_down():
    upward = []
    for module in sorted(MODULES):
        for target, line, lazy in imports_of(module):
            if layer_of(target) > layer_of(module) and not _known_debt(module, target, lazy):
                upward.append(f"{MODULES[module].relative_to(PACKAGE.parent)}:{line}: "
                              f"{LAYERS[layer_of(module)][0]} imports {target}")
    assert not upward, "imports pointing up the flow:\n" + "\n".join(upward)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = walk(nxt)
                if cycle:
                    return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = walk(node)
            if cycle:
                return cycle
    return None


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module in MODULES:
        graph[module] = {target for target, _, lazy in imports_of(module)
                         if not _is_lazy_facade(module, target, lazy)
                         and not _known_debt(module, target, lazy)}
    return graph


def test_no_import_circles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


@pytest.mark.parametrize("graph, has_cycle", [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, False),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, True),
    ({"a": {"b", "c"}, "b": {"c"}, "c": set()}, False),
])
def test_find_cycle_finds_circles(graph, has_cycle):
    assert (find_cycle(graph) is not None) == has_cycle


def test_a_lazy_upward_import_is_caught(tmp_path, monkeypatch):
    """The checks read function-level imports too: the Hub circle io -> hub was one."""
    source = "def f():\n    from fusesurgery.hub.push import push_fused\n"
    fake = tmp_path / "checkpoint.py"
    fake.write_text(source)
    monkeypatch.setitem(MODULES, "fusesurgery.io.fake", fake)
    assert imports_of("fusesurgery.io.fake") == [("fusesurgery.hub.push", 2, True)]
    assert layer_of("fusesurgery.hub.push") > layer_of("fusesurgery.io.fake")
