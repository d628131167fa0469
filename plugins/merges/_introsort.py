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
whose `__introselect` is that quickselect itself (down to 3 entries). The partition is followed in
vectorized windows: the stops in each window are found at once and paired with the other end's.

Measured on the 168M benchmark's bf16 task vectors, one thread, half kept: 2.9M entries in 24 ms
(34 when every entry's int32 place moved with its key and every partition swapped, see `Ends`)
against the sort's 150, 32.8M in 0.38 s (0.46) against 1.8, holding keys, a mask and int32 places
(7 bytes an entry) where the sort holds keys, an int64 order and the int64 range it fills the order
from (18) and topk (value, index) pairs (16). A segment whose budget runs out (the sort would
heapsort it; an organ pipe does, real tensors have not) gives None: the caller sorts as mergekit
does. `follows_torch` checks these rules against torch's own sort and topk once per process.
"""
from __future__ import annotations

import functools
import mmap

import numpy
import torch

from ._base import as_bits

SORT, SELECT = 16, 3  # segments left to a final insertion sort: std::sort's, std::nth_element's
WINDOW = 1 << 16  # entries scanned for stops at once


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


def kept_range(keys: numpy.ndarray, lo: int, hi: int, final: int = SORT) -> numpy.ndarray | None:
    """A bool mask over the entries: True where `std::sort` with comp(x, y) = x > y (descending)
    puts the entry in places [lo, hi); with `final=SELECT` and lo = 0, where `std::nth_element` at
    place hi − 1 does (torch's topk of more than 1/64 of the entries), whose `__introselect` makes the
    same partitions along one path and insertion-sorts the last ≤ 3 entries. `keys`: a flat integer
    array (`keys_of(...).numpy()`), which is scrambled. None where a segment that decides would be heapsorted.

    Only the entries whose key equals the one at place lo or hi − 1 can end on either side of the
    range (`Ends`): the others are in it exactly when their key lies between those two. So the moves are
    made on the keys alone, and of the entries only those tied at an end are followed to their places."""
    n = keys.size
    lo, hi = max(lo, 0), min(hi, n)
    if hi <= lo or (lo == 0 and hi == n):
        return numpy.full(n, hi > lo, dtype=bool)
    ends = Ends(keys, lo, hi)
    todo = [(0, n, 2 * (n.bit_length() - 1))]
    while todo:
        start, end, budget = todo.pop()
        if end <= lo or hi <= start or (lo <= start and end <= hi):
            continue  # (a part dropped or kept whole: its tied entries' places stay inside it)
        if end - start <= final:  # the final insertion sort's turn: a stable sort
            ends.sort(start, end)
        elif budget == 0:
            return None
        else:
            cut = partition(keys, start, end, ends)
            todo += [(start, cut, budget - 1), (cut, end, budget - 1)]
    return ends.kept()


class Ends:
    """The entries tied at an end of the range [lo, hi), followed to their places through the moves.

    With `low` the key at place hi − 1 and `high` the one at place lo (`keys_at`), an entry with
    low < key < high ends in the range whatever the moves, one outside [low, high] out of it. An entry
    with key low or high is tracked: `where` holds its place now and `slot`, at that place, its number.
    Keeping an int32 place for every entry and moving it with its key took as long as moving the keys;
    these entries are about 1 in 70 of the 168M benchmark's bf16 task vectors. With the moves halved
    where a part is settled (`settles`), the 168M TIES job took 6.4 s against 7.4 (median of 5,
    alternating)."""

    def __init__(self, keys: numpy.ndarray, lo: int, hi: int):
        n = keys.size
        self.keys, self.lo, self.hi = keys, lo, hi
        ends = keys_at(keys, [place for place, past in ((hi - 1, hi < n), (lo, lo > 0)) if past])
        self.low = ends.pop(0) if hi < n else None  # (None: no entry is past that end)
        self.high = ends.pop(0) if lo > 0 else None
        self.inside, scratch = buffer(n, bool), buffer(n, bool)
        if self.low is not None:
            numpy.greater(keys, self.low, out=self.inside)
        else:
            self.inside[:] = True
        if self.high is not None:
            self.inside &= numpy.less(keys, self.high, out=scratch)
        tied = [numpy.flatnonzero(numpy.equal(keys, key, out=scratch)) for key in dict.fromkeys((self.low, self.high))
                if key is not None]
        del scratch
        self.origin = tied[0] if len(tied) == 1 else numpy.concatenate(tied)  # (numbers in any order)
        self.where = self.origin.copy()
        self.slot = buffer(n, numpy.int32 if self.origin.size < 2**31 else numpy.int64)
        self.slot[self.origin] = numpy.arange(self.origin.size)

    def tied(self, values: numpy.ndarray) -> numpy.ndarray:
        """Where `values` (a few of the keys) hold a key of an end (low or high)."""
        if self.low is None:
            return values == self.high
        marks = values == self.low
        if self.high is not None and self.high != self.low:
            marks |= values == self.high
        return marks

    def swap(self, a: numpy.ndarray, b: numpy.ndarray) -> None:
        """Swap the entries at places a[t] and b[t] (disjoint index arrays of one length)."""
        keys = self.keys
        at_a, at_b = keys[a], keys[b]
        keys[a], keys[b] = at_b, at_a
        moves = [self._tied(a, at_a), self._tied(b, at_b)]  # (both read before either is written)
        for (here, numbers), there in zip(moves, (b, a)):
            self._write(numbers, there[here])

    def move(self, a: numpy.ndarray, b: numpy.ndarray) -> None:
        """The entries at places a[t] go to places b[t]; the ones there go to a part whose order no
        longer matters, and none of them is tied at an end (`settles`)."""
        at_a = self.keys[a]
        self.keys[b] = at_a
        self._moved(a, b, at_a)

    def _moved(self, a: numpy.ndarray, b: numpy.ndarray, at_a: numpy.ndarray) -> None:
        """The tied ones of the entries `at_a` that were at places a[t] are now at b[t]."""
        here, numbers = self._tied(a, at_a)
        self._write(numbers, b[here])

    def _tied(self, a: numpy.ndarray, at_a: numpy.ndarray) -> tuple[numpy.ndarray, numpy.ndarray]:
        """(t where `at_a`, the keys at places a, is tied; those entries' numbers)."""
        here = numpy.flatnonzero(self.tied(at_a))
        return here, self.slot[a[here]]

    def _write(self, numbers: numpy.ndarray, places: numpy.ndarray) -> None:
        self.where[numbers] = places
        self.slot[places] = numbers

    def settles(self, pivot) -> str | None:
        """Which part of a partition around `pivot` is settled whole, so that only the other one's order
        matters: "left" where the pivot is above every tied key (the left part's entries are all above
        them, so it lies before place lo, or in [0, hi) with lo = 0), "right" where it is below them
        all (the right part lies after place hi − 1), else None. A tied entry then never stops the scan
        from the settled side's end, and only half the moves are made."""
        ends = [key for key in (self.low, self.high) if key is not None]
        if all(key < pivot for key in ends):
            return "left"
        if all(key > pivot for key in ends):
            return "right"
        return None

    def sort(self, start: int, end: int) -> None:
        """The final insertion sort of [start, end): a stable sort, descending."""
        segment = self.keys[start:end]
        order = numpy.argsort(-segment.astype(numpy.int64), kind="stable")
        moved = self.tied(segment[order])  # place start + r gets the entry at start + order[r]
        self.where[self.slot[start + order[moved]]] = start + numpy.flatnonzero(moved)

    def kept(self) -> numpy.ndarray:
        kept = self.inside
        kept[self.origin[(self.where >= self.lo) & (self.where < self.hi)]] = True
        return kept


def keys_at(keys: numpy.ndarray, places: list[int]) -> list:
    """The keys at `places` of the descending order (place p: the (p + 1)-th largest). 16-bit keys
    from one histogram over blocks, 2¹⁶ counts and no copy of the keys (a copy partitioned by
    numpy's introselect, one place at a time, is a transient twice the keys' size); wider keys from
    such copies."""
    n = keys.size
    if keys.itemsize == 2:
        flat, counts = torch.from_numpy(keys), torch.zeros(1 << 16, dtype=torch.int64)
        for start in range(0, n, WINDOW * 16):
            counts += torch.bincount(flat[start:start + WINDOW * 16].to(torch.int32).add_(1 << 15), minlength=1 << 16)
        above = counts.flip(0).cumsum(0)  # above[j]: the keys ≥ 2¹⁵ − 1 − j
        found = torch.searchsorted(above, torch.tensor(places, dtype=torch.int64), right=True)
        return [keys.dtype.type((1 << 15) - 1 - int(j)) for j in found]
    ranked, found = buffer(n, keys.dtype), []
    for p in places:
        ranked[:] = keys
        ranked.partition(n - 1 - p)
        found.append(ranked[n - 1 - p])
    return found


MAPPED = 16 << 20  # bytes from which a buffer is mapped straight from the kernel


def buffer(n: int, dtype) -> numpy.ndarray:
    """An uninitialized array of n entries. From `MAPPED` bytes on, mapped straight from the kernel
    (anonymous `mmap`) and unmapped when freed: from malloc (numpy's or torch's) the vocabulary-sized
    ones, just under glibc's 32 MiB ceiling for mapping on its own, stayed in its arenas after each
    call (the 168M TIES job's anonymous peak: 621 MB, 334 with these mapped). Smaller ones come from torch,
    whose malloc reuses their pages (mapped afresh, their page faults cost more than the ranges).
    Neither asks for huge pages, as numpy does from 4 MiB, which the kernel here compacts memory for
    on first touch (the 168M SCE job's 78 int32 ranges took 0.33 s from numpy, 0.10 without)."""
    size = max(1, n) * numpy.dtype(dtype).itemsize
    if size >= MAPPED:
        return numpy.frombuffer(mmap.mmap(-1, size), dtype=dtype, count=n)
    return torch.empty(size, dtype=torch.uint8).numpy().view(dtype)[:n]


def partition(keys: numpy.ndarray, start: int, end: int, ends: Ends) -> int:
    """`__unguarded_partition_pivot` on the segment [start, end) of more than 3 entries (the module
    docstring), its moves made through `ends`: returns where the right part starts. Where one part is
    settled whole (`Ends.settles`), the left and right stops are not swapped but only copied into the
    other part: two of four gathers and scatters."""
    m = end - start
    # __move_median_to_first(first, first + 1, mid, last − 1)
    a, b, c = keys[start + 1], keys[start + m // 2], keys[end - 1]
    if a > b:
        median = m // 2 if b > c else m - 1 if a > c else 1
    else:
        median = 1 if a > c else m - 1 if b > c else m // 2
    ends.swap(numpy.array([start]), numpy.array([start + median]))
    pivot = keys[start]
    settled = ends.settles(pivot)
    first, last = start + 1, end  # entries not yet swapped: [first, last)
    left_seen, right_seen = first, last  # scanned for stops: [first, left_seen) and [right_seen, last)
    left = right = numpy.empty(0, dtype=numpy.int64)  # stops scanned, not yet paired
    while True:
        if not left.size:
            if left_seen >= last:  # no left stop before Rₜ₋₁: the left part ends there
                return last
            stop = min(left_seen + WINDOW, last)
            left = numpy.flatnonzero(keys[left_seen:stop] <= pivot)
            left += left_seen
            left_seen = stop
            continue
        if not right.size:
            if right_seen <= first:  # Rₜ is at or before Lₜ₋₁: no more swaps
                return min(int(left[0]), last)
            begin = max(right_seen - WINDOW, first)
            right = numpy.flatnonzero(keys[begin:right_seen] >= pivot)[::-1]
            right += begin
            right_seen = begin
            continue
        pairs = min(left.size, right.size)
        swaps = prefix(left, right, pairs)
        if swaps:
            at_left, at_right = left[:swaps], right[:swaps]
            if settled == "left":
                ends.move(at_left, at_right)
            elif settled == "right":
                ends.move(at_right, at_left)
            else:
                ends.swap(at_left, at_right)
            first, last = int(at_left[-1]) + 1, int(at_right[-1])
            left, right = left[swaps:], right[swaps:]
        if swaps < pairs:
            return min(int(left[0]), last)


def prefix(left: numpy.ndarray, right: numpy.ndarray, pairs: int) -> int:
    """How many t < pairs have left[t] < right[t]: a prefix, as left rises and right falls (a binary
    search: a few scalar reads where a comparison of every pair made and counted a mask)."""
    low, high = 0, pairs  # left[t] < right[t] for t < low; not for t ≥ high
    while low < high:
        mid = (low + high) // 2
        if left[mid] < right[mid]:
            low = mid + 1
        else:
            high = mid
    return low


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
