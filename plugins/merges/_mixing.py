"""Task arithmetic's block step: the task vectors weighted, combined (summed, or TIES' sign-consensus
mean), scaled and added to the base, with mergekit's roundings (not a plugin; used by the
task-arithmetic family, DELLA and SCE, whose other per-entry steps are here too). In one C pass
(`_mix.c`) where the install built it, else in torch's passes; the tests hold the two to the same bytes."""
from __future__ import annotations

from collections.abc import Sequence

import numpy
import torch

from ._base import INTERLEAVED, SEQUENTIAL_SUM_MAX, agreeing, as_bits, interleaved_tail, sign_flip, stacked_sum

try:  # where the install built it
    from . import _mix as native
except ImportError:
    native = None


def combine(deltas: Sequence[torch.Tensor], weights: torch.Tensor, consensus: str | None,
            normalize: bool) -> torch.Tensor:
    """Σᵢ mᵢ·δᵢ (÷ Σᵢ mᵢ·wᵢ with `normalize`), mᵢ = [sign δᵢ = elected sign]; `weights` (N,) in the
    deltas' dtype. The same sums over the stacked inputs as mergekit's `get_mask` (`stacked_sum`),
    so the same roundings; with TIES' sum rule the agreeing deltas are `agreeing`'s. The task-arithmetic
    family's (and DELLA's) last step. The deltas are overwritten."""
    if consensus is None:
        mixed = stacked_sum(deltas)
    elif consensus == "sum":
        flip = sign_flip(stacked_sum(deltas))
        kept = agreeing(deltas, flip)
        mixed = stacked_sum(kept)
        as_bits(mixed).bitwise_xor_(flip)
        masks = [torch.gt(k, 0, out=torch.empty_like(k)) for k in kept] if normalize else []
    else:
        signs = [delta.sign() for delta in deltas]
        votes = stacked_sum(signs)
        elected = (votes >= 0).to(votes.dtype) * 2 - 1  # a tie (sum exactly 0) elects +, as TIES' code and mergekit
        # 0/1 in the deltas' dtype, not bool: δ·m then stays in one dtype (a bf16 × bool product
        # takes 1.5 ms for 2²⁰ entries on one thread, bf16 × bf16 0.2); a zero δ agrees with neither sign
        masks = [torch.eq(sign, elected, out=torch.empty_like(sign)) for sign in signs]
        mixed = stacked_sum([delta.mul_(mask) for delta, mask in zip(deltas, masks)])
    if not normalize:  # (the divisor is made only to divide by)
        return mixed
    if consensus is None:
        divisor = _weight_sum(weights)
    else:  # 0 becomes 1, as mergekit's: + [divisor = 0]
        divisor = stacked_sum(masks, weights)
        divisor.add_(torch.eq(divisor, 0, out=torch.empty_like(divisor)))
    return mixed.div_(divisor)


def mix_block(base: torch.Tensor, taus: Sequence[torch.Tensor], weights: torch.Tensor, consensus: str | None,
              normalize: bool, scale: float, out: torch.Tensor) -> None:
    """out = base + λ·combine(wᵢ·τᵢ) for one block, in mergekit's order: each wᵢ·τᵢ rounded to the
    dtype, their combination, its product by λ, the sum with the base. With TIES' sum rule or none, in
    bf16 or float32 on the CPU, in one pass in C where the install built `_mix.c` (the same bytes;
    bf16, three inputs, one thread, TIES: 2.6 ns an entry against 10-15 for the torch passes: the
    products, the stacked sums, sign bits, relu, masks, the division, λ and the base); else torch's.
    The τᵢ are overwritten."""
    if _in_c(taus, base, weights, consensus, normalize, scale, out):
        return
    # scalars as Python floats of values rounded to the dtype: the same products as mergekit's tensors
    # of the dtype, half the time (0.18 ns an entry against 0.34 for a 0-d tensor, bf16, one thread)
    deltas = [tau.mul_(w) for tau, w in zip(taus, weights.tolist())]
    mixed = combine(deltas, weights, consensus, normalize)
    if scale != 1:
        mixed.mul_(scale)
    torch.add(base, mixed, out=out)


