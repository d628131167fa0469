"""MagPrune's keep probabilities and draws, each row ranked by magnitude (not a plugin; used by della.py, whose
docstring gives the formula)."""
from __future__ import annotations

import functools

import numpy
import torch

from ._draws import uniform32
from ._mixing import ranked_bits
from ._sparsify import pack


def ramp(n: int, density: float, epsilon: float) -> torch.Tensor:
    """The keep probability of each rank 0 … n − 1 of a row of n (float32, as mergekit computes it)."""
    if n == 1:
        return torch.full((1,), density, dtype=torch.float32)
    return torch.arange(n, dtype=torch.float32).div_(n - 1).mul_(2 * epsilon).add_(density - epsilon)


def keep_probabilities(magnitude: torch.Tensor, density: float, epsilon: float,
                       order: torch.Tensor | None = None) -> torch.Tensor:
    """pⱼ (float32) of each entry of rows of |τ| (R × n, in τ's dtype, ranked in it as mergekit ranks):
    from density − ε for the smallest of a row to density + ε for its largest, linear in the rank;
    equal magnitudes ranked by position. `order`: the rows' `rank_order`, where already known."""
    rows, n = magnitude.shape
    order = rank_order(magnitude) if order is None else order
    return torch.empty(magnitude.shape, dtype=torch.float32).scatter_(1, order, ramp(n, density, epsilon).expand(rows, n))


def draw_keep(magnitude: torch.Tensor, density: float, epsilon: float, bits: numpy.random.SFC64 | None = None,
              order: torch.Tensor | None = None, draws: numpy.ndarray | None = None) -> torch.Tensor:
    """MagPrune's mask (R × n, bool): entry j kept where Uⱼ < pⱼ, U uniform on multiples of 2⁻³² in [0, 1)
    (32 bits of `bits`), so P(keep) = ⌈pⱼ·2³²⌉/2³² for the float32 pⱼ of `keep_probabilities`.
    The draws are made in rank order, the k-th smallest entry of a row compared with the ramp's k-th
    probability, and the result put back in place: no probability is scattered (the draws are
    independent of the magnitudes, so which draw meets which entry changes no distribution). `draws`:
    those 32-bit draws (R × n) where they were made already."""
    rows, n = magnitude.shape
    draws = uniform32(bits, rows * n).reshape(rows, n) if draws is None else draws
    below = torch.from_numpy(draws < thresholds(n, density, epsilon))
    order = rank_order(magnitude) if order is None else order
    return torch.empty(magnitude.shape, dtype=torch.bool).scatter_(1, order, below)


@functools.lru_cache(maxsize=64)
def thresholds(n: int, density: float, epsilon: float) -> numpy.ndarray:
    """⌈pₖ·2³²⌉ for the ramp's probability of each rank k (uint32, read-only): a 32-bit draw below it keeps
    the entry. It fits 32 bits: p ≤ density + ε < 1 is at most 1 − 2⁻²⁴ in float32 (uint32 against uint32
    compares 3× as fast as against int64). Kept for the next block: made anew for each (a dozen torch
    calls on 1024 entries), they took 5% of the 168M DELLA merge."""
    bounds = ramp(n, density, epsilon).double().mul_(2.0 ** 32).ceil_().numpy().astype(numpy.uint32)
    bounds.flags.writeable = False
    return bounds


def rank_order(magnitude: torch.Tensor) -> torch.Tensor:
    """Each row's stable ascending argsort of non-negative magnitudes (R × n, int64).

    Non-negative floats sort like their bit patterns as signed integers of the same width, and with an
    entry's column in the low bits every key is unique: numpy's sort of pattern·2ᵏ + column (k = 16 for
    16-bit patterns in rows of up to 2¹⁶, else 32; `rank_keys`) gives the stable order in its low bits.
    bf16, rows of 1024, one thread: 2.9 ns an entry, against 6.3 for numpy's stable argsort (a radix sort)
    of the patterns and 22 for torch's stable argsort (measured). 64-bit patterns sort in torch."""
    keys = rank_keys(magnitude)
    if keys is None:
        return magnitude.view(torch.int64).argsort(dim=1, stable=True)
    keys &= (1 << (16 if keys.dtype == numpy.int32 else 32)) - 1
    return torch.from_numpy(keys).to(torch.int64)


def rank_keys(magnitude: torch.Tensor) -> numpy.ndarray | None:
    """Each row's keys pattern·2ᵏ + column, sorted (`rank_order`); None for 64-bit patterns."""
    rows, n = magnitude.shape
    size = magnitude.element_size()
    if size == 8:
        return None
    patterns = magnitude.contiguous().view({2: torch.int16, 4: torch.int32}[size]).numpy()
    wide, shift = (numpy.int32, 16) if size == 2 and n <= 1 << 16 else (numpy.int64, 32)
    keys = patterns.astype(wide)
    keys <<= shift
    keys |= numpy.arange(n, dtype=wide)
    keys.sort(axis=1)
    return keys


def draw_packed(magnitude: torch.Tensor, density: float, epsilon: float, bits: numpy.random.SFC64,
                out: numpy.ndarray) -> None:
    """`draw_keep`'s mask as packed bits (`_sparsify.pack`) into `out`: the same draws, compared, put in place
    and packed in one C pass where `_mix` is built (numpy's compare, torch's scatter of the mask and numpy's
    packbits took a fifth of the 168M DELLA merge)."""
    rows, n = magnitude.shape
    draws = uniform32(bits, rows * n).reshape(rows, n)  # (drawn before the ranks, as `draw_keep` draws them)
    keys = rank_keys(magnitude)
    if keys is None or not ranked_bits(keys, draws, thresholds(n, density, epsilon), out):
        out[:] = pack(draw_keep(magnitude, density, epsilon, draws=draws).numpy())
