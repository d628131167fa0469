"""The optional hooks: one table (`spec.HOOKS`), small capability Protocols, and a core that asks
`isinstance(plugin, spec.P)` or `spec.option(plugin, name)`, never `hasattr`/`getattr` by name.

The decision: a hook is declared once, in `adaptkit.capabilities` (members that go together share a
Protocol) and in HOOKS (its Protocol and its default); the comment on each HOOKS row lists the
built-ins defining it, derived here from the registry so that it cannot go stale. The core is read
as a syntax tree: a literal `hasattr`/`getattr` of a hook name is a capability test done by hand
(an offence), each `isinstance(x, spec.P)` must name a capability Protocol, and each
`spec.option(x, "name")` an attribute hook. Runtime-checkable Protocols check that members are
present only, which is what the core needs to pick a path; signatures are the plugin's tests' job.
"""
from __future__ import annotations

import ast
import re
import typing
from pathlib import Path

import pytest
import torch

import adaptkit
from adaptkit import capabilities, registry, spec
from adaptkit.errors import AdaptkitError

CORE = Path(adaptkit.__file__).resolve().parent
DECLARING = {"spec.py", "capabilities.py"}  # where hooks are declared, not used
ROW = re.compile(r'^    "(\w+)": Hook\(\w+, .*\),  # (.*)$', re.M)


def protocols() -> dict[str, type]:
    """The capability Protocols, by name."""
    return {n: c for n, c in vars(capabilities).items() if isinstance(c, type) and getattr(c, "_is_protocol", False)
            and c is not typing.Protocol}


def members(protocol: type) -> list[str]:
    return spec.required_members(protocol)


def is_attribute(name: str) -> bool:
    return name in getattr(spec.HOOKS[name].protocol, "__annotations__", {})


def capability_of() -> dict[str, type]:
    """Each name whose presence is a capability -> its Protocol: the hooks, and the module plane."""
    return {**{m: spec.LiveModule for m in members(spec.LiveModule)}, **{n: h.protocol for n, h in spec.HOOKS.items()}}


def definers(name: str) -> str:
    """The comment a HOOKS row must carry: the built-ins defining the hook, `all` for a whole kind."""
    found = {k: sorted(n for n in registry.names(k) if hasattr(registry.get(k, n), name)) for k in registry.KINDS}
    if any(names and names == sorted(registry.names(k)) for k, names in found.items()):
        return "all"
    return " ".join(sorted(n for names in found.values() for n in names)) or "(none)"


def table_rows() -> dict[str, str]:
    return dict(ROW.findall((CORE / "spec.py").read_text()))


@pytest.mark.parametrize("name", sorted(spec.HOOKS))
def test_table_row_is_current(name):
    """Each row's comment says which built-ins define the hook; a plugin gaining or losing one fails here."""
    rows = table_rows()
    assert name in rows, f"spec.HOOKS row for {name} lacks its `# built-ins` comment"
    assert rows[name] == definers(name), f"spec.HOOKS['{name}']: write `# {definers(name)}`"


def test_table_covers_every_capability():
    """Every member of every capability Protocol has a row, each row's hook is a member of its
    Protocol, each Protocol is exported by spec, and no hook is declared for nobody."""
    declared = {m for p in protocols().values() for m in members(p)}
    assert declared == set(spec.HOOKS), declared ^ set(spec.HOOKS)
    for name, hook in spec.HOOKS.items():
        assert name in members(hook.protocol), f"{name} is not a member of {hook.protocol.__name__}"
        assert definers(name) != "(none)", f"no built-in defines {name}: drop it or add the plugin that needs it"
    for pname, protocol in protocols().items():
        assert getattr(spec, pname) is protocol and protocol._is_runtime_protocol, pname


def test_kind_contracts_do_not_repeat_hooks():
    """A required member is not also optional."""
    required = {m for p in spec.PROTOCOLS.values() for m in members(p)} | set(members(spec.LiveModule))
    assert not required & set(spec.HOOKS)