def _weight_sum(weights: torch.Tensor) -> torch.Tensor:
    """Σ wᵢ in their dtype (1 where it is below 1e-8 in magnitude): the divisor without sign election."""
    divisor = weights.sum()
    divisor[divisor.abs() < 1e-8] = 1
    return divisor


def _takes(parts: Sequence[torch.Tensor], like: torch.Tensor, *others: torch.Tensor) -> bool:
    """Whether `_mix`'s sums take these: 1 to 16 `parts` and the `others` (`_fits`), and more than one entry
    (torch sums a single one as a column)."""
    return like.numel() > 1 and 0 < len(parts) <= SEQUENTIAL_SUM_MAX and _fits((*parts, *others), like)


def _fits(tensors: Sequence[torch.Tensor], like: torch.Tensor) -> bool:
    """Whether `_mix` is built and takes `tensors`: all like `like`, bf16 or float32 on the CPU, contiguous."""
    return native is not None and like.dtype in (torch.bfloat16, torch.float32) and all(
        t.dtype == like.dtype and t.shape == like.shape and t.device.type == "cpu" and t.is_contiguous()
        for t in tensors)


def _is_keep(keep: torch.Tensor, like: torch.Tensor) -> bool:
    """Whether `_mix` takes `keep` as a bool mask over `like` (SCE's selection)."""
    return keep.dtype == torch.bool and keep.shape == like.shape and keep.is_contiguous() and keep.device.type == "cpu"


def _in_c(parts, base, weights, consensus, normalize, scale, out, *models) -> bool:
    """`_mix.mix` over the blocks (task vectors, or with `models` = (drops, factors) the models), where it
    takes them (`_takes`): TIES' sum rule, SCE's erase or none. False where not (nothing done)."""
    keeps = [m for m in (models[0] if models else ()) if isinstance(m, torch.Tensor)]  # (bool masks: SCE's)
    if consensus not in ("sum", "sce", None) or not _takes(parts, out, base) or not all(
            _is_keep(k, out) for k in keeps):
        return False
    if keeps:
        models = tuple(m.numpy() if isinstance(m, torch.Tensor) else m for m in models[0]), models[1]
    tail = interleaved_tail(out.dtype, out.numel()) if len(parts) > INTERLEAVED else 0
    native.mix(consensus or "none", tuple(as_bits(t).numpy() for t in parts), tuple(weights.tolist()), normalize,
               float(_weight_sum(weights)) if consensus is None and normalize else 1.0, tail,
               str(out.dtype).removeprefix("torch."), as_bits(out).numpy(), as_bits(base).numpy(), float(scale), True,
               *models)
    return True


def weighted_sum(parts: Sequence[torch.Tensor], weights: torch.Tensor, out: torch.Tensor) -> bool:
    """out = R(Σᵢ R(wᵢ·partᵢ)) (the sum `stacked_sum`'s, its interleaved tail included) in one C pass where `_mix`
    takes the parts (`mix` with no rule, no base); False where not (nothing done)."""
    if not _takes(parts, out):
        return False
    tail = interleaved_tail(out.dtype, out.numel()) if len(parts) > INTERLEAVED else 0
    native.mix("none", tuple(as_bits(p).numpy() for p in parts), tuple(weights.tolist()), False, 1.0, tail,
               str(out.dtype).removeprefix("torch."), as_bits(out).numpy(), None, 1.0, True)
    return True


def nearswap(base: torch.Tensor, other: torch.Tensor, t: float) -> torch.Tensor | None:
    """NearSwap's blend in one C pass with torch's roundings where `_mix` takes the tensors and neither has an inf
    or a NaN; else None."""
    if not _fits((base, other), base):
        return None
    out = torch.empty_like(base)
    return out if native.nearswap(as_bits(base).numpy(), as_bits(other).numpy(), t, str(base.dtype).removeprefix(
        "torch."), as_bits(out).numpy()) else None


