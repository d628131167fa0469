"""Safetensors shards written as tensors arrive.

`ShardedWriter` streams tensors into safetensors shards inside such a folder: the layout (names,
dtypes, shapes) is known up front, so each shard's header is written first and every tensor goes
straight to its final offset as it arrives, in any order, never buffered.
Outputs as a whole (temporary folder, lock, rename into place) are `adaptkit.io.outputs`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import AdaptkitError
from .store import PICKLE_SUFFIXES
from .paths import inside
from .safetensors_file import DTYPE_SIZES, TensorInfo

DEFAULT_SHARD_SIZE = 2 * 1000**3
#: Bytes given to one pwrite call. A whole tensor in one call was slow in 2 of 3 runs (ext4, Linux
#: 6.18: a 168M model_stock merge's 321 MB took 0.32-0.37 s in the kernel, against 0.07-0.09 s in
#: 2 MiB calls every time); A/B, median of 7, same bytes: model_stock 0.87 of the wall, nuslerp 0.92.
WRITE_CHUNK = 2 * 1024 * 1024
_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def parse_size(text: str | int) -> int:
    """'2GB' -> 2_000_000_000; '500MiB' -> 524_288_000; integers pass through."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise AdaptkitError(f"cannot read size '{text}' (examples: 2GB, 500MB, 1GiB)")
    size = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if size <= 0:
        raise AdaptkitError(f"size must be positive, got '{text}'")
    return size


def copy_side_files(source: Path, dest: Path) -> list[str]:
    """Copy config, tokenizer and other non-weight files from `source` folder into `dest`
    (plain files only: sub-folders, e.g. other outputs or checkpoints kept there, are not copied;
    a file linking out of `source` is refused, as everywhere a folder is read)."""
    copied = []
    for item in sorted(source.iterdir()):
        if item.name.startswith(".") or item.suffix in (".safetensors", *PICKLE_SUFFIXES):
            continue
        if item.name.endswith(".index.json") or item.name == "adaptkit.lock" or not item.is_file():
            continue
        shutil.copyfile(inside(item, source), dest / item.name)  # a link out of `source` is refused
        copied.append(item.name)
    return copied


@dataclass
class _Shard:
    path: Path
    entries: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (begin, end)
    data_start: int = 0
    written: dict[str, int] = field(default_factory=dict)  # name -> bytes written so far


