"""Which entries torch's CPU sort (or topk) puts in a range of places, found without sorting (not a
plugin; used for mergekit's tie order by the magnitude sparsifiers and SCE).

mergekit keeps `argsort(|τ|, descending=True)[:k]` (breadcrumbs: a range of the ascending argsort;
SCE: `topk(var, k)`). Where entries tie at the cut, which of them are kept is decided by torch's CPU
sort: libstdc++'s `std::sort` on (key, index) pairs, an unstable introsort whose moves depend on the
comparisons alone. It runs as follows on n entries (comp(x, y): x goes before y):

- `__introsort_loop` with a depth budget of 2⌊log₂ n⌋: while a segment has more than 16 entries,
  heapsort it if the budget is spent, else partition it and go on with both parts, each with the
  budget less one;
- the partition moves the median of (first + 1, middle, last − 1) to first, then scans [first + 1,
  last) from the left for entries not before that pivot ("left stops" L₀ < L₁ < …) and from the right
  for entries not after it ("right stops" R₀ > R₁ > …, the pivot itself the last): Lₜ and Rₜ swap
  while Lₜ < Rₜ, and for the first t where not, the left part ends at min(Lₜ, Rₜ₋₁);
- one insertion sort over everything. It is stable and moves an entry only past entries it goes
  strictly before, so nothing crosses from one part into another: it sorts each final segment of
  ≤ 16 entries as a stable sort would.

So the entries that end in places [lo, hi) are settled by the partitions of the segments holding lo
or hi (a part inside the range is kept whole, one outside dropped whole) and, in a final segment, by a
stable sort of it: quickselect along the sort's own path, about 2n entries partitioned for each end
of the range instead of n log₂ n compared. torch's topk of k > n/64 entries runs `std::nth_element`,
whose `__introselect` is that quickselect itself (down to 3 entries).

Only entries whose key is the one at an end and also the one just past it straddle the cut; the
others are inside or outside by their key alone (`Selection`: bounds), so only the straddling ones
are followed, and none at all where the keys at the cut differ. The walk runs in C (`_follow.c`,
built by the install: the stops found in blocks without branches) or, where that was not built, in
numpy (`_walk`: vectorized windows); the two walks have one contract.

Measured on the 168M benchmark's bf16 task vectors (2.9M entries, 1 in 70 of them straddling), one
thread, half kept, the keys' histogram included: 11-12 ms in C (the walk before it carried numbers beside the
keys: 7.5 of them walking, 4.9 since), 32 ms in numpy, against the sort's 157-185 (2-core AMD EPYC). Held: the
keys, for each followed entry its place, number and runs (about 60 bytes; under a byte an entry), and in C an
int32 number beside each of half the keys (2 bytes an entry), where the sort holds keys, an int64 order and
the int64 range it fills the order from (18 bytes an entry) and topk (value, index) pairs (16). A segment
whose budget runs out (the sort would heapsort it; an organ pipe does, real tensors have not) gives None: the
caller sorts as mergekit does. `follows_torch` checks these rules against torch's own sort and topk once per process.
"""
from __future__ import annotations

import contextlib
import functools
import mmap
import threading
from collections.abc import Iterator

import numpy
import torch

from . import _select, _walk
from ._base import as_bits
from ._select import block_ranges, histogram16

SORT, SELECT = 16, 3  # segments left to a final insertion sort: std::sort's, std::nth_element's


def keys_of(magnitudes: torch.Tensor, descending: bool = True) -> torch.Tensor:
    """Non-negative floats (flat, contiguous) as integer keys of the same width that compare as
    torch's sorts and topk compare the floats: their bit patterns, every NaN alike and after +inf;
    negated for an ascending sort. So torch's own sort or topk makes the same moves on them, comparing
    faster (8M bf16 values through topk in 0.14 s against 0.18), and `kept_range` follows those moves
    on their `.numpy()`. In place: a view of `magnitudes`, which it overwrites."""
    keys = as_bits(magnitudes)
    nan = torch.tensor(float("inf"), dtype=magnitudes.dtype).view(keys.dtype) + 1
    if keys.numel() and bool(keys.max() > nan):
        keys[keys > nan] = nan
    return keys if descending else keys.neg_()


def select(keys: numpy.ndarray, lo: int, hi: int, final: int = SORT, free_zero: bool = False,
           counts: torch.Tensor | None = None) -> Selection | None:
    """Which entries `std::sort` with comp(x, y) = x > y (descending) puts in places [lo, hi) (with
    `final=SELECT` and lo = 0: which `std::nth_element` at place hi − 1 puts before it, torch's topk of
    more than 1/64 of the entries; its `__introselect` makes the same partitions along one path and
    insertion-sorts the last ≤ 3 entries), as bounds on the keys and the tied entries chosen
    (`Selection`). `keys`: a flat integer array (`keys_of(...).numpy()`), which is scrambled. None where
    a segment that decides would be heapsorted. `free_zero`: entries of key 0 may be dropped whatever
    the sort does (|τ| = 0: kept or not, they add nothing), so they are not followed. `counts`: the 16-bit
    keys' histogram (`histogram16`'s), where it was made with them."""
    return Ends(keys, lo, hi, free_zero, counts).walk(final)


