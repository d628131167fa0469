"""The core never names a plugin nor special-cases one: a guard generated from the registry.

The words a plugin brings are read from registry.toml (with tomllib) and from the plugins it
lists: every registered name of every kind, each variant's config keys (`config_keys`,
`config_types`, the module plane's `defaults`) and each merge method's parameter names (`params`).
Every module of the core (adaptkit/, read as a syntax tree, so that comments and docstrings, strings
standing as statements of their own, are prose and everything else is code) is held to three rules:

1. No string constant equals a plugin word. Dict keys, `getattr` names, f-string pieces and
   tuples of keys are all code; a help text that mentions a plugin in a sentence is not the word.
   `"linear"` as a quick-form default, `"total_step"` filled in for AdaLoRA, `"use_dora"` printed
   for LoRA: each is one plugin's knowledge living in the core. It belongs in the plugin (a hook
   or attribute declared in spec.py) or in registry.toml (`registry.default(kind, role)`).
   ALLOWED lists the few words the core shares with PEFT and mergekit, or that name something of
   its own, each with its reason; an entry may limit the word to the modules where it means that
   (`"linear"`, a layer kind in live/layer.py, is still the merge method anywhere else).
2. No plugin module is imported (`import adaptkit_plugins...`, or its dotted name as a string):
   the core reaches plugins through the registry only.
3. No hook that one plugin alone defines is looked up, unless spec.py declares it. A lookup is
   `getattr`/`hasattr` with a literal name, or an attribute access `x.name`; one plugin is one
   plugin module (nf4 and fp4 are both fourbit.py); declared means spec.py names it, where a hook
   has its default and becomes something any plugin may offer. Attribute names that ordinary
   objects have (str, dict, re.Match, Path, torch.Tensor, nn.Module: `m.groups()`) or that the
   core's own classes define are not taken for plugin lookups; `getattr` with a literal always is.
"""
from __future__ import annotations

import ast
import importlib.resources
import re
import tomllib
from collections import defaultdict
from functools import cache
from pathlib import Path

import pytest
import torch

import adaptkit
from adaptkit import registry, spec
from adaptkit.errors import PluginError

CORE = Path(adaptkit.__file__).resolve().parent
PLUGINS = "adaptkit_plugins"

# Plugin words the core may use: word -> None (anywhere) or the core modules (file stems) it may
# appear in. Keep it short; every entry must be needed (test_allow_list_is_needed).
ALLOWED: dict[str, frozenset[str] | None] = {
    # PEFT's and mergekit's vocabulary, applied by the core to every adapter or recipe alike:
    "weight": None,  # the tensor role `<module>.weight`; mergekit's per-model `weight` (the quick form gives it)
    "bias": None,  # the tensor role `<module>.bias`, a layer's bias
    "inference_mode": None,  # PEFT's field of every adapter config (the adapter in its saved form)
    "layers_pattern": None,  # PEFT's targeting key (beside target_modules, layers_to_transform), applied by
    #                          the core's targeting for every variant
    "lora": frozenset({"refs", "multi"}),  # mergekit's key for the adapter of a model reference mapping ({model, lora});
    #                                      the adapter may be of any variant, as after `+` in the string form
    "scale": frozenset({"bakllama"}),  # a field of mergekit's bakllama configs (`layer_slices[i].scale`), read there
    "use_rslora": frozenset({"spec"}),  # the scaling rule of the canonical LowRankAdapter, defined there
    # Ordinary words that also name something of the core's own:
    "modules": None,  # reports count adapted modules under it; mergekit recipes' `modules` section
    "layers": None,  # the attribute transformers models keep their blocks under (targets.LAYER_LISTS)
    "train": None,  # the `train` command and its progress bar
    "alpha": frozenset({"soup"}),  # WiSE-FT's α in the results of soup.sweep and of cli/soup.py's sweep
    "linear": frozenset({"layer", "targets"}),  # the kind of an nn.Linear layer (layer.Target.kind)
    "num_attention_heads": frozenset({"tokensurgeon"}),  # a model's config.json key (mp_rope's RoPE heads); also PEFT's
    #                                                    prompt-learning shape
    "num_layers": frozenset({"slices", "modules"}),  # a model's layer count (mergekit's slices, T5's encoder); also PEFT's prompt-learning shape
}

# Attribute names of ordinary objects: `x.name` with one of these is not a plugin lookup.
COMMON = frozenset().union(*(dir(t) for t in (str, bytes, dict, list, tuple, set, re.Match, re.Pattern, Path,
                                                torch.Tensor, torch.nn.Module)))


