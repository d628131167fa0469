"""Merge recipes: mergekit's YAML configuration format, checked strictly, plus adaptkit's additions.

mergekit keys: `models` (each `model:` with optional `parameters:`), `slices` (slices.py) or `modules` (modules.py),
`base_model`, `merge_method`,
`parameters`, `dtype`, `out_dtype`, `tokenizer_source` or `tokenizer`, `chat_template` (tokenizer.py). Additions: `seed` (for random methods),
`compute_dtype` (see `dtypes` in engine.py: `dtype` is what tensors are loaded and computed in, as in
mergekit; `compute_dtype: float32` computes in float32 and rounds once to the output dtype),
`output: {kind: model|adapter, rank: R}`, `tensors: union|intersection` (mergekit-pytorch's --tensor-union
and --tensor-intersection: inputs with different tensor sets, sources.py `merge_names`). A model reference is a folder, `org/name[@rev]`, or
`base+adapter` (the adapter merged into that model first), as mergekit writes them.

A parameter value is a scalar, a gradient (a list of numbers interpolated over the layer index:
layer i of N takes position t = i / (N − 1); tensors outside the layers take t = 0, the first value),
or a list of `{filter: substring, value: ...}` conditions where the first matching filter (or one
without a filter) wins — the same rules as mergekit, so its recipes give the same numbers.
Unlike mergekit, an unknown key or parameter is an error naming the nearest valid one, an unknown method
one listing the methods (never a near name: nuslerp is not slerp). mergekit ignores every parameter a
method does not read, and recipes rely on it (its own give `weight` to slerp; LazyMergekit-style ones give
every method `normalize`, `rescale`, `lambda`, ...): a parameter of another merge method, or one of the
settings below that mergekit's recipes carry, is dropped with a warning instead.
"""
from __future__ import annotations

import copy
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import registry, spec
from ..io import readers
from .. import validate as v
from ..errors import AdaptkitError, closest
from ..io.paths import regular_file
from .refs import Ref
from .tokenizer import TokenizerSettings, parse_settings
from ..validate import short
from . import TENSOR_SETS, bakllama
from .modules import Module, parse_modules
from .slices import Slice, parameter_groups, parse_slices, place, slice_models

RECIPE_KEYS = {"models", "base_model", "merge_method", "parameters", "dtype", "out_dtype", "tokenizer_source",
               "compute_dtype", "seed", "output", "slices", "modules", "tokenizer", "chat_template", "tensors"}
MODEL_KEYS = {"model", "parameters"}
SLICE_KEYS = {"sources", "base_model", "parameters", "residual_weight"}  # residual_weight: warned of, dropped
SOURCE_KEYS = {"model", "layer_range", "parameters"}
OUTPUT_KEYS = {"kind", "rank"}
#: Parameter names recipes carry that no merge method reads: mergekit-evolve's genome settings (`smooth`,
#: `allow_negative_weights`, written into recipes by GUIs) and older mergekit's `embed_slerp` (a tokenizer
#: union's embeddings merged by slerp; mergekit 0.1.5 merges them by the recipe's method, as adaptkit does).
MERGEKIT_SETTINGS = frozenset({"smooth", "allow_negative_weights", "embed_slerp"})
FIELD_TYPES = {"merge_method": v.text, "base_model": v.optional(v.either(v.text, v.mapping, must="a path or repo id")),
               "parameters": v.optional(v.mapping), "dtype": v.optional(v.text), "out_dtype": v.optional(v.text),
               "compute_dtype": v.optional(v.text), "tensors": v.optional(v.text),
               "tokenizer_source": v.optional(v.either(v.text, v.mapping, must="base, union or a model")),
               "seed": v.count, "output": v.optional(v.mapping)}
OUTPUT_TYPES = {"kind": v.text, "rank": v.optional(v.positive_int)}


