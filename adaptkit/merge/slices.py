"""mergekit's `slices:` (frankenmerges): which input tensors make each output tensor.

A recipe's slices are read in order; each takes the same number of consecutive layers from every one
of its sources, and its k-th layer merges layer `start + k` of each source into output layer j, where
j counts on across slices from 0. So output layer names are renumbered and the output config's layer
count is the sum of the slices' lengths, as mergekit writes them. A gradient runs over each slice's
own layers (t = k / (n − 1); a one-layer slice takes t = 1, mergekit's rule). Tensors outside the
layers take t = 0: the ones before them (embeddings) come from the first slice's sources, with its
parameters and base, the ones after them (final norm, LM head) from the last slice's.

A layer tensor is named `<prefix>.<i>.<rest>` (its first numbered component, one prefix per model:
several numbered stacks are mergekit's multi-module `modules:`); a tensor outside the layers is
before them when its name says embedding (`emb`, `wte`, `wpe`, GPT-NeoX's `embed_out` excepted), as in
mergekit's architecture tables, else after them.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from ..errors import AdaptkitError
from ..validate import short

if TYPE_CHECKING:
    from .recipe import Ref

#: Keys of config.json that hold the layer count, by architecture family (mergekit's `num_layers_config_key`).
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
LAYER_NAME = re.compile(r"^(.*?)\.(\d+)\.(.+)$")
BEFORE_LAYERS = re.compile(r"emb|wte|wpe|relative_pe|position_ids")
AFTER_LAYERS = re.compile(r"embed_out|lm_head")


@dataclass
class SliceSource:
    """Layers [start, stop) of one model, with its parameters, as one input of an output slice."""

    ref: Ref
    layers: tuple[int, int]
    parameters: dict[str, Any]


@dataclass
class Slice:
    """Output layers made by merging the same number of layers from each of its sources."""

    sources: list[SliceSource]
    base: Ref | None
    parameters: dict[str, Any]


@dataclass
class Job:
    """Where one output tensor comes from: (input, its tensor name) per input and for the base, the
    gradient position t, and the parameter scopes (each input's own, then the slice's)."""

    inputs: list[tuple[Any, str]]
    base: tuple[Any, str] | None
    t: float
    own: list[dict[str, Any]] = field(default_factory=list)
    shared: list[dict[str, Any]] = field(default_factory=list)

    @property
    def sources(self) -> list[tuple[Any, str]]:
        """The base (when there is one), then the inputs."""
        return ([self.base] if self.base else []) + self.inputs

    @property
    def reference(self) -> Any:
        return self.sources[0][0]

    @property
    def reference_name(self) -> str:
        return self.sources[0][1]


Reader = Callable[[str, Any, str], tuple[Any, dict[str, Any]]]


def parse_slices(src: str, entries: Any, read: Reader) -> list[Slice]:
    """The recipe's `slices:` checked: each a non-empty `sources` list of {model, layer_range [start, stop),
    parameters} of equal lengths (mergekit refuses others), with its own `base_model` and `parameters`.
    `read(where, mapping, ref_key)` checks a mapping's keys and gives its reference and parameters."""
    if not isinstance(entries, list) or not entries:
        raise AdaptkitError(f"{src}: slices must be a non-empty list, got {short(entries)}")
    slices = []
    for i, entry in enumerate(entries):
        where = f"{src}: slices[{i}]"
        base, parameters = read(where, entry, "base_model")
        if not isinstance(entry.get("sources"), list) or not entry["sources"]:
            raise AdaptkitError(f"{where}.sources must be a non-empty list, got {short(entry.get('sources'))}")
        sources = []
        for j, item in enumerate(entry["sources"]):
            ref, params = read(f"{where}.sources[{j}]", item, "model")
            layers = item.get("layer_range")
            if (not isinstance(layers, (list, tuple)) or len(layers) != 2 or not all(type(n) is int for n in layers)
                    or not 0 <= layers[0] < layers[1]):
                raise AdaptkitError(f"{where}.sources[{j}].layer_range must be [start, stop) with "
                                    f"0 <= start < stop, got {short(layers)}")
            sources.append(SliceSource(ref, tuple(layers), params))
        if len({s.layers[1] - s.layers[0] for s in sources}) > 1:
            raise AdaptkitError(f"{where}: its sources' layer ranges {', '.join(str(list(s.layers)) for s in sources)} "
                                "differ in length; each output layer merges one layer of every source")
        if len({str(s.ref) for s in sources}) < len(sources):
            raise AdaptkitError(f"{where}: a model is listed twice among its sources")
        slices.append(Slice(sources, base, parameters))
    return slices


