"""Exact magnitude cuts over a tensor seen in blocks (not a plugin; used by the sparsifiers).

Keeping the k largest |τ| only needs the k-th largest value. Non-negative floats sort like their
bit patterns as integers, so a radix select finds it exactly from histograms (`torch.bincount`):
of the 15 value bits of bfloat16 and float16 magnitudes in one pass, of the upper and then the
lower 16 bits of float32 ones in two. Histograms add up over blocks, so the whole tensor never has
to be held as temporaries: a cut costs one to three passes over blocks of a few MB, each computed
afresh by the caller. Ties at the threshold are kept lowest flat index first, so the result is
deterministic.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

BLOCK = 1 << 20  # elements per block: small enough to stay in cache, large enough for fast kernels

# (start, stop) -> |τ| of those flat entries: bfloat16, float16 or float32 (other dtypes: as float32),
# the same dtype for every block; top_cut does not write into them
Blocks = Callable[[int, int], torch.Tensor]


def block_ranges(n: int, block: int | None = None) -> list[tuple[int, int]]:
    """(start, stop) of consecutive blocks of `block` entries covering n; a last block shorter than
    256 entries is joined to the one before, so that blocks of a multiple of 256 entries sum over the
    inputs as the whole tensor does (`_base.stacked_sum`)."""
    block = block or BLOCK
    ranges = [(s, min(s + block, n)) for s in range(0, n, block)] or [(0, 0)]
    if len(ranges) > 1 and ranges[-1][1] - ranges[-1][0] < 256:
        ranges[-2:] = [(ranges[-2][0], n)]
    return ranges


@dataclass(frozen=True)
class Cut:
    """Keeps entries above `threshold`, and those equal to it up to flat index `last_tie`."""

    threshold: float
    last_tie: int

    def mask(self, magnitude: torch.Tensor, start: int) -> torch.Tensor:
        """0/1 float mask of the kept entries of a block starting at flat index `start`.
        (Comparisons write straight into float tensors: several times faster than making bool
        tensors and converting them, and float masks are cheap to multiply by.)"""
        if self.last_tie == -1:  # top_cut's "none" and "all" (a cut at +inf keeps the infinities)
            return torch.zeros_like(magnitude) if self.threshold == float("inf") else torch.ones_like(magnitude)
        tied_here = self.last_tie - start + 1  # entries of this block that may keep a tie
        compare = torch.ge if tied_here >= magnitude.numel() else torch.gt
        mask = compare(magnitude, self.threshold, out=torch.empty_like(magnitude))
        if 0 < tied_here < magnitude.numel():
            mask[:tied_here].add_(torch.eq(magnitude[:tied_here], self.threshold, out=torch.empty_like(magnitude[:tied_here])))
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
    dtype = blocks(0, 1).dtype
    if dtype in (torch.bfloat16, torch.float16):  # one histogram of the 15-bit patterns
        counts = torch.zeros(1 << 15, dtype=torch.int64)
        for s, e in ranges:
            counts += torch.bincount(blocks(s, e).view(torch.int16), minlength=1 << 15)
        bin_, above = _from_top(counts, k)
        threshold = float(torch.tensor([bin_], dtype=torch.int16).view(dtype))
        need, equal = k - above, int(counts[bin_])
    else:  # the upper 16 bits, then the lower 16 within the upper's bin
        high = torch.zeros(1 << 15, dtype=torch.int64)
        for s, e in ranges:
            high += torch.bincount(blocks(s, e).float().view(torch.int32) >> 16, minlength=1 << 15)
        high_bin, above = _from_top(high, k)
        low = torch.zeros(1 << 16, dtype=torch.int64)
        for s, e in ranges:
            # Entries of the high bin map to 1..2¹⁶, lower ones to 0 and higher ones to 2¹⁶ + 1: one
            # clamp instead of selecting the bin's entries (several times faster).
            offsets = torch.sub(blocks(s, e).float().view(torch.int32), (high_bin << 16) - 1).clamp_(0, (1 << 16) + 1)
            low += torch.bincount(offsets, minlength=(1 << 16) + 2)[1:-1]
        low_bin, above_low = _from_top(low, k - above)
        threshold = float(torch.tensor([(high_bin << 16) | low_bin], dtype=torch.int32).view(torch.float32))
        need, equal = k - above - above_low, int(low[low_bin])
    return Cut(threshold, n if need == equal else _nth_tie(blocks, ranges, threshold, need))


def _nth_tie(blocks: Blocks, ranges, threshold: float, need: int) -> int:
    """Flat index of the `need`-th entry equal to the threshold."""
    seen = 0
    for s, e in ranges:
        tied = blocks(s, e) == threshold  # bool: its sum counts exactly (a bf16 one rounds 100001 to 99840)
        count = int(tied.sum())
        if seen + count >= need:
            return s + int(tied.nonzero()[need - seen - 1])
        seen += count
    raise AssertionError("fewer ties than counted")
