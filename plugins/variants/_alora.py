"""Activated LoRA (aLoRA; Greenewald et al. 2025, arXiv 2504.12397), LoRA's `alora_invocation_tokens`
(not a plugin; used by `lora.py`).

The LoRA branch acts only on the tokens from the last occurrence of the invocation sequence on, per
row of `input_ids`; before it (and in rows without it) the layer is the base layer, so the KV cache
of the prompt is the base model's. As PEFT (`tuners/lora/variants.py`): the offset of a row is
T − start, start the index of the last occurrence (None where there is none), and a layer whose
output has T tokens adds s·B·A·dropout(x) to the last min(offset, T) of them:

    y_t = W·x_t + [t ≥ T − min(offset, T)] · s·B·A·x_t

A call that continues a cached sequence (decoding with a KV cache) counts the cached tokens: a row
with the sequence in the new tokens starts there, a row already active stays active on all of them,
others stay off. That is PEFT's `generate`, which finds the offsets in the prompt once (it differs
only where the model itself generates the invocation sequence: PEFT leaves that row off).

The update depends on the token, so there is no ΔW: merging and converting are refused. Beam search
(`generate` with num_beams > 1) is refused, as PEFT refuses it.
Gradient checkpointing runs a layer again during backward, after the call: the layer then takes the
offsets of its last forward with gradients (only there: outside a call, a layer has none). As in PEFT,
that needs one forward per backward: two forwards with different offsets before it are refused.
"""
from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from adaptkit.plugin import AdaptkitError

if TYPE_CHECKING:  # torch is imported where used: `lora.py`, and so `inspect`, stays torch-free
    import torch

KEY = "alora_invocation_tokens"
# branch -> its last forward with gradients: offsets, whether a recomputation took them, whether they replaced
# different offsets that none took (two forwards before one backward)
_LAST: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
NO_INPUTS = ("aLoRA finds where it acts in the model's input_ids: call the model itself with input_ids "
             "(this call had none: inputs_embeds only, or a part of the model run on its own)")


def invocation(config) -> tuple[int, ...] | None:
    """The invocation token ids of an aLoRA config (a non-empty list of token ids), None for plain LoRA."""
    tokens = config.get(KEY)
    if not tokens:  # PEFT: an empty list is no aLoRA either
        return None
    if not isinstance(tokens, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                        for t in tokens):
        raise AdaptkitError(f"{KEY} must be a list of token ids, got {tokens!r}")
    return tuple(tokens)


def refuse_merge(config) -> None:
    if invocation(config) is not None:
        raise AdaptkitError("aLoRA cannot be merged: its LoRA acts only on tokens from the invocation sequence on "
                            f"({KEY}), so it has no weight change; load it on a live model")


def check_settings(config, path: str, target, variant) -> tuple[int, ...] | None:
    """The invocation tokens of a layer's settings, after PEFT's limits (linear layers, no DoRA)."""
    tokens = invocation(config)
    if tokens is None:
        return None
    if getattr(variant, "moves_base_weight", False):  # Delta-LoRA
        raise AdaptkitError(f"aLoRA with {variant.name} is not supported: it changes W itself, for every token")
    if target.kind != "linear":
        raise AdaptkitError(f"{path}: aLoRA adapts linear layers only (as in PEFT), not {target.kind} layers")
    if config["use_dora"]:
        raise AdaptkitError("aLoRA with use_dora is not supported (PEFT refuses the combination)")
    if config["init_lora_weights"] == "pissa":  # W − s·B₀·A₀ would be the base before the invocation too
        raise AdaptkitError("aLoRA with PiSSA init is not supported: tokens before the invocation would not see W")
    return tokens


class Activated:
    """aLoRA's hooks on `lora.LoRA` (a mixin, kept apart so each file stays small): merges refused
    (`MergeCheck`), the model's input_ids read before each call (`ReadsInputs`)."""

    def check_mergeable(self, adapter) -> None:
        refuse_merge(adapter.config)

    def reads_inputs(self, config) -> bool:
        return invocation(config) is not None

    def read_inputs(self, config, args: tuple, kwargs, previous: Any) -> list[int | None] | str | None:
        return read_offsets(config, args, kwargs, previous)

    def check_generate(self, config, num_beams: int) -> None:
        if num_beams > 1 and invocation(config) is not None:  # PEFT: "Beam search not yet supported for aLoRA."
            raise AdaptkitError(f"beam search (num_beams={num_beams}) is not supported for aLoRA (as in PEFT): "
                                "generate with num_beams=1")


