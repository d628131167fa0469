"""Variants that read the whole model's inputs before each call (`spec.ReadsInputs`; aLoRA finds, per
row of input_ids, from which token on its branch acts).

One forward pre-hook on the model, there while such an adapter is on it, asks each of them what it
reads of the call (given what it read of the last one, for a call that continues a cached sequence)
and hands that to its branches (`Branch.inputs`); a forward hook sets them back to None after the
call, so a part of the model run on its own never acts on another call's inputs. While they are there,
`model.generate` (transformers') first lets each active such adapter refuse what it cannot follow
(`check_generate`: aLoRA refuses beam search, as PEFT does): the pre-hook sees one call, not the beams.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from .. import spec

if TYPE_CHECKING:
    from torch import nn

    from .adapters import Adapter, Adapters

HOOKS_ATTR = "_adaptkit_input_hooks"


def _reading(handle: Adapters) -> list[Adapter]:
    return [a for a in handle.adapters.values() if isinstance(a.variant, spec.ReadsInputs)
            and a.variant.reads_inputs(a.config)]


def watch_inputs(handle: Adapters) -> None:
    """Put the hooks on `handle.model` while an adapter reads its inputs; take them off once none does."""
    model = handle.model
    hooks = model.__dict__.get(HOOKS_ATTR)
    if _reading(handle) and hooks is None:
        model.__dict__[HOOKS_ATTR] = (
            model.register_forward_pre_hook(lambda m, args, kwargs: _read(handle, args, kwargs), with_kwargs=True),
            model.register_forward_hook(lambda m, args, output: _forget(handle), always_call=True))
        if callable(getattr(type(model), "generate", None)):  # an instance attribute, gone with the hooks
            model.__dict__["generate"] = functools.partial(_generate, handle)
    elif not _reading(handle) and hooks is not None:
        for hook in hooks:
            hook.remove()
        del model.__dict__[HOOKS_ATTR]
        if isinstance(model.__dict__.get("generate"), functools.partial):
            del model.__dict__["generate"]


def _generate(handle: Adapters, *args: Any, **kwargs: Any) -> Any:
    """The model's own `generate`, once every active input-reading adapter accepts its number of beams (given,
    or from the generation config it runs with)."""
    model = handle.model
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    beams = kwargs.get("num_beams") or getattr(config, "num_beams", None) or 1
    for adapter in _reading(handle):
        if adapter.name in handle.active:
            adapter.variant.check_generate(adapter.config, int(beams))
    return type(model).generate(model, *args, **kwargs)


def _read(handle: Adapters, args: tuple, kwargs: dict[str, Any]) -> None:
    for adapter in _reading(handle):
        adapter.inputs = adapter.variant.read_inputs(adapter.config, args, kwargs, adapter.inputs)
        _hand_out(handle.model, adapter, adapter.inputs)


def _forget(handle: Adapters) -> None:
    for adapter in _reading(handle):
        _hand_out(handle.model, adapter, None)


def _hand_out(model: nn.Module, adapter: Adapter, value: Any) -> None:
    for path in adapter.layers:
        model.get_submodule(path).branches[adapter.name].inputs = value
