"""Merge recipes: mergekit's YAML configuration format, checked strictly, plus adaptkit's additions.

mergekit keys: `models` (each `model:` with optional `parameters:`), `base_model`, `merge_method`,
`parameters`, `dtype`, `out_dtype`, `tokenizer_source`. Additions: `seed` (for random methods),
`output: {kind: model|adapter, rank: R}`. A model reference is a folder, `org/name[@rev]`, or
`base+adapter` (the adapter merged into that model first), as mergekit writes them.

A parameter value is a scalar, a gradient (a list of numbers interpolated over the layer index:
layer i of N takes position t = i / (N − 1); tensors outside the layers take t = 0, the first value),
or a list of `{filter: substring, value: ...}` conditions where the first matching filter (or one
without a filter) wins — the same rules as mergekit, so its recipes give the same numbers.
Unlike mergekit, an unknown key, method or parameter is an error naming the nearest valid one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import registry
from .errors import AdaptkitError, closest, unknown_name

RECIPE_KEYS = {"models", "base_model", "merge_method", "parameters", "dtype", "out_dtype", "tokenizer_source",
               "seed", "output"}
NOT_SUPPORTED = {"slices", "modules", "tokenizer", "chat_template"}
MODEL_KEYS = {"model", "parameters"}
OUTPUT_KEYS = {"kind", "rank"}


@dataclass(frozen=True)
class Ref:
    """A model reference: `path_or_repo` plus adapters to merge into it first (`base+adapter`)."""

    model: str
    adapters: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: Any) -> Ref:
        if isinstance(text, dict) and "model" in text:  # mergekit also writes {model: {path: ...}}
            text = text["model"].get("path") if isinstance(text["model"], dict) else text["model"]
        if not isinstance(text, str) or not text.strip():
            raise AdaptkitError(f"model reference must be a path or repo id, got {text!r}")
        model, *adapters = text.split("+")
        return cls(model, tuple(adapters))

    def __str__(self) -> str:
        return "+".join((self.model, *self.adapters))


@dataclass
class Recipe:
    method: str
    models: list[Ref]
    model_params: list[dict[str, Any]]
    base: Ref | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    seed: int = 0
    output_kind: str = "model"
    output_rank: int | None = None
    tokenizer_source: str | None = None


def _check_keys(where: str, given: dict, allowed: set[str], unsupported: set[str] = frozenset()) -> None:
    for key in given:
        if key in unsupported:
            raise AdaptkitError(f"{where}: '{key}' is a mergekit feature adaptkit does not support yet")
        if key not in allowed:
            hint = closest(key, allowed)
            raise AdaptkitError(f"{where}: unknown key '{key}'" + (f"; did you mean '{hint}'?" if hint else "")
                                + f" (valid: {', '.join(sorted(allowed))})")


def load_recipe(source: str | Path | dict) -> Recipe:
    """Read and check a recipe from a YAML file, YAML text or a dict."""
    if isinstance(source, dict):
        data = source
    else:
        path = Path(source)
        try:
            data = yaml.safe_load(path.read_text()) if path.is_file() else None
        except yaml.YAMLError as e:
            raise AdaptkitError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if data is None:
            raise AdaptkitError(f"{path}: no such recipe file (or it is empty)")
    if not isinstance(data, dict):
        raise AdaptkitError("recipe must be a mapping with at least 'merge_method' and 'models'")
    _check_keys("recipe", data, RECIPE_KEYS, NOT_SUPPORTED)
    if "merge_method" not in data:
        raise AdaptkitError("recipe: 'merge_method' is missing")
    method_name = str(data["merge_method"])
    if method_name not in registry.names("merge"):
        raise unknown_name("merge method", method_name, registry.names("merge"))
    method = registry.get("merge", method_name)
    entries = data.get("models") or []
    if not isinstance(entries, list) or not entries:
        raise AdaptkitError("recipe: 'models' must be a non-empty list")
    models, model_params = [], []
    for i, entry in enumerate(entries):
        entry = entry if isinstance(entry, dict) else {"model": entry}
        _check_keys(f"models[{i}]", entry, MODEL_KEYS)
        models.append(Ref.parse(entry.get("model")))
        model_params.append(dict(entry.get("parameters") or {}))
    recipe = Recipe(method_name, models, model_params,
                    base=Ref.parse(data["base_model"]) if data.get("base_model") else None,
                    parameters=dict(data.get("parameters") or {}), dtype=data.get("dtype"),
                    out_dtype=data.get("out_dtype"), seed=int(data.get("seed", 0)),
                    tokenizer_source=data.get("tokenizer_source"))
    output = data.get("output") or {}
    _check_keys("output", output, OUTPUT_KEYS)
    recipe.output_kind = output.get("kind", "model")
    recipe.output_rank = output.get("rank")
    if recipe.output_kind not in ("model", "adapter"):
        raise AdaptkitError(f"output.kind must be 'model' or 'adapter', got '{recipe.output_kind}'")
    if (recipe.output_kind == "model" and recipe.base and not getattr(method, "takes_base", True)
            and str(recipe.base) not in map(str, models)):
        # mergekit's rule: a base model the method has no separate use for is one more input,
        # with only the global parameters. (For an adapter output the base only serves ΔW.)
        models.append(recipe.base)
        model_params.append({})
    check_parameters(recipe, method)
    return recipe


def check_parameters(recipe: Recipe, method) -> None:
    """Every parameter is one the method has; per-model ones may also be given globally."""
    known = set(method.params)
    per_model = set(getattr(method, "per_model", ()))
    for where, params, allowed in [("parameters", recipe.parameters, known)] + [
            (f"models[{i}].parameters", p, per_model) for i, p in enumerate(recipe.model_params)]:
        for key in params:
            if key not in allowed:
                hint = closest(key, known)
                raise AdaptkitError(
                    f"{where}: '{recipe.method}' has no parameter '{key}'" + (f"; did you mean '{hint}'?" if hint else "")
                    + f" (parameters: {', '.join(sorted(allowed)) or 'none'})")
    missing = [k for k, default in method.params.items() if default is None and k not in recipe.parameters
               and not (k in per_model and all(k in p for p in recipe.model_params))]
    if missing:
        raise AdaptkitError(f"'{recipe.method}' needs parameter '{missing[0]}'")


def evaluate(setting: Any, tensor_name: str, t: float) -> Any:
    """A parameter's value for one tensor at layer position t ∈ [0, 1] (mergekit's rules)."""
    if isinstance(setting, dict) and "value" in setting:
        setting = [setting]
    if not isinstance(setting, list):
        return setting
    if not setting:
        return None
    if all(not isinstance(e, dict) for e in setting):
        numeric = all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting)
        if not numeric:
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    for cond in setting:
        filt = cond.get("filter")
        if filt is None or filt == "*" or filt in tensor_name:
            return evaluate(cond.get("value"), tensor_name, t)
    return None


def resolve_params(recipe: Recipe, method, tensor_name: str, t: float) -> dict[str, Any]:
    """All parameters of one tensor position: scalars, and per-model ones as lists."""
    per_model = set(getattr(method, "per_model", ()))
    out: dict[str, Any] = {}
    for key, default in method.params.items():
        if key in per_model:
            values = []
            for params in recipe.model_params:
                setting = params.get(key, recipe.parameters.get(key, default))
                values.append(evaluate(setting, tensor_name, t))
            out[key] = values
        else:
            out[key] = evaluate(recipe.parameters.get(key, default), tensor_name, t)
    return out
