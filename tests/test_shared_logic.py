"""Logic that used to be written several times now has one home, and the library leaves the process as
it found it:

- plugin detection (`registry.detect`) serves formats, quantizers and `inspect`;
- one dtype table (`adaptkit.io.dtypes`) serves sizes, report names, struct decoding, torch and the
  dtypes models compute in;
- one Hub-reference test (`hub.is_reference`) serves merge inputs, `inspect` and `load_adapter`;
- a merge in factor space is a capability of its plugin (`merge_factors`), not a name in the core;
- malloc is tuned only inside the command (`allocator.tuning`), never by a library call.

Inputs are a few numpy tensors built in tmp_path, so the file runs in seconds.
"""
from __future__ import annotations

import ctypes
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import adaptkit as ak
from adaptkit import allocator, registry
from adaptkit.io import dtypes
from adaptkit.adapter import detect_format, read_adapter
from adaptkit.errors import AdaptkitError
from adaptkit.files.inspection import inspect
from adaptkit.io.store import open_store
from adaptkit.files.lowrank import factor_matrix
from adaptkit.merge.engine import run_merge
from adaptkit.quant.unpacked import detect_quantizer
from hostile import assert_one_line_error, run_cli

Q = "model.layers.{}.self_attn.q_proj"


# -- builders --------------------------------------------------------------------------------------
def model(folder: Path) -> Path:
    """A two-layer 'model': one 4 × 4 q_proj per layer, and its config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({f"{Q.format(i)}.weight": np.full((4, 4), i + 1.0, np.float32) for i in range(2)},
              str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    return folder


def lora(folder: Path, seed: int = 0, rank: int = 2) -> Path:
    """A PEFT LoRA on `model`'s q_proj layers, random factors (r = rank, alpha = 2·rank)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors = {}
    for i in range(2):
        key = f"base_model.model.{Q.format(i)}"
        tensors[f"{key}.lora_A.weight"] = rng.standard_normal((rank, 4)).astype(np.float32)
        tensors[f"{key}.lora_B.weight"] = rng.standard_normal((4, rank)).astype(np.float32)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
                                                           "target_modules": ["q_proj"]}))
    return folder


def quantized(folder: Path) -> Path:
    """A one-layer model packed by the int8 quantizer plugin."""
    folder.mkdir(parents=True, exist_ok=True)
    packed = registry.get("quantizer", "int8").quantize(torch.randn(4, 8))
    save_file({k.replace("weight", "layer.weight", 1): v.numpy() for k, v in packed.items()},
              str(folder / "model.safetensors"))
    return folder


def deltas(folder: Path) -> dict[str, torch.Tensor]:
    adapter = read_adapter(folder)
    variant = registry.get("variant", adapter.variant)
    return {m: variant.delta(adapter, m) for m in adapter.modules}


# -- one detection loop: (id, builder, kind, expected plugin) ---------------------------------------
DETECT = [
    ("an adapter's format", lora, "format", "peft"),
    ("a plain model has no format", model, "format", None),
    ("a packed model's quantizer", quantized, "quantizer", "int8"),
    ("a plain model has no quantizer", model, "quantizer", None),
]


@pytest.mark.parametrize("build,kind,expected", [r[1:] for r in DETECT], ids=[r[0] for r in DETECT])
def test_detection_is_one_function_for_formats_quantizers_and_inspect(tmp_path, build, kind, expected):
    folder = build(tmp_path / "in")
    store = open_store(folder)
    assert registry.detect(kind, store) == expected
    assert (detect_format if kind == "format" else detect_quantizer)(store) == expected
    report = inspect(folder)
    if kind == "quantizer":
        assert report["quantization"] == ({"method": expected} if expected else None)
    else:
        assert report["format"] == (expected or "safetensors")


# -- one dtype table ---------------------------------------------------------------------------------
@pytest.mark.parametrize("row", dtypes.TABLE, ids=[d.code for d in dtypes.TABLE])
def test_each_dtype_row_agrees_with_torch_and_struct(row):
    values = [1.5, -2.0] if row.kind in ("float", "float8") else [1, 0] if row.kind == "bool" else [3, 7]
    if row.torch is None:  # unsigned wider than a byte: sizes and names only, torch reads no such tensor here
        with pytest.raises(KeyError):
            dtypes.code_to_torch(row.code)
        return
    dtype = dtypes.code_to_torch(row.code)
    assert dtypes.torch_to_code(dtype) == row.code and dtype.itemsize == row.size == dtypes.SIZES[row.code]
    tensor = torch.tensor(values[:1]).to(dtype)
    decoded = dtypes.scalar(row.code, tensor.view(torch.uint8).numpy().tobytes())
    if row.struct is None and row.code != "BF16":
        assert decoded is None  # float8: struct cannot, the caller reads it through torch
    else:
        assert decoded == tensor.item()


