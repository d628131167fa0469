"""Sums to one number on merge workers with fewer threads than the command, in the command's split (not a plugin).

torch's CPU sum of a whole tensor to one number is split over its threads, each part rounded to the dtype, so its
bytes depend on the thread count; mergekit runs on torch's own count. A merge worker of fewer threads (two workers
of one on two cores) sums as the command's count would, so the operators using `whole_sum` (model_stock's, slerp's
and nuslerp's angles) give the same bytes on any `--threads`.
"""
from __future__ import annotations

import contextlib
import functools
import math

import torch

from adaptkit.plugin import command_threads

from ._base import as_bits

GRAIN = 32768  # torch's internal GRAIN_SIZE: a reduction of fewer entries runs on one thread


def whole_sum(x: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
    """`x.sum(dim=-1, keepdim=keepdim)` as the merge command's own thread sums it (`command_threads()`, T), also on
    a worker with fewer threads, where the result is one number (one row) on the CPU. From GRAIN entries on,
    torch's CPU sum to one number (TensorIterator's two-pass reduction) sums min(T, ⌈n/GRAIN⌉) parts of
    ⌈n/parts⌉ entries, one a thread, into a buffer of T entries of the dtype (+0 where no part), then that buffer
    on one thread; here each part is summed on one thread in turn. The same bytes for bf16, float16 and float32,
    T = 2 to 16, 10³ to 3·10⁷ entries (150 of 150 against torch; one thread's own sum differs from two threads' on
    a quarter of them). Where a probe finds torch splitting otherwise (another build), the worker sums on T
    threads itself (slower: its OpenMP team spins beside the other worker's)."""
    threads = command_threads()
    if threads in (None, torch.get_num_threads()) or x.shape[:-1].numel() != 1 or x.shape[-1] < GRAIN or (
            x.device.type != "cpu"):
        return x.sum(dim=-1, keepdim=keepdim)
    shape = x.shape[:-1] + ((1,) if keepdim else ())
    if not _splits_as_torch(threads):
        with _threads(threads):
            return x.sum(dim=-1, keepdim=keepdim)
    with _threads(1):
        return _split_sum(x.reshape(-1), threads).view(shape)


def _split_sum(x: torch.Tensor, threads: int) -> torch.Tensor:
    """torch's two-pass sum of `x` over `threads` threads, made on this thread (see `whole_sum`)."""
    parts = min(threads, math.ceil(x.numel() / GRAIN))
    size = math.ceil(x.numel() / parts)
    buffer = torch.zeros(threads, dtype=x.dtype)
    for p in range(parts):
        buffer[p] = x[p * size:(p + 1) * size].sum()
    return buffer.sum()


@functools.lru_cache(maxsize=None)
def _splits_as_torch(threads: int) -> bool:
    """Whether torch's sums to one number over `threads` threads are `_split_sum`'s here (probed once a count, in
    6 ms: three vectors in bf16 and float32, parts of every size class)."""
    generator = torch.Generator().manual_seed(0)
    for length in (GRAIN + 1, 70_001, 2 * GRAIN * threads + 17):
        x = torch.randn(length, generator=generator) * torch.exp2(torch.randint(-8, 2, (length,), generator=generator))
        for y in (x, x.to(torch.bfloat16)):
            with _threads(threads):
                expected = y.sum()
            with _threads(1):
                if not torch.equal(as_bits(_split_sum(y, threads)), as_bits(expected)):
                    return False
    return True


@contextlib.contextmanager
def _threads(count: int):
    """torch's threads on this thread set to `count` within."""
    now = torch.get_num_threads()
    if count != now:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if count != now:
            torch.set_num_threads(now)
