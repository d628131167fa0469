"""NuSLERP: spherical interpolation of two models (or of their task vectors), per tensor or per row."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ._base import Operator, frozen
from ._split import whole_sum
from ._select import block_ranges

# mergekit's constants: 1 − cos²Ω ≤ PARALLEL² counts as parallel (plain lerp there), and a vector
# is divided by max(‖v‖, NORM_FLOOR) so that a zero vector stays zero.
PARALLEL = 1e-8
NORM_FLOOR = 1e-7
BLOCK = 1 << 20  # elements per block of vectors (or of the flattened tensor)


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
        if base is not None:
            base = self.need_base(base, tensors)
        if flatten or tensors[0].dim() < 2:
            return whole(tensors[0], tensors[1], base, t)
        # Memory (issue 15): each vector's result depends on that vector alone, so blocks of whole
        # vectors (rows, or columns with nuslerp_row_wise) go through at a time; the task vectors exist
        # block by block only.
        a, b = tensors
        out = torch.empty_like(a)
        width = a.numel() // a.shape[-1] if row_wise else a.numel() // a.shape[0]  # elements per slice
        step = max(1, BLOCK // width)
        for s in range(0, a.shape[-1] if row_wise else a.shape[0], step):
            cut = (..., slice(s, s + step)) if row_wise else slice(s, s + step)
            one, two = a[cut], b[cut]
            if base is not None:
                one, two = one - base[cut], two - base[cut]
            merged = spherical(one, two, t, axis=axis, flatten=False)
            out[cut] = merged if base is None else base[cut] + merged
        return out


def whole(a: torch.Tensor, b: torch.Tensor, base: torch.Tensor | None, t: float) -> torch.Tensor:
    """`spherical` of the whole tensors flattened (θ₀ + that of the task vectors with a base): the
    norms and cos Ω need the whole vectors; the rest runs in blocks into one buffer, in the same
    operations (measured on a 32000 × 1024 bf16 embedding with a base: 3 tensors' worth of memory
    besides the inputs, against 8 when every step made a whole tensor)."""
    shape = a.shape
    a, b = a.reshape(-1), b.reshape(-1)
    if base is not None:
        flat_base = base.reshape(-1)
        a, b = a - flat_base, b - flat_base
    blocks = block_ranges(a.numel(), BLOCK)
    norm_a = torch.linalg.vector_norm(a, dim=-1, keepdim=True).clamp(min=NORM_FLOOR)
    norm_b = torch.linalg.vector_norm(b, dim=-1, keepdim=True).clamp(min=NORM_FLOOR)
    product = a / norm_a
    for s, e in blocks:  # (in place: the same rounding as unit_a * unit_b)
        product[s:e].mul_(b[s:e] / norm_b)
    cos = whole_sum(product, keepdim=True).clamp(-1, 1)  # (split as the command's threads split it: any --threads)
    del product
    parallel = (1 - cos.square()) <= PARALLEL**2
    omega = torch.acos(torch.where(parallel, 0, cos))
    first, second, sin = torch.sin((1 - t) * omega), torch.sin(t * omega), torch.sin(omega)
    out = a if base is not None else torch.empty_like(a)  # a's block is read before it is overwritten
    for s, e in blocks:
        one, two = a[s:e], b[s:e]
        merged = (1 - t) * one + t * two if parallel.item() else (first * one + second * two) / sin
        torch.add(flat_base[s:e], merged, out=out[s:e]) if base is not None else out[s:e].copy_(merged)
    return out.view(shape)


def spherical(a: torch.Tensor, b: torch.Tensor, t: float, *, axis: int, flatten: bool) -> torch.Tensor:
    """slerp(a, b, t) of the vectors along `axis` (or of the whole tensors flattened), shaped like a."""
    shape = a.shape
    if flatten:
        a, b = a.reshape(-1), b.reshape(-1)
    elif axis != -1:
        a, b = a.transpose(axis, -1), b.transpose(axis, -1)
    unit_a = a / torch.linalg.vector_norm(a, dim=-1, keepdim=True).clamp(min=NORM_FLOOR)
    unit_b = b / torch.linalg.vector_norm(b, dim=-1, keepdim=True).clamp(min=NORM_FLOOR)
    cos = whole_sum(unit_a * unit_b, keepdim=True).clamp(-1, 1)
    parallel = (1 - cos.square()) <= PARALLEL**2
    # acos of a stand-in 0 where parallel: the spherical branch stays finite there, then is replaced.
    omega = torch.acos(torch.where(parallel, 0, cos))
    curved = (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)
    out = torch.where(parallel, (1 - t) * a + t * b, curved)
    if axis != -1 and not flatten:
        out = out.transpose(axis, -1)
    return out.reshape(shape)


NUSLERP = NuSlerp()