@dataclass
class Recipe:
    method: str
    models: list[Ref]
    model_params: list[dict[str, Any]]
    base: Ref | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    compute_dtype: str | None = None  # adaptkit: compute in this instead of `dtype` (engine.py `dtypes`)
    tensors: str | None = None  # adaptkit: "union" or "intersection" of inputs' tensors (sources.py `merge_names`)
    mixed_architectures: bool = False  # --allow-mixed-architectures (mergekit's --allow-crimes; not a recipe key)
    truncate_embeddings: bool = False  # --unsafe-truncate-embeddings (mergekit's; not a recipe key)
    seed: int = 0
    stage: str | None = None  # a multi-stage recipe's stage name (multi.py), mixed into its seeds (positions.py)
    output_kind: str = "model"
    output_rank: int | None = None
    tokenizer_source: str | None = None
    tokenizer_settings: TokenizerSettings | None = None  # `tokenizer_source` or the `tokenizer:` block (tokenizer.py)
    template: str | None = None  # `chat_template`: a template's text, or "auto"
    source: dict[str, Any] = field(default_factory=dict)  # the mapping as given (for adaptkit_recipe.yml)
    slices: list[Slice] | None = None  # mergekit's `slices:`; `models` then lists each model once
    modules: list[Module] | None = None  # mergekit's `modules:` (the same)

    @property
    def parts(self) -> list[Module] | None:
        """The sliced parts: the modules, or a `slices:` recipe as one part; None for a `models:` recipe."""
        return self.modules or ([Module(None, self.slices)] if self.slices else None)


def _check_keys(where: str, given: dict, allowed: set[str]) -> None:
    for key in given:
        if not isinstance(key, str):
            raise AdaptkitError(f"{where}: keys must be names, got {short(key)}")
        if key not in allowed:
            hint = closest(key, allowed)
            raise AdaptkitError(f"{where}: unknown key '{key}'" + (f"; did you mean '{hint}'?" if hint else "")
                                + f" (valid: {', '.join(sorted(allowed))})")


def _mergekit_parameters() -> set[str]:
    """Every merge method's parameter names and the settings mergekit's recipes carry (loads every merge
    plugin: called only where a name is not the recipe's own)."""
    return MERGEKIT_SETTINGS | {p for name in registry.names("merge") for p in registry.get("merge", name).params}


def _drop_stray_parameters(src: str, data: dict) -> dict:
    """The recipe without top-level keys that are merge parameters (`normalize: true` beside `merge_method`,
    seen in published recipes): mergekit reads parameters only under `parameters:` and ignores these, so
    they are dropped with a warning, and the merge is the one mergekit made. Other unknown keys stay, to be
    refused with the nearest valid name."""
    unknown = [key for key in data if isinstance(key, str) and key not in RECIPE_KEYS]
    if not unknown:
        return data
    stray = [key for key in unknown if key in _mergekit_parameters()]
    if stray:
        names = ", ".join(f"'{key}'" for key in stray)
        warnings.warn(f"{src}: top-level {names} not read, as mergekit does not read {'it' if len(stray) == 1 else 'them'}"
                      f" there (a merge parameter goes under 'parameters:')")
    return {key: value for key, value in data.items() if key not in stray}


