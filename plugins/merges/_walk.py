"""The walk of `_introsort` in numpy (not a plugin): the partitions of torch's CPU sort along the
segments that hold an end of the range, followed for a few entries, where `_follow.c` was not built.
`walk` has the C walk's contract; the tests run both against torch. The partition is followed in
vectorized windows: the stops in each window found at once and paired with the other end's. The
followed entries' places are kept in `where`; a moved one is found among its segment's places sorted
at the start of a partition (a map from every place held 4 bytes an entry and touched all its pages).
"""
from __future__ import annotations

import numpy

WINDOW = 1 << 16  # entries scanned for stops at once


def walk(keys: numpy.ndarray, lo: int, hi: int, final: int, tied_keys: tuple, origin: numpy.ndarray,
         kept: numpy.ndarray, ids: numpy.ndarray | None = None) -> bool:
    """The C walk's `walk` (`_follow.c`): `kept[i]` set to whether the entry first at `origin[i]` (every
    entry holding a key of `tied_keys`, ascending) ends in places [lo, hi); `keys` scrambled as the
    sort scrambles them. False where a segment that decides would be heapsorted. (`ids`: the C walk's
    room, unused here.)"""
    n, followed = keys.size, Followed(keys, tied_keys, origin)
    todo = [(0, n, 2 * (n.bit_length() - 1), numpy.arange(origin.size))]
    while todo:
        start, end, budget, ids = todo.pop()
        if not ids.size or end <= lo or hi <= start or (lo <= start and end <= hi):
            continue  # (a part dropped or kept whole, or without followed entries: nothing to decide)
        if end - start <= final:  # the final insertion sort's turn: a stable sort
            followed.sort(start, end, ids)
        elif budget == 0:
            return False
        else:
            cut = partition(keys, start, end, Moves(followed, ids))
            left = followed.where[ids] < cut
            todo += [(start, cut, budget - 1, ids[left]), (cut, end, budget - 1, ids[~left])]
    numpy.logical_and(followed.where >= lo, followed.where < hi, out=kept.view(bool))
    return True


def tied(values: numpy.ndarray, tied_keys) -> numpy.ndarray:
    """Where `values` (some keys) hold one of `tied_keys`."""
    marks = values == tied_keys[0]
    for key in tied_keys[1:]:
        marks |= values == key
    return marks


class Followed:
    """The followed entries: `where` holds each one's place now."""

    def __init__(self, keys: numpy.ndarray, tied_keys, origin: numpy.ndarray):
        self.keys, self.tied_keys, self.where = keys, tied_keys, origin.copy()

    def tied(self, values: numpy.ndarray) -> numpy.ndarray:
        return tied(values, self.tied_keys)

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

    def sort(self, start: int, end: int, ids: numpy.ndarray) -> None:
        """The final insertion sort of [start, end): a stable sort, descending."""
        order = numpy.argsort(-self.keys[start:end].astype(numpy.int64), kind="stable")
        rank = numpy.empty_like(order)
        rank[order] = numpy.arange(order.size)  # the entry at start + i goes to start + rank[i]
        self.where[ids] = start + rank[self.where[ids] - start]


class Moves:
    """The moves of one partition of a segment, made on the keys and followed for the segment's
    followed entries `ids`: a moved entry is one of them where its key is tied (`Followed.tied`), and which
    one is found among their places sorted at the start (every place is moved at most once in a
    partition, so the places read are the ones found there)."""

    def __init__(self, ends: Followed, ids: numpy.ndarray):
        self.ends, self.ids, self.places = ends, ids, None

    def begin(self) -> None:
        places = self.ends.where[self.ids]
        order = numpy.argsort(places, kind="stable")
        self.places, self.ids = places[order], self.ids[order]

    def swap(self, a: numpy.ndarray, b: numpy.ndarray) -> None:
        """Swap the entries at places a[t] and b[t] (disjoint index arrays of one length)."""
        keys = self.ends.keys
        at_a, at_b = keys[a], keys[b]
        keys[a], keys[b] = at_b, at_a
        self._follow((a, b, at_a), (b, a, at_b))

    def move(self, a: numpy.ndarray, b: numpy.ndarray) -> None:
        """The entries at places a[t] go to places b[t]; the ones there go to a part whose order no
        longer matters, and none of them is tied at an end (`Followed.settles`)."""
        at_a = self.ends.keys[a]
        self.ends.keys[b] = at_a
        self._follow((a, b, at_a))

    def _follow(self, *moves: tuple[numpy.ndarray, numpy.ndarray, numpy.ndarray]) -> None:
        """For each (from, to, keys that were at places `from`): the followed ones are now at `to`."""
        found = []
        for origin, target, keys in moves:  # (every place read before any is written)
            here = numpy.flatnonzero(self.ends.tied(keys))
            if here.size:
                found.append((self._followed_at(origin[here]), target[here]))
        for numbers, places in found:
            self.ends.where[numbers] = places

    def _followed_at(self, places: numpy.ndarray) -> numpy.ndarray:
        """The numbers of the followed entries at `places` (each holds one)."""
        if self.places is None:  # (the median's swap, before `begin`: a place or two, looked up as they are)
            now = self.ends.where[self.ids]
            return numpy.concatenate([self.ids[now == place] for place in places])
        return self.ids[numpy.searchsorted(self.places, places)]


def partition(keys: numpy.ndarray, start: int, end: int, moves: Moves) -> int:
    """`__unguarded_partition_pivot` on the segment [start, end) of more than 3 entries (the module
    docstring), its moves made through `moves`: returns where the right part starts. Where one part is
    settled whole (`Followed.settles`), the left and right stops are not swapped but only copied into the
    other part: two of four gathers and scatters."""
    m = end - start
    # __move_median_to_first(first, first + 1, mid, last − 1)
    a, b, c = keys[start + 1], keys[start + m // 2], keys[end - 1]
    if a > b:
        median = m // 2 if b > c else m - 1 if a > c else 1
    else:
        median = 1 if a > c else m - 1 if b > c else m // 2
    moves.swap(numpy.array([start]), numpy.array([start + median]))
    moves.begin()
    pivot = keys[start]
    settled = moves.ends.settles(pivot)
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
                moves.move(at_left, at_right)
            elif settled == "right":
                moves.move(at_right, at_left)
            else:
                moves.swap(at_left, at_right)
            first, last = int(at_left[-1]) + 1, int(at_right[-1])
            left, right = left[swaps:], right[swaps:]
        if swaps < pairs:
            return min(int(left[0]), last)
