"""karcher's norms of bf16 tensors in one C pass (`_mix.c`'s `norm`, `_norm.py`): torch's float32 norm of the
tensor converted, to the bit, and torch's ops wherever the probe finds the C pass adding otherwise."""
from __future__ import annotations

import math

import pytest
import torch

from adaptkit import registry


@pytest.fixture
def native():
    from adaptkit_plugins.merges import _norm

    if _norm.native is None:
        pytest.skip("_mix.c is not built here")
    return _norm.native


def bits(x: torch.Tensor):
    from adaptkit_plugins.merges._base import as_bits

    return as_bits(x).numpy()


def spread(shape, seed: int) -> torch.Tensor:
    """Values over twelve binades with full float32 mantissas (each square rounds), signs mixed."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * torch.exp2(torch.randint(-6, 6, shape, generator=g).float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_c_norm_is_torchs_norm_of_the_float32_tensor(native, dtype):
    # Written out: eight lanes, lane l adding x[8k + l]² (each square rounded) over the entries before the last
    # n mod 8; the lanes summed in order; the last entries four at a time rounded, then fused; then √.
    def written_out(x: torch.Tensor) -> float:
        v = x.float().reshape(-1)
        whole = len(v) - len(v) % 8
        lanes = torch.zeros(8)
        for k in range(0, whole, 8):
            lanes = lanes + v[k:k + 8] * v[k:k + 8]  # (torch's float32 ops: each rounded)
        total = lanes[0]
        for lane in lanes[1:]:
            total = total + lane
        tail = v[whole:]
        for j, value in enumerate(tail):
            if j < len(tail) // 4 * 4:
                total = total + value * value
            else:  # fused: exact in float64 (a float32 square has 48 bits), then rounded once
                total = torch.tensor(total.item() + value.item() ** 2, dtype=torch.float32)
        return torch.tensor(math.sqrt(total.item()), dtype=torch.float32).item()  # (√ correctly rounded)

    for seed, shape in enumerate([(1,), (7,), (8,), (10,), (12,), (13,), (14,), (15,), (27,), (255,), (257,), (1013,),
                                  (70001,), (33, 65), (3, 5, 7)]):
        x = spread(shape, seed).to(dtype)
        expected = torch.linalg.vector_norm(x.float()).item()
        assert native.norm(bits(x), str(dtype)[6:]) == expected, shape
        if x.numel() < 2000:
            assert written_out(x) == expected, shape
    assert native.norm(bits(torch.zeros(0, dtype=dtype)), str(dtype)[6:]) == 0.0
    for special in (math.inf, -math.inf, math.nan):
        x = spread((100,), 9).to(dtype)
        x[41] = special
        got, expected = native.norm(bits(x), str(dtype)[6:]), torch.linalg.vector_norm(x.float()).item()
        assert got == expected or (math.isnan(got) and math.isnan(expected)), special

def test_c_norm_refuses_bad_buffers_by_name(native):
    with pytest.raises(ValueError, match="norm: a buffer of whole entries"):
        native.norm(b"\x00\x01\x02", "bfloat16")
    with pytest.raises(ValueError, match="dtype bfloat16 or float32"):
        native.norm(b"\x00\x01", "float16")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("count", [2, 3, 5])
def test_karcher_with_c_norms_gives_the_torch_bytes(monkeypatch, native, dtype, count):
    from adaptkit_plugins.merges import _norm

    g = torch.Generator().manual_seed(count)
    base = torch.randn(61, 67, generator=g)
    tensors = [(base + torch.randn(61, 67, generator=g) * 0.3).to(dtype) for _ in range(count)]
    tensors[0][:5] = -0.0
    for max_iter, tol in ((0, 1e-5), (3, 1e-5), (12, 0.0)):
        calls = []
        with monkeypatch.context() as patch:
            patch.setattr(_norm.native, "norm", lambda *a, f=native.norm: calls.append(1) or f(*a))
            ours = registry.get("merge", "karcher").merge(tensors, max_iter=max_iter, tol=tol)
        with monkeypatch.context() as patch:
            patch.setattr(_norm, "native", None)
            _norm.exact.cache_clear()
            theirs = registry.get("merge", "karcher").merge(tensors, max_iter=max_iter, tol=tol)
        _norm.exact.cache_clear()
        assert torch.equal(ours.view(torch.int16 if dtype != torch.float32 else torch.int32),
                           theirs.view(torch.int16 if dtype != torch.float32 else torch.int32)), (max_iter, tol)
        assert bool(calls) == (dtype == torch.bfloat16)


def test_a_c_norm_that_adds_otherwise_is_not_used(monkeypatch, native):
    """The probe (`_norm.exact`) compares the C pass with torch before any use: one that sums in another order
    (here: plain float64) fails it, and karcher keeps torch's copies and norms."""
    from adaptkit_plugins.merges import _norm

    def other_order(buffer, dtype):
        x = torch.frombuffer(bytearray(buffer), dtype=getattr(torch, dtype)).double()
        return math.sqrt(float((x * x).sum()))

    with monkeypatch.context() as patch:
        patch.setattr(_norm.native, "norm", other_order)
        _norm.exact.cache_clear()
        try:
            assert not _norm.exact()
            assert _norm.float_norm(torch.ones(10, dtype=torch.bfloat16)) is None
        finally:
            _norm.exact.cache_clear()
    assert _norm.exact()