@cache
def registered() -> list[tuple[str, str, str]]:
    """(kind, name, plugin module) of every plugin registry.toml lists, read as the registry reads it."""
    table = tomllib.loads(importlib.resources.files(PLUGINS).joinpath("registry.toml").read_text())
    return [(kind, name, target.partition(":")[0]) for kind, entries in table.items() if kind in registry.KINDS
            for name, target in entries.items()]


@cache
def plugin_words() -> dict[str, str]:
    """Every plugin word -> what it is."""
    brought: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for kind, name, _ in registered():
        obj = registry.get(kind, name)
        if kind == "variant":
            for key in {*obj.config_keys, *getattr(obj, "config_types", {}), *getattr(obj, "defaults", {})}:
                brought[key]["a config key of variant"].append(name)
        elif kind == "merge":
            for key in obj.params:
                brought[key]["a parameter of merge method"].append(name)
    words = {word: " and ".join(f"{what} {names[0]}" + (f" (and {len(names) - 1} more)" if len(names) > 1 else "")
                                for what, names in whats.items()) for word, whats in brought.items()}
    words.update({name: f"the {kind} plugin '{name}'" for kind, name, _ in registered()})
    return words


@cache
def one_plugin_hooks() -> dict[str, str]:
    """Attributes that the objects of one plugin module alone have and spec.py never names -> that module."""
    owners: dict[str, set[str]] = defaultdict(set)
    for kind, name, module in registered():
        for attr in dir(registry.get(kind, name)):
            if not attr.startswith("_"):
                owners[attr].add(module)
    declared = set(re.findall(r"\w+", Path(spec.__file__).read_text()))
    return {attr: next(iter(mods)) for attr, mods in owners.items() if len(mods) == 1 and attr not in declared}


def _prose(tree: ast.AST) -> set[int]:
    """The strings that are statements of their own: docstrings (and attribute docstrings), which do nothing."""
    return {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)}


def _own_attributes(tree: ast.AST) -> set[str]:
    """Methods and attributes the core's classes define (`x.name` then means the core's own)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    names.add(item.name)
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    names.add(item.target.id)
                elif isinstance(item, ast.Assign):
                    names |= {t.id for t in item.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
    return names


@cache
def core_trees() -> dict[str, ast.Module]:
    return {str(p.relative_to(CORE.parent)): ast.parse(p.read_text(), str(p)) for p in sorted(CORE.rglob("*.py"))}


@cache
def core_attributes() -> frozenset[str]:
    return frozenset().union(*(_own_attributes(t) for t in core_trees().values()))


def _lookup(node: ast.AST) -> str | None:
    """The attribute name a node looks up on some object: `x.name`, `getattr(x, "name")`, `hasattr(...)`."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr"):
        if len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
            return node.args[1].value
    if isinstance(node, ast.Attribute) and node.attr not in COMMON and node.attr not in core_attributes():
        return node.attr
    return None


def offences(tree: ast.Module, where: str, allowed: dict[str, frozenset[str] | None] = ALLOWED) -> list[str]:
    """Where the module's code names a plugin or special-cases one (the three rules above)."""
    words, hooks, stem = plugin_words(), one_plugin_hooks(), Path(where).stem
    prose = _prose(tree)
    found = []
    for node in sorted(ast.walk(tree), key=lambda n: getattr(n, "lineno", 0)):
        line = f"{where}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in prose:
            value = node.value
            if value in words and not (value in allowed and (allowed[value] is None or stem in allowed[value])):
                found.append(f"{line}: '{value}' is {words[value]}")
            elif value.startswith(PLUGINS + "."):
                found.append(f"{line}: names the plugin module {value}; reach plugins through the registry")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for module in modules:
                if module.split(".")[0] == PLUGINS:
                    found.append(f"{line}: imports the plugin module {module}; reach plugins through the registry")
        name = _lookup(node)
        if name in hooks:
            found.append(f"{line}: looks up '{name}', which only {hooks[name]} defines and spec.py does not declare")
    return found


def test_core_names_no_plugin():
    found = [o for where, tree in core_trees().items() for o in offences(tree, where)]
    assert not found, "\n".join(found)


