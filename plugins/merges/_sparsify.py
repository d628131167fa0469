"""Sparsifying task vectors block by block (not a plugin; used by the task-arithmetic family).

DARE drops entries at random (Yu et al. 2023, arXiv 2311.03099); TIES and magnitude pruning keep
the largest magnitudes (Yadav et al. 2023, arXiv 2306.01708); breadcrumbs drops the largest γ
outliers and the smallest (Davari & Belilovsky 2023, arXiv 2312.06795).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy
import torch

from . import _introsort
from ._base import as_bits
from ._draws import Draws
from ._mixing import magnitude_keys
from ._select import block_ranges, cut_bounds, row_sums, top_cut, top_cuts


def keep_count(fraction: float, n: int) -> int:
    """int(fraction·n), as mergekit counts (0.29·100 gives 28: the product's float noise included)."""
    return int(fraction * n)


class Keep:
    """Which entries of one task vector survive sparsification, block by block.

    Magnitudes are kept as mergekit's sort of the whole |τ| keeps them (tie_break "mergekit", the default):
    torch's CPU sort is unstable, so where entries of equal magnitude straddle the cut, only its own moves
    make its choice, followed down to the cut (`_introsort`) and kept as bounds and the chosen ties
    (`Ranked`). With tie_break "index", magnitude cuts are found in passes over blocks (see `_select`), and
    of entries tied at a cut the first in flat order kept (a `Ranked` too). Random masks come from the
    input's `Draws`, drawn in block order on the first pass over the blocks and the same on every later pass.
    """

    def __init__(self, tau: Callable[[int, int], torch.Tensor], n: int, method: str, density: float,
                 gamma: float, generator: torch.Generator | None, tie_break: str = "mergekit"):
        self.method, self.density = method, density
        self.draws = Draws(generator, n) if method == "random" else None
        self.whole: Ranked | numpy.ndarray | None = None
        magnitudes = lambda s, e: tau(s, e).abs_()  # noqa: E731
        if method == "magnitude":  # mergekit: the max(1, int(density·n)) largest
            keep = max(1, keep_count(density, n))
            if tie_break == "mergekit":
                self.whole = _sorted_range(tau, n, True, 0, keep)
            else:
                self.whole = Ranked(*cut_bounds(magnitudes, n, top_cut(magnitudes, n, keep)))
        elif method == "magnitude_outliers":
            # mergekit ranks |τ| ascending and keeps ranks [bottom, bottom + kept): the int(γ·n)
            # largest dropped, fewer when needed to keep int(density·n) entries.
            kept = keep_count(density, n)
            bottom = max(0, n - kept - keep_count(gamma, n))
            if tie_break == "mergekit":
                self.whole = _sorted_range(tau, n, False, bottom, bottom + kept)
            else:
                cuts = top_cuts(magnitudes, n, [n - bottom, n - bottom - kept])  # (one histogram)
                self.whole = Ranked(*cut_bounds(magnitudes, n, *cuts))

    def drops(self, start: int, count: int, dtype: torch.dtype) -> tuple | None:
        """The drops of the block of `count` entries from flat index `start`, of a τ in `dtype`, for
        `_mixing.mix_models`: (packed bits, the bit of the block's first entry) where they are such a
        mask (random drops, torch's own sort), (above, below, chosen offsets) for `Ranked`'s magnitude
        bounds; None where neither says them (bounds compared as bits)."""
        if self.method == "random":
            return self.draws.below(start, count, self.density), 0
        if isinstance(self.whole, numpy.ndarray):
            return self.whole, start
        return self.whole.bounds(start, count, dtype) if isinstance(self.whole, Ranked) else None

    def drawn(self) -> bool:
        """Whether no drop is left to draw: the whole tensor's drops are one mask (`drops(0, n)`), not drawn anew."""
        return self.draws is None or self.draws.whole() is not None

    def apply(self, start: int, tau: torch.Tensor) -> torch.Tensor:
        """The block of τ starting at flat index `start` with the dropped entries set to 0 (in place for
        random drops and torch's own sort's bits, else a new tensor)."""
        if self.method == "random":
            return masked(tau, self.draws.below(start, tau.numel(), self.density), 0)
        if isinstance(self.whole, Ranked):
            return self.whole.keep(tau, start)
        return masked(tau, self.whole, start)  # (bits: see `_sorted_range`)


def _sorted_range(tau, n: int, descending: bool, lo: int, hi: int) -> Ranked | numpy.ndarray:
    """The entries mergekit's `argsort(|τ|.float(), descending)[lo:hi]` picks: a `Ranked`, or bits
    (`pack`) where torch's own sort ran. bfloat16 and float16 values are exact in float32 and compare
    alike, so |τ| is kept as it is (a float32 copy for other dtypes, as mergekit's) and its sort
    followed on integer keys (`_introsort`)."""
    first = tau(0, min(n, 1))
    dtype = first.dtype if first.dtype in (torch.bfloat16, torch.float16) else torch.float32
    whole = torch.from_numpy(_introsort.scratch("magnitudes", n * dtype.itemsize, numpy.uint8)).view(dtype)

    def magnitudes():
        for s, e in block_ranges(n):
            block = tau(s, e)
            if block.dtype == whole.dtype and block.device == whole.device:  # (written in place: no copy)
                torch.abs(block, out=whole[s:e])
            else:  # float64, rounded to float32 as mergekit's .float(); or from another device
                whole[s:e] = block.abs_()
        return whole

    if _introsort.follows_torch():  # (|τ|'s keys and their histogram from the models in one C pass, where it can)
        counts = magnitude_keys(tau, whole, descending)
        keys = (as_bits(whole) if counts is not None else _introsort.keys_of(magnitudes(), descending)).numpy()
        chosen = _introsort.select(keys, lo, hi, free_zero=True, counts=counts)
        if chosen is not None:
            bounds = (chosen.low, chosen.high) if descending else tuple(None if b is None else -int(b)
                                                                     for b in (chosen.high, chosen.low))
            return Ranked(*bounds, chosen.chosen, whole.dtype)
    # (a segment the sort would heapsort, or another torch's sort: sort as mergekit)
    order = torch.argsort(magnitudes().float(), descending=descending)[lo:hi]
    return pack(torch.zeros(n, dtype=torch.bool).index_fill_(0, order, True).numpy())


class Ranked:
    """Keeps the entries whose |τ|, as bits of `dtype` (`_introsort.keys_of`: NaN after +inf), lies
    strictly between `above` and `below` (None: no bound), and those at the flat indices `chosen`
    (sorted): the ties at a bound that mergekit's sort keeps. Where the bounds are finite magnitudes
    (the rule), applied to a block by one `hardshrink` (|x| > λ keeps x, NaN too) and, for an upper
    bound, a `where` on |x| < μ (false for NaN, whose key is above every finite one); else by comparing
    bits (breadcrumbs' two-sided cut on the 168M job: merge 5.47 s against 5.67, median of 3 alternating)."""

    def __init__(self, above: int | None, below: int | None, chosen: numpy.ndarray, dtype: torch.dtype):
        self.above, self.below, self.chosen, self.dtype = above, below, chosen, dtype
        self.infinity = int(as_bits(torch.tensor(float("inf"), dtype=dtype)))
        # the bounds as magnitudes of the dtype where both are such, once (a block's Python steps cost
        # more than its C pass where they were made for each block: 1282 blocks of the 168M job's tensors)
        magnitudes = all(b is None or 0 <= b <= self.infinity for b in (above, below))
        self.values = tuple(None if b is None else self._value(b) for b in (above, below)) if magnitudes else None

    def _value(self, bits: int) -> float:
        return float(torch.tensor(bits, dtype=as_bits(torch.empty(0, dtype=self.dtype)).dtype).view(self.dtype))

    def _chosen(self, start: int, count: int) -> numpy.ndarray:
        """The chosen entries' offsets in the block of `count` entries from flat index `start`."""
        first, last = self.chosen.searchsorted((start, start + count))
        return self.chosen[first:last] - start

    def bounds(self, start: int, count: int, dtype: torch.dtype) -> tuple | None:
        """(above, below, chosen offsets in the block) as `keep`'s `hardshrink` and `where` apply them, for a τ
        in `dtype`; None where it compares bits instead."""
        if dtype != self.dtype or self.values is None:
            return None
        return (*self.values, self._chosen(start, count))

    def keep(self, tau: torch.Tensor, start: int) -> torch.Tensor:
        """The block of τ starting at flat index `start` with the dropped entries set to +0 (a new tensor)."""
        if tau.dtype == self.dtype and self.values is not None:
            above, below = self.values
            out = tau.clone() if above is None else torch.nn.functional.hardshrink(tau, above)
            if below is not None:
                out = torch.where(tau.abs() < below, out, 0)
        else:
            bits = as_bits(tau.abs().to(self.dtype)).clamp(max=self.infinity + 1)  # (every NaN one key)
            inside = torch.ones_like(bits, dtype=torch.bool)
            if self.above is not None:
                inside &= bits > self.above
            if self.below is not None:
                inside &= bits < self.below
            out = torch.where(inside, tau, torch.zeros((), dtype=tau.dtype))
        chosen = self._chosen(start, tau.numel())
        if chosen.size:
            chosen = torch.from_numpy(chosen).to(tau.device)
            out[chosen] = tau[chosen]
        return out


def pack(mask: numpy.ndarray) -> numpy.ndarray:
    """A 0/1 mask (numpy bool or uint8, any shape) as bits in flat order, little bit order: a mask kept
    for a later pass in an eighth of the memory."""
    return numpy.packbits(mask.reshape(-1), bitorder="little")


def masked(tau: torch.Tensor, bits: numpy.ndarray, start: int) -> torch.Tensor:
    """τ (a flat block, overwritten) with the entries whose bit is 0 set to +0 (a `pack`ed mask whose
    bit `start` is the block's first entry): an AND with all-ones or zero integers of τ's width, each
    byte of bits spread to eight of them by a table. 0.2 ns an entry where unpacking to bytes and
    multiplying took 0.37 (bf16, one thread). The zeros are +0 where τ·0 gives -0 for a negative τ:
    everything after adds them to sums that start at +0 or takes their magnitudes."""
    first, offset = start // 8, start % 8
    spread = numpy.take(_spread(tau.element_size()), bits[first:(start + tau.numel() + 7) // 8], axis=0)
    ones = torch.from_numpy(spread.reshape(-1)[offset:offset + tau.numel()]).to(tau.device)
    return as_bits(tau).bitwise_and_(ones.view(tau.shape)).view(tau.dtype)


@functools.cache
def _spread(size: int) -> numpy.ndarray:
    """(256, 8): for each byte, its bits (little order) as all-ones or zero integers of `size` bytes."""
    bits = numpy.unpackbits(numpy.arange(256, dtype=numpy.uint8)[:, None], axis=1, bitorder="little")
    return -bits.astype({2: numpy.int16, 4: numpy.int32, 8: numpy.int64}[size])


def sparsifiers(taus, n: int, method: str | None, density, gamma, generators,
                tie_break: str = "mergekit") -> list[Keep | None]:
    """A `Keep` for each task vector (`taus`: each one's τ(start, stop)), or None where every entry is kept
    (density ≥ 1, as mergekit), made one after another in the same scratch memory (`_introsort.reusing`).
    `tie_break` says which of the entries tied at a magnitude cut are kept: "mergekit" (those its
    CPU sort keeps) or "index" (lowest flat index first: histogram cuts over blocks)."""
    with _introsort.reusing():
        return [None if method is None or d >= 1 else Keep(tau, n, method, d, g, generator, tie_break)
                for tau, d, g, generator in zip(taus, density, gamma, generators)]


def held_bytes(sparsify: str | None, inputs: int, compute_size: int, tie_break: str) -> int:
    """Bytes an entry the task-arithmetic family holds for a tensor besides its inputs as read (its
    `entry_bytes`, capabilities.WorkingMemory): the result and each input's mask as bits; mergekit's tie
    order also holds a whole |τ| as keys and either `_introsort`'s followed ties (their places and
    numbers, 8 bytes each, several copies: a byte an entry at the 1 in 70 entries tied of bf16 task
    vectors; and the C walk's int32 numbers beside half the keys: 2 bytes an entry) or (another torch's
    sort) a bool mask and a float32 copy sorted into an int64 order from an int64 range; an `index` cut
    the places of the ties kept at its bounds (8 bytes each: a byte an entry)."""
    held = compute_size + inputs // 8 + 1
    if sparsify in ("magnitude", "magnitude_outliers"):
        held += 1 if tie_break != "mergekit" else (2 if compute_size == 2 else 4) + (
            3 if _introsort.follows_torch() else 25)
    return held


def l1_factor(tau, ranges, prune, dtype: torch.dtype, sums=None) -> float | None:
    """mergekit's rescale, ‖τ‖₁ / ‖prune(τ)‖₁ in τ's dtype: the kept entries scaled so that their L1
    norm equals the unpruned one (None: no rescaling, where a norm rounds below 1e-7). `prune(start,
    block)` prunes a block (in place or not), here given |τ|: the prunes keep by magnitude alone.
    Two sums, each rounded once to the dtype:
    - with `sums` (random drops: DARE's, DELLA's), the exact norms: each block's in float64, in one C pass
      from the models where `sums(start, stop)` gives them (else None), else torch's float64 sums of |τ|;
      a float64 sum of 2¹⁷ entries is within 2⁻³⁶ of the exact one (relative), far inside the dtype's
      rounding, so no CPU, thread count or path changes a norm (both passes over |τ| and the pruned |τ| in
      torch took a third of a DARE merge);
    - without (magnitude drops, where mergekit's bytes are the target), `_select.row_sums`: torch's float32
      sums of runs of 2¹⁴ entries, which are mergekit's whole-tensor sum for tensors up to 2¹⁴ entries, and
      the same on any thread count (mergekit's changes its last bits with torch's thread count).
    The blocks' sums are added with math.fsum."""
    parts = row_sums if sums is None else lambda values: [float(values.sum(dtype=torch.float64))]
    before: list[float] = []
    after: list[float] = []
    for s, e in ranges:
        found = sums(s, e) if sums is not None else None
        if found is None:
            magnitude = tau(s, e).abs_()
            found = parts(magnitude), parts(prune(s, magnitude))
        else:
            found = [found[0]], [found[1]]
        before += found[0]
        after += found[1]
    norms = [torch.tensor(math.fsum(parts), dtype=dtype) for parts in (before, after)]
    return None if norms[0] < 1e-7 or norms[1] < 1e-7 else float(norms[0] / norms[1])
