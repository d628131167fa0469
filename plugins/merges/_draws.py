"""DARE's random keep masks, drawn block by block (not a plugin; used by `_sparsify` and DELLA)."""
from __future__ import annotations

import numpy
import torch


class Draws:
    """One input's random keep masks, [U < p] for U uniform on multiples of 2⁻⁴⁴ in [0, 1), from
    numpy's SFC64 seeded by one draw from the engine's torch generator for that input: the masks
    depend on (seed, tensor, input) only, never on threads or order. P(keep) = ⌊p·2⁴⁴⌋/2⁴⁴.

    U is compared with p bit by bit from the top, 64 entries a word ("bit planes"): word j of plane
    i holds bit i of U for entries 64j … 64j + 63. An entry is decided at the first bit where U and p
    differ (kept where U has 0 and p has 1); only the 1 in 2¹² whose first PLANES = 12 bits equal
    p's draw 32 more bits each, compared with p's next 32. An entry costs 12 random bits instead of
    32 for a whole 32-bit U (measured on 1M-entry blocks, one thread: 0.8 ms a mask against 1.3 ms),
    and only as many planes as p's last 1 bit needs where p has no bits past the 12th (0.5: one).
    Each block's mask is drawn once, in block order on the first pass, and kept as bits (n/8 bytes)
    for later passes (DARE's L1 rescale makes two): with `n`, the tensor's entry count, in one buffer,
    so that once every block is drawn the whole mask is one (`whole`)."""

    PLANES = 12

    def __init__(self, generator: torch.Generator, n: int | None = None):
        self.bits = bit_generator(generator)
        self.drawn: dict[int, tuple[int, numpy.ndarray]] = {}  # block start -> (entries, packed mask)
        self.n, self.mask = n, None if n is None else numpy.empty((n + 7) // 8, dtype=numpy.uint8)

    def below(self, start: int, count: int, p: float) -> numpy.ndarray:
        """The mask of the block of `count` entries starting at flat index `start`, as bits (`_sparsify.pack`); for
        the whole tensor, once its blocks are drawn (`whole`), their masks end to end."""
        if (start, count) == (0, self.n) and (whole := self.whole()) is not None:
            return whole
        if start not in self.drawn:
            bits = self._draw(count, p)
            if self.mask is not None and start % 8 == 0 and start + count <= self.n:  # (its bytes in the buffer)
                size = (count + 7) // 8
                self.mask[start // 8:start // 8 + size] = bits[:size]
                bits = self.mask[start // 8:start // 8 + size]
            self.drawn[start] = (count, bits)
        drawn, bits = self.drawn[start]
        if drawn != count:  # every pass goes over the same blocks
            raise AssertionError(f"block at {start} drawn with {drawn} entries, asked again with {count}")
        return bits

    def whole(self) -> numpy.ndarray | None:
        """The mask of all n entries as bits in one buffer, once the blocks drawn in it (each from a whole
        byte) cover them one after another; else None."""
        if self.mask is None:
            return None
        end = 0
        for start in sorted(self.drawn):
            if start != end or start % 8 or self.drawn[start][1].base is not self.mask:
                return None
            end += self.drawn[start][0]
        return self.mask if end == self.n else None

    def _draw(self, n: int, p: float) -> numpy.ndarray:
        """[U < p] for n entries, as bits (the class docstring)."""
        scaled = int(p * 2 ** (self.PLANES + 32))  # exact: p·2⁴⁴ < 2⁵³
        if scaled >= 2 ** (self.PLANES + 32):
            return numpy.full((n + 7) // 8, 255, dtype=numpy.uint8)
        if not scaled:  # p < 2⁻⁴⁴: nothing is below it
            return numpy.zeros((n + 7) // 8, dtype=numpy.uint8)
        head, tail = scaled >> 32, scaled & 0xFFFFFFFF
        # Planes past p's last 1 bit decide nothing: an entry equal to p so far is not below it there.
        used = self.PLANES if tail else self.PLANES + 1 - (head & -head).bit_length()
        words = (n + 63) // 64
        planes = self.bits.random_raw(used * words).astype("<u8", copy=False).reshape(used, words)
        kept = numpy.zeros(words, dtype="<u8")
        open_ = numpy.full(words, 2**64 - 1, dtype="<u8")  # entries whose U matches p so far
        for i, u in enumerate(planes):
            if head >> (self.PLANES - 1 - i) & 1:  # p has 1: U with 0 is below it
                kept |= open_ & ~u
                open_ &= u
            else:  # p has 0: U with 1 is above it
                open_ &= ~u
        mask = kept.view(numpy.uint8)  # (entry 64j + b: bit b % 8 of byte 8j + b // 8, as `_sparsify.pack`)
        if not tail:
            return mask
        where = numpy.flatnonzero(open_)  # words with an entry still open, then those entries
        bits = numpy.flatnonzero(numpy.unpackbits(open_[where].view(numpy.uint8), bitorder="little"))
        ties = where[bits >> 6] * 64 + (bits & 63)
        ties = ties[ties < n]
        if ties.size:
            more = uniform32(self.bits, ties.size)
            below = ties[more < tail]
            numpy.bitwise_or.at(mask, below >> 3, (1 << (below & 7)).astype(numpy.uint8))
        return mask


def bit_generator(generator: torch.Generator) -> numpy.random.SFC64:
    """numpy's SFC64 seeded by one draw from a torch generator (the engine's, one per tensor and input):
    random bits several times as fast as torch's CPU generator (Mersenne Twister), and as reproducible."""
    return numpy.random.SFC64(int(torch.randint(0, 2**62, (), generator=generator)))


def uniform32(bits: numpy.random.SFC64, count: int) -> numpy.ndarray:
    """`count` independent uniform 32-bit unsigned integers (a uint32 vector), two from each 64-bit draw."""
    return bits.random_raw((count + 1) // 2).astype("<u8", copy=False).view("<u4")[:count]
