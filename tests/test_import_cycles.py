"""No import cycles in `adaptkit`: the graph of module-level imports, read from the syntax tree, is acyclic.

An edge A -> B is an import that runs when A is imported: a statement at module level, in a class
body, or under a module-level `if`/`try`/`with`, but not inside a function (a deliberate late import
runs only when called) nor under `if TYPE_CHECKING:` (never run). Relative imports are resolved;
`from P import N` is an edge to the module P.N where that is a module, else to P. Importing a
submodule also runs its parent packages' `__init__`, but that is no edge here: every package would
otherwise be in a cycle with each module its `__init__` imports.
"""
from __future__ import annotations

import ast
import graphlib
import re
from collections import defaultdict
from pathlib import Path

import pytest

import adaptkit

ROOT = Path(adaptkit.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_time_imports(body: list[ast.stmt]):
    """The import statements that run when a module whose body is `body` is imported."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.ClassDef):
            yield from import_time_imports(node.body)
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from import_time_imports(node.body)
            yield from import_time_imports(node.orelse)
        elif isinstance(node, (ast.Try, ast.TryStar)):
            for block in (node.body, *(h.body for h in node.handlers), node.orelse, node.finalbody):
                yield from import_time_imports(block)
        elif isinstance(node, (ast.With, ast.For, ast.While)):
            yield from import_time_imports(node.body)
            yield from import_time_imports(getattr(node, "orelse", []))


def targets(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool, modules: set[str]) -> set[str]:
    """The modules of the package that `node`, in module `importer`, imports."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in modules}
    if node.level:
        anchor = importer.split(".") if is_package else importer.split(".")[:-1]
        anchor = anchor[:len(anchor) - (node.level - 1)]
        source = ".".join(anchor + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    found = set()
    for alias in node.names:
        if f"{source}.{alias.name}" in modules:
            found.add(f"{source}.{alias.name}")
        elif source in modules:
            found.add(source)
    return found


def all_imports(tree: ast.Module):
    """Every import statement that can run, late ones inside functions included (not `if TYPE_CHECKING:`)."""
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node.test)
               for stmt in node.body for n in ast.walk(stmt)}
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in skipped]


def import_graph(late: bool = False) -> dict[str, dict[str, list[str]]]:
    """importer -> {imported: ["path:line: the import statement", ...]} over every module of the package;
    `late`: counting the imports inside functions too."""
    paths = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}
    graph: dict[str, dict[str, list[str]]] = {}
    for name, path in paths.items():
        source = path.read_text()
        edges: dict[str, list[str]] = defaultdict(list)
        tree = ast.parse(source, str(path))
        for node in all_imports(tree) if late else import_time_imports(tree.body):
            for target in targets(node, name, path.name == "__init__.py", set(paths)):
                if target != name:
                    where = f"{path.relative_to(ROOT.parent)}:{node.lineno}"
                    edges[target].append(f"{where}: {ast.get_source_segment(source, node)}")
        graph[name] = dict(edges)
    return graph


