"""Choosing the layers an adapter goes on, and wrapping them.

`target_modules` follows PEFT's rules so that configs mean the same thing in both tools: a list
matches a module whose path equals an entry or ends in `.<entry>`; a string is a regular
expression the whole path must match; `"all-linear"` is every linear layer except the output
head. `exclude_modules` takes the same forms. `layers_to_transform` keeps only modules under the
given indices of the model's layer list (`layers.N`, `h.N`, `blocks.N`, `layer.N`, or
`layers_pattern`). An nn.MultiheadAttention's `out_proj` is refused as a layer (its forward never calls
it); the attention module itself is the target there.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from torch import nn

from .. import validate
from ..errors import AdaptkitError, unknown_name
from .layer import AdaptedLayer, Target

ALL_LINEAR = "all-linear"
#: The targeting settings every adapter has besides its variant's own (PEFT's names and defaults).
TARGETING = {"target_modules": None, "exclude_modules": None, "layers_to_transform": None,
             "layers_pattern": None, "modules_to_save": None}
LAYER_LISTS = ("layers", "h", "blocks", "layer")


def matches_target(path: str, spec: str | Iterable[str]) -> bool:
    """Whether PEFT's `target_modules` names the module at `path`: a pattern matching the whole path, or a name
    that is the path or its end."""
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return any(path == s or path.endswith("." + s) for s in spec)


def layer_index(path: str, pattern: str | Iterable[str] | None = None) -> int | None:
    names = [pattern] if isinstance(pattern, str) else list(pattern or LAYER_LISTS)
    for name in names:
        found = re.search(rf"(?:^|\.){re.escape(name)}\.(\d+)(?:\.|$)", path)
        if found:
            return int(found.group(1))
    return None


def _output_head(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    try:
        return get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        return None


def find_targets(model: nn.Module, target_modules: Any, *, exclude_modules: Any = None,
                 layers_to_transform: int | Iterable[int] | None = None, layers_pattern: Any = None,
                 target_of: Any = None) -> dict[str, Target]:
    """Path -> Target for every module an adapter config selects (already wrapped ones included).
    `target_of(module)` is a variant's own test of what it can wrap (default: `Target.of`)."""
    target_of = target_of or Target.of
    if target_modules is None:
        raise AdaptkitError("no target_modules given (a list of module-name suffixes, a regex, or 'all-linear')")
    head = _output_head(model)
    layers = {layers_to_transform} if isinstance(layers_to_transform, int) else layers_to_transform
    layers = None if layers is None else set(layers)
    modules = list(model.named_modules())
    inside_wrapper = tuple(p + "." for p, m in modules if isinstance(m, AdaptedLayer))
    chosen: dict[str, Target] = {}
    for path, module in modules:
        if not path or (inside_wrapper and path.startswith(inside_wrapper)):
            continue
        layer = module.base_layer if isinstance(module, AdaptedLayer) else module  # matched as if unwrapped
        target = module.target if isinstance(module, AdaptedLayer) else target_of(module)
        if target_modules == ALL_LINEAR:
            selected = target is not None and target.kind == "linear" and layer is not head
        else:
            selected = matches_target(path, target_modules)
        if not selected or (exclude_modules and matches_target(path, exclude_modules)):
            continue
        if layers is not None and layer_index(path, layers_pattern) not in layers:
            continue
        if target is None:
            raise AdaptkitError(f"target module '{path}' is a {type(module).__name__}; adapters go on Linear, Conv1D, "
                                f"Embedding and zero-padded Conv1d/2d/3d layers")
        _refuse_unused_layer(model, path)
        chosen[path] = target
    if not chosen:
        raise AdaptkitError(f"target_modules {target_modules!r} match no layer; layers here include: "
                            f"{', '.join(_examples(model))}")
    return chosen


def _refuse_unused_layer(model: nn.Module, path: str) -> None:
    """An nn.MultiheadAttention's out_proj is a Linear its forward never calls (it reads out_proj.weight
    itself), so an adapter there would silently do nothing (PEFT's too): refused, naming the fix."""
    if isinstance(_parent(model, path), nn.MultiheadAttention):
        owner = path.rsplit(".", 1)[0]
        raise AdaptkitError(f"target module '{path}' is a layer of the nn.MultiheadAttention '{owner}', whose forward "
                            f"never calls it (an adapter there would do nothing): target '{owner}' itself (its in- "
                            "and out-projections), or leave it out with exclude_modules")


def _parent(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model


def _examples(model: nn.Module, count: int = 6) -> list[str]:
    names = [p for p, m in model.named_modules() if Target.of(m) is not None and p]
    leaves = list(dict.fromkeys(p.rsplit(".", 1)[-1] for p in names))
    return (leaves or [p for p, _ in model.named_modules() if p])[:count]


def wrap(model: nn.Module, path: str, target: Target) -> AdaptedLayer:
    """The AdaptedLayer at `path`, wrapping the plain layer there on first use."""
    parent, leaf = _parent(model, path), path.rsplit(".", 1)[-1]
    layer = getattr(parent, leaf)
    if isinstance(layer, AdaptedLayer):
        return layer
    wrapped = AdaptedLayer(layer, path, target).train(layer.training)
    setattr(parent, leaf, wrapped)
    return wrapped


def unwrap(model: nn.Module, path: str) -> None:
    parent, leaf = _parent(model, path), path.rsplit(".", 1)[-1]
    layer = getattr(parent, leaf)
    if isinstance(layer, AdaptedLayer):
        setattr(parent, leaf, layer.base_layer)


def adapted_layers(model: nn.Module) -> dict[str, AdaptedLayer]:
    return {p: m for p, m in model.named_modules() if isinstance(m, AdaptedLayer)}


def variant_config(variant: Any, config: dict[str, Any]) -> dict[str, Any]:
    """The variant's defaults updated by `config`; an unknown key is an error naming the nearest."""
    known = {**TARGETING, **variant.defaults}
    for key in config:
        if key not in known:
            raise unknown_name(f"{variant.name} parameter", key, known)
    found = {**known, **config}
    validate.adapter_config(found, variant, f"{variant.name} settings")  # 2.5 is no rank, "(" no regex
    return found
