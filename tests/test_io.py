"""The tensor store and the streaming writer: layouts, shards, atomic outputs, and bad files."""
from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from adaptkit.errors import AdaptkitError, CorruptFileError
from adaptkit.io.store import open_store
from adaptkit.io.safetensors_file import read_safetensors_header
from adaptkit.io.outputs import atomic_output
from adaptkit.io.writer import ShardedWriter, copy_side_files, parse_size, save_tensors


def sample_tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(8, 4, generator=g),
        "b.weight": torch.randn(16, generator=g).to(torch.bfloat16),
        "c.scalar": torch.tensor(3.5, dtype=torch.float16),
        "d.ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    }


def test_single_file_lazy_store(tmp_path):
    tensors = sample_tensors()
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    store = open_store(tmp_path)
    assert sorted(store.keys()) == sorted(tensors)
    assert store.info("a.weight").shape == (8, 4) and store.info("b.weight").dtype == "BF16"
    assert store.metadata == {"format": "pt"}
    for name, t in tensors.items():
        assert torch.equal(store.get(name), t)


def test_mapped_reads_equal_copied_reads_and_never_write_the_file(tmp_path, monkeypatch):
    import adaptkit.io.store as store_module

    monkeypatch.setattr(store_module, "MAP_MIN", 64)  # a.weight (128 B) and its row ranges are mapped
    tensors = sample_tensors()
    path = tmp_path / "model.safetensors"
    save_file(tensors, path)
    copied, mapped = open_store(path), open_store(path)
    mapped.map_reads = True
    for name, t in tensors.items():
        assert torch.equal(mapped.get(name), t) and torch.equal(mapped.get(name), copied.get(name))
    assert torch.equal(mapped.get("a.weight", rows=(2, 7)), tensors["a.weight"][2:7])

    def rewrite(value: float) -> None:  # a.weight's bytes in the file, in place
        with open(path, "r+b") as f:
            f.seek(copied.info("a.weight").offset)
            f.write(torch.full((8, 4), value).numpy().tobytes())

    weight, copy = mapped.get("a.weight"), copied.get("a.weight")
    rewrite(7.0)  # the map shows the file's pages; the copy keeps what was read
    assert torch.equal(weight, torch.full((8, 4), 7.0)) and torch.equal(copy, tensors["a.weight"])
    before = path.read_bytes()
    weight.mul_(0)  # a private map: the write stays in this process
    assert path.read_bytes() == before and torch.equal(copied.get("a.weight"), torch.full((8, 4), 7.0))
    del weight

    def no_map(*args, **kwargs):
        raise OSError(19, "No such device")

    with monkeypatch.context() as patch:  # a file system that cannot map: read instead
        patch.setattr(store_module.mmap, "mmap", no_map)
        read = mapped.get("a.weight")
    rewrite(3.0)
    assert torch.equal(read, torch.full((8, 4), 7.0))
    mapped.close()
    # A file cut short after its header was read (before any tensor, or between two) is refused, not
    # mapped past its end (a SIGBUS, or zeros within its last page).
    late, between = open_store(path), open_store(path)
    late.map_reads = between.map_reads = True
    between.get("a.weight")
    path.write_bytes(path.read_bytes()[:copied.info("a.weight").offset + 64])
    for store in (late, between):
        with pytest.raises(CorruptFileError, match="shorter than its header says"):
            store.get("a.weight")


def test_store_opens_file_index_and_hub_cache_layouts(sharded_llama_dir, tmp_path):
    by_folder = open_store(sharded_llama_dir)
    assert len(by_folder.files) > 1 and by_folder.index is not None
    by_index = open_store(sharded_llama_dir / "model.safetensors.index.json")
    assert by_index.keys() == by_folder.keys()
    # A Hub cache repo folder resolves through refs/main to its snapshot.
    repo = tmp_path / "models--org--tiny"
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    save_file({"w": torch.ones(2)}, snap / "model.safetensors")
    assert open_store(repo).keys() == ["w"]


def test_writer_round_trip_and_shards(tmp_path):
    tensors = sample_tensors()
    out = tmp_path / "out"
    out.mkdir()
    files = save_tensors(out, tensors, shard_size=100, metadata={"made_by": "test"})
    assert len(files) > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    # Written files are read by the safetensors library itself.
    merged = {}
    for f in files:
        merged.update(load_file(f))
        assert struct.unpack("<Q", f.read_bytes()[:8])[0] % 8 == 0
    for name, t in tensors.items():
        assert torch.equal(merged[name], t)
    assert open_store(out).metadata == {"made_by": "test"}


