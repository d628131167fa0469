"""Quantizer plugins: formulas written out, round-trip bounds, bitsandbytes bit-exactness, detect."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from adaptkit import registry
from adaptkit.errors import AdaptkitError
from adaptkit.io.store import open_store

F = pytest.importorskip("bitsandbytes.functional")

SHAPES = [(64, 64), (3, 100), (1000,), (7, 9, 11)]
FOURBIT = ["nf4", "fp4", "nf4_dq", "fp4_dq"]


def q(name):
    return registry.get("quantizer", name)


def bnb_dict(t, quant):
    packed, state = F.quantize_4bit(t, blocksize=64, quant_type=quant.quant_type, compress_statistics=quant.double_quant)
    return packed, state, {"weight": packed, **{f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", FOURBIT)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_4bit_identical_to_bitsandbytes(shape, name, dtype):
    torch.manual_seed(sum(shape))
    t = (torch.randn(shape) * 2).to(dtype)
    quant = q(name)
    ours = quant.quantize(t)
    packed, state, theirs = bnb_dict(t, quant)
    assert set(ours) == set(theirs)
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype and ours[key].shape == theirs[key].shape, key
        assert torch.equal(ours[key], theirs[key]), key
    # bitsandbytes reads our dict and dequantizes it to our dequantized tensor
    read = F.QuantState.from_dict({k.removeprefix("weight."): v for k, v in ours.items() if k != "weight"}, device="cpu")
    ref = F.dequantize_4bit(ours["weight"], read)
    mine = quant.dequantize(ours)
    assert mine.shape == t.shape and mine.dtype == dtype
    assert torch.equal(mine, ref.reshape(t.shape))


@pytest.mark.parametrize("shape", [(96, 80), (7, 9, 11), (1000,), (6, 1024), (3, 4096)])  # the last two: whole blocks
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64, 256, 1024, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_4bit_unpacking_paths_agree(shape, quant_type, blocksize, dtype):
    """bitsandbytes' C kernel (used on the CPU when installed) and adaptkit's torch ops give the same
    bytes, and both the formula written out: code[nibble] · absmax in float32, rounded once."""
    from adaptkit_plugins.quantizers._fourbit_unpack import _kernel, unpack
    from adaptkit_plugins.quantizers.fourbit import FourBit, code_values

    assert _kernel(quant_type, dtype) is not None  # bitsandbytes (pinned) is a test dependency
    torch.manual_seed(blocksize)
    t = (torch.randn(shape) * 3).to(dtype)
    packed = FourBit("x", quant_type, blocksize=blocksize).quantize(t)
    data, absmax, code = packed["weight"].reshape(-1), packed["weight.absmax"], code_values(quant_type)
    args = (data, code, True, absmax, list(shape), blocksize, quant_type, dtype)
    native, torch_ops = unpack(*args), unpack(*args, native=False)
    nibbles = torch.stack([data >> 4, data & 15], dim=1).reshape(-1)[:t.numel()].long()
    formula = (code[nibbles] * absmax.repeat_interleave(blocksize)[:t.numel()]).to(dtype).reshape(shape)
    assert native.dtype == torch_ops.dtype == dtype
    assert torch.equal(native, formula) and torch.equal(torch_ops, formula)


def test_4bit_own_code_takes_the_torch_path():
    """A file whose quant_map is not the standard code is unpacked with that code (bitsandbytes'
    kernel would silently use its own table)."""
    t = torch.randn(64, 64)
    packed = q("nf4").quantize(t)
    standard = q("nf4").dequantize(packed)
    packed["weight.quant_map"] = packed["weight.quant_map"] * 0.5
    assert torch.equal(q("nf4").dequantize(packed), standard * 0.5)


@pytest.mark.parametrize("name", ["nf4", "fp4"])
def test_4bit_formula(name):
    """Codes written out: per block of 64, nearest code value of x / absmax; high nibble first."""
    torch.manual_seed(0)
    t = torch.randn(3, 100)
    out = q(name).quantize(t)
    code = F.get_4bit_type(name, device="cpu")
    flat = t.reshape(-1)
    absmax = torch.stack([flat[i:i + 64].abs().max() for i in range(0, flat.numel(), 64)])  # last block: 44 values
    assert torch.equal(out["weight.absmax"], absmax)
    scaled = flat / absmax.repeat_interleave(64)[:300]
    nearest = (scaled[:, None] - code[None, :]).abs().argmin(dim=1)
    data = out["weight"].reshape(-1)
    codes = torch.stack([data >> 4, data & 15], dim=1).reshape(-1)
    # same code value (FP4 has ±0 with two indices; a value of exactly 0 may take either)
    assert torch.equal(code[codes.long()], code[nearest])
    deq = q(name).dequantize(out)
    assert torch.allclose(deq.reshape(-1), code[nearest] * absmax.repeat_interleave(64)[:300])


def test_4bit_padding_and_state_json():
    t = torch.randn(7, 9, 11)  # 693 values: 10 full blocks + 53, odd count padded with one 0 value
    out = q("nf4_dq").quantize(t)
    assert out["weight"].shape == (347, 1)
    assert out["weight.absmax"].shape == (11,)
    assert out["weight"][-1, 0] & 15 == 7  # NF4 code of 0.0 in the padding nibble
    state = json.loads(bytes(out["weight.quant_state.bitsandbytes__nf4"].tolist()))
    assert state["shape"] == [7, 9, 11] and state["blocksize"] == 64 and state["nested_blocksize"] == 256


@pytest.mark.parametrize("name,bound", [("nf4", 0.11), ("nf4_dq", 0.11), ("fp4", 0.13)])
def test_4bit_round_trip_error(name, bound):
    torch.manual_seed(1)
    t = torch.randn(256, 256)
    back = q(name).dequantize(q(name).quantize(t))
    rel_rmse = ((back - t).pow(2).mean() / t.pow(2).mean()).sqrt()
    assert rel_rmse < bound


def test_int8_formula_and_bound():
    torch.manual_seed(2)
    t = torch.randn(5, 3, 4) * torch.tensor([0.1, 1, 10, 0, 3]).view(5, 1, 1)
    out = q("int8").quantize(t)
    rows = t.reshape(5, -1)
    s = rows.abs().amax(dim=1)
    expect = torch.round(rows / torch.where(s > 0, s, torch.ones_like(s))[:, None] * 127).to(torch.int8)
    assert out["weight"].dtype == torch.int8 and out["weight.scale"].dtype == torch.float32
    assert torch.equal(out["weight"], expect.reshape(t.shape))
    assert torch.equal(out["weight.scale"], s)
    back = q("int8").dequantize(out)
    assert torch.equal(back, (expect.float() * (s[:, None] / 127)).reshape(t.shape))
    err = (back - t).reshape(5, -1).abs().amax(dim=1)
    assert (err <= s / 254 * (1 + 1e-5) + 1e-12).all()


def test_int8_blocks():
    from adaptkit_plugins.quantizers.int8 import Int8

    torch.manual_seed(3)
    t = torch.randn(4, 10)
    quant = Int8(block_size=4)
    out = quant.quantize(t)
    assert out["weight.scale"].shape == (4, 3)
    assert torch.equal(out["weight.scale"][:, 2], t[:, 8:].abs().amax(dim=1))
    back = quant.dequantize(out)
    assert ((back - t).abs() <= out["weight.scale"].repeat_interleave(4, dim=1)[:, :10] / 254 + 1e-7).all()
    with pytest.raises(AdaptkitError, match="weight.scale"):
        Int8(block_size=3).dequantize(out)


def test_ternary_formula():
    torch.manual_seed(4)
    t = torch.randn(6, 7)
    gamma = t.abs().mean()
    wq = torch.clamp(torch.round(t / (gamma + 1e-5)), -1, 1)
    out = q("ternary").quantize(t)
    assert out["weight"].dtype == torch.uint8 and out["weight"].numel() == 11  # ceil(42 / 4)
    back = q("ternary").dequantize(out)
    assert torch.equal(back, wq * gamma)
    assert set(torch.unique(back / gamma).tolist()) <= {-1.0, 0.0, 1.0}


def test_binary_formula():
    torch.manual_seed(5)
    t = torch.randn(5, 9)
    t[0, 0] = 0.0
    out = q("binary").quantize(t)
    assert out["weight"].numel() == 6  # ceil(45 / 8)
    alpha = t.abs().mean(dim=1)
    signs = torch.where(t >= 0, 1.0, -1.0)
    back = q("binary").dequantize(out)
    assert torch.equal(back, signs * alpha[:, None])
    assert back[0, 0] == alpha[0]  # sign(0) = +1
    one_d = q("binary").dequantize(q("binary").quantize(torch.tensor([1.0, -3.0, 2.0])))
    assert torch.equal(one_d, torch.tensor([2.0, -2.0, 2.0]))


@pytest.mark.parametrize("name", ["int8", "nf4", "fp4", "nf4_dq", "fp4_dq", "ternary", "binary"])
def test_refuses_non_float(name):
    with pytest.raises(AdaptkitError, match="floating-point"):
        q(name).quantize(torch.arange(10))
    with pytest.raises(AdaptkitError, match="floating-point"):
        q(name).quantize(torch.ones(4, dtype=torch.bool))


def test_unknown_quantizer_suggests_nearest():
    with pytest.raises(AdaptkitError, match="did you mean 'nf4'"):
        registry.get("quantizer", "nf5")


@pytest.mark.parametrize("name", ["int8", "nf4", "fp4", "nf4_dq", "fp4_dq", "ternary", "binary"])
def test_detect_own_keys_only(tmp_path, name):
    torch.manual_seed(6)
    tensors = {f"model.layer.{k}": v.contiguous() for k, v in q(name).quantize(torch.randn(8, 64)).items()}
    tensors["model.norm.weight"] = torch.ones(8)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    store = open_store(tmp_path / "model.safetensors")
    found = [other for other in registry.names("quantizer") if q(other).detect(store)]
    assert found == [name]


def test_detect_plain_model(tmp_path):
    save_file({"a.weight": torch.randn(4, 4), "a.scale": torch.randn(4)}, str(tmp_path / "m.safetensors"))
    store = open_store(tmp_path / "m.safetensors")
    assert not any(q(n).detect(store) for n in registry.names("quantizer"))


def test_plugin_modules_do_not_import_torch_at_top():
    import ast
    from pathlib import Path

    import adaptkit_plugins.quantizers as pkg

    for path in Path(pkg.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.Import):
                assert all(a.name != "torch" for a in node.names), path.name
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith("torch"), path.name


@pytest.mark.parametrize("seed", range(4))
def test_8bit_blockwise_equals_bitsandbytes_and_its_rule(seed):
    """Double quantization's 8-bit step, against bitsandbytes' `quantize_blockwise` on the kind of
    values it gets (block absmax minus its mean) and against its table rule written out."""
    from adaptkit_plugins.quantizers._common import dynamic_map, quantize_blockwise_8bit

    torch.manual_seed(seed)
    absmax = torch.randn(4096 + 37 * seed).abs() * 0.1
    values = absmax - absmax.mean()
    code = dynamic_map()
    assert torch.equal(code, F.create_dynamic_map(True, 7, 8))
    ours, scale = quantize_blockwise_8bit(values, code, 256)
    theirs, state = F.quantize_blockwise(values, code=code, blocksize=256)
    assert torch.equal(ours, theirs) and torch.equal(scale, state.absmax)
    # the rule: the table point v = −1 + 2k/65535 nearest to t = x/absmax, then the code nearest to v
    t = (values / scale.repeat_interleave(256)[: values.numel()]).double()
    k = torch.round((t + 1) / 2 * 65535)
    v = -1 + 2 * k / 65535
    nearest_to_point = (v[:, None] - code.double()[None, :]).abs().argmin(dim=1)
    agree = code[ours.long()].double() == code[nearest_to_point].double()
    assert agree.float().mean() > 0.999  # float32 rounding of t may move a value to the next point
    off = (code[ours.long()].double() - t).abs() - (code[nearest_to_point].double() - t).abs()
    assert off.max() < 2 / 65535


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", registry.names("quantizer"))
def test_packed_layout_says_what_quantize_returns(name, shape):
    from adaptkit.io.dtypes import torch_to_code

    quant = q(name)
    torch.manual_seed(1)
    t = torch.randn(shape, dtype=torch.bfloat16)
    packed = quant.quantize(t)
    assert quant.packed_layout(t) == {k: (torch_to_code(v.dtype), tuple(v.shape)) for k, v in packed.items()}


def test_int8_per_row_and_per_block_files_are_told_apart(tmp_path):
    from safetensors.torch import save_file

    from adaptkit.io.store import open_store
    from adaptkit.quant.unpacked import detect_quantizer

    t = torch.randn(6, 130)
    for name in ("int8", "int8_block"):
        packed = q(name).quantize(t)
        save_file({k.replace("weight", "layer.weight", 1): v for k, v in packed.items()}, tmp_path / f"{name}.safetensors")
        assert detect_quantizer(open_store(tmp_path / f"{name}.safetensors")) == name
    assert q("int8_block").quantize(t)["weight.scale"].shape == (6, 3)  # 64 + 64 + 2 columns
