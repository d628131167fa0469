"""Tensor element types in one table: safetensors codes, the names reports and users give, sizes,
struct formats and torch dtypes.

Importing this module does not import torch (`inspect`, safetensors headers and plugin listing
never load it); the torch side of the table is built on first use.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

from ..errors import unknown_name

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DType:
    code: str  # safetensors' dtype code
    name: str  # the name reports use (`inspect`'s dtypes)
    size: int  # bytes per element
    kind: str  # "float" (full precision: computed in, quantized, chosen for outputs), "float8", "int", "uint", "bool"
    torch: str | None  # torch's attribute; None: read as no torch dtype
    struct: str | None = None  # one little-endian element for `struct`; None: struct has no such type
    aliases: tuple[str, ...] = ()  # more names users may give (`parse_dtype`)


def _integer(code: str, struct: str, torch: bool = True) -> DType:
    """An integer row, whose name, size and torch attribute follow from its code ("I8": int8, 1 byte)."""
    bits, kind = int(code[1:]), "int" if code[0] == "I" else "uint"
    return DType(code, f"{kind}{bits}", bits // 8, kind, f"{kind}{bits}" if torch else None, struct)


TABLE = (
    DType("F64", "float64", 8, "float", "float64", "<d", ("fp64",)),
    DType("F32", "float32", 4, "float", "float32", "<f", ("fp32", "f32")),
    DType("F16", "float16", 2, "float", "float16", "<e", ("fp16", "f16", "half")),
    DType("BF16", "bfloat16", 2, "float", "bfloat16", None, ("bf16",)),
    DType("F8_E4M3", "float8_e4m3", 1, "float8", "float8_e4m3fn"),
    DType("F8_E5M2", "float8_e5m2", 1, "float8", "float8_e5m2"),
    _integer("I64", "<q"), _integer("I32", "<i"), _integer("I16", "<h"), _integer("I8", "<b"),
    _integer("U64", "<Q", torch=False), _integer("U32", "<I", torch=False), _integer("U16", "<H", torch=False),
    _integer("U8", "<B"),
    DType("BOOL", "bool", 1, "bool", "bool", "<?"),
)
BY_CODE = {d.code: d for d in TABLE}
#: safetensors dtype code -> bytes per element.
SIZES = {d.code: d.size for d in TABLE}
#: safetensors dtype code -> the name reports use ("BF16" -> "bfloat16").
NAMES = {d.code: d.name for d in TABLE}
#: Full-precision floating codes: what quantizers take and merges compute from.
FLOAT_CODES = frozenset(d.code for d in TABLE if d.kind == "float")
#: The dtypes models are loaded and computed in (transformers' and bitsandbytes' `dtype` names).
COMPUTE = ("float32", "bfloat16", "float16")
_BY_NAME = {n: d for d in TABLE if d.kind == "float" for n in (d.name, *d.aliases)}


def compute_dtype(code: str) -> str:
    """The name of the dtype a tensor stored as `code` is computed in: its own when it is one of
    COMPUTE, else float32 (float64, float8 and integer tensors)."""
    name = NAMES.get(code)
    return name if name in COMPUTE else "float32"


def scalar(code: str, raw: bytes) -> float | None:
    """One little-endian element of dtype `code` as a Python number, without torch; None where
    `struct` has no such type (float8)."""
    if code == "BF16":  # bfloat16 is the high half of a float32
        return struct.unpack("<f", b"\x00\x00" + raw)[0]
    fmt = BY_CODE[code].struct
    return None if fmt is None else struct.unpack(fmt, raw)[0]


@cache
def _torch_codes() -> dict[torch.dtype, str]:
    import torch

    return {getattr(torch, d.torch): d.code for d in TABLE if d.torch}


def torch_to_code(dtype: torch.dtype) -> str:
    return _torch_codes()[dtype]


def code_to_torch(code: str) -> torch.dtype:
    import torch

    found = BY_CODE[code].torch
    if found is None:
        raise KeyError(code)
    return getattr(torch, found)


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """A user's dtype name ("bf16", "float32", ...) -> torch.dtype; None stays None."""
    if name is None:
        return None
    import torch

    if isinstance(name, torch.dtype):
        return name
    try:
        return getattr(torch, _BY_NAME[name.lower()].torch)
    except KeyError:
        raise unknown_name("dtype", name, _BY_NAME) from None
