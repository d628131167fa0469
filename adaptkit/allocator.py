"""glibc malloc settings for the `adaptkit` command; the library itself changes no process-wide state.

Two workloads run better with glibc's malloc tuned:

- "blocks" and "tensors" (the merge engine): glibc serves every block above its mmap threshold
  (which rises with the blocks freed, to at most 32 MB) with fresh pages and unmaps them on free,
  and first-touching fresh pages costs more than the arithmetic of a merge.
  - "blocks", for elementwise operators, which see big tensors in row blocks: keeping every block
    in the heap (mmap and trim thresholds at 1 GiB) lets each reuse the last one's memory; one
    arena makes the worker threads share one heap instead of each keeping its own. The engine's
    working-memory budget bounds how large that heap gets.
  - "tensors", for operators that see whole tensors: the mmap threshold fixed at 32 MB and nothing
    trimmed, so tensors up to 32 MB reuse freed memory while bigger ones (embeddings) are still
    mapped and given back. The "blocks" settings there left tensor-sized holes in one heap that
    never shrinks (168M benchmark, peak MB with / without: multislerp 1185 / 1042, karcher 1017 /
    822, nuslerp 888 / 698, model_stock 1014 / 769); one arena slowed the task-arithmetic family's
    two workers (TIES +6 %, dare_ties +12 %, DELLA +11 %). With "tensors", A/B on the 168M job
    against no tuning, medians of 3-7 runs in two or three sessions, same bytes, peaks within
    ±25 MB: wall × 0.82-0.92 for model_stock, 0.78-0.86 multislerp, 0.82-0.94 nuslerp, 0.88-0.90
    SCE, 0.91-0.95 karcher, 0.96 slerp; the task-arithmetic family 0.97-1.03.
  (`benchmarks/merge.py` measures merges through the command.)
- "quantized" (quantized base layers, QLoRA): each layer makes a full-precision weight every time
  it runs, then drops it. Fresh allocations of those fragmented glibc's heap around the saved
  activations (its mmap threshold rises to 32 MB after the first such free), and the heap only
  grew (QLoRA training on the CPU peaked at 1117 MB of RSS); a fixed 1 MB threshold fixed that but
  mapped every activation and gradient afresh too, each page faulted in on every step (a QLoRA step
  0.6-0.8x as fast as PEFT's). Now the layers unpack into one reused scratch buffer (with the 4-bit
  torch path's chunk buffers: quant/quantized.py, plugins/quantizers/_fourbit_unpack.py) and the
  threshold is fixed at 32 MB: activations reuse the heap, only blocks above 32 MB (the logits over
  a vocabulary) are mapped. (`benchmarks/qlora.py`: share of the bf16 weights 0.49 and 0.44 with
  double quantization, target ≤ 0.5; `benchmarks/train.py --qlora --repeat 3`: 1.05x PEFT's
  tokens/s, single runs 0.99-1.21x.)

mallopt settings hold for the whole process and cannot be read back, so they cannot be restored:
a library must not make them for its caller. The `adaptkit` command opts in for the length of
each command (`tuning()`, entered by the CLI boundary); the merge engine and the quantized-model
loader call `tune(workload)` as their work starts, which does nothing outside such a block (a
script or notebook importing adaptkit) or with a C library other than glibc. A benchmark that
measures these workloads through the library enters `tuning()` itself.
"""
from __future__ import annotations

import ctypes
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc's <malloc.h>

#: mallopt (parameter, value) pairs per workload, applied in this order.
SETTINGS = {
    "blocks": ((M_MMAP_THRESHOLD, 1 << 30), (M_TRIM_THRESHOLD, 1 << 30), (M_ARENA_MAX, 1)),
    "tensors": ((M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 1 << 30)),
    "quantized": ((M_MMAP_THRESHOLD, 32 << 20),),  # fixed: no dynamic rise, see the module docstring
}
_allowed: ContextVar[bool] = ContextVar("adaptkit_allocator_tuning", default=False)


@contextmanager
def tuning() -> Iterator[None]:
    """Let `tune` change this process's malloc settings within the block (a whole-process run of
    adaptkit: the command line, a benchmark)."""
    token = _allowed.set(True)
    try:
        yield
    finally:
        _allowed.reset(token)


def tune(workload: str) -> bool:
    """Apply `workload`'s settings (SETTINGS) when the process opted in with `tuning()`; returns
    whether they were applied."""
    settings = SETTINGS[workload]
    if not _allowed.get():
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        for parameter, value in settings:
            libc.mallopt(parameter, value)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        return False
    return True


def resident_peak() -> int:
    """This process's largest resident memory so far, in bytes (0 where the platform does not say):
    with torch imported, the floor under any merge's peak (about 220 MB on Linux with torch 2.13)."""
    try:
        import resource
    except ImportError:  # (Windows)
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # (macOS counts bytes, Linux KiB)


def release() -> None:
    """Give the heap's free memory back to the system (glibc's `malloc_trim(0)`, which also returns
    free pages inside each thread's heap). It changes no setting, so the library may call it; it does
    nothing with another C library."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
