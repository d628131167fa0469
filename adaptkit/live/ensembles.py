"""Ensembles: the outputs of several adapters on one base model combined (their outputs, not their weights).

    ens = adaptkit.ensemble(model, ["sent-a/", "sent-b/"], weights=[0.7, 0.3], combine="probs")
    probs = ens(**batch)             # the combined output: (B, classes) or, for a causal LM, (B, L, vocab)
    logits = ens.members(**batch)    # (N, B, ...): each adapter's own logits, from the same single pass

With weights w normalized to sum 1 and zᵢ adapter i's logits, `combine` is
- "logits": Σ wᵢ·zᵢ, the weighted mean of the logits;
- "probs":  Σ wᵢ·softmax(zᵢ), the weighted mean of the probabilities (the output is probabilities);
- "vote":   Σ wᵢ·onehot(argmax zᵢ), each class's share of the weighted vote; its argmax is the
            weighted majority, a tie going to the lowest class index (torch.argmax's rule).
A causal LM's logits are combined per token the same way.

The adapters share the base: the batch is repeated once per adapter along its rows and one forward
pass runs adapter i alone on block i (`routing.by_rows`), so memory holds one base model and N
adapters, and the base's weights are read once per layer for all N.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import AdaptkitError
from .adapters import Adapters
from .routing import by_rows, check_routable

COMBINES = ("logits", "probs", "vote")


def check_weights(weights: Sequence[float] | None, count: int) -> torch.Tensor:
    """The ensemble weights normalized to sum 1 (uniform for None); count, sign and sum checked."""
    if weights is None:
        return torch.full((count,), 1.0 / count, dtype=torch.float64)
    weights = list(weights)
    if len(weights) != count:
        raise AdaptkitError(f"{len(weights)} weight(s) given for {count} adapters; give one weight per adapter")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise AdaptkitError(f"ensemble weights must be finite numbers ≥ 0, got {w!r}")
    if sum(weights) <= 0:
        raise AdaptkitError("the ensemble weights sum to 0; give at least one a positive weight")
    found = torch.tensor(weights, dtype=torch.float64)
    return found / found.sum()


def combine_outputs(logits: torch.Tensor, weights: torch.Tensor, combine: str = "logits") -> torch.Tensor:
    """Combine N adapters' logits (N, ..., classes) into one (..., classes) as `combine` says (module docstring)."""
    if combine not in COMBINES:
        raise AdaptkitError(f"unknown combine '{combine}' (known: {', '.join(COMBINES)})")
    if weights.shape != (logits.shape[0],):
        raise AdaptkitError(f"{weights.numel()} weight(s) for the logits of {logits.shape[0]} adapters")
    z = logits.float()
    if combine == "probs":
        z = torch.softmax(z, dim=-1)
    elif combine == "vote":
        z = nn.functional.one_hot(z.argmax(-1), z.shape[-1]).to(z.dtype)
    w = weights.to(device=z.device, dtype=z.dtype).reshape(-1, *[1] * (z.dim() - 1))
    return (w * z).sum(0)


class Ensemble:
    """Adapters `names` on `model`, combined: calling it runs the model once over the repeated batch."""

    def __init__(self, model: nn.Module, names: Sequence[str], weights: Sequence[float] | None = None,
                 combine: str = "logits"):
        if combine not in COMBINES:
            raise AdaptkitError(f"unknown combine '{combine}' (known: {', '.join(COMBINES)})")
        if len(set(names)) != len(names):
            raise AdaptkitError(f"an ensemble takes each adapter once, got {list(names)}")
        self.model, self.handle = model, Adapters.of(model)
        self.names, self.combine = list(names), combine
        self.weights = check_weights(weights, len(self.names))
        for name in self.names:  # what cannot be routed by rows is refused now, before any call
            check_routable(self.handle, name)

    def members(self, *args: Any, **inputs: Any) -> torch.Tensor:
        """Each adapter's logits on the batch, stacked (N, B, ...), from one forward pass."""
        tensors = [v for v in (*args, *inputs.values()) if isinstance(v, torch.Tensor)]
        if not tensors or tensors[0].dim() == 0:
            raise AdaptkitError("an ensemble is called with the model's batched tensor inputs (input_ids, ...)")
        rows, n = tensors[0].shape[0], len(self.names)
        if any(t.dim() == 0 or t.shape[0] != rows for t in tensors):
            raise AdaptkitError(f"every tensor input of an ensemble call needs the batch's {rows} rows first")
        def repeat(value: Any) -> Any:  # the whole batch once per adapter, block after block
            return torch.cat([value] * n) if isinstance(value, torch.Tensor) else value

        with by_rows(self.handle, self.names, rows):
            out = self.model(*map(repeat, args), **{k: repeat(v) for k, v in inputs.items()})
        logits = getattr(out, "logits", out)
        logits = logits[0] if isinstance(logits, (tuple, list)) else logits
        return logits.reshape(n, rows, *logits.shape[1:])

    def __call__(self, *args: Any, **inputs: Any) -> torch.Tensor:
        return combine_outputs(self.members(*args, **inputs), self.weights, self.combine)


def ensemble(model: nn.Module, adapters: Sequence[str | Path], weights: Sequence[float] | None = None,
             combine: str = "logits", *, allow_pickle: bool = False) -> Ensemble:
    """An `Ensemble` of `adapters` on `model`: each is the name of an adapter already on it, or a saved
    adapter (a folder, a Hub ref) loaded onto it now under the name "ensemble<i>"."""
    if len(adapters) < 1:
        raise AdaptkitError("an ensemble needs at least one adapter")
    handle, names, loaded = Adapters.of(model), [], []
    try:
        for adapter in adapters:
            if isinstance(adapter, str) and adapter in handle.adapters:
                names.append(adapter)
                continue
            name = next(f"ensemble{j}" for j in range(len(handle.adapters) + 1) if f"ensemble{j}" not in handle.adapters)
            handle.load(adapter, name, allow_pickle=allow_pickle)
            names.append(name)
            loaded.append(name)
        return Ensemble(model, names, weights, combine)
    except Exception:
        for name in reversed(loaded):  # a refused ensemble leaves the model as it was
            handle.remove(name)
        raise


def average_saved(handle: Adapters, names: Sequence[str], weights: torch.Tensor, into: str) -> list[str]:
    """Give adapter `into` every module the adapters `names` train whole (modules_to_save), as the weighted
    mean Σ wᵢ·Mᵢ of their copies (the original module where adapter i has none): the linear weight merge
    of those modules, which an adapter → adapter merge leaves out. Returns their paths."""
    paths = sorted({p for n in names for p in handle.adapters[n].saved} - set(handle.adapters[into].saved))
    for path in paths:
        module = handle.model.get_submodule(path)
        states = [(module.copies[n] if n in module.copies else module.original).state_dict() for n in names]
        merged = {}
        for key, first in states[0].items():
            if first.is_floating_point():
                merged[key] = sum(float(w) * s[key].double() for w, s in zip(weights, states)).to(first.dtype)
            elif all(torch.equal(first, s[key]) for s in states):
                merged[key] = first
            else:
                raise AdaptkitError(f"{path}.{key}: the adapters hold different non-float values; they cannot be averaged")
        module.add(into).load_state_dict(merged)
        handle.adapters[into].saved.append(path)
    return paths