def tangent(units: Sequence[torch.Tensor], mean: torch.Tensor, dots: torch.Tensor, weights: torch.Tensor,
            out: torch.Tensor) -> bool:
    """multislerp's tangent step, out = R(Σᵢ R(wᵢ·R(uᵢ − R(dᵢ·m)))) (the sum `stacked_sum`'s), in one C pass
    where `_mix` takes the units (up to four: no interleaved tail); False where not (nothing done)."""
    if len(units) > INTERLEAVED or not _takes(units, out, mean):
        return False
    native.tangent(tuple(as_bits(u).numpy() for u in units), as_bits(mean).numpy(), tuple(dots.view(-1).tolist()),
                   tuple(weights.tolist()), str(out.dtype).removeprefix("torch."), as_bits(out).numpy())
    return True


def spherical_end(mean: torch.Tensor, row: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, scale: torch.Tensor,
                  base: torch.Tensor | None, out: torch.Tensor) -> bool:
    """multislerp's last step, out = R(R(R(R(m·cos) + R(v·sin))·scale) + base) (the 0-d factors in the dtype),
    in one C pass where `_mix` takes the tensors; False where not (nothing done)."""
    if not _takes([row], out, mean, *([] if base is None else [base])):
        return False
    native.spherical_end(as_bits(mean).numpy(), as_bits(row).numpy(), float(cos), float(sin), float(scale),
                         None if base is None else as_bits(base).numpy(), str(out.dtype).removeprefix("torch."),
                         as_bits(out).numpy())
    return True


def variance(models: Sequence[torch.Tensor], base: torch.Tensor, out: torch.Tensor) -> bool:
    """SCE's variances (`sce.variance`) of τᵢ = R(modelᵢ − base), written into `out`, in one C pass where
    `_mix` takes them (bf16, three inputs, one thread: ~2 ns an entry against ~10 for the task vectors and
    the float64 torch passes); False where not (nothing done)."""
    if not _takes(models, out, base):
        return False
    native.variance(tuple(as_bits(m).numpy() for m in models), as_bits(base).numpy(),
                    str(out.dtype).removeprefix("torch."), as_bits(out).numpy())
    return True


def squares(model: torch.Tensor, base: torch.Tensor, keep: torch.Tensor | None, out: torch.Tensor) -> bool:
    """SCE's R(R(τ·keep)²), τ = R(model − base), written into float32 `out`, in one C pass where `_mix`
    takes them (`keep`: a bool mask or None); False where not (nothing done)."""
    if out.dtype != torch.float32 or not _takes([model], base) or not (
            out.shape == base.shape and out.is_contiguous() and out.device.type == "cpu") or (
            keep is not None and not _is_keep(keep, base)):
        return False
    native.squares(as_bits(model).numpy(), as_bits(base).numpy(), None if keep is None else keep.numpy(),
                   str(base.dtype).removeprefix("torch."), out.numpy())
    return True


def mix_models(base: torch.Tensor, models: Sequence[torch.Tensor], masks: Sequence[tuple | None],
               factors: Sequence[float | None], weights: torch.Tensor, consensus: str | None, normalize: bool,
               scale: float, out: torch.Tensor) -> bool:
    """`mix_block` from the models' blocks, where each input's drops are a mask of bits or magnitude bounds
    (`Keep.drops`, or None) and its rescale a factor (or None): τᵢ = R(modelᵢ − base), its drops, times
    the factor, made in the same C pass, which reads each model once instead of a torch pass a step.
    `consensus` "sce": SCE's erase step (`_mix.c`; the drops a bool mask each), here only: its torch
    passes are SCE's own. False where that pass does not take them: the caller makes the τᵢ."""
    return _in_c(models, base, weights, consensus, normalize, scale, out, tuple(masks), tuple(factors))


