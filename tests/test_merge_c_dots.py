"""karcher's dots of bf16 tensors in one C pass (`_mix.c`'s `dots`, `_norm.unit_dots`): ⟨m, R(x/n)⟩ summed as torch's
`dot` sums it on a CPU with AVX-512 BF16 (oneDNN's matmul: chunks of 512, each pair's odd entry first), to the bit,
and torch's ops wherever the probe finds the C pass adding otherwise or an operand is one it cannot promise."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from adaptkit import registry


@pytest.fixture
def norm_module():
    from adaptkit_plugins.merges import _norm

    if _norm.native is None:
        pytest.skip("_mix.c is not built here")
    yield _norm
    _norm.exact_dots.cache_clear()


def bits(x: torch.Tensor):
    from adaptkit_plugins.merges._base import as_bits

    return as_bits(x).numpy()


def unit(x: torch.Tensor, n: float) -> torch.Tensor:
    """karcher's unit vector: torch's division by the float32 norm (zeros for a zero norm)."""
    return torch.zeros_like(x) if n == 0 else torch.div(x, torch.tensor(n, dtype=torch.float32))


def written_out(m: torch.Tensor, x: torch.Tensor, n: float, chunk: int = 512, odd_first: bool = True) -> float:
    """The sum written out: chunks of `chunk` entries from the first, each summed from +0 in float32 pair after
    pair (the odd entry's product first), the chunks' sums added in turn (float32 numpy ops: each rounded; the
    products of two bf16 are exact). Other `chunk`s and orders are the ways the probe must tell apart."""
    products = m.float().numpy() * unit(x, n).float().numpy()
    chunk = min(chunk, len(products) + len(products) % 2)
    rows = np.zeros(math.ceil(len(products) / chunk) * chunk, dtype=np.float32)
    rows[:len(products)] = products  # (the +0s after the last entry add nothing: no sum here is −0)
    rows = rows.reshape(-1, chunk)
    sums = np.zeros(len(rows), dtype=np.float32)
    for k in range(0, chunk, 2):
        for column in ((k + 1, k) if odd_first else (k, k + 1)):
            sums = sums + rows[:, column]
    total = sums[0]
    for value in sums[1:]:
        total = np.float32(total + value)
    return float(total)


def as_bf16(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32).to(torch.bfloat16)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int16), b.view(torch.int16))


def probes(norm_module):
    """The probe's own pairs (`_norm.probe_pair`, as `exact_dots` makes them), with their divisors."""
    generator = torch.Generator().manual_seed(0)
    return [(*norm_module.probe_pair(length, divisor, generator), divisor)
            for length in norm_module.PROBE_LENGTHS for divisor in (1.0, 3.0)]


def test_c_dots_are_the_sum_written_out(norm_module):
    native = norm_module.native
    g = torch.Generator().manual_seed(5)
    pairs = probes(norm_module)[::3] + [
        ((torch.randn(n, generator=g) * 3).bfloat16(), torch.randn(n, generator=g).bfloat16(), d)
        for n, d in ((1, 1.0), (2, 2.0), (511, 3.0), (513, 7.0), (4096, 1.5), (8192 * 2 + 1, 0.0), (8192 * 3, 0.3))]
    for m, x, n in pairs:
        got = native.dots(bits(m), (bits(x),), (n,))
        assert got == (written_out(m, x, n),), (m.numel(), n)
    # several inputs in one call: each as alone, the mean's pairs shared
    m, x, _ = pairs[1]
    others = [x.flip(0).contiguous(), (x * 3).bfloat16(), x]
    assert native.dots(bits(m), tuple(bits(y) for y in others), (2.0, 5.0, 0.0)) == tuple(
        written_out(m, y, n) for y, n in zip(others, (2.0, 5.0, 0.0)))


def test_c_dots_are_torchs_dots_where_the_probe_passes(norm_module):
    if not norm_module.exact_dots():
        pytest.skip("torch's bf16 dot adds otherwise on this CPU (no AVX-512 BF16): the C dots stay unused")
    g = torch.Generator().manual_seed(11)
    for length in (4097, 8192 * 4 + 1023, 100_003):
        for divisor in (1.0, 0.7, 0.0):
            m, x = norm_module.probe_pair(length, divisor or 1.0, g)
            expected = torch.dot(m, unit(x, divisor))
            assert same(as_bf16(norm_module.native.dots(bits(m), (bits(x),), (divisor,))[0]), expected), length
            assert same(norm_module.unit_dots(m, [x], [torch.tensor(divisor)])[0], expected)


def test_the_probe_tells_each_other_order_apart(norm_module):
    """Each plausible other way of adding (other chunk sizes, one chunk, the even entry first) gives another bf16
    dot than the written-out sum on some of the probe's pairs; the written-out sum gives torch's on all of them
    where torch sums this way."""
    pairs = probes(norm_module)
    for chunk, odd_first in ((256, True), (1024, True), (2048, True), (1 << 30, True), (512, False)):
        assert any(not same(as_bf16(written_out(m, x, n, chunk, odd_first)), as_bf16(written_out(m, x, n)))
                   for m, x, n in pairs), (chunk, odd_first)
    if norm_module.exact_dots():
        for m, x, n in pairs:
            assert same(as_bf16(written_out(m, x, n)), torch.dot(m, unit(x, n)))


def test_operands_it_cannot_promise_are_left_to_torch(norm_module):
    """A nonzero operand below 2⁻⁵⁰ (oneDNN's instruction flushes subnormal products and sums), an inf or a NaN:
    None for that input only."""
    native = norm_module.native
    g = torch.Generator().manual_seed(2)
    m, x = torch.randn(9000, generator=g).bfloat16(), torch.randn(9000, generator=g).bfloat16()
    cases = {"tiny in the mean": (0, 1e-20, 1.0), "tiny in the unit vector": (1, 1e-20, 1.0),
             "a NaN": (0, math.nan, 1.0), "an inf": (1, math.inf, 1.0), "an overflowing unit": (1, 1e38, 1e-3),
             "tiny in the last chunk": (0, -1e-30, 1.0)}
    for name, (which, value, n) in cases.items():
        a, b = m.clone(), x.clone()
        (a if which == 0 else b)[8999 if "last" in name else 4100] = value
        got = native.dots(bits(a), (bits(b), bits(x)), (n, 1.0))
        assert got[0] is None, name
        assert (got[1] is None) == (which == 0), name
    # zeros and −0s are ordinary; a zero norm gives +0 (torch's dot with zeros)
    a = m.clone()
    a[:700] = -0.0
    a[900:1000] = 0.0
    assert native.dots(bits(a), (bits(x), bits(x)), (1.0, 0.0)) == (written_out(a, x, 1.0), 0.0)


def test_unit_dots_apply_only_where_they_are_torchs(norm_module, monkeypatch):
    monkeypatch.setattr(norm_module, "exact_dots", lambda: True)
    g = torch.Generator().manual_seed(3)
    m, x = torch.randn(6000, generator=g).bfloat16(), torch.randn(6000, generator=g).bfloat16()
    n = torch.tensor(2.0)
    assert norm_module.unit_dots(m.float(), [x.float()], [n]) is None  # float32: torch's own kernel
    assert norm_module.unit_dots(m[:4096], [x[:4096]], [n]) is None  # 4096 entries or fewer: another kernel
    assert norm_module.unit_dots(m[::2], [x[::2]], [n]) is None  # not contiguous
    assert norm_module.unit_dots(m, [x[:5000]], [n]) is None  # lengths differ
    assert norm_module.unit_dots(m, [x, x.float().bfloat16()], [n, n], threads=1) is not None
    x2 = x.clone()
    x2[10] = math.inf
    one = norm_module.unit_dots(m, [x, x2, (x * 2).bfloat16()], [n, n, n], threads=1)
    two = norm_module.unit_dots(m, [x, x2, (x * 2).bfloat16()], [n, n, n], threads=2)
    assert one[1] is None and two[1] is None
    assert all(same(a, b) and a.dtype == torch.bfloat16 and a.dim() == 0 for a, b in zip(one[::2], two[::2]))


@pytest.mark.parametrize("count", [2, 3, 5])
def test_karcher_with_c_dots_gives_the_torch_bytes(monkeypatch, norm_module, count):
    g = torch.Generator().manual_seed(count)
    base = torch.randn(97, 131, generator=g)
    tensors = [(base + torch.randn(97, 131, generator=g) * 0.3).bfloat16() for _ in range(count)]
    tensors[0][:5] = -0.0
    tensors[-1][7, 3] = 1e-25  # a tiny operand: that input's dots are torch's
    for max_iter, tol in ((0, 1e-5), (3, 1e-5), (12, 0.0)):
        calls = []
        with monkeypatch.context() as patch:
            patch.setattr(norm_module.native, "dots", lambda *a, f=norm_module.native.dots: calls.append(1) or f(*a))
            ours = registry.get("merge", "karcher").merge(tensors, max_iter=max_iter, tol=tol)
        with monkeypatch.context() as patch:
            patch.setattr(norm_module, "exact_dots", lambda: False)
            theirs = registry.get("merge", "karcher").merge(tensors, max_iter=max_iter, tol=tol)
        assert same(ours, theirs), (max_iter, tol)
        assert bool(calls) == (max_iter > 0 and norm_module.exact_dots())


def test_c_dots_that_add_otherwise_are_not_used(monkeypatch, norm_module):
    """The probe compares the C pass with torch before any use: one that adds in one chunk fails it, and karcher
    keeps torch's unit vectors and dots."""
    def one_chunk(mean, inputs, norms):
        m = torch.frombuffer(bytearray(mean), dtype=torch.bfloat16)
        return tuple(written_out(m, torch.frombuffer(bytearray(x), dtype=torch.bfloat16), n, 1 << 30)
                     for x, n in zip(inputs, norms))

    monkeypatch.setattr(norm_module.native, "dots", one_chunk)
    norm_module.exact_dots.cache_clear()
    assert not norm_module.exact_dots()
    assert norm_module.unit_dots(torch.ones(5000, dtype=torch.bfloat16), [torch.ones(5000, dtype=torch.bfloat16)],
                                 [torch.tensor(1.0)]) is None


def test_c_dots_refuse_bad_buffers_by_name(norm_module):
    native = norm_module.native
    two = bits(torch.ones(2, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="dots: a bf16 mean, and a norm an input"):
        native.dots(b"\x00\x01\x02", (two,), (1.0,))
    with pytest.raises(ValueError, match="dots: a bf16 mean, and a norm an input"):
        native.dots(two, (two, two), (1.0,))
    with pytest.raises(ValueError, match="buffers of different lengths"):
        native.dots(two, (bits(torch.ones(3, dtype=torch.bfloat16)),), (1.0,))
    with pytest.raises(ValueError, match="1 to 16 inputs"):
        native.dots(two, (two,) * 17, (1.0,) * 17)
    with pytest.raises(TypeError):
        native.dots(two, (two,), ("one",))
