"""NearSwap in one C pass (`_mix.c`'s `nearswap`): torch's nine steps and roundings, to the bit, in bf16 and float32;
inputs with an inf or a NaN are left to torch's steps."""
from __future__ import annotations

import math

import pytest
import torch

from adaptkit import registry


@pytest.fixture
def nearswap_module():
    from adaptkit_plugins.merges import _mixing

    if _mixing.native is None:
        pytest.skip("_mix.c is not built here")
    return _mixing


def torch_steps(module, monkeypatch, base, other, t):
    with monkeypatch.context() as patch:
        patch.setattr(module, "native", None)
        return registry.get("merge", "nearswap").merge([other], base, t=t)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    width = {2: torch.int16, 4: torch.int32}[a.element_size()]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(width), b.view(width))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_c_nearswap_is_torchs_steps(nearswap_module, monkeypatch, dtype):
    g = torch.Generator().manual_seed(0)
    for n, t in ((1, 0.1), (255, 1e-3), (257, 0.0), (4099, 0.5), (70001, 1e-7), (3000, 1e30), (1000, 3.0)):
        base = (torch.randn(n, generator=g) * torch.exp2(torch.randint(-20, 3, (n,), generator=g).float())).to(dtype)
        offset = torch.randn(n, generator=g) * torch.exp2(torch.randint(-30, 0, (n,), generator=g).float())
        other = (base.float() + offset).to(dtype)
        other[::7] = base[::7]  # |θ₀ − θ₁| = 0: the floor
        other[1::11] = -0.0
        base[2::13] = 0.0
        if n > 2000:
            other[5] = torch.finfo(dtype).max  # a distance beyond the float range: w = 0
            base[5] = -torch.finfo(dtype).max
        calls = []
        monkeypatch.setattr(nearswap_module.native, "nearswap",
                            lambda *a, f=nearswap_module.native.nearswap: calls.append(1) or f(*a))
        ours = registry.get("merge", "nearswap").merge([other], base, t=t)
        assert calls and same(ours, torch_steps(nearswap_module, monkeypatch, base, other, t)), (n, t)
        monkeypatch.undo()


def test_inputs_with_an_inf_or_a_nan_take_torchs_steps(nearswap_module, monkeypatch):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(600, generator=g).bfloat16()
    other = (base.float() + torch.randn(600, generator=g) * 0.01).bfloat16()
    for value in (math.inf, -math.inf, math.nan):
        for which in ("base", "other"):
            a, b = base.clone(), other.clone()
            (a if which == "base" else b)[300] = value
            out = torch.empty_like(a)
            assert not nearswap_module.native.nearswap(a.view(torch.int16).numpy(), b.view(torch.int16).numpy(), 0.01,
                                                       "bfloat16", out.view(torch.int16).numpy())
            ours = registry.get("merge", "nearswap").merge([b], a, t=0.01)
            assert same(ours, torch_steps(nearswap_module, monkeypatch, a, b, 0.01)), (value, which)


def test_c_nearswap_refuses_bad_buffers_by_name(nearswap_module):
    native = nearswap_module.native
    two, three = bytearray(4), bytearray(6)
    with pytest.raises(ValueError, match="nearswap: a base, other and out of one length"):
        native.nearswap(bytes(two), bytes(three), 0.1, "bfloat16", two)
    with pytest.raises(ValueError, match="nearswap: a base, other and out of one length"):
        native.nearswap(bytes(three), bytes(three), 0.1, "float32", bytearray(6))
    with pytest.raises(ValueError, match="dtype bfloat16 or float32"):
        native.nearswap(bytes(two), bytes(two), 0.1, "float16", two)
    with pytest.raises(TypeError):
        native.nearswap(bytes(two), bytes(two), "t", "bfloat16", two)
