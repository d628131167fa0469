"""The merge engine's scheduler (`adaptkit.merge.schedule.run_within`): pieces of work on worker threads
within a working-memory budget."""
from __future__ import annotations

import threading

import pytest

from adaptkit.merge.schedule import run_within


class Recorder:
    """Runs pieces as (name, need) pairs, recording starts, ends, the bytes held at each start and which
    pieces were told they run alone; a piece may wait for others to end first (`waits`)."""

    def __init__(self, waits=None):
        self.lock, self.events, self.held, self.alone = threading.Lock(), [], [], []
        self.running: dict[str, int] = {}
        self.ended = {name: threading.Event() for name in "ABCDEFGH"}
        self.waits, self.timed_out = waits or {}, []

    def __call__(self, piece, alone):
        name, need = piece
        with self.lock:
            self.running[name] = need
            self.events.append(("start", name))
            self.held.append(sum(self.running.values()))
            if alone:
                self.alone.append(name)
        for other in self.waits.get(name, ()):
            if not self.ended[other].wait(timeout=10):
                self.timed_out.append((name, other))
        with self.lock:
            del self.running[name]
            self.events.append(("end", name))
        self.ended[name].set()


def test_a_piece_that_does_not_fit_yet_lets_smaller_ones_after_it_go_first():
    """Budget 10: A (6) runs; B (6) does not fit beside it, so the other worker takes C and D (2 each)
    meanwhile, and A, which waits for C and D to end, is not kept waiting on B's worker (in the order
    given, that worker would have sat idle on B until A ended, and A's wait would time out)."""
    run = Recorder(waits={"A": "CD"})
    run_within([("A", 6), ("B", 6), ("C", 2), ("D", 2)], lambda p: p[1], run, threads=2, budget=10)
    assert not run.timed_out
    starts = [name for kind, name in run.events if kind == "start"]
    assert starts == ["A", "C", "D", "B"] and ("end", "A") in run.events[:run.events.index(("start", "B"))]
    assert max(run.held) <= 10 and not run.alone


def test_a_piece_needing_the_whole_budget_runs_alone():
    """One needing the budget or more (E: 12 of 10) starts only once nothing runs, and nothing starts
    beside it; it is told it runs alone. The others share the budget two at a time."""
    run = Recorder()
    pieces = [("A", 3), ("B", 3), ("E", 12), ("C", 3), ("D", 3)]
    run_within(pieces, lambda p: p[1], run, threads=2, budget=10)
    start, end = run.events.index(("start", "E")), run.events.index(("end", "E"))
    assert run.events[start + 1] == ("end", "E") and run.alone == ["E"]
    assert all(kind == "end" or name == "E" for kind, name in run.events[start:end + 1])
    assert {name for kind, name in run.events if kind == "end"} == set("ABCDE")
    assert max(h for h, (kind, name) in zip(run.held, [e for e in run.events if e[0] == "start"]) if name != "E") <= 10


def test_one_thread_takes_the_pieces_in_order():
    run = Recorder()
    run_within([("A", 9), ("B", 1), ("C", 20), ("D", 5)], lambda p: p[1], run, threads=1, budget=10)
    assert run.events == [(kind, name) for name in "ABCD" for kind in ("start", "end")]
    assert run.alone == ["C"]


@pytest.mark.parametrize("threads", [1, 2])
def test_the_first_error_stops_the_workers_and_is_raised(threads):
    """After a piece fails, no worker takes another one; the pieces running end, then the error is raised."""
    done = []

    def work(piece, alone):
        if piece == "B":
            raise ValueError("B failed")
        done.append(piece)

    with pytest.raises(ValueError, match="B failed"):
        run_within(list("ABCDEFGH"), lambda p: 1, work, threads=threads, budget=1)
    assert done == ["A"]  # budget 1: one at a time, in order, and nothing after B
