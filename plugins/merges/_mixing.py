"""Task arithmetic's block step: the task vectors weighted, combined (summed, or TIES' sign-consensus
mean), scaled and added to the base, with mergekit's roundings (not a plugin; used by the
task-arithmetic family and DELLA). In one C pass (`_mix.c`) where the install built it, else in
torch's passes; the tests hold the two to the same bytes."""
from __future__ import annotations

from collections.abc import Sequence

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


def _in_c(parts, base, weights, consensus, normalize, scale, out, *models) -> bool:
    """`_mix.mix` over the blocks (task vectors, or with `models` = (drops, factors) the models), where it
    takes them: TIES' sum rule or none; bf16 or float32 on the CPU, alike and contiguous; more than one
    entry (torch sums a single one as a column); ≤ 16 inputs. False where not (nothing done)."""
    tensors = [*parts, base, out]
    if consensus not in ("sum", None) or native is None or out.dtype not in (torch.bfloat16, torch.float32) or (
            out.numel() < 2 or len(parts) > SEQUENTIAL_SUM_MAX or not all(
                t.dtype == out.dtype and t.shape == out.shape and t.device.type == "cpu" and t.is_contiguous()
                for t in tensors)):
        return False
    tail = interleaved_tail(out.dtype, out.numel()) if len(parts) > INTERLEAVED else 0
    native.mix(consensus or "none", tuple(as_bits(t).numpy() for t in parts), tuple(weights.tolist()), normalize,
               float(_weight_sum(weights)) if consensus is None and normalize else 1.0, tail,
               str(out.dtype).removeprefix("torch."), as_bits(out).numpy(), as_bits(base).numpy(), float(scale), True,
               *models)
    return True


def mix_models(base: torch.Tensor, models: Sequence[torch.Tensor], masks: Sequence[tuple | None],
               factors: Sequence[float | None], weights: torch.Tensor, consensus: str | None, normalize: bool,
               scale: float, out: torch.Tensor) -> bool:
    """`mix_block` from the models' blocks, where each input's drops are a mask of bits or magnitude bounds
    (`Keep.drops`, or None) and its rescale a factor (or None): τᵢ = R(modelᵢ − base), its drops, times
    the factor, made in the same C pass, which reads each model once instead of a torch pass a step.
    False where that pass does not take them: the caller makes the τᵢ."""
    return _in_c(models, base, weights, consensus, normalize, scale, out, tuple(masks), tuple(factors))