def load_recipe(source: str | Path | dict) -> Recipe:
    """Read and check a recipe from a YAML file or a dict; messages name the file (else "recipe")."""
    if isinstance(source, dict):
        data, src = source, "recipe"
    else:
        path = regular_file(source, "recipe file")
        data, src = readers.read_yaml(path), str(path)
        if data is None:
            raise AdaptkitError(f"{path}: the recipe is empty")
    if not isinstance(data, dict):
        raise AdaptkitError(f"{src}: a recipe is a mapping with at least 'merge_method' and 'models', got {short(data)}")
    if bakllama.is_bakllama(data):
        data = bakllama.as_recipe(data, src)
    data = _drop_stray_parameters(src, data)
    _check_keys(src, data, RECIPE_KEYS)
    v.check_fields(data, FIELD_TYPES, src)
    if "merge_method" not in data:
        raise AdaptkitError(f"{src}: 'merge_method' is missing")
    method_name = data["merge_method"]
    if method_name not in registry.names("merge"):  # no "did you mean": a near name is another algorithm
        methods = ", ".join(sorted(registry.names("merge")))
        raise AdaptkitError(f"unknown merge method '{method_name}' (methods: {methods})")
    method = registry.get("merge", method_name)
    if len(given := [key for key in ("models", "slices", "modules") if key in data]) > 1:
        raise AdaptkitError(f"{src}: give one of 'models', 'slices' and 'modules', not {' and '.join(given)}")
    base = Ref.parse(data["base_model"], f"{src}: base_model") if data.get("base_model") else None
    slices = parse_slices(src, data["slices"], _slice_part) if "slices" in data else None
    modules = parse_modules(src, data["modules"], _check_keys, _slice_part, _models, _parameters, base) \
        if "modules" in data else None
    models, model_params = _models(src, data.get("models") or []) if not (slices or modules) else \
        slice_models([part for m in modules or [Module(None, slices)] for part in m.slices])
    recipe = Recipe(method_name, models, model_params, base=base,
                    parameters=_parameters(f"{src}: parameters", data.get("parameters")), dtype=data.get("dtype"),
                    out_dtype=data.get("out_dtype"), compute_dtype=data.get("compute_dtype"), seed=data.get("seed", 0),
                    tensors=data.get("tensors"),
                    tokenizer_source=data.get("tokenizer_source"), slices=slices, modules=modules,
                    source=copy.deepcopy(data))
    output = data.get("output") or {}
    _check_keys(f"{src}: output", output, OUTPUT_KEYS)
    v.check_fields(output, OUTPUT_TYPES, f"{src}: output")
    recipe.output_kind = output.get("kind", "model")
    recipe.output_rank = output.get("rank")
    refs = [str(r) for r in models] + ([str(recipe.base)] if recipe.base else [])
    recipe.tokenizer_settings, recipe.template = parse_settings(data, src, refs)
    if (recipe.tokenizer_settings or recipe.template) and recipe.output_kind != "model":
        raise AdaptkitError(f"{src}: tokenizer settings and chat_template apply to model outputs, not adapters")
    if recipe.output_kind not in ("model", "adapter"):
        raise AdaptkitError(f"{src}: output.kind must be 'model' or 'adapter', got {short(recipe.output_kind)}")
    if recipe.parts and recipe.output_kind != "model":
        raise AdaptkitError(f"{src}: {'modules' if modules else 'slices'} make a model; an adapter output takes "
                            "'models'")
    if (not recipe.parts and recipe.output_kind == "model" and recipe.base and not spec.option(method, "takes_base")
            and str(recipe.base) not in map(str, models)):
        # mergekit's rule: a base model the method has no separate use for is one more input,
        # with only the global parameters. (For an adapter output the base only serves ΔW.)
        models.append(recipe.base)
        model_params.append({})
    if not recipe.parts and recipe.output_kind == "model" and recipe.base and spec.option(method, "takes_base"):
        _base_not_an_input(recipe)
    twice = sorted(ref for ref, count in Counter(map(str, recipe.models)).items() if count > 1)
    if twice and recipe.output_kind == "model":  # (an adapter output is no recipe mergekit runs)
        warnings.warn(f"{src}: {', '.join(twice)} {'is' if len(twice) == 1 else 'are'} listed more than once under "
                      "models: each entry is one more input (mergekit 0.1.5 refuses duplicate inputs)")
    check_parameters(recipe, method)
    check_tensor_set(recipe, src)
    return recipe


def apply_overrides(recipe: Recipe, overrides: dict[str, Any]) -> Recipe:
    """The command line's settings (--dtype, --seed, --tensors, ...: Recipe fields) over the recipe's, where
    given, and checked as the recipe's own are."""
    for key, value in overrides.items():
        if value is not None and value is not False:
            setattr(recipe, key, value)
    check_tensor_set(recipe)
    return recipe


def check_tensor_set(recipe: Recipe, src: str = "recipe") -> None:
    """`tensors:` (or --tensors) is union or intersection, for a `models:` recipe that makes a model."""
    if recipe.tensors is None:
        return
    if recipe.tensors not in TENSOR_SETS:
        raise AdaptkitError(f"{src}: tensors must be 'union' or 'intersection', got {short(recipe.tensors)}")
    if recipe.parts or recipe.output_kind != "model":
        what = "slices name their tensors layer by layer" if recipe.parts else "an adapter output merges modules"
        raise AdaptkitError(f"{src}: tensors: {recipe.tensors} applies to a `models:` recipe that makes a model; {what}")