def l1_sums(model: torch.Tensor, base: torch.Tensor, drops, dtype: torch.dtype) -> tuple[float, float] | None:
    """(Σ |τ|, Σ kept |τ|) in float64 of τ = R(model − base) over a block, in one C pass (`_sparsify.l1_factor`),
    where `_mix` takes them and the drops are None or packed bits ((bits, the bit of the block's first entry):
    DARE's; or a function giving such bits, called only then: DELLA's draws); else None (nothing done)."""
    if model.dtype != dtype or not _takes([model], base) or not (drops is None or callable(drops) or (
            len(drops) == 2 and isinstance(drops[0], numpy.ndarray))):
        return None
    bits, first = (drops() if callable(drops) else drops) if drops is not None else (None, 0)
    return native.l1(as_bits(model).numpy(), as_bits(base).numpy(), bits, first, str(dtype).removeprefix("torch."))


class TaskVector:
    """τ = model − base of one input in `dtype`, a block at a time: `tau(start, stop)`. Its operands let
    `magnitude_keys` make |τ|'s keys from the models in one C pass."""

    def __init__(self, model: torch.Tensor, base: torch.Tensor, dtype: torch.dtype):
        self.model, self.base, self.dtype = model, base, dtype

    def __call__(self, start: int, stop: int) -> torch.Tensor:
        return torch.sub(self.model[start:stop].to(self.dtype), self.base[start:stop].to(self.dtype))


def magnitude_keys(tau, out: torch.Tensor, descending: bool) -> torch.Tensor | None:
    """|τ|'s keys (`_introsort.keys_of`) written into `out` (bf16, τ's length) and their histogram (65536 int64
    counts, as `_select.histogram16`'s) in one C pass (`_mix.c`'s `keys`: 33M entries, one thread, 0.77 ns an
    entry, against 1.23-1.31 for torch's τ and |τ| into the same buffer, the keys and the C histogram), where
    `_mix` is built and τ is a `TaskVector` of bf16 models on the CPU; else None (nothing done)."""
    if not (isinstance(tau, TaskVector) and tau.dtype == tau.base.dtype == out.dtype == torch.bfloat16
            and _takes([tau.model], tau.base, out)):
        return None
    counts = torch.zeros(1 << 16, dtype=torch.int64)
    native.keys(as_bits(tau.model).numpy(), as_bits(tau.base).numpy(), descending, as_bits(out).numpy(),
                counts.numpy())
    return counts


def magprune_sums(model: torch.Tensor, base: torch.Tensor, bits: numpy.random.SFC64, thresholds: numpy.ndarray,
                  out: numpy.ndarray, block_rows: int) -> list[tuple[float, float]] | None:
    """DELLA's drops of rows of τ = R(model − base) into `out` and both L1 sums of each block of `block_rows` rows
    (whole bytes of bits), as `_magprune.draw_packed` and `l1_sums` make them block by block (the same draws,
    ranks, bits and sums), in one C pass from bf16 models (`_mix.c`'s `magprune`: each row's |τ| ranked by
    counting its bf16 patterns, `bits` stepped in C); None where `_mix` is not built or does not take the models
    (nothing drawn). A 1024 × 1024 input of the 168M job, one thread: 2.6-3.0 ns an entry, against 8.3-12 for
    torch's |τ|, numpy's draws and row sort, `ranked_bits` and `l1_sums`."""
    if model.dtype != torch.bfloat16 or not _takes([model], base):
        return None
    state = bits.state
    sums = native.magprune(as_bits(model).numpy(), as_bits(base).numpy(), state["state"]["state"], thresholds, out,
                           block_rows * model.shape[-1])
    bits.state = state
    return sums


def ranked_bits(keys: numpy.ndarray, draws: numpy.ndarray, thresholds: numpy.ndarray, out: numpy.ndarray) -> bool:
    """DELLA's drops put in place as packed bits in one C pass (`_mix.c`'s `ranked`: the rows' sorted keys, the
    draws in rank order, the ramp's thresholds), where `_mix` is built; False where not (nothing done)."""
    if native is None:
        return False
    native.ranked(keys, draws, thresholds, out)
    return True
