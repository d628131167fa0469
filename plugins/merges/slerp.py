"""Spherical linear interpolation (SLERP) between two models, one angle per tensor."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ._base import Operator, frozen

# mergekit's constants: above this |cos Ω| the two tensors count as parallel (or antiparallel)
# and the division by sin Ω would only amplify rounding, so plain lerp is used instead.
DOT_THRESHOLD = 0.9995
# A tensor with a norm at most this is treated as zero: it is not normalized (cos Ω = 0).
EPS = 1e-8


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
        coef_a, coef_b = slerp_coefficients(a, b, t)
        return a * coef_a + b * coef_b


def slerp_coefficients(a: torch.Tensor, b: torch.Tensor, t: float) -> tuple[float, float]:
    """(cₐ, c_b) with slerp(a, b, t) = cₐ·a + c_b·b."""
    if a.numel() == 0:
        return 1 - t, t
    x, y = a.reshape(-1), b.reshape(-1)
    norm_x, norm_y = torch.linalg.vector_norm(x), torch.linalg.vector_norm(y)
    norm_x = norm_x if norm_x > EPS else torch.ones_like(norm_x)
    norm_y = norm_y if norm_y > EPS else torch.ones_like(norm_y)
    # Normalize before the dot product: the raw product of two large tensors can overflow float32.
    dot = min(1.0, max(-1.0, torch.dot(x / norm_x, y / norm_y).item()))
    if abs(dot) > DOT_THRESHOLD:
        return 1 - t, t
    omega = math.acos(dot)
    sin_omega = math.sin(omega)
    return math.sin((1 - t) * omega) / sin_omega, math.sin(t * omega) / sin_omega


SLERP = Slerp()
