"""The plugin registry: every variant, merge method, quantizer and format is found here by name.

Built-ins are listed in `registry.toml` (shipped inside the `adaptkit_plugins` package); third
parties add entry points in the groups `adaptkit.variant`, `adaptkit.merge`, `adaptkit.quantizer`
and `adaptkit.format`. Built-ins and third-party plugins take the same path. Listing reads names
and docstrings without importing anything; `get(kind, name)` imports on first use and checks the
object against its Protocol. `ADAPTKIT_PLUGINS=dist-or-name,...` limits which third-party plugins
load (built-ins always do).
"""
from __future__ import annotations

import ast
import importlib
import importlib.metadata
import importlib.resources
import importlib.util
import os
import re
import tomllib
from dataclasses import dataclass
from functools import cache

from .errors import PluginError, unknown_name

KINDS = ("variant", "merge", "quantizer", "format")
BUILTIN = "built-in"


@dataclass(frozen=True)
class PluginEntry:
    """Where a plugin comes from: `target` is "module:attr"; `source` is built-in or a distribution."""

    kind: str
    name: str
    target: str
    source: str

    @property
    def module(self) -> str:
        return self.target.partition(":")[0]

    @property
    def attr(self) -> str:
        return self.target.partition(":")[2]


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise unknown_name("plugin kind", kind, KINDS)


def _builtin_table() -> dict:
    text = importlib.resources.files("adaptkit_plugins").joinpath("registry.toml").read_text()
    table = tomllib.loads(text)
    unknown = set(table) - set(KINDS) - {"default"}
    if unknown:
        raise PluginError(f"registry.toml: unknown section [{sorted(unknown)[0]}] (kinds: {', '.join(KINDS)})")
    return table


def _builtin_entries() -> list[PluginEntry]:
    table = {k: v for k, v in _builtin_table().items() if k in KINDS}
    return [PluginEntry(kind, name, target, BUILTIN) for kind, items in table.items() for name, target in items.items()]


def default(kind: str, role: str | None = None) -> str:
    """The plugin of `kind` the core uses when none is named (registry.toml's [default] table):
    the canonical adapter format that outputs are written in, and its low-rank variant. Kinds the
    core uses in several roles have a table of them (`[default.merge]`: the merge methods behind
    `adaptkit merge`'s quick form and the soups); `role` picks one."""
    _check_kind(kind)
    found = _builtin_table().get("default", {}).get(kind)
    if role is not None:
        found = found.get(role) if isinstance(found, dict) else None
    if not isinstance(found, str):
        raise PluginError(f"registry.toml names no default {kind}{f' for {role}' if role else ''}")
    return found


def _normalized(name: str) -> str:
    """Distribution names compare as PEP 503 says: case and runs of -_. do not matter."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _third_party_entries() -> list[PluginEntry]:
    wanted = {_normalized(w) for w in os.environ.get("ADAPTKIT_PLUGINS", "").split(",") if w.strip()}
    entries, installed = [], importlib.metadata.entry_points()  # (read once: each group's call read them all again)
    for kind in KINDS:
        for ep in installed.select(group=f"adaptkit.{kind}"):
            dist = ep.dist.name if ep.dist else "unknown distribution"
            if wanted and _normalized(dist) not in wanted and _normalized(ep.name) not in wanted:
                continue
            source = f"{dist} {ep.dist.version}" if ep.dist else dist
            entries.append(PluginEntry(kind, ep.name, ep.value, source))
    return entries


@cache
def _table() -> dict[str, dict[str, PluginEntry]]:
    table: dict[str, dict[str, PluginEntry]] = {kind: {} for kind in KINDS}
    for entry in _builtin_entries() + _third_party_entries():
        seen = table[entry.kind].get(entry.name)
        if seen is not None:
            raise PluginError(
                f"two {entry.kind} plugins are named '{entry.name}': {seen.target} ({seen.source}) and "
                f"{entry.target} ({entry.source}); uninstall one or limit with ADAPTKIT_PLUGINS"
            )
        table[entry.kind][entry.name] = entry
    return table


def reload() -> None:
    """Forget what was discovered (after installing a plugin package in the same process)."""
    _table.cache_clear()
    _loaded.clear()


def entries(kind: str | None = None) -> list[PluginEntry]:
    """All plugin entries (of one kind), sorted by kind and name. Imports no plugin."""
    if kind is not None:
        _check_kind(kind)
    table = _table()
    kinds = [kind] if kind else list(KINDS)
    return [table[k][n] for k in kinds for n in sorted(table[k])]


def names(kind: str) -> list[str]:
    """Registered names of one kind. Imports no plugin."""
    return [e.name for e in entries(kind)]


def entry(kind: str, name: str) -> PluginEntry:
    _check_kind(kind)
    found = _table()[kind].get(name)
    if found is None:
        raise unknown_name(f"{kind} plugin", name, _table()[kind])
    return found


_loaded: dict[tuple[str, str], object] = {}


def get(kind: str, name: str):
    """Import (once) and return the plugin object `name` of `kind`, checked against its contract."""
    key = (kind, name)
    if key not in _loaded:
        _loaded[key] = _load(entry(kind, name))
    return _loaded[key]


def detect(kind: str, store) -> str | None:
    """The name of the first plugin of `kind`, in name order, whose `detect(store)` says yes, or None.

    Formats recognize adapters and quantizers their packed layouts this way; asking in the
    registry's order keeps the answer independent of which plugins happen to be imported."""
    for name in names(kind):
        if get(kind, name).detect(store):
            return name
    return None


