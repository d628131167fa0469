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

    def merge(self, tensors: Sequence[torch.Tensor], base: torch.Tensor | None = None, **params: Any) -> torch.Tensor:
        if len(tensors) != 1:
            raise self.error(f"needs a base and exactly 1 other model, got {len(tensors)} besides the base")
        base = self.need_base(base, tensors)
        self.bind(params, len(tensors))
        other = tensors[0]
        if base.dim() == 0:  # a scalar (Apertus's activation parameters) as the one-entry row mergekit makes it
            return self.merge([other.reshape(1)], base.reshape(1)).reshape(())
        scores = importance(other, base)
        cut = threshold(scores)
        # Memory (issue 15): the float32 mask and sum in blocks into the float32 result, the same operations.
        out = torch.empty(base.shape, dtype=torch.promote_types(base.dtype, torch.float32), device=base.device)
        flat, ends, result, flat_scores = base.reshape(-1), other.reshape(-1), out.view(-1), scores.reshape(-1)
        for s in range(0, flat.numel(), ROW_BLOCK):
            part = slice(s, s + ROW_BLOCK)
            torch.add(flat[part], (ends[part] - flat[part]) * (flat_scores[part] >= cut).float(), out=result[part])
        return out


def importance(other: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|θ₁ − θ₀| times the KL divergence of the rows' softmax distributions."""
    width = other.shape[-1]
    rows_other, rows_base = other.reshape(-1, width), base.reshape(-1, width)
    # Blocks of rows keep the softmax temporaries small; each row's value is the same either way.
    step = max(1, ROW_BLOCK // max(width, 1))
    scores = torch.empty_like(rows_other, dtype=torch.promote_types(other.dtype, base.dtype))
    for i in range(0, len(rows_other), step):  # (the product per block too: the same values)
        one, two = rows_other[i:i + step], rows_base[i:i + step]
        torch.mul((one - two).abs(), row_kl(one, two), out=scores[i:i + step])
    return scores.view(other.shape)


def row_kl(other: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """KL(softmax(other) + ε ‖ softmax(base) + ε) per row, as a column."""
    p = torch.softmax(other, dim=-1) + EPS
    q = torch.softmax(base, dim=-1) + EPS
    return torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def threshold(scores: torch.Tensor) -> torch.Tensor:
    """Q₂ + 1.5·(Q₃ − Q₁) of the scores, each quartile the ⌊k/4·(n − 1)⌋-th smallest."""
    flat = scores.reshape(-1)
    last = flat.numel() - 1
    ranks = (last // 4, last // 2, 3 * last // 4)
    found = smallest(flat, ranks) if flat.element_size() == 2 else None
    q1, q2, q3 = found or [torch.kthvalue(flat, k + 1).values for k in ranks]  # (NaNs: kthvalue's order)
    return q2 + 1.5 * (q3 - q1)


def smallest(flat: torch.Tensor, ranks: tuple[int, ...]) -> list[torch.Tensor] | None:
    """The values of 0-based rank `ranks` among the 16-bit floats `flat` sorted ascending, as
    `torch.kthvalue` gives them, from one histogram of the 2¹⁶ bit patterns (taken in blocks; kthvalue
    copies the tensor and makes int64 indices, 5 times its memory). The patterns' counts are then
    reordered by keys that sort as the values do: +x keeps its bits, −x becomes −1 − (bits of |x|).
    (Counting the raw patterns and reordering 2¹⁶ counts once is 5× faster than mapping every entry to
    its key: 2.9 against 14.6 ms a block of 2²⁰, one thread.) (−0 sorts before +0
    here, equal to kthvalue's value in every comparison.) None where a NaN is among them: NaN
    patterns (|bits| above infinity's) are the histogram's two ends, read from it instead of a pass of
    `isnan` over the scores (168M job, one thread: 3.58 → 3.14 s; the whole command, on two threads,
    within the noise)."""
    patterns = torch.zeros(1 << 16, dtype=torch.int64, device=flat.device)
    for s in range(0, flat.numel(), ROW_BLOCK):
        patterns += torch.bincount(flat[s:s + ROW_BLOCK].view(torch.uint16).to(torch.int32), minlength=1 << 16)
    raw = torch.arange(1 << 16, device=flat.device)
    counts = torch.empty_like(patterns)
    counts[torch.where(raw < 1 << 15, raw + (1 << 15), (1 << 15) - 1 - (raw & 0x7FFF))] = patterns
    inf = int(torch.tensor(float("inf"), dtype=flat.dtype).view(torch.int16))
    if counts[:(1 << 15) - 1 - inf].any() or counts[(1 << 15) + inf + 1:].any():  # −NaN keys, +NaN keys
        return None
    cumulative = counts.cumsum(0)
    values = []
    for rank in ranks:
        key = int(torch.searchsorted(cumulative, rank, right=True)) - (1 << 15)
        bits = key if key >= 0 else (-1 - key) | 0x8000
        values.append(torch.tensor(bits - (1 << 16) if bits >= 1 << 15 else bits, dtype=torch.int16).view(flat.dtype))
    return values


ARCEE_FUSION = ArceeFusion()
