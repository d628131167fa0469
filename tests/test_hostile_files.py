"""Files we did not write: hostile safetensors headers, FIFOs and devices, names and links that leave
their folder, and pickles (issue 13). Each case class is a table of (id, input builder, command,
expected one-line message fragment); see tests/hostile.py."""
from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from adaptkit.errors import AdaptkitError
from adaptkit.io.store import open_store
from adaptkit.io.safetensors_file import MAX_HEADER

from hostile import assert_one_line_error, run_cli, run_process


# -- builders ----------------------------------------------------------------------------------------
def raw_safetensors(path: Path, header: bytes | str | dict, data: bytes | int = 0) -> Path:
    """A safetensors file from a header as given (dict: JSON-encoded) and `data` bytes (or that many zeros)."""
    raw = json.dumps(header).encode() if isinstance(header, dict) else header.encode() if isinstance(header, str) else header
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + (bytes(data) if isinstance(data, int) else data))
    return path


def entry(begin: int, end: int, shape=(2,), dtype="F32") -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}


def written(name: str, data: bytes):
    """Builder: tmp_path -> the file `name` holding `data`."""
    def build(tmp: Path) -> Path:
        (tmp / name).write_bytes(data)
        return tmp / name
    return build


def header_file(header, data=8):
    """Builder: tmp_path -> a file `x.safetensors` with this header."""
    return lambda tmp: raw_safetensors(tmp / "x.safetensors", header, data)


def over_limit(tmp: Path) -> Path:
    """A header length over MAX_HEADER in a (sparse) file large enough to hold it."""
    path = tmp / "x.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", MAX_HEADER + 1))
        f.truncate(MAX_HEADER + 64)
    return path


E = json.dumps(entry(0, 8))

HEADERS = [
    ("no-header", written("x.safetensors", b"\x01\x02"), "no header"),
    ("length-past-end", written("x.safetensors", struct.pack("<Q", 999) + b"{}"), "header length 999 is larger than the file"),
    ("length-over-limit", over_limit, f"exceeds the {MAX_HEADER}-byte limit"),
    ("deep-nesting", header_file("[" * 100_000, 0), "safetensors header is nested too deeply"),
    ("not-json", header_file("{not json", 0), "safetensors header is not valid JSON"),
    ("not-utf8", header_file(b'{"\xff\xfe": 1}', 0), "safetensors header is not UTF-8 text"),
    ("huge-integer", header_file('{"a": {"dtype": "F32", "shape": [' + "9" * 5000 + '], "data_offsets": [0, 8]}}'),
     "safetensors header is not valid JSON"),
    ("top-level-list", header_file("[]", 0), "safetensors header is a list, not a JSON object"),
    ("duplicate-key", header_file('{"a": %s, "a": %s}' % (E, E)), "holds the key 'a' twice"),
    ("duplicate-field", header_file('{"a": {"dtype": "F32", "dtype": "F16", "shape": [2], "data_offsets": [0, 8]}}'),
     "holds the key 'dtype' twice"),
    ("entry-not-object", header_file({"a": [1, 2]}), "tensor 'a': its header entry is a list, not an object"),
    ("entry-no-dtype", header_file({"a": {"shape": [2], "data_offsets": [0, 8]}}), "its header entry has no 'dtype'"),
    ("dtype-unknown", header_file({"a": entry(0, 8, dtype="F5")}), "tensor 'a' has unsupported dtype 'F5'"),
    ("dtype-not-string", header_file({"a": entry(0, 8, dtype=4)}), "tensor 'a' has unsupported dtype 4"),
    ("shape-not-list", header_file({"a": {**entry(0, 8), "shape": "2"}}), "shape is a string, not a list"),
    ("shape-bool", header_file({"a": entry(0, 4, shape=[True])}), "shape must be a list of integers ≥ 0, but holds True"),
    ("shape-float", header_file({"a": entry(0, 8, shape=[2.0])}), "but holds 2.0"),
    ("shape-string", header_file({"a": entry(0, 8, shape=["2"])}), "but holds '2'"),
    ("shape-negative", header_file({"a": entry(0, 8, shape=[-2, -1])}), "but holds -2"),
    ("shape-absurd", header_file({"a": entry(0, 0, shape=[0, 2**62, 2**62])}, 0), "describes more than 2**63 elements"),
    ("offsets-three", header_file({"a": {**entry(0, 8), "data_offsets": [0, 8, 8]}}),
     "data_offsets must be two integers 0 ≤ begin ≤ end, got [0, 8, 8]"),
    ("offsets-reversed", header_file({"a": entry(8, 0)}), "got [8, 0]"),
    ("offsets-negative", header_file({"a": entry(-8, 0)}), "got [-8, 0]"),
    ("offsets-float", header_file({"a": {**entry(0, 8), "data_offsets": [0, 8.0]}}), "got [0, 8.0]"),
    ("offsets-past-end", header_file({"a": entry(0, 16, shape=[4])}), "truncated: tensor 'a' ends at byte 16"),
    ("size-mismatch", header_file({"a": entry(0, 8, shape=[3])}), "tensor 'a' spans 8 bytes but its shape needs 12"),
    ("overlap", header_file({"a": entry(0, 8), "b": entry(4, 12)}, 12), "tensors 'a' and 'b' overlap"),
    ("same-bytes", header_file({"a": entry(0, 8), "b": entry(0, 8)}), "tensors 'a' and 'b' overlap"),
    ("gap", header_file({"a": entry(0, 8), "b": entry(12, 20)}, 20), "bytes 8-12 of the data belong to no tensor"),
    ("data-not-at-start", header_file({"a": entry(4, 12)}, 12), "bytes 0-4 of the data belong to no tensor"),
    ("trailing-bytes", header_file({"a": entry(0, 8)}, 16), "the last 8 bytes of the file belong to no tensor"),
    ("metadata-list", header_file({"__metadata__": ["x"], "a": entry(0, 8)}), "__metadata__ is a list, not a mapping"),
    ("metadata-number", header_file({"__metadata__": {"k": 1}, "a": entry(0, 8)}), "__metadata__ 'k' is a number, not a string"),
    ("name-with-newline", header_file({"a\nb": entry(0, 8, dtype="F5")}), "tensor 'a\\nb' has unsupported dtype"),
]


