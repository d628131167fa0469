"""Concatenation of low-rank factors: the exact merge of adapters into one adapter.

    ΔW = Σᵢ wᵢ·sᵢ·Bᵢ·Aᵢ = [w₁s₁B₁ | w₂s₂B₂ | …] · [A₁; A₂; …]

so stacking the A factors by rows and the scaled B factors by columns gives an adapter of rank
Σᵢ rᵢ with scale 1 that reproduces the weighted sum of the inputs' updates exactly. This needs the
inputs' factors, not their tensors at one position, so `adaptkit.adapter_merge` does the work for
an adapter output; as a tensor operator (a model output) it refuses.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from adaptkit.errors import AdaptkitError

from ._base import Operator, frozen


class Concat(Operator):
    """Concatenate adapters' low-rank factors: exact, output rank = Σ input ranks (adapter output only).

    ΔW = [w₁s₁B₁ | w₂s₂B₂ | …]·[A₁; A₂; …] = Σᵢ wᵢ·sᵢ·Bᵢ·Aᵢ. Parameter: `weight` (per model, required).
    """

    name = "concat"
    factor_space = True  # the engine hands it the inputs' low-rank factors (adaptkit.adapter_merge)
    params = frozen({"weight": None})
    per_model = frozenset({"weight"})

    def merge(self, tensors: Sequence[torch.Tensor], base: torch.Tensor | None = None, **params: Any) -> torch.Tensor:
        raise AdaptkitError("concat works on LoRA factors: merge adapters into an adapter (output kind adapter)")


CONCAT = Concat()
