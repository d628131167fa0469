"""torch dtypes <-> safetensors dtype codes and user-facing names ("bf16", "float32")."""
from __future__ import annotations

import torch

from .errors import unknown_name

_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
_FROM_CODE = {code: dtype for dtype, code in _CODES.items()}
_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "f32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "f16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64,
}


def torch_to_code(dtype: torch.dtype) -> str:
    return _CODES[dtype]


def code_to_torch(code: str) -> torch.dtype:
    return _FROM_CODE[code]


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """A user's dtype name ("bf16", "float32", ...) -> torch.dtype; None stays None."""
    if name is None or isinstance(name, torch.dtype):
        return name
    try:
        return _NAMES[name.lower()]
    except KeyError:
        raise unknown_name("dtype", name, _NAMES) from None
