"""Arcee Fusion: take a second model's changes only where they are unusually important."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ._base import Operator

# Added to both softmax distributions before the KL divergence, as in mergekit.
EPS = 1e-8
ROW_BLOCK = 1 << 20  # elements per block of rows whose KL divergences are computed at once


class ArceeFusion(Operator):
    """Keep the base except where |θ₁ − θ₀| weighted by the rows' KL divergence is an outlier.

    Per row r (last axis): p = softmax(θ₁ᵣ) + ε, q = softmax(θ₀ᵣ) + ε, KLᵣ = Σ p·log(p/q);
    importance sᵢ = |θ₁ᵢ − θ₀ᵢ|·KL_row(i);  threshold τ = Q₂ + 1.5·(Q₃ − Q₁), the quartiles
    Q_k = s₍⌊k/4·(n − 1)⌋₎ of the n importances sorted ascending (0-based);
    θ = θ₀ + (θ₁ − θ₀)·[s ≥ τ]  (the mask in float32, so the sum is float32 as in mergekit).
    Needs a base (θ₀) and exactly one other model (θ₁); no parameters. Computed in mergekit's order
    in the inputs' dtype, so bf16 inputs give its bytes. For tensors over 1M entries mergekit
    estimates the quartiles from 1M random draws (torch's global RNG, unseeded); here they are
    exact always, which mergekit's estimate approaches.
    Goddard et al. 2024, "Arcee's MergeKit", arXiv 2403.13257; Arcee AI 2025, "Meet MergeKit v0.1:
    Arcee Fusion" (arcee.ai/blog).
    """

    name = "arcee_fusion"
    # mergekit's recipes (and its tests) give every model a `weight`; Arcee Fusion mixes by its importance mask alone.
    ignored_params = frozenset({"weight"})

    def merge(self, tensors: Sequence[torch.Tensor], base: torch.Tensor | None = None, **params: Any) -> torch.Tensor:
        if len(tensors) != 1:
            raise self.error(f"needs a base and exactly 1 other model, got {len(tensors)} besides the base")
        base = self.need_base(base, tensors)
        self.bind(params, len(tensors))
        other = tensors[0]
        scores = importance(other, base)
        mask = (scores >= threshold(scores)).float()
        return base + (other - base) * mask


def importance(other: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|θ₁ − θ₀| times the KL divergence of the rows' softmax distributions."""
    width = other.shape[-1]
    rows_other, rows_base = other.reshape(-1, width), base.reshape(-1, width)
    # Blocks of rows keep the softmax temporaries small; each row's value is the same either way.
    step = max(1, ROW_BLOCK // max(width, 1))
    kl = torch.cat([row_kl(rows_other[i:i + step], rows_base[i:i + step]) for i in range(0, len(rows_other), step)])
    return (other - base).abs() * kl.reshape(*other.shape[:-1], 1)


def row_kl(other: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """KL(softmax(other) + ε ‖ softmax(base) + ε) per row, as a column."""
    p = torch.softmax(other, dim=-1) + EPS
    q = torch.softmax(base, dim=-1) + EPS
    return torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def threshold(scores: torch.Tensor) -> torch.Tensor:
    """Q₂ + 1.5·(Q₃ − Q₁) of the scores, each quartile the ⌊k/4·(n − 1)⌋-th smallest."""
    flat = scores.reshape(-1)
    last = flat.numel() - 1
    q1, q2, q3 = (torch.kthvalue(flat, k + 1).values for k in (last // 4, last // 2, 3 * last // 4))
    return q2 + 1.5 * (q3 - q1)


ARCEE_FUSION = ArceeFusion()