COMPUTE = [("F32", "float32"), ("BF16", "bfloat16"), ("F16", "float16"), ("F64", "float32"),
           ("F8_E4M3", "float32"), ("I8", "float32"), ("U8", "float32")]


@pytest.mark.parametrize("code,expected", COMPUTE, ids=[c for c, _ in COMPUTE])
def test_compute_dtype_of_a_stored_tensor(code, expected):
    assert dtypes.compute_dtype(code) == expected
    assert dtypes.parse_dtype(expected) == getattr(torch, expected)


def test_inspect_imports_no_torch(tmp_path):
    """The table is read without torch: `inspect` of a model, an adapter and a packed model stays torch-free."""
    folders = [model(tmp_path / "m"), lora(tmp_path / "a"), quantized(tmp_path / "q")]
    code = ("import sys; from adaptkit.files.inspection import inspect; "
            "reports = [inspect(p) for p in sys.argv[1:]]; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, *map(str, folders)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- one Hub-reference test: (id, reference) for every reader ----------------------------------------
NOT_REFERENCES = [
    ("three parts", "a/b/c"),
    ("revision with '..'", "org/x@../y"),
    ("revision with '.'", "org/x@a/./b"),
    ("'..' in the id", "a..b/c"),
    ("a relative path", "../nope/y"),
]


@pytest.mark.parametrize("ref", [r[1] for r in NOT_REFERENCES], ids=[r[0] for r in NOT_REFERENCES])
def test_a_path_that_is_no_hub_reference_is_a_missing_path_for_every_reader(tmp_path, monkeypatch, ref):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never asked: the reference is refused first
    line = assert_one_line_error(run_cli("merge", "-m", ref, "-m", ref, "-o", tmp_path / "out"), f"{ref}: no such folder")
    assert "Hub" not in line
    line = assert_one_line_error(run_cli("inspect", ref), ": no such file or folder")  # the path, normalized
    assert "Hub" not in line
    with pytest.raises(AdaptkitError, match=r"no such adapter folder$"):
        ak.load_adapter(torch.nn.Linear(4, 4), ref)


@pytest.mark.parametrize("ref", ["org/not-cached", "org/not-cached@v1"])
def test_a_hub_reference_goes_to_the_hub_for_every_reader(tmp_path, monkeypatch, ref):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    fragment = "HF_HUB_OFFLINE is set"
    assert_one_line_error(run_cli("merge", "-m", ref, "-m", ref, "-o", tmp_path / "out"), fragment)
    assert_one_line_error(run_cli("inspect", ref), fragment)
    with pytest.raises(AdaptkitError, match=fragment):
        ak.load_adapter(torch.nn.Linear(4, 4), ref)


# -- merges in factor space: a capability of the plugin ---------------------------------------------
FIRST_SRC = '''
"""A factor-space merge for the tests: the first input that has the module, weighted."""
class First:
    """The first input's factors, times its weight."""
    name = "fake_first"
    params = {"weight": None}
    per_model = frozenset({"weight"})
    def merge(self, tensors, base, **params):
        raise ValueError("factors only")
    def merge_factors(self, factors, **params):
        (a, b, s), w = next((f, w) for f, w in zip(factors, params["weight"]) if f is not None)
        return a, b * (w * s)
FAKE_FIRST = First()
'''


def test_a_third_party_merge_in_factor_space_needs_no_core_change(tmp_path, fake_plugin_dist):
    fake_plugin_dist("fakeplug-first", {"adaptkit.merge": {"fake_first": "fakeplug_first:FAKE_FIRST"}},
                     {"fakeplug_first": FIRST_SRC})
    a, b = lora(tmp_path / "a", seed=1), lora(tmp_path / "b", seed=2, rank=3)
    result = run_cli("-q", "merge", "--method", "fake_first", "-m", f"{a}:2", "-m", f"{b}:1", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    want = deltas(a)
    for module, delta in deltas(tmp_path / "out").items():
        torch.testing.assert_close(delta, 2 * want[module])


CONCAT = [
    # (id, weights, inputs present, scales)
    ("two inputs", [1.0, 0.5], [True, True], [2.0, 0.25]),
    ("a negative weight", [1.0, -1.5], [True, True], [1.0, 3.0]),
    ("an input without the module", [2.0, 7.0, 1.0], [True, False, True], [1.0, 1.0, 0.5]),
]


@pytest.mark.parametrize("weights,present,scales", [r[1:] for r in CONCAT], ids=[r[0] for r in CONCAT])
def test_concat_merges_factors_exactly(weights, present, scales):
    g = torch.Generator().manual_seed(0)
    factors = [(torch.randn(2 + i, 6, generator=g), torch.randn(5, 2 + i, generator=g), s) if p else None
               for i, (p, s) in enumerate(zip(present, scales))]
    a, b = registry.get("merge", "concat").merge_factors(factors, weight=weights)
    want = sum(w * s * (fb @ fa) for f, w in zip(factors, weights) if f is not None for fa, fb, s in [f])
    assert a.shape[0] == sum(f[0].shape[0] for f in factors if f is not None)
    torch.testing.assert_close(b @ a, want)


def test_concat_refuses_a_weight_that_is_no_number():
    factors = [(torch.ones(1, 2), torch.ones(2, 1), 1.0)]
    with pytest.raises(AdaptkitError, match="concat: 'weight' must be a finite number, got nan"):
        registry.get("merge", "concat").merge_factors(factors, weight=[math.nan])


# -- one SVD refactoring: (id, rank, options, expected rank) -----------------------------------------
SVD = [
    ("clamped to the numerical rank", 6, {}, 3),
    ("the rank asked for, kept", 6, {"keep_rank": True}, 6),
    ("kept, randomized", 2, {"keep_rank": True, "seed": 5}, 2),
]


@pytest.mark.parametrize("rank,options,expected", [r[1:] for r in SVD], ids=[r[0] for r in SVD])
def test_factor_matrix_gives_a_then_b_whatever_the_route(rank, options, expected):
    g = torch.Generator().manual_seed(3)
    m = torch.randn(40, 3, generator=g) @ torch.randn(3, 30, generator=g)
    f = factor_matrix(m, rank, **options)
    assert (f.rank, f.a.shape, f.b.shape) == (expected, (expected, 30), (40, expected))
    optimal = float(torch.linalg.svdvals(m)[expected:].norm() / m.norm())
    assert f.error == pytest.approx(float((m - f.b @ f.a).norm() / m.norm()), abs=1e-5)
    assert f.error <= optimal * 1.02 + 1e-5


# -- malloc tuned by the command only: (id, run, expected mallopt calls) ----------------------------
def merge_command(tmp_path):
    m = model(tmp_path / "m")
    result = run_cli("-q", "merge", "-m", f"{m}:0.5", "-m", f"{m}:0.5", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.stderr


def whole_tensor_merge_command(tmp_path):
    m = model(tmp_path / "m")
    result = run_cli("-q", "merge", "--method", "karcher", "-m", f"{m}:0.5", "-m", f"{m}:0.5", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.stderr


def merge_call(tmp_path):
    m = model(tmp_path / "m")
    run_merge({"merge_method": "linear", "models": [{"model": str(m), "parameters": {"weight": 0.5}}] * 2},
              tmp_path / "out", progress=False)


def quantize_call(tmp_path):
    from adaptkit.quant.quantized import quantize_model

    quantize_model(torch.nn.Sequential(torch.nn.Linear(8, 4)), "int8", skip=[])


def quantize_in_tuning(tmp_path):
    with allocator.tuning():
        quantize_call(tmp_path)


def inspect_command(tmp_path):
    assert run_cli("inspect", model(tmp_path / "m")).exit_code == 0


ALLOCATOR = [
    ("the merge command, block by block", merge_command, allocator.SETTINGS["blocks"]),
    ("the merge command, tensor by tensor", whole_tensor_merge_command, allocator.SETTINGS["tensors"]),
    ("run_merge from a script", merge_call, ()),
    ("quantized layers inside tuning()", quantize_in_tuning, allocator.SETTINGS["quantized"]),
    ("quantize_model from a script", quantize_call, ()),
    ("a command with nothing to tune", inspect_command, ()),
]


@pytest.mark.parametrize("run,expected", [r[1:] for r in ALLOCATOR], ids=[r[0] for r in ALLOCATOR])
def test_malloc_is_tuned_by_the_command_only(tmp_path, monkeypatch, run, expected):
    calls = []
    real = ctypes.CDLL

    class Libc:
        def mallopt(self, parameter, value):
            calls.append((parameter, value))
            return 1

    monkeypatch.setattr(ctypes, "CDLL", lambda name, *a, **k: Libc() if name == "libc.so.6" else real(name, *a, **k))
    run(tmp_path)
    assert tuple(calls) == tuple(expected)
    assert not allocator.tune("blocks") and len(calls) == len(expected)  # the permission ended with the command
