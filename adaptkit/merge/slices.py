"""mergekit's `slices:` (frankenmerges): which input tensors make each output tensor.

A recipe's slices are read in order; each takes the same number of consecutive layers from every one
of its sources, and its k-th layer merges layer `start + k` of each source into output layer j, where
j counts on across slices from 0. So output layer names are renumbered and the output config's layer
count is the sum of the slices' lengths, as mergekit writes them. A gradient runs over each slice's
own layers (t = k / (n − 1); a one-layer slice takes t = 1, mergekit's rule). Tensors outside the
layers take t = 0: the ones before them (embeddings) come from the first slice's sources, with its
parameters and base, the ones after them (final norm, LM head) from the last slice's.

A layer tensor is named `<prefix>.<i>.<rest>` (its first numbered component, one prefix per model, or
per module of a multimodal model: modules.py); a tensor outside the layers is before them when its name
says embedding or input (`emb`, `wte`, `wpe`, a vision tower's `patch_conv`, `ln_pre`, an encoder's
`conv1`; GPT-NeoX's `embed_out` excepted), as in mergekit's architecture tables, else after them.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from ..errors import AdaptkitError
from ..validate import short

if TYPE_CHECKING:
    from .refs import Ref

#: Keys of config.json that hold the layer count, by architecture family (mergekit's `num_layers_config_key`).
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
LAYER_NAME = re.compile(r"^(.*?)\.(\d+)\.(.+)$")
BEFORE_LAYERS = re.compile(r"emb|wte|wpe|relative_pe|position_ids|patch_conv|ln_pre|layernorm_pre|pre_layrnorm|conv\d")
AFTER_LAYERS = re.compile(r"embed_out|lm_head")
#: Buffers older checkpoints store and newer ones do not (rotary frequencies, GPT-2's causal masks): left out
#: of a merge's output where an input lacks them, as mergekit's tables never list them.
BUFFERS = re.compile(r"(^|\.)rotary_emb\.inv_freq$|(^|\.)h\.\d+\.attn\.(attention\.)?(masked_)?bias$")


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
    def scopes(self) -> list[tuple[dict[str, Any], str]]:
        """Each input's own parameters and its tensor name (`positions.resolve_params`'s `inputs`)."""
        return list(zip(self.own, (n for _, n in self.inputs)))

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


def place(label: str, whole: bool, i: int, j: int | None = None) -> str:
    """Where slice i (source j) of a part is in the recipe: `slices[i].sources[j]`, after a module's
    `label` (`modules.<name>.`); in a module given as `models:` (`whole`), `models[j]`."""
    if whole:
        return label.rstrip(".") if j is None else f"{label}models[{j}]"
    return f"{label}slices[{i}]" + ("" if j is None else f".sources[{j}]")


def parameter_groups(slices: list[Slice], base: Ref | None, uses_base: bool, label: str = "",
                     whole: bool = False) -> list[tuple[str, dict, list[tuple[str, dict]]]]:
    """(where, the slice's parameters, [(where, parameters)] of each source that is an input) per slice
    (`label`, `whole`: see `place`). A slice's base (its own `base_model`, else `base`) is no input when
    the method `uses_base`: its parameters are unused, with a warning, as in mergekit."""
    groups = []
    for i, part in enumerate(slices):
        own = []
        for j, s in enumerate(part.sources):
            if not uses_base or str(s.ref) != str(part.base or base):
                own.append((place(label, whole, i, j), s.parameters))
            elif s.parameters:
                warnings.warn(f"{place(label, whole, i, j)}: {s.ref} is the {'module' if whole else 'slice'}'s base; "
                              "its parameters are unused")
        groups.append((place(label, whole, i), part.parameters, own))
    return groups


def config_value(config: dict | None, key: str) -> Any:
    """config.json's value at a dotted key (`text_config.num_hidden_layers`), or None."""
    value = config or {}
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def layer_count(config: dict | None, keys: tuple[str, ...] = LAYER_COUNT_KEYS) -> tuple[str, int] | None:
    """(key, value) of the first of `keys` that config.json holds as a count, or None."""
    return next(((k, n) for k in keys if type(n := config_value(config, k)) is int), None)


class Stack:
    """One model's tensors (or one module's: `names`) split into the numbered layers (`prefix.i.rest`)
    and the rest, the layers counted at the first of `keys` config.json has, or `fixed`; with neither
    (a module without layers) every tensor is outside them."""

    def __init__(self, source: Any, names: list[str] | None = None, keys: tuple[str, ...] = LAYER_COUNT_KEYS,
                 fixed: int | None = None, module: str | None = None):
        self.source, self.layers, self.outside, self.key, self.keys = source, {}, [], None, keys
        where = f"{source.ref}" + (f" (module {module})" if module else "")
        layered = bool(keys) or fixed is not None
        prefixes = set()
        for name in source.keys() if names is None else names:
            if layered and (m := LAYER_NAME.match(name)):
                prefixes.add(m.group(1))
                self.layers.setdefault(int(m.group(2)), []).append(m.group(3))
            else:
                self.outside.append(name)
        if len(prefixes) > 1:
            raise AdaptkitError(f"{where} has several stacks of numbered layers ({', '.join(sorted(prefixes))}): "
                                "slices take one (a multimodal model's modules are sliced one by one with "
                                "`modules:`, for the architectures in modules.py)")
        self.prefix = prefixes.pop() if prefixes else ""
        self.count = 0
        if not layered:
            return
        counted = ("layer count", fixed) if fixed is not None else layer_count(source.config, keys)
        if counted is None:
            raise AdaptkitError(f"{where}: config.json has no layer count ({', '.join(keys)}), "
                                "which a slices recipe renumbers")
        (self.key, self.count) = (None if fixed is not None else counted[0]), counted[1]
        if sorted(self.layers) != list(range(self.count)):
            said = f"the module's {counted[0]}" if fixed is not None else f"config.json's {counted[0]}"
            raise AdaptkitError(f"{where}: {said} is {self.count} but its tensors have {len(self.layers)} numbered layers")

    def name(self, layer: int, rest: str) -> str:
        return f"{self.prefix}.{layer}.{rest}"


def slice_jobs(slices: list[Slice], stacks: dict[str, Stack], base: Ref | None, uses_base: bool,
               label: str = "", whole: bool = False, shared: dict[str, Any] | None = None) -> dict[str, Job]:
    """Output tensor name -> its Job, in output order: tensors before the layers, the layers, the rest.
    `stacks` has every source by str(ref); a slice's base is its own `base_model`, else `base`, and is
    read only when the method `uses_base`. A module's slices (`label`, `whole`: see `place`) have its
    `shared` parameters after their own."""
    def base_of(part: Slice) -> Ref | None:
        return (part.base or base) if uses_base else None

    first, last = slices[0], slices[-1]
    scopes = [shared] if shared else []
    for i, part in enumerate(slices):
        _check_slice(place(label, whole, i), part, stacks, base_of(part))
    reference = stacks[str(first.sources[0].ref)]
    jobs = {n: _outside(first, first.sources, stacks, base_of(first), n, scopes) for n in reference.outside
            if _before(n)}
    j = 0
    for i, part in enumerate(slices):
        n = part.sources[0].layers[1] - part.sources[0].layers[0]
        for k in range(n):
            rests, buffers = None, None
            for s in part.sources:
                stack, at = stacks[str(s.ref)], s.layers[0] + k
                held = {r for r in stack.layers[at] if BUFFERS.search(stack.name(at, r))}
                have = sorted(set(stack.layers[at]) - held)
                if rests is not None and have != rests:
                    raise AdaptkitError(f"{place(label, whole, i)}: layer {at} of {s.ref} has other tensors than "
                                        f"layer {part.sources[0].layers[0] + k} of {part.sources[0].ref}")
                rests, buffers = have, held if buffers is None else buffers & held  # (buffers: where all have them)
            for rest in rests + sorted(buffers):
                names = [stacks[str(s.ref)].name(s.layers[0] + k, rest) for s in part.sources]
                shapes = {tuple(stacks[str(s.ref)].source.info(m).shape) for s, m in zip(part.sources, names)}
                if len(shapes) > 1:
                    raise AdaptkitError(f"{place(label, whole, i)}: tensor '{names[0]}' has different shapes in its sources "
                                        f"({', '.join(map(str, sorted(shapes)))})")
                t = k / (n - 1) if n > 1 else 1.0
                jobs[reference.name(j, rest)] = _job(part, part.sources, names, stacks, base_of(part), t, scopes)
            j += 1
    # mergekit pairs the last slice's sources with as many inputs as the first slice has
    tail = last.sources[:len(first.sources)]
    tied = reference.source.tied_extra([stacks[str(s.ref)].source for s in tail])  # (with the part they are tied in)
    after = reference.outside + [n for n in tied if reference.source.stored(n) in reference.outside]
    jobs.update((n, _outside(last, tail, stacks, base_of(last), n, scopes)) for n in after if not _before(n))
    return jobs


def _before(name: str) -> bool:
    return bool(BEFORE_LAYERS.search(name)) and not AFTER_LAYERS.search(name)


def _outside(part: Slice, sources: list[SliceSource], stacks: dict[str, Stack], base: Ref | None, name: str,
             scopes: list[dict]) -> Job:
    for s in sources:
        if not stacks[str(s.ref)].source.stored(name):  # (a head tied to the embeddings: read from them)
            raise AdaptkitError(f"tensor '{name}' is missing from {s.ref}")
    return _job(part, sources, [name] * len(sources), stacks, base, 0.0, scopes)


def _job(part: Slice, sources: list[SliceSource], names: list[str], stacks: dict[str, Stack], base: Ref | None,
         t: float, scopes: list[dict]) -> Job:
    """The base (one of the slice's sources, as mergekit requires) is read as the base; the other sources
    are the inputs, with their own parameters (mergekit gives the base no per-model ones)."""
    job = Job([], None, t, [], [part.parameters, *scopes])
    for s, name in zip(sources, names):
        pair = (stacks[str(s.ref)].source, name)
        if base is not None and str(s.ref) == str(base):
            job.base = pair
        else:
            job.inputs.append(pair)
            job.own.append(s.parameters)
    return job


def _check_slice(where: str, part: Slice, stacks: dict[str, Stack], base: Ref | None) -> None:
    if base is not None and str(base) not in {str(s.ref) for s in part.sources}:
        raise AdaptkitError(f"{where}: the base model {base} is not among its sources "
                            f"({', '.join(str(s.ref) for s in part.sources)}); mergekit requires it there")
    if len({s.layers[1] - s.layers[0] for s in part.sources}) > 1:  # (a module's models: their own counts)
        raise AdaptkitError(f"{where}: its sources have different numbers of layers "
                            f"({', '.join(f'{s.ref}: {s.layers[1] - s.layers[0]}' for s in part.sources)})")
    for j, s in enumerate(part.sources):
        count = stacks[str(s.ref)].count
        if s.layers[1] > count:
            raise AdaptkitError(f"{where}.sources[{j}]: layer_range {list(s.layers)} is past the {count} layers "
                                f"of {s.ref}")


def source_place(parts: list, ref: Ref) -> str:
    """Where a model first appears among the sliced parts' sources (`place`), for messages."""
    return next((place(m.label, m.whole, i, j) for m in parts for i, part in enumerate(m.slices)
                 for j, s in enumerate(part.sources) if str(s.ref) == str(ref)), "base_model")
