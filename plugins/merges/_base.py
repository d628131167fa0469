"""Parameter binding, input checks and a sum shared by the built-in merge operators (not a plugin).

Every operator binds its keyword arguments the same way: defaults filled in, an unknown name
refused with the nearest known one, a missing required value refused, and each per-model
parameter turned into one value per input tensor (a scalar is broadcast).
"""
from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import torch

from adaptkit.plugin import AdaptkitError, closest


#: Up to this many tensors, torch's CPU `stack(parts).sum(dim=0)` adds them one after the other in
#: the accumulator dtype (float32 for half precision) over the bulk of the entries; from 18 on it sums
#: in a cascade (measured, torch 2.13: equal bytes on 2²⁰ entries of values spread over e^±24 for 1 to
#: 17 parts, not for 18). Its last entries it sums otherwise: see `interleaved_tail`.
SEQUENTIAL_SUM_MAX = 16
INTERLEAVED = 4  # partial sums of torch's reduction of a stack's last entries


def interleaved_tail(dtype: torch.dtype, numel: int) -> int:
    """How many of the last entries of a stack of parts of `numel` entries torch's CPU `sum(dim=0)`
    adds in INTERLEAVED partial sums: pₖ = Σᵢ part[4i + k] (the parts beyond the last group of four
    added to p₀ after), then ((p₀ + p₁) + p₂) + p₃. Its vectorized loop takes the entries in groups of
    four accumulator vectors, each group part after part, and what is left after the last group (and
    below one vector, what is left after groups of four entries) in those interleaved sums. The two
    orders agree up to 4 parts. Measured, not assumed: a probe of 5 parts (+big, −big, 0, 0, tiny:
    part after part tiny survives, interleaved it is lost in big) of `numel`'s length class. torch
    2.13 here: numel mod 32 entries for half and single precision, mod 16 for double, the same with
    ATEN_CPU_CAPABILITY avx512, avx2 and default."""
    return _probe(dtype, numel if numel < 512 else 256 + numel % 256)  # (any group of ≤ 256: the same remainder)


@functools.lru_cache(maxsize=None)
def _probe(dtype: torch.dtype, length: int) -> int:
    big = 2.0 ** 15
    tiny = big * torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps / 4
    probe = torch.zeros(5, length, dtype=dtype)
    probe[0], probe[1], probe[4] = big, -big, tiny
    lost = (probe.sum(dim=0) == 0).flip(0).to(torch.int64)
    return int(lost.cumprod(0).sum())


