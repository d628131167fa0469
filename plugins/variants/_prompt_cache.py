"""Prompt learning under a KV cache (transformers' `generate`), as PEFT's `prepare_inputs_for_generation`.

`generate` runs the prompt once on an empty cache, then each new token alone on the cache. The virtual
tokens join on the first call only, so they land in the cache once: prompt tuning's P goes in front of
the prompt's embeddings (its keys and values are cached with the prompt's); prefix tuning's keys and
values are written into the empty cache. A later call brings only its new tokens: its attention mask,
which counts the real tokens, gets the n ones in front, and the positions are as in the first call
(prompt tuning: dropped, the model counts them from the cache; prefix tuning: the given ones + n). A
cache that already holds tokens is taken to be one this adapter began (as PEFT takes it); a 2-D mask
that does not leave room for the n cached virtual tokens shows it is not, and is refused by name.
"""
from __future__ import annotations

from typing import Any

from adaptkit.plugin import AdaptkitError


def continues(name: str, n: int, kwargs: dict[str, Any]) -> bool:
    """Whether the call continues a cached sequence (its n virtual tokens already in the cache)."""
    cache = kwargs.get("past_key_values")
    if cache is None or kwargs.get("use_cache") is False:  # uncached generate hands back the last call's cache
        return False
    if not hasattr(cache, "get_seq_length"):
        raise AdaptkitError(f"{name}: past_key_values as a {type(cache).__name__} (a legacy cache) is not supported; "
                            "pass a transformers Cache")
    seen = cache.get_seq_length()
    if not seen:
        return False
    given = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
    mask = kwargs.get("attention_mask")
    if given is not None and mask is not None and mask.dim() == 2 and mask.shape[1] + n != seen + given.shape[1]:
        raise AdaptkitError(f"{name}: the cache holds {seen} positions and the call adds {given.shape[1]}, but its "
                            f"attention mask covers {mask.shape[1]}, not {seen + given.shape[1] - n}: a cache this "
                            f"adapter's {n} virtual tokens did not begin")
    return True


def continued(kwargs: dict[str, Any], n: int, *, shift: bool) -> dict[str, Any]:
    """A later call of a cached sequence: mask with n ones in front; positions shifted by n or dropped."""
    kwargs = pad(kwargs, n, labels=False)  # the logits cover the new tokens alone: labels stay
    if kwargs.get("position_ids") is not None:
        kwargs["position_ids"] = kwargs["position_ids"] + n if shift else None
    return kwargs


def prefix_cache(kwargs: dict[str, Any], kv: list[tuple[Any, Any]]):
    """The prefix's keys and values as the call's cache: written into the empty one `generate` passed (it
    keeps that object), else (none, or a call without caching) a new dynamic cache."""
    from transformers import DynamicCache

    cache = kwargs.get("past_key_values")
    if cache is None or kwargs.get("use_cache") is False:
        return DynamicCache(kv)
    if not isinstance(cache, DynamicCache):
        raise AdaptkitError(f"prefix tuning with a {type(cache).__name__} is not supported; use the default dynamic "
                            "cache")
    for layer, (k, v) in enumerate(kv):
        cache.update(k, v, layer)
    return cache


def pad(kwargs: dict[str, Any], n: int, labels: bool = True) -> dict[str, Any]:
    """The attention mask with n ones in front, labels with n × −100 (the virtual tokens predict nothing)."""
    import torch

    kwargs = dict(kwargs)
    for key, fill in (("attention_mask", 1), ("labels", -100))[:2 if labels else 1]:
        if kwargs.get(key) is not None:
            t = kwargs[key]
            kwargs[key] = torch.cat([torch.full((t.shape[0], n), fill, dtype=t.dtype, device=t.device), t], dim=1)
    return kwargs
