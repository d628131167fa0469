"""Karcher mean: the Riemannian centre of mass of the models' directions, scaled by their mean norm."""
from __future__ import annotations

import queue
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from ._base import Operator, as_bits, frozen
from ._norm import float_norm, unit_dots
from ._select import block_ranges

BLOCK = 1 << 20  # elements per block of the per-element steps
SIDE_BY_SIDE_MIN = 1 << 16  # entries from which the inputs' dots run on threads side by side


class Karcher(Operator):
    """Uniform Karcher (Fréchet) mean on the unit hypersphere, by fixed-point iteration, per tensor.

    With the N inputs flattened, uᵢ = θᵢ/‖θᵢ‖ and αᵢ = 1/N, over the inputs with ‖θᵢ‖ > tol (their
    αᵢ renormalized to sum 1):
    m₀ = Σᵢ αᵢ·uᵢ / ‖Σᵢ αᵢ·uᵢ‖ (the first uᵢ if that norm is < tol); then up to `max_iter` times
    Ωᵢ = arccos clamp(⟨m, uᵢ⟩, −1, 1),  g = Σ_{Ωᵢ ≥ tol} αᵢ·Ωᵢ/sin Ωᵢ·(uᵢ − cos Ωᵢ·m),
    stop when ‖g‖ < tol, else m ← cos‖g‖·m + sin‖g‖·g/‖g‖, renormalized;
    θ = (Σᵢ ‖θᵢ‖/N)·m (every input's norm, also those ≤ tol). All norms ≤ tol give zeros.
    As in mergekit's `karcher`, the base model is no input of its own (list it among the models, or
    it is appended as one more input). Parameters: `max_iter` (default 10, an integer ≥ 0) and
    `tol` (default 1e-5, ≥ 0). Norms are taken in float32 (float64 inputs: float64) and every step
    runs in mergekit's order in the inputs' dtype, so bf16 inputs give its bytes. An iteration that
    comes back to an earlier mean (common in half precision) skips ahead to the final one (`Cycle`).
    Karcher 1977, "Riemannian center of mass and mollifier smoothing", Comm. Pure Appl. Math. 30(5);
    for merging: "Functionality-Oriented LLM Merging on the Fisher-Rao Manifold", arXiv 2603.04972.
    """

    name = "karcher"
    takes_base = False
    params = frozen({"max_iter": 10, "tol": 1e-5})
    serial_kernels = True  # torch.dot of bf16 runs on one thread: two workers, A/B median of 7, 0.84 of the wall
    # (with the C dots still 0.72 of it: median of 6, 1.08 → 0.77 s of work)

    def merge(self, tensors: Sequence[torch.Tensor], base: torch.Tensor | None = None, **params: Any) -> torch.Tensor:
        self.check_inputs(tensors)
        bound = self.bind(params, len(tensors))
        max_iter = self.count("max_iter", bound["max_iter"])
        tol = self.real("tol", bound["tol"])
        if tol < 0:
            raise self.error(f"tol must be ≥ 0, got {tol}")
        if len(tensors) == 1:
            return tensors[0].clone()
        return karcher_mean(list(tensors), max_iter, tol)

    def count(self, key: str, value: Any) -> int:
        # mergekit reads an integer (10.0 too, as pydantic does); 2.5 iterations means nothing.
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self.error(f"'{key}' must be a whole number ≥ 0, got {value!r}")
        return value