def _base_not_an_input(recipe: Recipe) -> None:
    """mergekit's rule: a base also listed among the models is not one more input (unless it is the only one)."""
    for i in reversed([i for i, ref in enumerate(recipe.models) if str(ref) == str(recipe.base)][:len(recipe.models) - 1]):
        if recipe.model_params[i]:
            warnings.warn(f"'{recipe.method}': base_model {recipe.base} is the base; its parameters under models are unused")
        del recipe.models[i], recipe.model_params[i]


def _models(src: str, entries: Any) -> tuple[list[Ref], list[dict[str, Any]]]:
    if not isinstance(entries, list) or not entries:
        raise AdaptkitError(f"{src}: models must be a non-empty list, got {short(entries)}")
    models, model_params = [], []
    for i, entry in enumerate(entries):
        entry = entry if isinstance(entry, dict) else {"model": entry}
        _check_keys(f"{src}: models[{i}]", entry, MODEL_KEYS)
        models.append(Ref.parse(entry.get("model"), f"{src}: models[{i}].model"))
        model_params.append(_parameters(f"{src}: models[{i}].parameters", entry.get("parameters")))
    return models, model_params


def _slice_part(where: str, entry: Any, ref_key: str) -> tuple[Ref | None, dict[str, Any]]:
    """A slice (ref_key `base_model`) or one of its sources (`model`): keys checked, reference, parameters."""
    v.mapping(entry, where)
    if ref_key == "base_model" and "residual_weight" in entry:  # in mergekit's slice schema, read by nothing
        if entry["residual_weight"] is not None:
            v.number(entry["residual_weight"], f"{where}.residual_weight")
        warnings.warn(f"{where}: 'residual_weight' is ignored, as mergekit ignores it")
        entry = {k: value for k, value in entry.items() if k != "residual_weight"}
    _check_keys(where, entry, SOURCE_KEYS if ref_key == "model" else SLICE_KEYS)
    ref = Ref.parse(entry.get(ref_key), f"{where}.{ref_key}") if ref_key == "model" or entry.get(ref_key) else None
    return ref, _parameters(f"{where}.parameters", entry.get("parameters"))


def _parameters(where: str, given: Any) -> dict[str, Any]:
    """A `parameters` mapping whose every value is a setting (see the module docstring)."""
    if given is None:
        return {}
    v.mapping(given, where)
    for key, setting in given.items():
        if not isinstance(key, str):
            raise AdaptkitError(f"{where}: keys must be parameter names, got {short(key)}")
        _check_setting(setting, f"{where}.{key}")
    return dict(given)


def _check_setting(setting: Any, where: str) -> None:
    """A scalar (a finite number, true/false, a string), a gradient (a non-empty list of scalars) or
    conditions (a `{filter, value}` mapping or a list of them; `value` a scalar or a gradient)."""
    if isinstance(setting, dict) or (isinstance(setting, list) and any(isinstance(e, dict) for e in setting)):
        for i, cond in enumerate(setting if isinstance(setting, list) else [setting]):
            here = f"{where}[{i}]" if isinstance(setting, list) else where
            if not isinstance(cond, dict):
                raise AdaptkitError(f"{here}: a list of conditions holds only {{filter, value}} mappings, "
                                    f"got {short(cond)}")
            _check_keys(here, cond, {"filter", "value"})
            if "value" not in cond:
                raise AdaptkitError(f"{here}: a condition needs a 'value'")
            v.check_fields(cond, {"filter": v.optional(v.text)}, here)
            if isinstance(cond["value"], dict):
                raise AdaptkitError(f"{here}.value must be a number, a string or a list of them, "
                                    f"got {short(cond['value'])}")
            _check_setting(cond["value"], f"{here}.value")
        return
    if isinstance(setting, list):
        if not setting:
            raise AdaptkitError(f"{where}: an empty list is no value")
        for i, item in enumerate(setting):
            if isinstance(item, list):
                raise AdaptkitError(f"{where}[{i}]: a gradient holds numbers, not lists")
            _check_scalar(item, f"{where}[{i}]")
        return
    _check_scalar(setting, where)


