"""SCE: select by variance, calculate matrix-level weights, erase sign conflicts (FuseChat)."""
from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from . import _introsort, _mixing
from ._base import Operator, agreeing, as_bits, frozen, sign_flip, stacked_sum
from ._select import block_ranges, top_cut

BLOCK = 1 << 17  # elements per column block of the per-position steps: they stay in a core's cache


def select_mask(tvs: Callable[[int, int], torch.Tensor], blocks: list[tuple[int, int]], fraction: float,
                dtype: torch.dtype, tie_break: str = "mergekit", device=None) -> torch.Tensor:
    """1 at the ⌊fraction·k⌋ positions of largest variance across the inputs (k: positions whose
    variance is not 0), else 0; flat, in the task vectors' dtype (`select_keep`)."""
    return select_keep(tvs, blocks, fraction, dtype, tie_break, device).to(dtype)


def select_keep(tvs: Callable[[int, int], torch.Tensor], blocks: list[tuple[int, int]], fraction: float,
                dtype: torch.dtype, tie_break: str = "mergekit", device=None, models=None) -> torch.Tensor:
    """`select_mask` as a bool mask. Counted and picked as mergekit does;
    the variances (per position) over blocks `tvs(start, stop)` of the (N, n) task vectors. Of the
    positions whose variance equals the cut's, `tie_break` "mergekit" keeps those torch.topk keeps:
    for more than n/64 of them its std::nth_element, followed along its partitions (`_introsort`: the
    straddling entries followed, where topk copies the input as (value, index) pairs, 16 bytes an entry), else its
    partial sort itself; "index" the lowest flat indices first (an exact radix select over blocks). The
    mask is made on `device`, where the task vectors are. `models`: (the models, the base) flat, where
    the variances may be made from them in one C pass (`_mixing.variance`)."""
    var = variances(tvs, blocks, torch.empty(blocks[-1][1], dtype=dtype, device=device), models)
    k = int(torch.count_nonzero(var) * fraction)
    if k == 0:
        return torch.zeros_like(var, dtype=torch.bool)
    if tie_break == "index":
        return _first_by_index(var, k)
    if k * 64 > var.numel() and var.dtype != torch.float64 and _introsort.follows_torch():
        kept = _introsort.kept_range(_introsort.keys_of(var.abs_()).cpu().numpy(), 0, k, _introsort.SELECT)
        if kept is not None:
            del var  # (before the mask is made: not one more tensor at the peak)
            return torch.from_numpy(kept).to(device=device)
        variances(tvs, blocks, var, models)  # (scrambled by a segment topk would heapsort)
    # (abs in place: the same values.) Unsorted: mergekit's topk sorts the k it keeps afterwards, which
    # changes their order, not which they are.
    indices = torch.topk(_introsort.keys_of(var.abs_()), k=k, largest=True, sorted=False).indices
    del var
    return torch.zeros(blocks[-1][1], dtype=torch.bool, device=device).index_fill_(0, indices, True)


def variances(tvs, blocks: list[tuple[int, int]], out: torch.Tensor, models=None) -> torch.Tensor:
    """`variance` of each block of the task vectors, written into `out` (not a torch.cat of the
    blocks: an extra copy); from `models` (the models, the base) in one C pass where it takes them."""
    if models is not None and _mixing.variance(*models, out):
        return out
    for s, e in blocks:
        out[s:e] = variance(tvs(s, e))
    return out


