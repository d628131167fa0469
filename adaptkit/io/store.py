"""The tensor store: any weights on disk as a lazy mapping of name -> tensor.

`open_store(path)` accepts a single `.safetensors` file, a folder with `model.safetensors`,
shards with a `*.safetensors.index.json`, a PEFT adapter folder, a pipeline folder (`model_index.json`,
each component's tensors under `<component>.`), a Hub cache folder
(`models--org--name`, resolved through `refs/main`) or one of its snapshots. Keys, shapes, dtypes
and metadata come from the headers alone; no tensor data is read (and torch is not imported)
until `get(name)` is called, and then only that tensor (or a range of its rows) is read. Pickle checkpoints are refused unless `allow_pickle=True`, and even
then are loaded with `torch.load(weights_only=True)`, which executes no code.

Files we did not write are checked before use: a safetensors header against the library's own
rules (see `read_safetensors_header`), every file opened only once `regular_file` says it is one
(a FIFO or device would block or never end), and every name a folder or an index hands us kept
inside that folder (`member`, `inside`), links followed.
"""
from __future__ import annotations

import dataclasses
import math
import mmap
import os
import re
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from pathlib import Path
from typing import Any

from ..errors import AdaptkitError, CorruptFileError, printable, short
from .paths import inside, member, regular_file
from .safetensors_file import DTYPE_SIZES, TensorInfo, read_safetensors_header

#: What a Hub cache `refs/<name>` file may hold: a commit hash or a revision name, one path component.
REF_NAME = re.compile(r"[0-9A-Za-z][0-9A-Za-z._-]{0,127}")

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
PIPELINE_INDEX = "model_index.json"  # a pipeline folder's list of its components (diffusers' layout)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
MAP_MIN = 1 << 20  # bytes: a read at least this long maps the file's pages instead of copying them


def read_json(path: Path) -> dict:
    """The JSON object in the file `path`: a regular file (never a FIFO or device), UTF-8, nesting
    bounded (see adaptkit.validate); each fault one line naming the file (and line)."""
    from .readers import read_json as read_json_text

    return read_json_text(regular_file(path, "JSON file"))


