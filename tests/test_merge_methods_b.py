"""Merge methods della, della_linear, sce, ram and ramplus_tl: each against its paper's formula
written out here (float64, plain torch), against mergekit's own code on the same inputs
(deterministic methods: the same bytes in float32, bfloat16 and float16; DELLA: the same keep
probabilities and, given the same draws, the same merge; keep fractions and norms in expectation
otherwise), bad parameters, and one end-to-end `adaptkit merge` per method beside mergekit's."""
from __future__ import annotations

import math

import numpy
import pytest
import torch
import yaml
from mergekit.merge_methods import registry as mk_registry
from mergekit.merge_methods.base import ParameterScope, TensorGroup
from mergekit.sparsify import SparsificationMethod, sparsify
from torch.testing import assert_close

from adaptkit import registry
from adaptkit.errors import AdaptkitError
from builders import state, tiny_llama
from test_merge_ops import disjoint_merge  # TIES' consensus, written out once

TIGHT = dict(rtol=1e-5, atol=1e-6)
NAMES = ["della", "della_linear", "sce", "ram", "ramplus_tl"]


def op(name):
    return registry.get("merge", name)


def make(shape=(40, 50), count=3, seed=0, changed=1.0):
    """A base and `count` inputs changing a `changed` fraction of its entries by about 0.1."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return [base + 0.1 * torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) < changed)
            for _ in range(count)], base


def mergekit(name, tensors, base, **params):
    group = TensorGroup.from_tensors([base, *tensors], base_index=0)
    return mk_registry.get(name)([group], parameters=params)[0]


def seeded(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


# ---- DELLA ----------------------------------------------------------------------------------


def magprune_probabilities(tau, density, epsilon):
    """MagPrune's keep probabilities as mergekit defines them: per row of a matrix (along dim 1 of a
    higher-dimensional tensor, over a vector), linear in the magnitude rank from density − ε to
    density + ε."""
    rows = tau.reshape(1, -1) if tau.dim() < 2 else tau.movedim(1, -1).reshape(-1, tau.shape[1])
    n = rows.shape[1]
    ranks = torch.empty_like(rows, dtype=torch.float64)
    for r, row in enumerate(rows):
        ranks[r, torch.argsort(row.abs(), stable=True)] = torch.arange(n, dtype=torch.float64)
    p = (density - epsilon) + 2 * epsilon * ranks / (n - 1)
    if tau.dim() < 2:
        return p.reshape(tau.shape)
    return p.reshape(*tau.shape[:1], *tau.shape[2:], tau.shape[1]).movedim(-1, 1)


def test_keep_probabilities_by_hand():
    from adaptkit_plugins.merges._magprune import keep_probabilities

    magnitude = torch.tensor([[3.0, 1.0, 2.0, 2.0], [0.5, 0.25, 4.0, 1.0]])
    # ranks [3, 0, 1, 2] (the tie at 2.0 by position) and [1, 0, 3, 2]; p = 0.4 + 0.2·rank/3
    expected = torch.tensor([[0.6, 0.4, 0.4 + 0.2 / 3, 0.4 + 0.4 / 3], [0.4 + 0.2 / 3, 0.4, 0.6, 0.4 + 0.4 / 3]])
    assert_close(keep_probabilities(magnitude, 0.5, 0.1), expected, **TIGHT)
    assert torch.equal(keep_probabilities(torch.ones(3, 1), 0.7, 0.2), torch.full((3, 1), 0.7))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_rank_order_is_the_stable_argsort(dtype):
    """16-bit magnitudes are ranked by numpy's radix sort of their bit patterns, wider ones by torch's
    sort of theirs: either way each row's stable argsort of the values, ties (many here) by position,
    zeros, subnormals and infinities included."""
    from adaptkit_plugins.merges._magprune import rank_order

    g = torch.Generator().manual_seed(5)
    values = torch.randint(-40, 40, (37, 300), generator=g).to(dtype) / 8
    values[0, :5] = torch.tensor([float("inf"), 0.0, -0.0, torch.finfo(dtype).tiny / 4, float("-inf")], dtype=dtype)
    magnitude = values.abs()
    order = rank_order(magnitude)
    assert order.dtype == torch.int64
    assert torch.equal(order, torch.argsort(magnitude.double(), dim=1, stable=True))


def test_rank_order_of_long_rows():
    """Rows longer than 2¹⁶ (16-bit patterns with 32-bit columns) rank as the stable argsort too."""
    from adaptkit_plugins.merges._magprune import rank_order

    values = torch.randint(0, 50, (2, 70_001), generator=torch.Generator().manual_seed(6)).bfloat16().div_(4)
    assert torch.equal(rank_order(values), torch.argsort(values.double(), dim=1, stable=True))


def test_draw_keep_compares_rank_ordered_draws_with_the_ramp():
    """Entry j of a row is kept where the draw of its rank, U = k/2³² for the next 32-bit integer k in rank
    order, is below its keep probability p: k < ⌈p·2³²⌉. Written out entry by entry, then the kept
    fraction of each rank against p over many rows."""
    from adaptkit_plugins.merges._draws import uniform32
    from adaptkit_plugins.merges._magprune import draw_keep

    magnitude = torch.tensor([[3.0, 1.0, 2.0, 2.0], [0.5, 0.25, 4.0, 1.0]])  # ranks [3, 0, 1, 2], [1, 0, 3, 2]
    k = uniform32(numpy.random.SFC64(7), 8).reshape(2, 4).astype(numpy.int64)
    p = [0.4, 0.4 + 0.2 / 3, 0.4 + 0.4 / 3, 0.6]  # by rank: 0.4 + 0.2·rank/3 (density 0.5, ε 0.1)
    bound = [math.ceil(numpy.float32(q) * 2.0**32) for q in p]
    expected = [[k[0, 3] < bound[3], k[0, 0] < bound[0], k[0, 1] < bound[1], k[0, 2] < bound[2]],
                [k[1, 1] < bound[1], k[1, 0] < bound[0], k[1, 3] < bound[3], k[1, 2] < bound[2]]]
    assert draw_keep(magnitude, 0.5, 0.1, numpy.random.SFC64(7)).tolist() == expected
    rows = torch.rand(20_000, 5, generator=torch.Generator().manual_seed(8))
    keep = draw_keep(rows, 0.5, 0.3, numpy.random.SFC64(9))
    by_rank = keep.gather(1, torch.argsort(rows, dim=1)).float().mean(dim=0)  # each rank's kept fraction
    assert_close(by_rank, torch.tensor([0.2, 0.35, 0.5, 0.65, 0.8]), atol=0.015, rtol=0)  # (σ ≤ 0.0036)


@pytest.mark.parametrize("dtype, shape", [(torch.bfloat16, (37, 301)), (torch.float32, (5, 203)),
                                          (torch.bfloat16, (2, 70_001))], ids=["bf16", "float32", "long-rows"])
def test_draws_packed_in_c_are_draw_keeps_mask(monkeypatch, dtype, shape):
    """`draw_packed`: the same draws compared, put in place and packed in one C pass (`_mix.c`'s `ranked`) as
    numpy's compare, torch's scatter and numpy's packbits give them: 32-bit keys (16-bit patterns, rows up to
    2¹⁶), 64-bit ones (float32, longer rows), ties by position and a bit count that fills no whole byte; and
    bad buffers refused by name."""
    from adaptkit_plugins.merges import _magprune, _mixing
    from adaptkit_plugins.merges._sparsify import pack

    if _mixing.native is None:
        pytest.skip("_mix.c is not built here")
    g = torch.Generator().manual_seed(3)
    magnitude = torch.randint(0, 60, shape, generator=g).to(dtype).div_(8)
    ours = numpy.full((magnitude.numel() + 7) // 8, 0xA5, dtype=numpy.uint8)  # (stale bits: all overwritten)
    _magprune.draw_packed(magnitude, 0.4, 0.2, numpy.random.SFC64(4), ours)
    theirs = pack(_magprune.draw_keep(magnitude, 0.4, 0.2, numpy.random.SFC64(4)).numpy())
    assert numpy.array_equal(ours, theirs) and 0.3 < numpy.unpackbits(ours).mean() < 0.5
    keys, draws = _magprune.rank_keys(magnitude), numpy.zeros(shape, dtype=numpy.uint32)
    limits = _magprune.thresholds(shape[1], 0.4, 0.2)
    for bad in ((keys[:-1], draws, limits, ours), (keys, draws.astype(numpy.int64), limits, ours),
                (keys, draws, limits[:-1], ours), (keys, draws, limits, ours[:-1]), (keys.astype(numpy.int16), draws,
                                                                                     limits, ours)):
        with pytest.raises(ValueError, match="ranked: rows × n int32 or int64 keys"):
            _mixing.native.ranked(*bad)


@pytest.mark.parametrize("shape, block", [((37, 301), 16), ((24, 1024), 5), ((2, 70_001), 2)],
                         ids=["odd-rows", "whole-bytes", "long-rows"])
def test_magprune_in_c_draws_draw_packeds_bits_and_l1s_sums(shape, block):
    """`_mixing.magprune_sums`: one C pass from bf16 models gives, block by block, `draw_packed`'s bits for
    |τ| = |R(model − base)| (ranks by counting: ties by position, zeros, ±inf; the generator stepped in C as numpy
    steps it, rows that split a 64-bit draw, blocks that start a draw afresh) and `l1_sums`' two sums with those
    bits; bad buffers and blocks refused by name."""
    from adaptkit_plugins.merges import _magprune, _mixing

    if _mixing.native is None:
        pytest.skip("_mix.c is not built here")
    g = torch.Generator().manual_seed(5)
    base = torch.randn(shape, generator=g).to(torch.bfloat16)
    model = (base.float() + torch.randint(-40, 40, shape, generator=g) / 512).to(torch.bfloat16)  # ties, zeros
    model[0, :7] = base[0, :7]
    model[-1, 3], model[-1, 5] = float("inf"), float("-inf")
    limits, n = _magprune.thresholds(shape[1], 0.5, 0.15), shape[1]
    ours, theirs = (numpy.full((model.numel() + 7) // 8, 0xA5, dtype=numpy.uint8) for _ in range(2))
    mine, reference = numpy.random.SFC64(6), numpy.random.SFC64(6)
    sums = _mixing.magprune_sums(model, base, mine, limits, ours, block)
    starts = range(0, shape[0], block)
    assert len(sums) == len(starts)
    for a, found in zip(starts, sums):
        b = min(a + block, shape[0])
        _magprune.draw_packed(torch.sub(model[a:b], base[a:b]).abs_(), 0.5, 0.15, reference,
                              theirs[a * n // 8:(b * n + 7) // 8])
        assert found == _mixing.native.l1(_mixing.as_bits(model[a:b]).numpy(), _mixing.as_bits(base[a:b]).numpy(),
                                          theirs, a * n, "bfloat16")
    assert numpy.array_equal(ours, theirs)
    assert mine.random_raw() == reference.random_raw()  # (as many draws taken)
    assert 0.45 < numpy.unpackbits(ours)[:model.numel()].mean() < 0.55
    bits = [_mixing.as_bits(t).numpy() for t in (model, base)]
    state = mine.state["state"]["state"]
    for bad in ((bits[0].ravel()[:-1], bits[1], state, limits, ours, n), (*bits, state[:3], limits, ours, n),
                (*bits, state, limits[:-1], ours, n), (*bits, state, limits, ours[:-1], n),
                (model.float().numpy(), bits[1], state, limits, ours, n), (*bits, state, limits, ours, n + 1),
                (*bits, state, limits, ours, 0)):
        with pytest.raises(ValueError, match="magprune: rows × n bf16 model and base"):
            _mixing.native.magprune(*bad)


def test_magprune_in_c_ranks_a_row_spanning_every_pattern():
    """A row whose |τ| runs from the smallest bf16 subnormal to a NaN (every pattern between lies in its
    counts' range, the most there is) gets the same bits as `draw_packed`'s; its sum of |τ| is NaN, and so is
    the kept entries' where the NaN is kept."""
    from adaptkit_plugins.merges import _magprune, _mixing

    if _mixing.native is None:
        pytest.skip("_mix.c is not built here")
    base = torch.zeros(3, 40, dtype=torch.bfloat16)
    model = torch.linspace(-2, 2, 120).reshape(3, 40).to(torch.bfloat16)
    model[1, 4] = torch.tensor([1], dtype=torch.int16).view(torch.bfloat16)  # 2⁻¹³³, pattern 0x0001
    model[1, 9] = float("nan")
    limits = _magprune.thresholds(40, 0.4, 0.3)
    ours, theirs = (numpy.zeros(15, dtype=numpy.uint8) for _ in range(2))
    (total, kept), = _mixing.magprune_sums(model, base, numpy.random.SFC64(2), limits, ours, 3)
    _magprune.draw_packed(torch.sub(model, base).abs_(), 0.4, 0.3, numpy.random.SFC64(2), theirs)
    assert numpy.array_equal(ours, theirs) and math.isnan(total)
    assert math.isnan(kept) == bool(ours[49 // 8] >> 49 % 8 & 1)  # (entry 49: the NaN)


def della_masks(tensors, base, dens, eps, seeds):
    """Each input's keep mask, read off a single-input della_linear run on its own generator."""
    masks = []
    for t, d, e, s in zip(tensors, dens, eps, seeds):
        out = op("della_linear").merge([t], base, weight=1.0, density=d, epsilon=e, rescale=False, generators=seeded(s))
        masks.append((out - base) != 0)
    return masks


@pytest.mark.parametrize("shape", [(60, 50), (3000,), (6, 20, 5)], ids=["matrix", "vector", "3d"])
@pytest.mark.parametrize("name", ["della", "della_linear"])
def test_della_formula(name, shape):
    tensors, base = make(shape)
    x, b = [t.double() for t in tensors], base.double()
    w, dens, eps, lam, seeds = [1.0, 0.5, 0.8], [0.3, 0.5, 0.7], [0.2, 0.1, 0.25], 0.9, [11, 12, 13]
    masks = della_masks(tensors, base, dens, eps, seeds)
    probs = [magprune_probabilities(xi - b, d, e) for xi, d, e in zip(x, dens, eps)]
    for m, p in zip(masks, probs):
        # Bernoulli(p): the kept count within 4 standard deviations, and more of the larger half kept.
        assert abs(m.sum().item() - p.sum().item()) < 4 * math.sqrt((p * (1 - p)).sum().item())
        upper = p > p.median()
        assert m[upper].double().mean() > m[~upper].double().mean()
    rescaled = [m * (xi - b) / p for m, xi, p in zip(masks, x, probs)]
    if name == "della":
        expected = b + lam * disjoint_merge(rescaled, w, normalize=True)
    else:
        expected = b + lam * sum(wi * r for wi, r in zip(w, rescaled))
    out = op(name).merge(tensors, base, weight=w, density=dens, epsilon=eps, rescale="inverse",
                         generators=seeded(*seeds), **{"lambda": lam})
    assert out.shape == base.shape
    assert_close(out.double(), expected, **TIGHT)


@pytest.mark.parametrize("name", ["della", "della_linear"])
def test_della_params_match_mergekit(name):
    spec = mk_registry.get(name).spec
    theirs = {p.name: (None if p.required else p.default) for p in spec.parameters}
    assert dict(op(name).params) == theirs
    assert op(name).per_model == {p.name for p in spec.parameters if p.scope != ParameterScope.SHARED}


DELLA_PEER = [
    ("della", (30, 40), {"weight": [1.0, 0.5, 0.8], "density": [0.3, 0.5, 1.0], "epsilon": [0.1, 0.2, 0.05]}),
    ("della", (30, 40), {"weight": [1.0, -0.5, 0.8], "density": 0.6, "epsilon": 0.3, "lambda": 1.3}),
    ("della_linear", (30, 40), {"weight": [0.4, 0.5, 0.8], "density": 0.5, "normalize": True}),
    ("della_linear", (500,), {"weight": [1.0, 0.5, 0.3], "density": [0.2, 0.6, 0.5], "epsilon": 0.1}),
    ("della", (4, 10, 6), {"weight": [1.0, 0.5, 0.3], "density": 0.5, "epsilon": 0.2}),
]


@pytest.mark.parametrize(("name", "shape", "params"), DELLA_PEER,
                         ids=[f"{name}-{'x'.join(map(str, shape))}" for name, shape, _ in DELLA_PEER])
def test_della_matches_mergekit_given_the_same_draws(monkeypatch, name, shape, params):
    """mergekit draws its masks with torch.bernoulli(p) from the global generator; handed our draws
    instead, it must get our keep probabilities and give our merge (`rescale: true` in both)."""
    from adaptkit_plugins.merges._magprune import keep_probabilities

    tensors, base = make(shape)
    count = len(tensors)
    dens = params["density"] if isinstance(params["density"], list) else [params["density"]] * count
    eps = params.get("epsilon", 0.15)
    eps = eps if isinstance(eps, list) else [eps] * count
    masks = iter([m.float() for m, d in zip(della_masks(tensors, base, dens, eps, [1, 2, 3]), dens) if d < 1])
    seen = []

    def bernoulli(p, *args, **kwargs):
        seen.append(p)
        return next(masks).reshape(p.shape)  # mergekit ranks a vector as one row: (1, n)

    monkeypatch.setattr(torch, "bernoulli", bernoulli)
    theirs = mergekit(name, tensors, base, rescale=True, **params)
    monkeypatch.undo()
    ours = op(name).merge(tensors, base, rescale=True, generators=seeded(1, 2, 3), **params)
    assert_close(ours, theirs, **TIGHT)
    taus = [t - base for t, d in zip(tensors, dens) if d < 1]
    assert len(seen) == len(taus)
    for p, tau, d, e in zip(seen, taus, [d for d in dens if d < 1], [e for e, d in zip(eps, dens) if d < 1]):
        expected = magprune_probabilities(tau.double(), d, e)
        assert_close(p.double().reshape(tau.shape), expected, **TIGHT)
        if tau.dim() == 2:
            assert_close(keep_probabilities(tau.abs(), d, e).double(), expected, **TIGHT)


def test_della_keep_fraction_and_norm_like_mergekit():
    """Random either way: the same keep fraction (density) and, rescaled, the same L1 norm — exactly
    with mergekit's rescale (`true`, also written `l1`), in expectation with the paper's ÷ p (`inverse`)."""
    tensors, base = make((200, 100), count=1)
    tau = tensors[0] - base
    p = magprune_probabilities(tau.double(), 0.35, 0.2)
    torch.manual_seed(0)
    theirs = sparsify(tau, density=0.35, method=SparsificationMethod.della_magprune, epsilon=0.2, rescale_norm="l1")
    ours, ours_l1 = (op("della_linear").merge(tensors, base, weight=1.0, density=0.35, epsilon=0.2, rescale=rescale,
                                              generators=seeded(9)) - base for rescale in ("inverse", "l1"))
    for kept in (theirs, ours, ours_l1):  # Σ Bernoulli(p): within 4 standard deviations of Σ p = 0.35·n
        assert abs((kept != 0).sum().item() - p.sum().item()) < 4 * math.sqrt((p * (1 - p)).sum().item())
    l1 = tau.double().abs().sum().item()
    assert theirs.double().abs().sum().item() == pytest.approx(l1, rel=1e-5)
    assert ours_l1.double().abs().sum().item() == pytest.approx(l1, rel=1e-5)
    # E‖τ'‖₁ = ‖τ‖₁ with variance Σ τ²(1 − p)/p: within 4 standard deviations.
    spread = math.sqrt((tau.double().square() * (1 - p) / p).sum().item())
    assert abs(ours.double().abs().sum().item() - l1) < 4 * spread


@pytest.mark.parametrize("width", [50, 37, 64])
def test_della_replays_its_masks_from_bits_across_blocks(monkeypatch, width):
    """`rescale: true` draws each mask in the L1 pass and replays it, kept as bits, in the merge pass:
    with blocks of a few rows (each filling whole bytes of bits, rows of any width) the merge keeps the
    same entries as a run without rescaling, and matches the L1 norm."""
    from adaptkit_plugins.merges import della

    monkeypatch.setattr(della, "BLOCK", 64)
    tensors, base = make((203, width), count=1)
    kept = {rescale: op("della_linear").merge(tensors, base, weight=1.0, density=0.4, epsilon=0.2, rescale=rescale,
                                              generators=seeded(3)) - base for rescale in (False, True)}
    assert torch.equal(kept[True] != 0, kept[False] != 0) and 0.3 < (kept[True] != 0).float().mean() < 0.5
    tau = tensors[0] - base
    assert kept[True].double().abs().sum().item() == pytest.approx(tau.double().abs().sum().item(), rel=1e-5)


@pytest.mark.parametrize("name", ["della", "della_linear", "dare_ties"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_random_merges_give_the_same_bytes_with_or_without_the_c_passes(monkeypatch, name, dtype):
    """DELLA's and DARE's L1 sums made in C from the models (`_mixing.l1_sums`, DELLA's bits drawn first, or
    with them in one pass: `_mixing.magprune_sums`) and the C mix give the torch passes' bytes: the same draws,
    the same norms (float64 sums either way, rounded once), over blocks of a few rows of a 3-d tensor (ranked
    along dim 1) and a matrix."""
    from adaptkit_plugins.merges import _mixing, della

    if _mixing.native is None:
        pytest.skip("_mix.c is not built here")
    monkeypatch.setattr(della, "BLOCK", 256)
    for shape in ((6, 37, 21), (203, 50)):
        tensors, base = make(shape)
        tensors, base = [t.to(dtype) for t in tensors], base.to(dtype)
        params = {"weight": [1.0, 0.5, 0.8], "density": [0.5, 0.3, 0.7], "rescale": True}
        calls = []
        with monkeypatch.context() as patch:
            for step in ("l1", "magprune"):  # (bf16 DELLA: its draws and sums in one pass)
                patch.setattr(_mixing.native, step, lambda *a, f=getattr(_mixing.native, step): calls.append(1) or f(*a))
            ours = op(name).merge(tensors, base, generators=seeded(1, 2, 3), **params)
        with monkeypatch.context() as patch:
            patch.setattr(_mixing, "native", None)
            theirs = op(name).merge(tensors, base, generators=seeded(1, 2, 3), **params)
        assert calls and torch.equal(ours.contiguous().view(torch.uint8), theirs.contiguous().view(torch.uint8)), shape


@pytest.mark.parametrize("name, params", [
    ("ties", {"density": [0.5, 0.3, 0.7, 0.5, 0.9]}),
    ("breadcrumbs_ties", {"density": 0.6, "gamma": 0.05, "rescale": True}),
    ("della", {"density": 0.5, "epsilon": 0.2, "rescale": True}),
    ("dare_ties", {"density": 0.5, "rescale": True}),
])
def test_one_c_call_for_the_whole_tensor_gives_the_blocks_bytes(monkeypatch, name, params):
    """Where no drop is left to draw (magnitude cuts; DARE's and DELLA's bits, drawn block by block in their
    L1 pass), the C mix takes the whole tensor in one call: the same bytes as the torch passes block by
    block, five inputs (so a stack's last entries are summed interleaved, `_base.interleaved_tail`) over
    blocks of 256 entries and a tensor whose size is no multiple of them."""
    from adaptkit_plugins.merges import _mixing, della, task_arithmetic

    if _mixing.native is None:
        pytest.skip("_mix.c is not built here")
    monkeypatch.setattr(task_arithmetic, "BLOCK", 256)
    monkeypatch.setattr(della, "BLOCK", 256)
    tensors, base = make((37, 61), count=5)
    tensors, base = [t.bfloat16() for t in tensors], base.bfloat16()
    params = {"weight": [1.0, 0.5, 0.8, -0.3, 0.6], **params}
    calls = []
    with monkeypatch.context() as patch:
        patch.setattr(_mixing.native, "mix", lambda *a, f=_mixing.native.mix: calls.append(a[7].size) or f(*a))
        ours = op(name).merge(tensors, base, generators=seeded(1, 2, 3, 4, 5), **params)
    with monkeypatch.context() as patch:
        patch.setattr(_mixing, "native", None)
        theirs = op(name).merge(tensors, base, generators=seeded(1, 2, 3, 4, 5), **params)
    assert calls == [37 * 61] and torch.equal(ours.view(torch.int16), theirs.view(torch.int16))


def test_della_is_deterministic_and_uses_only_its_generators():
    tensors, base = make()
    params = {"weight": [1.0, 0.5, 0.8], "density": 0.5, "epsilon": 0.2}
    state = torch.get_rng_state()
    torch.manual_seed(1)
    first = op("della").merge(tensors, base, generators=seeded(1, 2, 3), **params)
    torch.manual_seed(2)
    again = op("della").merge(tensors, base, generators=seeded(1, 2, 3), **params)
    assert first.numpy().tobytes() == again.numpy().tobytes()
    assert not torch.equal(first, op("della").merge(tensors, base, generators=seeded(4, 5, 6), **params))
    torch.set_rng_state(state)
    op("della").merge(tensors, base, generators=seeded(1, 2, 3), **params)
    assert torch.equal(torch.get_rng_state(), state)


def test_della_computes_in_the_compute_dtype():
    tensors, base = make()
    half, half_base = [t.bfloat16() for t in tensors], base.bfloat16()
    params = {"weight": [1.0, 0.5, 0.8], "density": 0.5, "epsilon": 0.2}
    assert op("della").merge(half, half_base, generators=seeded(1, 2, 3), **params).dtype == torch.bfloat16
    upcast = op("della").merge(half, half_base, generators=seeded(1, 2, 3), dtype=torch.float32, **params)
    same = op("della").merge([t.float() for t in half], half_base.float(), generators=seeded(1, 2, 3), **params)
    assert upcast.dtype == torch.float32 and torch.equal(upcast, same)


@pytest.mark.parametrize("rescale", [False, "inverse"])
def test_della_keeps_float64_task_vectors_float64(rescale):
    """In float64 a kept entry is τ (or τ/p) to float64's precision, not rounded through float32."""
    from adaptkit_plugins.merges._magprune import keep_probabilities

    tensors, base = make((30, 40), count=1)
    tensors, base = [tensors[0].double() + 1e-12], base.double()
    out = op("della_linear").merge(tensors, base, weight=1.0, density=0.5, epsilon=0.2, rescale=rescale,
                                   generators=seeded(4))
    tau = tensors[0] - base
    kept = (out - base) != 0
    expected = tau if rescale is False else tau / keep_probabilities(tau.abs(), 0.5, 0.2).double()
    assert 0.3 < kept.double().mean() < 0.7
    assert_close(out[kept], (base + expected)[kept], rtol=1e-15, atol=0)


def test_della_at_density_one_is_ties_without_trimming():
    tensors, base = make()
    w = [1.0, 0.5, 0.8]
    ours = op("della").merge(tensors, base, weight=w, epsilon=0.9, generators=seeded(1, 2, 3))  # ε unused at density 1
    assert_close(ours, op("ties").merge(tensors, base, weight=w), **TIGHT)


# ---- SCE ------------------------------------------------------------------------------------


def sce_formula(x, b, fraction, lowest_index_first=False):
    """FuseChat's SCE in float64: select by variance, weights ∝ mean τ², erase sign conflicts (tied
    variances at the cut: torch's unstable order as mergekit, or the lowest indices first)."""
    taus = [xi - b for xi in x]
    if fraction < 1:
        var = torch.stack(taus).var(dim=0, unbiased=False)
        k = int((var != 0).sum().item() * fraction)
        keep = torch.zeros(var.numel(), dtype=torch.bool)
        keep[torch.sort(var.reshape(-1), descending=True, stable=lowest_index_first).indices[:k]] = True
        taus = [t * keep.reshape(var.shape) for t in taus]
    energy = [t.square().mean().item() for t in taus]
    eta = [e / sum(energy) for e in energy]
    elected = torch.where(sum(taus) >= 0, 1.0, -1.0).double()
    agree = [torch.sign(t) == elected for t in taus]
    total = sum(e * t * a for e, t, a in zip(eta, taus, agree))
    weight = sum(e * a.double() for e, a in zip(eta, agree))
    return b + total / weight.clamp(min=1e-6)


def test_sce_by_hand():
    base = torch.zeros(5)
    t1, t2 = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0]), torch.tensor([-1.0, 1.0, 0.5, 2.0, 0.5])
    # Σ τ = [0, -1, 1, 2, 3.5] elects [+, −, +, +, +]; mean τ² ∝ 14.25 and 6.5. Where one input
    # agrees it is taken whole; the last position mixes both: (14.25·3 + 6.5·0.5) / (14.25 + 6.5).
    expected = torch.tensor([1.0, -2.0, 0.5, 2.0, 46 / 20.75])
    assert_close(op("sce").merge([t1, t2], base), expected, **TIGHT)
    # select_topk 0.5: variances [1, 2.25, 0, 1, 1.5625], 4 non-zero: keep the 2 largest (positions
    # 1 and 4); then mean τ² ∝ 13 and 1.25, and position 0 (both zero) agrees with no sign.
    selected = torch.tensor([0.0, -2.0, 0.0, 0.0, (13 * 3 + 1.25 * 0.5) / 14.25])
    assert_close(op("sce").merge([t1, t2], base, select_topk=0.5), selected, **TIGHT)


def test_sce_erases_signs_to_mergekits_bytes_where_a_weight_is_zero():
    """SCE's erase step by flipped signs (σ·Σ relu(σ·τᵢ)·ηᵢ) against mergekit where an input's matrix
    weight is 0 (its squares underflow in float16) yet its τ elects the sign: nothing is left there,
    and the result is mergekit's +0 on a base of -0, not -0; and on ordinary float16 and bf16 inputs."""
    base = torch.full((4, 8), -0.0, dtype=torch.float16)
    small = torch.full((4, 8), -1e-4, dtype=torch.float16)  # τ² = 1e-8 rounds to 0 in float16: η = 0
    big = torch.zeros(4, 8, dtype=torch.float16)
    big[:, :3] = 0.5
    ours, theirs = op("sce").merge([small, big], base), mergekit("sce", [small, big], base)
    assert torch.equal(ours.view(torch.int16), theirs.view(torch.int16))
    assert not torch.signbit(ours[:, 3:]).any()
    for dtype in (torch.float16, torch.bfloat16):
        tensors, base = make(changed=0.7, seed=3)
        tensors, base = [t.to(dtype) for t in tensors], base.to(dtype)
        assert torch.equal(op("sce").merge(tensors, base, select_topk=0.6).view(torch.int16),
                           mergekit("sce", tensors, base, select_topk=0.6).view(torch.int16))


@pytest.mark.parametrize("fraction", [1.0, 0.3, 0.75])
def test_sce_formula(fraction):
    tensors, base = make(changed=0.5)
    out = op("sce").merge(tensors, base, select_topk=fraction)
    assert_close(out.double(), sce_formula([t.double() for t in tensors], base.double(), fraction), **TIGHT)


def test_sce_tie_break_index_keeps_tied_variances_lowest_index_first_without_topk(monkeypatch):
    """tie_break: index — of the positions whose variance ties at the cut, the first in flat order are
    kept (the formula above with a stable sort); torch.topk's whole copy never runs; on data without
    ties the bytes are the default's (mergekit's)."""
    g = torch.Generator().manual_seed(5)
    base = torch.zeros(30, 40)
    tensors = [torch.randint(-2, 3, (30, 40), generator=g).double() for _ in range(3)]  # few variances: ties
    with monkeypatch.context() as m:
        m.setattr(torch, "topk", lambda *a, **k: pytest.fail("torch.topk ran"))
        out = op("sce").merge(tensors, base.double(), select_topk=0.3, tie_break="index")
    assert_close(out, sce_formula(tensors, base.double(), 0.3, lowest_index_first=True), **TIGHT)
    assert not torch.equal(out, op("sce").merge(tensors, base.double(), select_topk=0.3))  # ties were cut
    plain, plain_base = make(changed=0.5)
    assert torch.equal(op("sce").merge(plain, plain_base, select_topk=0.3, tie_break="index"),
                       op("sce").merge(plain, plain_base, select_topk=0.3))


# ---- RAM ------------------------------------------------------------------------------------


def ram_formula(x, b, epsilon, r=None, alpha=None):
    """RAM: unique changes whole, shared ones averaged; RAM+ (r, α given): unique ones × λᵢ."""
    taus = [xi - b for xi in x]
    changed = [t.abs() > epsilon for t in taus]
    count = sum(c.long() for c in changed)
    lam = [1.0] * len(taus)
    if r is not None:
        for i, c in enumerate(changed):
            unique, shared = (c & (count == 1)).sum().item(), (c & (count > 1)).sum().item()
            lam[i] = 1 + r * min(max(shared / max(unique, epsilon), 0), alpha) if unique else 1.0
    return b + sum(t * c * torch.where(count == 1, li, 1 / count.clamp(min=1).double())
                   for t, c, li in zip(taus, changed, lam))


def test_ram_by_hand():
    base = torch.zeros(5)
    t1 = torch.tensor([0.5, 0.0, 0.2, 1e-6, 0.3])
    t2 = torch.tensor([0.3, 0.4, 0.0, 0.0, -0.3])
    t3 = torch.tensor([0.1, 0.0, 0.0, 0.0, 0.0])
    # shared by 3: mean 0.3; unique: 0.4 and 0.2; below ε: 0; shared by 2: mean 0.
    assert_close(op("ram").merge([t1, t2, t3], base), torch.tensor([0.3, 0.4, 0.2, 0.0, 0.0]), **TIGHT)
    # RAM+: inputs 1 and 2 share 2 positions and own 1 each: ρ = 2, clipped to α = 0.5; λ = 1 + 0.1·0.5.
    plus = op("ramplus_tl").merge([t1, t2, t3], base, r=0.1, alpha=0.5)
    assert_close(plus, torch.tensor([0.3, 0.4 * 1.05, 0.2 * 1.05, 0.0, 0.0]), **TIGHT)


@pytest.mark.parametrize(("name", "params"), [
    ("ram", {}), ("ram", {"epsilon": 0.02}), ("ramplus_tl", {}), ("ramplus_tl", {"r": 0.05, "alpha": 1.0}),
    ("ramplus_tl", {"r": 0.3, "alpha": 2.0, "epsilon": 0.0}),
])
def test_ram_formula(name, params):
    tensors, base = make(changed=0.3)
    out = op(name).merge(tensors, base, **params)
    extra = {"r": params.get("r", 0.1), "alpha": params.get("alpha", 0.2)} if name == "ramplus_tl" else {}
    expected = ram_formula([t.double() for t in tensors], base.double(), params.get("epsilon", 1e-5), **extra)
    assert_close(out.double(), expected, **TIGHT)


def test_ramplus_input_without_unique_entries_gets_no_nan():
    base = torch.zeros(4)
    same = torch.tensor([0.5, 0.5, 0.0, 0.0])
    out = op("ramplus_tl").merge([same, same.clone(), torch.zeros(4)], base, epsilon=0.0)
    assert torch.equal(out, same)
    assert mergekit("ramplus_tl", [same, same.clone(), torch.zeros(4)], base, epsilon=0.0).isnan().any()


# ---- deterministic methods against mergekit, in the dtype the tensors come in --------------------

PEERS = [
    ("sce", {}), ("sce", {"select_topk": 0.5}), ("sce", {"select_topk": 0.1, "int8_mask": True}),
    ("ram", {}), ("ram", {"epsilon": 0.02}),
    ("ramplus_tl", {}), ("ramplus_tl", {"r": 0.05, "alpha": 1.0}), ("ramplus_tl", {"r": 0.5, "epsilon": 0.01}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(("name", "params"), PEERS, ids=lambda v: v if isinstance(v, str) else None)
def test_matches_mergekit_bytes(name, params, dtype):
    for shape, changed in [((40, 50), 0.3), ((40, 50), 1.0), ((300,), 0.5), ((4, 5, 6), 0.5)]:
        tensors, base = make(shape, changed=changed)
        tensors, base = [t.to(dtype) for t in tensors], base.to(dtype)
        ours, theirs = op(name).merge(tensors, base, **params), mergekit(name, tensors, base, **params)
        assert ours.dtype == theirs.dtype and torch.equal(ours, theirs), (shape, changed)


@pytest.fixture
def two_threads():
    """torch on 2 threads: reductions above torch's grain size split across them (CI has 2 cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("rows", [1, 2, 3])
def test_row_mean_is_the_mean_torch_takes_of_that_row_among_all(two_threads, rows):
    from plugins.merges.sce import row_mean

    g = torch.Generator().manual_seed(rows)
    squares = (torch.randn(rows, 700_001, generator=g) * 1e-2).bfloat16().float().square()
    whole = squares.mean(dim=1)
    assert torch.equal(torch.stack([row_mean(r, rows) for r in squares]), whole)
    if rows > 1:  # the row alone sums in other pieces: the test can tell
        assert not torch.equal(torch.stack([r.mean() for r in squares]), whole)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("rows", [1, 2, 3, 5])
def test_variance_is_torchs_var_to_the_byte(two_threads, dtype, rows):
    """SCE's selection variances: Welford's updates over all columns at once (`sce.variance`) against
    torch's column-by-column kernel, on values spread over e^±6 and columns of equal values."""
    from plugins.merges.sce import variance

    g = torch.Generator().manual_seed(rows)
    n = 1 << 20
    stacked = (torch.randn(rows, n, generator=g) * torch.exp(torch.randn(rows, n, generator=g) * 2) * 1e-3).to(dtype)
    stacked[:, : n // 8] = stacked[0, : n // 8].clone()  # zero variance
    got, expected = variance(stacked), torch.var(stacked, dim=0, unbiased=False)
    assert got.dtype == expected.dtype and torch.equal(got, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("name", "params"), [("sce", {}), ("sce", {"select_topk": 0.5}), ("ram", {}),
                                              ("ramplus_tl", {"r": 0.5})], ids=lambda v: v if isinstance(v, str) else None)
def test_matches_mergekit_bytes_on_tensors_big_enough_to_split(two_threads, dtype, name, params):
    """Sums and reductions over 700k entries on 2 threads, where torch splits work across them."""
    tensors, base = make((700, 1000), changed=0.5)
    tensors, base = [t.to(dtype) for t in tensors], base.to(dtype)
    assert torch.equal(op(name).merge(tensors, base, **params), mergekit(name, tensors, base, **params))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("n", [1, 16_383, 1 << 14, 3 * (1 << 14) + 5, 700_001])
def test_row_sums_do_not_depend_on_the_thread_count(two_threads, dtype, n):
    """`row_sums` (the exact counts of `count_ones`): partial sums over runs of ROW entries, each one
    thread's serial sum, so 1 and 2 threads give the same floats, and their math.fsum is the sum."""
    from plugins.merges._select import ROW, row_sums

    g = torch.Generator().manual_seed(n)
    block = (torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 3)).to(dtype)
    two = row_sums(block.abs())
    torch.set_num_threads(1)
    one = row_sums(block.abs())
    assert one == two and len(one) == -(-n // ROW)
    assert math.fsum(one) == pytest.approx(block.double().abs().sum().item(), rel=1e-6)


@pytest.mark.parametrize(("name", "params"), [("dare_linear", {"density": 0.4}), ("dare_ties", {"density": 0.6}),
                                              ("della", {"density": 0.5}), ("della_linear", {"density": 0.7})],
                         ids=lambda v: v if isinstance(v, str) else None)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_random_merges_do_not_depend_on_the_thread_count(two_threads, name, params, dtype):
    """L1 rescaling over a tensor above torch's grain size on 2 threads, then 1: the same bytes (a
    merge's result depends on its recipe and seed only, as the README promises for `--threads`)."""
    tensors, base = make((700, 1000))
    tensors, base = [t.to(dtype) for t in tensors], base.to(dtype)
    params = {"weight": [0.3, 0.5, 0.4], **params}
    two = op(name).merge(tensors, base, generators=seeded(1, 2, 3), **params)
    torch.set_num_threads(1)
    assert torch.equal(op(name).merge(tensors, base, generators=seeded(1, 2, 3), **params), two)


@pytest.mark.parametrize("name", ["sce", "ram", "ramplus_tl"])
def test_params_match_mergekit(name):
    spec = mk_registry.get(name).spec
    ours = {k: v for k, v in op(name).params.items() if k != "tie_break"}  # tie_break: an addition (SCE)
    assert ours == {p.name: p.default for p in spec.parameters}
    assert not op(name).per_model and all(p.scope == ParameterScope.SHARED for p in spec.parameters)


# ---- bad parameters, options, registry -----------------------------------------------------------

BAD = [
    ("della", {"weight": 1.0, "density": 0.66, "epsilon": 1.35}, "density ± epsilon must lie in \\(0, 1\\)"),
    ("della", {"weight": 1.0, "density": 0.1, "epsilon": 0.1}, "density ± epsilon"),
    ("della_linear", {"weight": 1.0, "density": [0.5, 0.9, 0.5], "epsilon": 0.1}, "density ± epsilon"),
    ("della", {"weight": 1.0, "density": 0.5, "epsilon": -0.1}, "epsilon must be ≥ 0"),
    ("della", {"weight": 1.0, "density": 0.0}, "density must be in"),
    ("della", {"weight": 1.0, "density": 0.5, "epsilon": "wide"}, "'epsilon' must be a finite number"),
    ("della", {"weight": 1.0, "density": 0.5, "epsilom": 0.1}, "did you mean 'epsilon'"),
    ("della_linear", {"weight": 1.0, "density": 0.5, "rescale": "l2"}, "rescale"),
    ("sce", {"select_topk": 0.0}, "select_topk must be a fraction in \\(0, 1\\]"),
    ("sce", {"select_topk": 1.5}, "select_topk"),
    ("sce", {"int8_mask": "yes"}, "int8_mask"),
    ("sce", {"select_topk": 0.5, "tie_break": "random"}, "tie_break must be 'mergekit'"),
    ("sce", {"weight": 1.0}, "unknown parameter 'weight'"),
    ("ram", {"epsilon": -1e-5}, "epsilon .* must be ≥ 0"),
    ("ramplus_tl", {"alpha": -0.2}, "alpha .* must be ≥ 0"),
    ("ramplus_tl", {"r": float("nan")}, "'r' must be a finite number"),
]


@pytest.mark.parametrize(("name", "params", "message"), BAD)
def test_bad_parameters_are_one_line_errors(name, params, message):
    tensors, base = make()
    extra = {"generators": seeded(1, 2, 3)} if op(name).random else {}
    with pytest.raises(AdaptkitError, match=message) as info:
        op(name).merge(tensors, base, **params, **extra)
    assert "\n" not in str(info.value) and str(info.value).startswith(name)


@pytest.mark.parametrize(("density", "epsilon"), [(0.66, 1.35), (0.1, 0.1), (0.9, 0.1)])
def test_mergekit_refuses_the_same_epsilons(density, epsilon):
    tau = make()[0][0]
    with pytest.raises(ValueError, match="density \\+/- epsilon"):
        sparsify(tau, density=density, method=SparsificationMethod.della_magprune, epsilon=epsilon)


@pytest.mark.parametrize("name", NAMES)
def test_options_base_and_registry(name):
    from adaptkit import spec

    obj = op(name)
    expected = {"random": name.startswith("della"), "elementwise": name == "ram", "takes_base": True,
                "block_upcast": name.startswith("della")}
    assert {key: spec.option(obj, key) for key in expected} == expected
    line, problem = registry.describe(registry.entry("merge", name))
    assert problem is None and line and "\n" not in line
    text = getattr(obj, "about", "") or type(obj).__doc__
    assert text.splitlines()[0] == line and "arXiv" in text
    tensors, _ = make()
    extra = {"generators": seeded(1, 2, 3), "weight": 1.0} if obj.random else {}
    with pytest.raises(AdaptkitError, match="needs a base model"):
        obj.merge(tensors, None, **extra)


# ---- end to end: `adaptkit merge` beside mergekit on the same recipe ----------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny Llama base and two fine-tunes, each changing a random 40% of the weights (float32)."""
    root = tmp_path_factory.mktemp("models_b")
    tiny_llama(seed=0).save_pretrained(root / "base")
    for i in (1, 2):
        ft = tiny_llama(seed=0)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in ft.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02 * (torch.rand(p.shape, generator=g) < 0.4))
        ft.save_pretrained(root / f"ft{i}")
    return root


def both_merge(models, tmp_path, method, parameters, model_parameters=None, dtype="float32"):
    """The recipe run by `adaptkit merge` and by mergekit: both outputs' tensors, and ours' messages."""
    from click.testing import CliRunner
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions
    from mergekit.merge import run_merge as mk_run

    from adaptkit.cli import cli

    recipe = {"merge_method": method, "base_model": str(models / "base"), "dtype": dtype,
              "parameters": parameters,
              "models": [{"model": str(models / f"ft{i}"), **({"parameters": p} if p else {})}
                         for i, p in zip((1, 2), model_parameters or [None, None])]}
    (tmp_path / "recipe.yml").write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(cli, ["merge", str(tmp_path / "recipe.yml"), "-o", str(tmp_path / "ours")])
    assert result.exit_code == 0, result.output
    mk_run(MergeConfiguration.model_validate(yaml.safe_load((tmp_path / "recipe.yml").read_text())),
           str(tmp_path / "mk"), MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True,
                                              lazy_unpickle=False))
    return state(tmp_path / "ours"), state(tmp_path / "mk"), result.output


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(("method", "parameters"), [
    ("sce", {"select_topk": 0.5}), ("ram", {}), ("ramplus_tl", {"r": 0.05, "alpha": 1.0}),
])
def test_end_to_end_equals_mergekit(models, tmp_path, method, parameters, dtype):
    # mergekit's own recipes for these methods (its test suite) give weights, which it ignores.
    ours, theirs, output = both_merge(models, tmp_path, method, parameters, [{"weight": 0.6}, {"weight": 0.4}], dtype)
    assert f"'{method}' does not use 'weight'" in output
    assert set(ours) == set(theirs)
    # Without `out_dtype` mergekit writes what the method returns: ramplus_tl's λ is float32, so from
    # bfloat16 inputs it writes float32; adaptkit writes `dtype`, that float32 result rounded once.
    returned = torch.float32 if method == "ramplus_tl" else getattr(torch, dtype)
    for name, tensor in theirs.items():
        assert ours[name].dtype == getattr(torch, dtype) and tensor.dtype == returned, name
        assert torch.equal(ours[name], tensor.to(ours[name].dtype)), name
    base = state(models / "base")
    assert sum(not torch.equal(tensor, base[name].to(tensor.dtype)) for name, tensor in theirs.items()) > len(base) // 2


def test_della_end_to_end_like_mergekit(models, tmp_path):
    """mergekit's own della test recipe: random on both sides, so the same fraction of weights
    changed and about the same size of change (L1) over the model."""
    ours, theirs, _ = both_merge(models, tmp_path, "della", {"density": 0.66, "epsilon": 0.05, "lambda": 0.5},
                              [{"weight": 0.6}, {"weight": 0.4}])
    base = state(models / "base")
    n = sum(t.numel() for t in base.values())
    changed = lambda out: sum(((out[k] - base[k]) != 0).sum().item() for k in base) / n  # noqa: E731
    size = lambda out: sum((out[k] - base[k]).abs().sum().item() for k in base)  # noqa: E731
    f = changed(ours)
    assert 0.3 < f < 0.7  # two inputs, each changing 40% of the weights, each change kept with p ≈ 0.66
    assert abs(f - changed(theirs)) < 5 * math.sqrt(2 * f * (1 - f) / n)  # two independent draws
    assert size(ours) == pytest.approx(size(theirs), rel=0.02)