def _cached(kwargs) -> int:
    """How many tokens the call's KV cache holds already (0: a call that starts a sequence)."""
    past = kwargs.get("past_key_values")
    if past is None:
        return 0
    if hasattr(past, "get_seq_length"):  # transformers' Cache objects
        return int(past.get_seq_length())
    return int(past[0][0].shape[-2]) if len(past) else 0  # the legacy tuple of (key, value) per layer


def read_offsets(config, args: tuple, kwargs, previous: Any) -> list[int | None] | str | None:
    """Per row of this call's input_ids, how many of the last tokens the branch acts on (None: none); a
    message instead where they cannot be known (see `forward`), None without input_ids."""
    import torch

    ids = kwargs.get("input_ids", args[0] if args else None)
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.dim() not in (1, 2):
        return None
    ids = ids.unsqueeze(0) if ids.dim() == 1 else ids  # one sequence, as PEFT's generate reads it
    starts = last_starts(ids, torch.tensor(invocation(config), device=ids.device))
    width = ids.shape[1]
    found = [None if s is None else width - s for s in starts]
    if not _cached(kwargs):
        return found
    if not isinstance(previous, list) or len(previous) != len(found):
        return (f"aLoRA: this call continues a cached sequence of {len(found)} rows, but the call before had "
                f"{'no input_ids' if not isinstance(previous, list) else f'{len(previous)} rows'}")
    return [f if f is not None else (width if p is not None else None) for f, p in zip(found, previous)]


def last_starts(ids: torch.Tensor, tokens: torch.Tensor) -> list[int | None]:
    """Per row, the index where the last occurrence of `tokens` starts, or None."""
    import torch

    n, width = len(tokens), ids.shape[1]
    if width < n:
        return [None] * ids.shape[0]
    hits = (ids.unfold(1, n, 1) == tokens).all(-1)  # rows × (width − n + 1)
    index = torch.arange(hits.shape[1], device=ids.device)
    last = torch.where(hits, index, -1).amax(1)
    return [None if s < 0 else int(s) for s in last.tolist()]


def _recorded(branch) -> list[int | None] | None:
    last = _LAST.get(branch)
    if last is None:
        return None
    if last["clash"]:
        raise AdaptkitError("aLoRA with gradient checkpointing needs one forward per backward (as in PEFT): two "
                            "forwards with different invocation offsets came before this backward")
    last["taken"] = True
    return last["offsets"]


def forward(branch, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """The layer output with s·B·A·dropout(x) (+ s·β with `lora_bias`) added on the active tokens only."""
    import torch
    import torch.nn.functional as F

    offsets = branch.inputs
    if offsets is None and torch._C._current_graph_task_id() != -1:  # run again in backward (checkpointing)
        offsets = _recorded(branch)
    elif isinstance(offsets, list) and torch.is_grad_enabled():
        last = _LAST.get(branch)
        clash = last is not None and not last["taken"] and last["offsets"] != offsets
        _LAST[branch] = {"offsets": offsets, "taken": False, "clash": clash}
    if not isinstance(offsets, list):
        raise AdaptkitError(offsets or NO_INPUTS)
    rows, width = result.shape[0], result.shape[1] if result.dim() == 3 else 1
    if len(offsets) != rows:
        raise AdaptkitError(f"aLoRA: the model got {len(offsets)} rows of input_ids, but a layer got {rows} rows")
    ends = torch.tensor([0 if o is None else min(o, width) for o in offsets], device=result.device)
    active = (torch.arange(width, device=result.device)[None] >= (width - ends)[:, None]).reshape(-1)
    picked = active.nonzero().squeeze(1)
    s, p = branch.settings, branch.params
    a, b = p["lora_A"], p["lora_B"]
    inner = x.reshape(-1, x.shape[-1])[picked].to(a.dtype)
    inner = F.dropout(inner, s["dropout"], branch.training) if s["dropout"] else inner
    change = F.linear(F.linear(inner, a), b, p["lora_B_bias"] if "lora_B_bias" in p else None) * s["scaling"]
    flat = result.reshape(-1, result.shape[-1])
    return flat.index_add(0, picked, change.to(flat.dtype)).reshape(result.shape)
