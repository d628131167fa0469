"""Adapters that change the model's call rather than a layer's output (`spec.RewritesCall`).

Prompt learning prepends virtual tokens to the inputs or gives attention a prefix cache: that
happens before the model runs, to its keyword arguments. One forward pre-hook on the model, there
while such an adapter is on it, hands each active and enabled one the call (positional arguments
bound to their names), as PEFT's `PeftModelForCausalLM.forward` does before calling the base model.
"""
from __future__ import annotations

import functools
import inspect
from typing import TYPE_CHECKING, Any

from .. import spec

if TYPE_CHECKING:
    from torch import nn

    from .adapters import Adapters

HOOK_ATTR = "_adaptkit_call_hook"


def watch_calls(handle: Adapters) -> None:
    """Put the hook on `handle.model` while an adapter rewrites its call; take it off once none does."""
    model = handle.model
    rewriting = any(isinstance(a.variant, spec.RewritesCall) for a in handle.adapters.values())
    hook = model.__dict__.get(HOOK_ATTR)
    if rewriting and hook is None:
        # a partial, not a closure: a deep copy of the model gets a hook bound to its own copy of the handle
        model.__dict__[HOOK_ATTR] = model.register_forward_pre_hook(functools.partial(_rewrite, handle),
                                                                    with_kwargs=True)
    elif not rewriting and hook is not None:
        hook.remove()
        del model.__dict__[HOOK_ATTR]


def _rewrite(handle: Adapters, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
    running = [a for a in (handle.adapters[n] for n in handle.active) if isinstance(a.variant, spec.RewritesCall)
               and not any(model.get_submodule(p).disabled for p in a.layers)]
    if not running:
        return None
    signature = inspect.signature(model.forward)
    call = dict(signature.bind_partial(*args, **kwargs).arguments)
    for param in signature.parameters.values():
        if param.kind is param.VAR_KEYWORD:  # a forward(**kwargs) catch-all, spread back out
            call.update(call.pop(param.name, {}))
    for adapter in running:
        call = adapter.variant.rewrite_call(model, adapter.shared, adapter.config, call)
    return (), call