class TensorStore:
    """A read-only mapping name -> tensor over one or more weight files, read lazily."""

    method: str | None = None  # the quantizer packed weights are unpacked with (unpacked.UnpackedStore)
    components: tuple[str, ...] = ()  # a pipeline folder's component sub-folders, whose names prefix their tensors'
    own_names: Mapping[str, str] = MappingProxyType({})  # such a tensor -> its name inside its file
    #: Serve reads of MAP_MIN bytes or more from private maps of the file (see `get`). For callers whose
    #: tensors are short-lived (the merge engine): each live map holds a file descriptor.
    map_reads = False
    #: Opened from one weights file: the files beside it (its `root`) may belong to other models, so
    #: nothing is copied from there into an output.
    lone = False

    def __init__(self, root: Path, infos: dict[str, TensorInfo], metadata: dict[str, str], *, index: Path | None = None):
        self.root = root
        self.infos = infos
        self.metadata = metadata
        self.index = index
        self._handles: dict[Path, int] = {}
        self._pickled: dict[str, Any] | None = None
        self.json_read: list[Path] = []  # the JSON files `json_file` found: with `files`, what a reader used

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

    def origin(self, name: str) -> tuple[Path, str]:
        """Where tensor `name` lies: its file relative to `root`, and its name in that file."""
        return self.info(name).file.relative_to(self.root), self.own_names.get(name, name)

    def json_file(self, name: str) -> dict | None:
        """A JSON file beside the weights (config.json, adapter_config.json), or None. One that is
        not a regular file, or links outside the folder, is refused rather than taken as absent."""
        path = self.root / name
        if not os.path.lexists(path):
            return None
        found = read_json(inside(path, self.root))
        self.json_read.append(path)
        return found

    # -- data (on demand) --------------------------------------------------------------------
    def get(self, name: str, rows: tuple[int, int] | None = None):
        """The tensor `name` (a torch.Tensor), or only its rows [start, stop) along dim 0.

        Data is read with positioned reads into a fresh buffer, or with `map_reads` (large reads) mapped
        privately from the file, one map per tensor that lives as long as the tensor: the page
        cache's pages are used in place, without a copy, and writing to the tensor copies only the
        pages written. Never one map of the whole file: mapped pages count towards the process's RSS
        while mapped, so a merge would grow to the size of all its inputs. (168M merges, A/B, median
        of 5, same bytes and peaks: model_stock 0.82 of the wall, multislerp 0.83, nuslerp 0.88,
        SCE 0.87, TIES 0.90; methods that read in row blocks within the noise.)
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
        fd = self._fd(info.file)
        if self.map_reads and size >= MAP_MIN:
            # A map past the file's end faults (SIGBUS) where a read would say so: a file cut short since
            # its header was read is refused here (one fstat a tensor).
            if os.fstat(fd).st_size < offset + size:
                raise CorruptFileError(f"{info.file}: shorter than its header says (changed since it was opened?)")
            start = offset - offset % mmap.ALLOCATIONGRANULARITY
            try:
                pages = mmap.mmap(fd, offset + size - start, offset=start, access=mmap.ACCESS_COPY)
            except OSError:  # a file system that cannot map (or no descriptor left for the map): read it
                pass
            else:
                buffer = torch.frombuffer(pages, dtype=torch.uint8, offset=offset - start, count=size)
                return buffer.view(code_to_torch(info.dtype)).reshape(shape)
        buffer = torch.empty(size, dtype=torch.uint8)
        view = memoryview(buffer.numpy())
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
        folder = _hub_cache_snapshot(path)
        if os.path.lexists(folder / PIPELINE_INDEX):
            return _open_pipeline(folder, allow_pickle)
        return _open_folder(folder, allow_pickle)
    store = _open_file(path, allow_pickle)
    store.lone = not path.name.endswith(".index.json")  # (an index names the files of its own folder)
    return store


def _open_file(path: Path, allow_pickle: bool) -> TensorStore:
    regular_file(path, "weights file")
    if path.name.endswith(".index.json"):
        return _open_index(path, allow_pickle)
    if path.suffix == ".safetensors":
        return TensorStore(path.parent, *read_safetensors_header(path))
    if path.suffix in PICKLE_SUFFIXES:
        return _open_pickle([path], path.parent, allow_pickle)
    raise AdaptkitError(f"{path}: not a weights file (expected .safetensors, an index .json, or a folder)")


def _hub_cache_snapshot(folder: Path) -> Path:
    """`models--org--name` in the HF cache -> the snapshot its `refs/main` points at.

    The ref must hold a commit hash or a revision name (never echoed when it does not), and the
    snapshot must lie inside the repo folder."""
    ref = folder / "refs" / "main"
    if not folder.name.startswith("models--") or not os.path.lexists(ref):
        return folder
    with open(regular_file(ref, "Hub cache ref"), "rb") as f:
        raw = f.read(256)
    name = raw.decode("ascii", errors="replace").strip()
    if not REF_NAME.fullmatch(name) or ".." in name:
        raise CorruptFileError(f"{ref}: holds no commit hash or revision name; refused")
    snapshot = folder / "snapshots" / name
    if not snapshot.is_dir():
        raise AdaptkitError(f"{ref}: names the snapshot '{name}', which is not in {folder / 'snapshots'}")
    return inside(snapshot, folder)


def _weight_file(path: Path) -> bool:
    """Whether a folder entry may be a weights file: anything present but a folder (a FIFO or a
    device is picked up here, to be refused by name when opened, never skipped silently)."""
    return os.path.lexists(path) and not path.is_dir()


def _open_folder(folder: Path, allow_pickle: bool) -> TensorStore:
    """The weights in a folder, whichever tool wrote it (no file name is special): a safetensors shard
    index, else the one .safetensors file; failing both, a pickle shard index, else the pickle files."""
    indexes = sorted(p for p in folder.glob("*.safetensors.index.json") if _weight_file(p))
    files = indexes or sorted(p for p in folder.glob("*.safetensors") if _weight_file(p))
    if len(files) == 1:
        return _open_file(inside(files[0], folder), allow_pickle)
    if len(files) > 1:
        names = ", ".join(f.name for f in files[:4])
        raise AdaptkitError(f"{folder}: several weight files and no index ({names}); pass one file")
    pickle_indexes = sorted(p for s in PICKLE_SUFFIXES for p in folder.glob(f"*{s}.index.json") if _weight_file(p))
    if len(pickle_indexes) == 1:
        return _open_file(inside(pickle_indexes[0], folder), allow_pickle)
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES and _weight_file(p))
    if pickles:
        return _open_pickle([inside(p, folder) for p in pickles], folder, allow_pickle)
    raise AdaptkitError(f"{folder}: no weights found (looked for *.safetensors, an index, or pickle files)")


def _open_pipeline(folder: Path, allow_pickle: bool) -> TensorStore:
    """A pipeline folder (`model_index.json` naming its components, each a sub-folder): one store whose
    tensors are `<component>.<name>`, the names the pipeline's modules have (`unet.…`, `text_encoder.…`).
    Components without weights (a scheduler, a tokenizer) hold no tensors."""
    index = read_json(folder / PIPELINE_INDEX)
    infos: dict[str, TensorInfo] = {}
    own: dict[str, str] = {}
    names = sorted(k for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and None not in v)
    for name in names:
        sub = member(folder, name, folder / PIPELINE_INDEX)
        if not sub.is_dir():  # a partial download: merging it would drop the component
            raise AdaptkitError(f"{folder}: {PIPELINE_INDEX} lists the component '{name}', which has no folder there")
        if not any(_weight_file(p) and p.suffix in WEIGHT_SUFFIXES for p in sub.iterdir()):
            continue
        with open_store(sub, allow_pickle=allow_pickle) as part:
            if part._pickled is not None:
                raise AdaptkitError(f"{sub}: pipeline components are read from safetensors files only (this one is pickle)")
            for key, info in part.infos.items():
                infos[f"{name}.{key}"], own[f"{name}.{key}"] = dataclasses.replace(info, name=f"{name}.{key}"), key
    if not infos:
        raise AdaptkitError(f"{folder}: a pipeline ({PIPELINE_INDEX}) whose components hold no weights")
    store = TensorStore(folder, infos, {})
    store.components, store.own_names = tuple(names), MappingProxyType(own)
    return store


def _open_index(index_path: Path, allow_pickle: bool) -> TensorStore:
    index = read_json(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise CorruptFileError(f"{index_path}: no 'weight_map' in the index")
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise CorruptFileError(f"{index_path}: weight_map['{printable(name)}'] is {short(shard)}, not a file name")
    folder = index_path.parent
    shards = {shard: member(folder, shard, index_path) for shard in dict.fromkeys(weight_map.values())}
    for shard, path in shards.items():
        if not os.path.lexists(path):
            raise AdaptkitError(f"{index_path.name}: shard '{printable(shard)}' named in the index is missing from {folder}")
    if any(Path(s).suffix in PICKLE_SUFFIXES for s in shards):
        return _open_pickle(list(shards.values()), folder, allow_pickle)
    infos: dict[str, TensorInfo] = {}
    metadata: dict[str, str] = {}
    for shard, path in shards.items():
        shard_infos, shard_meta = read_safetensors_header(path)
        twice = next((name for name in shard_infos if name in infos), None)
        if twice is not None:
            raise CorruptFileError(f"{index_path}: tensor '{printable(twice)}' is in both "
                                   f"{infos[twice].file.name} and {path.name}")
        infos.update(shard_infos)
        metadata = metadata or shard_meta
    missing = [name for name in weight_map if name not in infos]
    if missing:
        raise CorruptFileError(f"{index_path.name}: tensor '{printable(missing[0])}' is in the index but in no shard")
    return TensorStore(folder, infos, metadata, index=index_path)


def pickle_refusal(path: Path) -> AdaptkitError:
    """The one-line refusal of a pickle checkpoint read without --allow-pickle."""
    return AdaptkitError(
        f"{path}: pickle checkpoints can run code and are refused; convert to safetensors, "
        "or pass --allow-pickle (loads with torch.load(weights_only=True))"
    )


def _open_pickle(paths: list[Path], root: Path, allow_pickle: bool) -> TensorStore:
    if not allow_pickle:
        raise pickle_refusal(paths[0])
    from .dtypes import torch_to_code

    tensors: dict[str, Any] = {}
    infos: dict[str, TensorInfo] = {}
    for path in paths:
        for name, t in _state_dict(path, _load_pickle(regular_file(path, "checkpoint"))).items():
            tensors[name] = t
            infos[name] = TensorInfo(name, torch_to_code(t.dtype), tuple(t.shape), path)
    store = TensorStore(root, infos, {})
    store._pickled = tensors
    return store


def _load_pickle(path: Path) -> Any:
    """`torch.load(weights_only=True)` of `path`, which builds tensors and plain containers only and
    runs no code. The legacy (pre-1.6, non-zip) format is read too, without a memory map (it has none).
    A refusal names the file but never the pickle's contents (they are the untrusted part)."""
    import pickle
    import warnings
    import zipfile

    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols: our error says what matters
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError:
        raise CorruptFileError(f"{path}: cannot load pickle checkpoint safely: torch.load(weights_only=True) refuses "
                               "it (it holds objects other than tensors and plain containers, or is not a checkpoint)") from None
    except (MemoryError, OSError):
        raise
    except Exception as e:  # a cut or damaged archive: torch raises RuntimeError, EOFError, ...
        raise CorruptFileError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: truncated or corrupt)") from None


def _state_dict(path: Path, loaded: Any) -> dict[str, Any]:
    """The name -> tensor mapping in a loaded checkpoint: the object itself, or its 'state_dict' (Lightning
    and Stable Diffusion .ckpt files keep it there beside training state). Anything else is refused:
    silently dropping what is not a tensor would merge a model that is missing parts."""
    import torch

    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise CorruptFileError(f"{path}: the checkpoint holds {type(loaded).__name__}, not a mapping of names to tensors")
    for name, value in loaded.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise CorruptFileError(f"{path}: the checkpoint's entry {short(name)} is {type(value).__name__}, not a tensor "
                                   "(a mapping of names to tensors is needed)")
    return loaded
