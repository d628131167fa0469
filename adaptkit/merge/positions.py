"""A recipe's parameters at one tensor position: gradients over the layers (t ∈ [0, 1]), filters by
tensor name, and the precedence of per-source, per-slice and global settings, as mergekit resolves
them; plus the seeded generators random methods get per tensor."""
from __future__ import annotations

import hashlib
import re
from typing import TYPE_CHECKING, Any

from .. import spec
from ..errors import AdaptkitError

if TYPE_CHECKING:
    import torch

    from .recipe import Recipe


def evaluate(setting: Any, tensor_name: str, t: float) -> Any:
    """A parameter's value for one tensor at layer position t ∈ [0, 1] (mergekit's rules)."""
    if isinstance(setting, dict) and "value" in setting:
        setting = [setting]
    if not isinstance(setting, list):
        return setting
    if not setting:
        return None
    if all(not isinstance(e, dict) for e in setting):
        if not 0 <= t <= 1:  # see check_positions
            raise _past_layers(tensor_name, t)
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


def check_positions(recipe: Recipe, positions: dict[str, float]) -> None:
    """Before any work: a gradient has no value for a tensor past the last layer the model's config
    counts (num_hidden_layers smaller than the tensors' layer indices: the config contradicts them)."""
    settings = [*recipe.parameters.values(), *(s for p in recipe.model_params for s in p.values())]
    if not any(_has_gradient(s) for s in settings):
        return
    past = next((name for name, t in positions.items() if t > 1), None)
    if past is not None:
        raise _past_layers(past, positions[past])


def _past_layers(tensor_name: str, t: float) -> AdaptkitError:
    return AdaptkitError(f"tensor '{tensor_name}' lies past the last layer the model's config.json counts "
                         f"(position {t:.3g} of 1), so a gradient has no value there")


def _has_gradient(setting: Any) -> bool:
    """A list of values, or conditions one of whose values is such a list (see `_check_setting`)."""
    conditions = [setting] if isinstance(setting, dict) else setting if isinstance(setting, list) else []
    return any(not isinstance(c, dict) or isinstance(c.get("value"), list) for c in conditions)


def resolve_params(recipe: Recipe, method, tensor_name: str, t: float, shared: list[dict] = (),
                   inputs: list[tuple[dict, str]] | None = None) -> dict[str, Any]:
    """All parameters of one tensor position: scalars, and per-model ones as lists.

    As in mergekit, a setting comes from the most specific scope that has one for this tensor: an input's
    own parameters, then `shared` ones (a slice's), then the recipe's; a scope whose filters all miss the
    tensor falls through to the next. `inputs` gives each input's own parameters and its tensor name (a
    slice's source layer), which its filters see; shared settings see the output tensor's name."""
    per_model = set(getattr(method, "per_model", ()))
    shared = [*shared, recipe.parameters]
    inputs = inputs if inputs is not None else [(p, tensor_name) for p in recipe.model_params]
    out: dict[str, Any] = {}
    for key, default in method.params.items():
        if key in per_model:
            out[key] = [_lookup(key, [own, *shared], name, t, default) for own, name in inputs]
        else:
            out[key] = _lookup(key, shared, tensor_name, t, default)
    return out


def _lookup(key: str, scopes: list[dict], tensor_name: str, t: float, default: Any) -> Any:
    for scope in scopes:
        if key in scope and (value := evaluate(scope[key], tensor_name, t)) is not None:
            return value
    return default


LAYER_INDEX = re.compile(r"\.(\d+)\.")


def seeded_generators(seed: int, name: str, count: int, stage: str | None = None) -> list[torch.Generator]:
    """One generator per input, seeded from (seed, tensor name, input index) and, in a named stage of a
    multi-stage recipe, the stage's name: stages draw independently of each other even with one seed
    (with the same generators, a stage's DARE masks of a tensor were its predecessor's, thinned: a
    two-stage DARE recipe came out 8 % off mergekit's norm, where each stage alone matched it)."""
    import torch

    gens = []
    for i in range(count):
        key = f"{seed}\0{name}\0{i}" if stage is None else f"{seed}\0{stage}\0{name}\0{i}"
        digest = hashlib.sha256(key.encode()).digest()
        gens.append(torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1)))
    return gens


def operator_params(recipe: Recipe, method, name: str, t: float, count: int, shared: list[dict] = (),
                    inputs: list[tuple[dict, str]] | None = None) -> dict[str, Any]:
    """The operator's keyword arguments at one tensor position, with seeded generators if it is random
    (`shared`, `inputs`: a slice's scopes, see `resolve_params`)."""
    params = resolve_params(recipe, method, name, t, shared, inputs)
    if spec.option(method, "random"):
        params["generators"] = seeded_generators(recipe.seed, name, count, recipe.stage)
    return params


def layer_positions(names: list[str], config: dict | None) -> dict[str, float]:
    """t ∈ [0, 1] per tensor: layer i of N -> i / (N − 1), a single layer -> 1; outside the layers -> 0
    (mergekit's rules, as it plans a recipe's `models:` as one slice over all layers). A multimodal model's
    layers are counted module by module (modules.py), as mergekit's slices over each module are."""
    from .modules import architecture_modules, owner
    from .slices import LAYER_NAME, layer_count

    modules, config = architecture_modules(config), config or {}
    positions = dict.fromkeys(names, 0.0)  # (outside the layers, or in no module)
    by_module: dict[str | None, list[str]] = {}
    for name in names:
        by_module.setdefault(owner(name, modules), []).append(name)
    for module, owned in by_module.items():
        spec = modules.get(module)
        positions.update((n, 1.0) for n in owned if spec and spec.at_last_layer(n))
        if spec is None or not spec.layered:
            continue
        indices = {n: int(m.group(2)) for n in owned if (m := LAYER_NAME.match(n))}
        count = spec.fixed or (layer_count(config, spec.count_keys) or (None, max(indices.values(), default=-1) + 1))[1]
        positions.update((n, _position(i, count)) for n, i in indices.items())
    return positions


def _position(index: int, count: int) -> float:
    return index / (count - 1) if count > 1 else 1.0
