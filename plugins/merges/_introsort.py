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
against the sort's 150, holding keys, a mask and int32 places (7 bytes an entry) where the sort holds
keys, an int64 order and the int64 range it fills the order from (18) and topk (value, index) pairs
(16). A segment whose budget runs out (the sort would heapsort it; an organ pipe does, real tensors
have not) gives None: the caller sorts as mergekit does. `follows_torch` checks these rules against
torch's own sort and topk once per process.
"""
from __future__ import annotations

import functools

import numpy
import torch

from ._base import as_bits
from ._select import buffer, keys_at

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
    array (`keys_of(...).numpy()`), which is scrambled. None where a segment that decides would be
    heapsorted. The moves are made on the keys alone; of the entries, those tied at an end are followed
    (`Ends`)."""
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
    They are about 1 in 70 of the 168M benchmark's bf16 task vectors; an int32 place moved with every
    key cost as much as the keys' own moves (benchmarks/RESULTS.md, 2026-12-06 night)."""

    def __init__(self, keys: numpy.ndarray, lo: int, hi: int):
        n = keys.size
        self.keys, self.lo, self.hi = keys, lo, hi
        ends = keys_at(keys, [place for place, past in ((hi - 1, hi < n), (lo, lo > 0)) if past])
        self.low = ends.pop(0) if hi < n else None  # (None: no entry is past that end)
        self.high = ends.pop(0) if lo > 0 else None
        self.tied_keys = [key for key in dict.fromkeys((self.low, self.high)) if key is not None]
        self.inside, scratch = buffer(n, bool), buffer(n, bool)
        if self.low is not None:
            numpy.greater(keys, self.low, out=self.inside)
        else:
            self.inside[:] = True
        if self.high is not None:
            self.inside &= numpy.less(keys, self.high, out=scratch)
        self.origin = numpy.concatenate([numpy.flatnonzero(numpy.equal(keys, key, out=scratch))
                                         for key in self.tied_keys])
        del scratch
        self.where = self.origin.copy()
        self.slot = buffer(n, numpy.int32 if self.origin.size < 2**31 else numpy.int64)
        self.slot[self.origin] = numpy.arange(self.origin.size)

    def tied(self, values: numpy.ndarray) -> numpy.ndarray:
        """Where `values` (a few of the keys) hold a key of an end (low or high)."""
        marks = values == self.tied_keys[0]
        for key in self.tied_keys[1:]:
            marks |= values == key
        return marks

    def swap(self, a: numpy.ndarray, b: numpy.ndarray) -> None:
        """Swap the entries at places a[t] and b[t] (disjoint index arrays of one length)."""
        at_a, at_b = self.keys[a], self.keys[b]
        self.keys[a], self.keys[b] = at_b, at_a
        self._follow((a, b, at_a), (b, a, at_b))

    def move(self, a: numpy.ndarray, b: numpy.ndarray) -> None:
        """The entries at places a[t] go to places b[t]; the ones there go to a part whose order no
        longer matters, and none of them is tied at an end (`settles`)."""
        at_a = self.keys[a]
        self.keys[b] = at_a
        self._follow((a, b, at_a))

    def _follow(self, *moves: tuple[numpy.ndarray, numpy.ndarray, numpy.ndarray]) -> None:
        """For each (from, to, keys that were at places `from`): the tied ones are now at `to`."""
        found = []
        for origin, target, keys in moves:  # (every number read before any is written)
            here = numpy.flatnonzero(self.tied(keys))
            found.append((self.slot[origin[here]], target[here]))
        for numbers, places in found:
            self.where[numbers] = places
            self.slot[places] = numbers

    def settles(self, pivot) -> str | None:
        """Which part of a partition around `pivot` is settled whole, so that only the other one's order
        matters: "left" where the pivot is above every tied key (the left part's entries are all above
        them, so it lies before place lo, or in [0, hi) with lo = 0), "right" where it is below them
        all (the right part lies after place hi − 1), else None. A tied entry then never stops the scan
        from the settled side's end, and only half the moves are made."""
        if all(key < pivot for key in self.tied_keys):
            return "left"
        if all(key > pivot for key in self.tied_keys):
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
        # how many pair and swap: a prefix, as Lₜ rises and Rₜ falls (a binary search, faster than a compared
        # mask and than bisect with a key)
        low, high = 0, pairs
        while low < high:
            mid = (low + high) // 2
            if left[mid] < right[mid]:
                low = mid + 1
            else:
                high = mid
        swaps = low
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
