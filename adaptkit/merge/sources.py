"""Merge inputs: a model's tensors in float32, with `base+adapter` adapters added on the fly.

An input that is an adapter (and a recipe base is given) becomes `base+adapter`, so merging adapters
into a base (mode 2) is the same streaming merge as merging models. ΔW comes from each adapter's
variant plugin; a saved full module (`modules_to_save`) replaces the base tensor. A LoRA on a MoE layer's
experts stacked as transformers 5 holds them (PEFT's target_parameters) goes into a checkpoint that stores
each expert on its own through transformers' conversion (`converted.py`): each stored tensor takes its part
of its expert's ΔP (`spec.ExpertDelta`), one expert at a time.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch

from .. import registry, spec, validate
from ..adapter import read_adapter
from ..errors import AdaptkitError
from ..hub.repos import resolve_path
from ..io.store import TensorStore, open_store
from ..files.lowrank import module_delta, settle_layout
from ..io.safetensors_file import TensorInfo
from .refs import Ref
from .slices import BUFFERS
from .tokenizer import VOCABULARY_TENSORS
from ..spec import AdapterFiles
from ..quant.unpacked import open_unpacked


#: Output heads a checkpoint leaves out when they are tied to its input embeddings, and the embeddings read
#: in their place, as mergekit's architecture tables say (`tied_names`): a model that stores its head merges
#: with one that ties it. Unlike mergekit, only where the model's config.json does not say
#: `tie_word_embeddings: false` (a checkpoint without its untied head is incomplete: an error).
TIED_HEADS = {
    "lm_head.weight": ("model.embed_tokens.weight", "transformer.wte.weight", "model.language_model.embed_tokens.weight",
                       "backbone.embeddings.weight", "wte.weight", "shared.weight"),
    "language_model.lm_head.weight": ("language_model.model.embed_tokens.weight",),
    "output.weight": ("model.tok_embeddings.weight",),
    "cls.predictions.decoder.weight": ("bert.embeddings.word_embeddings.weight",),
    "lm_head.decoder.weight": ("roberta.embeddings.word_embeddings.weight",),
    "vocab_projector.weight": ("distilbert.embeddings.word_embeddings.weight",),
    "proj_out.weight": ("model.decoder.embed_tokens.weight",),
}
#: T5's per-stack embeddings, which are its `shared` one whatever the config says.
SHARED_EMBEDDINGS = {"encoder.embed_tokens.weight": ("shared.weight",), "decoder.embed_tokens.weight": ("shared.weight",)}
TIED = TIED_HEADS | SHARED_EMBEDDINGS


#: The prefix a model class puts before its bare model's tensors (transformers' `base_model_prefix`), by
#: model_type: a checkpoint saved from the bare class (GPT-2's own: `h.0.…`) merges with one saved from the
#: language-model class (`transformer.h.0.…`), as mergekit's tables alias them; BERT-family checkpoints
#: converted from TensorFlow also name LayerNorm's weight and bias `gamma` and `beta`.
PREFIXES = {"gpt2": "transformer.", "bert": "bert.", "roberta": "roberta.", "distilbert": "distilbert."}
LAYER_NORM = ((".LayerNorm.weight", ".LayerNorm.gamma"), (".LayerNorm.bias", ".LayerNorm.beta"))


class ModelSource:
    """One merge input: a model store plus adapters merged into it, read tensor by tensor."""

    def __init__(self, ref: Ref, store: TensorStore, adapters: list[AdapterFiles]):
        self.ref = ref
        self.store = store
        self.adapters = adapters
        self.config = validate.model_config(store.json_file("config.json"), store.root / "config.json")
        # base key -> (adapter, module, hook, rows of the key its ΔW covers or None for all of it)
        self._deltas: dict[str, list[tuple[AdapterFiles, str, str, tuple[int, int] | None]]] = {}
        self._saved: dict[str, tuple[AdapterFiles, str]] = {}
        self.placed = False  # some module lies under another name in the base (its format's `base_key`)
        self._names = set(store.keys())
        self._groups: dict | None = None  # transformers 5's tensors made of the stored ones (`_converted`)
        for adapter in adapters:
            self._index(adapter)

    @property
    def root(self) -> Path:
        return self.store.root

    def _index(self, adapter: AdapterFiles) -> None:
        variant = registry.get("variant", adapter.variant)
        if isinstance(variant, spec.MergeCheck):
            variant.check_mergeable(adapter)  # raises for adapters with no weight-space form
        places, stacked = {}, {}
        for module in adapter.modules:
            group = self._converted(module) if weight_key(self.store, module) is None else None
            if group is not None and len(group.members) == 1 and not group.stacked:  # (renamed: MoE routers)
                places[module] = (group.members[0][0], f"{group.members[0][0].rpartition('.')[0]}.bias", None)
            elif group is not None:
                stacked[module] = group
            else:
                places[module] = self._place(adapter, module)
        settle_layout(variant, adapter, self.config, self.ref.model,  # Conv1D or Linear: the base's layers say
                      lambda module: _rows(self.store.get(places[module][0]), places[module][2]) if module in places
                      else None)
        for module, group in stacked.items():  # each expert's ΔP on its own tensors
            if not isinstance(variant, spec.ExpertDelta):
                raise AdaptkitError(f"adapter {adapter.store.root}: a {variant.name} adapter on '{module}', experts "
                                    f"{self.ref.model} stores one by one, cannot be merged into it")
            shape = group.shape(tuple(self.store.info(group.members[0][0]).shape))
            for p, pattern in enumerate(group.members):
                for e, member in enumerate(pattern):
                    self._deltas.setdefault(member, []).append((adapter, module, "expert", (group, shape, p, e)))
        for module, (key, bias, rows) in places.items():
            self._deltas.setdefault(key, []).append((adapter, module, "delta", rows))
            if isinstance(variant, spec.StoredBiasDelta) and bias in self.store:  # it changes the bias too
                self._deltas.setdefault(bias, []).append((adapter, module, "delta_bias", rows))
            elif isinstance(variant, spec.StoredBiasDelta) and variant.delta_bias(adapter, module, base=None) is not None:
                raise AdaptkitError(f"adapter {adapter.store.root} changes the bias of '{module}', which has none "
                                    f"in {self.ref.model}")
        for name, key in adapter.saved.items():
            target = name if name in self.store else weight_key(self.store, name.removesuffix(".weight"))
            if target is None:
                raise AdaptkitError(f"adapter {adapter.store.root} saves '{name}', which {self.ref.model} does not have")
            self._saved[target] = (adapter, key)

    def _place(self, adapter: AdapterFiles, module: str) -> tuple[str, str | None, tuple[int, int] | None]:
        """(weight key, bias key, rows of the weight) of a module in the base: under its own name, else where
        the adapter's format places it (a single-file checkpoint's own names, a fused q/k/v projection)."""
        key = weight_key(self.store, module)
        if key is not None:
            return key, f"{module}.bias", None
        fmt = registry.get("format", adapter.format)
        found = fmt.base_key(module, self.store) if isinstance(fmt, spec.BaseNames) else None
        if found is None:
            raise AdaptkitError(f"adapter {adapter.store.root} targets '{module}', which {self.ref.model} does not "
                                f"have: {_naming_hint(self.store, module)}")
        self.placed = True
        return found

    def _converted(self, module: str):
        """The group of stored tensors transformers 5 loads as `module` (a MoE layer's experts stacked, a router
        renamed: `converted.py`), or None: a LoRA on its parameters names them so (PEFT's target_parameters)."""
        if self._groups is None:  # (asked only for a module the store lacks)
            from .converted import ONLY_RENAMED, conversion_steps, converted_groups

            kind = (self.config or {}).get("model_type")  # (none: a checkpoint without config.json, such as SD's)
            steps = conversion_steps(kind) if isinstance(kind, str) and kind not in ONLY_RENAMED else ()
            self._groups = converted_groups(sorted(self._names), steps, lambda *_: None) if steps else {}
        return self._groups.get(module)

    @property
    def mirrored(self) -> bool:
        """Whether the output keeps this base's files and names (`io.writer.MirrorWriter`): a pipeline folder,
        or a base whose own names the adapter's format had to find (a single-file checkpoint, a component
        folder), which tools load by their file names."""
        return bool(self.store.components) or self.placed

    def keys(self) -> list[str]:
        return self.store.keys()

    def stored(self, name: str) -> str | None:
        """The tensor read for `name`: itself, or the one it is tied to where the checkpoint leaves it out
        (`TIED`); None when neither is stored."""
        if name in self._names:
            return name
        if alias := next((a for a in self._aliases(name) if a in self._names), None):
            return alias
        ties = (SHARED_EMBEDDINGS if tie_flag(self.config) is False else TIED).get(name, ())
        return next((t for t in ties if t in self._names), None)

    def _aliases(self, name: str) -> list[str]:
        """Other names the checkpoint may store `name` under (`PREFIXES`, `LAYER_NORM`)."""
        prefix = PREFIXES.get((self.config or {}).get("model_type"))
        if prefix is None:
            return []
        names = [name.removeprefix(prefix) if name.startswith(prefix) else prefix + name]
        for new, old in LAYER_NORM:
            names += [n.removesuffix(new) + old for n in (name, names[0]) if n.endswith(new)]
            names += [n.removesuffix(old) + new for n in (name, names[0]) if n.endswith(old)]
        return names

    def tied_extra(self, others: list[ModelSource]) -> list[str]:
        """Tensors other inputs store that this one leaves out, tied: a merge's output has them (mergekit's
        optional tied weights: present when any input has them)."""
        return [n for n in TIED if n not in self._names and self.stored(n) and any(n in o._names for o in others)]

    def info(self, name: str) -> TensorInfo:
        return self.store.info(self.stored(name) or name)

    def has_deltas(self, name: str) -> bool:
        return name in self._deltas

    def get(self, name: str, *, float32: bool = True, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor `name` in float32, or with `float32=False` as stored (adapter deltas added in float32
        and rounded once to the stored dtype: the tensor of the model with the adapter merged in, as
        mergekit's `model+lora` and PEFT's merge_and_unload store it); or rows [start, stop) of it.
        Row blocks are only for tensors no adapter changes (see `has_deltas`)."""
        # A saved full tensor replaces the base one; adapter deltas then apply on top of it.
        if name in self._saved:
            adapter, key = self._saved[name]
            tensor = adapter.store.get(key, rows=rows)
        else:
            tensor = self.store.get(self.stored(name) or name, rows=rows)
        if not (float32 or name in self._deltas):
            return tensor
        stored, tensor = tensor.dtype, tensor.float()
        for adapter, module, hook, span in self._deltas.get(name, ()):
            variant = registry.get("variant", adapter.variant)
            if hook == "expert":  # this tensor's part of expert e's ΔP in transformers 5's layout (all its rows)
                (group, shape, p, e), span = span, None
                part, delta = tensor, group.expert_part(variant.expert_delta(adapter, module, shape, e), p)
            else:
                part = _rows(tensor, span)
                delta = module_delta(variant, adapter, module, part) if hook == "delta" \
                    else variant.delta_bias(adapter, module, base=part)
            if delta is None:
                continue
            if delta.shape != part.shape:
                raise AdaptkitError(f"adapter {adapter.store.root}: module '{module}' gives ΔW of shape "
                                    f"{tuple(delta.shape)} but {self.ref.model} has {tuple(part.shape)}: wrong base model?")
            tensor = tensor + delta if span is None else \
                torch.cat((tensor[:span[0]], part + delta, tensor[span[1]:]))  # its rows of a fused tensor
        return tensor if float32 else tensor.to(stored)

    def check_matches(self, reference: ModelSource, rows_may_differ: frozenset[str] = frozenset()) -> None:
        """Same tensor names and shapes as the reference input (but for the first dimension of the
        tensors in `rows_may_differ`: token-indexed ones, aligned later), or one clear error."""
        if missing := sorted(n for n in reference.keys() if not self.stored(n) and not BUFFERS.search(n)):
            raise AdaptkitError(f"tensor '{missing[0]}' of {reference.ref} is missing from {self.ref}{SETS_HINT}")
        if extra := sorted(n for n in self.keys() if not reference.stored(n) and not BUFFERS.search(n)):
            raise AdaptkitError(f"{self.ref} has tensor '{extra[0]}' that {reference.ref} lacks{SETS_HINT}")
        for name in reference.keys() + reference.tied_extra([self]):
            if not self.stored(name):  # (a buffer it lacks: left out of the output)
                continue
            _same_shape(name, self, reference, rows_may_differ)


def weight_key(store: TensorStore, module: str) -> str | None:
    """The key of a module's weight in a model store: `<module>.weight`, the module path itself (an adapted
    parameter), or an `nn.MultiheadAttention`'s packed q/k/v projection `<module>.in_proj_weight`. PEFT
    saves an adapted layer inside another adapted one under `<outer>.base_layer.<inner>` (the
    MultiheadAttention's out_proj): that is the layer `<outer>.<inner>`."""
    module = module.replace(".base_layer.", ".")
    for key in (f"{module}.weight", module, f"{module}.in_proj_weight"):
        if key in store:
            return key
    return None


def _rows(tensor: torch.Tensor, span: tuple[int, int] | None) -> torch.Tensor:
    return tensor if span is None else tensor[span[0]:span[1]]


def _naming_hint(store: TensorStore, module: str) -> str:
    """Why a targeted module is missing: where the model has it under a shorter name (a pipeline's
    component saved on its own, e.g. a UNet folder for an adapter naming `unet.…`), that its names
    lack the adapter's prefix, which adaptkit does not drop (the adapter's other components would
    silently go unmerged); that it stores experts one by one where the adapter has them stacked; otherwise,
    probably another base."""
    parts = module.split(".")
    # (a layer's experts stacked, `….3.mlp.experts.down_proj`, where the checkpoint has `….3.….experts.0.…`)
    layer = re.match(r"(.*?\.\d+)\..*\.experts\.[a-z_]+$", module)
    if layer and any(k.startswith(f"{layer.group(1)}.") and ".experts.0." in k for k in store.keys()):
        return ("it stores each expert's matrices on their own, the adapter adapts the experts stacked as "
                "transformers 5 holds them (PEFT's target_parameters), and transformers' conversion of this model "
                "type is not one adaptkit follows")
    for cut in range(1, len(parts)):
        if weight_key(store, ".".join(parts[cut:])) is not None:
            prefix = ".".join(parts[:cut]) + "."
            return (f"it has '{'.'.join(parts[cut:])}', without the prefix '{prefix}' (a component saved on its own); "
                    f"merge into a model whose names include '{prefix}'")
    return "an adapter for a different base?"


SETS_HINT = " (to merge inputs with different tensors: `tensors: union` or `intersection`, or --tensors)"


def merge_names(reference: ModelSource, sources: list[ModelSource], tensors: str | None = None,
                base: ModelSource | None = None) -> list[str]:
    """The tensors a merge of `sources` writes, under the reference's names: its own, and heads that others
    store and it ties (`TIED`), without the buffers (`BUFFERS`) an input lacks (with a warning).

    `tensors`: "intersection" keeps only those every source stores; "union" adds those any source stores,
    each merged over the inputs that have it (`Plan.job`), as mergekit-pytorch does, but for two cases:
    a tensor only the `base` has is the base's (mergekit leaves it out of the output, which then does not
    load), and one the base lacks where the method takes a base is an error naming it (as mergekit's)."""
    names = reference.keys() + reference.tied_extra(sources)
    if tensors is not None:  # from the union (an intersection says how many it leaves out)
        seen = set(names)
        for source in sources:
            extra = [n for n in source.keys() if n not in seen and not reference.stored(n)]
            names += extra
            seen.update(extra)
        return _sized(names, sources, tensors, base)
    dropped = [n for n in names if BUFFERS.search(n) and not all(s.stored(n) for s in sources)]
    if dropped:
        warnings.warn(f"{len(dropped)} buffer(s) such as '{dropped[0]}' are left out of the output: some inputs do "
                      "not store them (transformers makes them when it loads the model)")
    return [n for n in names if n not in dropped]


def _sized(names: list[str], sources: list[ModelSource], tensors: str, base: ModelSource | None) -> list[str]:
    """`merge_names` for a `tensors:` setting: the names kept (every one for a union, those every source
    has for an intersection), and one warning saying how many tensors are not in every source."""
    partial = [n for n in names if not all(s.stored(n) for s in sources)]
    if base is not None and tensors == "union":
        if lacking := [n for n in partial if not base.stored(n)]:
            raise AdaptkitError(f"tensor '{lacking[0]}' is not in the base model {base.ref}: the merge method "
                                "takes a base for every tensor (`tensors: intersection` leaves such tensors out)")
    if partial:
        what = "each merged over the inputs that have it" if tensors == "union" else "left out"
        warnings.warn(f"{len(partial)} tensor(s) such as '{min(partial)}' are not in every input: {what} "
                      f"(tensors: {tensors})")
    if tensors == "intersection":
        names = [n for n in names if n not in set(partial)]
        if not names:
            raise AdaptkitError("the inputs have no tensor in common (tensors: intersection)")
    return names


def check_inputs(names: list[str], reference: ModelSource, sources: list[ModelSource],
                 rows_may_differ: frozenset[str], tensors: str | None) -> None:
    """Each source has the reference's tensors (`check_matches`); with a `tensors:` setting, each tensor has
    one shape in every source that has it (but for the first dimension of token-indexed ones, aligned
    later). Else one clear error."""
    if tensors is None:
        for source in sources:
            source.check_matches(reference, rows_may_differ)
        return
    for name in names:
        have = [s for s in sources if s.stored(name)]
        for other in have[1:]:
            _same_shape(name, other, have[0], rows_may_differ)


def _same_shape(name: str, source: ModelSource, reference: ModelSource, rows_may_differ: frozenset[str]) -> None:
    """Tensor `name` has one shape in both (but for the first dimension of token-indexed ones, aligned later),
    or an error, which for token-indexed rows says how to align them."""
    a, b = source.info(name).shape, reference.info(name).shape
    cut = 1 if name in rows_may_differ else 0
    if tuple(a[cut:]) != tuple(b[cut:]):
        hint = " (the vocabularies differ: `tokenizer_source: union`, `base` or `model:<path>` aligns rows by token)" \
            if name in VOCABULARY_TENSORS and tuple(a[1:]) == tuple(b[1:]) else ""
        raise AdaptkitError(f"tensor '{name}' has shape {a} in {source.ref} but {b} in {reference.ref}{hint}")


def tie_flag(config: dict | None) -> bool | None:
    """config.json's `tie_word_embeddings` (a multimodal model's in `text_config`), None when not given."""
    config = config or {}
    return config.get("tie_word_embeddings", (config.get("text_config") or {}).get("tie_word_embeddings"))


def warn_tied_config(names: list[str], donor: ModelSource) -> None:
    """A head the output has because other inputs store it, where the model whose config.json the output
    takes ties it to its embeddings (`tie_word_embeddings: true`, kept as mergekit keeps it): a loader that
    honours the flag uses the embeddings as the head (transformers 5 keeps a stored head that differs from
    them, and warns)."""
    heads = [n for n in names if n in TIED_HEADS and donor.stored(n) != n]
    if heads and tie_flag(donor.config) is True:
        warnings.warn(f"the output has '{heads[0]}' (other inputs store it), but its config.json, from {donor.ref}, "
                      "says tie_word_embeddings: true, as mergekit's does: a loader that honours it uses the embeddings "
                      "as that head; set it to false in the output's config.json to use the merged one")


def open_input(ref: Ref, *, allow_pickle: bool = False, base: Ref | None = None) -> ModelSource:
    """Open a recipe input. A bare adapter with a recipe base becomes `base+adapter`."""
    store = open_unpacked(open_store(resolve_path(ref.model), allow_pickle=allow_pickle))
    store.map_reads = True  # the engine holds a tensor only while it merges it
    adapters = [_must_be_adapter(a, allow_pickle) for a in ref.adapters]
    lone = read_adapter(store)
    if lone is not None:
        if base is None:
            raise AdaptkitError(f"{ref.model} is an adapter: give a base model to merge it into "
                                "(base_model / --base), or ask for an adapter output")
        return open_input(Ref(base.model, base.adapters + (ref.model,) + ref.adapters), allow_pickle=allow_pickle)
    return ModelSource(ref, store, adapters)


def _must_be_adapter(ref: str, allow_pickle: bool) -> AdapterFiles:
    adapter = read_adapter(resolve_path(ref), allow_pickle=allow_pickle)
    if adapter is None:
        raise AdaptkitError(f"'{ref}' after '+' must be an adapter, but it is a full model")
    return adapter


def check_same_architecture(sources: list[ModelSource], allowed: bool = False) -> None:
    """One model type (config.json's `model_type`) among the inputs that say one, or an error; `allowed`
    (--allow-mixed-architectures, mergekit's --allow-crimes): a warning, and the merge goes by tensor names
    and shapes, as mergekit's does."""
    seen: dict[str, Any] = {}
    for source in sources:
        cfg = source.config or {}
        arch = (cfg.get("model_type"), tuple(cfg.get("architectures") or ()))
        if arch[0] is None:
            continue
        if seen and arch[0] != seen["arch"][0]:
            mixed = f"different architectures: {seen['ref']} is {seen['arch'][0]}, {source.ref} is {arch[0]}"
            if not allowed:
                raise AdaptkitError(f"{mixed} (--allow-mixed-architectures merges them by tensor name and shape, "
                                    "as mergekit's --allow-crimes)")
            warnings.warn(f"{mixed}: merged by tensor name and shape; the output's config.json is one model's "
                          "(the base's, else the first's)")
            return
        seen = seen or {"arch": arch, "ref": source.ref}
