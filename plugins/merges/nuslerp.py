"""NuSLERP: spherical interpolation of two models (or of their task vectors), per tensor or per row."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ._base import Operator, frozen

# mergekit's constants: 1 − cos²Ω ≤ PARALLEL² counts as parallel (plain lerp there), and a vector
# is divided by max(‖v‖, NORM_FLOOR) so that a zero vector stays zero.
PARALLEL = 1e-8
NORM_FLOOR = 1e-7


class NuSlerp(Operator):
    """Spherical interpolation of two models with t from their weights, optionally around a base.

    t = w₂ / (w₁ + w₂)  (t = ½ where |w₁ + w₂| < 1e-6);  for each vector pair (a, b):
    â = a / max(‖a‖, 1e-7),  cos Ω = clamp(⟨â, b̂⟩, −1, 1),
    slerp(a, b) = (sin((1 − t)·Ω)·a + sin(t·Ω)·b) / sin Ω,  or (1 − t)·a + t·b where 1 − cos²Ω ≤ 1e-16.
    Without a base, a and b are the two models; with one, θ = θ₀ + slerp(θ₁ − θ₀, θ₂ − θ₀)
    (the task vectors are interpolated). The vectors are the whole tensor flattened
    (`nuslerp_flatten`, default true), else the rows along the last axis, or along the first axis
    with `nuslerp_row_wise: true` (mergekit's names: for a 2-D weight that is its columns).
    Unlike `slerp`, the interpolated vectors keep their own norms (no renormalization).
    Parameters as mergekit's `nuslerp`: `weight` (per model, required), `nuslerp_row_wise`
    (default false), `nuslerp_flatten` (default true); the operations run in mergekit's order in the
    inputs' dtype, so bf16 inputs give mergekit's bytes.
    Shoemake 1985, "Animating rotation with quaternion curves" (SIGGRAPH); Goddard et al. 2024,
    "Arcee's MergeKit", arXiv 2403.13257.
    """

    name = "nuslerp"
    params = frozen({"weight": None, "nuslerp_row_wise": False, "nuslerp_flatten": True})
    per_model = frozenset({"weight"})

    def merge(self, tensors: Sequence[torch.Tensor], base: torch.Tensor | None = None, **params: Any) -> torch.Tensor:
        if len(tensors) != 2:
            raise self.error(f"needs exactly 2 input models besides the base, got {len(tensors)}")
        self.check_inputs(tensors)
        bound = self.bind(params, len(tensors))
        weights = [self.real("weight", w) for w in bound["weight"]]
        row_wise = self.flag("nuslerp_row_wise", bound["nuslerp_row_wise"])
        flatten = self.flag("nuslerp_flatten", bound["nuslerp_flatten"])
        total = sum(weights)
        t = 0.5 if abs(total) < 1e-6 else weights[1] / total
        axis = 0 if row_wise else -1
        if base is None:
            return spherical(tensors[0], tensors[1], t, axis=axis, flatten=flatten)
        base = self.need_base(base, tensors)
        return base + spherical(tensors[0] - base, tensors[1] - base, t, axis=axis, flatten=flatten)


def spherical(a: torch.Tensor, b: torch.Tensor, t: float, *, axis: int, flatten: bool) -> torch.Tensor:
    """slerp(a, b, t) of the vectors along `axis` (or of the whole tensors flattened), shaped like a."""
    shape = a.shape
    if flatten:
        a, b = a.reshape(-1), b.reshape(-1)
    elif axis != -1:
        a, b = a.transpose(axis, -1), b.transpose(axis, -1)
    unit_a = a / torch.linalg.vector_norm(a, dim=-1, keepdim=True).clamp(min=NORM_FLOOR)
    unit_b = b / torch.linalg.vector_norm(b, dim=-1, keepdim=True).clamp(min=NORM_FLOOR)
    cos = torch.sum(unit_a * unit_b, dim=-1, keepdim=True).clamp(-1, 1)
    parallel = (1 - cos.square()) <= PARALLEL**2
    # acos of a stand-in 0 where parallel: the spherical branch stays finite there, then is replaced.
    omega = torch.acos(torch.where(parallel, 0, cos))
    curved = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)
    out = torch.where(parallel, (1 - t) * a + t * b, curved)
    if axis != -1 and not flatten:
        out = out.transpose(axis, -1)
    return out.reshape(shape)


NUSLERP = NuSlerp()
