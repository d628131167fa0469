"""Model Stock: average fine-tuned models and move toward the base by their spread in angle."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ._base import Operator, frozen

BLOCK = 1 << 20  # elements per block (of rows with filter_wise)


class ModelStock(Operator):
    """Model Stock: average the fine-tuned models, then interpolate toward the base by their angle.

    τᵢ = θᵢ − θ₀,  cos φ = mean over pairs i < j of ⟨τᵢ, τⱼ⟩ / max(‖τᵢ‖·‖τⱼ‖, 1e-6) (clamped to [−1, 1]),
    t = N·cos φ / (1 + (N − 1)·cos φ),  θ = t·(1/N)·Σᵢ θᵢ + (1 − t)·θ₀,
    with t = 0 (keep the base) where |1 + (N − 1)·cos φ| < 1e-6, as mergekit's `model_stock`.
    The angle is one per tensor, or one per row of the last axis with `filter_wise: true`
    (a 1-D tensor is then still one vector). Needs a base and at least 2 fine-tuned models.
    Jang, Yun, Han 2024, "Model Stock: All we need is just a few fine-tuned models", arXiv 2403.19522.

    Computed in the inputs' dtype with mergekit 0.1.5's operations in its order (no upcast: in
    bfloat16 every step rounds to bfloat16), so that inputs in any dtype give its bytes.
    """

    name = "model_stock"
    params = frozen({"filter_wise": False})
    # mergekit's recipes (and its tests) give every model a `weight`; Model Stock derives its own mix.
    ignored_params = frozenset({"weight"})

    def merge(self, tensors: Sequence[torch.Tensor], base: torch.Tensor | None = None, **params: Any) -> torch.Tensor:
        self.check_inputs(tensors, minimum=2)
        base = self.need_base(base, tensors)
        filter_wise = self.flag("filter_wise", self.bind(params, len(tensors))["filter_wise"])
        shape = base.shape
        if filter_wise and base.dim() > 1:
            # Memory (issue 15): one t per row, so blocks of rows go through the whole formula at a time.
            rows, width = math.prod(shape[:-1]), shape[-1]
            base, tensors = base.reshape(rows, width), [w.reshape(rows, width) for w in tensors]
            out = torch.empty_like(base)
            step = max(1, BLOCK // width)
            for s in range(0, rows, step):
                part, ends = base[s:s + step], [w[s:s + step] for w in tensors]
                t = interpolation_ratio(lambda i, out: torch.sub(ends[i], part, out=out), len(ends)).unsqueeze(-1)  # noqa: B023
                out[s:s + step] = mix(t, ends, part)
            return out.reshape(shape)
        base, tensors = base.reshape(1, -1), [w.reshape(1, -1) for w in tensors]
        if not filter_wise:
            base, tensors = base[0], [w[0] for w in tensors]
        # One angle for the whole tensor: only two task vectors exist at a time (each made again when
        # needed, the same values), and the mix runs in blocks into one buffer.
        t = interpolation_ratio(lambda i, out: torch.sub(tensors[i], base, out=out), len(tensors)).unsqueeze(-1)
        out = torch.empty_like(base)
        for s in range(0, base.shape[-1], BLOCK):
            out[..., s:s + BLOCK] = mix(t, [w[..., s:s + BLOCK] for w in tensors], base[..., s:s + BLOCK])
        return out.reshape(shape)


def mix(t: torch.Tensor, tensors: Sequence[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """t·(1/N)·Σᵢ θᵢ + (1 − t)·θ₀, in mergekit's operations."""
    average = sum(tensors) / len(tensors)
    return t * average + (1 - t) * base


def interpolation_ratio(offset: Callable[[int, torch.Tensor | None], torch.Tensor], count: int) -> torch.Tensor:
    """Model Stock's t from the mean pairwise cosine of the offsets, i < count (along the last axis);
    `offset(i, out)` writes offset i into `out` (None: a new tensor) and returns it. Three buffers serve
    every pair: tensor-sized temporaries made afresh are paged in afresh, and were 8 per tensor."""
    cosines, norm = [], {}  # each offset's norm taken once (the same values wherever it is taken)
    first = other = product = None
    for i in range(count - 1):
        first = offset(i, first)
        if i not in norm:
            norm[i] = torch.norm(first, dim=-1)
        for j in range(i + 1, count):
            other = offset(j, other)
            if j not in norm:
                norm[j] = torch.norm(other, dim=-1)
            norms = norm[i] * norm[j]
            product = torch.mul(first, other, out=product)
            cosines.append((product.sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0)
    denominator = 1 + (count - 1) * cos
    # At the singularity there is no finite estimate; keeping the base is the safe choice.
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    return torch.where(singular, torch.zeros_like(cos), count * cos / safe)


MODEL_STOCK = ModelStock()
