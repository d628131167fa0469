"""Model Stock: average fine-tuned models and move toward the base by their spread in angle."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ._base import Operator, frozen


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
        if not filter_wise:
            base, tensors = base.reshape(-1), [w.reshape(-1) for w in tensors]
        elif base.dim() == 1:
            base, tensors = base.unsqueeze(0), [w.unsqueeze(0) for w in tensors]
        t = interpolation_ratio([w - base for w in tensors]).unsqueeze(-1)
        average = sum(tensors) / len(tensors)
        return (t * average + (1 - t) * base).reshape(shape)


def interpolation_ratio(offsets: Sequence[torch.Tensor]) -> torch.Tensor:
    """Model Stock's t from the mean pairwise cosine of the offsets (along the last axis)."""
    cosines = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            norms = torch.norm(offsets[i], dim=-1) * torch.norm(offsets[j], dim=-1)
            cosines.append(((offsets[i] * offsets[j]).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0)
    count = len(offsets)
    denominator = 1 + (count - 1) * cos
    # At the singularity there is no finite estimate; keeping the base is the safe choice.
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    return torch.where(singular, torch.zeros_like(cos), count * cos / safe)


MODEL_STOCK = ModelStock()
