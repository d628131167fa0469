"""The config.json of a frankenmerge: what it says of the layers by index, rewritten for the output's.

A slices recipe renumbers the layers (slices.py). config.json says things of layers by their index, and
each must describe the output's layers, or the model transformers builds from it is not the one merged:

- the layer count (mergekit's `num_layers_config_key`): the sum of the slices' lengths, as mergekit writes;
- per-layer lists (a key naming layers, one entry per layer: `layer_types`, Llama-4's and SmolLM3's
  `no_rope_layers`): each output layer's entry is its first source's;
- lists of layer indices (Llama-4's `moe_layers`, Mllama's `cross_attention_layers`, LFM2's
  `full_attn_idxs`): the output layers whose first source its model lists;
- a mixture of experts' dense layers (DeepSeek's and GLM-4-MoE's `first_k_dense_replace`, `moe_layer_freq`;
  Qwen-MoE's `mlp_only_layers`, `decoder_sparse_step`): rewritten to say which output layers are dense.

Where config.json has no list but a rule (Gemma-2's alternation, Gemma-3's and Cohere2's
`sliding_window_pattern`, Qwen2's `max_window_layers`) and the slices move layers, the list transformers'
own config class derives for each source is written out (transformers reads a list before its rule); a
rule with no list behind it (PATTERNS) is refused then. mergekit 0.1.5 sets the count alone.

Last, every output layer must have the tensors of the source layers config.json describes alike (the
lists and the expert flags above); layers that differ in a way nothing here tells apart (T5's first block
alone holds the relative position bias) must keep their places, else the merge is refused: a key adaptkit
does not know, or the model's code, may say it.
"""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

from ..errors import AdaptkitError
from .slices import BUFFERS, config_value, layer_count

if TYPE_CHECKING:
    from .slices import Slice, Stack

#: Lists of layer indices (not one entry per layer); `mlp_only_layers` goes with `decoder_sparse_step` (`_sparse`).
INDEX_LISTS = frozenset({"moe_layers", "cross_attention_layers", "full_attn_idxs"})
#: Numbers that give the layers' kinds by a rule on their indices, unreadable once layers move.
PATTERNS = ("sliding_window_pattern", "max_window_layers", "interleave_moe_layer_step", "no_rope_layer_interval",
            "global_attn_every_n_layers", "dense_attention_every_n_layers", "num_dense_layers", "attn_layer_period",
            "attn_layer_offset", "expert_layer_period", "expert_layer_offset")
#: Model types whose rule has no key: Gemma-2 alternates sliding and full attention by index (its 2024
#: checkpoints list no `layer_types`; the later rule-only types, OLMo-3 and gpt-oss, were always saved with it).
KEYLESS_RULES = frozenset({"gemma2"})
NO_CONFIG: dict = {}  # (a source without config.json: one object, so `_set_layers` reads it once)


def output_config(config: dict, parts: list[tuple[list[Slice], dict[str, Stack]]]) -> dict:
    """The donor's config.json with each sliced part's layers described (the module docstring; a module's
    at its own key, such as `text_config.num_hidden_layers`, and at any other of its keys holding the same
    count: transformers 5 reads Qwen2-VL's from `text_config`, mergekit and older configs from the top)."""
    out = copy.deepcopy(config)
    for slices, stacks in parts:
        first = stacks[str(slices[0].sources[0].ref)]
        if first.key is None:  # a module without layers
            continue
        if (found := layer_count(config, (first.key,))) is None:
            raise AdaptkitError(f"config.json has no layer count at '{first.key}' to set for the slices")
        for key in (k for k in first.keys if layer_count(config, (k,)) == (k, found[1])):
            _set_layers(config, out, key, slices, stacks)
    return out


def _set_layers(config: dict, out: dict, key: str, slices: list[Slice], stacks: dict[str, Stack]) -> None:
    *path, leaf = key.split(".")
    here = ".".join(path)
    at = lambda cfg: (config_value(cfg, here) if path else cfg) or {}  # noqa: E731
    layers = [(stacks[str(p.sources[0].ref)], p.sources[0].layers[0] + k)
              for p in slices for k in range(p.sources[0].layers[1] - p.sources[0].layers[0])]
    count = at(config)[leaf]
    at(out)[leaf] = len(layers)
    moved = any(i != j for j, (_, i) in enumerate(layers))  # (a rule on indices holds for layers in place)
    known: dict[int, dict[str, list]] = {}  # by config: the donor is often one of the sources

    def of(cfg: dict, layers_in: int) -> dict[str, list]:
        if id(cfg) not in known:
            known[id(cfg)] = _lists(cfg, path, layers_in, derive=moved)
        return known[id(cfg)]

    def lists(stack: Stack) -> dict[str, list]:
        return of(stack.source.config or NO_CONFIG, stack.count)

    donor = of(config, count)
    for name in donor:
        theirs = []
        for stack, i in layers:
            if name not in lists(stack):
                raise AdaptkitError(f"{stack.source.ref}: config.json's '{name}' does not list its layers, so the "
                                    "output's cannot be built")
            theirs.append(lists(stack)[name][i] if name not in INDEX_LISTS else i in lists(stack)[name])
        at(out)[name] = theirs if name not in INDEX_LISTS else [j for j, listed in enumerate(theirs) if listed]
    if moved and (rule := next((k for k in PATTERNS if at(config).get(k) is not None), None)) and not donor:
        raise AdaptkitError(f"config.json's '{rule}' gives the layers' kinds by a rule on their indices, and "
                            "transformers derives no per-layer list from it to write instead; slices that move "
                            "layers would change their kinds")
    _set_structure(at(config), at(out), [(stack, i, lists(stack), at(stack.source.config)) for stack, i in layers])


