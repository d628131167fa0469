"""4-bit unpacking on a CUDA GPU in one Triton kernel (imported only there, and only when Triton is
installed): each program reads a run of packed bytes, splits the two nibbles (first element in the
high one), looks both up in the 16-value code, multiplies by its block's absmax in float32 and
rounds once to the output dtype — the same arithmetic, bit for bit, as the torch path in
`fourbit.FourBit.dequantize`, without its float32 intermediate tensor."""
from __future__ import annotations

from typing import TYPE_CHECKING

import triton
import triton.language as tl

if TYPE_CHECKING:
    import torch

BYTES_PER_PROGRAM = 1024


@triton.jit
def _unpack(data_ptr, code_ptr, absmax_ptr, out_ptr, n, blocksize, BYTES: tl.constexpr):
    start = tl.program_id(0) * BYTES
    offsets = start + tl.arange(0, BYTES)
    byte = tl.load(data_ptr + offsets, mask=offsets * 2 < n, other=0).to(tl.int32)
    first, second = offsets * 2, offsets * 2 + 1
    high = tl.load(code_ptr + (byte >> 4)) * tl.load(absmax_ptr + first // blocksize, mask=first < n, other=0.0)
    low = tl.load(code_ptr + (byte & 15)) * tl.load(absmax_ptr + second // blocksize, mask=second < n, other=0.0)
    tl.store(out_ptr + first, high.to(out_ptr.dtype.element_ty), mask=first < n)
    tl.store(out_ptr + second, low.to(out_ptr.dtype.element_ty), mask=second < n)


def unpack(data: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor, n: int, blocksize: int,
           dtype: torch.dtype) -> torch.Tensor:
    """The n values (flat, `dtype`) of uint8 `data` holding two 4-bit codes per byte."""
    import torch

    out = torch.empty(n, dtype=dtype, device=data.device)
    grid = (triton.cdiv(data.numel(), BYTES_PER_PROGRAM),)
    _unpack[grid](data, code.float().contiguous(), absmax.float().contiguous(), out, n, blocksize,
                  BYTES=BYTES_PER_PROGRAM)
    return out
