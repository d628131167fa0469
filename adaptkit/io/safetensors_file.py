"""A safetensors file's header, read and checked before anything trusts it.

The format: 8 bytes little-endian N, then N bytes of JSON mapping each tensor name to its
`dtype`, `shape` and `data_offsets` [begin, end) in the data that follows (plus an optional
`__metadata__` mapping of strings). `read_safetensors_header` holds a file to the safetensors
library's own rules — header size bounded and within the file, every entry's dtype known, shape a
list of integers ≥ 0, offsets consistent with dtype × shape, the tensors tiling the data with no
overlap, gap or trailing bytes — and to one more that the library lets pass: a key given twice.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .dtypes import SIZES as DTYPE_SIZES
from ..errors import CorruptFileError, printable, short
from .paths import regular_file
from .readers import DuplicateKey, json_kind, unique_keys


#: Largest header we accept (the safetensors library uses the same bound).
MAX_HEADER = 100 * 1024 * 1024


#: Most elements a shape may describe, zero-length dimensions aside (torch counts in int64).
MAX_NUMEL = 2**63 - 1


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, known from a header without reading data."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offset: int = 0  # absolute byte offset of the data in `file` (safetensors only)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_SIZES[self.dtype]


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header: (tensor infos, `__metadata__`).

    Everything that can be known without reading tensor data is checked before any of it is used,
    by the safetensors library's own rules: a header of at most MAX_HEADER bytes of UTF-8 JSON, an
    object with unique keys; each entry a known dtype, a shape of integers ≥ 0 and two data offsets
    whose span is dtype size × elements; the spans tiling the data exactly (no overlap, no gap, no
    byte after the last); `__metadata__` strings only. A truncated, corrupt or hostile file fails
    here in one line naming the file and the fault.
    """
    size = regular_file(path, "safetensors file").stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CorruptFileError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CorruptFileError(
                f"{path}: header length {n} is larger than the file ({size} bytes): truncated or not safetensors"
            )
        if n > MAX_HEADER:
            raise CorruptFileError(f"{path}: header of {n} bytes exceeds the {MAX_HEADER}-byte limit")
        raw = f.read(n)
    header = _parse_header(path, raw)
    metadata = _header_metadata(path, header.pop("__metadata__", None))
    data_len = size - 8 - n
    infos: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        infos[name], begin, end = _tensor_info(path, name, entry, data_len, 8 + n)
        spans.append((begin, end, name))
    _check_tiling(path, spans, data_len)
    return infos, metadata


def _parse_header(path: Path, raw: bytes) -> dict[str, Any]:
    """The header's JSON object. Nesting is bounded by the parser's recursion guard (a safetensors
    header nests 3 levels; anything deeper fails the entry checks anyway)."""
    fault = None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=unique_keys)
    except UnicodeDecodeError:
        fault = "is not UTF-8 text"
    except DuplicateKey as e:
        fault = f"holds the key '{printable(e.args[0])}' twice"
    except RecursionError:
        fault = "is nested too deeply"
    except ValueError:
        fault = "is not valid JSON"
    if fault:
        raise CorruptFileError(f"{path}: safetensors header {fault} (corrupt or not safetensors)")
    if not isinstance(header, dict):
        raise CorruptFileError(f"{path}: safetensors header is {json_kind(header)}, not a JSON object")
    return header


def _header_metadata(path: Path, value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CorruptFileError(f"{path}: __metadata__ is {json_kind(value)}, not a mapping of names to strings")
    for key, item in value.items():
        if not isinstance(item, str):
            raise CorruptFileError(f"{path}: __metadata__ '{printable(key)}' is {json_kind(item)}, not a string")
    return value


def _tensor_info(path: Path, name: str, entry: Any, data_len: int, data_start: int) -> tuple[TensorInfo, int, int]:
    """(info, begin, end) of one header entry, every field checked (headers of 10k entries are
    common, so the checks stay cheap and messages are built only on failure)."""
    def fail(fault: str) -> CorruptFileError:
        return CorruptFileError(f"{path}: tensor '{printable(name)}'{fault}")

    if type(entry) is not dict:
        raise fail(f": its header entry is {json_kind(entry)}, not an object")
    try:
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    except KeyError as e:
        raise fail(f": its header entry has no '{e.args[0]}'") from None
    size = DTYPE_SIZES.get(dtype) if type(dtype) is str else None
    if size is None:
        raise fail(f" has unsupported dtype {short(dtype)}")
    if type(shape) is not list:
        raise fail(f": shape is {json_kind(shape)}, not a list of integers ≥ 0")
    bad = [d for d in shape if type(d) is not int or d < 0]  # bool is an int to Python, not to JSON
    if bad:
        raise fail(f": shape must be a list of integers ≥ 0, but holds {short(bad[0])}")
    numel = math.prod(shape)
    if numel > MAX_NUMEL or (numel == 0 and math.prod(d or 1 for d in shape) > MAX_NUMEL):
        raise fail(f": shape of {len(shape)} dimensions describes more than 2**63 elements")
    if not (type(offsets) is list and len(offsets) == 2 and type(offsets[0]) is int and type(offsets[1]) is int
            and 0 <= offsets[0] <= offsets[1]):
        shown = short(offsets)
        if type(offsets) is list and len(offsets) <= 3:  # a few numbers say more than "a list of 2 item(s)"
            shown = f"[{', '.join(short(o) for o in offsets)}]"
        raise fail(f": data_offsets must be two integers 0 ≤ begin ≤ end, got {shown}")
    begin, end = offsets
    if end > data_len:
        raise CorruptFileError(f"{path}: truncated: tensor '{printable(name)}' ends at byte {end} of the data "
                               f"but only {data_len} bytes are present")
    if end - begin != numel * size:
        raise fail(f" spans {end - begin} bytes but its shape needs {numel * size}")
    return TensorInfo(name, dtype, tuple(shape), path, data_start + begin), begin, end


def _check_tiling(path: Path, spans: list[tuple[int, int, str]], data_len: int) -> None:
    """The tensors' (begin, end, name) spans, sorted, must tile the data: each starts where the one
    before ended, from byte 0 to the end of the file. The safetensors library refuses overlaps, gaps
    and trailing bytes alike; an overlap would let two names share (and a write to one change) bytes."""
    at, previous = 0, None
    for begin, end, name in sorted(spans):
        if begin < at:
            raise CorruptFileError(f"{path}: tensors '{printable(previous)}' and '{printable(name)}' overlap "
                                   f"(bytes {begin}-{at} of the data)")
        if begin > at:
            raise CorruptFileError(f"{path}: bytes {at}-{begin} of the data belong to no tensor "
                                   f"(a gap before '{printable(name)}')")
        at, previous = end, name
    if at != data_len:
        raise CorruptFileError(f"{path}: the last {data_len - at} bytes of the file belong to no tensor")


__all__ = ["DTYPE_SIZES", "MAX_HEADER", "TensorInfo", "read_safetensors_header"]
