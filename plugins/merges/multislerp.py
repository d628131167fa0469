"""Multi-SLERP: a weighted spherical mean of any number of models (or task vectors), one step."""
from __future__ import annotations

from collections.abc import Sequence
from functools import reduce
from typing import Any

import torch

from ._base import Operator, frozen

BLOCK = 1 << 20  # elements per column block of the per-element steps


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
        # Memory (issue 15): the unit vectors are made block by block whenever a step needs them (the same
        # subtraction and division, so the same values) and every per-element step runs over column
        # blocks. The reductions mergekit takes over whole rows (norms, ⟨uᵢ, m⟩) stay whole over an (N, n)
        # buffer, one at a time: with two threads a row summed alone rounds differently from the same row
        # summed within the (N, n) tensor.
        count, shape = len(tensors), tensors[0].shape
        flat = torch.empty(count, tensors[0].numel(), dtype=reduce(torch.promote_types, [t.dtype for t in tensors]))
        rows = [t.reshape(1, -1) for t in tensors]
        flat_base = base.reshape(1, -1) if base is not None else None
        for i, row in enumerate(rows):
            if flat_base is not None:
                torch.sub(row, flat_base, out=flat[i:i + 1])
            else:
                flat[i:i + 1] = row
        weights = torch.tensor(weight_values, dtype=flat.dtype, device=flat.device)
        if normalize:
            total = weights.sum()
            if total == 0:
                raise self.error(f"weights {weight_values} sum to zero; cannot normalize (set normalize_weights: false)")
            weights = weights / total
        column = weights.view(-1, 1)
        blocks = [(s, min(s + BLOCK, flat.shape[1])) for s in range(0, flat.shape[1], BLOCK)]
        norms = torch.linalg.vector_norm(flat, dim=-1, keepdim=True)
        divisor = norms + eps

        def units(s: int, e: int) -> torch.Tensor:
            vectors = torch.cat([row[:, s:e] - flat_base[:, s:e] for row in rows]) if flat_base is not None \
                else torch.cat([row[:, s:e] for row in rows])
            return vectors.div_(divisor)  # (in place: the same rounding as flat / (norms + eps))

        # The first two passes divide the task vectors' buffer (it then holds the products for ⟨uᵢ, m⟩);
        # only the last makes the unit vectors again.
        mean = torch.empty_like(flat[0])
        for s, e in blocks:  # Σᵢ over the stacked rows, per element: the same sums in blocks
            mean[s:e] = (flat[:, s:e] / divisor * column).sum(0)
        mean_norm = torch.linalg.vector_norm(mean)
        if mean_norm < eps:
            if count != 2:
                raise self.error("the weighted mean of the inputs' directions is zero (antipodal inputs with "
                                 "balancing weights); change the weights")
            del mean, flat
            vectors = [t - base if base is not None else t for t in tensors]
            out = (vectors[0] * weights[0] + vectors[1] * weights[1]).view(shape)
            return out + base if base is not None else out
        torch.div(mean, mean_norm, out=mean)
        for s, e in blocks:
            torch.mul(flat[:, s:e] / divisor, mean[s:e], out=flat[:, s:e])
        dots = flat.sum(-1, keepdim=True)
        del flat
        step = torch.empty_like(mean)
        for s, e in blocks:
            torch.sum((units(s, e) - dots * mean[s:e]) * column, 0, out=step[s:e])
        length = torch.linalg.vector_norm(step) + eps
        cos, sin = torch.cos(length), torch.sin(length) / length
        scale = (norms.squeeze(-1) * weights).sum()
        for s, e in blocks:  # the result over the mean's buffer
            out = (mean[s:e] * cos + step[s:e] * sin) * scale
            if flat_base is not None:
                torch.add(out, flat_base[0, s:e], out=mean[s:e])
            else:
                mean[s:e] = out
        return mean.view(shape)


MULTISLERP = MultiSlerp()