def _lists(config: dict, path: list[str], count: int, derive: bool) -> dict[str, list]:
    """The per-layer and index lists of a (sub-)config at `path`: its own, and with `derive`, where it has
    a rule (PATTERNS, KEYLESS_RULES), the ones transformers' config class for its model type derives
    where config.json has none (none where transformers does not know the type or refuses the config)."""
    def pick(items) -> dict[str, list]:
        return {k: v for k, v in items if "layer" in k.lower() or k in INDEX_LISTS
                if isinstance(v, list) and (k in INDEX_LISTS or (len(v) == count and k != "mlp_only_layers"))}

    own = (config_value(config, ".".join(path)) if path else config) or {}
    found = pick(own.items())
    # (transformers is imported only where a rule has no list beside it: 1.6 s and 110 MB, 6 times a Llama
    # frankenmerge's work; a config.json transformers 5 saved lists them all)
    kind = own.get("model_type", config.get("model_type"))
    ruled = not found and (any(own.get(k) is not None for k in PATTERNS) or kind in KEYLESS_RULES)
    if derive and ruled and isinstance(config.get("model_type"), str):
        try:
            from transformers import AutoConfig

            made = AutoConfig.for_model(config["model_type"], **{k: v for k, v in config.items() if k != "model_type"})
            for part in path:
                made = getattr(made, part)
            found = {**pick(vars(made).items()), **found}
        except Exception:  # noqa: BLE001 (an unknown type or a config transformers refuses: nothing derived)
            pass
    return found


def _sparse(config: dict, i: int) -> bool | None:
    """Whether layer i is a mixture of experts by config.json's keys that say so by index (Qwen-MoE's
    `mlp_only_layers`, `decoder_sparse_step`; DeepSeek's and GLM-4-MoE's `first_k_dense_replace`,
    `moe_layer_freq`, as transformers reads them), None where it has none."""
    if "mlp_only_layers" in config or "decoder_sparse_step" in config:
        return i not in (config.get("mlp_only_layers") or []) and (i + 1) % (config.get("decoder_sparse_step") or 1) == 0
    if "first_k_dense_replace" in config:
        return i >= (config["first_k_dense_replace"] or 0) and i % (config.get("moe_layer_freq") or 1) == 0
    return None


def _set_structure(config: dict, out: dict, layers: list[tuple[Stack, int, dict, dict]]) -> None:
    """The output's dense and expert layers (each (stack, layer, its lists, its config) of `layers` is an
    output layer's first source) written in the keys `_sparse` reads, where the donor's values would
    describe others; then the check of the module docstring's last paragraph."""
    flags = [_sparse(cfg, i) for _, i, _, cfg in layers]
    if any(f is not None for f in flags) and flags != [_sparse(config, j) for j in range(len(layers))]:
        if "mlp_only_layers" in out or "decoder_sparse_step" in out:
            out.update(decoder_sparse_step=1, mlp_only_layers=[j for j, f in enumerate(flags) if not f])
        elif "first_k_dense_replace" in out:
            dense = flags.index(True) if True in flags else len(flags)
            if any(flags[dense:]) != all(flags[dense:]) or None in flags:
                raise AdaptkitError("the slices put dense layers after expert layers, which config.json's "
                                    "first_k_dense_replace cannot describe: "
                                    + ", ".join("expert" if f else "dense" for f in flags))
            out.update(first_k_dense_replace=dense, **({"moe_layer_freq": 1} if "moe_layer_freq" in out else {}))

    def tensors(stack: Stack, i: int) -> frozenset:
        return frozenset(r for r in stack.layers[i] if not BUFFERS.search(stack.name(i, r)))

    def kind(i: int, lists: dict[str, list], cfg: dict) -> tuple:
        return tuple((k, v[i] if k not in INDEX_LISTS else i in v) for k, v in sorted(lists.items())) + (_sparse(cfg, i),)

    seen: dict[tuple, tuple[frozenset, Any, int]] = {}
    for stack, _, lists, cfg in {id(entry[0]): entry for entry in layers}.values():
        for i in range(stack.count):
            have, other, j = seen.setdefault(kind(i, lists, cfg), (tensors(stack, i), stack, i))
            if have == tensors(stack, i):
                continue
            # (unexplained: output layer j must have the first source's layer j's tensors, or its last layer's
            # past its count, as a rule that singles out some layers (T5's first) then reads them)
            first = layers[0][0]
            expected = [tensors(first, min(place, first.count - 1)) for place in range(len(layers))]
            if [tensors(s, n) for s, n, _, _ in layers] != expected:
                raise AdaptkitError(f"layer {i} of {stack.source.ref} has other tensors than layer {j} of "
                                    f"{other.source.ref} ({sorted(have ^ tensors(stack, i))[0]!r}) and config.json "
                                    "says nothing adaptkit knows to tell them apart, so the output's config cannot "
                                    "describe the layers as the slices order them")
            return
