"""Merge operators (tensor level): each against its paper's formula written out here, and against
mergekit's own implementation on the same inputs.

The formulas below are computed in float64 with plain torch, independently of the plugin code.
"""
from __future__ import annotations

import math
import warnings

import numpy
import pytest
import torch
from mergekit.merge_methods import registry as mk_registry
from mergekit.merge_methods.base import ParameterScope, TensorGroup
from mergekit.merge_methods.generalized_task_arithmetic import GeneralizedTaskArithmeticMerge
from mergekit.sparsify import SparsificationMethod
from torch.testing import assert_close

from adaptkit import registry
from adaptkit.errors import AdaptkitError
from adaptkit.spec import MergeMethod
from adaptkit_plugins.merges._draws import Draws

NAMES = ["linear", "average", "interpolate", "slerp", "task_arithmetic", "ties", "dare_linear",
         "dare_ties", "magnitude_prune", "breadcrumbs", "breadcrumbs_ties", "model_stock"]
TIGHT = dict(rtol=1e-5, atol=1e-6)


def op(name):
    return registry.get("merge", name)


def make(shape=(10, 20), count=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return [base + 0.1 * torch.randn(shape, generator=g) for _ in range(count)], base


def mergekit_method(name):
    if name == "magnitude_prune":  # not a mergekit method; its generalized class configured alike
        return GeneralizedTaskArithmeticMerge(
            consensus_method=None, sparsification_method=SparsificationMethod.magnitude,
            default_normalize=False, default_rescale=False, method_name="magnitude_prune",
            method_pretty_name=None, method_reference_url=None)
    return mk_registry.get(name)


def mergekit(name, tensors, base=None, **params):
    inputs = ([base] if base is not None else []) + list(tensors)
    group = TensorGroup.from_tensors(inputs, base_index=0 if base is not None else None)
    return mergekit_method(name)([group], parameters=params)[0]


def unpack(bits, start, count):
    """Entries start … start + count − 1 of a `pack`ed mask (little bit order), 0/1 as a flat uint8 tensor."""
    first, offset = start // 8, start % 8
    return torch.from_numpy(numpy.unpackbits(bits[first:(start + count + 7) // 8], count=offset + count,
                                             bitorder="little")[offset:])


def top_fraction(tau, density):
    """τ with all but its ⌊density·n⌋ (≥ 1) largest-magnitude entries zeroed (no ties in test data)."""
    flat = tau.reshape(-1)
    k = max(1, int(round(density * flat.numel(), 9)))
    order = torch.sort(flat.abs(), descending=True).indices
    kept = torch.zeros_like(flat)
    kept[order[:k]] = flat[order[:k]]
    return kept.reshape(tau.shape)


def disjoint_merge(deltas, weights, normalize):
    """TIES steps 2-3: elect the sign of Σ wᵢτᵢ, sum the agreeing wᵢτᵢ, divide by Σ of their wᵢ."""
    weighted = [w * d for w, d in zip(weights, deltas)]
    elected = torch.sign(sum(weighted))
    elected[elected == 0] = 1
    agree = [torch.sign(d) == elected for d in weighted]
    total = sum(d * a for d, a in zip(weighted, agree))
    if not normalize:
        return total
    count = sum(w * a.double() for w, a in zip(weights, agree))
    return total / torch.where(count == 0, torch.ones_like(count), count)


def f64(tensors, base=None):
    return [t.double() for t in tensors], (base.double() if base is not None else None)


# ---- the paper's formulas -------------------------------------------------------------------


def test_linear_average_interpolate_formulas():
    tensors, base = make()
    x, _ = f64(tensors)
    w = [0.2, 0.5, 0.7]
    soup = (w[0] * x[0] + w[1] * x[1] + w[2] * x[2]) / (w[0] + w[1] + w[2])
    assert_close(op("linear").merge(tensors, None, weight=w).double(), soup, **TIGHT)
    raw = w[0] * x[0] + w[1] * x[1] + w[2] * x[2]
    assert_close(op("linear").merge(tensors, base, weight=w, normalize=False).double(), raw, **TIGHT)
    assert_close(op("average").merge(tensors, None).double(), (x[0] + x[1] + x[2]) / 3, **TIGHT)
    alpha = 0.3
    wise = (1 - alpha) * x[0] + alpha * x[1]
    assert_close(op("interpolate").merge(tensors[:2], None, alpha=alpha).double(), wise, **TIGHT)
    wise_base = (1 - alpha) * base.double() + alpha * x[1]
    assert_close(op("interpolate").merge(tensors[1:2], base, alpha=alpha).double(), wise_base, **TIGHT)


def test_slerp_formula():
    (a, b), _ = make(count=2)
    t = 0.3
    x, y = a.double().reshape(-1), b.double().reshape(-1)
    omega = math.acos(float(x @ y / (x.norm() * y.norm())))
    expected = (math.sin((1 - t) * omega) * a.double() + math.sin(t * omega) * b.double()) / math.sin(omega)
    out = op("slerp").merge([a, b], None, t=t)
    assert out.dtype == torch.float32
    assert_close(out.double(), expected, **TIGHT)
    assert_close(op("slerp").merge([a, b], None, t=0.0), a, **TIGHT)
    assert_close(op("slerp").merge([a, b], None, t=1.0), b, **TIGHT)
    # Nearly parallel (cos Ω > 0.9995): plain lerp, as mergekit.
    c = a * 2 + 1e-4 * b
    assert_close(op("slerp").merge([a, c], None, t=t).double(), (1 - t) * a.double() + t * c.double(), **TIGHT)


def test_task_arithmetic_formula():
    tensors, base = make()
    x, b = f64(tensors, base)
    w, lam = [1.0, 0.5, -0.25], 0.8
    expected = b + lam * sum(wi * (xi - b) for wi, xi in zip(w, x))
    out = op("task_arithmetic").merge(tensors, base, weight=w, **{"lambda": lam})
    assert_close(out.double(), expected, **TIGHT)
    normalized = b + sum(wi * (xi - b) for wi, xi in zip(w, x)) / sum(w)
    assert_close(op("task_arithmetic").merge(tensors, base, weight=w, normalize=True).double(), normalized, **TIGHT)


@pytest.mark.parametrize("normalize", [True, False])
def test_ties_formula(normalize):
    tensors, base = make()
    x, b = f64(tensors, base)
    w, dens, lam = [1.0, 0.6, 0.8], [0.3, 0.5, 0.2], 1.2
    trimmed = [top_fraction(xi - b, d) for xi, d in zip(x, dens)]
    expected = b + lam * disjoint_merge(trimmed, w, normalize)
    out = op("ties").merge(tensors, base, weight=w, density=dens, normalize=normalize, **{"lambda": lam})
    assert_close(out.double(), expected, **TIGHT)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("k", [1, 13, 50, 97, 120, 199])
def test_magnitude_cut_over_blocks_keeps_ties_lowest_index_first(monkeypatch, k, dtype):
    """The radix select over blocks keeps exactly the k largest; at the threshold, ties are kept in
    flat order — checked with blocks far smaller than the tensor, values full of ties over several
    binades, an infinity, and the blocks left as they were given (half types: one 15-bit pass)."""
    from adaptkit_plugins.merges import _select

    monkeypatch.setattr(_select, "BLOCK", 16)
    g = torch.Generator().manual_seed(3)
    magnitude = torch.randint(0, 6, (200,), generator=g).float() * 0.25 * 2.0 ** torch.randint(-3, 4, (200,), generator=g)
    magnitude[7] = float("inf")
    magnitude = magnitude.to(dtype)
    given = magnitude.clone()
    cut = _select.top_cut(lambda s, e: magnitude[s:e], magnitude.numel(), k)
    assert torch.equal(magnitude, given)
    ours = torch.cat([cut.mask(magnitude[s:e], s) for s, e in _select.block_ranges(200)]).float()
    order = sorted(range(200), key=lambda i: (-magnitude[i].item(), i))  # stable: lower index first
    expected = torch.zeros(200)
    expected[order[:k]] = 1
    assert torch.equal(ours, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("threads", [1, 2])
def test_magnitude_cut_counts_ties_exactly_in_whole_blocks(threads, dtype):
    """More ties in one block than a half type counts exactly (100001 entries at the threshold): the
    cut still keeps exactly k, the tied ones lowest index first, on any thread count."""
    from adaptkit_plugins.merges import _select

    g = torch.Generator().manual_seed(4)
    n = 600_000
    magnitude = torch.rand(n, generator=g).to(dtype)
    ties = torch.randperm(n, generator=g)[:100_001]
    magnitude[ties] = 0.5
    k = int((magnitude > 0.5).sum()) + 76_543
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cut = _select.top_cut(lambda s, e: magnitude[s:e], n, k)
        ours = torch.cat([cut.mask(magnitude[s:e], s) for s, e in _select.block_ranges(n)])
    finally:
        torch.set_num_threads(before)
    expected = torch.zeros(n, dtype=dtype)
    expected[torch.argsort(-magnitude.float(), stable=True)[:k]] = 1
    assert int(ours.sum(dtype=torch.int64)) == k and torch.equal(ours, expected)


def sorted_range_mask(values: torch.Tensor, descending: bool, lo: int, hi: int) -> torch.Tensor:
    """mergekit's choice (sparsify.magnitude, breadcrumbs): the entries `argsort(|τ|.float())` puts in
    places [lo, hi), as a bool mask."""
    order = torch.argsort(values.abs().float(), descending=descending)[lo:hi]
    return torch.zeros(values.numel(), dtype=torch.bool).index_fill_(0, order, True)


@pytest.fixture(params=["C", "C-scalar", "numpy"])
def walk(request, monkeypatch):
    """Both walks along torch's sort: the C loops (`_follow.c`, built by the install; its stops found
    with AVX2 where the CPU has it, else by a scalar loop) and numpy's, which runs where no compiler built
    them; each must keep what torch keeps."""
    from adaptkit_plugins.merges import _select

    if request.param.startswith("C") and _select.native is None:
        pytest.skip("the C walk is not built here (no C compiler at install)")
    if request.param == "numpy":
        monkeypatch.setattr(_select, "native", None)
    if request.param == "C-scalar":
        was = _select.native.vectors(False)
        yield request.param
        _select.native.vectors(was)
        return
    yield request.param


def test_the_c_walk_is_built_where_a_compiler_is():
    """The install compiles `_follow.c` and `_mix.c` wherever a C compiler is found (it is optional: without one, numpy
    walks), so a build that silently failed here is caught."""
    import shutil
    import sysconfig

    from adaptkit_plugins.merges import _mixing, _select

    if not shutil.which(sysconfig.get_config_var("CC").split()[0]):
        pytest.skip("no C compiler")
    assert _select.native is not None and _mixing.native is not None


def test_the_c_walk_refuses_an_incomplete_origin():
    """An entry of a followed key missing from `origin` is an error, never a write past the runs."""
    from adaptkit_plugins.merges import _select

    if _select.native is None:
        pytest.skip("the C walk is not built here")
    keys = numpy.random.default_rng(0).integers(0, 5, 5000).astype(numpy.int16)
    for missing in (0, -1):  # (the last one is still in place when the segment's numbers go beside its keys)
        origin = numpy.delete(numpy.flatnonzero(keys == 2), missing)
        with pytest.raises(RuntimeError, match="not found"):
            _select.native.walk(keys.copy(), 0, 2500, 16, (2,), origin, numpy.empty(origin.size, dtype=numpy.uint8),
                                numpy.empty(2500, dtype=numpy.int32))
    with pytest.raises(ValueError, match="int16 or int32"):
        _select.native.walk(keys.astype(numpy.int64), 0, 2500, 16, (2,), origin, numpy.empty(origin.size, numpy.uint8),
                            numpy.empty(2500, dtype=numpy.int32))


def test_scratch_memory_is_handed_out_again_only_within_reusing():
    """The selections of one tensor's inputs share their keys' and walk numbers' memory (`_introsort.reusing`):
    the same memory for a name again where it fits, a bigger one where not, nothing shared outside the block."""
    from adaptkit_plugins.merges._introsort import reusing, scratch

    assert not numpy.shares_memory(scratch("x", 1000, numpy.int32), scratch("x", 1000, numpy.int32))
    with reusing():
        first = scratch("x", 1000, numpy.int32)
        assert first.dtype == numpy.int32 and first.size == 1000
        assert numpy.shares_memory(first, scratch("x", 2000, numpy.int16))
        assert not numpy.shares_memory(first, scratch("y", 1000, numpy.int32))
        with reusing():  # (an inner block keeps the outer one's memory)
            assert numpy.shares_memory(first, scratch("x", 10, numpy.int32))
        bigger = scratch("x", 2000, numpy.int32)
        assert bigger.size == 2000 and not numpy.shares_memory(first, bigger)
    assert not numpy.shares_memory(bigger, scratch("x", 10, numpy.int32))


def sorted_range_kept(tau: torch.Tensor, descending: bool, lo: int, hi: int, block: int = 30_000) -> torch.Tensor:
    """τ with the entries `_sparsify._sorted_range` drops set to +0, applied block by block, as the merge
    applies it; its bits compare with mergekit's choice (`kept_bits`)."""
    from adaptkit_plugins.merges._sparsify import Keep, _sorted_range

    n = tau.numel()
    keep = object.__new__(Keep)  # (Keep.apply, with the range asked for)
    keep.method, keep.whole = "magnitude", _sorted_range(lambda s, e: tau[s:e].clone(), n, descending, lo, hi)
    return torch.cat([keep.apply(s, tau[s:s + block].clone()) for s in range(0, n, block)])


def kept_bits(tau: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """τ where `mask`, else +0, as integers (NaN compares)."""
    return torch.where(mask, tau, torch.zeros((), dtype=tau.dtype)).view({2: torch.int16, 4: torch.int32,
                                                                         8: torch.int64}[tau.element_size()])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("descending", [True, False])
@pytest.mark.parametrize("nan", [False, True])
def test_magnitudes_cut_where_mergekits_sort_cuts(walk, dtype, descending, nan):
    """`_sparsify._sorted_range` keeps the entries mergekit's torch.argsort of a float32 |τ| puts in
    the range, ties at both ends included (thousands of them; a stable sort would keep others), with
    |τ| as integer keys (bf16/fp16 as int16, float32 as int32, NaN after +inf; float64 rounded to
    float32 first, as mergekit's copy is) followed through the sort's partitions (`_introsort`)
    instead of sorted."""
    from adaptkit_plugins.merges._introsort import follows_torch

    assert follows_torch()  # the pinned torch: the partitions are followed, not the fallback sort
    tau = (torch.randn(200_000, generator=torch.Generator().manual_seed(5)) * 1e-3).to(dtype)
    if dtype in (torch.float32, torch.float64):
        tau = tau.bfloat16().to(dtype)  # float32 or float64 values with ties
        tau[::3] += 1e-12  # float64 ties only in float32 (mergekit's copy)
    if nan:
        tau[[7, 70_000, 150_000]] = float("nan")
    assert tau.abs().unique().numel() < 20_000
    n = tau.numel()
    for lo, hi in ((0, n // 2), (n // 10, n // 10 + n // 3), (0, 1), (n - 5, n)):
        expected = kept_bits(tau, sorted_range_mask(tau, descending, lo, hi))
        got = sorted_range_kept(tau, descending, lo, hi)
        assert torch.equal(got.view(expected.dtype), expected), (lo, hi)
    stable = torch.zeros(n, dtype=torch.bool)
    stable[torch.argsort(tau.abs().float(), descending=descending, stable=True)[: n // 2]] = True
    assert not torch.equal(stable, sorted_range_mask(tau, descending, 0, n // 2))  # ties decide


@pytest.mark.parametrize("descending", [True, False])
def test_keys_made_from_the_models_are_torchs_magnitudes_and_their_histogram(walk, descending):
    """`_mixing.magnitude_keys` (one C pass from a `TaskVector`'s bf16 models) gives `keys_of`'s keys of torch's
    R(model − base) magnitudes and `histogram16`'s counts, NaN and ±inf included, and takes nothing else; the
    tied entries' places (`_introsort.tied_places`: AVX2, scalar or numpy) are numpy's."""
    from adaptkit_plugins.merges import _introsort, _mixing
    from adaptkit_plugins.merges._select import histogram16

    g = torch.Generator().manual_seed(3)
    base = (torch.randn(70_001, generator=g) * 1e-2).bfloat16()
    model = (base.float() + torch.randn(70_001, generator=g) * 1e-3).bfloat16()
    model[[5, 9, 11]] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=torch.bfloat16)
    base[[11, 13]] = torch.tensor([-float("inf"), float("inf")], dtype=torch.bfloat16)
    tau = _mixing.TaskVector(model, base, torch.bfloat16)
    expected = _introsort.keys_of(tau(0, model.numel()).abs_(), descending)
    out = torch.empty_like(model)
    counts = _mixing.magnitude_keys(tau, out, descending)
    if _mixing.native is None:
        assert counts is None
        return
    assert torch.equal(out.view(torch.int16), expected) and torch.equal(counts, histogram16([expected]))
    keys = expected.numpy()
    sign = 1 if descending else -1  # (NaN and −inf − (−inf) after +inf; inf − x and x − inf +inf's)
    assert keys[[5, 11]].tolist() == [sign * 0x7F81] * 2 and keys[[9, 13]].tolist() == [sign * 0x7F80] * 2
    for tied in ([int(keys[100])], [int(keys[100]), int(keys[200])], [int(keys[5])]):
        assert numpy.array_equal(_introsort.tied_places(keys, tied, counts), numpy.flatnonzero(numpy.isin(keys, tied)))
    as_float = _mixing.TaskVector(model.float(), base.float(), torch.float32)
    assert _mixing.magnitude_keys(as_float, torch.empty(model.shape), descending) is None


@pytest.mark.parametrize("shape", ["equal", "two values", "sorted", "reversed", "distinct", "ties"])
@pytest.mark.parametrize(("n", "window"), [(n, None) for n in (0, 1, 16, 17, 18, 40, 1000, 70_000)]
                         + [(n, 7) for n in (17, 40, 1000, 5000)])
def test_introsort_ranges_match_torchs_sort(walk, monkeypatch, shape, n, window):
    """`_introsort.kept_range` against torch's own sort on the inputs that stress a partition: all
    equal (every entry stops both scans), two values, sorted, reversed, distinct and many ties;
    segments at and around the 16 entries left to the final insertion sort; ranges at either end and
    inside; stops scanned in the default windows and in windows of 7 (pairs across many windows)."""
    from adaptkit_plugins.merges import _walk
    from adaptkit_plugins.merges._introsort import kept_range

    if window:
        monkeypatch.setattr(_walk, "WINDOW", window)

    g = torch.Generator().manual_seed(n)
    values = {"equal": torch.zeros(n), "two values": torch.randint(0, 2, (n,), generator=g).float(),
              "sorted": torch.randint(0, 900, (n,), generator=g).sort().values.float(),
              "reversed": torch.randint(0, 900, (n,), generator=g).sort(descending=True).values.float(),
              "distinct": torch.randperm(n, generator=g).float(),
              "ties": torch.randint(0, 40, (n,), generator=g).float()}[shape]
    keys = values.view(torch.int32).numpy()
    for descending in (True, False):
        for lo, hi in ((0, n // 2), (n // 3, n), (n // 4, 3 * n // 4), (0, n), (n - 1, n)):
            if 0 <= lo <= hi:
                kept = kept_range(keys.copy() if descending else -keys, lo, hi)
                expected = sorted_range_mask(values, descending, lo, hi)
                assert torch.equal(torch.from_numpy(kept), expected), (descending, lo, hi)


def test_a_heapsorted_segment_falls_back_to_mergekits_sort(walk):
    """An organ pipe spends the sort's depth budget, so torch heapsorts the segments that decide:
    `kept_range` says None and `_sorted_range` sorts as mergekit does, with its bytes."""
    from adaptkit_plugins.merges._introsort import kept_range
    from adaptkit_plugins.merges._sparsify import _sorted_range

    values = torch.cat([torch.arange(500), torch.arange(500).flip(0)]).float()
    assert kept_range(values.view(torch.int32).numpy().copy(), 0, 501) is None  # (the two 249s straddle the cut)
    assert isinstance(_sorted_range(lambda s, e: values[s:e].clone(), 1000, True, 0, 501), numpy.ndarray)
    got = sorted_range_kept(values, True, 0, 501)
    assert torch.equal(got.view(torch.int32), kept_bits(values, sorted_range_mask(values, True, 0, 501)))
    # a cut between two values decides without the sort's moves: heapsorted or not, the top 500
    assert torch.equal(torch.from_numpy(kept_range(values.view(torch.int32).numpy().copy(), 0, 500)),
                       sorted_range_mask(values, True, 0, 500))


def test_another_torchs_sort_is_run_as_mergekit_runs_it(monkeypatch):
    """Where `follows_torch` finds that torch's sort and topk are not the introsort followed here (another
    build), TIES' and SCE's mergekit cuts run torch's own, with mergekit's choice, and the memory count
    says so: a bool mask, a float32 copy, its sorted values, the int64 order and range (25 B an entry) for
    a byte of followed ties and 2 of the C walk's numbers."""
    from adaptkit_plugins.merges import _introsort
    from adaptkit_plugins.merges._sparsify import held_bytes
    from adaptkit_plugins.merges.sce import select_mask

    followed = held_bytes("magnitude", 3, 2, "mergekit")
    monkeypatch.setattr(_introsort, "follows_torch", lambda: False)
    monkeypatch.setattr(_introsort, "kept_range", lambda *a, **k: pytest.fail("followed the sort"))
    assert held_bytes("magnitude", 3, 2, "mergekit") == followed + 22
    tau = (torch.randn(50_000, generator=torch.Generator().manual_seed(2)) * 1e-3).bfloat16()
    got = sorted_range_kept(tau, True, 0, 20_000)
    assert torch.equal(got.view(torch.int16), kept_bits(tau, sorted_range_mask(tau, True, 0, 20_000)))
    tvs = tau.view(2, -1)
    var = torch.var(tvs, dim=0, unbiased=False)
    kept = torch.topk(var, int(var.count_nonzero() * 0.4)).indices  # mergekit's sce_mask
    expected = torch.zeros(var.numel(), dtype=tau.dtype).index_fill_(0, kept, 1)
    assert torch.equal(select_mask(lambda s, e: tvs[:, s:e], [(0, var.numel())], 0.4, tau.dtype), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("fraction", [0.01, 0.4])  # torch.topk's partial sort (k·64 ≤ n) and its nth_element
def test_topk_of_bits_keeps_the_floats_ties(dtype, fraction):
    """SCE's mergekit cut: torch.topk of the variances' bits (`_introsort.keys_of`), unsorted, keeps the
    same positions as mergekit's torch.topk of the variances, ties included (thousands of them here),
    and with a NaN (every NaN one key, after +inf, as topk ranks NaN first)."""
    from adaptkit_plugins.merges._introsort import keys_of

    var = ((torch.randn(300_000, generator=torch.Generator().manual_seed(9)) * 1e-2) ** 2).to(dtype)
    if dtype == torch.float32:
        var = var.bfloat16().float()
    k = int(var.numel() * fraction)
    assert not keys_of(var.clone()).is_floating_point() and var.unique().numel() < 30_000
    assert torch.equal(torch.topk(keys_of(var.clone()), k).indices, torch.topk(var, k).indices)
    unsorted = torch.topk(keys_of(var.clone()), k, sorted=False).indices
    assert torch.equal(unsorted.sort().values, torch.topk(var, k).indices.sort().values)
    var[[5, 70_000]] = float("nan")
    unsorted = torch.topk(keys_of(var.clone()), k, sorted=False).indices
    assert torch.equal(unsorted.sort().values, torch.topk(var, k).indices.sort().values)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("fraction", [0.9, 0.4, 0.02, 0.01])
def test_sce_selects_what_mergekits_topk_selects(walk, monkeypatch, dtype, fraction):
    """SCE's mergekit cut (`sce.select_mask`) keeps the positions mergekit's sce_mask keeps,
    `torch.topk(var.abs(), k)` of the variances, ties included (thousands here): for k > n/64
    (0.9, 0.4, 0.02) by following topk's std::nth_element (`_introsort`, no topk runs), below that
    (0.01) by topk's partial sort itself."""
    from adaptkit_plugins.merges._introsort import follows_torch
    from adaptkit_plugins.merges.sce import select_mask

    assert follows_torch()  # (its one check of torch runs topk)
    n = 200_000
    tvs = (torch.randn(3, n, generator=torch.Generator().manual_seed(3)) * 1e-2).round(decimals=3).to(dtype)
    var = torch.var(tvs, dim=0, unbiased=False)  # mergekit's sce_mask, written out
    k = int(torch.count_nonzero(var) * fraction)
    expected = torch.zeros(n, dtype=dtype).index_fill_(0, torch.topk(var.abs(), k=k, largest=True).indices, 1)
    assert var.unique().numel() < 5_000
    if k * 64 > n:
        monkeypatch.setattr(torch, "topk", lambda *a, **kw: pytest.fail("ran topk"))
    got = select_mask(lambda s, e: tvs[:, s:e], [(0, n // 2), (n // 2, n)], fraction, dtype)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("name", ["ties", "magnitude_prune", "breadcrumbs", "breadcrumbs_ties"])
def test_tie_break_index_keeps_tied_entries_lowest_index_first_without_sorting(monkeypatch, name):
    """tie_break: index — of the entries tied at the cut, the first in flat order are kept (written
    out below for TIES' and magnitude pruning's top cut); no whole-tensor sort runs; and on data
    without ties it gives the default's (mergekit's) bytes."""
    g = torch.Generator().manual_seed(11)
    base = torch.zeros(40, 30)
    tensors = [torch.randint(-3, 4, (40, 30), generator=g).float() * 0.5 for _ in range(2)]  # 7 values: ties
    params = {"weight": [0.6, 0.4], "density": [0.5, 0.3]} | ({"gamma": [0.1, 0.1]} if "breadcrumbs" in name else {})
    with monkeypatch.context() as m:
        m.setattr(torch, "argsort", lambda *a, **k: pytest.fail("sorted the whole tensor"))
        m.setattr(torch, "sort", lambda *a, **k: pytest.fail("sorted the whole tensor"))
        out = op(name).merge(tensors, base.clone(), **params, tie_break="index")
    if name in ("ties", "magnitude_prune"):
        def first_by_index(tau, density):
            flat = tau.reshape(-1)
            k = max(1, int(density * flat.numel()))
            order = sorted(range(flat.numel()), key=lambda i: (-abs(flat[i].item()), i))
            kept = torch.zeros_like(flat)
            kept[order[:k]] = flat[order[:k]]
            return kept.view(tau.shape)

        trimmed = [first_by_index(t - base, d) for t, d in zip(tensors, params["density"])]
        expected = (base + disjoint_merge(trimmed, params["weight"], True) if name == "ties"
                    else base + sum(w * t for w, t in zip(params["weight"], trimmed)))
        assert torch.equal(out, expected.float())
    plain, _ = make((40, 30), count=2, seed=12)  # continuous values: no ties, so no difference
    assert torch.equal(op(name).merge(plain, base, **params, tie_break="index"), op(name).merge(plain, base, **params))


def test_tie_break_values_are_checked():
    tensors, base = make(count=2)
    with pytest.raises(AdaptkitError, match="tie_break must be 'mergekit'"):
        op("ties").merge(tensors, base, weight=[1, 1], density=[0.5, 0.5], tie_break="random")
    with pytest.raises(AdaptkitError, match="tie_break"):  # only methods with a magnitude cut have it
        op("dare_ties").merge(tensors, base, weight=[1, 1], density=[0.5, 0.5], tie_break="index",
                              generators=[torch.Generator(), torch.Generator()])


def test_magnitude_prune_formula():
    tensors, base = make()
    x, b = f64(tensors, base)
    w, dens = [0.5, 1.0, 0.3], [0.1, 0.35, 0.5]
    expected = b + sum(wi * top_fraction(xi - b, d) for wi, xi, d in zip(w, x, dens))
    assert_close(op("magnitude_prune").merge(tensors, base, weight=w, density=dens).double(), expected, **TIGHT)


def breadcrumbs_mask(tau, density, gamma):
    """Breadcrumbs: rank |τ| ascending; drop the ⌊γn⌋ largest and the smallest, ⌊density·n⌋ kept."""
    n = tau.numel()
    keep, top = int(round(density * n, 9)), int(round(gamma * n, 9))
    bottom = max(0, n - keep - top)
    ranks = torch.empty(n, dtype=torch.long)
    ranks[torch.argsort(tau.abs().reshape(-1))] = torch.arange(n)
    return ((ranks >= bottom) & (ranks < bottom + keep)).reshape(tau.shape)


@pytest.mark.parametrize("name", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs_formula(name):
    tensors, base = make()
    x, b = f64(tensors, base)
    w, dens, gammas = [1.0, 0.7, 0.4], [0.5, 0.3, 0.9], [0.05, 0.1, 0.2]
    kept = [(xi - b) * breadcrumbs_mask(xi - b, d, g) for xi, d, g in zip(x, dens, gammas)]
    assert (kept[0] != 0).sum() == 100 and (kept[2] != 0).sum() == 180
    if name == "breadcrumbs":
        expected = b + sum(wi * k for wi, k in zip(w, kept))
    else:
        expected = b + disjoint_merge(kept, w, normalize=False)
    out = op(name).merge(tensors, base, weight=w, density=dens, gamma=gammas)
    assert_close(out.double(), expected, **TIGHT)


def seeded(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def dare_masks(tensors, base, dens, seeds):
    """Each input's keep mask, read off a single-input dare_linear run on its own generator."""
    masks = []
    for t, d, s in zip(tensors, dens, seeds):
        out = op("dare_linear").merge([t], base, weight=1.0, density=d, rescale=False, generators=seeded(s))
        masks.append((out - base) != 0)
    return masks


# rescale: (id, value, τ' from mask m, task vector τ and density d): mergekit's default, then the paper's
RESCALES = [("true: L1 norm matched (mergekit)", True, lambda m, t, d: m * t * t.abs().sum() / (m * t).abs().sum()),
            ("inverse: ÷ density (the DARE paper)", "inverse", lambda m, t, d: m * t / d)]


@pytest.mark.parametrize("rescale,kept", [r[1:] for r in RESCALES], ids=[r[0] for r in RESCALES])
@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_dare_formula(name, rescale, kept):
    tensors, base = make(shape=(40, 50))
    x, b = f64(tensors, base)
    w, dens, seeds = [1.0, 0.5, 0.8], [0.3, 0.5, 0.9], [11, 12, 13]
    masks = dare_masks(tensors, base, dens, seeds)
    for m, d in zip(masks, dens):  # Bernoulli(density) keep rate, within 4 standard deviations
        assert abs(m.double().mean().item() - d) < 4 * math.sqrt(d * (1 - d) / m.numel())
    rescaled = [kept(m, xi - b, d) for m, xi, d in zip(masks, x, dens)]
    if name == "dare_linear":
        expected = b + sum(wi * r for wi, r in zip(w, rescaled))
    else:
        expected = b + disjoint_merge(rescaled, w, normalize=False)
    out = op(name).merge(tensors, base, weight=w, density=dens, rescale=rescale, generators=seeded(*seeds))
    assert_close(out.double(), expected, **TIGHT)
    if rescale is True:  # the default, as in mergekit
        assert torch.equal(op(name).merge(tensors, base, weight=w, density=dens, generators=seeded(*seeds)), out)


@pytest.mark.parametrize("shape", [(10, 20), (30,)])
def test_model_stock_formula(shape):
    tensors, base = make(shape=shape)
    x, b = f64(tensors, base)
    n = len(x)
    taus = [(xi - b).reshape(-1) for xi in x]
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    cos = sum(float(taus[i] @ taus[j] / (taus[i].norm() * taus[j].norm())) for i, j in pairs) / len(pairs)
    t = n * cos / (1 + (n - 1) * cos)
    expected = t * sum(x) / n + (1 - t) * b
    assert_close(op("model_stock").merge(tensors, base).double(), expected, **TIGHT)


# ---- against mergekit ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["linear", "slerp", "model_stock", "task_arithmetic", "ties",
                                  "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties"])
def test_params_match_mergekit(name):
    """mergekit's parameters with its defaults, plus adaptkit's documented additions (with defaults
    that give mergekit's result), less those mergekit's method takes and never reads (task_arithmetic's
    density and rescale: a recipe giving them gets a warning)."""
    spec = mk_registry.get(name).spec
    unread = {"density", "rescale"} if name == "task_arithmetic" else set()
    theirs = {p.name: (None if p.required else p.default) for p in spec.parameters if p.name not in unread}
    additions = {"tie_break": "mergekit"} if name in ("ties", "breadcrumbs", "breadcrumbs_ties") else {}
    assert dict(op(name).params) == theirs | additions
    assert op(name).per_model == {p.name for p in spec.parameters if p.scope != ParameterScope.SHARED} - unread


@pytest.mark.parametrize("normalize", [True, False])
def test_linear_matches_mergekit(normalize):
    tensors, _ = make()
    w = [0.2, 0.5, 0.7]
    assert_close(op("linear").merge(tensors, None, weight=w, normalize=normalize),
                 mergekit("linear", tensors, weight=w, normalize=normalize), **TIGHT)


@pytest.mark.parametrize("case", ["generic", "parallel", "antiparallel", "zero"])
def test_slerp_matches_mergekit(case):
    (a, b), _ = make(count=2)
    b = {"generic": b, "parallel": 3 * a + 1e-5 * b, "antiparallel": -a, "zero": torch.zeros_like(a)}[case]
    for t in (0.0, 0.25, 0.6, 1.0):
        assert_close(op("slerp").merge([a, b], None, t=t), mergekit("slerp", [b], a, t=t), **TIGHT)
        assert_close(op("slerp").merge([b], a, t=t), mergekit("slerp", [b], a, t=t), **TIGHT)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_slerp_gives_mergekits_bytes_over_chunks(monkeypatch, dtype):
    """Norms and cos Ω summed over several of mergekit's chunks (each converted to float32): its bytes."""
    import mergekit.merge_methods.slerp as theirs

    from adaptkit_plugins.merges import slerp as ours

    monkeypatch.setattr(ours, "CHUNK", 64)
    monkeypatch.setattr(theirs, "_CHUNK_ELEMENTS", 64)
    (a, b), _ = make(shape=(10, 37), count=2, seed=3)
    a, b = a.to(dtype), b.to(dtype)
    for t in (0.25, 0.6):
        merged, expected = op("slerp").merge([a, b], None, t=t), mergekit("slerp", [b], a, t=t)
        assert merged.dtype == expected.dtype == dtype and torch.equal(merged, expected)


@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("shape", [(10, 20), (30,), (4, 5, 6)])
def test_model_stock_matches_mergekit(filter_wise, shape):
    tensors, base = make(shape=shape, count=4)
    ours = op("model_stock").merge(tensors, base, filter_wise=filter_wise)
    assert_close(ours, mergekit("model_stock", tensors, base, filter_wise=filter_wise), **TIGHT)


@pytest.mark.parametrize("count", [2, 3, 4, 5])
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_gives_mergekits_bytes_for_any_number_of_models(count, filter_wise):
    """Up to three models each offset is made once and kept, the products overwriting offsets at their
    last use and the result made in a buffer they left free; with more, the offsets are made again in
    two buffers. Either way mergekit's bf16 bytes."""
    tensors, base = make(shape=(24, 40), count=count, seed=count)
    tensors, base = [t.bfloat16() for t in tensors], base.bfloat16()
    ours = op("model_stock").merge(tensors, base, filter_wise=filter_wise)
    theirs = mergekit("model_stock", tensors, base, filter_wise=filter_wise)
    assert ours.dtype == theirs.dtype == torch.bfloat16 and torch.equal(ours, theirs)


GTA_CASES = [
    ("task_arithmetic", {"weight": [1.0, 0.5, -0.3], "lambda": 0.7}),
    ("task_arithmetic", {"weight": [1.0, 0.5, 0.3], "normalize": True}),
    ("ties", {"weight": [1.0, 0.6, 0.8], "density": [0.3, 0.5, 1.0]}),
    ("ties", {"weight": [1.0, 0.6, 0.8], "density": 0.25, "normalize": False, "lambda": 1.5}),
    ("magnitude_prune", {"weight": [0.5, 1.0, 0.3], "density": [0.1, 0.35, 0.5]}),
    ("breadcrumbs", {"weight": [1.0, 0.7, 0.4], "density": [0.5, 0.3, 0.9], "gamma": [0.05, 0.1, 0.2]}),
    ("breadcrumbs", {"weight": 1.0, "density": 0.5}),
    ("breadcrumbs_ties", {"weight": [1.0, 0.7, 0.4], "density": 0.5, "gamma": 0.1, "normalize": True}),
    # weights summing to zero with normalize: mergekit's divisor under 1e-8 counts as 1 (ties: each entry's own)
    ("task_arithmetic", {"weight": [1.0, -1.0, 0.0], "normalize": True}),
    ("ties", {"weight": [1.0, -0.5, -0.5], "density": 0.5}),
    ("breadcrumbs_ties", {"weight": [0.5, -0.5, 0.0], "density": 0.6, "gamma": 0.1, "normalize": True}),
]


@pytest.mark.parametrize(("name", "params"), GTA_CASES)
def test_task_arithmetic_family_matches_mergekit(name, params):
    tensors, base = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (weights summing to zero: `test_weights_summing_to_zero_...`)
        ours = op(name).merge(tensors, base, **params)
    assert_close(ours, mergekit(name, tensors, base, **params), **TIGHT)


def test_weights_summing_to_zero_divide_by_one_as_mergekit():
    """With normalize, Σᵢ wᵢ = 0 leaves the sum undivided (a warning says so); with TIES' consensus the
    divisor is each entry's Σᵢ mᵢ·wᵢ, and only where that is 0 is it 1 (no warning: the weights' sum is
    not what divides)."""
    tensors, base = make()
    x, b = f64(tensors, base)
    w = [1.0, -1.0, 0.0]
    with pytest.warns(UserWarning, match="task_arithmetic: weights summing to zero with normalize: the sum is not divided"):
        out = op("task_arithmetic").merge(tensors, base, weight=w, normalize=True)
    assert_close(out.double(), b + sum(wi * (xi - b) for wi, xi in zip(w, x)), **TIGHT)
    w, dens = [1.0, -0.5, -0.5], [0.5, 0.5, 0.5]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = op("ties").merge(tensors, base, weight=w, density=dens)
    expected = b + disjoint_merge([top_fraction(xi - b, d) for xi, d in zip(x, dens)], w, True)
    assert_close(out.double(), expected, **TIGHT)


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_dare_l1_matches_mergekit_given_the_same_masks(monkeypatch, name):
    """mergekit draws each input's mask with torch.bernoulli(full(shape, density)) from the global
    generator; handed our masks instead, it gives our merge (default rescale: true, its L1 match)."""
    tensors, base = make(shape=(30, 40))
    params = {"weight": [1.0, 0.5, 0.8], "density": [0.3, 1.0, 0.6]}
    seeds = [11, 12, 13]
    ours = op(name).merge(tensors, base, generators=seeded(*seeds), **params)
    masks = iter([m.float() for m, d in zip(dare_masks(tensors, base, params["density"], seeds), params["density"])
                  if d < 1])
    seen = []

    def bernoulli(p, *args, **kwargs):
        seen.append(p)
        return next(masks)

    monkeypatch.setattr(torch, "bernoulli", bernoulli)
    theirs = mergekit(name, tensors, base, rescale=True, **params)
    monkeypatch.undo()
    assert len(seen) == 2 and [float(p.unique()) for p in seen] == pytest.approx([0.3, 0.6])
    assert_close(ours, theirs, **TIGHT)
    assert torch.equal(ours == base, theirs == base)
    again = op(name).merge(tensors, base, rescale="l1", generators=seeded(*seeds), **params)
    assert torch.equal(again, ours)  # `l1` is the same rule written out
    # `inverse` (the paper's 1/density) is not mergekit's L1 matching.
    paper = op(name).merge(tensors, base, rescale="inverse", generators=seeded(*seeds), **params)
    assert not torch.allclose(paper, theirs)


def drawn(draws, start: int, count: int, p: float) -> torch.Tensor:
    """A block's DARE mask as 0/1 bytes (`Draws.below` gives it as bits)."""
    return unpack(draws.below(start, count, p), 0, count)


def test_dare_masks_keep_density_and_depend_only_on_the_generator():
    """The masks (`_draws.Draws`): kept fraction ≈ density (binomial: within 5σ), the same for
    the same generator seed, different for another, and the same block's mask again on a later
    pass (replayed from its bits, not drawn anew)."""
    n = 1 << 20
    for density in (0.1, 0.5, 0.9):
        draws = Draws(torch.Generator().manual_seed(3))
        first = drawn(draws, 0, n, density)
        sigma = (n * density * (1 - density)) ** 0.5
        assert abs(int(first.sum()) - density * n) < 5 * sigma
        second = drawn(draws, n, n - 3, density)  # the next block: new draws
        assert not torch.equal(second, first[:n - 3])
        assert torch.equal(drawn(draws, 0, n, density), first)
        assert torch.equal(drawn(draws, n, n - 3, density), second)
        assert torch.equal(drawn(Draws(torch.Generator().manual_seed(3)), 0, n, density), first)
        assert not torch.equal(drawn(Draws(torch.Generator().manual_seed(4)), 0, n, density), first)
    assert first.dtype == torch.uint8 and set(first.unique().tolist()) <= {0, 1}


def test_a_tensors_masks_drawn_in_one_buffer_are_its_blocks_masks():
    """With the tensor's size, `Draws` keeps each block's bits in one buffer: the same draws as without it
    (block by block, in order), and once the blocks cover the tensor one after another, `whole` is those
    blocks' masks end to end; before that, or where a block starts inside a byte, it is None."""
    n, blocks = 1000, [(0, 256), (256, 512), (512, 1000)]
    plain, buffered = Draws(torch.Generator().manual_seed(5)), Draws(torch.Generator().manual_seed(5), n)
    for i, (start, stop) in enumerate(blocks):
        assert buffered.whole() is None
        assert torch.equal(drawn(buffered, start, stop - start, 0.3), drawn(plain, start, stop - start, 0.3))
    whole = unpack(buffered.whole(), 0, n)
    assert torch.equal(whole, torch.cat([drawn(plain, a, b - a, 0.3) for a, b in blocks]))
    assert 0.2 < whole.float().mean() < 0.4
    odd = Draws(torch.Generator().manual_seed(5), 20)
    drawn(odd, 0, 12, 0.5), drawn(odd, 12, 8, 0.5)  # (the second block starts inside a byte)
    assert odd.whole() is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64], ids=str)
def test_masks_from_bits_zero_what_their_product_zeroes(dtype):
    """`_sparsify.masked` (an AND with each bit spread to an all-ones or zero integer of τ's width)
    gives τ·mask for blocks starting anywhere in the bits, to the value (its zeros are all +0)."""
    import numpy

    from adaptkit_plugins.merges._sparsify import masked

    g = torch.Generator().manual_seed(2)
    bits = numpy.random.default_rng(2).integers(0, 256, 40).astype(numpy.uint8)
    for start, count in ((0, 320), (3, 200), (13, 77), (64, 1)):
        tau = torch.randn(count, generator=g).to(dtype)
        expected = tau * unpack(bits, start, count).to(dtype)
        got = masked(tau.clone(), bits, start)
        assert got.dtype == dtype and torch.equal(got, expected) and not torch.signbit(got[got == 0]).any()


def test_dare_masks_are_u_below_p_compared_bit_by_bit():
    """The bit-plane draw written out: from the same SFC64 stream, U's first 12 bits are bit i of
    entry e = bit e % 64 of word e // 64 of plane i, and entries whose 12 bits equal p's take the
    next 32-bit words in entry order. kept = [U₁₂ < p₁₂] or ([U₁₂ = p₁₂] and [V < p's next 32 bits])."""
    import numpy

    n, planes = 100_003, Draws.PLANES
    for p in (0.3, 0.5, 1 / 3, 0.0004):
        draws = Draws(torch.Generator().manual_seed(11))
        stream = numpy.random.SFC64(int(torch.randint(0, 2**62, (), generator=torch.Generator().manual_seed(11))))
        mask = drawn(draws, 0, n, p).numpy()
        words = (n + 63) // 64
        raw = stream.random_raw(planes * words).reshape(planes, words)
        entry = numpy.arange(n)
        bits = (raw[:, entry // 64] >> (entry % 64).astype(numpy.uint64)) & numpy.uint64(1)  # (planes, n)
        u = sum(bits[i].astype(numpy.int64) << (planes - 1 - i) for i in range(planes))
        scaled = int(p * 2 ** (planes + 32))
        head, tail = scaled >> 32, scaled & 0xFFFFFFFF
        tied = numpy.flatnonzero(u == head)
        v = stream.random_raw((tied.size + 1) // 2).view(numpy.uint32)[:tied.size]
        expected = (u < head).astype(numpy.uint8)
        expected[tied] = v < tail
        assert numpy.array_equal(mask, expected)
        assert 0 < tied.size < n / 2**planes * 2  # the tail is drawn for about 1 in 2¹² entries
    # p with no bits past the 12th: only the planes down to its last 1 bit, no 32-bit draws (0.5: one
    # plane, kept where U's first bit is 0; 0.75: two), and the stream is left just past them
    for p, used in ((0.5, 1), (0.75, 2), (0.375, 3)):
        draws = Draws(torch.Generator().manual_seed(11))
        stream = numpy.random.SFC64(int(torch.randint(0, 2**62, (), generator=torch.Generator().manual_seed(11))))
        mask = drawn(draws, 0, n, p).numpy()
        raw = stream.random_raw(used * words).reshape(used, words)
        bits = (raw[:, entry // 64] >> (entry % 64).astype(numpy.uint64)) & numpy.uint64(1)
        u = sum(bits[i].astype(numpy.int64) << (used - 1 - i) for i in range(used))
        assert numpy.array_equal(mask, (u < int(p * 2**used)).astype(numpy.uint8))
        assert numpy.array_equal(draws.bits.random_raw(8), stream.random_raw(8))
    everything = drawn(Draws(torch.Generator().manual_seed(1)), 0, 1000, 1.0)
    assert int(everything.sum()) == 1000  # density 1 keeps every entry, not all but 1 in 2⁴⁴


# ---- half precision, randomness, bad input, registry -------------------------------------------


def test_bf16_inputs_upcast_give_the_float32_result():
    tensors, base = make(shape=(64, 64))
    tensors = [t.bfloat16().float() for t in tensors]
    base = base.bfloat16().float()
    w = [0.3, 0.3, 0.4]
    x, b = f64(tensors, base)
    exact = b + sum(wi * (xi - b) for wi, xi in zip(w, x))
    ours = op("task_arithmetic").merge(tensors, base, weight=w)
    in_bf16 = mergekit("task_arithmetic", [t.bfloat16() for t in tensors], base.bfloat16(), weight=w)
    assert in_bf16.dtype == torch.bfloat16
    err_ours = (ours.double() - exact).abs().max().item()
    err_bf16 = (in_bf16.double() - exact).abs().max().item()
    assert err_ours < 1e-6
    assert err_bf16 > 100 * err_ours


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_dare_is_deterministic_and_uses_only_its_generators(name):
    tensors, base = make()
    params = {"weight": [1.0, 0.5, 0.8], "density": 0.5}
    state = torch.get_rng_state()
    torch.manual_seed(1)
    first = op(name).merge(tensors, base, generators=seeded(1, 2, 3), **params)
    torch.manual_seed(2)
    again = op(name).merge(tensors, base, generators=seeded(1, 2, 3), **params)
    assert first.numpy().tobytes() == again.numpy().tobytes()
    other = op(name).merge(tensors, base, generators=seeded(4, 5, 6), **params)
    assert not torch.equal(first, other)
    torch.set_rng_state(state)
    op(name).merge(tensors, base, generators=seeded(1, 2, 3), **params)
    assert torch.equal(torch.get_rng_state(), state)


BAD = [
    ("ties", {"weight": 1.0, "density": 0.0}, "density"),
    ("ties", {"weight": 1.0, "density": 1.5}, "density"),
    ("dare_linear", {"weight": 1.0, "density": [0.5, -0.1, 0.5], "generators": seeded(1, 2, 3)}, "density"),
    ("magnitude_prune", {"weight": 1.0, "density": 2}, "density"),
    ("breadcrumbs", {"weight": 1.0, "density": 0.5, "gamma": 1.0}, "gamma"),
    ("task_arithmetic", {"weight": 1.0, "density": 0.5}, "density"),
    ("linear", {"weight": [1.0, -1.0, 0.0]}, "sum to zero"),
    ("linear", {}, "'weight' is required"),
    ("linear", {"weight": [1.0, 2.0]}, "2 values for 3"),
    ("ties", {"weight": 1.0, "densty": 0.5}, "did you mean 'density'"),
    ("dare_ties", {"weight": 1.0, "density": 0.5}, "torch.Generator"),
    ("dare_ties", {"weight": 1.0, "rescale": "l2", "generators": seeded(1, 2, 3)}, "rescale"),
    ("ties", {"weight": 1.0, "normalize": "yes"}, "normalize"),
    ("slerp", {"t": 0.5}, "exactly 2"),
    ("interpolate", {"alpha": 0.5}, "exactly 2"),
]


@pytest.mark.parametrize(("name", "params", "message"), BAD)
def test_bad_parameters_are_one_line_errors(name, params, message):
    tensors, base = make()
    with pytest.raises(AdaptkitError, match=message) as info:
        op(name).merge(tensors, base, **params)
    assert "\n" not in str(info.value) and str(info.value).startswith(name)


@pytest.mark.parametrize("name", ["task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune",
                                  "breadcrumbs", "breadcrumbs_ties", "model_stock"])
def test_missing_base_is_an_error(name):
    tensors, _ = make()
    extra = {"generators": seeded(1, 2, 3)} if op(name).random else {}
    params = {} if name == "model_stock" else {"weight": 1.0}
    with pytest.raises(AdaptkitError, match="needs a base model"):
        op(name).merge(tensors, None, **params, **extra)


def test_input_counts():
    tensors, base = make()
    with pytest.raises(AdaptkitError, match="at least 2"):
        op("model_stock").merge(tensors[:1], base)
    with pytest.raises(AdaptkitError, match="exactly 2"):
        op("slerp").merge(tensors[:1], None, t=0.5)


def test_breadcrumbs_prunes_a_tiny_tensor_as_mergekit():
    """γ·n = 0.01·10 < 1: no outlier is dropped, but the tensor is still pruned to `density`, as
    mergekit prunes it (issue 15: its numbers; we used to keep such a tensor whole)."""
    tensors, base = make(shape=(10,))
    x, b = f64(tensors, base)
    ours = op("breadcrumbs").merge(tensors, base, weight=1.0, density=0.5)
    expected = b + sum((xi - b) * breadcrumbs_mask(xi - b, 0.5, 0.01) for xi in x)
    assert_close(ours.double(), expected, **TIGHT)
    assert torch.equal(ours, mergekit("breadcrumbs", tensors, base, weight=1.0, density=0.5))


def test_magnitude_ties_are_broken_as_mergekit_sorts():
    """Entries of equal magnitude straddling the cut are kept as mergekit's sort keeps them (torch's
    argsort: descending for TIES, ascending for breadcrumbs; on 8 entries the orders below), not by a
    position rule of ours: an unstable sort picks which, and only the same sort picks the same."""
    base = torch.zeros(8)
    x = torch.tensor([1.0, -2.0, 2.0, 0.5, -2.0, 3.0, 2.0, 0.1])
    out = op("magnitude_prune").merge([x], base, weight=1.0, density=0.375)  # keeps 3 of 8
    assert torch.equal(out, torch.tensor([0.0, -2.0, 2.0, 0.0, 0.0, 3.0, 0.0, 0.0]))
    out = op("breadcrumbs").merge([x], base, weight=1.0, density=0.25, gamma=0.125)  # drop 3.0, keep 2
    assert torch.equal(out, torch.tensor([0.0, 0.0, 0.0, 0.0, -2.0, 0.0, 2.0, 0.0]))
    assert torch.equal(out, mergekit("breadcrumbs", [x], base, weight=1.0, density=0.25, gamma=0.125))


@pytest.mark.parametrize(("name", "params"), [
    ("ties", {"weight": [1.0, 0.6, 0.8], "density": [0.3, 0.5, 0.25]}),
    ("breadcrumbs", {"weight": [1.0, 0.6, 0.8], "density": 0.4, "gamma": 0.1}),
    ("breadcrumbs_ties", {"weight": [1.0, 0.6, 0.8], "density": 0.5, "gamma": 0.2}),
], ids=["ties", "breadcrumbs", "breadcrumbs_ties"])
def test_ties_at_the_cut_match_mergekit(monkeypatch, name, params):
    """Task vectors full of equal magnitudes, seen in blocks far smaller than the tensor: the same
    entries survive as in mergekit, to the bit."""
    from adaptkit_plugins.merges import _select, task_arithmetic

    monkeypatch.setattr(_select, "BLOCK", 64)
    monkeypatch.setattr(task_arithmetic, "BLOCK", 64)
    g = torch.Generator().manual_seed(5)
    base = torch.zeros(40, 50)
    tensors = [torch.randint(-4, 5, (40, 50), generator=g).float() * 0.25 for _ in range(3)]
    ours = op(name).merge(tensors, base, **params)
    assert torch.equal(ours, mergekit(name, tensors, base, **params))


@pytest.mark.parametrize("name", ["ties", "breadcrumbs", "magnitude_prune"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_a_cut_among_zeros_keeps_mergekits_bytes(name, dtype):
    """Where the cut falls among entries with τ = 0 (a fine-tune that left most of a tensor as it was),
    which of them mergekit's sort keeps cannot change a number, so adaptkit does not follow them
    (`_introsort`, free_zero): the output is still mergekit's, to the byte, signed zeros of the base
    included."""
    g = torch.Generator().manual_seed(8)
    base = (torch.randn(60, 70, generator=g) * 0.02).to(dtype)
    base[::7] = -0.0
    tensors = []
    for _ in range(3):
        changed = torch.rand(60, 70, generator=g) < 0.3
        tensors.append(torch.where(changed, base + (torch.randn(60, 70, generator=g) * 1e-3).to(dtype), base))
    params = {"weight": [0.5, 0.3, 0.4], "density": 0.6}
    if name == "breadcrumbs":
        params["gamma"] = 0.05
    ours = op(name).merge(tensors, base, **params)
    theirs = mergekit(name, tensors, base, **params)
    assert torch.equal(ours.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       theirs.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))


def test_sign_election_tie_goes_positive():
    base = torch.zeros(3)
    tensors = [torch.tensor([1.0, -2.0, 0.5]), torch.tensor([-1.0, 1.0, 0.5])]  # Σ τ = [0, -1, 1]
    ours = op("ties").merge(tensors, base, weight=1.0)
    assert torch.equal(ours, torch.tensor([1.0, -2.0, 0.5]))
    assert torch.equal(ours, mergekit("ties", tensors, base, weight=1.0))


@pytest.fixture(params=["C", "torch"])
def native_mix(request, monkeypatch):
    """Both ways `mix_block` takes TIES' sum rule (and none): one pass in C (`_mix.c`, built by the install, for
    bf16 and float32) and torch's passes, which run where it was not built and for other dtypes."""
    from adaptkit_plugins.merges import _mixing

    if request.param == "C" and _mixing.native is None:
        pytest.skip("_mix.c is not built here (no C compiler at install)")
    if request.param == "torch":
        monkeypatch.setattr(_mixing, "native", None)
    return request.param


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("count", [2, 3, 5])
def test_sign_consensus_by_flipped_signs_gives_mergekits_mask_bytes(native_mix, dtype, count):
    """`combine` elects the sign and sums the agreeing deltas as σ·Σ relu(σ·δᵢ) (σ = ±1 by a sign-bit XOR) instead
    of mergekit's masks, and `mix_block` weighs τᵢ, scales the result by λ and adds the base: the same bytes as
    mergekit's `get_mask` arithmetic written out on the stacked deltas, on values with zeros of both signs, votes
    summing to exactly 0, negative weights (divisors of 0) and a length with an interleaved tail (5 parts)."""
    from mergekit.merge_methods.generalized_task_arithmetic import get_mask

    from adaptkit_plugins.merges._mixing import mix_block

    g = torch.Generator().manual_seed(count)
    n = 4099  # numel mod 32 = 3: torch sums the last entries of 5 stacked parts in four partial sums
    values = torch.randint(-3, 4, (count, n), generator=g).to(dtype) * 0.375
    values[:, :7] = torch.tensor([0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 0.0]).to(dtype)[:, None].T.expand(count, 7)
    values[0, 7], values[1, 7] = 1.5, -1.5  # the votes cancel: + is elected
    values[:, 8] = -0.0
    weights = torch.tensor([0.7, -0.7, 0.3, 1.1, -0.4][:count], dtype=dtype)
    deltas = values * weights[:, None]
    mask = get_mask(deltas, method="sum", mask_dtype=dtype)
    expected = (deltas * mask).sum(dim=0)
    divisor = (weights[:, None] * mask).sum(dim=0)
    divisor[divisor == 0] = 1
    base = torch.randint(-3, 4, (n,), generator=g).to(dtype) * 0.25
    base[:9] = -0.0  # (−0 + −0 stays −0)
    for normalize, mixed in ((False, expected), (True, expected / divisor)):
        for scale in (1.0, 0.3):  # (mergekit's λ: a float product, then the base added)
            want = base + mixed * scale if scale != 1 else base + mixed
            got = torch.empty_like(base)
            mix_block(base, [v.clone() for v in values], weights, "sum", normalize, scale, got)
            bits = {2: torch.int16, 4: torch.int32}[got.element_size()]
            assert torch.equal(got.view(bits), want.view(bits)), (normalize, scale)


@pytest.mark.parametrize("rule", ["sum", None])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_the_c_mix_gives_the_torch_paths_bytes_on_hostile_values(dtype, rule):
    """`_mix.mix` (TIES' sum rule, and none) against `mix_block`'s torch passes (λ of 1, 0.3 and 1e-30, a base with
    −0), 1 to 16 inputs (from 5 on, the last entries sum interleaved: +1, −1, 0, 0, −2⁻²⁶ first and last, where the
    two orders elect opposite signs), lengths with and without a tail, both normalizations: values spread over
    e^±16, zeros of both signs, subnormals, ±inf (inf − inf votes are NaN: torch's bulk rounds a NaN to 0xFFFF,
    which elects −) and NaN. Equal bits, NaN where NaN."""
    from adaptkit_plugins.merges import _mixing

    if _mixing.native is None:
        pytest.skip("_mix.c is not built here")
    bits = {torch.bfloat16: torch.int16, torch.float32: torch.int32}[dtype]
    g = torch.Generator().manual_seed(7)
    for count in (1, 2, 3, 4, 5, 8, 16):
        for n in (2, 33, 1000, 4099, 9 * 1024 + 5):
            deltas = [(torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 16)).to(dtype)
                      for _ in range(count)]
            for d in deltas:
                for value, share in ((0.0, 0.3), (-0.0, 0.05), (1e-40, 0.02), (float("inf"), 0.01),
                                     (-float("inf"), 0.01), (float("nan"), 0.002)):
                    d[torch.rand(n, generator=g) < share] = value
            for i, value in enumerate([1.0, -1.0, 0.0, 0.0, -(2.0 ** -26)][:count]):  # a tail's sum differs
                deltas[i][0], deltas[i][-1] = value, value
            weights = torch.randn(count, generator=g).to(dtype)
            weights[0] = 0.0  # (a weight of 0: divisors of 0 where only it agrees)
            base = (torch.randn(n, generator=g) * 4).to(dtype)
            base[: n // 3] = -0.0
            for normalize, scale in ((False, 1.0), (True, 1.0), (True, 0.3), (False, 1e-30)):
                want, got = torch.empty_like(base), torch.empty_like(base)
                with pytest.MonkeyPatch.context() as patch:
                    patch.setattr(_mixing, "native", None)
                    _mixing.mix_block(base, [d.clone() for d in deltas], weights, rule, normalize, scale, want)
                _mixing.mix_block(base, [d.clone() for d in deltas], weights, rule, normalize, scale, got)
                nan = want.isnan()
                assert torch.equal(got.isnan(), nan), (count, n, normalize, scale)
                assert torch.equal(got[~nan].view(bits), want[~nan].view(bits)), (count, n, normalize, scale)


@pytest.mark.parametrize("rule", ["sum", None])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_the_c_mix_from_the_models_gives_the_torch_paths_bytes(dtype, rule):
    """`mix_models` makes τᵢ = (modelᵢ − base), its drops (packed bits from any bit offset, and from whole
    bytes, which `_mix.c` reads a byte at a time: `masked`; or magnitude bounds and chosen ties: `Ranked.keep`,
    one-sided and two-sided) and its factor in the C pass: the bytes of the torch passes that make them
    (`TaskArithmetic.merge`'s `deltas_at`) and then `mix_block`, on hostile values, with and without drops
    and factors."""
    from adaptkit_plugins.merges import _mixing
    from adaptkit_plugins.merges._base import as_bits
    from adaptkit_plugins.merges._sparsify import Ranked, masked, pack

    if _mixing.native is None:
        pytest.skip("_mix.c is not built here")
    bits = {torch.bfloat16: torch.int16, torch.float32: torch.int32}[dtype]
    g = torch.Generator().manual_seed(11)
    for count, offset in ((1, 13), (3, 13), (5, 13), (3, 0), (2, 16)):
        n, start = 4099, 70000  # (the block's first flat index, for the ranked drops' chosen)
        base = (torch.randn(n, generator=g) * 4).to(dtype)
        models = [(torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 12)).to(dtype) + base
                  for _ in range(count)]
        for m in models:
            for value, share in ((float("inf"), 0.01), (float("nan"), 0.002), (-0.0, 0.05)):
                m[torch.rand(n, generator=g) < share] = value
        m_bits = [pack((torch.rand(n + offset, generator=g) < 0.6).numpy()) for _ in range(count)]
        masks = [None if i == 1 else (m_bits[i], offset) for i in range(count)]
        # TIES' and breadcrumbs' cuts: |τ| bounds (as bits of the dtype) and the ties chosen among them
        level = [float(torch.quantile(torch.sub(m, base).abs().float().nan_to_num(posinf=0), q)) for m, q in
                 zip(models, (0.3, 0.5, 0.7, 0.2, 0.6))]
        ranked = [Ranked(int(as_bits(torch.tensor(v, dtype=dtype))), None if i % 2 else
                         int(as_bits(torch.tensor(v * 4, dtype=dtype))),
                         numpy.sort(numpy.random.default_rng(i).choice(n, 50, replace=False)) + start, dtype)
                  for i, v in enumerate(level)]
        masks = [ranked[i].bounds(start, n, dtype) if i in (0, 3) else mask for i, mask in enumerate(masks)]
        factors = [None if i == 2 else float(torch.tensor(1 / 0.6, dtype=dtype)) for i in range(count)]
        weights = torch.randn(count, generator=g).to(dtype)
        for normalize, scale in ((True, 1.0), (False, 0.3)):
            taus = []
            for i, (model, mask, factor) in enumerate(zip(models, masks, factors)):
                tau = torch.sub(model, base)
                if i in (0, 3):
                    tau = ranked[i].keep(tau, start)
                elif mask is not None:
                    tau = masked(tau, mask[0], mask[1])
                taus.append(tau if factor is None else tau.mul_(factor))
            want, got = torch.empty_like(base), torch.empty_like(base)
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(_mixing, "native", None)
                _mixing.mix_block(base, taus, weights, rule, normalize, scale, want)
            assert _mixing.mix_models(base, models, masks, factors, weights, rule, normalize, scale, got)
            nan = want.isnan()
            assert torch.equal(got.isnan(), nan), (count, normalize)
            assert torch.equal(got[~nan].view(bits), want[~nan].view(bits)), (count, normalize)


def test_the_c_mix_refuses_what_it_cannot_sum():
    """Wrong rules, counts, dtypes, lengths and masks are a ValueError, never a read past a buffer."""
    from adaptkit_plugins.merges import _mixing

    if _mixing.native is None:
        pytest.skip("_mix.c is not built here")
    a, out = numpy.zeros(8, numpy.int16), numpy.zeros(8, numpy.int16)

    def call(rule="sum", parts=(a,), weights=(1.0,), dtype="bfloat16", base=None):
        _mixing.native.mix(rule, parts, weights, True, 1.0, 0, dtype, out, base, 1.0, True)

    for kwargs, match in (({"weights": (1.0, 2.0)}, "as many weights"),
                          ({"parts": (a,) * 17, "weights": (1.0,) * 17}, "1 to 16"),
                          ({"dtype": "float16"}, "bfloat16 or float32"), ({"rule": "count"}, "rule sum, sce or none"),
                          ({"parts": (a[:4],)}, "deltas and out differ in length"),
                          ({"base": a[:4]}, "base and out differ in length")):
        with pytest.raises(ValueError, match=match):
            call(**kwargs)
    for masks, match in ((((numpy.zeros(1, numpy.uint8), 1),), "mask shorter than its block"),
                         (((numpy.zeros(2, numpy.uint8), -1),), "mask shorter than its block"),
                         ((None, None), "a mask and a factor")):
        with pytest.raises(ValueError, match=match):
            _mixing.native.mix("sum", (a,), (1.0,), True, 1.0, 0, "bfloat16", out, a, 1.0, True, masks, (None,))
    with pytest.raises(ValueError, match="keep mask of another length"):
        _mixing.native.mix("sce", (a,), (1.0,), True, 1.0, 0, "bfloat16", out, a, 1.0, True, (numpy.ones(7, bool),),
                           (None,))
    # SCE's variances and squares
    for args, match in ((((a,) * 17, a, "bfloat16", out), "1 to 16"), (((), a, "bfloat16", out), "1 to 16"),
                        (((a,), a[:4], "bfloat16", out), "differ in length"),
                        (((a[:4],), a, "bfloat16", out), "different lengths"),
                        (((a,), a, "float16", out), "bfloat16 or float32")):
        with pytest.raises(ValueError, match=match):
            _mixing.native.variance(*args)
    for args, match in (((a, a[:4], None, 0, "bfloat16"), "one length"), ((a, a, numpy.zeros(1, numpy.uint8), 1, "bfloat16"),
                                                                           "bits holding them"),
                        ((a, a, numpy.zeros(1, numpy.uint8), -1, "bfloat16"), "bits holding them"),
                        ((a, a, None, 0, "float16"), "bfloat16 or float32")):
        with pytest.raises(ValueError, match=match):
            _mixing.native.l1(*args)
    squares = numpy.zeros(8, numpy.float32)
    for args, match in (((a, a, numpy.ones(7, bool), "bfloat16", squares), "one length"),
                        ((a, a[:4], None, "bfloat16", squares), "one length"),
                        ((a, a, None, "bfloat16", squares[:4]), "one length"),
                        ((a, a, None, "float64", squares), "bfloat16 or float32")):
        with pytest.raises(ValueError, match=match):
            _mixing.native.squares(*args)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_l1_norms_are_the_exact_ones_rounded_on_either_path(dtype):
    """The random methods' L1 rescale (`_sparsify.l1_factor` with `sums`): ‖τ‖₁ and ‖m ⊙ τ‖₁ summed in float64
    per block, in C from the models and the drops' bits (`_mixing.l1_sums`, any bit offset) or by torch
    (where `sums` gives None), within 2⁻³⁶ of the exact sums (math.fsum of the entries), so both paths give
    the same factor, bit for bit, on values spread over e^±12 in blocks of 2¹⁷; inf and NaN give inf and NaN.
    (Magnitude drops keep mergekit's float32 sums: `test_drawn_recipe`'s breadcrumbs with `rescale: true`.)"""
    from adaptkit_plugins.merges import _mixing
    from adaptkit_plugins.merges._sparsify import l1_factor, masked, pack

    if _mixing.native is None:
        pytest.skip("_mix.c is not built here")
    g = torch.Generator().manual_seed(13)
    n, block, offset = 300_007, 1 << 17, 5
    base = (torch.randn(n, generator=g) * 2).to(dtype)
    model = (base.double() + torch.randn(n, generator=g).double() * torch.exp(torch.randn(n, generator=g) * 4)
             ).to(dtype)
    bits = pack((torch.rand(n + offset, generator=g) < 0.4).numpy())
    ranges = [(s, min(s + block, n)) for s in range(0, n, block)]
    for s, e in ranges:
        got = _mixing.l1_sums(model[s:e], base[s:e], (bits, offset + s), dtype)
        tau = torch.sub(model[s:e], base[s:e]).abs_()
        kept = masked(tau.clone(), bits, offset + s)
        exact = [math.fsum(t.double().tolist()) for t in (tau, kept)]
        assert got[0] == pytest.approx(exact[0], rel=2.0 ** -36) and got[1] == pytest.approx(exact[1], rel=2.0 ** -36)
    tau = lambda s, e: torch.sub(model[s:e], base[s:e])  # noqa: E731
    prune = lambda s, magnitude: masked(magnitude, bits, offset + s)  # noqa: E731
    factor = l1_factor(tau, ranges, prune, dtype, lambda s, e: _mixing.l1_sums(model[s:e], base[s:e], (bits, offset + s),
                                                                             dtype))
    assert factor == l1_factor(tau, ranges, prune, dtype, lambda s, e: None) and 1.0 < factor < 10.0  # (torch's)
    model[[7, 200_000]] = torch.tensor([float("inf"), float("nan")], dtype=dtype)
    sums = [_mixing.l1_sums(model[s:e], base[s:e], None, dtype) for s, e in ranges[:2]]
    assert sums[0][0] == sums[0][1] == math.inf and math.isnan(sums[1][0]) and math.isnan(sums[1][1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_sces_c_passes_give_its_torch_passes_bytes(dtype):
    """SCE's per-entry steps in C (`_mixing.variance`, `squares`, and `mix_models` with the rule "sce": the
    weights after the election, +0 kept, the divisor clamped at 1e-6) against its torch passes, through
    `SCE.merge`: 1 to 16 inputs (from 5 on, torch's interleaved tail), lengths with and without a tail,
    select_topk 0.5 and 1, an input equal to the base (ηᵢ = 0), one of task vectors 10⁻⁴ the others' (ηᵢ
    below 10⁻⁶, alone where the others' are 0: the clamped divisor), tiny task vectors (uniform weights), the
    least subnormal against a base of −0 (ηᵢ·kᵢ rounds to +0, which stays +0), and hostile values: spread
    over e^±12, zeros of both signs, subnormals, ±inf and NaN. Equal bits, NaN where NaN; the C passes ran."""
    from adaptkit_plugins.merges import _mixing
    from adaptkit_plugins.merges.sce import SCE, variance

    if _mixing.native is None:
        pytest.skip("_mix.c is not built here")
    bits = {torch.bfloat16: torch.int16, torch.float32: torch.int32}[dtype]
    g = torch.Generator().manual_seed(5)
    for count, n, hostile, size in ((1, 1000, False, 1.0), (3, 4099, True, 1.0), (3, 9 * 1024 + 5, False, 1e-5),
                                    (5, 4099, True, 1.0), (8, 1000, False, 1.0), (16, 2 * 1024 + 7, True, 1.0)):
        base = (torch.randn(n, generator=g) * 4).to(dtype)
        base[: n // 5] = -0.0
        models = [(base.float() + torch.randn(n, generator=g) * size * torch.exp(torch.randn(n, generator=g) * 3)
                   ).to(dtype) for _ in range(count)]
        if count > 2:
            models[1] = base.clone()
            models[2] = (base.float() + (models[2].float() - base.float()) * 1e-4).to(dtype)
            alone = torch.rand(n, generator=g) < 0.1
            for m in models[:2] + models[3:]:
                m[alone] = base[alone]
        least = torch.finfo(dtype).tiny * 2.0 ** -(7 if dtype == torch.bfloat16 else 23)
        base[:8] = -0.0
        for m in models:
            m[:8] = -least
        for m in models[3:] if hostile else []:
            for value, share in ((float("inf"), 0.005), (-float("inf"), 0.005), (float("nan"), 0.002),
                                 (-0.0, 0.05), (1e-40, 0.02)):
                m[torch.rand(n, generator=g) < share] = value
        taus = [torch.sub(m, base) for m in models]
        got = torch.empty_like(base)
        assert _mixing.variance(models, base, got)
        want = variance(taus)
        nan = want.isnan()
        assert torch.equal(got.isnan(), nan) and torch.equal(got[~nan].view(bits), want[~nan].view(bits)), count
        keep = torch.rand(n, generator=g) < 0.5
        got = torch.empty(n)
        assert _mixing.squares(models[0], base, keep, got)
        want = taus[0].mul(keep.to(dtype)).square_().float()
        nan = want.isnan()
        assert torch.equal(got.isnan(), nan) and torch.equal(got[~nan], want[~nan]), count
        calls = []
        for fraction in (0.5, 1.0):
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(_mixing, "native", None)
                want = SCE.merge(models, base, select_topk=fraction)
            with pytest.MonkeyPatch.context() as patch:
                for name in ("variance", "squares", "mix"):  # (the C passes ran)
                    patch.setattr(_mixing.native, name, lambda *a, f=getattr(_mixing.native, name), name=name:
                                  calls.append(name) or f(*a), raising=False)
                got = SCE.merge(models, base, select_topk=fraction)
            nan = want.isnan()
            assert torch.equal(got.isnan(), nan), (count, n, fraction)
            assert torch.equal(got[~nan].view(bits), want[~nan].view(bits)), (count, n, fraction)
        assert set(calls) == {"variance", "squares", "mix"}


def test_index_cut_of_float64_task_vectors_ranks_their_float32_magnitudes():
    """In float64 the magnitudes are ranked as float32 (mergekit's `abs().float()` copy; `top_cut`'s
    histogram): 1 + 1e-12 and 1 tie there, and exactly k entries are kept, ties lowest index first."""
    base = torch.zeros(6, dtype=torch.float64)
    x = torch.tensor([1.0, 1.0 + 1e-12, -1.0, 2.0, 0.5, 1.0 - 1e-12], dtype=torch.float64)
    out = op("magnitude_prune").merge([x], base, weight=1.0, density=0.5, tie_break="index")
    assert torch.equal(out, torch.tensor([1.0, 1.0 + 1e-12, 0.0, 2.0, 0.0, 0.0], dtype=torch.float64))
    # SCE's variance cut alike: inputs x and -x have variances x², of which 4 are kept (1 + 2e-12, 1
    # and 1 - 2e-12 tie as float32)
    from adaptkit_plugins.merges.sce import select_mask

    kept = select_mask(lambda s, e: torch.stack([x, -x])[:, s:e], [(0, 6)], 4 / 6, torch.float64, "index")
    assert torch.equal(kept, torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("k", [0, 1, 37, 100, 163, 200, 260])
def test_index_cuts_as_bounds_keep_what_their_masks_keep(monkeypatch, dtype, k):
    """`cut_bounds` (the bounds and the ties kept, which the C mix and `Ranked.keep` apply) keeps what `Cut.mask`
    keeps block by block, for one cut (TIES: the k largest) and for two (breadcrumbs: the k largest less the
    j largest, j = k − 30 and k − 3, ties at either bound or at one key for both), over blocks far smaller
    than the tensor with ties straddling block ends; all kept (k ≥ n) and none (k = 0) too. Zeros (many
    here) may go either way: they add nothing. A cut's blocks out of order are an error."""
    from adaptkit_plugins.merges import _select
    from adaptkit_plugins.merges._sparsify import Ranked

    monkeypatch.setattr(_select, "BLOCK", 16)
    g = torch.Generator().manual_seed(k)
    tau = (torch.randint(-5, 6, (200,), generator=g).float() * 0.125 * 2.0 ** torch.randint(-2, 2, (200,), generator=g)).to(dtype)
    magnitudes = lambda s, e: tau[s:e].abs()  # noqa: E731
    blocks = _select.block_ranges(200)
    for fewer in (None, k - 30, k - 3):
        cuts = [_select.top_cut(magnitudes, 200, k)] + ([] if fewer is None else [_select.top_cut(magnitudes, 200, fewer)])
        both = _select.top_cuts(magnitudes, 200, [k, fewer or k])  # (from one histogram)
        assert list(map(repr, both)) == [repr(cuts[0]), repr(cuts[-1])]
        mask = torch.cat([cuts[0].mask(tau[s:e].abs(), s) for s, e in blocks]).double()
        if fewer is not None:
            mask -= torch.cat([cuts[1].mask(tau[s:e].abs(), s) for s, e in blocks]).double()
        kept = Ranked(*_select.cut_bounds(magnitudes, 200, *cuts)).keep(tau, 0)
        assert torch.equal(kept != 0, (tau * mask.to(dtype)) != 0), (fewer, cuts)
        assert torch.equal(kept[kept != 0], tau[kept != 0])
        assert set(mask.unique().tolist()) <= {0.0, 1.0}  # (the second cut's entries are the first's)
        assert int(mask.sum()) == max(0, min(k, 200)) - (0 if fewer is None else max(0, min(fewer, 200)))
    if 0 < k < 200 and cuts[0].ties < cuts[0].tied:
        cuts[0].mask(tau[:16].abs(), 0)
        with pytest.raises(AssertionError, match="out of order"):
            cuts[0].mask(tau[32:48].abs(), 32)


@pytest.mark.parametrize("name", NAMES)
def test_registry_loads_every_operator(name):
    obj = op(name)
    assert isinstance(obj, MergeMethod) and obj.name == name
    assert set(obj.per_model) <= set(obj.params)
    line, problem = registry.describe(registry.entry("merge", name))
    assert problem is None and line and "\n" not in line
    text = getattr(obj, "about", "") or type(obj).__doc__
    assert text.splitlines()[0] == line and "arXiv" in text
    assert obj.random == name.startswith("dare")
    tensors, base = make(shape=(4, 6), count=2)
    params = {k: v for k, v in {"weight": 1.0, "t": 0.5, "alpha": 0.5}.items() if k in obj.params}
    extra = {"generators": seeded(1, 2)} if obj.random else {}
    if name in ("slerp", "interpolate"):  # two ends: a base beside two inputs is refused
        with pytest.raises(AdaptkitError, match="needs exactly 2 models, the base and 1 other; got the base and 2"):
            obj.merge(tensors, base, **params)
        base = None
    out = obj.merge(tensors, base, **params, **extra) if name != "model_stock" else obj.merge(tensors, base)
    assert out.shape == tensors[0].shape and out.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64], ids=str)
def test_stacked_sum_of_five_or_more_sums_the_last_entries_as_torch(dtype):
    """torch sums a stack's last entries (after its vectorized loop's last group) in four interleaved
    partial sums, ((p₀ + p₁) + p₂) + p₃ with pₖ = Σᵢ part[4i + k]: for 5 or more parts that rounds
    differently from adding them one after the other. `stacked_sum` gives torch's bytes at every
    length, and blocks from `block_ranges` (starting at multiples of 256) sum as the whole tensor."""
    from plugins.merges._base import stacked_sum
    from plugins.merges._select import block_ranges

    def same(a, b):
        return a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))

    spread = 3 if dtype == torch.float16 else 8
    for count in (5, 6, 9, 16):
        for n in (1, 5, 21, 100, 1000, 1073, (1 << 16) + 37):
            g = torch.Generator().manual_seed(count * 1000 + n)
            parts = [(torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * spread)).to(dtype)
                     for _ in range(count)]
            assert same(stacked_sum(parts), torch.stack(parts).sum(dim=0)), (count, n)
            if n > 1000:
                blocks = [stacked_sum([p[s:e] for p in parts]) for s, e in block_ranges(n, 512)]
                assert same(torch.cat(blocks), torch.stack(parts).sum(dim=0)), (count, n)
    # written out: 5 parts, +big, −big, 0, 0, tiny. Part after part: tiny. Interleaved: (big + tiny)
    # rounds to big, then big − big = 0. 1020 entries: the last 1020 mod 32 = 28 (double: mod 16, 12)
    # go interleaved (torch 2.13), the others part after part.
    tiny = 2.0 ** 15 * torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps / 4
    probe = [torch.full((1020,), v, dtype=dtype) for v in (2.0 ** 15, -(2.0 ** 15), 0.0, 0.0, tiny)]
    summed = stacked_sum(probe)
    assert same(summed, torch.stack(probe).sum(dim=0))
    interleaved = 12 if dtype == torch.float64 else 28
    assert summed[:-interleaved].eq(tiny).all() and summed[-interleaved:].eq(0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("count", [1, 2, 3, 8, 16, 17, 40])
def test_stacked_sum_is_torchs_stacked_sum_to_the_byte(dtype, count):
    """The task-arithmetic family sums its inputs as mergekit does, `torch.stack(parts).sum(dim=0)`;
    `stacked_sum` skips the stack and must give the same bytes (signed zeros, infinities, roundings)."""
    from plugins.merges._base import stacked_sum

    g = torch.Generator().manual_seed(count)
    spread = 3 if dtype == torch.float16 else 8  # magnitudes over e^±3σ·spread: float32 sums round
    parts = [(torch.randn(1 << 16, generator=g) * torch.exp(torch.randn(1 << 16, generator=g) * spread)).to(dtype)
             for _ in range(count)]
    parts[0][:4] = torch.tensor([-0.0, float("inf"), -0.0, 1.0])
    for p in parts[1:]:
        p[:4] = torch.tensor([-0.0, 1.0, 0.0, -1.0])
    got, expected = stacked_sum(parts), torch.stack(parts).sum(dim=0)
    assert got.dtype == expected.dtype
    assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8))
    # masks times per-part weights rounded to the dtype (TIES' divisor Σᵢ mᵢ·wᵢ), of either sign
    masks = [part > 0 for part in parts]
    scales = torch.tensor([(-1) ** i * 0.3 * (i + 1) for i in range(count)]).to(dtype)
    got = stacked_sum(masks, scales)
    expected = torch.stack([m * w for m, w in zip(masks, scales.unbind(0))]).sum(dim=0)
    assert got.dtype == expected.dtype == dtype
    assert torch.equal(got.view(torch.uint8), expected.view(torch.uint8))


# (with a base, parameters for N models) of every deterministic method both tools have that takes
# more than two models
MANY = {
    "linear": (False, lambda n: {"weight": [0.3 + 0.1 * i for i in range(n)]}),
    "task_arithmetic": (True, lambda n: {"weight": [0.5 - 0.2 * i for i in range(n)], "lambda": 0.9}),
    "ties": (True, lambda n: {"weight": [0.4 + 0.1 * i for i in range(n)], "density": 0.5}),
    "breadcrumbs_ties": (True, lambda n: {"weight": [0.4] * n, "density": 0.6, "gamma": 0.1}),
    "model_stock": (True, lambda n: {}),
    "multislerp": (True, lambda n: {"weight": [0.3 + 0.1 * i for i in range(n)]}),
    "karcher": (False, lambda n: {}),
    "sce": (True, lambda n: {"select_topk": 0.5}),
    "ram": (True, lambda n: {}),
    "ramplus_tl": (True, lambda n: {}),
}


@pytest.mark.parametrize("name", list(MANY))
def test_five_models_over_blocks_give_mergekits_bytes(name):
    """Five float32 models on a tensor of 1,050,839 entries (two of the operators' 2²⁰-entry blocks,
    23 past a multiple of 32): torch sums the last entries of a stack of five in another order than
    the rest (`_base.interleaved_tail`), and every block must sum as the whole tensor. Before that
    was followed, six of these ten differed from mergekit here, by an ulp in a few entries."""
    with_base, params = MANY[name]
    tensors, base = make(shape=(349, 3011), count=5, seed=5)
    tensors = [base + (t - base) * (1 + i) for i, t in enumerate(tensors)]
    ours = op(name).merge(tensors, base if with_base else None, **params(5))
    theirs = mergekit(name, tensors, base if with_base else None, **params(5))
    assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)
