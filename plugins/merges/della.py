"""DELLA: the task-arithmetic family with MagPrune, random drops ranked by magnitude.

MagPrune keeps each entry of a task vector with a probability that grows with the rank of its
magnitude in its row, then rescales the survivors (ranks as mergekit: along the rows of a matrix,
along dim 1 of a higher-dimensional tensor, over the whole of a vector):

    rⱼ = rank of |τⱼ| in its row of n, 0 (smallest) … n − 1 (largest); ties by position
    pⱼ = (density − ε) + 2ε·rⱼ/(n − 1)           keep probability of entry j: mean `density`
    mⱼ ~ Bernoulli(pⱼ)
    τⱼ' = mⱼ·τⱼ · ‖τ‖₁ / ‖m ⊙ τ‖₁                `rescale: true` (also `l1`): mergekit's
    τⱼ' = mⱼ·τⱼ / pⱼ                            `rescale: inverse`: the paper's 1/(1 − drop probability)
    τⱼ' = mⱼ·τⱼ                                 `rescale: false`

then the family's weights, sign consensus (della) or plain sum (della_linear), `normalize` and
`lambda` (see task_arithmetic.py). Parameters as mergekit's: `weight`, `density`, `epsilon`
(per model; ε default 0.15), `lambda`, `normalize`, `rescale`, `int8_mask` (accepted, unused).
`rescale: true` is mergekit's exact L1 match; `rescale: inverse` divides by each entry's own keep
probability, as DARE's `inverse` divides by the density (unbiased: E[τ'] = τ). A density below 1 needs
density ± ε inside (0, 1), as in mergekit; density 1 keeps the task vector whole. A row of one
entry, whose rank range is empty (mergekit divides 0 by 0 there), is kept with probability `density`.
Arithmetic as the family's: in the compute dtype (`dtype`), except that keep probabilities are float32
(mergekit's), compared with 32-bit random integers (numpy's SFC64, seeded from the input's torch
generator: `_magprune.draw_keep`), and τ·m/p is rounded once; random either way, so mergekit's bytes are not a
target: its keep probabilities are (the tests hand mergekit our draws and get our merge).
Deep et al. 2024, "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based
Sampling", arXiv 2406.11617.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial, reduce
from typing import Any

import numpy
import torch

from ._base import frozen
from ._draws import bit_generator
from ._magprune import draw_keep, draw_packed, keep_probabilities, rank_order, thresholds
from ._mixing import l1_sums, magprune_sums
from ._sparsify import l1_factor, masked
from .task_arithmetic import BLOCK, TaskArithmetic


def as_rows(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor as rows along which MagPrune ranks (R × n): a vector is one row; otherwise the
    fibres along dim 1, as mergekit ranks them."""
    if tensor.dim() < 2:
        return tensor.reshape(1, -1)
    return tensor.movedim(1, -1).reshape(-1, tensor.shape[1])


