"""Which pieces of a merge run when: worker threads within a working-memory budget (used by the engine).

Each piece of work (a tensor, or a block of its rows) needs an estimated number of bytes while it
runs. A worker that is free takes the first piece, in the plan's order, whose need fits what the
pieces running leave of the budget; one that needs the whole budget or more runs alone, once nothing
else runs. So a big piece that does not fit yet lets the smaller ones after it go first instead of
holding its worker idle: on the 168M benchmark's DARE and DELLA jobs (an embedding needs 80 % of the
budget), a worker used to wait out the whole first embedding beside the one merging it (A/B against
taking them in order, whole command, median of 5: dare_linear 0.91 of the wall, dare_ties 0.93, DELLA
0.87; the others, whose embeddings run alone, as before). The order pieces
finish in changes no byte of the output: each is written at its own place, and random operators
draw from generators seeded per tensor.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from .. import spec

Piece = TypeVar("Piece")

_command_threads: int | None = None


def command_threads() -> int | None:
    """torch's thread count in the merge command's own thread while its workers run with fewer, else None.

    torch splits a whole-tensor reduction (a sum to one number) over its threads, rounding each part's sum to
    the dtype, so the bytes depend on the count; an operator whose tensors merge on workers with fewer threads
    reproduces this count's sums, which a plain process (mergekit's, or this one with one worker) gives."""
    return _command_threads


@contextmanager
def command_threads_held(count: int) -> Iterator[None]:
    """`command_threads()` says `count` within (the engine's workers run with fewer)."""
    global _command_threads
    previous, _command_threads = _command_threads, count
    try:
        yield
    finally:
        _command_threads = previous


def default_workers(method: Any) -> int:
    """Row blocks of elementwise operators overlap reading and arithmetic well on two workers, and so do
    whole tensors for operators with single-threaded kernels (`serial_kernels`: measured on the 168M
    benchmark, median of 3, one worker → two: TIES 32.4 → 26.4 s, breadcrumbs 34.7 → 25.4, SCE 13.4 → 11.6,
    DELLA 9.3 → 8.5); other whole-tensor operators run as fast on one worker using all of torch's own
    threads, with less memory."""
    two = spec.option(method, "elementwise") or spec.option(method, "serial_kernels")
    return min(2, os.cpu_count() or 1) if two else 1


def run_within(pieces: Sequence[Piece], need: Callable[[Piece], int], work: Callable[[Piece, bool], None],
               threads: int, budget: int) -> None:
    """`work(piece, alone)` for every piece on `threads` worker threads, the pieces running at once
    needing at most `budget` bytes together (`need`; a piece needing `budget` or more runs alone, with
    `alone` true). The first error stops the workers taking more pieces and is raised once the ones
    running are done."""
    needs = [min(need(piece), budget) for piece in pieces]
    todo = list(range(len(pieces)))  # indices of pieces not yet taken, in order
    free = budget  # bytes the pieces running leave
    errors: list[BaseException] = []
    changed = threading.Condition()

    def take() -> int | None:
        nonlocal free
        with changed:
            while todo and not errors:
                fits = next((k for k, i in enumerate(todo) if needs[i] <= free), None)
                if fits is not None:
                    i = todo.pop(fits)
                    free -= needs[i]
                    return i
                changed.wait()
            return None

    def worker() -> None:
        nonlocal free
        while (i := take()) is not None:
            try:
                work(pieces[i], needs[i] >= budget)
            except BaseException as error:  # noqa: BLE001 (raised by the caller's thread)
                with changed:
                    errors.append(error)
            finally:
                with changed:
                    free += needs[i]
                    changed.notify_all()

    if threads <= 1:
        worker()
    else:
        workers = [threading.Thread(target=worker, name=f"merge-{k}", daemon=True) for k in range(threads)]
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join()
    if errors:
        raise errors[0]