def slice_models(slices: list[Slice]) -> tuple[list[Ref], list[dict]]:
    """Every model once (for what reads a recipe's inputs as a whole: paths to check, the report), with
    no parameters of its own (those are per slice)."""
    models = list({str(s.ref): s.ref for part in slices for s in part.sources}.values())
    return models, [{} for _ in models]


def parameter_groups(slices: list[Slice], base: Ref | None,
                     uses_base: bool) -> list[tuple[str, dict, list[tuple[str, dict]]]]:
    """(where, the slice's parameters, [(where, parameters)] of each source that is an input) per slice.
    A slice's base (its own `base_model`, else `base`) is no input when the method `uses_base`: its
    parameters are unused, with a warning, as in mergekit."""
    groups = []
    for i, part in enumerate(slices):
        own = []
        for j, s in enumerate(part.sources):
            if not uses_base or str(s.ref) != str(part.base or base):
                own.append((f"slices[{i}].sources[{j}]", s.parameters))
            elif s.parameters:
                warnings.warn(f"slices[{i}].sources[{j}]: {s.ref} is the slice's base; its parameters are unused")
        groups.append((f"slices[{i}]", part.parameters, own))
    return groups


def layer_count(config: dict | None) -> tuple[str, int] | None:
    """(key, value) of config.json's layer count, or None."""
    return next(((k, config[k]) for k in LAYER_COUNT_KEYS if isinstance((config or {}).get(k), int)), None)


class Stack:
    """One model's tensors split into the numbered layers (`prefix.i.rest`) and the rest."""

    def __init__(self, source: Any):
        self.source, self.layers, self.outside = source, {}, []
        prefixes = set()
        for name in source.keys():
            if m := LAYER_NAME.match(name):
                prefixes.add(m.group(1))
                self.layers.setdefault(int(m.group(2)), []).append(m.group(3))
            else:
                self.outside.append(name)
        if len(prefixes) > 1:
            raise AdaptkitError(f"{source.ref} has several stacks of numbered layers ({', '.join(sorted(prefixes))}): "
                                "slices take one (mergekit's per-module `modules:` is not supported)")
        self.prefix = prefixes.pop() if prefixes else ""
        counted = layer_count(source.config)
        if counted is None:
            raise AdaptkitError(f"{source.ref}: config.json has no layer count ({', '.join(LAYER_COUNT_KEYS)}), "
                                "which a slices recipe renumbers")
        self.count = counted[1]
        if sorted(self.layers) != list(range(self.count)):
            raise AdaptkitError(f"{source.ref}: config.json's {counted[0]} is {self.count} but its tensors have "
                                f"{len(self.layers)} numbered layers")

    def name(self, layer: int, rest: str) -> str:
        return f"{self.prefix}.{layer}.{rest}"


def slice_jobs(slices: list[Slice], stacks: dict[str, Stack], base: Ref | None, uses_base: bool) -> dict[str, Job]:
    """Output tensor name -> its Job, in output order: tensors before the layers, the layers, the rest.
    `stacks` has every source by str(ref); a slice's base is its own `base_model`, else `base`, and is
    read only when the method `uses_base`."""
    def base_of(part: Slice) -> Ref | None:
        return (part.base or base) if uses_base else None

    first, last = slices[0], slices[-1]
    for i, part in enumerate(slices):
        _check_slice(i, part, stacks, base_of(part))
    reference = stacks[str(first.sources[0].ref)]
    jobs = {n: _outside(first, first.sources, stacks, base_of(first), n) for n in reference.outside if _before(n)}
    j = 0
    for i, part in enumerate(slices):
        n = part.sources[0].layers[1] - part.sources[0].layers[0]
        for k in range(n):
            rests = None
            for s in part.sources:
                have = sorted(stacks[str(s.ref)].layers[s.layers[0] + k])
                if rests is not None and have != rests:
                    raise AdaptkitError(f"slices[{i}]: layer {s.layers[0] + k} of {s.ref} has other tensors than "
                                        f"layer {part.sources[0].layers[0] + k} of {part.sources[0].ref}")
                rests = have
            for rest in rests:
                names = [stacks[str(s.ref)].name(s.layers[0] + k, rest) for s in part.sources]
                shapes = {tuple(stacks[str(s.ref)].source.info(m).shape) for s, m in zip(part.sources, names)}
                if len(shapes) > 1:
                    raise AdaptkitError(f"slices[{i}]: tensor '{names[0]}' has different shapes in its sources "
                                        f"({', '.join(map(str, sorted(shapes)))})")
                t = k / (n - 1) if n > 1 else 1.0
                jobs[reference.name(j, rest)] = _job(part, part.sources, names, stacks, base_of(part), t)
            j += 1
    # mergekit pairs the last slice's sources with as many inputs as the first slice has
    tail = last.sources[:len(first.sources)]
    jobs.update((n, _outside(last, tail, stacks, base_of(last), n)) for n in reference.outside if not _before(n))
    return jobs


