"""Multi-SLERP: a weighted spherical mean of any number of models (or task vectors), one step."""
from __future__ import annotations

from collections.abc import Sequence
from functools import reduce
from typing import Any

import torch

from . import _mixing
from ._base import Operator, frozen, stacked_sum
from ._select import block_ranges

BLOCK = 1 << 17  # elements per column block of the per-element steps: a core's cache holds a block's steps


class MultiSlerp(Operator):
    """Barycentric interpolation on the hypersphere: one tangent-space step at the weighted mean.

    With each input flattened to xᵢ (xᵢ = θᵢ − θ₀ with a base), weights wᵢ (÷ Σⱼ wⱼ with
    `normalize_weights`, default true) and ε = `eps` (default 1e-8):
    uᵢ = xᵢ / (‖xᵢ‖ + ε),  m = Σᵢ wᵢ·uᵢ / ‖Σᵢ wᵢ·uᵢ‖,
    vᵢ = uᵢ − ⟨uᵢ, m⟩·m  (tangent at m),  v = Σᵢ wᵢ·vᵢ,  s = ‖v‖ + ε,
    x = (m·cos s + v·sin s / s) · Σᵢ wᵢ·‖xᵢ‖,  θ = x (+ θ₀ with a base).
    One input is returned as it is. Where ‖Σᵢ wᵢ·uᵢ‖ < ε (antipodal inputs) two inputs fall back to
    Σᵢ wᵢ·xᵢ (+ θ₀) and more are an error, as in mergekit's `multislerp`, whose parameters these are:
    `weight` (per model, required), `normalize_weights`, `eps`. The weights are cast to the inputs'
    dtype and every step runs in mergekit's order in that dtype, so bf16 inputs give its bytes.
    Refused: weights whose sum is zero with `normalize_weights` (mergekit divides by it) and a
    negative `eps`.
    Goddard 2024, "Multi-SLERP" (goddard.blog/posts/multislerp-wow-what-a-cool-idea), in mergekit
    (Goddard et al. 2024, arXiv 2403.13257); Buss & Fillmore 2001, "Spherical averages and
    applications to spherical splines and interpolation", ACM Transactions on Graphics 20(2).
    """

    name = "multislerp"
    params = frozen({"weight": None, "normalize_weights": True, "eps": 1e-8})
    per_model = frozenset({"weight"})
    # two workers of one thread each (its kernels are threaded, but its many steps over blocks of 2¹⁷ entries
    # run faster side by side; were one worker of two threads and blocks of 2²⁰): the AMX machine, one
    # thread in process 5.75 → 4.40 s; the whole command's work 2.79 → 2.74 s and 3.27 → 2.83 s (A/Bs of 5);
    # 1B: 23.4 → 21.3 s, peak 1407 → 1412-1430 MB in three runs (the scheduler runs the big tensors alone)
    serial_kernels = True

    def merge(self, tensors: Sequence[torch.Tensor], base: torch.Tensor | None = None, **params: Any) -> torch.Tensor:
        self.check_inputs(tensors)
        bound = self.bind(params, len(tensors))
        weight_values = [self.real("weight", w) for w in bound["weight"]]
        normalize = self.flag("normalize_weights", bound["normalize_weights"])
        eps = self.real("eps", bound["eps"])
        if eps < 0:
            raise self.error(f"eps must be ≥ 0, got {eps}")
        if base is not None:
            base = self.need_base(base, tensors)
        if len(tensors) == 1:
            return tensors[0].clone()
        # Memory and time (issue 15): one (N + 1, n) buffer holds the task vectors, then (divided in place,
        # the same rounding as mergekit's division) the unit vectors, and in its last row each ⟨uᵢ, m⟩'s
        # products, then the step. Norms and ⟨uᵢ, m⟩ are whole-row sums, as mergekit takes them: torch sums
        # the rows of a tensor one per thread, each in one thread's order, so a row of products is summed
        # as the second of two rows (alone it would be split between threads and round differently).
        # The tangent and the last step run in one C pass each where `_mix` is built (`_mixing.tangent`,
        # `spherical_end`, the same bytes: the 168M job's embedding, one thread, 0.58 → 0.36 s; the whole
        # command's work 1.61 → 1.40 s, medians of 6, alternating). Otherwise, and for the units and mean,
        # per-element steps run over column blocks in an (N, block) scratch buffer; sums over the N inputs
        # are `stacked_sum`'s (torch's bf16 `sum(0)` takes 3.3 times as long). The unit vectors are made
        # once, not three times: 168M job, in one process 0.81-0.89 of the time, the whole command 0.83-0.88
        # of the wall (medians of 5-7); one row more of memory (1B: peak 1265 → 1406 MB).
        count, shape = len(tensors), tensors[0].shape
        flat = torch.empty(count + 1, tensors[0].numel(), dtype=reduce(torch.promote_types, [t.dtype for t in tensors]),
                           device=tensors[0].device)
        units, row = flat[:count], flat[count]
        for i, t in enumerate(tensors):
            if base is not None:
                torch.sub(t.reshape(-1), base.reshape(-1), out=units[i])
            else:
                units[i] = t.reshape(-1)
        weights = torch.tensor(weight_values, dtype=flat.dtype, device=flat.device)
        if normalize:
            total = weights.sum()
            if total == 0:
                raise self.error(f"weights {weight_values} sum to zero; cannot normalize (set normalize_weights: false)")
            weights = weights / total
        column = weights.view(-1, 1)
        blocks = block_ranges(flat.shape[1], BLOCK)
        norms = torch.linalg.vector_norm(units, dim=-1, keepdim=True)
        divisor = norms + eps
        scratch = torch.empty(2, count, max(e - s for s, e in blocks), dtype=flat.dtype, device=flat.device)

        def weighted_sum(vectors: torch.Tensor, out: torch.Tensor) -> None:  # (vectors * column).sum(0)
            # (one C pass where `_mix` is built: the 168M merge in one process 1.21 → 1.14 s, medians of 12)
            if not _mixing.weighted_sum(list(vectors), weights, out):
                stacked_sum(list(torch.mul(vectors, column, out=scratch[0, :, :vectors.shape[1]])), out=out)

        mean = torch.empty_like(row)
        for s, e in blocks:
            weighted_sum(units[:, s:e].div_(divisor), mean[s:e])
        mean_norm = torch.linalg.vector_norm(mean)
        if mean_norm < eps:
            if count != 2:
                raise self.error("the weighted mean of the inputs' directions is zero (antipodal inputs with "
                                 "balancing weights); change the weights")
            del mean, units, row, flat
            vectors = [t - base if base is not None else t for t in tensors]
            out = (vectors[0] * weights[0] + vectors[1] * weights[1]).view(shape)
            return out + base if base is not None else out
        torch.div(mean, mean_norm, out=mean)
        dots = torch.empty(count, 1, dtype=flat.dtype, device=flat.device)
        alone = torch.get_num_threads() == 1  # (one thread sums a row alone in the order it has in a stack)
        for i in range(count):
            torch.mul(units[i], mean, out=row)
            dots[i] = row.sum() if alone else flat[count - 1:].sum(-1)[1]
        if not _mixing.tangent(list(units), mean, dots, weights, row):  # (in one C pass where it is built)
            for s, e in blocks:  # the step over the products' row
                along = torch.mul(dots, mean[s:e], out=scratch[1, :, :e - s])
                weighted_sum(torch.sub(units[:, s:e], along, out=scratch[1, :, :e - s]), row[s:e])
        length = torch.linalg.vector_norm(row) + eps
        cos, sin = torch.cos(length), torch.sin(length) / length
        scale = (norms.squeeze(-1) * weights).sum()
        if _mixing.spherical_end(mean, row, cos, sin, scale, None if base is None else base.reshape(-1), mean):
            return mean.view(shape)
        for s, e in blocks:  # the result over the mean's buffer: ((m·cos + v·sin/s)·scale) (+ θ₀)
            part, step = scratch[0, 0, :e - s], scratch[1, 0, :e - s]
            torch.mul(mean[s:e], cos, out=part).add_(torch.mul(row[s:e], sin, out=step)).mul_(scale)
            if base is not None:
                torch.add(part, base.reshape(-1)[s:e], out=mean[s:e])
            else:
                mean[s:e] = part
        return mean.view(shape)


MULTISLERP = MultiSlerp()