def stacked_sum(parts: Sequence[torch.Tensor], scales: torch.Tensor | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """`torch.stack(parts).sum(dim=0)` to the byte, without the stack: one accumulator in float32
    (the inputs' dtype for float32 and float64), from zero, that each part is added to, rounded once,
    and for more than 4 parts the last `interleaved_tail` entries summed as torch sums them. Half-
    precision stacks sum slowly (bf16: 2.1 ms for 3×2²⁰ entries, plus 0.9 ms to stack, against 0.7 ms
    this way), and mergekit's arithmetic is such sums of stacked task vectors.
    With `scales` (N,) in the result's dtype, `parts` are 0/1 masks and the sum is that of the stacked
    products partᵢ·scaleᵢ: each product is scaleᵢ or 0, exact, so the accumulator adds scaleᵢ where
    the mask is set (1.4 ms instead of 2.4 for three bf16 masks of 2²⁰ entries).
    Parts that are blocks of a bigger tensor sum as the whole does where each block starts at a
    multiple of 256 entries and the last has at least 256 (`_select.block_ranges`, the engine's row
    blocks). (Before the interleaved tail, 5 or more parts could differ from mergekit's bytes there.)"""
    if len(parts) > SEQUENTIAL_SUM_MAX or parts[0].device.type != "cpu" or parts[0].numel() == 1 or (
            scales is None and not parts[0].is_floating_point()):  # (one entry: torch sums a column of N)
        if scales is not None:
            parts = [part * scale for part, scale in zip(parts, scales.unbind(0))]
        total = torch.stack(list(parts)).sum(dim=0)
        return total if out is None else out.copy_(total)
    dtype = parts[0].dtype if scales is None else scales.dtype
    # from +0 as torch's sum: -0 + -0 would stay -0 where torch's gives +0
    total = torch.zeros(parts[0].shape, dtype=torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype)

    def add(into: torch.Tensor, i: int, part: torch.Tensor) -> None:
        if scales is None:
            into.add_(part)
        else:
            into.add_(part, alpha=float(scales[i]))

    for i, part in enumerate(parts):
        add(total, i, part)
    tail = interleaved_tail(dtype, total.numel()) if len(parts) > INTERLEAVED else 0
    if tail:
        sums = torch.zeros(INTERLEAVED, tail, dtype=total.dtype)
        groups = len(parts) // INTERLEAVED * INTERLEAVED
        for i, part in enumerate(parts):
            add(sums[i % INTERLEAVED if i < groups else 0], i, part.reshape(-1)[-tail:])
        for k in range(1, INTERLEAVED):
            sums[0].add_(sums[k])
        total.view(-1)[-tail:] = sums[0]
    return total.to(dtype) if out is None else out.copy_(total)


def as_bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bits as integers of its width (a view), for sign-bit and mask operations."""
    return tensor.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()])


def sign_flip(votes: torch.Tensor) -> torch.Tensor:
    """The sign bit of each vote as an integer (`as_bits`), overwriting `votes`: XORed into a value it
    maps the elected sign to +. TIES' rule, ≥ 0 elects +: votes that are a `stacked_sum` (started at +0)
    are never -0, so the sign bit is set exactly where they are below 0."""
    bits = as_bits(votes)
    return bits.bitwise_and_(torch.iinfo(bits.dtype).min)


def agreeing(deltas: Sequence[torch.Tensor], flip: torch.Tensor) -> list[torch.Tensor]:
    """relu(σ·δᵢ) for σ = ±1 the elected sign (`sign_flip`), in place: δᵢ where its sign is the
    elected one, made positive, else 0. mᵢ·δᵢ = σ·relu(σ·δᵢ), and a sum of the flipped terms is the
    flipped sum exactly (rounding to nearest is symmetric): XOR and relu instead of sign, comparison
    and product masks (bf16, one thread: 1.2 ns an entry and input with the sums, against 2.1)."""
    return [torch.bitwise_xor(as_bits(delta), flip, out=as_bits(delta)).view(delta.dtype).relu_() for delta in deltas]


def frozen(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    """A read-only view, so that no caller can change an operator's defaults for everyone."""
    return MappingProxyType(dict(mapping))


class Operator:
    """Common base of the built-in merge operators; subclasses set the class attributes."""

    name: str = ""
    params: Mapping[str, Any] = frozen({})
    per_model: frozenset[str] = frozenset()
    random: bool = False
    elementwise: bool = False  # each output element depends only on the same element of the inputs
    serial_kernels: bool = False  # single-threaded kernels (sorts, numpy) in its work: see capabilities.MergeOptions

    def error(self, message: str) -> AdaptkitError:
        return AdaptkitError(f"{self.name}: {message}")

    def bind(self, given: Mapping[str, Any], count: int) -> dict[str, Any]:
        """All parameters by name, defaults filled in; per-model ones as lists of `count` values."""
        for key in given:
            if key not in self.params:
                hint = closest(key, self.params)
                known = ", ".join(self.params) or "none"
                did_you = f"; did you mean '{hint}'?" if hint else f" (parameters: {known})"
                raise self.error(f"unknown parameter '{key}'{did_you}")
        bound = {}
        for key, default in self.params.items():
            value = given.get(key, default)
            if key in self.per_model:
                value = self._per_input(key, value, count)
            elif value is None:
                raise self.error(f"parameter '{key}' is required")
            bound[key] = value
        return bound

    def _per_input(self, key: str, value: Any, count: int) -> list[Any]:
        if isinstance(value, Sequence) and not isinstance(value, str):
            values = list(value)
            if len(values) != count:
                raise self.error(f"'{key}' has {len(values)} values for {count} input models")
        else:
            values = [value] * count
        if any(v is None for v in values):
            raise self.error(f"parameter '{key}' is required for every input model")
        return values

    def real(self, key: str, value: Any) -> float:
        # bool is an int subclass: `weight: true` in a recipe is a typo, not 1.0.
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise self.error(f"'{key}' must be a finite number, got {value!r}")
        return float(value)

    def flag(self, key: str, value: Any) -> bool:
        """A true/false parameter. 1 and 0 (also 1.0, 0.0) are read as true and false, as mergekit reads
        them (published recipes write `normalize: 1.0`); any other value is refused, where mergekit would
        take every non-zero number as true."""
        if isinstance(value, numbers.Real) and not isinstance(value, bool) and value in (0, 1):
            return bool(value)
        if not isinstance(value, bool):
            raise self.error(f"'{key}' must be true or false (or 1 or 0), got {value!r}")
        return value

    def check_inputs(self, tensors: Sequence[torch.Tensor], minimum: int = 1) -> None:
        if len(tensors) < minimum:
            raise self.error(f"needs at least {minimum} input model{'s' if minimum > 1 else ''}, got {len(tensors)}")
        shape = tensors[0].shape
        for tensor in tensors[1:]:
            if tensor.shape != shape:
                raise self.error(f"input shapes differ: {tuple(shape)} and {tuple(tensor.shape)}")

    def need_base(self, base: torch.Tensor | None, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        if base is None:
            raise self.error("needs a base model")
        if base.shape != tensors[0].shape:
            raise self.error(f"base shape {tuple(base.shape)} differs from the inputs' {tuple(tensors[0].shape)}")
        return base

    def endpoints(self, tensors: Sequence[torch.Tensor], base: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The two ends (A, B) of an interpolation: both inputs, or the base and the one input (a base beside
        two inputs is an error, as in mergekit: one of the three would be left out)."""
        if base is not None:
            if len(tensors) != 1:
                raise self.error(f"needs exactly 2 models, the base and 1 other; got the base and {len(tensors)} "
                                 "(list the base among the models or leave base_model out)")
            self.check_inputs([base, tensors[0]])
            return base, tensors[0]
        if len(tensors) != 2:
            raise self.error(f"needs exactly 2 input models (or a base and 1 model), got {len(tensors)}")
        self.check_inputs(tensors)
        return tensors[0], tensors[1]
