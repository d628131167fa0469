"""Spherical linear interpolation (SLERP) between two models, one angle per tensor."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ._base import Operator, frozen
from ._split import whole_sum

# mergekit's constants: above this |cos Ω| the two tensors count as parallel (or antiparallel)
# and the division by sin Ω would only amplify rounding, so plain lerp is used instead.
DOT_THRESHOLD = 0.9995
# A tensor with a norm at most this is treated as zero: it is not normalized (cos Ω = 0).
EPS = 1e-8
# Norms and the dot product are summed over chunks of this many elements, as mergekit does (its
# result depends on the chunking, so the same chunks give its bytes).
CHUNK = 1024 * 1024


class Slerp(Operator):
    """Spherical interpolation between two models, one angle per tensor (lerp when nearly parallel).

    cos Ω = ⟨A/‖A‖, B/‖B‖⟩ (tensors flattened; a norm ≤ 1e-8 is not divided by),
    θ = sin((1 − t)·Ω)/sin Ω · A + sin(t·Ω)/sin Ω · B,
    and θ = (1 − t)·A + t·B when |cos Ω| > 0.9995, exactly as mergekit's `slerp`.
    A and B are the two input models in order; with a base model and a single input, A is the
    base (mergekit's `t = 0` end). Parameter `t` (required).
    Shoemake 1985, "Animating rotation with quaternion curves" (SIGGRAPH); for model merging
    see Goddard et al. 2024, "Arcee's MergeKit", arXiv 2403.13257.
    """

    name = "slerp"
    params = frozen({"t": None})

    def merge(self, tensors: Sequence[torch.Tensor], base: torch.Tensor | None = None, **params: Any) -> torch.Tensor:
        a, b = self.endpoints(tensors, base)
        t = self.real("t", self.bind(params, len(tensors))["t"])
        return slerp(a, b, t)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """slerp(a, b, t) in the dtype of `a`, computed as mergekit 0.1.5's kernel computes it: in float32
    (float64 for float64 inputs) chunk by chunk, ‖·‖ as the norm of the chunks' norms, the angle and
    coefficients as float32 tensors, each element cₐ·a + c_b·b rounded once to the inputs' dtype."""
    dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    x, y = a.reshape(1, -1), b.reshape(1, -1)
    t = torch.tensor([[t]], dtype=dtype, device=a.device)
    if not x.shape[1]:
        return ((1 - t) * x + t * y).reshape(a.shape).to(a.dtype)
    # Each chunk is widened into one of two reused buffers and every step works in place: the same
    # float32 operations on the same chunks as mergekit (so its bytes), 2.5x faster on a 32M-element
    # embedding than fresh temporaries per step (0.35 s -> 0.14 s, one thread, bf16).
    bx = torch.empty((1, min(x.shape[1], CHUNK)), dtype=dtype, device=a.device)
    by = torch.empty_like(bx)

    def widened(s: int) -> tuple[torch.Tensor, torch.Tensor]:
        cx, cy = x[:, s:s + CHUNK], y[:, s:s + CHUNK]
        return bx[:, :cx.shape[1]].copy_(cx), by[:, :cy.shape[1]].copy_(cy)

    chunks = range(0, x.shape[1], CHUNK)
    norms = [[torch.linalg.vector_norm(c, dim=1, keepdim=True) for c in widened(s)] for s in chunks]
    norm_x, norm_y = (torch.linalg.vector_norm(torch.stack(n), dim=0) for n in zip(*norms))
    norm_x = torch.where(norm_x > EPS, norm_x, 1)
    norm_y = torch.where(norm_y > EPS, norm_y, 1)
    # Normalize before the dot product: the raw product of two large tensors can overflow float32.
    dots = []
    for s in chunks:
        cx, cy = widened(s)
        # (a sum to one number, split as the command's threads split it: the same bytes on any --threads)
        dots.append(whole_sum(cx.div_(norm_x).mul_(cy.div_(norm_y)), keepdim=True))
    dot = torch.stack(dots).sum(dim=0).clamp(-1, 1)
    linear = dot.abs() > DOT_THRESHOLD
    omega = torch.acos(torch.where(linear, 0, dot))
    sin_omega = torch.sin(omega)
    coef_a = torch.where(linear, 1 - t, torch.sin((1 - t) * omega) / sin_omega)
    coef_b = torch.where(linear, t, torch.sin(t * omega) / sin_omega)
    out = torch.empty_like(x)
    for s in chunks:
        cx, cy = widened(s)
        out[:, s:s + CHUNK] = cx.mul_(coef_a).add_(cy.mul_(coef_b))
    return out.reshape(a.shape)


SLERP = Slerp()
