"""4-bit unpacking without Triton: bitsandbytes' own CPU kernel where a tested bitsandbytes is
installed, else torch ops (on any device). Both do `fourbit.FourBit.dequantize`'s arithmetic: each
nibble (the first element in the high one) looked up in the 16-value code, times its block's
float32 absmax, rounded once to the output dtype; the bytes are equal (tests/test_quantizers.py
compares the two paths with the formula on both codes, four block sizes and the three float dtypes).

Why the kernel: a QLoRA step unpacks every quantized layer twice (forward and backward). The torch
path's gather and multiply take 1.5-4 ms for a 768 x 3072 weight on this project's 2-core CPU,
against 0.2-0.4 ms in bitsandbytes' kernel. It is called through ctypes from bitsandbytes' 60 KB CPU
library, without importing the bitsandbytes package (that import takes about 2 s and 120 MB of
memory, a quarter of a small QLoRA run's peak), and it writes into a buffer the caller passes, so a
layer can reuse one. That C interface is bitsandbytes' internal one: it is used only for the versions
in KERNEL_VERSIONS (read from the installed package's metadata) and only after unpacking a test
tensor exactly as the torch path does; otherwise the torch path runs. It knows only the standard
NF4/FP4 codes (a file carrying another `quant_map` takes the torch path); on an AVX-512 CPU it
unpacks rows that are not whole blocks wrongly (a (96, 80) weight in blocks of 32, 64 or 256;
tested), so it is used only where rows are whole blocks, and not for blocks of 2048 or more, where
bitsandbytes' own wrapper avoids its AVX-512 kernel ("accuracy issues").
"""
from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import importlib.util
import math
from pathlib import Path
from typing import TYPE_CHECKING

from .fourbit import CHUNK_BLOCKS, FourBit, code_values  # CHUNK_BLOCKS: the torch path's chunks, as quantize's

if TYPE_CHECKING:
    import torch

KERNEL_VERSIONS = ("0.50.",)  # bitsandbytes releases whose CPU library's interface is the one called here
_SUFFIX = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


@functools.cache
def _library():
    """bitsandbytes' CPU library (ctypes), or None: not installed, another version, or not loadable."""
    spec = importlib.util.find_spec("bitsandbytes")
    if spec is None or not spec.submodule_search_locations:
        return None
    try:
        if not importlib.metadata.version("bitsandbytes").startswith(KERNEL_VERSIONS):
            return None
        return ctypes.CDLL(str(Path(next(iter(spec.submodule_search_locations))) / "libbitsandbytes_cpu.so"))
    except (OSError, importlib.metadata.PackageNotFoundError):
        return None


@functools.cache
def _kernel(quant_type: str, dtype: torch.dtype):
    """The C function for (quant_type, dtype) once it has unpacked a test tensor as the torch path does."""
    import torch

    lib, name = _library(), f"cdequantize_blockwise_cpu_{quant_type}_{_SUFFIX.get(str(dtype).removeprefix('torch.'))}"
    function = getattr(lib, name, None) if lib is not None else None
    if function is None:
        return None
    function.restype, function.argtypes = None, [ctypes.c_void_p] * 3 + [ctypes.c_longlong] * 3
    generator = torch.Generator().manual_seed(0)  # a fixed test tensor; the global generator is not touched
    for blocksize in (64, 256):
        sample = FourBit("check", quant_type, blocksize=blocksize).quantize(torch.randn(4, 512, generator=generator).to(dtype))
        args = (sample["weight"].reshape(-1), code_values(quant_type), True, sample["weight.absmax"], [4, 512],
                blocksize, quant_type, dtype)
        ours, theirs = unpack(*args, native=False), torch.empty(4, 512, dtype=dtype)
        _call(function, args[0], args[3], theirs, blocksize)
        if not torch.equal(ours, theirs):
            return None
    return function


def _call(function, data: torch.Tensor, absmax: torch.Tensor, out: torch.Tensor, blocksize: int) -> None:
    absmax = absmax.float().contiguous()
    function(data.data_ptr(), absmax.data_ptr(), out.data_ptr(), blocksize, out.numel() // out.shape[-1], out.shape[-1])


def unpack(data: torch.Tensor, code: torch.Tensor, standard: bool, absmax: torch.Tensor, shape: list[int],
           blocksize: int, quant_type: str, dtype: torch.dtype, *, native: bool = True, buffer=None) -> torch.Tensor:
    """Ŵ of `shape` in `dtype` from the packed bytes (⌈n/2⌉), the float32 code and absmax; `standard`:
    `code` is quant_type's own code (bitsandbytes' kernel may apply); `native=False` forces torch ops;
    `buffer(shape, dtype, device)`: reused tensors for Ŵ and the torch path's chunk temporaries (the
    caller's scratch: fresh ones on every call left the heap fragmented around a QLoRA step's saved
    activations, peak RSS up by half), else fresh tensors."""
    import torch

    def take(size, kind):
        return buffer(size, kind, data.device) if buffer else torch.empty(size, dtype=kind, device=data.device)

    out = take(shape, dtype)
    if native and standard and data.device.type == "cpu" and len(shape) >= 1 and shape[-1] % blocksize == 0 \
            and blocksize <= 1024 and dtype in (torch.float32, torch.bfloat16, torch.float16) and data.dtype == torch.uint8:
        function = _kernel(quant_type, dtype)
        if function is not None:
            _call(function, data.contiguous(), absmax, out.view(-1, shape[-1]), blocksize)
            return out
    # one lookup per byte: entry k of `pairs` is (code[k >> 4], code[k & 15]) as one 64-bit word (a
    # 1-D gather of words: 3.5x faster than of rows of a (256, 2) table); float32 products rounded
    # once to the output dtype, on the CPU in chunks
    n, b, flat = math.prod(shape), blocksize, out.view(-1)
    pairs = torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1).view(torch.int64).reshape(256)
    scale = absmax.float()
    step = CHUNK_BLOCKS * b if data.device.type == "cpu" else n + (n % 2)
    for start in range(0, n, step):
        stop = min(start + step, n)
        count = (stop + 1) // 2 - start // 2
        index = take((count,), torch.int32).copy_(data[start // 2:start // 2 + count])
        values = torch.index_select(pairs, 0, index, out=take((count,), torch.int64)).view(code.dtype)[: stop - start]
        full = (stop - start) - (stop - start) % b
        # product and rounding to the output dtype in one pass, straight into the output
        torch.mul(values[:full].view(-1, b), scale[start // b: (start + full) // b, None],
                  out=flat[start:start + full].view(-1, b))
        if full < stop - start:
            torch.mul(values[full:], scale[-1], out=flat[start + full:stop])
    return out