@pytest.mark.parametrize("chunk", [7, 64, 1 << 21])
def test_writer_accepts_any_order_and_single_file(tmp_path, monkeypatch, chunk):
    """Tensors written in any order land at their places, in pwrite calls of at most WRITE_CHUNK bytes
    (7: chunks that split elements)."""
    from adaptkit.io import writer as writer_module

    monkeypatch.setattr(writer_module, "WRITE_CHUNK", chunk)
    tensors = sample_tensors()
    layout = [(n, {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64"}[t.dtype],
               tuple(t.shape)) for n, t in tensors.items()]
    writer = ShardedWriter(tmp_path, layout, stem="adapter_model")
    for name in reversed(list(tensors)):
        writer.write(name, tensors[name])
    (path,) = writer.close()
    assert path.name == "adapter_model.safetensors"
    loaded = load_file(path)
    assert list(loaded) == sorted(tensors) or set(loaded) == set(tensors)
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items())


def test_writer_rejects_wrong_shape_and_missing_tensor(tmp_path):
    writer = ShardedWriter(tmp_path, [("x", "F32", (2,)), ("y", "F32", (3,))])
    with pytest.raises(AdaptkitError, match="layout says"):
        writer.write("x", torch.zeros(3))
    writer.write("x", torch.zeros(2))
    with pytest.raises(AdaptkitError, match="never written.*'y'"):
        writer.close()


def test_parse_size():
    assert parse_size("2GB") == 2_000_000_000
    assert parse_size("500MiB") == 500 * 1024**2
    assert parse_size(1234) == 1234
    with pytest.raises(AdaptkitError, match="cannot read size"):
        parse_size("lots")


def test_atomic_output_failure_leaves_nothing_and_keeps_old(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_output(out) as tmp:
            (tmp / "half.safetensors").write_bytes(b"x")
            raise RuntimeError("killed mid-way")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(AdaptkitError, match="already exists"):
        with atomic_output(out):
            pass
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(out, force=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise KeyboardInterrupt
    assert (out / "old.txt").read_text() == "old" and len(list(tmp_path.iterdir())) == 1
    with atomic_output(out, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"] and len(list(tmp_path.iterdir())) == 1


def test_copy_side_files_skips_weights(llama_dir, tmp_path):
    copied = copy_side_files(llama_dir, tmp_path)
    assert "config.json" in copied and not any(c.endswith(".safetensors") for c in copied)


# -- bad input ------------------------------------------------------------------------------------

@pytest.fixture
def good_file(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(sample_tensors(), path)
    return path


def test_truncated_file(good_file):
    good_file.write_bytes(good_file.read_bytes()[:-10])
    with pytest.raises(CorruptFileError, match="truncated: tensor"):
        open_store(good_file)


def test_file_too_short_for_header(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(CorruptFileError, match="no header"):
        open_store(path)


def test_header_length_larger_than_file(good_file):
    data = good_file.read_bytes()
    good_file.write_bytes(struct.pack("<Q", len(data) * 10) + data[8:])
    with pytest.raises(CorruptFileError, match="header length .* is larger than the file"):
        open_store(good_file)


def test_header_not_json(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", 12) + b"not json!!!!" + b"\0" * 16)
    with pytest.raises(CorruptFileError, match="not valid JSON"):
        read_safetensors_header(path)


def test_missing_shard(sharded_llama_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(sharded_llama_dir, copy)
    victim = sorted(copy.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(AdaptkitError, match=f"shard '{victim.name}' named in the index is missing"):
        open_store(copy)


def test_path_that_does_not_exist(tmp_path):
    with pytest.raises(AdaptkitError, match="no such file or folder"):
        open_store(tmp_path / "nope")


def test_folder_with_no_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(AdaptkitError, match="no weights found"):
        open_store(tmp_path)


def test_pickle_refused_without_allow_pickle(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(3)}, path)
    with pytest.raises(AdaptkitError, match="pickle checkpoints can run code and are refused"):
        open_store(tmp_path)
    store = open_store(tmp_path, allow_pickle=True)
    assert store.info("w").shape == (3,) and torch.equal(store.get("w"), torch.ones(3))


def test_pickle_with_code_is_refused_even_when_allowed(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    path = tmp_path / "pytorch_model.bin"
    with open(path, "wb") as f:
        pickle.dump({"w": Evil()}, f)
    with pytest.raises(CorruptFileError, match="cannot load pickle checkpoint safely"):
        open_store(path, allow_pickle=True)