def variance(rows: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """`torch.var(rows, dim=0, unbiased=False)` to the byte, 4-10× as fast on the CPU (bf16, 3 × 2²⁰:
    15-50 ms against 150). torch's CPU kernel runs Welford's update in float64 one column at a time;
    here the same updates run over all columns at once: mean₁ = x₁, m2₁ = 0; for i ≥ 2:
    δ = xᵢ − meanᵢ₋₁, meanᵢ = meanᵢ₋₁ + δ/i, m2ᵢ = m2ᵢ₋₁ + δ·(xᵢ − meanᵢ), the product and the sum
    rounded apart (the kernel fuses no multiply-add: a fused one differs from it in float64); then
    var = m2ₖ/k, rounded to float32 and then to the rows' dtype, as the kernel's float64 result is
    converted (to half types through float). Elsewhere than the CPU, torch.var itself. `rows`: a stacked
    tensor, or its rows (not stacked: a copy fewer)."""
    first = rows[0]
    if first.device.type != "cpu":
        return torch.var(rows if isinstance(rows, torch.Tensor) else torch.stack(list(rows)), dim=0, unbiased=False)
    mean, m2 = first.to(torch.float64, copy=True), torch.zeros(first.shape, dtype=torch.float64)
    for i in range(1, len(rows)):
        delta = rows[i] - mean
        mean.add_(delta / (i + 1))
        m2.add_(delta.mul_(rows[i] - mean))
    var = m2.div_(len(rows))
    return var if first.dtype == torch.float64 else var.to(torch.float32).to(first.dtype)


def _first_by_index(var: torch.Tensor, k: int) -> torch.Tensor:
    """The mask of the k largest variances, ties at the cut lowest index first, by blocks."""
    cut = top_cut(lambda s, e: var[s:e], var.numel(), k)  # variances are ≥ 0: |var| = var
    mask = torch.empty(var.shape, dtype=torch.bool, device=var.device)
    for s, e in block_ranges(var.numel()):
        mask[s:e] = cut.mask(var[s:e], s)  # (the cut compares half-precision blocks as they are)
    return mask


def row_mean(row: torch.Tensor, rows: int) -> torch.Tensor:
    """The mean torch takes of `row` as one of `rows` rows of a (rows, n) tensor (mergekit's
    `torch.mean(tvs ** 2, dim=1..)`), to the byte, without the other rows in memory. torch's CPU
    reduction of several rows hands each thread whole rows and sums each serially; one row alone
    is split across threads and summed in other pieces. A (rows, n) view of the one row, repeating
    it (stride 0), is reduced as the whole tensor is (measured equal for 1, 2, 3 and 5 rows of up to
    10⁷ entries, on 1 and 2 threads), each row a serial sum."""
    return row.reshape(1, -1).expand(rows, -1).mean(dim=1)[0]


def matrix_weights(means: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """ηᵢ = mean(τᵢ²) / Σⱼ mean(τⱼ²) from the means (N,); uniform where that sum is below 1e-6
    (mergekit's guard). `dtype`: the squares' own dtype where the means were taken of squares
    upcast to float32, as torch's CPU mean of a half-precision tensor upcasts them itself (cast,
    float32 sum, divide, round to the half dtype): the same means, without a float32 copy."""
    weights = means if dtype is None else means.to(dtype)
    total = torch.sum(weights).item()
    if abs(total) < 1e-6:
        return torch.ones_like(weights) / weights.shape[0]
    return weights / total


class SelectCalculateErase(Operator):
    """SCE (FuseChat): select by variance, calculate matrix-level weights, erase sign conflicts.

    τᵢ = θᵢ − θ₀; select: keep the `select_topk` fraction of positions whose variance across the
    τᵢ is largest (counted among positions of non-zero variance), zero the rest in every τᵢ;
    calculate: ηᵢ = mean(τᵢ²) / Σⱼ mean(τⱼ²) per tensor; erase: s = sign Σᵢ τᵢ (a tie elects +),
    mᵢ = [sign τᵢ = s] (0 where τᵢ = 0); θ = θ₀ + Σᵢ ηᵢ·mᵢ·τᵢ / max(Σᵢ ηᵢ·mᵢ, 10⁻⁶).
    Parameters as mergekit's: `select_topk` (default 1: no selection; a fraction in (0, 1]),
    `int8_mask` (mergekit's mask storage: it changes no number), `tie_break` (an addition: "index"
    keeps the variances tied at the cut lowest index first, without torch.topk's 16-byte-an-entry
    copy; the default "mergekit" keeps the ones torch.topk keeps); a per-model `weight`, which
    mergekit accepts and ignores, is ignored with a warning. Computed in the dtype the tensors
    come in, in mergekit's order of operations, so that a recipe gives mergekit's bytes. As in
    mergekit, the weights are uniform when Σⱼ mean(τⱼ²) < 10⁻⁶ (tensors barely changed).
    Wan et al. 2024, "FuseChat: Knowledge Fusion of Chat Models", arXiv 2408.07990.
    """

    name = "sce"
    params = frozen({"int8_mask": False, "select_topk": 1.0, "tie_break": "mergekit"})
    serial_kernels = True  # the variance cut: torch.topk or torch.bincount, one thread

    def entry_bytes(self, inputs: int, compute_size: int, params: Mapping[str, Any]) -> int:
        """Bytes an entry held besides the inputs (capabilities.WorkingMemory): while selecting, the variances
        and, for mergekit's tie order, the selection's bool mask and followed ties (a byte) and the C walk's
        numbers (2), or topk's values and int64 indices (another torch's sort), or the index cut's mask; then
        the mask (a bool and, for the torch passes, one in the dtype) with one input's float32 squares, and
        with the result. (The engine's default, 44 bytes an entry, ran the 168M job's two 33M-entry tensors
        alone, the other worker idle: 2.6-2.8 s of merge against 2.0-2.1.)"""
        c, tie_break = compute_size, params.get("tie_break", "mergekit")
        select = c + (c if tie_break == "index" else 4 if _introsort.follows_torch() else c + 8)
        return max(select, 1 + c + max(4, c))

    def merge(self, tensors: Sequence[torch.Tensor], base: torch.Tensor | None = None, **params: Any) -> torch.Tensor:
        self.check_inputs(tensors)
        base = self.need_base(base, tensors)
        bound = self.bind(params, len(tensors))
        self.flag("int8_mask", bound["int8_mask"])
        fraction = self.real("select_topk", bound["select_topk"])
        if not 0 < fraction <= 1:
            raise self.error(f"select_topk must be a fraction in (0, 1], got {fraction}")
        if bound["tie_break"] not in ("mergekit", "index"):
            raise self.error(f"tie_break must be 'mergekit' (keep the tied variances torch.topk keeps, as "
                             f"mergekit) or 'index' (lowest index first), got {bound['tie_break']!r}")
        # Memory (issue 15): the task vectors are made again block by block whenever needed (the same
        # subtraction, so the same values) and every per-position step runs over column blocks; only
        # the reductions mergekit takes whole stay whole: the top-k of the variances (its choice among
        # tied variances is its own) and the mean squares, one input's squares at a time.
        flat_base, inputs = base.reshape(1, -1), [t.reshape(1, -1) for t in tensors]
        blocks = block_ranges(base.numel(), BLOCK)

        def tvs(s: int, e: int, rows: Sequence[torch.Tensor] = inputs) -> list[torch.Tensor]:
            return [t[0, s:e] - flat_base[0, s:e] for t in rows]  # (rows apart: no stacked copy)

        dtype = torch.promote_types(base.dtype, tensors[0].dtype)
        models = [t[0] for t in inputs], flat_base[0]  # (for the C passes: `_mixing`)
        keep = select_keep(tvs, blocks, fraction, dtype, bound["tie_break"], base.device,
                           models) if fraction < 1 else None
        mask = functools.cache(lambda: keep.to(dtype))  # (the torch passes': made once, where they run)

        def masked(s: int, e: int, rows: Sequence[torch.Tensor] = inputs) -> list[torch.Tensor]:
            return [tv.mul_(mask()[s:e]) for tv in tvs(s, e, rows)] if keep is not None else tvs(s, e, rows)

        # one input's squares at a time (`row_mean`), rounded in the task vectors' dtype as mergekit's,
        # held in float32: the copy torch's mean of half-precision squares would make is this buffer
        # (1B model: 262 MB, where all three inputs' squares took 786 MB)
        upcast = dtype in (torch.bfloat16, torch.float16) and base.device.type == "cpu"
        squares = torch.empty(base.numel(), dtype=torch.float32 if upcast else dtype, device=base.device)
        means = []
        for row in inputs:
            if not _mixing.squares(row[0], flat_base[0], keep, squares):
                for s, e in blocks:
                    squares[s:e] = masked(s, e, [row])[0].square_()
            means.append(row_mean(squares, len(inputs)))
        del squares
        weights = matrix_weights(torch.stack(means), dtype if upcast else None).view(-1, 1)
        out = torch.empty(base.numel(), dtype=weights.dtype, device=base.device)
        if _mixing.mix_models(flat_base[0], models[0], [keep] * len(inputs), [None] * len(inputs),
                              weights.view(-1), "sce", True, 1.0, out):
            return out.view(base.shape)
        scalars = weights.view(-1).tolist()
        for s, e in blocks:
            block = masked(s, e)
            # Erase as TIES' `combine`: mᵢ·τᵢ·ηᵢ = σ·relu(σ·τᵢ)·ηᵢ (`agreeing`), sums over the inputs as
            # `stacked_sum` (torch's bytes)
            flip = sign_flip(stacked_sum(block))
            kept = agreeing(block, flip)
            agree = [torch.gt(row, 0, out=torch.empty_like(row)) for row in kept]
            mixed = stacked_sum([row.mul_(w) for row, w in zip(kept, scalars)])
            # σ back; +0 stays +0 (an ηᵢ of 0 can leave nothing where σ = -1; mergekit's sum gives +0 there)
            as_bits(mixed).bitwise_xor_(flip.mul_(torch.ne(mixed, 0, out=torch.empty_like(flip))))
            torch.add(flat_base[0, s:e], mixed.div_(stacked_sum(agree, weights.view(-1)).clamp_(min=1e-6)), out=out[s:e])
        return out.view(base.shape)

SCE = SelectCalculateErase()