def _load(e: PluginEntry):
    from . import spec

    try:
        module = importlib.import_module(e.module)
        obj = getattr(module, e.attr)
    except Exception as exc:  # any failure inside a plugin's import is reported the same way
        raise PluginError(f"{e.kind} plugin '{e.name}' ({e.source}) failed to load {e.target}: {type(exc).__name__}: {exc}") from exc
    protocol = spec.PROTOCOLS[e.kind]
    if not isinstance(obj, protocol):
        missing = [a for a in spec.required_members(protocol) if not hasattr(obj, a)]
        raise PluginError(f"{e.kind} plugin '{e.name}' ({e.source}) does not fulfil the {e.kind} contract: missing {', '.join(missing)}")
    if e.kind == "variant" and not isinstance(obj, (spec.StoredDelta, spec.Factors, spec.MergeCheck)):
        # ΔW comes from `delta` or is formed from `factors`; a variant with neither edits activations and must say so
        raise PluginError(f"variant plugin '{e.name}' ({e.source}) does not fulfil the variant contract: missing delta "
                          "(or factors and factor_layout; or check_mergeable, for a variant that edits activations)")
    if getattr(obj, "name", None) != e.name:
        raise PluginError(f"{e.kind} plugin '{e.name}' ({e.source}): object says its name is '{getattr(obj, 'name', None)}'")
    return obj


def describe(e: PluginEntry) -> tuple[str, str | None]:
    """(one-line description, problem or None) for an entry, from source text without importing it.

    The description is the first docstring line of the plugin object's class or function, else the
    `about=` string it is built with, else the module docstring's first line.
    """
    try:
        spec_ = importlib.util.find_spec(e.module)
    except Exception as exc:  # a parent package failing to import
        return "", f"{type(exc).__name__}: {exc}"
    if spec_ is None or not spec_.origin or not os.path.isfile(spec_.origin):
        return "", f"module {e.module} not found"
    try:
        with open(spec_.origin, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (SyntaxError, UnicodeDecodeError) as exc:
        return "", f"{type(exc).__name__} in {spec_.origin}: {exc}"
    text = _object_doc(tree, e.attr) or ast.get_docstring(tree) or ""
    if not _defines(tree, e.attr):
        return text.strip().splitlines()[0] if text.strip() else "", f"{e.module} defines no '{e.attr}'"
    return (text.strip().splitlines() or [""])[0], None


def _defines(tree: ast.Module, attr: str) -> bool:
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == attr:
            return True
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == attr for t in targets):
                return True
        if isinstance(node, ast.ImportFrom) and any((a.asname or a.name) == attr for a in node.names):
            return True
    return False


def _object_doc(tree: ast.Module, attr: str) -> str | None:
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == attr:
            return ast.get_docstring(node)
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == attr for t in node.targets):
            call = node.value
            if isinstance(call, ast.Call):
                for kw in call.keywords:
                    if kw.arg == "about" and isinstance(kw.value, ast.Constant):
                        return kw.value.value
                if isinstance(call.func, ast.Name) and call.func.id in classes:
                    return ast.get_docstring(classes[call.func.id])
    return None