@pytest.mark.parametrize("case, build, fragment", HEADERS, ids=[row[0] for row in HEADERS])
def test_hostile_safetensors_headers_are_one_line(tmp_path, case, build, fragment):
    path = build(tmp_path)
    line = assert_one_line_error(run_cli("inspect", path), fragment)
    assert str(path) in line


def good_model(folder: Path) -> Path:
    folder.mkdir()
    save_file({"w": torch.ones(2), "b": torch.zeros(3)}, folder / "model.safetensors")
    return folder


def bad_model(header, data=8):
    def build(tmp: Path) -> Path:
        (tmp / "bad").mkdir()
        raw_safetensors(tmp / "bad" / "model.safetensors", header, data)
        return tmp / "bad"
    return build


MERGES = [
    ("overlap", bad_model({"w": entry(0, 8), "b": entry(0, 12, shape=[3])}, 12), "tensors 'w' and 'b' overlap"),
    ("duplicate-key", bad_model('{"w": %s, "w": %s}' % (E, E)), "holds the key 'w' twice"),
    ("shape-bool", bad_model({"w": entry(0, 4, shape=[True])}, 4), "but holds True"),
]


@pytest.mark.parametrize("case, build, fragment", MERGES, ids=[row[0] for row in MERGES])
def test_merge_and_convert_refuse_hostile_headers(tmp_path, case, build, fragment):
    good, bad = good_model(tmp_path / "good"), build(tmp_path)
    out = tmp_path / "out"
    assert_one_line_error(run_cli("merge", "--method", "linear", "-m", good, "-m", bad, "-o", out), fragment)
    assert not out.exists()
    assert_one_line_error(run_cli("convert", bad, "--to", "peft", "-o", out), fragment)
    assert not out.exists()


