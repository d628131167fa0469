"""Concatenation of low-rank factors: the exact merge of adapters into one adapter.

    ΔW = Σᵢ wᵢ·sᵢ·Bᵢ·Aᵢ = [w₁s₁B₁ | w₂s₂B₂ | …] · [A₁; A₂; …]

so stacking the A factors by rows and the scaled B factors by columns gives an adapter of rank
Σᵢ rᵢ with scale 1 that reproduces the weighted sum of the inputs' updates exactly. This needs the
inputs' factors, not their tensors at one position: the adapter-output engine
(`adaptkit.merge.to_adapter`) hands them to `merge_factors`; as a tensor operator (a model output)
it refuses.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from adaptkit.plugin import AdaptkitError

from ._base import Operator, frozen


class Concat(Operator):
    """Concatenate adapters' low-rank factors: exact, output rank = Σ input ranks (adapter output only).

    ΔW = [w₁s₁B₁ | w₂s₂B₂ | …]·[A₁; A₂; …] = Σᵢ wᵢ·sᵢ·Bᵢ·Aᵢ. Parameter: `weight` (per model, required).
    """

    name = "concat"
    params = frozen({"weight": None})
    per_model = frozenset({"weight"})

    def merge_factors(self, factors: Sequence[tuple[torch.Tensor, torch.Tensor, float] | None],
                      **params: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of one module from each input's (Aᵢ, Bᵢ, sᵢ), ΔWᵢ = sᵢ·Bᵢ·Aᵢ (None where an input
        lacks the module): A = [A₁; A₂; …], B = [w₁s₁B₁ | w₂s₂B₂ | …], so B·A = Σᵢ wᵢ·ΔWᵢ."""
        weights = [self.real("weight", w) for w in self.bind(params, len(factors))["weight"]]
        present = [(f, w) for f, w in zip(factors, weights) if f is not None]
        return (torch.cat([a for (a, _, _), _ in present], dim=0),
                torch.cat([b * (w * s) for (_, b, s), w in present], dim=1))

    def merge(self, tensors: Sequence[torch.Tensor], base: torch.Tensor | None = None, **params: Any) -> torch.Tensor:
        raise AdaptkitError("concat works on LoRA factors: merge adapters into an adapter (output kind adapter)")


CONCAT = Concat()
