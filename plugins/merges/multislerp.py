"""Multi-SLERP: a weighted spherical mean of any number of models (or task vectors), one step."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ._base import Operator, frozen


class MultiSlerp(Operator):
    """Barycentric interpolation on the hypersphere: one tangent-space step at the weighted mean.

    With each input flattened to xᵢ (xᵢ = θᵢ − θ₀ with a base), weights wᵢ (÷ Σⱼ wⱼ with
    `normalize_weights`, default true) and ε = `eps` (default 1e-8):
    uᵢ = xᵢ / (‖xᵢ‖ + ε),  m = Σᵢ wᵢ·uᵢ / ‖Σᵢ wᵢ·uᵢ‖,
    vᵢ = uᵢ − ⟨uᵢ, m⟩·m  (tangent at m),  v = Σᵢ wᵢ·vᵢ,  s = ‖v‖ + ε,
    x = (m·cos s + v·sin s / s) · Σᵢ wᵢ·‖xᵢ‖,  θ = x (+ θ₀ with a base).
    One input is returned as it is. Where ‖Σᵢ wᵢ·uᵢ‖ < ε (antipodal inputs) two inputs fall back to
    Σᵢ wᵢ·xᵢ (+ θ₀) and more are an error, as in mergekit's `multislerp`, whose parameters these are:
    `weight` (per model, required), `normalize_weights`, `eps`. The weights are cast to the inputs'
    dtype and every step runs in mergekit's order in that dtype, so bf16 inputs give its bytes.
    Refused: weights whose sum is zero with `normalize_weights` (mergekit divides by it) and a
    negative `eps`.
    Goddard 2024, "Multi-SLERP" (goddard.blog/posts/multislerp-wow-what-a-cool-idea), in mergekit
    (Goddard et al. 2024, arXiv 2403.13257); Buss & Fillmore 2001, "Spherical averages and
    applications to spherical splines and interpolation", ACM Transactions on Graphics 20(2).
    """

    name = "multislerp"
    params = frozen({"weight": None, "normalize_weights": True, "eps": 1e-8})
    per_model = frozenset({"weight"})

    def merge(self, tensors: Sequence[torch.Tensor], base: torch.Tensor | None = None, **params: Any) -> torch.Tensor:
        self.check_inputs(tensors)
        bound = self.bind(params, len(tensors))
        weight_values = [self.real("weight", w) for w in bound["weight"]]
        normalize = self.flag("normalize_weights", bound["normalize_weights"])
        eps = self.real("eps", bound["eps"])
        if eps < 0:
            raise self.error(f"eps must be ≥ 0, got {eps}")
        if base is not None:
            base = self.need_base(base, tensors)
        if len(tensors) == 1:
            return tensors[0].clone()
        stacked = torch.stack(list(tensors))
        if base is not None:
            stacked -= base
        flat = stacked.view(len(tensors), -1)
        weights = torch.tensor(weight_values, dtype=stacked.dtype, device=stacked.device)
        if normalize:
            total = weights.sum()
            if total == 0:
                raise self.error(f"weights {weight_values} sum to zero; cannot normalize (set normalize_weights: false)")
            weights = weights / total
        norms = torch.linalg.vector_norm(flat, dim=-1, keepdim=True)
        units = flat / (norms + eps)
        mean = (units * weights.view(-1, 1)).sum(0)
        mean_norm = torch.linalg.vector_norm(mean)
        if mean_norm < eps:
            if len(tensors) != 2:
                raise self.error("the weighted mean of the inputs' directions is zero (antipodal inputs with "
                                 "balancing weights); change the weights")
            out = (stacked[0] * weights[0] + stacked[1] * weights[1]).view(stacked.shape[1:])
            return out + base if base is not None else out
        mean = mean / mean_norm
        tangents = units - (units * mean).sum(-1, keepdim=True) * mean
        step = (tangents * weights.view(-1, 1)).sum(0)
        length = torch.linalg.vector_norm(step) + eps
        out = mean * torch.cos(length) + step * (torch.sin(length) / length)
        out = (out * (norms.squeeze(-1) * weights).sum()).view(stacked.shape[1:])
        return out + base if base is not None else out


MULTISLERP = MultiSlerp()