def karcher_mean(tensors: list[torch.Tensor], max_iter: int, tol: float) -> torch.Tensor:
    """The uniform Karcher mean of `tensors` (see `Karcher`), in mergekit's order of operations.

    Memory (issue 15): the unit vectors are made again from the inputs each time one is needed (the same
    division, so the same values) instead of kept, and the steps run in place or in blocks over the
    mean's and the tangent's buffers, with each product's operands in mergekit's order (a float32
    0-dim factor on the left rounds differently than on the right). One scratch buffer serves every
    norm's float32 copy and, before it, each unit vector (never both at once; two half-precision unit
    vectors side by side for the dots, see the loop): made afresh each time,
    the 168M merge mapped and faulted in about 7 tensor-sized buffers per tensor."""
    exact = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    scratch = torch.empty(tensors[0].numel() * max(exact.itemsize, *(x.element_size() for x in tensors)),
                          dtype=torch.uint8, device=tensors[0].device)

    def norm(x: torch.Tensor) -> torch.Tensor:  # ‖x.to(exact)‖: no copy (bf16, `float_norm`) or into the scratch buffer
        if x.dtype == exact:
            return torch.linalg.vector_norm(x)
        fast = float_norm(x) if exact == torch.float32 else None
        return fast if fast is not None else torch.linalg.vector_norm(scratch.view(exact).view(x.shape).copy_(x))

    norms = [norm(x) for x in tensors]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return torch.zeros_like(tensors[0])

    def unit(i: int, slot: int = 0) -> torch.Tensor:  # in a slot of the scratch buffer, until it is used again
        x = tensors[i]
        size = x.numel() * x.element_size()
        out = scratch[slot * size:(slot + 1) * size].view(x.dtype).view(x.shape)
        return out.zero_() if norms[i].item() == 0.0 else torch.div(x, norms[i], out=out)

    uniform = 1.0 / len(tensors)
    alphas = [uniform / sum([uniform] * len(valid))] * len(valid)  # renormalized as mergekit does, to the bit
    mean = torch.zeros_like(tensors[valid[0]])
    for alpha, i in zip(alphas, valid):
        u = unit(i)
        mean += torch.mul(u, alpha, out=u)  # (not add_(alpha=): the product is rounded first, as in mergekit; made
        # in the unit vector's buffer, not a new one paged in for each input)
    mean_norm = norm(mean)
    dtype = mean.dtype
    if mean_norm.item() < tol:
        mean.copy_(unit(valid[0]))
    else:
        torch.div(mean, mean_norm, out=mean)
    flat = mean.view(-1)
    blocks = block_ranges(flat.numel(), BLOCK)
    tangent = None
    # torch's dot of half-precision vectors runs on one thread (2.2 ns an entry, bf16: oneDNN's 1×1 matmul
    # on an AVX-512 CPU; `mv` and (1, n)×(n, N) products take 3-20× less time but sum in another order,
    # and mergekit's dots are these). Where `_norm.unit_dots` applies (bf16, that matmul's order probed), the
    # dots are one C pass from the inputs, the unit vectors made in registers: the 168M merge's work in one
    # process 1.24 → 0.68 s (alternating, medians of 6), the same bytes. Else, given more threads (a tensor
    # merged alone), the inputs' torch dots run side by side, each unit vector in its own slot of the scratch
    # buffer (two fit where the inputs have half float32's size): 168M job's embeddings, two threads, three
    # inputs, 150 ms a pass of dots instead of 230; the whole command, median of 7, 0.96 of the wall.
    # (neither for small tensors: a thread pool each iteration costs more than their dots, 4× the time of a
    # tiny 40-layer model's 1200-iteration merge)
    slots = min(torch.get_num_threads(), len(valid), scratch.numel() // max(1, flat.numel() * flat.element_size()))
    slots = slots if flat.numel() >= SIDE_BY_SIDE_MIN else 1

    def dot(i: int, slot: int) -> torch.Tensor:  # ⟨m, uᵢ⟩, uᵢ made in the slot
        return torch.dot(flat, unit(i, slot).view(-1))

    cycle = Cycle(mean)
    for iteration in range(max_iter):
        if cycle.ends(iteration, max_iter):
            break
        moved = False
        dots = unit_dots(flat, [tensors[i] for i in valid], [norms[i] for i in valid], max(1, slots))
        if dots is None:
            dots = _side_by_side(dot, valid, slots) if slots > 1 else [None] * len(valid)
        for k, (alpha, i) in enumerate(zip(alphas, valid)):
            u = None if dots[k] is not None else unit(i)
            cos = torch.clamp(dots[k] if u is None else torch.dot(flat, u.view(-1)), -1.0, 1.0)
            omega = torch.arccos(cos)
            cycle.note(cos)
            if omega.item() < tol:
                continue
            u = unit(i) if u is None else u  # (made again after the dots side by side)
            if not moved:  # (the tangent is made only where some direction is farther than tol)
                tangent, moved = torch.zeros_like(mean) if tangent is None else tangent.zero_(), True
            step = u.view(-1)
            for s, e in blocks:  # u − cos·m over u's own buffer
                step[s:e] -= cos * flat[s:e]
            tangent += torch.mul(alpha * (omega / torch.sin(omega)), u, out=u)
            del u, step
        if not moved:  # every Ωᵢ < tol (so tol > 0): a zero tangent, whose norm 0 < tol ends the iteration
            break
        length = norm(tangent)
        if length.item() < tol:
            break
        cycle.seen(iteration, length)
        first, second, along = torch.cos(length), torch.sin(length), tangent.view(-1)
        for s, e in blocks:
            flat[s:e] = (first * flat[s:e] + second * (along[s:e] / length)).to(dtype)
        mean_norm = norm(mean)
        if mean_norm.item() > tol:
            torch.div(mean, mean_norm, out=mean)
    scale = sum(uniform * n for n in norms)
    return torch.mul(scale, mean, out=mean)


class Cycle:
    """Exact early exit from an iteration that has come back to a state it was in.

    An iteration's next mean is a function of its mean alone, and in half precision the means often
    come back to one they had (a 40-layer bf16 model's tensors, tol 1e-10: most within a few
    iterations, in cycles of 2 to 16 and once 516). From a state seen p iterations before, the
    means repeat with period p, so the mean after `max_iter` iterations is the one (max_iter − i) mod p
    iterations after iteration i: the rest is skipped, with the same result to the bit. A cycle is
    spotted by a fingerprint of the state (its cosines and tangent length, bits of values computed
    anyway), then proven by comparing the mean itself after p more iterations with a copy (one copy
    of the mean, only while a candidate is checked)."""

    def __init__(self, mean: torch.Tensor):
        self.mean, self.parts = mean, []
        self.last: dict[tuple, int] = {}  # fingerprint -> the last iteration that had it
        self.check: tuple[int, int, torch.Tensor] | None = None  # (iteration, period, mean then)
        self.stop: int | None = None

    def note(self, value: torch.Tensor) -> None:
        self.parts.append(value.item())

    def seen(self, iteration: int, length: torch.Tensor) -> None:
        """Iteration `iteration` (its mean: `self.mean` now, before the update) found this tangent length."""
        key, self.parts = (*self.parts, length.item()), []
        if self.check is None and key in self.last:
            period = iteration - self.last[key]
            self.check = (iteration, period, self.mean.clone())
        self.last[key] = iteration

    def ends(self, iteration: int, max_iter: int) -> bool:
        """Whether the iteration should stop before `iteration` (the mean is the final one already)."""
        if self.check is not None and iteration == self.check[0] + self.check[1]:
            _, period, then = self.check
            self.check = None
            if torch.equal(as_bits(self.mean), as_bits(then)):  # (bits: -0 is not 0 here)
                self.stop = iteration + (max_iter - iteration) % period
        return iteration == self.stop


def _side_by_side(dot, inputs: list[int], slots: int) -> list[torch.Tensor]:
    """`dot(i, slot)` for each input, on `slots` threads, each with a slot of its own."""
    free: queue.SimpleQueue[int] = queue.SimpleQueue()
    for slot in range(slots):
        free.put(slot)

    def run(i: int) -> torch.Tensor:
        slot = free.get()
        try:
            return dot(i, slot)
        finally:
            free.put(slot)

    with ThreadPoolExecutor(max_workers=slots) as pool:
        return list(pool.map(run, inputs))


KARCHER = Karcher()