def test_files_written_by_safetensors_are_still_read(tmp_path):
    """Regression: the real writer's files (metadata, every layout it makes, 10k tensors) pass."""
    tensors = {"a": torch.randn(4, 3), "b": torch.ones(5, dtype=torch.bfloat16), "scalar": torch.tensor(2.0),
               "empty": torch.zeros(0, 4), "ids": torch.arange(6).reshape(2, 3), "mask": torch.tensor([True, False])}
    tensors.update({f"layers.{i}.bias": torch.full((3,), float(i)) for i in range(10_000)})
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt", "note": "x"})
    store = open_store(tmp_path / "model.safetensors")
    assert len(store) == len(tensors) and store.metadata == {"format": "pt", "note": "x"}
    for name in ("a", "b", "scalar", "empty", "ids", "mask", "layers.9999.bias"):
        assert torch.equal(store.get(name), tensors[name])
    result = run_cli("inspect", tmp_path, "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["tensors"] == len(tensors)


# -- FIFOs and devices: refused by name, never opened -------------------------------------------------
def fifo_file(tmp: Path) -> Path:
    os.mkfifo(tmp / "x.safetensors")
    return tmp / "x.safetensors"


def fifo_in_folder(tmp: Path) -> Path:
    (tmp / "m").mkdir()
    os.mkfifo(tmp / "m" / "model.safetensors")
    return tmp / "m"


def fifo_config(tmp: Path) -> Path:
    folder = good_model(tmp / "m")
    os.mkfifo(folder / "config.json")
    return folder


def fifo_shard(tmp: Path) -> Path:
    folder = good_model(tmp / "m")
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    os.mkfifo(folder / "model-00002-of-00002.safetensors")
    index = {"weight_map": {"w": "model-00001-of-00002.safetensors", "x": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def fifo_index(tmp: Path) -> Path:
    (tmp / "m").mkdir()
    os.mkfifo(tmp / "m" / "model.safetensors.index.json")
    return tmp / "m"


def fifo_ref(tmp: Path) -> Path:
    repo = tmp / "models--org--name"
    (repo / "refs").mkdir(parents=True)
    os.mkfifo(repo / "refs" / "main")
    return repo


def fifo_pickle(tmp: Path) -> Path:
    (tmp / "m").mkdir()
    os.mkfifo(tmp / "m" / "weights.pt")  # not a name the folder search tries first: found among the pickles
    return tmp / "m"


FIFOS = [
    ("weights-file", fifo_file, [], "this weights file is a named pipe (FIFO), not a regular file; refused"),
    ("in-model-folder", fifo_in_folder, [], "model.safetensors: this weights file is a named pipe (FIFO)"),
    ("config-json", fifo_config, [], "config.json: this JSON file is a named pipe (FIFO)"),
    ("index-shard", fifo_shard, [], "model-00002-of-00002.safetensors: this safetensors file is a named pipe (FIFO)"),
    ("index", fifo_index, [], "model.safetensors.index.json: this weights file is a named pipe (FIFO)"),
    ("hub-ref", fifo_ref, [], "refs/main: this Hub cache ref is a named pipe (FIFO)"),
    ("pickle", fifo_pickle, ["--allow-pickle"], "weights.pt: this checkpoint is a named pipe (FIFO)"),
    ("char-device", lambda tmp: Path("/dev/zero"), [], "/dev/zero: this weights file is a character device"),
]


@pytest.mark.parametrize("case, build, extra, fragment", FIFOS, ids=[row[0] for row in FIFOS])
def test_fifos_and_devices_are_refused_without_hanging(tmp_path, case, build, extra, fragment):
    path = build(tmp_path)
    if case == "char-device":  # a weights file name must be given to reach the reader
        os.symlink(path, tmp_path / "zero.safetensors")
        path, fragment = tmp_path / "zero.safetensors", "zero.safetensors: this weights file is a character device"
    assert_one_line_error(run_process("inspect", path, *extra, timeout=60), fragment)


def test_regular_file_names_what_it_refuses(tmp_path):
    from adaptkit.io.paths import regular_file

    os.mkfifo(tmp_path / "data.jsonl")
    with pytest.raises(AdaptkitError, match="this data file is a named pipe"):
        regular_file(tmp_path / "data.jsonl", "data file")
    with pytest.raises(AdaptkitError, match="this recipe is a folder"):
        regular_file(tmp_path, "recipe")
    with pytest.raises(AdaptkitError, match="no such recipe"):
        regular_file(tmp_path / "nope.yaml", "recipe")
    assert regular_file(__file__) == Path(__file__)


# -- names and links that leave their folder ----------------------------------------------------------
def outside_file(tmp: Path) -> Path:
    save_file({"x": torch.ones(2)}, tmp / "outside.safetensors")
    return tmp / "outside.safetensors"


def index_naming(shard_name):
    def build(tmp: Path) -> Path:
        outside = outside_file(tmp)
        folder = good_model(tmp / "m")
        name = shard_name(outside) if callable(shard_name) else shard_name
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": name}}))
        return folder
    return build


def link(name: str, target):
    """A model folder whose `name` links to `target(tmp)` outside it."""
    def build(tmp: Path) -> Path:
        folder = good_model(tmp / "m")
        if (folder / name).exists():
            (folder / name).unlink()
        os.symlink(target(tmp), folder / name)
        return folder
    return build


def outside_config(tmp: Path) -> Path:
    (tmp / "secret.json").write_text('{"model_type": "llama"}')
    return tmp / "secret.json"


def hub_repo(ref: bytes | None, snapshot_outside: bool = False):
    """A Hub cache repo folder whose refs/main holds `ref` (snapshot 'c0ffee' has the weights)."""
    def build(tmp: Path) -> Path:
        repo = tmp / "models--org--name"
        (repo / "refs").mkdir(parents=True)
        (repo / "snapshots").mkdir()
        if snapshot_outside:
            good_model(tmp / "elsewhere")
            os.symlink(tmp / "elsewhere", repo / "snapshots" / "c0ffee")
        else:
            good_model(repo / "snapshots" / "c0ffee")
        (repo / "refs" / "main").write_bytes(ref)
        return repo
    return build


def two_shards_one_tensor(tmp: Path) -> Path:
    folder = tmp / "m"
    folder.mkdir()
    save_file({"w": torch.ones(2)}, folder / "a.safetensors")
    save_file({"w": torch.zeros(2)}, folder / "b.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "a.safetensors",
                                                                                      "v": "b.safetensors"}}))
    return folder