def cycles(graph: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """Cycles that together cover every cycle: find one, take out its first edge, look again."""
    remaining = {a: set(b) for a, b in graph.items()}
    found = []
    while True:
        try:
            tuple(graphlib.TopologicalSorter(remaining).static_order())
            return found
        except graphlib.CycleError as e:
            cycle = e.args[1][::-1]  # graphlib lists each module before the one importing it
            found.append(cycle)
            remaining[cycle[0]].discard(cycle[1])


def describe(graph: dict[str, dict[str, list[str]]], cycle: list[str]) -> str:
    """The cycle, and under each of its edges the import statements that make it."""
    lines = [" -> ".join(cycle)]
    for a, b in zip(cycle, cycle[1:]):
        lines += [f"    {where}" for where in graph[a][b]]
    return "\n".join(lines)


def test_the_graph_sees_imports():
    """The reader finds real edges, resolves relative imports and skips late imports inside functions."""
    graph = import_graph()
    assert {"adaptkit.errors", "adaptkit.files.inspection", "adaptkit.io"} <= set(graph["adaptkit"])
    assert "adaptkit.live.adapters" not in graph["adaptkit"]  # imported in `__getattr__`, on first use
    assert {"adaptkit.allocator", "adaptkit.errors"} <= set(graph["adaptkit.cli.boundary"])  # `from ..`
    assert "adaptkit.cli.merge" in graph["adaptkit.cli"]  # `from . import merge` in a package's __init__


@pytest.mark.parametrize("code, importer, is_package, expected", [
    ("from . import b", "p.a", False, {"p.b"}),
    ("from . import x", "p.a", False, {"p"}),
    ("from .b import x", "p.a", False, {"p.b"}),
    ("from .. import b", "p.q.a", False, {"p.b"}),
    ("from . import a", "p.q", True, {"p.q.a"}),
    ("from .. import x", "p.q", True, {"p"}),
    ("import p.b", "p.a", False, {"p.b"}),
    ("import os", "p.a", False, set()),
    ("from p.q import a, x", "p.b", False, {"p.q.a", "p.q"}),
], ids=["sibling module", "name of the package", "from a sibling", "parent's module", "package's submodule",
        "package's parent", "absolute", "outside", "both"])
def test_resolves_imports(code, importer, is_package, expected):
    modules = {"p", "p.a", "p.b", "p.q", "p.q.a"}
    assert targets(ast.parse(code).body[0], importer, is_package, modules) == expected


def test_finds_a_cycle_and_skips_late_imports():
    graph = {"a": {"b": ["a.py:1: from . import b"]}, "b": {"c": ["b.py:1"]}, "c": {"a": ["c.py:1"]}, "d": {}}
    assert [set(c) for c in cycles(graph)] == [{"a", "b", "c"}]
    late = ast.parse("import os\ndef f():\n    from . import b\nif TYPE_CHECKING:\n    from . import c\n"
                     "try:\n    from . import d\nexcept ImportError:\n    d = None\nclass K:\n    from . import e\n")
    assert [n.lineno for n in import_time_imports(late.body)] == [1, 7, 11]


def test_no_import_cycles():
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(describe(graph, c) for c in found)


# The layers of the package, lowest first (README "Architecture"): a module imports only from its own layer
# and those below, late imports inside functions included, so no two layers depend on each other.
LAYERS = [
    ("errors", ["adaptkit.errors"]),
    ("io", ["adaptkit.io"]),
    ("plugin contracts and registry", ["adaptkit.spec", "adaptkit.capabilities", "adaptkit.registry",
                                       "adaptkit.validate", "adaptkit.allocator", "adaptkit.devices", "adaptkit.adapter"]),
    ("quant", ["adaptkit.quant"]),
    ("hub", ["adaptkit.hub"]),
    ("files", ["adaptkit.files"]),
    ("live", ["adaptkit.live"]),
    ("merge", ["adaptkit.merge"]),
    ("train", ["adaptkit.train"]),
    ("plots", ["adaptkit.plots"]),
    ("entry points", ["adaptkit.cli", "adaptkit.plugin", "adaptkit.__main__", "adaptkit"]),
]


def layer_of(module: str) -> int:
    for i, (_, prefixes) in enumerate(LAYERS):
        if module in prefixes or any(module.startswith(p + ".") for p in prefixes if p != "adaptkit"):
            return i
    raise AssertionError(f"{module} is in no layer of LAYERS: place it")


def test_layers_import_downwards_only():
    graph = import_graph(late=True)
    assert [LAYERS[layer_of(m)][0] for m in ("adaptkit.io.store", "adaptkit.hub", "adaptkit", "adaptkit.cli.merge")] == [
        "io", "hub", "entry points", "entry points"]
    version = re.compile(r".*: from \.+ import __version__$")  # the package's one constant, read by any layer
    upward = [f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]}):\n    " + "\n    ".join(where)
              for a, edges in graph.items() for b, where in edges.items()
              if layer_of(b) > layer_of(a) and not all(version.match(w) for w in where)]
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_no_mutual_dependencies_even_through_late_imports():
    """A late import inside a function breaks no cycle in the design, only at import time."""
    graph = import_graph(late=True)
    found = cycles(graph)
    assert not found, "modules that need each other:\n" + "\n".join(describe(graph, c) for c in found)
