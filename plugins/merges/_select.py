"""Exact magnitude cuts over a tensor seen in blocks (not a plugin; used by the sparsifiers).

Keeping the k largest |τ| only needs the k-th largest value. For non-negative float32 values the
int32 bit patterns sort like the values, so a two-level radix select finds it exactly from two
histograms (`torch.bincount`) of the upper and lower 16 bits — and histograms add up over blocks,
so the whole tensor never has to be held as temporaries: a cut costs two or three passes over
blocks of a few MB, each computed afresh by the caller. Ties at the threshold are kept lowest flat
index first, so the result is deterministic.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

BLOCK = 1 << 20  # elements per block: small enough to stay in cache, large enough for fast kernels

Blocks = Callable[[int, int], torch.Tensor]  # (start, stop) -> |τ| of those flat entries, float32


def block_ranges(n: int) -> list[tuple[int, int]]:
    return [(s, min(s + BLOCK, n)) for s in range(0, n, BLOCK)] or [(0, 0)]


@dataclass(frozen=True)
class Cut:
    """Keeps entries above `threshold`, and those equal to it up to flat index `last_tie`."""

    threshold: float
    last_tie: int

    def mask(self, magnitude: torch.Tensor, start: int) -> torch.Tensor:
        """0/1 float mask of the kept entries of a block starting at flat index `start`.
        (Float masks: elementwise float arithmetic is several times cheaper than bool masks.)"""
        if self.threshold == float("inf"):
            return torch.zeros_like(magnitude)
        if self.threshold == -1.0:
            return torch.ones_like(magnitude)
        mask = torch.sub(magnitude, self.threshold).clamp_(min=0).sign_()
        if self.last_tie >= start:
            tied = magnitude == self.threshold
            tied[self.last_tie - start + 1:] = False
            mask.add_(tied)
        return mask


def _from_top(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """(bin holding the k-th largest, number of entries in higher bins) for a histogram."""
    cumulative = counts.flip(0).cumsum(0)
    j = int(torch.searchsorted(cumulative, k))
    return counts.numel() - 1 - j, int(cumulative[j - 1]) if j > 0 else 0


def top_cut(blocks: Blocks, n: int, k: int) -> Cut:
    """The cut keeping the k largest of n magnitudes (k ≥ n: all; k ≤ 0: none)."""
    if k >= n:
        return Cut(-1.0, -1)
    if k <= 0:
        return Cut(float("inf"), -1)
    ranges = block_ranges(n)
    high = torch.zeros(1 << 15, dtype=torch.int64)
    for s, e in ranges:
        high += torch.bincount(blocks(s, e).view(torch.int32) >> 16, minlength=1 << 15)
    high_bin, above = _from_top(high, k)
    low = torch.zeros(1 << 16, dtype=torch.int64)
    for s, e in ranges:
        bits = blocks(s, e).view(torch.int32)
        low += torch.bincount(bits[(bits >> 16) == high_bin] & 0xFFFF, minlength=1 << 16)
    low_bin, above_low = _from_top(low, k - above)
    threshold = float(torch.tensor([(high_bin << 16) | low_bin], dtype=torch.int32).view(torch.float32))
    need, equal = k - above - above_low, int(low[low_bin])
    return Cut(threshold, n if need == equal else _nth_tie(blocks, ranges, threshold, need))


def _nth_tie(blocks: Blocks, ranges, threshold: float, need: int) -> int:
    """Flat index of the `need`-th entry equal to the threshold."""
    seen = 0
    for s, e in ranges:
        tied = (blocks(s, e) == threshold).nonzero().reshape(-1)
        if seen + tied.numel() >= need:
            return s + int(tied[need - seen - 1])
        seen += tied.numel()
    raise AssertionError("fewer ties than counted")