PATHS = [
    ("shard-dotdot", index_naming("../outside.safetensors"), "'../outside.safetensors' is not a plain name inside"),
    ("shard-absolute", index_naming(lambda outside: str(outside)), "' is not a plain name inside"),
    ("shard-not-a-string", index_naming(["a.safetensors"]), "weight_map['x'] is a list of 1 item(s), not a file name"),
    ("shard-nul", index_naming("a\0b.safetensors"), "the file name 'a\\x00b.safetensors' is not a plain name"),
    ("shard-in-two-files", two_shards_one_tensor, "tensor 'w' is in both a.safetensors and b.safetensors"),
    ("weights-link-out", link("model.safetensors", outside_file), "outside.safetensors, outside"),
    ("config-link-out", link("config.json", outside_config), "secret.json, outside"),
    ("ref-dotdot", hub_repo(b"../../../etc"), "refs/main: holds no commit hash or revision name; refused"),
    ("ref-binary", hub_repo(b"\x00\xffSECRET\x01"), "refs/main: holds no commit hash or revision name; refused"),
    ("ref-missing-snapshot", hub_repo(b"a" * 40), "names the snapshot '" + "a" * 40 + "', which is not in"),
    ("snapshot-link-out", hub_repo(b"c0ffee", snapshot_outside=True), "elsewhere, outside"),
]


@pytest.mark.parametrize("case, build, fragment", PATHS, ids=[row[0] for row in PATHS])
def test_names_and_links_stay_inside_their_folder(tmp_path, case, build, fragment):
    line = assert_one_line_error(run_cli("inspect", build(tmp_path)), fragment)
    assert "SECRET" not in line


def test_hub_cache_snapshot_links_into_its_blobs_still_work(tmp_path):
    """Regression: a real HF cache snapshot's files are links to ../../blobs/ of the same repo folder."""
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    save_file({"w": torch.ones(2)}, repo / "blobs" / "0123abcd")
    (repo / "blobs" / "cfg").write_text('{"model_type": "llama"}')
    snapshot = repo / "snapshots" / ("b" * 40)
    snapshot.mkdir(parents=True)
    os.symlink("../../blobs/0123abcd", snapshot / "model.safetensors")
    os.symlink("../../blobs/cfg", snapshot / "config.json")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("b" * 40 + "\n")
    for path in (repo, snapshot):
        result = run_cli("inspect", path, "--json")
        assert result.exit_code == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["tensors"] == 1 and report["model"] == {"model_type": "llama"}


# -- pickles --------------------------------------------------------------------------------------------
def saved(obj, name="pytorch_model.bin", **options):
    def build(tmp: Path) -> Path:
        torch.save(obj, tmp / name, **options)
        return tmp / name
    return build


