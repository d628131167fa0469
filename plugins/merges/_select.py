"""Exact magnitude cuts over a tensor seen in blocks (not a plugin; used by the sparsifiers).

Keeping the k largest |τ| only needs the k-th largest value. Non-negative floats sort like their
bit patterns as integers, so a radix select finds it exactly from histograms (`_follow.c`'s, torch's):
of the 15 value bits of bfloat16 and float16 magnitudes in one pass, of the upper and then the
lower 16 bits of float32 ones in two. Histograms add up over blocks, so the whole tensor never has
to be held as temporaries: a cut costs one or two passes over blocks of a few MB, each computed
afresh by the caller. Ties at the threshold are kept lowest flat index first, so the result is
deterministic; which ones those are is settled in the pass that applies the cut (`Cut`, `cut_bounds`).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy
import torch

from ._base import as_bits

try:  # the loops in C (_follow.c: the histogram here, `_introsort`'s walk), where they were built
    from . import _follow as native
except ImportError:  # pragma: no cover (no C compiler where it was installed: numpy's and torch's ops)
    native = None

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


RANKED = (torch.bfloat16, torch.float16, torch.float32)  # dtypes top_cut ranks as they are; others as float32


class Cut:
    """Keeps the entries above `threshold` and, of the `tied` entries equal to it, the first `ties` in
    flat order (`cut_bounds`: as bounds and the ties kept). Which of a block's ties those are is settled
    as the blocks come, in flat order from the one at 0 (each pass over the tensor starts there again)."""

    def __init__(self, threshold: float, ties: int = 0, tied: int = 0):
        self.threshold, self.ties, self.tied = threshold, ties, tied
        self.seen = self.next = 0  # ties in the blocks before `next`

    def __repr__(self) -> str:
        return f"Cut({self.threshold!r}, ties={self.ties}, tied={self.tied})"

    def _kept_ties(self, magnitude: Callable[[], torch.Tensor], start: int, count: int) -> int | None:
        """How many of the ties in the block of `count` entries at `start` are kept, the first ones
        (None: all of them); `magnitude()` gives its |τ| where the ties have to be counted."""
        if start == 0:
            self.seen = 0
        elif start != self.next:
            raise AssertionError(f"blocks out of order: {start} after the block ending at {self.next}")
        self.next = start + count
        left = self.ties - self.seen
        if self.ties >= self.tied or left <= 0:  # (no counting: every tie or none from here on)
            return None if self.ties >= self.tied else 0
        values = magnitude()
        tied = torch.eq(values, self.threshold, out=torch.empty_like(values))
        here = count_ones(tied)
        self.seen += here
        return None if here <= left else left

    def _first_ties(self, magnitude: torch.Tensor, kept: int) -> tuple[int, torch.Tensor]:
        """(entries up to the `kept`-th tie, 0/1 where those entries are ties)."""
        tied = torch.eq(magnitude, self.threshold, out=torch.empty_like(magnitude))
        end = int(tied.nonzero()[kept - 1]) + 1
        return end, tied[:end]

    def mask(self, magnitude: torch.Tensor, start: int) -> torch.Tensor:
        """0/1 mask (in the magnitudes' dtype) of the kept entries of a block starting at flat index
        `start`. (Comparisons write straight into float tensors: several times faster than making bool
        tensors and converting them, and float masks are cheap to multiply by.)"""
        if self.threshold < 0:  # top_cut's "all": NaN too
            return torch.ones_like(magnitude)
        if magnitude.dtype not in RANKED:  # ranked as float32 values, as top_cut's histograms rank them
            magnitude = magnitude.float()
        kept = self._kept_ties(lambda: magnitude, start, magnitude.numel())
        mask = (torch.ge if kept is None else torch.gt)(magnitude, self.threshold, out=torch.empty_like(magnitude))
        if kept:
            end, tied = self._first_ties(magnitude, kept)
            mask[:end].add_(tied)
        return mask


def cut_bounds(blocks: Blocks, n: int, keep: Cut, drop: Cut | None = None) -> tuple:
    """What `keep` keeps less what `drop` keeps (a cut keeping fewer of the largest: breadcrumbs' two), as
    `_sparsify.Ranked` holds a selection, so that the C mix applies an `index` cut as it applies mergekit's
    (cut block by block, its ties counted, a hardshrink and a subtraction took half a breadcrumbs merge):
    the magnitudes' bit patterns strictly between `above` and `below` (None: no bound) and the ties kept at
    those two by flat index (ascending), found in one pass over the blocks where some are kept and some not;
    and the dtype they rank in. Ties at 0 are left out, kept or not: a zero adds nothing to a sum, norm or vote."""
    rank = blocks(0, min(n, 1)).dtype
    rank = rank if rank in RANKED else torch.float32  # (as `top_cut` ranks them)

    def key(value: float) -> int:
        return int(as_bits(torch.tensor(value, dtype=rank)))

    def taken(cut: Cut) -> int:  # how many of the ties at its threshold a cut keeps (the first ones)
        return min(cut.ties, cut.tied)

    infinity = key(float("inf"))
    above = None if keep.threshold < 0 else infinity + 1 if keep.threshold == float("inf") else key(keep.threshold)
    below = None if drop is None or drop.threshold == float("inf") else 0 if drop.threshold < 0 else key(drop.threshold)
    slices = {}  # a bound's key -> the slice of its ties (in flat order) kept
    if above is not None and above == below:  # both cuts at one key: the ties the first keeps and the second not
        slices[above] = (taken(drop), taken(keep))
    else:
        if above is not None and 0 < above <= infinity and taken(keep) == keep.tied:  # every tie kept: ≥ its key
            above -= 1
        elif above is not None:
            slices[above] = (0, taken(keep))
        if below is not None and below > 0 and taken(drop) == 0:  # no tie dropped: ≤ its key
            below += 1
        elif below is not None:
            slices[below] = (taken(drop), drop.tied)
    slices = {k: v for k, v in slices.items() if 0 < k <= infinity and v[0] < v[1]}
    found: dict[int, list] = {k: [] for k in slices}
    for s, e in block_ranges(n) if slices else ():  # (up to the last tie kept)
        bits = as_bits(blocks(s, e).to(rank)).cpu().numpy()
        for k, places in found.items():
            places.append(numpy.flatnonzero(bits == k) + s)
        if all(sum(map(len, found[k])) >= last for k, (_, last) in slices.items()):
            break
    chosen = [numpy.concatenate(found[k])[a:b] for k, (a, b) in slices.items()]
    return above, below, numpy.sort(numpy.concatenate(chosen)) if chosen else numpy.empty(0, numpy.int64), rank


def count_ones(mask: torch.Tensor) -> int:
    """Exactly how many entries of a flat 0/1 float mask are 1 (`row_sums`: float32 sums of 2¹⁴ are
    exact; an entry's float sum of a half type rounds from 257 on, a bool count is 3× as slow)."""
    return int(math.fsum(row_sums(mask)))


ROW = 1 << 14  # entries per partial sum: under torch's parallel grain size (32768)


def row_sums(values: torch.Tensor) -> list[float]:
    """Partial sums of a tensor's entries in flat order, in float32 over runs of `ROW` entries. Each
    run is a row of a (rows × ROW) reduction, which torch gives whole to one thread and sums serially,
    so the parts depend on the values only, never on the thread count."""
    values = values.reshape(-1)
    whole = values.numel() // ROW * ROW
    parts = values[:whole].view(-1, ROW).sum(dim=1, dtype=torch.float32).tolist() if whole else []
    if whole < values.numel():
        parts.append(float(values[whole:].sum(dtype=torch.float32)))
    return parts


def _from_top(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """(bin holding the k-th largest, number of entries in higher bins) for a histogram."""
    cumulative = counts.flip(0).cumsum(0)
    j = int(torch.searchsorted(cumulative, k))
    return counts.numel() - 1 - j, int(cumulative[j - 1]) if j > 0 else 0


def histogram16(parts) -> torch.Tensor:
    """counts[key + 2¹⁵] of the int16 keys of some CPU tensors: by `_follow`'s histogram (0.5 ns an entry, where
    torch's bincount of the keys widened to int32 took 3-4), else by torch's."""
    counts = torch.zeros(1 << 16, dtype=torch.int64)
    for part in parts:
        if native is not None:
            native.histogram(part.contiguous().numpy(), counts.numpy())
        else:
            counts += torch.bincount(part.to(torch.int32).add_(1 << 15), minlength=1 << 16)
    return counts


def _patterns(blocks: Blocks, ranges, device: torch.device) -> torch.Tensor:
    """How many of the half-precision magnitudes have each 15-bit pattern (`histogram16`; torch's bincount
    on another device)."""
    if device.type == "cpu":
        return histogram16(blocks(s, e).view(torch.int16) for s, e in ranges)[1 << 15:]
    counts = torch.zeros(1 << 15, dtype=torch.int64, device=device)
    for s, e in ranges:
        counts += torch.bincount(blocks(s, e).view(torch.int16), minlength=1 << 15)
    return counts


def top_cut(blocks: Blocks, n: int, k: int) -> Cut:
    """The cut keeping the k largest of n magnitudes (k ≥ n: all; k ≤ 0: none)."""
    return top_cuts(blocks, n, [k])[0]


def top_cuts(blocks: Blocks, n: int, ks: list[int]) -> list[Cut]:
    """`top_cut` for each k, from one histogram (float32: the upper 16 bits', then the lower 16 bits' within
    each k's upper bin): breadcrumbs' two cuts in one pass over the blocks (two for float32), not two (four)."""
    cuts = [Cut(-1.0) if k >= n else Cut(float("inf")) if k <= 0 else None for k in ks]
    if all(cuts):
        return cuts
    ranges, first = block_ranges(n), blocks(0, 1)
    dtype, device = first.dtype, first.device
    if dtype in (torch.bfloat16, torch.float16):  # one histogram of the 15-bit patterns
        counts = _patterns(blocks, ranges, device)
        for i, k in enumerate(ks):
            if cuts[i] is None:
                bin_, above = _from_top(counts, k)
                cuts[i] = Cut(float(torch.tensor([bin_], dtype=torch.int16).view(dtype)), k - above, int(counts[bin_]))
        return cuts
    high = torch.zeros(1 << 15, dtype=torch.int64, device=device)
    for s, e in ranges:
        high += torch.bincount(blocks(s, e).float().view(torch.int32) >> 16, minlength=1 << 15)
    found = {i: _from_top(high, k) for i, k in enumerate(ks) if cuts[i] is None}  # i -> (upper bin, above it)
    lows = {b: torch.zeros(1 << 16, dtype=torch.int64, device=device) for b, _ in found.values()}
    for s, e in ranges:
        bits = blocks(s, e).float().view(torch.int32)
        for b, low in lows.items():
            # Entries of the upper bin map to 1..2¹⁶, lower ones to 0 and higher ones to 2¹⁶ + 1: one
            # clamp instead of selecting the bin's entries (several times faster).
            offsets = torch.sub(bits, (b << 16) - 1).clamp_(0, (1 << 16) + 1)
            low += torch.bincount(offsets, minlength=(1 << 16) + 2)[1:-1]
    for i, (b, above) in found.items():
        low_bin, above_low = _from_top(lows[b], ks[i] - above)
        threshold = float(torch.tensor([(b << 16) | low_bin], dtype=torch.int32).view(torch.float32))
        cuts[i] = Cut(threshold, ks[i] - above - above_low, int(lows[b][low_bin]))
    return cuts