def _before(name: str) -> bool:
    return bool(BEFORE_LAYERS.search(name)) and not AFTER_LAYERS.search(name)


def _outside(part: Slice, sources: list[SliceSource], stacks: dict[str, Stack], base: Ref | None, name: str) -> Job:
    for s in sources:
        if name not in stacks[str(s.ref)].outside:
            raise AdaptkitError(f"tensor '{name}' is missing from {s.ref}")
    return _job(part, sources, [name] * len(sources), stacks, base, 0.0)


def _job(part: Slice, sources: list[SliceSource], names: list[str], stacks: dict[str, Stack], base: Ref | None,
         t: float) -> Job:
    """The base (one of the slice's sources, as mergekit requires) is read as the base; the other sources
    are the inputs, with their own parameters (mergekit gives the base no per-model ones)."""
    job = Job([], None, t, [], [part.parameters])
    for s, name in zip(sources, names):
        pair = (stacks[str(s.ref)].source, name)
        if base is not None and str(s.ref) == str(base):
            job.base = pair
        else:
            job.inputs.append(pair)
            job.own.append(s.parameters)
    return job


def _check_slice(i: int, part: Slice, stacks: dict[str, Stack], base: Ref | None) -> None:
    if base is not None and str(base) not in {str(s.ref) for s in part.sources}:
        raise AdaptkitError(f"slices[{i}]: the base model {base} is not among its sources "
                            f"({', '.join(str(s.ref) for s in part.sources)}); mergekit requires it there")
    for j, s in enumerate(part.sources):
        count = stacks[str(s.ref)].count
        if s.layers[1] > count:
            raise AdaptkitError(f"slices[{i}].sources[{j}]: layer_range {list(s.layers)} is past the {count} layers "
                                f"of {s.ref}")


def source_place(slices: list[Slice], ref: Ref) -> str:
    """Where a model first appears among the slices' sources (`slices[i].sources[j]`), for messages."""
    return next((f"slices[{i}].sources[{j}]" for i, part in enumerate(slices) for j, s in enumerate(part.sources)
                 if str(s.ref) == str(ref)), "base_model")


def output_config(config: dict, slices: list[Slice], stacks: dict[str, Stack]) -> dict:
    """The donor's config.json with the output's layer count; per-layer lists (`layer_types`) taken
    from each output layer's first source, so they keep describing the layers."""
    if layer_count(config) is None:
        raise AdaptkitError(f"config.json has no layer count ({', '.join(LAYER_COUNT_KEYS)}) to set for the slices")
    key, count = layer_count(config)
    out = dict(config)
    out[key] = sum(s.sources[0].layers[1] - s.sources[0].layers[0] for s in slices)
    for name, value in config.items():
        if isinstance(value, list) and len(value) == count and name.startswith("layer_"):
            per_layer = []
            for part in slices:
                src = part.sources[0]
                theirs = (stacks[str(src.ref)].source.config or {}).get(name)
                if not isinstance(theirs, list) or len(theirs) != stacks[str(src.ref)].count:
                    raise AdaptkitError(f"{src.ref}: config.json's '{name}' does not list its layers, so the "
                                        "output's cannot be built")
                per_layer.extend(theirs[src.layers[0]:src.layers[1]])
            out[name] = per_layer
    return out
