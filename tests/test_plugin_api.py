"""The plugin API: plugins import adaptkit only through `adaptkit.plugin`, and it lists no more.

Every .py of the built-in plugins (plugins/) and of examples/plugin-example is read as a syntax
tree; an import of any other adaptkit module (at the top, inside a function, under TYPE_CHECKING,
or by name through importlib) fails, as does reaching a private member of a namespace the API
exports (`registry._table`). Each name in `adaptkit.plugin.__all__` must resolve and be used by
some plugin, so the API grows no dead names; importing it must not import torch.
"""
from __future__ import annotations

import ast
import subprocess
import sys
import types
from functools import cache
from pathlib import Path

import pytest

import adaptkit.plugin as api

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_SOURCES = (ROOT / "plugins", ROOT / "examples" / "plugin-example")
API = "adaptkit.plugin"

# Names the API exports that no built-in plugin or the example imports: name -> why it is kept.
UNUSED_BY_BUILTINS: dict[str, str] = {}


def _core(module: str) -> bool:
    return module == "adaptkit" or module.startswith("adaptkit.")


def _namespaces() -> frozenset[str]:
    return frozenset(n for n in api.__all__ if isinstance(getattr(api, n), types.ModuleType))


def offences(tree: ast.Module, where: str) -> list[str]:
    """One line per way the source reaches adaptkit other than through `adaptkit.plugin`."""
    found, aliases = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [f"{where}:{node.lineno}: imports {a.name}" for a in node.names if _core(a.name) and a.name != API]
        elif isinstance(node, ast.ImportFrom) and not node.level and _core(node.module or ""):
            if node.module != API:
                found.append(f"{where}:{node.lineno}: imports from {node.module} (use {API})")
            else:
                aliases |= {a.asname or a.name for a in node.names if a.name in _namespaces()}
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str) and _core(node.args[0].value) and node.args[0].value != API
              and getattr(node.func, "attr", getattr(node.func, "id", "")) in ("import_module", "__import__")):
            found.append(f"{where}:{node.lineno}: imports {node.args[0].value} by name")
    found += [f"{where}:{node.lineno}: reaches the private {node.value.id}.{node.attr}"
              for node in ast.walk(tree) if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
              and node.value.id in aliases and node.attr.startswith("_")]
    return found


@cache
def plugin_files() -> list[Path]:
    files = sorted(p for folder in PLUGIN_SOURCES for p in folder.rglob("*.py"))
    assert len(files) > 30, files  # the scan sees the tree it is meant to
    return files


@cache
def tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


# -- the checker catches each way in: (id, source, expected offence) -------------------------------
CASES = [
    ("a core module", "from adaptkit.errors import AdaptkitError", "1: imports from adaptkit.errors (use adaptkit.plugin)"),
    ("the package", "from adaptkit import validate as v", "1: imports from adaptkit (use adaptkit.plugin)"),
    ("a plain import", "import adaptkit.spec", "1: imports adaptkit.spec"),
    ("the top package", "import adaptkit", "1: imports adaptkit"),
    ("inside a function", "def f():\n    from adaptkit.live.targets import find_targets",
     "2: imports from adaptkit.live.targets (use adaptkit.plugin)"),
    ("under TYPE_CHECKING", "if TYPE_CHECKING:\n    from adaptkit.io import TensorStore",
     "2: imports from adaptkit.io (use adaptkit.plugin)"),
    ("by name", "import importlib\nimportlib.import_module('adaptkit.files.lowrank')", "2: imports adaptkit.files.lowrank by name"),
    ("a private member", "from adaptkit.plugin import registry\nregistry._table()", "2: reaches the private registry._table"),
    ("an aliased namespace", "from adaptkit.plugin import validate as v\nv._fail('x', 'y', 1)",
     "2: reaches the private v._fail"),
]


@pytest.mark.parametrize("source,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_the_check_finds(source, expected):
    assert offences(ast.parse(source), "p.py") == [f"p.py:{expected}"]


@pytest.mark.parametrize("source", ["from adaptkit.plugin import AdapterFiles, validate as v\nv.flag(1, 'x')",
                                    "import adaptkit.plugin", "from ._lora_lowrank import LowRankForms",
                                    "from adaptkit_plugins.variants.lora import LORA_TYPES"])
def test_the_check_passes(source):
    assert offences(ast.parse(source), "p.py") == []


# -- the plugins as they are ------------------------------------------------------------------------
def test_plugins_import_adaptkit_only_through_the_plugin_api():
    found = [line for path in plugin_files() for line in offences(tree(path), str(path.relative_to(ROOT)))]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("name", api.__all__)
def test_every_exported_name_resolves(name):
    assert getattr(api, name) is not None


def test_an_unknown_name_is_refused_by_name():
    with pytest.raises(AttributeError, match="'adaptkit.plugin' has no attribute 'open_store'"):
        api.open_store  # noqa: B018  (a core function, deliberately not part of the API)


def test_every_exported_name_is_used_by_a_plugin():
    used = {a.name for path in plugin_files() for node in ast.walk(tree(path))
            if isinstance(node, ast.ImportFrom) and node.module == API for a in node.names}
    assert used <= set(api.__all__)
    assert set(UNUSED_BY_BUILTINS) <= set(api.__all__) - used, "an allow-listed name is now used: drop it from the list"
    dead = set(api.__all__) - used - set(UNUSED_BY_BUILTINS)
    assert not dead, f"exported but used by no plugin: {sorted(dead)} (drop them, or say why in UNUSED_BY_BUILTINS)"


def test_importing_the_plugin_api_does_not_import_torch():
    out = subprocess.run([sys.executable, "-c", f"import sys, {API}; print('torch' in sys.modules)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
