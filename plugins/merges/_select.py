"""Exact top-k selection by magnitude in linear time (not a plugin; used by the sparsifiers).

`torch.kthvalue` and sorts cost O(n log n)-ish passes over every tensor; magnitude pruning only
needs the k-th largest value. For non-negative float32 values the int32 bit patterns sort like the
values, so a two-level radix select finds it exactly with two histograms (`torch.bincount`) over
the upper and lower 16 bits, and also yields how many entries lie strictly above it and at it.
"""
from __future__ import annotations

import torch


def _from_top(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """(bin holding the k-th largest, number of entries in higher bins) for a histogram."""
    cumulative = counts.flip(0).cumsum(0)
    j = int(torch.searchsorted(cumulative, k))
    return counts.numel() - 1 - j, int(cumulative[j - 1]) if j > 0 else 0


def kth_largest(magnitude: torch.Tensor, k: int) -> tuple[torch.Tensor, int, int]:
    """The k-th largest entry of a flat, finite, non-negative float32 tensor (1 ≤ k ≤ n), with the
    number of entries greater than it and equal to it."""
    bits = magnitude.view(torch.int32)
    high = bits >> 16
    high_bin, above = _from_top(torch.bincount(high, minlength=1 << 15), k)
    low = bits[high == high_bin] & 0xFFFF
    low_counts = torch.bincount(low, minlength=1 << 16)
    low_bin, above_low = _from_top(low_counts, k - above)
    value = torch.tensor([(high_bin << 16) | low_bin], dtype=torch.int32).view(torch.float32)[0]
    return value, above + above_low, int(low_counts[low_bin])


def top_mask(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """0/1 float mask of the k largest entries of a flat tensor; among equal values the lower index
    wins. (Float masks: elementwise float arithmetic is several times cheaper than bool masks.)"""
    n = magnitude.numel()
    magnitude = magnitude.float().contiguous()
    if k >= n:
        return torch.ones_like(magnitude)
    if k <= 0:
        return torch.zeros_like(magnitude)
    threshold, above, equal = kth_largest(magnitude, k)
    need = k - above
    tied = (magnitude == threshold).nonzero().reshape(-1)[:need] if need > 0 else None
    mask = torch.sub(magnitude, threshold).clamp_(min=0).sign_()  # 1 where strictly above
    if tied is not None:
        mask[tied] = 1  # the first `need` entries equal to the threshold
    return mask
