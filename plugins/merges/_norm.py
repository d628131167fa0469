"""karcher's reductions of bf16 tensors with torch's own order and roundings, in one C pass each (`_mix.c`'s `norm`
and `dots`), where the install built `_mix` and a probe finds the two equal (not a plugin).

torch's CPU norm of a contiguous float32 tensor (its `norm_two_reduce_step` path) sums the squares in eight float32
lanes, then the lanes, then the last entries (`_mix.c` says how). That was read from torch 2.13's results, not from
a promise: another build may add otherwise, so `exact` compares the two on vectors of every tail length (float32 and
bf16) before the C pass is used; where they differ, the callers keep torch's ops. karcher's norms of bf16 tensors
then need no float32 copy: the 168M job's tensors of one model, one thread, 0.025 s against 0.060 for the copies
into a reused buffer and torch's norms; the karcher merge's work 1.60 → 1.49 s (in one process, medians of 8,
alternating).

torch's dot of two bf16 vectors of more than 4096 entries is, on a CPU with AVX-512 BF16, oneDNN's 1×n by n×1
matmul, which adds chunks of 512 entries in turn (`_mix.c` says how): one output lane, one addition after another.
`exact_dots` checks that order against torch on sums built to sit on a bf16 rounding boundary; where it holds,
`unit_dots` gives karcher's dots of the mean with every unit vector in one C pass from the inputs (the unit vectors
made in registers, 16 chunks side by side): the karcher merge's work 1.24 → 0.68 s. Elsewhere (a CPU with AVX2
only, where torch uses another kernel; AMX, whose oneDNN kernel may add otherwise; another torch) the probe decides,
and where it fails karcher keeps torch's unit vectors and dots."""
from __future__ import annotations

import functools
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from ._base import as_bits
from ._mixing import native


@functools.lru_cache(maxsize=None)
def exact() -> bool:
    """Whether `_mix` is built and its sums of squares are torch's on this install (probed once)."""
    if native is None:
        return False
    generator = torch.Generator().manual_seed(0)
    # Every tail length, 16 vectors each, of values in [0.5, 2) (full mantissas: each square rounds): summed in
    # one other plausible way (the tail all fused, none fused, or 16 lanes) 16 to 133 of these 624 norms differ.
    for length in (*range(1, 40), 1013):
        for _ in range(16 if length < 40 else 1):
            x = torch.rand(length, generator=generator) * 1.5 + 0.5
            for y, dtype in ((x, "float32"), (x.to(torch.bfloat16), "bfloat16")):
                if native.norm(as_bits(y).numpy(), dtype) != torch.linalg.vector_norm(y.float()).item():
                    return False
    return True


def float_norm(x: torch.Tensor) -> torch.Tensor | None:
    """`torch.linalg.vector_norm(x.float())` (0-d float32) of a contiguous bf16 tensor on the CPU without its
    float32 copy, where `exact()`; else None (nothing done)."""
    if x.dtype != torch.bfloat16 or x.device.type != "cpu" or not x.is_contiguous() or not exact():
        return None
    return torch.tensor(native.norm(as_bits(x).numpy(), "bfloat16"), dtype=torch.float32)


# torch's `dot` of bf16 vectors longer than this is oneDNN's matmul (`_mix.c` says how it adds); of shorter ones
# another kernel's, which stays torch's.
ONE_DNN_FROM = 4097


def probe_pair(length: int, divisor: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 (m, x) whose ⟨m, R(x/divisor)⟩ lies within float32 rounding of a bf16 rounding boundary (1 + 2⁻⁸) after
    partial sums up to 2¹², so that each way of adding them lands on its own side of it: six entries of m (at
    random places) are set in turn to bring the exact sum there."""
    def wide(size: int, spread: int) -> torch.Tensor:
        return (torch.randn(size, generator=generator)
                * torch.exp2(torch.randint(-spread, spread, (size,), generator=generator).float())).bfloat16()

    x, m = wide(length, 4), wide(length, 8)
    unit = torch.div(x, torch.tensor(divisor))
    spots = torch.randperm(length, generator=generator)[:6]
    m[spots] = 0
    total = (m.double() * unit.double()).sum().item()
    for spot in spots.tolist():
        if unit[spot] != 0:
            m[spot] = (1 + 2 ** -8 - total) / unit[spot].double().item()
            total += m[spot].double().item() * unit[spot].double().item()
    return m, x


PROBE_LENGTHS = (4097, 5000, 8192, 8193, 9001, 16383, 16896, 20001, 25087, 40000)


@functools.lru_cache(maxsize=None)
def exact_dots() -> bool:
    """Whether `_mix`'s dots are torch's on this install (probed once: 20 sums built to sit on a bf16 rounding
    boundary, with divisions by 1 and 3; every other chunk size, no chunks, or the even entry first, differs on
    some, `test_merge_c_dots.py`)."""
    if native is None:
        return False
    generator = torch.Generator().manual_seed(0)
    for length in PROBE_LENGTHS:
        for divisor in (1.0, 3.0):
            m, x = probe_pair(length, divisor, generator)
            total = native.dots(as_bits(m).numpy(), (as_bits(x).numpy(),), (divisor,))[0]
            if total is None or torch.tensor(total).bfloat16() != torch.dot(m, torch.div(x, torch.tensor(divisor))):
                return False
    return True


def unit_dots(mean: torch.Tensor, tensors: Sequence[torch.Tensor], norms: Sequence[torch.Tensor],
              threads: int = 1) -> list[torch.Tensor | None] | None:
    """[torch.dot(mean, R(x/n)) for x, n] of contiguous bf16 CPU tensors of one length, longer than 4096 entries,
    with `exact_dots()`: 0-d bf16 tensors, R(x/n) as `torch.div(x, n)` makes it (n = 0: zeros); an entry is None
    where the C pass cannot promise torch's sum (an operand below 2⁻⁵⁰, an inf or a NaN: `_mix.c`). None (nothing
    done) where it does not apply. Up to `threads` threads, each with a share of the inputs."""
    if not all(t.dtype == torch.bfloat16 and t.device.type == "cpu" and t.is_contiguous()
               and t.numel() == mean.numel() for t in (mean, *tensors)) or mean.numel() < ONE_DNN_FROM:
        return None
    if not exact_dots():
        return None
    bits, values = as_bits(mean).numpy(), [float(n) for n in norms]
    shares = max(1, min(threads, len(tensors)))
    cuts = [len(tensors) * s // shares for s in range(shares + 1)]

    def share(s: int) -> tuple:
        part = range(cuts[s], cuts[s + 1])
        return native.dots(bits, tuple(as_bits(tensors[i]).numpy() for i in part), tuple(values[i] for i in part))

    if shares == 1:
        totals = share(0)
    else:
        with ThreadPoolExecutor(max_workers=shares) as pool:
            totals = [t for part in pool.map(share, range(shares)) for t in part]
    return [None if t is None else torch.tensor(t, dtype=torch.float32).to(torch.bfloat16) for t in totals]