def from_rows(rows: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """`as_rows` undone."""
    if len(shape) < 2:
        return rows.reshape(shape)
    moved = (*shape[:1], *shape[2:], shape[1])
    return rows.reshape(moved).movedim(-1, 1)


class Della(TaskArithmetic):
    """DELLA: task arithmetic on task vectors pruned by MagPrune (magnitude-ranked random drops).

    The module docstring gives the formula. Deep et al. 2024, arXiv 2406.11617.
    """

    def __init__(self, name: str, *, consensus: str | None, normalize: bool, about: str):
        # Configured as the family's random sparsifier, which DELLA is too: it takes the engine's
        # generators, sees whole tensors and converts its inputs block by block. `merge` below
        # replaces only the sparsification (per row, with per-entry probabilities).
        super().__init__(name, sparsify="random", consensus=consensus, normalize=normalize, rescale=True,
                         about=about)
        self.sparsify = "magprune"
        self.params = frozen({**self.params, "epsilon": 0.15})
        self.per_model = self.per_model | {"epsilon"}

    def merge(self, tensors: Sequence[torch.Tensor], base: torch.Tensor | None = None, *,
              generators: Sequence[torch.Generator] | None = None, dtype: torch.dtype | None = None,
              **params: Any) -> torch.Tensor:
        """The merged tensor in `dtype` (default: the inputs' promoted dtype), computed in it as the
        family computes; keep probabilities in float32, draws as 32-bit integers (`draw_keep`)."""
        self.check_inputs(tensors)
        base = self.need_base(base, tensors)
        bound = self.bind(params, len(tensors))
        s = self.settings(bound)
        epsilon = self.epsilons(bound["epsilon"], s.density)
        bits = [bit_generator(g) for g in self.check_generators(generators, len(tensors))]
        dtype = dtype or reduce(torch.promote_types, (t.dtype for t in tensors), base.dtype)
        base_rows, rows = as_rows(base), [as_rows(t) for t in tensors]
        count, n = base_rows.shape
        # rows per block: temporaries stay a few MB, and each block's entries fill whole bytes of the masks' bits
        align = 8 // math.gcd(n, 8)
        step = max(align, BLOCK // max(n, 1) // align * align)
        blocks = [(r, min(r + step, count)) for r in range(0, count, step)]

        def task_vector(i: int, start: int, stop: int) -> torch.Tensor:
            return rows[i][start:stop].to(dtype) - base_rows[start:stop].to(dtype)

        # With `rescale: true` each mask is drawn in the L1 pass and kept for the merge pass (ranking and
        # drawing twice took about half of a DELLA merge, measured): as bits, in one buffer per input (kept
        # a byte an entry, in a block's own buffer, the masks took 175 MB more at the 168M job's peak, and
        # as bytes in one buffer 196 MB at the 1B job's, measured).
        masks: dict[int, numpy.ndarray] = {}

        def mask_of(i: int, start: int, stop: int) -> numpy.ndarray:
            """The bytes of `masks[i]` that hold rows [start, stop) (exact: blocks of rows fill whole bytes)."""
            if i not in masks:
                masks[i] = numpy.empty((count * n + 7) // 8, dtype=numpy.uint8)
            return masks[i][start * n // 8:(stop * n + 7) // 8]

        def draw_bits(i: int, magnitude: torch.Tensor, start: int) -> numpy.ndarray:
            """The draws for the rows from `start` of |τ| (the L1 pass), kept as bits in `masks[i]` for the
            merge pass; those bits."""
            packed = mask_of(i, start, start + magnitude.shape[0])
            draw_packed(magnitude.cpu(), s.density[i], epsilon[i], bits[i], packed)  # (numpy's ranks and draws)
            return packed

        def magprune(i: int, tau: torch.Tensor, start: int) -> torch.Tensor:
            if s.density[i] >= 1:
                return tau
            if i in masks:  # 0/1: the same values as τ·m rounded once
                return masked(tau, masks[i], start * n)
            magnitude = tau.abs().cpu()  # (ranked and drawn by numpy, on the CPU whatever τ's device)
            order = rank_order(magnitude)  # (for the draws, and for p with `inverse`)
            keep = draw_keep(magnitude, s.density[i], epsilon[i], bits[i], order).to(tau.device)  # (its own draws)
            if s.rescale == "inverse":  # τ·m/p rounded once to the dtype (computed in float32, or float64)
                p = keep_probabilities(magnitude, s.density[i], epsilon[i], order).to(tau.device)
                return tau.to(torch.promote_types(tau.dtype, torch.float32)).masked_fill_(~keep, 0).div_(p).to(dtype)
            return tau.masked_fill_(~keep, 0)

        def drawn_sums(i: int, a: int, b: int):
            """Both L1 sums of rows [a, b) in C from the models (`_mixing.l1_sums`), the block's bits drawn
            first (`draw_bits`); None where C does not take the block (nothing drawn)."""
            def drops() -> tuple[numpy.ndarray, int]:
                draw_bits(i, task_vector(i, a, b).abs_(), a)
                return masks[i], a * n
            return l1_sums(rows[i][a:b], base_rows[a:b], drops, dtype)

        factors = [None] * len(tensors)
        if s.rescale == "l1":
            for i in range(len(tensors)):
                if s.density[i] < 1:
                    # every block's draws and sums in one C call where it takes the models (bf16), else block by block
                    whole = dtype == torch.bfloat16 and magprune_sums(
                        rows[i], base_rows, bits[i], thresholds(n, s.density[i], epsilon[i]), mask_of(i, 0, count),
                        step)
                    sums = (lambda a, b, by=dict(zip(blocks, whole)): by[a, b]) if whole else partial(drawn_sums, i)
                    factors[i] = l1_factor(partial(task_vector, i), blocks,
                                           lambda a, b, i=i: masked(b, draw_bits(i, b, a), 0), dtype, sums)

        def deltas_at(start: int, stop: int, base_block: torch.Tensor) -> list[torch.Tensor]:
            deltas = [magprune(i, torch.sub(rows[i][start:stop].to(dtype), base_block), start) for i in range(len(tensors))]
            return [d if f is None else d.mul_(f) for d, f in zip(deltas, factors)]

        def models_at(start: int, stop: int):
            """(the models' rows, their drops as bits, factors) for `mix_models`: with the L1 rescale, whose
            pass kept the masks; None otherwise, or where a model is not in the dtype."""
            if any(s.density[i] < 1 and i not in masks for i in range(len(tensors))) or any(
                    r.dtype != dtype for r in rows):
                return None
            drops = [(masks[i], start * n) if i in masks else None for i in range(len(tensors))]
            return [r[start:stop] for r in rows], drops, factors

        out = torch.empty(base_rows.shape, dtype=dtype, device=base.device)
        self.mix(blocks, lambda a, b: base_rows[a:b].to(dtype), deltas_at, s,
                 torch.tensor(s.weight, dtype=dtype, device=base.device), out, models_at, base_rows.dtype == dtype)
        return from_rows(out, base.shape)

    def epsilons(self, values: Sequence[Any], density: Sequence[float]) -> list[float]:
        epsilon = [self.real("epsilon", e) for e in values]
        for d, e in zip(density, epsilon):
            if e < 0:
                raise self.error(f"epsilon must be ≥ 0 (the half-width of the keep probabilities), got {e}")
            if d < 1 and not (d - e > 0 and d + e < 1):
                raise self.error(f"density ± epsilon must lie in (0, 1), got density {d} and epsilon {e}")
        return epsilon


DELLA = Della(
    "della", consensus="sum", normalize=True,
    about="DELLA: drop task-vector entries at random, small magnitudes more often (MagPrune), then TIES.\n\n"
    "pᵢ = density − ε + 2ε·rankᵢ/(n − 1) per row; τᵢ' = Bernoulli(pᵢ)·τᵢ/pᵢ; s = sign Σᵢ wᵢ·τᵢ';\n"
    "θ = θ₀ + λ·Σᵢ mᵢ·wᵢ·τᵢ' / Σᵢ mᵢ·wᵢ, mᵢ = [sign wᵢ·τᵢ' = s] (normalize, default true).\n"
    "Deep et al. 2024, \"DELLA-Merging\", arXiv 2406.11617.",
)
DELLA_LINEAR = Della(
    "della_linear", consensus=None, normalize=False,
    about="DELLA without sign consensus: MagPrune's magnitude-ranked random drops, then a weighted sum.\n\n"
    "pᵢ = density − ε + 2ε·rankᵢ/(n − 1) per row; τᵢ' = Bernoulli(pᵢ)·τᵢ/pᵢ;\n"
    "θ = θ₀ + λ·Σᵢ wᵢ·τᵢ' (÷ Σᵢ wᵢ with `normalize`, default false).\n"
    "Deep et al. 2024, \"DELLA-Merging\", arXiv 2406.11617.",
)
