"""Model Stock: average fine-tuned models and move toward the base by their spread in angle."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ._base import Operator, frozen
from ._split import whole_sum
from ._select import block_ranges

BLOCK = 1 << 20  # elements per block (of rows with filter_wise)


class ModelStock(Operator):
    """Model Stock: average the fine-tuned models, then interpolate toward the base by their angle.

    τᵢ = θᵢ − θ₀,  cos φ = mean over pairs i < j of ⟨τᵢ, τⱼ⟩ / max(‖τᵢ‖·‖τⱼ‖, 1e-6) (clamped to [−1, 1]),
    t = N·cos φ / (1 + (N − 1)·cos φ),  θ = t·(1/N)·Σᵢ θᵢ + (1 − t)·θ₀,
    with t = 0 (keep the base) where |1 + (N − 1)·cos φ| < 1e-6, as mergekit's `model_stock`.
    The angle is one per tensor, or one per row of the last axis with `filter_wise: true`
    (a 1-D tensor is then still one vector). Needs a base and at least 2 fine-tuned models.
    Jang, Yun, Han 2024, "Model Stock: All we need is just a few fine-tuned models", arXiv 2403.19522.

    Computed in the inputs' dtype with mergekit 0.1.5's operations in its order (no upcast: in
    bfloat16 every step rounds to bfloat16), so that inputs in any dtype give its bytes.
    """

    name = "model_stock"
    params = frozen({"filter_wise": False})
    # Two workers of one torch thread each, the sums to one number split as the command's threads split them
    # (`whole_sum`): the 168M merge's work in one process 1.19 → 0.81 s (alternating, medians of 10); the same bytes.
    serial_kernels = True

    def merge(self, tensors: Sequence[torch.Tensor], base: torch.Tensor | None = None, **params: Any) -> torch.Tensor:
        self.check_inputs(tensors, minimum=2)
        base = self.need_base(base, tensors)
        filter_wise = self.flag("filter_wise", self.bind(params, len(tensors))["filter_wise"])
        shape = base.shape
        if filter_wise and base.dim() > 1:
            # Memory (issue 15): one t per row, so blocks of rows go through the whole formula at a time,
            # 256 rows or a multiple: torch averages the stacked cosines of 5 or more pairs differently in
            # a stack's last rows (`_base.interleaved_tail`), so a block must end where the whole does
            # or on a multiple of 32 rows (4 models, float32, blocks of 349 rows: 2721 entries differed).
            rows, width = math.prod(shape[:-1]), shape[-1]
            base, tensors = base.reshape(rows, width), [w.reshape(rows, width) for w in tensors]
            out = torch.empty_like(base)
            for s, e in block_ranges(rows, max(256, BLOCK // width // 256 * 256)):
                part, ends = base[s:e], [w[s:e] for w in tensors]
                t = interpolation_ratio(lambda i, out: torch.sub(ends[i], part, out=out), len(ends)).unsqueeze(-1)  # noqa: B023
                out[s:e] = mix(t, ends, part)
            return out.reshape(shape)
        base, tensors = base.reshape(1, -1), [w.reshape(1, -1) for w in tensors]
        if not filter_wise:
            base, tensors = base[0], [w[0] for w in tensors]
        # One angle for the whole tensor (the offsets' buffers: `interpolation_ratio`); the mix runs in
        # blocks into a buffer one of them left free.
        free: list[torch.Tensor] = []
        t = interpolation_ratio(lambda i, out: torch.sub(tensors[i], base, out=out), len(tensors), free).unsqueeze(-1)
        out = free[0] if free and free[0].dtype == base.dtype else torch.empty_like(base)
        del free  # (the other buffers it left are freed now, not after the mix)
        for s in range(0, base.shape[-1], BLOCK):
            out[..., s:s + BLOCK] = mix(t, [w[..., s:s + BLOCK] for w in tensors], base[..., s:s + BLOCK])
        return out.reshape(shape)


def mix(t: torch.Tensor, tensors: Sequence[torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """t·(1/N)·Σᵢ θᵢ + (1 − t)·θ₀, in mergekit's operations."""
    average = sum(tensors) / len(tensors)
    return t * average + (1 - t) * base


def interpolation_ratio(offset: Callable[[int, torch.Tensor | None], torch.Tensor], count: int,
                        free: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Model Stock's t from the mean pairwise cosine of the offsets, i < count (along the last axis);
    `offset(i, out)` writes offset i into `out` (None: a new tensor) and returns it. Buffers left free
    are appended to `free` (a caller's result fits there).

    Tensor-sized temporaries made afresh are paged in afresh (they were 8 per tensor). Up to three
    models, each offset is made once and kept, and a pair's product overwrites the first offset of the
    pair at its last use (pairs in order, (i, count − 1) is offset i's last); the one other product of
    three models goes into the buffer the third offset is then made in: three buffers, three
    subtractions, where it made 5 and paged in 4 buffers (168M job, three models: in one process 0.78
    of the time, the whole command 0.94 of the wall, median of 9, peak −10 MB). With more models two
    buffers serve every pair and a third the products, each offset made again when needed (the same
    values)."""
    cosines, norm, kept, spare = [], {}, {}, []  # each offset's norm taken once (the same values wherever it is taken)

    def made(i: int) -> torch.Tensor:
        if i not in kept:
            kept[i] = offset(i, spare.pop() if spare else None)
            if i not in norm:
                norm[i] = torch.norm(kept[i], dim=-1)
        return kept[i]

    for i in range(count - 1):
        for j in range(i + 1, count):
            first, other = made(i), made(j)
            last = count <= 3 and j == count - 1
            product = torch.mul(first, other, out=first if last else (spare.pop() if spare else None))
            cosines.append((whole_sum(product) / (norm[i] * norm[j]).clamp(min=1e-6)).clamp(-1, 1))
            spare.append(product)
            if count > 3:  # made again when needed: this pair's buffers serve the next
                spare += [kept.pop(j)] + ([kept.pop(i)] if j == count - 1 else [])
            elif last:
                del kept[i]
    if free is not None:
        free += spare
    cos = torch.stack(cosines).mean(dim=0)
    denominator = 1 + (count - 1) * cos
    # At the singularity there is no finite estimate; keeping the base is the safe choice.
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    return torch.where(singular, torch.zeros_like(cos), count * cos / safe)


MODEL_STOCK = ModelStock()