def offences(tree: ast.AST, where: str) -> list[str]:
    """Capability tests in core code not made through the Protocols (see the module docstring)."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        line, func, args = f"{where}:{node.lineno}", node.func, node.args
        literal = args[1].value if len(args) >= 2 and isinstance(args[1], ast.Constant) else None
        if isinstance(func, ast.Name) and func.id in ("hasattr", "getattr") and literal in capability_of():
            attribute = literal in spec.HOOKS and is_attribute(literal)
            how = "spec.option" if attribute else f"isinstance(x, spec.{capability_of()[literal].__name__})"
            found.append(f"{line}: {func.id} of the hook '{literal}'; use {how}")
        elif isinstance(func, ast.Name) and func.id == "isinstance" and len(args) == 2 \
                and isinstance(args[1], ast.Attribute) and isinstance(args[1].value, ast.Name) \
                and args[1].value.id == "spec" and not isinstance(getattr(spec, args[1].attr, None), type):
            found.append(f"{line}: spec.{args[1].attr} is no capability Protocol")
        elif isinstance(func, ast.Attribute) and func.attr == "option" and isinstance(func.value, ast.Name) \
                and func.value.id == "spec" and not (literal in spec.HOOKS and is_attribute(literal)):
            found.append(f"{line}: spec.option of '{literal}', which is no attribute hook in spec.HOOKS")
    return found


def test_core_tests_capabilities_through_protocols():
    found = [o for p in sorted(CORE.rglob("*.py")) if p.name not in DECLARING
             for o in offences(ast.parse(p.read_text()), str(p.relative_to(CORE.parent)))]
    assert not found, "\n".join(found)


# (id, core code, fragment of the offence it must give; None: none).
CASES = [
    ("hasattr of a method hook", 'if hasattr(variant, "factors"):\n    pass', "use isinstance(x, spec.Factors)"),
    ("getattr of a method hook", 'hook = getattr(q, "packed_layout", None)', "use isinstance(x, spec.PackedLayout)"),
    ("a module plane by hasattr", 'if not hasattr(variant, "defaults"):\n    pass', "use isinstance(x, spec.LiveModule)"),
    ("getattr of an attribute hook", 'lazy = getattr(m, "block_upcast", False)', "use spec.option"),
    ("unknown Protocol", "ok = isinstance(v, spec.Factorz)", "spec.Factorz is no capability Protocol"),
    ("option of a method", 'x = spec.option(v, "factors")', "spec.option of 'factors', which is no attribute"),
    ("option of an unknown name", 'x = spec.option(v, "speed")', "spec.option of 'speed'"),
    ("a Protocol test", "ok = isinstance(v, spec.Factors)", None),
    ("an option read", 'x = spec.option(m, "elementwise")', None),
    ("getattr of an ordinary attribute", 'bias = getattr(layer, "bias", None)', None),
]


@pytest.mark.parametrize("case, code, fragment", CASES, ids=[c[0] for c in CASES])
def test_scan_catches(case, code, fragment):
    found = offences(ast.parse(code), "adaptkit/x.py")
    if fragment is None:
        assert not found, found
    else:
        assert any(fragment in o for o in found), found


class TensorOnly:
    """A variant with the tensor plane only: no `defaults`, so no module plane."""

    name = "tensor_only"
    param_names = ("w",)
    config_keys = frozenset()

    def describe(self, adapter):
        return {}

    def delta(self, adapter, module, base=None):
        return torch.zeros(1)


class WithFactors(TensorOnly):
    def factors(self, adapter, module):
        raise AdaptkitError("none")

    def factor_layout(self, adapter, module):
        return {"embedding": False, "transposed": False}


# (id, plugin, capability, whether it has it)
HAS = [
    ("factors and layout", WithFactors(), spec.Factors, True),
    ("no factors", TensorOnly(), spec.Factors, False),
    ("layout but no writer", WithFactors(), spec.LowRankWriter, False),
    ("no module plane", TensorOnly(), spec.LiveModule, False),
    ("a built-in module plane", "lora", spec.LiveModule, True),
    ("a module plane without layers", "partial", spec.LiveModule, True),
    ("an intervention", "loreft", spec.Intervention, True),
    ("no weight-space form", "loreft", spec.WeightSpace, False),
]


@pytest.mark.parametrize("case, plugin, protocol, has", HAS, ids=[h[0] for h in HAS])
def test_capability_by_members(case, plugin, protocol, has):
    plugin = registry.get("variant", plugin) if isinstance(plugin, str) else plugin
    assert isinstance(plugin, protocol) is has


def test_no_module_plane_refused():
    with pytest.raises(AdaptkitError, match=r"^variant 'tensor_only' has no module plane \(it cannot be put on a model\)$"):
        adaptkit.inject(torch.nn.Sequential(torch.nn.Linear(2, 2)), TensorOnly(), target_modules=["0"])


@pytest.mark.parametrize("name", sorted(n for n in spec.HOOKS if is_attribute(n)))
def test_option_default(name):
    """`spec.option` gives the table's default for a plugin without the attribute, the plugin's own otherwise."""
    assert spec.option(object(), name) == spec.HOOKS[name].default
    holder = type("Holder", (), {name: "own"})()
    assert spec.option(holder, name) == "own"