def _check_scalar(value: Any, where: str) -> None:
    if isinstance(value, bool) or isinstance(value, str):
        return
    if isinstance(value, (int, float)):
        v.number(value, where)
        return
    raise AdaptkitError(f"{where} must be a number, true/false or a string, got {short(value)}")


def check_parameters(recipe: Recipe, method) -> None:
    """Every parameter is one the method has; per-model ones may also be given globally (or per slice)."""
    known = set(method.params)
    per_model = set(getattr(method, "per_model", ()))
    _drop_ignored(recipe, known)
    _known_names(recipe, "parameters", recipe.parameters, known, known)
    groups = [("", {}, [(f"models[{i}]", p) for i, p in enumerate(recipe.model_params)])]
    if recipe.parts:
        groups = []
        for part in recipe.parts:
            if part.name:
                _known_names(recipe, f"{part.label}parameters", part.parameters, known, known)
            groups += [(label, {**part.parameters, **shared}, own) for label, shared, own in
                       parameter_groups(part.slices, recipe.base, spec.option(method, "takes_base"), part.label,
                                        part.whole)]
    for label, shared, own in groups:
        if label:
            _known_names(recipe, f"{label}.parameters", shared, known, known)
        for where, params in own:
            _known_names(recipe, f"{where}.parameters", params, per_model, known)
        missing = [k for k, default in method.params.items() if default is None and k not in recipe.parameters
                   and k not in shared and not (k in per_model and all(k in p for _, p in own))]
        if missing:
            raise AdaptkitError((f"{label}: " if label else "") + f"'{recipe.method}' needs parameter '{missing[0]}'")


def _drop_ignored(recipe: Recipe, known: set[str]) -> None:
    """Parameters mergekit accepts and the method does not use (not `known`, but another method's or in
    MERGEKIT_SETTINGS), wherever given: dropped, with one warning line (a misspelled name is still an error,
    in `_known_names`)."""
    # models by name: a base listed among them may already be gone (`_base_not_an_input`), shifting indices
    scopes = [("parameters", recipe.parameters),
              *((f"model {ref}", p) for ref, p in zip(recipe.models, recipe.model_params))]
    for module in recipe.parts or []:
        scopes += [(f"modules.{module.name}", module.parameters)] if module.name else []
        for i, part in enumerate(module.slices):
            scopes += [(place(module.label, module.whole, i), part.parameters),
                       *((place(module.label, module.whole, i, j), s.parameters) for j, s in enumerate(part.sources))]
    if all(key in known for _, params in scopes for key in params):
        return  # (the usual case: no other method's plugin need be loaded)
    ignored = _mergekit_parameters()
    dropped = []
    for key in sorted(ignored - known):
        places = [where for where, params in scopes if params.pop(key, None) is not None]
        if places:
            dropped.append(f"'{key}' (given in {', '.join(places)})")
    if dropped:  # one line for them all (a LazyMergekit-style recipe brings half a dozen)
        warnings.warn(f"'{recipe.method}' does not use {', '.join(dropped)}: ignored, as mergekit ignores "
                      f"{'it' if len(dropped) == 1 else 'them'}")


def _known_names(recipe: Recipe, where: str, params: dict, allowed: set[str], known: set[str]) -> None:
    for key in params:
        if key not in allowed:
            hint = closest(key, known)
            raise AdaptkitError(
                f"{where}: '{recipe.method}' has no parameter '{key}'" + (f"; did you mean '{hint}'?" if hint else "")
                + f" (parameters: {', '.join(sorted(allowed)) or 'none'})")


def recipe_inputs(recipe: Recipe) -> list[str]:
    """The paths a recipe reads (models, adapters after '+', base), for `atomic_output`'s checks."""
    refs = [*recipe.models, *([recipe.base] if recipe.base else [])]
    return [path for ref in refs for path in (ref.model, *ref.adapters)]