class ShardedWriter:
    """Write tensors with a known layout into `folder` as `<stem>.safetensors` or numbered shards.

    `layout` gives (name, dtype code, shape) for every tensor in output order; shards are cut so
    none exceeds `shard_size` bytes (a single larger tensor gets a shard of its own). Call
    `write(name, tensor)` once per name, then `close()`, which checks all were written and writes
    the index when there is more than one shard.
    """

    def __init__(self, folder: str | Path, layout: Iterable[tuple[str, str, tuple[int, ...]]], *,
                 shard_size: int | str = DEFAULT_SHARD_SIZE, metadata: dict[str, str] | None = None,
                 stem: str = "model"):
        self.folder = Path(folder)
        self.metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
        self.layout = {name: TensorInfo(name, dtype, tuple(shape), Path()) for name, dtype, shape in layout}
        self.shards = self._plan(parse_size(shard_size), stem)
        self._where = {name: shard for shard in self.shards for name in shard.entries}
        self._lock = threading.Lock()
        self._files = {id(s): open(s.path, "wb") for s in self.shards}
        for shard in self.shards:
            self._write_header(shard)

    def _plan(self, limit: int, stem: str) -> list[_Shard]:
        groups: list[list[TensorInfo]] = [[]]
        size = 0
        for info in self.layout.values():
            if groups[-1] and size + info.nbytes > limit:
                groups.append([])
                size = 0
            groups[-1].append(info)
            size += info.nbytes
        n = len(groups)
        names = [f"{stem}.safetensors"] if n == 1 else [f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        shards = []
        for name, group in zip(names, groups):
            shard, offset = _Shard(self.folder / name), 0
            for info in group:
                shard.entries[info.name] = (offset, offset + info.nbytes)
                offset += info.nbytes
            shards.append(shard)
        return shards

    def _write_header(self, shard: _Shard) -> None:
        header: dict = {"__metadata__": self.metadata} if self.metadata else {}
        for name, (begin, end) in shard.entries.items():
            info = self.layout[name]
            header[name] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": [begin, end]}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # 8-byte alignment of the data, as safetensors writes it
        f = self._files[id(shard)]
        shard.data_start = 8 + len(raw)
        total = sum(end - begin for begin, end in shard.entries.values())
        with _named(shard.path):
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.flush()
            f.truncate(shard.data_start + total)

    def write(self, name: str, tensor, row: int = 0) -> None:
        """Write a tensor at its place in its shard, or a block of its rows starting at `row`
        (for tensors merged in pieces). Threads may write different tensors or rows concurrently."""
        from .dtypes import torch_to_code

        info = self.layout.get(name)
        if info is None:
            raise AdaptkitError(f"tensor '{name}' is not in the output layout")
        shape = tuple(tensor.shape)
        fits = shape == info.shape or (row + (shape[0] if shape else 0) <= (info.shape[0] if info.shape else 0)
                                       and shape[1:] == info.shape[1:] and len(shape) == len(info.shape))
        if torch_to_code(tensor.dtype) != info.dtype or not fits:
            raise AdaptkitError(f"tensor '{name}': got {torch_to_code(tensor.dtype)} {shape} at row {row}, "
                                f"layout says {info.dtype} {info.shape}")
        shard = self._where[name]
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(_byte_dtype()).numpy()
        row_bytes = info.nbytes // info.shape[0] if info.shape and info.shape[0] else 0
        offset = shard.data_start + shard.entries[name][0] + row * row_bytes
        fd, view = self._files[id(shard)].fileno(), memoryview(data)
        with _named(shard.path):
            while view:  # pwrite may write less than asked
                n = os.pwrite(fd, view[:WRITE_CHUNK], offset)
                view, offset = view[n:], offset + n
        with self._lock:
            done = shard.written.get(name, 0) + data.nbytes
            if done > info.nbytes:
                raise AdaptkitError(f"tensor '{name}' written twice")
            shard.written[name] = done

    def close(self) -> list[Path]:
        """Finish the files; returns their paths. Fails if a tensor of the layout was never written."""
        for f in self._files.values():
            f.close()
        missing = [n for s in self.shards for n in s.entries if s.written.get(n, 0) < self.layout[n].nbytes]
        if missing:
            raise AdaptkitError(f"output incomplete: {len(missing)} tensors never written (first: '{missing[0]}')")
        if len(self.shards) > 1:
            total = sum(info.nbytes for info in self.layout.values())
            index = {"metadata": {"total_size": total, **self.metadata},
                     "weight_map": {name: s.path.name for s in self.shards for name in s.entries}}
            stem = self.shards[0].path.name.split("-00001-of-")[0]
            (self.folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return [s.path for s in self.shards]

    def abort(self) -> None:
        for f in self._files.values():
            f.close()


class MirrorWriter:
    """Write tensors into the files the base `store` holds them in, under their names there (`store.origin`):
    a pipeline's components keep their folders and file names, a single-file checkpoint stays one file of its
    name, and shards keep their shard files, with each folder's index written anew. Each file keeps its own
    metadata, with `metadata` added. The interface of `ShardedWriter`."""

    def __init__(self, folder: str | Path, layout: Iterable[tuple[str, str, tuple[int, ...]]], store, *,
                 metadata: dict[str, str] | None = None):
        from .safetensors_file import read_safetensors_header

        self.folder, self.store = Path(folder), store
        groups: dict[Path, list[tuple[str, str, str, tuple[int, ...]]]] = {}
        for name, dtype, shape in layout:
            file, own = store.origin(name)
            groups.setdefault(file, []).append((name, own, dtype, tuple(shape)))
        self.writers: dict[Path, ShardedWriter] = {}
        self._to: dict[str, tuple[ShardedWriter, str]] = {}
        try:
            for file, entries in groups.items():
                (self.folder / file.parent).mkdir(parents=True, exist_ok=True)
                safetensors = file.suffix == ".safetensors"  # a pickle checkpoint (.ckpt) becomes one
                kept = read_safetensors_header(store.root / file)[1] if safetensors else {}
                writer = ShardedWriter(self.folder / file.parent, [(own, d, s) for _, own, d, s in entries],
                                       shard_size=2**62, metadata={**kept, **(metadata or {})}, stem=file.stem)
                self.writers[file] = writer
                self._to.update({name: (writer, own) for name, own, _, _ in entries})
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, tensor, row: int = 0) -> None:
        writer, own = self._to[name]
        writer.write(own, tensor, row=row)

    def close(self) -> list[Path]:
        files = [path for writer in self.writers.values() for path in writer.close()]
        folders: dict[Path, dict[str, str]] = {}
        for file, writer in self.writers.items():
            folders.setdefault(file.parent, {}).update({own: file.name for own in writer.layout})
        for where, weight_map in folders.items():
            # the base's shards (a folder read through its index): their index, with the sizes written now
            indexes = sorted((self.store.root / where).glob("*.safetensors.index.json"))
            if indexes and (self.store.components or self.store.index is not None):
                total = sum(w.layout[n].nbytes for f, w in self.writers.items() if f.parent == where for n in w.layout)
                index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
                (self.folder / where / indexes[0].name).write_text(json.dumps(index, indent=2) + "\n")
        return files

    def abort(self) -> None:
        for writer in self.writers.values():
            writer.abort()


def copy_tree(source: Path, dest: Path, written: Iterable[Path]) -> None:
    """Copy every regular file under `source` into `dest` keeping its relative path (a pipeline's configs,
    tokenizer, scheduler), but hidden ones and the weights and indexes of the folders `written` (relative
    paths) whose weights were written anew: a stale copy (a `.bin` beside the safetensors) would load as the
    unmerged model. A file linking out of `source` is refused, as everywhere a folder is read."""
    fresh = {Path(p) for p in written}
    for path in sorted(source.rglob("*")):
        rel = path.relative_to(source)
        weights = path.suffix in (".safetensors", *PICKLE_SUFFIXES) or path.name.endswith(".index.json")
        if (weights and rel.parent in fresh) or any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        (dest / rel.parent).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(inside(path, source), dest / rel)


@contextmanager
def _named(path: Path) -> Iterator[None]:
    """OS errors of writes (a full disk comes without a file name) name the file written."""
    try:
        yield
    except OSError as e:
        if e.filename is not None:
            raise
        raise OSError(e.errno, e.strerror, str(path)) from e


def _byte_dtype():
    import torch

    return torch.uint8


def save_tensors(folder: str | Path, tensors: dict, *, shard_size: int | str = DEFAULT_SHARD_SIZE,
                 metadata: dict[str, str] | None = None, stem: str = "model") -> list[Path]:
    """Write an in-memory state dict into `folder` (which must exist) through `ShardedWriter`."""
    from .dtypes import torch_to_code

    layout = [(name, torch_to_code(t.dtype), tuple(t.shape)) for name, t in tensors.items()]
    writer = ShardedWriter(folder, layout, shard_size=shard_size, metadata=metadata, stem=stem)
    try:
        for name, t in tensors.items():
            writer.write(name, t)
    except BaseException:
        writer.abort()
        raise
    return writer.close()


__all__ = ["DEFAULT_SHARD_SIZE", "DTYPE_SIZES", "MirrorWriter", "ShardedWriter", "copy_side_files", "copy_tree",
           "parse_size", "save_tensors"]
