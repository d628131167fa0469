"""Shared pieces of the quantizer plugins: input checks, header-only key lookups, blockwise absmax
and bitsandbytes' 8-bit dynamic map with its blockwise quantizer (for NF4/FP4 double quantization).

No torch at module level: plugins are listed (and `detect` runs) without importing it.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from adaptkit.plugin import AdaptkitError

if TYPE_CHECKING:
    import torch

    from adaptkit.plugin import TensorStore


def require_float(name: str, tensor: torch.Tensor) -> None:
    """Refuse what a quantizer cannot take: non-tensors, non-float dtypes, empty tensors."""
    import torch

    if not isinstance(tensor, torch.Tensor):
        raise AdaptkitError(f"{name}: expected a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise AdaptkitError(f"{name}: can only quantize floating-point tensors, got {tensor.dtype}")
    if tensor.numel() == 0:
        raise AdaptkitError(f"{name}: cannot quantize an empty tensor (shape {tuple(tensor.shape)})")


def require_keys(name: str, packed: Mapping[str, torch.Tensor], keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if k not in packed]
    if missing:
        raise AdaptkitError(f"{name}: packed tensors lack {', '.join(missing)} (have: {', '.join(sorted(packed)) or 'none'})")


def bases_with(store: TensorStore, suffix: str) -> list[str]:
    """Keys K such that `K + suffix` and K are both in the store (headers only)."""
    keys = set(store.keys())
    return [k[: -len(suffix)] for k in keys if k.endswith(suffix) and k[: -len(suffix)] in keys]


def rows_view(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor as rows × columns: dim 0 is the output row (a 1-D or 0-D tensor is one row)."""
    return tensor.reshape(1, -1) if tensor.dim() < 2 else tensor.reshape(tensor.shape[0], -1)


def blockwise_absmax(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """max |x| over consecutive blocks of `blocksize` of a flat float32 tensor; the last block
    holds the remainder when the length is not a multiple (bitsandbytes' rule)."""
    import torch

    n = flat.numel()
    full = n - n % blocksize
    absmax = flat[:full].reshape(-1, blocksize).abs().max(dim=-1)[0]
    if full < n:
        absmax = torch.cat([absmax, flat[full:].abs().max().unsqueeze(0)])
    return absmax


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map(True, 7, 8)`; Dettmers 2015,
    arXiv 1511.04561): a dynamic exponent (powers of ten 1e-6 … 1) with a shrinking linear fraction,
    plus 0 and 1.0, 256 sorted float32 values. Built exactly as bitsandbytes builds it."""
    import torch

    signed, max_exponent_bits, total_bits = True, 7, 8
    data: list[float] = []
    non_sign_bits = total_bits - 1
    for i in range(max_exponent_bits):
        fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1)
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    # additional_items = 2 ** (7 - 7) - 1 = 0: no extra linear region for these settings
    data.append(0)
    data.append(1.0)
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


LUT_SIZE = 65536


def nearest_code_table(code: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' CPU lookup table: [−1, 1] cut into 65536 points v_i = −1 + 2i/65535, each
    mapped to the code nearest to it (the number of code midpoints below v_i)."""
    import torch

    midpoints = 0.5 * (code[:-1] + code[1:])
    points = -1.0 + (2.0 * torch.arange(LUT_SIZE, dtype=torch.float32)) / (LUT_SIZE - 1)
    return torch.searchsorted(midpoints, points, side="left")


def quantize_blockwise_8bit(values: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit blockwise quantization as bitsandbytes' CPU kernel does it (`quantize_blockwise`,
    0.50): per block of `blocksize`, absmax = max |x|; t = clamp(x · (1/absmax), −1, 1) goes to
    the table entry ⌊((t + 1) · 0.5) · 65535 + 0.5⌋ of `nearest_code_table` (so a value lying
    between two table points can take the code nearest the point, not itself — as bitsandbytes
    stores it); a block whose absmax is 0 stores code 0. Returns (uint8 codes, float32 absmax)."""
    import torch

    flat = values.reshape(-1).float()
    absmax = blockwise_absmax(flat, blocksize)
    inverse = (1.0 / absmax).repeat_interleave(blocksize)[: flat.numel()]
    scaled = torch.clamp(flat * inverse, -1, 1)
    points = ((scaled + 1) * 0.5 * (LUT_SIZE - 1) + 0.5).long()
    idx = nearest_code_table(code)[points]
    idx = torch.where(absmax.repeat_interleave(blocksize)[: flat.numel()] == 0, 0, idx)
    return idx.to(torch.uint8).reshape(values.shape), absmax


def dequantize_blockwise_8bit(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int) -> torch.Tensor:
    """code[q] · absmax of its block, float32 (bitsandbytes' `dequantize_blockwise`)."""
    flat = code[q.reshape(-1).long()]
    return (flat * absmax.float().repeat_interleave(blocksize)[: flat.numel()]).reshape(q.shape)


def pack_codes(codes: torch.Tensor, bits: int, fill: int = 0) -> torch.Tensor:
    """Codes of `bits` bits (1, 2 or 4) packed 8 // bits to a byte, the first in the highest bits;
    the last byte is padded with the code `fill`."""
    import torch

    per = 8 // bits
    flat = codes.reshape(-1).to(torch.uint8)
    rows = torch.nn.functional.pad(flat, (0, -flat.numel() % per), value=fill).reshape(-1, per)
    packed = torch.zeros(rows.shape[0], dtype=torch.uint8, device=codes.device)
    for i in range(per):
        packed |= rows[:, i] << (8 - bits * (i + 1))
    return packed


def unpacked_codes(name: str, packed: Mapping[str, torch.Tensor], stat: str, bits: int) -> tuple[list[int], torch.Tensor]:
    """(shape, codes) of a tensor packed by `pack_codes` with its shape in `weight.shape`; the sizes
    are checked against each other."""
    import math

    import torch

    require_keys(name, packed, ("weight", stat, "weight.shape"))
    shape = [int(d) for d in packed["weight.shape"].tolist()]
    data, n, per = packed["weight"].reshape(-1), math.prod(shape), 8 // bits
    if data.dtype != torch.uint8 or data.numel() != -(n // -per):
        raise AdaptkitError(f"{name}: weight must be {-(n // -per)} uint8 bytes for shape {shape}")
    shifts = range(8 - bits, -1, -bits)
    return shape, torch.stack([(data >> s) & ((1 << bits) - 1) for s in shifts], dim=1).reshape(-1)[:n]
