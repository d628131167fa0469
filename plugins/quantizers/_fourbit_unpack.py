"""4-bit unpacking without Triton: bitsandbytes' own C kernel on the CPU when bitsandbytes is
installed, else torch ops (on any device). Both do `fourbit.FourBit.dequantize`'s arithmetic: each
nibble (the first element in the high one) looked up in the 16-value code, times its block's
float32 absmax, rounded once to the output dtype; the bytes are equal (tests/test_quantizers.py
compares the two paths on both codes, every block size and the three float dtypes).

Why the C kernel: a QLoRA step unpacks every quantized layer twice (forward and backward). The
torch path's gather and multiply take 1.5-4 ms for a 768 x 3072 weight on this project's 2-core
CPU, against 0.2-0.4 ms in bitsandbytes' kernel, and made a QLoRA step 0.56x as fast as PEFT's on
the 168M benchmark (benchmarks/train.py --qlora). The kernel knows only the standard NF4/FP4
codes, so a file carrying another `quant_map` takes the torch path. Importing bitsandbytes costs
about 2 s, once per process (it imports torch's compiler stack); where the import fails (a build
for another platform) the torch path runs for the rest of the process.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

CHUNK_BLOCKS = 16384  # blocks per chunk of the torch path: no whole float32 copy is held


@functools.cache
def _kernel():
    """bitsandbytes' registered `dequantize_4bit` op, or None where bitsandbytes is missing or broken."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return None
    import torch

    log = logging.getLogger("bitsandbytes")
    level = log.level
    log.setLevel(logging.ERROR)  # its import warns about an optional kernel download we never use
    try:
        import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes on import)

        return torch.ops.bitsandbytes.dequantize_4bit
    except Exception:  # any failure here only means the torch path runs
        return None
    finally:
        log.setLevel(level)


def unpack(data: torch.Tensor, code: torch.Tensor, standard: bool, absmax: torch.Tensor, shape: list[int],
           blocksize: int, quant_type: str, dtype: torch.dtype, *, native: bool = True) -> torch.Tensor:
    """Ŵ of `shape` in `dtype` from the packed bytes (⌈n/2⌉), the float32 code and absmax; `standard`:
    `code` is quant_type's own code (bitsandbytes' kernel applies); `native=False` forces torch ops.
    The kernel is used only where rows are whole blocks: on an AVX-512 CPU, bitsandbytes 0.50's
    kernel unpacks a (96, 80) weight in blocks of 32, 64 or 256 wrongly (its generic path and ours
    agree with the formula; tests/test_quantizers.py)."""
    import torch

    if native and standard and data.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16, torch.float16) \
            and shape and shape[-1] % blocksize == 0:
        kernel = _kernel()
        if kernel is not None:
            return kernel(data, absmax.float().contiguous(), blocksize, quant_type, list(shape) or [1], dtype).reshape(shape)
    # one lookup per byte: entry k of `pairs` is (code[k >> 4], code[k & 15]) as one 64-bit word (a
    # 1-D gather of words: 3.5x faster than of rows of a (256, 2) table); float32 products rounded
    # once to the output dtype, on the CPU in chunks
    n, b = math.prod(shape), blocksize
    pairs = torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1).view(torch.int64).reshape(256)
    scale = absmax.float()
    out = torch.empty(n, dtype=dtype, device=data.device)
    step = CHUNK_BLOCKS * b if data.device.type == "cpu" else n + (n % 2)
    for start in range(0, n, step):
        stop = min(start + step, n)
        values = pairs.index_select(0, data[start // 2:(stop + 1) // 2].int()).view(code.dtype)[: stop - start]
        full = (stop - start) - (stop - start) % b
        # product and rounding to the output dtype in one pass, straight into the output
        torch.mul(values[:full].view(-1, b), scale[start // b: (start + full) // b, None],
                  out=out[start:start + full].view(-1, b))
        if full < stop - start:
            torch.mul(values[full:], scale[-1], out=out[start + full:stop])
    return out.reshape(shape)