# (id, core module it would sit in, code, fragment of the offence it must give; None: none).
CASES = [
    ("quick form defaults", "cli", 'method = method or ("task_arithmetic" if base else "linear")',
     "'task_arithmetic' is the merge plugin 'task_arithmetic'"),
    ("plugin name as a layer kind elsewhere", "cli", 'kind = "linear"', "'linear' is the merge plugin 'linear'"),
    ("uniform soup", "soup", 'recipe = {"merge_method": "average", "models": models}', "'average' is the merge plugin"),
    ("AdaLoRA's total_step", "train", 'config.setdefault("total_step", total)',
     "'total_step' is a config key of variant adalora"),
    ("LoRA's flags in a report", "report", 'for key in ("use_rslora", "use_dora"):\n    pass',
     "'use_rslora' is a config key of variant adalora"),
    ("a quantizer by name", "cli/quantize", 'q = registry.get("quantizer", "nf4")', "'nf4' is the quantizer plugin"),
    ("a format by name", "convert", 'write(lowrank, "kohya", out)', "'kohya' is the format plugin"),
    ("a merge parameter", "soup", 'recipe["parameters"] = {"density": 0.5}',
     "'density' is a parameter of merge method"),
    ("a plugin word in an f-string", "merge", 'method = f"dare_ties"', "'dare_ties' is the merge plugin"),
    ("a plugin module imported", "convert", "from adaptkit_plugins.variants import lora",
     "imports the plugin module adaptkit_plugins.variants"),
    ("a plugin module by its dotted name", "registry", 'importlib.import_module("adaptkit_plugins.merges.slerp")',
     "names the plugin module adaptkit_plugins.merges.slerp"),
    ("getattr of one plugin's hook", "inspection", 'rank = getattr(variant, "kept_rank", None)',
     "looks up 'kept_rank', which only adaptkit_plugins.variants.adalora defines"),
    ("hasattr of one plugin's hook", "adapters", 'if hasattr(variant, "intervene"):\n    pass',
     "looks up 'intervene', which only adaptkit_plugins.variants.loreft defines"),
    ("attribute of one plugin's hook", "unpacked", "a, b = variant.matrices(adapter)",
     "looks up 'matrices', which only adaptkit_plugins.variants.vera defines"),
    ("a docstring naming plugins", "soup", 'def f():\n    """slerp"""\n    """total_step"""', None),
    ("a comment naming plugins", "cli", 'x = 1  # "linear", "total_step", getattr(v, "kept_rank")', None),
    ("help text mentioning plugins", "cli", 'HELP = "Quick form: merge method (default: task_arithmetic)."', None),
    ("allowed shared words", "quantize", 'keys = ("weight", "bias", f"{module}.weight")', None),
    ("a scoped word where it belongs", "layer", 'kind = "linear"', None),
    ("a declared hook of one plugin", "train", 'derive = getattr(variant, "train_settings", None)', None),
    ("an ordinary method of the same name", "unpacked", "match.groups()", None),
]


@pytest.mark.parametrize("case, module, code, fragment", CASES, ids=[c[0] for c in CASES])
def test_guard_catches(case, module, code, fragment):
    found = offences(ast.parse(code), f"adaptkit/{module}.py")
    if fragment is None:
        assert not found, found
    else:
        assert any(fragment in o for o in found), found


def test_guard_is_generated():
    """The words come from the registry and the plugins: every name, config key and parameter."""
    words = plugin_words()
    for kind, name, _ in registered():
        assert name in words
        obj = registry.get(kind, name)
        assert set(getattr(obj, "config_keys", ())) <= set(words)
        assert set(getattr(obj, "params", {})) <= set(words)
    assert {"total_step", "use_dora", "density", "t"} <= set(words)


def test_allow_list_is_needed():
    """Each allowed word is a plugin word that the core uses; an entry no longer needed must go."""
    words = plugin_words()
    for word in ALLOWED:
        assert word in words, f"{word} is no plugin word; drop it from ALLOWED"
        fewer = {w: v for w, v in ALLOWED.items() if w != word}
        hits = [o for where, tree in core_trees().items() for o in offences(tree, where, fewer)]
        assert any(f"'{word}'" in o for o in hits), f"the core does not use '{word}'; drop it from ALLOWED"


# The merge methods the core takes from registry.toml's [default.merge] table, and what each role needs.
ROLES = [
    ("quick", lambda m: True),
    ("quick_with_base", lambda m: True),
    ("soup", lambda m: not m.params),  # adaptkit.merge.soup.uniform passes no parameters
    ("interpolation", lambda m: len(m.params) == 1),  # its one parameter is the mix
]


@pytest.mark.parametrize("role, fits", ROLES, ids=[r[0] for r in ROLES])
def test_default_merge_roles(role, fits):
    method = registry.get("merge", registry.default("merge", role))
    assert fits(method), f"{method.name} does not fit the role {role}"


def test_default_role_unknown():
    with pytest.raises(PluginError, match="registry.toml names no default merge for blend$"):
        registry.default("merge", "blend")


def test_core_modules_stay_small():
    big = [p.name for p in CORE.rglob("*.py") if len(p.read_text().splitlines()) > 400]
    assert not big
