"""The tensor store: any weights on disk as a lazy mapping of name -> tensor.

`open_store(path)` accepts a single `.safetensors` file, a folder with `model.safetensors`,
shards with a `*.safetensors.index.json`, a PEFT adapter folder, a Hub cache folder
(`models--org--name`, resolved through `refs/main`) or one of its snapshots. Keys, shapes, dtypes
and metadata come from the headers alone; no tensor data is read (and torch is not imported)
until `get(name)` is called, and then only that tensor (or a range of its rows) is read. Pickle checkpoints are refused unless `allow_pickle=True`, and even
then are loaded with `torch.load(weights_only=True)`, which executes no code.
"""
from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import AdaptkitError, CorruptFileError

#: safetensors dtype codes -> bytes per element.
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
#: Largest header we accept (the safetensors library uses the same bound).
MAX_HEADER = 100 * 1024 * 1024

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# Searched in order inside a folder: adapters first, then full models.
FOLDER_CANDIDATES = (
    "adapter_model.safetensors",
    "model.safetensors.index.json",
    "model.safetensors",
    "adapter_model.bin",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)


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

    Validation covers everything that can be known without reading tensor data, so a truncated
    or corrupt file fails here with a message naming the file and the fault.
    """
    size = path.stat().st_size
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
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError):
        raise CorruptFileError(f"{path}: safetensors header is not valid JSON (corrupt or not safetensors)") from None
    metadata = header.pop("__metadata__", None) or {}
    data_len = size - 8 - n
    infos = {name: _tensor_info(path, name, entry, data_len, 8 + n) for name, entry in header.items()}
    return infos, metadata


def _tensor_info(path: Path, name: str, entry: Any, data_len: int, data_start: int) -> TensorInfo:
    try:
        dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
    except (KeyError, TypeError, ValueError):
        raise CorruptFileError(f"{path}: malformed header entry for tensor '{name}'") from None
    if dtype not in DTYPE_SIZES:
        raise CorruptFileError(f"{path}: tensor '{name}' has unsupported dtype {dtype}")
    if end > data_len:
        raise CorruptFileError(
            f"{path}: truncated: tensor '{name}' ends at byte {end} of the data but only {data_len} bytes are present"
        )
    info = TensorInfo(name, dtype, shape, path, data_start + begin)
    if end - begin != info.nbytes or begin < 0:
        raise CorruptFileError(f"{path}: tensor '{name}' spans {end - begin} bytes but its shape needs {info.nbytes}")
    return info


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise CorruptFileError(f"{path}: expected a JSON object")
    return value


class TensorStore:
    """A read-only mapping name -> tensor over one or more weight files, read lazily."""

    method: str | None = None  # the quantizer packed weights are unpacked with (unpacked.UnpackedStore)

    def __init__(self, root: Path, infos: dict[str, TensorInfo], metadata: dict[str, str], *, index: Path | None = None):
        self.root = root
        self.infos = infos
        self.metadata = metadata
        self.index = index
        self._handles: dict[Path, int] = {}
        self._pickled: dict[str, Any] | None = None

    # -- what is there (headers only) -------------------------------------------------------
    @property
    def files(self) -> list[Path]:
        return list(dict.fromkeys(info.file for info in self.infos.values()))

    def keys(self) -> list[str]:
        return list(self.infos)

    def __contains__(self, name: object) -> bool:
        return name in self.infos

    def __iter__(self) -> Iterator[str]:
        return iter(self.infos)

    def __len__(self) -> int:
        return len(self.infos)

    def packed(self, name: str) -> bool:
        """Whether `name` is unpacked from several stored tensors (then it is read whole)."""
        return False

    def info(self, name: str) -> TensorInfo:
        try:
            return self.infos[name]
        except KeyError:
            raise AdaptkitError(f"{self.root}: no tensor named '{name}'") from None

    def json_file(self, name: str) -> dict | None:
        """A JSON file beside the weights (config.json, adapter_config.json), or None."""
        path = self.root / name
        return read_json(path) if path.is_file() else None

    # -- data (on demand) --------------------------------------------------------------------
    def get(self, name: str, rows: tuple[int, int] | None = None):
        """The tensor `name` (a torch.Tensor), or only its rows [start, stop) along dim 0.

        Data is read with positioned reads into a fresh buffer rather than through a memory map:
        mapped file pages count towards the process's RSS for as long as the map lives, so a merge
        reading every tensor of several models would grow to their total size; reads keep the peak
        at the tensors actually in flight (the OS page cache still serves repeated reads).
        """
        info = self.info(name)
        if self._pickled is not None:
            tensor = self._pickled[name]
            return tensor if rows is None else tensor[rows[0]:rows[1]]
        return self._read(info, rows)

    def _read(self, info: TensorInfo, rows: tuple[int, int] | None):
        import torch

        from .dtypes import code_to_torch

        shape, offset = list(info.shape), info.offset
        if rows is not None:
            row_bytes = info.nbytes // shape[0] if shape and shape[0] else 0
            offset += rows[0] * row_bytes
            shape[0] = rows[1] - rows[0]
        size = math.prod(shape) * DTYPE_SIZES[info.dtype]
        buffer = torch.empty(size, dtype=torch.uint8)
        view, fd = memoryview(buffer.numpy()), self._fd(info.file)
        while view:
            n = os.preadv(fd, [view], offset)
            if n <= 0:
                raise CorruptFileError(f"{info.file}: unexpected end of file reading '{info.name}'")
            view, offset = view[n:], offset + n
        return buffer.view(code_to_torch(info.dtype)).reshape(shape)

    def _fd(self, path: Path) -> int:
        fd = self._handles.get(path)
        if fd is None:
            fd = self._handles[path] = os.open(path, os.O_RDONLY)
        return fd

    def close(self) -> None:
        for fd in self._handles.values():
            os.close(fd)
        self._handles.clear()
        self._pickled = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    def __enter__(self) -> TensorStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TensorStore({str(self.root)!r}, {len(self)} tensors in {len(self.files)} file(s))"


def open_store(path: str | Path, *, allow_pickle: bool = False) -> TensorStore:
    """Open weights at `path` (file or folder) lazily; see the module docstring for what is accepted."""
    path = Path(path).expanduser()
    if not path.exists():
        raise AdaptkitError(f"{path}: no such file or folder")
    if path.is_dir():
        return _open_folder(_hub_cache_snapshot(path), allow_pickle)
    if path.name.endswith(".index.json"):
        return _open_index(path, allow_pickle)
    if path.suffix == ".safetensors":
        infos, meta = read_safetensors_header(path)
        return TensorStore(path.parent, infos, meta)
    if path.suffix in PICKLE_SUFFIXES:
        return _open_pickle([path], path.parent, allow_pickle)
    raise AdaptkitError(f"{path}: not a weights file (expected .safetensors, an index .json, or a folder)")


def _hub_cache_snapshot(folder: Path) -> Path:
    """`models--org--name` in the HF cache -> the snapshot its `refs/main` points at."""
    ref = folder / "refs" / "main"
    if folder.name.startswith("models--") and ref.is_file():
        snapshot = folder / "snapshots" / ref.read_text().strip()
        if snapshot.is_dir():
            return snapshot
    return folder


def _open_folder(folder: Path, allow_pickle: bool) -> TensorStore:
    for name in FOLDER_CANDIDATES:
        candidate = folder / name
        if candidate.is_file():
            return open_store(candidate, allow_pickle=allow_pickle)
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    files = indexes or sorted(folder.glob("*.safetensors"))
    if len(files) == 1:
        return open_store(files[0], allow_pickle=allow_pickle)
    if len(files) > 1:
        names = ", ".join(f.name for f in files[:4])
        raise AdaptkitError(f"{folder}: several weight files and no index ({names}); pass one file")
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        return _open_pickle(pickles, folder, allow_pickle)
    raise AdaptkitError(f"{folder}: no weights found (looked for *.safetensors, an index, or pickle files)")


def _open_index(index_path: Path, allow_pickle: bool) -> TensorStore:
    index = read_json(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise CorruptFileError(f"{index_path}: no 'weight_map' in the index")
    folder = index_path.parent
    shards = list(dict.fromkeys(weight_map.values()))
    for shard in shards:
        if not (folder / shard).is_file():
            raise AdaptkitError(f"{index_path.name}: shard '{shard}' named in the index is missing from {folder}")
    if any(Path(s).suffix in PICKLE_SUFFIXES for s in shards):
        return _open_pickle([folder / s for s in shards], folder, allow_pickle)
    infos: dict[str, TensorInfo] = {}
    metadata: dict[str, str] = {}
    for shard in shards:
        shard_infos, shard_meta = read_safetensors_header(folder / shard)
        infos.update(shard_infos)
        metadata = metadata or shard_meta
    missing = [name for name in weight_map if name not in infos]
    if missing:
        raise CorruptFileError(f"{index_path.name}: tensor '{missing[0]}' is in the index but in no shard")
    return TensorStore(folder, infos, metadata, index=index_path)


def _open_pickle(paths: list[Path], root: Path, allow_pickle: bool) -> TensorStore:
    if not allow_pickle:
        raise AdaptkitError(
            f"{paths[0]}: pickle checkpoints can run code and are refused; convert to safetensors, "
            "or pass --allow-pickle (loads with torch.load(weights_only=True))"
        )
    import torch

    from .dtypes import torch_to_code

    tensors: dict[str, Any] = {}
    infos: dict[str, TensorInfo] = {}
    for path in paths:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises many types for a bad pickle
            raise CorruptFileError(f"{path}: cannot load pickle checkpoint safely ({str(e).splitlines()[0]})") from None
        for name, t in loaded.items():
            if isinstance(t, torch.Tensor):
                tensors[name] = t
                infos[name] = TensorInfo(name, torch_to_code(t.dtype), tuple(t.shape), path)
    store = TensorStore(root, infos, {})
    store._pickled = tensors
    return store