def kept_range(keys: numpy.ndarray, lo: int, hi: int, final: int = SORT) -> numpy.ndarray | None:
    """`select` as a bool mask over the entries (True: in the range), every tie followed."""
    ends = Ends(keys, lo, hi, False)
    inside = ends.selection(EMPTY).inside(keys)  # (before the walk scrambles the keys)
    selection = ends.walk(final)
    if selection is None:
        return None
    inside[selection.chosen] = True
    return inside


EMPTY = numpy.empty(0, dtype=numpy.int64)


class Selection:
    """The entries of keys strictly between `low` and `high` (None: no bound on that side) and those at
    the flat indices `chosen` (sorted; each has a key at a bound)."""

    def __init__(self, low, high, chosen: numpy.ndarray):
        self.low, self.high, self.chosen = low, high, chosen

    def inside(self, keys: numpy.ndarray) -> numpy.ndarray:
        """A bool mask: True where low < key < high."""
        inside = numpy.greater(keys, self.low) if self.low is not None else numpy.ones(keys.size, dtype=bool)
        if self.high is not None:
            inside &= keys < self.high
        return inside


class Ends:
    """The entries tied at an end of the range [lo, hi), followed to their places through the moves.

    With `last` the key at place hi − 1 and `past` the one at place hi, an entry above `past` ends
    in the range whatever the moves where the two differ; where they are equal, an entry of that key
    straddles the cut and is followed (likewise at lo, with the keys at lo − 1 and lo); `origin`: their
    places, ascending. They are about 1 in 70 of the 168M benchmark's bf16 task vectors."""

    def __init__(self, keys: numpy.ndarray, lo: int, hi: int, free_zero: bool, counts: torch.Tensor | None = None):
        n = keys.size
        lo, hi = max(lo, 0), min(hi, n)
        self.keys, self.lo, self.hi = keys, lo, hi
        places = ([hi - 1, hi] if hi < n else []) + ([lo - 1, lo] if lo > 0 else []) if lo < hi else []
        if keys.itemsize == 2 and places and counts is None:  # (16-bit keys: one histogram, for the ties' count too)
            counts = histogram16(torch.from_numpy(keys)[s:e] for s, e in block_ranges(n))
        found = dict(zip(places, keys_at(keys, places, counts))) if places else {}
        self.low = self.high = None if lo < hi else 0  # (an empty range: no key is between 0 and 0)
        followed = []
        if lo < hi < n:  # bound below: entries above it are in the range
            last, past = found[hi - 1], found[hi]
            self.low = last if last == past else past
            followed += [last] if last == past and not (free_zero and last == 0) else []
        if 0 < lo < hi:
            before, first = found[lo - 1], found[lo]
            self.high = first if before == first else before
            followed += [first] if before == first and not (free_zero and first == 0) else []
        self.tied_keys = list(dict.fromkeys(followed))
        self.origin = tied_places(keys, self.tied_keys, counts) if followed else EMPTY

    def selection(self, chosen: numpy.ndarray) -> Selection:
        return Selection(self.low, self.high, chosen)

    def walk(self, final: int) -> Selection | None:
        """The sort's partitions along the segments that hold a followed entry and straddle an end, in C
        where `_follow.c` was built (for int16 and int32 keys), else in numpy (`_walk`)."""
        if not self.origin.size:
            return self.selection(EMPTY)
        native = _select.native
        in_c = native is not None and self.keys.dtype in (numpy.int16, numpy.int32) and self.keys.flags.c_contiguous
        kept = numpy.empty(self.origin.size, dtype=numpy.uint8)
        ids = scratch("ids", self.keys.size // 2 if in_c else 0, numpy.int32)  # (`_follow.c`: 2 bytes an entry)
        done = (native.walk if in_c else _walk.walk)(self.keys, self.lo, self.hi, final,
                                                      tuple(int(k) for k in self.tied_keys), self.origin, kept, ids)
        return self.selection(self.origin[kept.view(bool)]) if done else None


@functools.cache
def follows_torch() -> bool:
    """Whether torch's CPU sort and topk keep what `kept_range` says, checked once on entries with
    many ties (float32, as mergekit sorts), sort in both directions and topk; where not (other
    algorithms in another torch build), callers run torch's own."""
    values = torch.from_numpy(numpy.random.default_rng(0).integers(0, 60, 6000).astype(numpy.float32))
    for descending, lo, hi, final in ((True, 0, 2500, SORT), (False, 1000, 4500, SORT), (True, 0, 3000, SELECT)):
        expected = (torch.argsort(values, descending=descending)[lo:hi] if final == SORT
                    else torch.topk(values, hi, sorted=False).indices)
        got = kept_range(keys_of(values.clone(), descending).numpy(), lo, hi, final)
        if got is None or not numpy.array_equal(numpy.flatnonzero(got), numpy.sort(expected.numpy())):
            return False
    return True


def tied_places(keys: numpy.ndarray, tied_keys: list, counts: torch.Tensor | None) -> numpy.ndarray:
    """The places of the entries holding one of `tied_keys`, ascending: 16-bit keys counted in `counts` (their
    histogram) in one pass of `_follow.c` (AVX2, 33M keys: 0.3 ns an entry, where numpy's compare and flatnonzero
    took 0.6), else by numpy."""
    if _select.native is None or counts is None or keys.itemsize != 2:
        return numpy.flatnonzero(_walk.tied(keys, tied_keys))
    origin = numpy.empty(sum(int(counts[int(key) + (1 << 15)]) for key in tied_keys), dtype=numpy.int64)
    if _select.native.places(keys, tuple(int(key) for key in tied_keys), origin) != origin.size:
        raise RuntimeError("tied_places: the keys changed since their histogram was made")
    return origin


def keys_at(keys: numpy.ndarray, places: list[int], counts: torch.Tensor | None = None) -> list:
    """The keys at `places` of the descending order (place p: the (p + 1)-th largest): 16-bit keys from
    one histogram over blocks (or `counts`, where it is made already), with no copy of the keys (a partitioned
    copy is a transient twice their size); wider keys from one copy, numpy's introselect taking one place at a
    time, each after the last in the part past it."""
    if keys.itemsize == 2:
        flat = torch.from_numpy(keys)
        counts = histogram16(flat[s:e] for s, e in block_ranges(keys.size)) if counts is None else counts
        cumulative = counts.flip(0).cumsum(0)  # (once for every place: `_from_top`'s search alone for each)
        found = torch.searchsorted(cumulative, torch.tensor([p + 1 for p in places])).tolist()
        return [keys.dtype.type(counts.numel() - 1 - j - (1 << 15)) for j in found]
    ranked, found, start = buffer(keys.size, keys.dtype), {}, 0
    ranked[:] = keys
    for index in sorted({keys.size - 1 - p for p in places}):  # each later place lies past the one before
        ranked[start:].partition(index - start)
        found[index], start = ranked[index], index
    return [found[keys.size - 1 - p] for p in places]


_held = threading.local()  # this thread's `scratch` memory, by name, within `reusing()`


@contextlib.contextmanager
def reusing() -> Iterator[None]:
    """Within the block, `scratch` hands this thread the same memory again for each name (the selections of
    one tensor's inputs, one after another), freed at its end. A fresh mapping costs its pages' faults and
    zeroing, and unmapping it stops the other worker to flush its TLB: on the 168M TIES job (two workers),
    the two 33M-entry tensors' keys and walk numbers mapped anew for each input made the whole merge take
    2.04 s against 1.78 with them kept for the next input (medians of 3, alternating)."""
    outer = getattr(_held, "buffers", None)
    _held.buffers = {} if outer is None else outer
    try:
        yield
    finally:
        if outer is None:
            _held.buffers = None


def scratch(name: str, n: int, dtype) -> numpy.ndarray:
    """n uninitialized entries of `dtype` (`buffer`), the memory last handed out for `name` on this thread
    where that is big enough and the caller is within `reusing()`: the one who asked before is done with it."""
    buffers = getattr(_held, "buffers", None)
    size = n * numpy.dtype(dtype).itemsize
    if buffers is None:
        return buffer(n, dtype)
    if name not in buffers or buffers[name].size < size:
        buffers[name] = None  # (the smaller one freed first)
        buffers[name] = buffer(size, numpy.uint8)
    return buffers[name][:size].view(dtype)


MAPPED = 16 << 20  # bytes from which a buffer is mapped straight from the kernel


def buffer(n: int, dtype) -> numpy.ndarray:
    """An uninitialized array of n entries; from `MAPPED` bytes on, an anonymous `mmap`, unmapped when
    freed (from malloc, masks just under glibc's 32 MiB mapping ceiling stayed in its arenas after each
    call: the 168M TIES job's anonymous peak 621 MB, 334 mapped), else from torch (no huge pages, which
    numpy asks for from 4 MiB and the kernel here compacts memory for on first touch)."""
    size = max(1, n) * numpy.dtype(dtype).itemsize
    if size >= MAPPED:
        return numpy.frombuffer(mmap.mmap(-1, size), dtype=dtype, count=n)
    return torch.empty(size, dtype=torch.uint8).numpy().view(dtype)[:n]