class Evil:
    def __reduce__(self):
        return (print, ("SECRET",))


def evil_pickle(tmp: Path) -> Path:
    with open(tmp / "pytorch_model.bin", "wb") as f:
        pickle.dump({"w": Evil()}, f)
    return tmp / "pytorch_model.bin"


def truncated_zip(tmp: Path) -> Path:
    torch.save({"w": torch.ones(64)}, tmp / "model.pt")
    data = (tmp / "model.pt").read_bytes()
    (tmp / "model.pt").write_bytes(data[: len(data) // 2])
    return tmp / "model.pt"


LEGACY = {"_use_new_zipfile_serialization": False}
PICKLES = [
    ("legacy-refused", saved({"w": torch.ones(3)}, **LEGACY), [], "pickle checkpoints can run code and are refused"),
    ("zip-refused", saved({"w": torch.ones(3)}), [], "or pass --allow-pickle"),
    ("list", saved([torch.ones(2)]), ["--allow-pickle"], "the checkpoint holds list, not a mapping of names to tensors"),
    ("legacy-list", saved([torch.ones(2)], **LEGACY), ["--allow-pickle"], "holds list, not a mapping"),
    ("non-tensor-value", saved({"w": torch.ones(2), "step": 3}), ["--allow-pickle"],
     "the checkpoint's entry 'step' is int, not a tensor"),
    ("nested-dict", saved({"w": {"x": torch.ones(2)}}), ["--allow-pickle"], "entry 'w' is dict, not a tensor"),
    ("code", evil_pickle, ["--allow-pickle"], "cannot load pickle checkpoint safely: torch.load(weights_only=True) refuses it"),
    ("garbage", written("x.bin", b"\x0bSECRET"), ["--allow-pickle"],
     "cannot load pickle checkpoint safely"),
    ("truncated", truncated_zip, ["--allow-pickle"], "not a readable torch checkpoint (RuntimeError: truncated or corrupt)"),
]


@pytest.mark.parametrize("case, build, extra, fragment", PICKLES, ids=[row[0] for row in PICKLES])
def test_pickles_are_one_line(tmp_path, case, build, extra, fragment):
    line = assert_one_line_error(run_cli("inspect", build(tmp_path), *extra), fragment)
    assert "SECRET" not in line and "weights_only` set to `False" not in line


@pytest.mark.parametrize("options", [LEGACY, {}], ids=["legacy", "zip"])
def test_pickles_are_read_with_allow_pickle(tmp_path, options):
    weights = {"w": torch.randn(4, 3), "b": torch.arange(3)}
    torch.save(weights, tmp_path / "pytorch_model.bin", **options)
    torch.save({"state_dict": weights, "epoch": 3, "global_step": 10}, tmp_path / "wrapped.ckpt", **options)
    for path in (tmp_path / "pytorch_model.bin", tmp_path / "wrapped.ckpt"):
        store = open_store(path, allow_pickle=True)
        assert sorted(store.keys()) == ["b", "w"] and all(torch.equal(store.get(k), v) for k, v in weights.items())


COMMANDS = [["inspect"], ["merge"], ["convert"], ["extract"], ["quantize"], ["train"], ["eval"]]


@pytest.mark.parametrize("command", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_every_command_that_reads_checkpoints_has_allow_pickle(command):
    result = run_cli(*command, "--help")
    assert result.exit_code == 0 and "--allow-pickle" in result.stdout


def test_quantize_and_convert_read_pickles_only_when_allowed(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    torch.save({"layer.weight": torch.randn(64, 64), "layer.bias": torch.randn(64)}, model / "pytorch_model.bin",
               _use_new_zipfile_serialization=False)
    out = tmp_path / "q"
    assert_one_line_error(run_cli("quantize", model, "--method", "int8", "-o", out), "or pass --allow-pickle")
    assert not out.exists()
    result = run_cli("--quiet", "quantize", model, "--method", "int8", "-o", out, "--allow-pickle")
    assert result.exit_code == 0, result.stderr
    assert "layer.weight" in open_store(out).keys()


def test_load_adapter_and_build_model_take_allow_pickle(tmp_path):
    import adaptkit
    from adaptkit.train.models import build_model

    from builders import tiny_llama

    adapter = tmp_path / "adapter"
    adaptkit.inject(tiny_llama(), "lora", r=2, lora_alpha=4, target_modules=["q_proj"]).save(adapter)
    tensors = open_store(adapter)
    torch.save({k: tensors.get(k) for k in tensors.keys()}, adapter / "adapter_model.bin")
    tensors.close()
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(AdaptkitError, match="adapter_model.bin: pickle checkpoints can run code and are refused"):
        adaptkit.load_adapter(tiny_llama(), adapter)
    handle = adaptkit.load_adapter(tiny_llama(), adapter, allow_pickle=True)
    assert handle.adapters["default"].layers

    base = tmp_path / "base"
    model = tiny_llama()
    model.config.save_pretrained(base)
    torch.save(model.state_dict(), base / "pytorch_model.bin")
    with pytest.raises(AdaptkitError, match="pytorch_model.bin: pickle checkpoints can run code and are refused"):
        build_model(base, "causal-lm")
    built, _ = build_model(base, "causal-lm", allow_pickle=True)
    assert torch.equal(built.state_dict()["lm_head.weight"], model.state_dict()["lm_head.weight"])


# -- quantized weights whose packed tensors do not fit together ----------------------------------------
def quantized(method: str, victim: str, change):
    """A model quantized with `method`, then its stored tensor `victim` changed by `change`."""
    def build(tmp: Path) -> Path:
        from safetensors import safe_open
        from safetensors.torch import load_file

        from adaptkit.quant.quantize import run_quantize

        (tmp / "m").mkdir()
        save_file({"layer.weight": torch.randn(64, 64), "layer.bias": torch.randn(64)}, tmp / "m" / "model.safetensors")
        run_quantize(tmp / "m", method, tmp / "q", progress=False)
        path = tmp / "q" / "model.safetensors"
        with safe_open(path, "pt") as f:
            metadata = f.metadata()
        tensors = load_file(path)
        tensors[victim] = change(tensors[victim])
        save_file(tensors, path, metadata=metadata)
        return tmp / "q"
    return build


UNPACKING = [
    ("cut-code-table", quantized("nf4", "layer.weight.quant_map", lambda t: t[:4].clone()),
     "cannot unpack 'layer.weight': nf4: weight.quant_map has 4 values, a 4-bit code has 16"),
    ("float-quant-state", quantized("nf4", "layer.weight.quant_state.bitsandbytes__nf4", lambda t: t.double()),
     "cannot unpack 'layer.weight' from its packed tensors (TypeError"),
    ("float-shape", quantized("binary", "layer.weight.shape", lambda t: t.double()),
     "cannot unpack 'layer.weight': its packed tensors give the shape (64.0, 64.0)"),
]


@pytest.mark.parametrize("case, build, fragment", UNPACKING, ids=[row[0] for row in UNPACKING])
def test_quantized_inputs_that_do_not_unpack_are_one_line(tmp_path, case, build, fragment):
    model = build(tmp_path)
    out = tmp_path / "out"
    assert_one_line_error(run_cli("--quiet", "merge", "--method", "linear", "-m", model, "-m", model, "-o", out), fragment)
    assert not out.exists()


@pytest.mark.parametrize("state,fragment", [
    (b"[1, 2]", "is not a 4-bit quant state (quant_type nf4|fp4, blocksize, dtype, shape)"),
    (b'{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [-1, 4]}', "is not a 4-bit quant state"),
    (b'{"quant_type": "nf4", "quant_type": "fp4"}', "duplicate key 'quant_type'"),
    (b"\xff\xfe", "is not UTF-8 JSON"),
], ids=["a list", "negative shape", "duplicate key", "not UTF-8"])
def test_a_hostile_4bit_quant_state_is_one_line(state, fragment):
    """The quant state bitsandbytes stores as bytes in a tensor is read as JSON we did not write."""
    import torch

    from adaptkit import registry
    from adaptkit.errors import AdaptkitError

    nf4 = registry.get("quantizer", "nf4")
    packed = {"weight.quant_state.bitsandbytes__nf4": torch.tensor(list(state), dtype=torch.uint8)}
    with pytest.raises(AdaptkitError) as info:
        nf4.state(packed)
    assert fragment in str(info.value) and "\n" not in str(info.value) and len(str(info.value)) < 200
