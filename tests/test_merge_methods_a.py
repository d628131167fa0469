"""nuslerp, multislerp, karcher, nearswap and arcee_fusion: each against its formula written out
here (float64, plain torch and math), against mergekit's own code on the same tensors (bf16, fp16
and float32: the same bytes), bad parameters, and a whole merge of tiny models against mergekit's
run_merge on the same recipe.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from mergekit.merge_methods import registry as mk_registry
from mergekit.merge_methods.base import BasePolicy, ParameterScope, TensorGroup
from torch.testing import assert_close

from adaptkit import registry, spec
from adaptkit.errors import AdaptkitError
from adaptkit.merge.engine import run_merge
from builders import llama_finetunes, state

NAMES = ["nuslerp", "multislerp", "karcher", "nearswap", "arcee_fusion"]
EXACT = dict(rtol=1e-12, atol=1e-12)  # float64 inputs against float64 formulas


def op(name):
    return registry.get("merge", name)


def make(shape=(6, 10), count=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    tensors = [base + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(count)]
    return [t.to(dtype) for t in tensors], base.to(dtype)


def mergekit(name, tensors, base=None, **params):
    inputs = ([base] if base is not None else []) + list(tensors)
    group = TensorGroup.from_tensors(inputs, base_index=0 if base is not None else None)
    return mk_registry.get(name)([group], parameters=params)[0]


# ---- the formulas, written out --------------------------------------------------------------


def slerp_rows(a, b, t):
    """Each row of a toward the same row of b: sin-weighted on the great circle, lerp when parallel."""
    rows = []
    for x, y in zip(a, b):
        cos = max(-1.0, min(1.0, float(x @ y) / (float(x.norm()) * float(y.norm()))))
        if 1 - cos**2 <= 1e-16:
            rows.append((1 - t) * x + t * y)
        else:
            omega = math.acos(cos)
            rows.append((math.sin((1 - t) * omega) * x + math.sin(t * omega) * y) / math.sin(omega))
    return torch.stack(rows)


@pytest.mark.parametrize("weights, t", [([0.3, 0.7], 0.7), ([2.0, 1.0], 1 / 3), ([-0.5, 0.5], 0.5)],
                         ids=["0.7", "third", "sum-zero"])
@pytest.mark.parametrize("layout", ["flatten", "rows", "columns"])
@pytest.mark.parametrize("with_base", [False, True], ids=["no-base", "base"])
def test_nuslerp_formula(weights, t, layout, with_base):
    (a, b), base = make(count=2)
    b[0] = 2.5 * a[0] if not with_base else base[0] + 2.5 * (a[0] - base[0])  # one parallel row: lerp there
    x, y = (a - base, b - base) if with_base else (a, b)
    expected = {"flatten": lambda: slerp_rows(x.reshape(1, -1), y.reshape(1, -1), t).reshape(x.shape),
                "rows": lambda: slerp_rows(x, y, t), "columns": lambda: slerp_rows(x.T, y.T, t).T}[layout]()
    params = {"weight": weights, "nuslerp_flatten": layout == "flatten", "nuslerp_row_wise": layout == "columns"}
    ours = op("nuslerp").merge([a, b], base if with_base else None, **params)
    assert_close(ours, expected + base if with_base else expected, **EXACT)


def multislerp_formula(xs, weights, normalize=True, eps=1e-8):
    flat = [x.reshape(-1) for x in xs]
    w = [wi / sum(weights) for wi in weights] if normalize else weights
    units = [f / (f.norm() + eps) for f in flat]
    m = sum(wi * u for wi, u in zip(w, units))
    m = m / m.norm()
    v = sum(wi * (u - (u @ m) * m) for wi, u in zip(w, units))
    s = float(v.norm()) + eps
    out = (m * math.cos(s) + v * math.sin(s) / s) * sum(wi * float(f.norm()) for wi, f in zip(w, flat))
    return out.reshape(xs[0].shape)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("with_base", [False, True], ids=["no-base", "base"])
def test_multislerp_formula(normalize, with_base):
    tensors, base = make(count=3)
    w = [0.2, 0.5, 0.9]
    xs = [t - base for t in tensors] if with_base else tensors
    expected = multislerp_formula(xs, w, normalize) + (base if with_base else 0)
    ours = op("multislerp").merge(tensors, base if with_base else None, weight=w, normalize_weights=normalize)
    assert_close(ours, expected, **EXACT)


def test_multislerp_by_hand():
    # Equal weights on orthonormal directions: the tangent step cancels, leaving their normalized sum
    # times the mean norm; two antipodal inputs fall back to the weighted sum. (ε = 1e-8 in ‖x‖ + ε
    # moves these values by about 1e-9.)
    e, near = torch.eye(3, dtype=torch.float64), dict(rtol=1e-8, atol=1e-8)
    assert_close(op("multislerp").merge([e[0], 3 * e[1]], None, weight=1.0),
                 torch.tensor([2, 2, 0], dtype=torch.float64) / math.sqrt(2), **near)
    assert_close(op("multislerp").merge([e[0], 2 * e[1], 3 * e[2]], None, weight=1.0),
                 torch.full((3,), 2 / math.sqrt(3), dtype=torch.float64), **near)
    x = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    assert_close(op("multislerp").merge([x, -x], None, weight=[0.5, 0.5]), torch.zeros(3, dtype=torch.float64))
    assert torch.equal(op("multislerp").merge([x], None, weight=2.0), x)


def test_karcher_by_hand():
    # Two inputs: the spherical midpoint (the normalized sum of the unit vectors) times the mean norm.
    a, b = torch.tensor([2.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 4.0], dtype=torch.float64)
    assert_close(op("karcher").merge([a, b]), torch.tensor([3, 3], dtype=torch.float64) / math.sqrt(2), **EXACT)
    # Inputs no longer than tol count only toward the norm; all of them that short give zeros.
    tiny = torch.tensor([1e-7, 0.0], dtype=torch.float64)
    assert_close(op("karcher").merge([a, b, tiny]), torch.tensor([2, 2], dtype=torch.float64) / math.sqrt(2)
                 + (1e-7 / 3) / math.sqrt(2), **EXACT)
    assert torch.equal(op("karcher").merge([tiny, tiny]), torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize("shape", [(6, 10), (40,)])
def test_karcher_formula(shape):
    tensors, _ = make(shape=shape, count=4)
    units = [t.reshape(-1) / t.norm() for t in tensors]
    scale = sum(float(t.norm()) for t in tensors) / 4
    # No iteration: the normalized arithmetic mean of the directions.
    start = sum(units) / sum(units).norm()
    assert_close(op("karcher").merge(tensors, max_iter=0), (scale * start).reshape(shape), **EXACT)
    # Converged: the Riemannian gradient Σᵢ log_m(uᵢ) = Σᵢ Ωᵢ/sin Ωᵢ·(uᵢ − cos Ωᵢ·m) vanishes, m on the sphere.
    m = op("karcher").merge(tensors, max_iter=100, tol=1e-14).reshape(-1) / scale
    gradient = sum(math.acos(float(u @ m)) / math.sin(math.acos(float(u @ m))) * (u - (u @ m) * m) for u in units)
    assert abs(float(m.norm()) - 1) < 1e-12 and float(gradient.norm()) < 1e-10
    assert float((m - start).norm()) > 1e-4  # the iteration moved: the check above is not the start


def test_nearswap_by_hand():
    base = torch.tensor([0.0, 0.0, 0.0, 1.0, 2.0], dtype=torch.float64)
    other = torch.tensor([0.05, 0.2, -1.0, 1.0, 2.5], dtype=torch.float64)
    # w = clamp(0.1 / |Δ|, 0, 1) = [1, 0.5, 0.1, 1 (Δ = 0), 0.2]; θ = w·other + (1 − w)·base
    expected = torch.tensor([0.05, 0.1, -0.1, 1.0, 2.1], dtype=torch.float64)
    assert_close(op("nearswap").merge([other], base, t=0.1), expected, **EXACT)
    assert torch.equal(op("nearswap").merge([other], base, t=0.0), base)


def arcee_fusion_formula(base, other):
    """Importance |Δ|·KL(softmax(other row) + ε ‖ softmax(base row) + ε), cut at Q₂ + 1.5·IQR."""
    eps, rows = 1e-8, []
    for x, y in zip(other.tolist(), base.tolist()):
        p = [math.exp(v) / sum(math.exp(u) for u in x) + eps for v in x]
        q = [math.exp(v) / sum(math.exp(u) for u in y) + eps for v in y]
        rows.append(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)))
    scores = (other - base).abs() * torch.tensor(rows, dtype=torch.float64).unsqueeze(-1)
    ordered, last = sorted(scores.reshape(-1).tolist()), scores.numel() - 1
    q1, q2, q3 = ordered[last // 4], ordered[last // 2], ordered[3 * last // 4]
    mask = (scores >= q2 + 1.5 * (q3 - q1)).double()
    return base + (other - base) * mask, mask


def test_arcee_fusion_formula():
    (other,), base = make(shape=(8, 12), count=1)
    other[2, 3] += 4.0  # an outlier change: it must come through
    other[5] = base[5] + 1.5  # a uniform shift: the row's softmax is the base's, so KL ≈ 0 there
    expected, mask = arcee_fusion_formula(base, other)
    assert 0 < mask.sum() < mask.numel() and mask[2, 3] == 1 and mask[5].sum() == 0
    assert_close(op("arcee_fusion").merge([other], base), expected, **EXACT)


# ---- against mergekit ------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_params_and_base_policy_match_mergekit(name):
    mk = mk_registry.get(name).spec
    assert dict(op(name).params) == {p.name: (None if p.required else p.default) for p in mk.parameters}
    assert op(name).per_model == {p.name for p in mk.parameters if p.scope != ParameterScope.SHARED}
    # mergekit's IGNORED base is one more input (adaptkit's takes_base False); the others use it as the base.
    assert spec.option(op(name), "takes_base") == (mk.contract.base != BasePolicy.IGNORED)


PEERS = {  # name: (input models, with a base, parameters)
    "nuslerp": (2, False, {"weight": [0.3, 0.7]}),
    "nuslerp-base": (2, True, {"weight": [0.6, 0.4]}),
    "nuslerp-rows": (2, True, {"weight": [1.0, 2.0], "nuslerp_flatten": False}),
    "nuslerp-columns": (2, False, {"weight": [0.5, 0.5], "nuslerp_flatten": False, "nuslerp_row_wise": True}),
    "nuslerp-sum-zero": (2, True, {"weight": [-0.5, 0.5], "nuslerp_flatten": False}),
    "multislerp": (3, False, {"weight": [0.2, 0.5, 0.3]}),
    "multislerp-base": (3, True, {"weight": [0.4, 1.0, 0.6], "normalize_weights": False, "eps": 1e-6}),
    "karcher": (3, False, {}),
    "karcher-short": (4, False, {"max_iter": 2, "tol": 1e-3}),
    "nearswap": (1, True, {"t": 0.05}),
    "arcee_fusion": (1, True, {}),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", PEERS)
def test_same_bytes_as_mergekit(case, dtype):
    """Every step in mergekit's order in the inputs' dtype: equal bytes, not merely close ones."""
    count, with_base, params = PEERS[case]
    tensors, base = make(shape=(24, 40), count=count, seed=3, dtype=dtype)
    base = base if with_base else None
    name = case.split("-")[0]
    ours = op(name).merge(tensors, base, **params)
    theirs = mergekit(name, tensors, base, **params)
    assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)


@pytest.mark.parametrize("shape", [(), (1,), (5, 1)], ids=str)
@pytest.mark.parametrize("case", PEERS)
def test_scalars_and_single_entries_as_mergekit(case, shape):
    """Scalars (shape (): Apertus's activation parameters), single entries and one-entry rows: mergekit's
    values in its shape (arcee_fusion once failed on a scalar: it has no last axis). mergekit's karcher
    returns a float32 scalar for half-precision ones (its float32 norm times its mean, both scalars,
    promote), which it writes as float32; adaptkit keeps the inputs' dtype: mergekit's value rounded once."""
    count, with_base, params = PEERS[case]
    tensors, base = make(shape=shape, count=count, seed=5, dtype=torch.bfloat16)
    base = base if with_base else None
    name = case.split("-")[0]
    ours, theirs = op(name).merge(tensors, base, **params), mergekit(name, tensors, base, **params)
    if name == "karcher" and shape == ():
        assert theirs.dtype == torch.float32
        theirs = theirs.bfloat16()
    assert ours.shape == theirs.shape == shape and ours.dtype == theirs.dtype and torch.equal(ours, theirs)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("directions", ["apart", "close"])
def test_karcher_dots_side_by_side_give_mergekits_bytes(monkeypatch, threads, dtype, directions):
    """With two threads, karcher takes its half-precision inputs' dots side by side, each unit vector in
    its own slot of the scratch buffer (float32 ones, one slot: in turn). One thread or two, over several
    iterations (directions far apart) or none (all within tol of the first mean, so no tangent is made),
    mergekit's bytes."""
    from adaptkit_plugins.merges import karcher

    calls, tangents = [], []
    side_by_side, zeros_like = karcher._side_by_side, torch.zeros_like
    monkeypatch.setattr(karcher, "_side_by_side", lambda *a: calls.append(a[2]) or side_by_side(*a))
    monkeypatch.setattr(karcher, "SIDE_BY_SIDE_MIN", 0)  # (these 3200 entries would take their dots in turn)
    monkeypatch.setattr(karcher.torch, "zeros_like", lambda *a, **k: tangents.append(1) or zeros_like(*a, **k))
    tensors, _ = make(shape=(64, 50), count=3, seed=7, dtype=dtype)
    if directions == "apart":
        tensors = [t * s + d for t, s, d in zip(tensors, (1.0, 3.0, 0.5), (0.0, 0.5, -0.3))]
    else:
        tensors = [(tensors[0].double() * s + 1e-4 * t.double()).to(dtype) for t, s in zip(tensors, (1.0, 2.0, 0.7))]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ours = op("karcher").merge(tensors, None, max_iter=6)
    finally:
        torch.set_num_threads(before)
    ours_zeros = len(tangents)  # (before mergekit's own zeros_like calls)
    theirs = mergekit("karcher", tensors, None, max_iter=6)
    assert torch.equal(ours, theirs)
    parallel = threads == 2 and dtype == torch.bfloat16
    assert calls == ([2] * len(calls) if parallel else [])
    if directions == "apart":
        assert len(calls) >= (3 if parallel else 0) and ours_zeros == 2  # iterated; one tangent (+ the mean's zeros)
    else:
        assert len(calls) == parallel and ours_zeros == 1  # one pass of dots, no tangent: only the mean's zeros


# (dtype, seed, shape, count) of `make` inputs whose means come back within a few iterations (measured:
# 7 to 33 iterations run of 200)
CYCLING = [(torch.bfloat16, 2, (16, 24), 2), (torch.bfloat16, 7, (16, 24), 3), (torch.float16, 0, (64, 64), 2),
           (torch.float16, 2, (64, 64), 2)]


@pytest.mark.parametrize("max_iter", [200, 201])
@pytest.mark.parametrize("dtype, seed, shape, count", CYCLING)
def test_karcher_leaves_a_cycle_with_the_bytes_of_every_iteration(monkeypatch, dtype, seed, shape, count, max_iter):
    """Half-precision means come back to earlier ones; from there the iteration is skipped ahead to the
    mean max_iter iterations would give. mergekit runs every iteration: the same bytes, for an odd and
    an even number of iterations left, with far fewer iterations run here."""
    from adaptkit_plugins.merges import karcher

    ran = []
    ends = karcher.Cycle.ends
    monkeypatch.setattr(karcher.Cycle, "ends", lambda self, i, m: ran.append(i) or ends(self, i, m))
    tensors, _ = make(shape=shape, count=count, seed=seed, dtype=dtype)
    ours = op("karcher").merge(tensors, None, max_iter=max_iter, tol=1e-10)
    theirs = mergekit("karcher", tensors, None, max_iter=max_iter, tol=1e-10)
    assert torch.equal(ours.view(torch.int16), theirs.view(torch.int16))
    assert max(ran) < 40


def test_karcher_cycle_check_is_exact():
    """A fingerprint seen again is only a candidate: the skip needs the mean itself, bit for bit, again.
    Here the mean flips between +0 and -0 in one entry under an unchanging fingerprint (as the loop runs:
    `ends`, the state's fingerprint, the update): no skip until a state really repeats."""
    from adaptkit_plugins.merges.karcher import Cycle

    mean = torch.tensor([1.0, 0.0], dtype=torch.bfloat16)
    cycle = Cycle(mean)
    for iteration, following in enumerate([-0.0, 0.0, -0.0, -0.0]):
        assert not cycle.ends(iteration, 100), iteration  # the candidate of period 1 fails on ±0 each time
        cycle.note(torch.tensor(0.5))
        cycle.seen(iteration, torch.tensor(0.25))
        mean[1] = following
    assert cycle.ends(4, 100) and cycle.stop == 4  # -0 after -0: the same bits, a fixed point: done


@pytest.mark.parametrize("written, meant", [(1.0, True), (1, True), (0.0, False), (0, False)])
def test_flags_written_as_numbers_read_as_mergekit_reads_them(written, meant):
    """Published recipes write `normalize: 1.0`; mergekit reads it as true. 0.5 means nothing: refused."""
    tensors, base = make(shape=(8, 12), count=2, seed=5, dtype=torch.bfloat16)
    params = {"weight": [0.3, 0.6], "density": 0.5}
    assert torch.equal(op("ties").merge(tensors, base, normalize=written, **params),
                       op("ties").merge(tensors, base, normalize=meant, **params))
    with pytest.raises(AdaptkitError, match=r"'normalize' must be true or false \(or 1 or 0\), got 0.5"):
        op("ties").merge(tensors, base, normalize=0.5, **params)


# ---- bad input --------------------------------------------------------------------------------

BAD = [  # name, inputs, with a base, parameters, message
    ("nuslerp", 2, False, {}, "'weight' is required"),
    ("nuslerp", 3, False, {"weight": 1.0}, "exactly 2"),
    ("nuslerp", 2, False, {"weight": 1.0, "nuslerp_flatten": "no"}, "'nuslerp_flatten' must be true or false"),
    ("nuslerp", 2, False, {"weight": 1.0, "nuslerp_rowwise": True}, "did you mean 'nuslerp_row_wise'"),
    ("nuslerp", 2, False, {"weight": [1.0, True]}, "'weight' must be a finite number"),
    ("multislerp", 3, False, {"weight": [1.0, -1.0, 0.0]}, "sum to zero"),
    ("multislerp", 3, False, {"weight": 1.0, "eps": -1e-8}, "eps must be ≥ 0"),
    ("multislerp", 3, False, {"weight": [1.0, 2.0]}, "2 values for 3"),
    ("karcher", 3, False, {"max_iter": 2.5}, "'max_iter' must be a whole number"),
    ("karcher", 3, False, {"max_iter": -1}, "'max_iter' must be a whole number"),
    ("karcher", 3, False, {"tol": -1e-5}, "tol must be ≥ 0"),
    ("karcher", 3, False, {"weight": 1.0}, "unknown parameter 'weight'"),
    ("nearswap", 1, True, {}, "'t' is required"),
    ("nearswap", 1, True, {"t": -0.1}, "t must be ≥ 0"),
    ("nearswap", 2, True, {"t": 0.1}, "exactly 1 other model"),
    ("nearswap", 1, False, {"t": 0.1}, "needs a base model"),
    ("arcee_fusion", 1, True, {"density": 0.5}, "unknown parameter 'density'"),
    ("arcee_fusion", 2, True, {}, "exactly 1 other model"),
    ("arcee_fusion", 1, False, {}, "needs a base model"),
]


@pytest.mark.parametrize(("name", "count", "with_base", "params", "message"), BAD,
                         ids=[f"{row[0]}-{row[4][:24]}" for row in BAD])
def test_bad_parameters_are_one_line_errors(name, count, with_base, params, message):
    tensors, base = make(count=count)
    with pytest.raises(AdaptkitError, match=message) as info:
        op(name).merge(tensors, base if with_base else None, **params)
    assert "\n" not in str(info.value) and str(info.value).startswith(name)


def test_multislerp_antipodal_inputs_are_an_error():
    x = torch.tensor([1.0, -2.0, 0.5])
    with pytest.raises(AdaptkitError, match="weighted mean of the inputs' directions is zero"):
        op("multislerp").merge([x, -x, x.roll(1)], None, weight=[1.0, 1.0, 0.0], normalize_weights=False)
    with pytest.raises(ValueError, match="weighted sum of the input tensors is zero"):  # mergekit alike
        mergekit("multislerp", [x, -x, x.roll(1)], weight=[1.0, 1.0, 0.0], normalize_weights=False)


@pytest.mark.parametrize("name", NAMES)
def test_registry_entry_and_docstring(name):
    line, problem = registry.describe(registry.entry("merge", name))
    text = type(op(name)).__doc__
    assert problem is None and text.splitlines()[0] == line and "arXiv" in text and "=" in text


# ---- whole merges against mergekit's run_merge ---------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A base and three fine-tunes of a tiny Llama (float32)."""
    return llama_finetunes(tmp_path_factory.mktemp("models"))


RECIPES = {  # method, fine-tunes' parameters, global parameters, with the base
    "nuslerp": ("nuslerp", [{"weight": 0.6}, {"weight": [0.2, 0.8]}], {"nuslerp_flatten": False}, False),
    "nuslerp-base": ("nuslerp", [{"weight": 0.6}, {"weight": 0.4}], {"nuslerp_row_wise": True,
                                                                     "nuslerp_flatten": False}, True),
    "multislerp": ("multislerp", [{"weight": 0.5}, {"weight": 0.3}, {"weight": [{"filter": "mlp", "value": 0.9},
                                                                                  {"value": 0.2}]}], None, True),
    # mergekit's tests give karcher, nearswap and arcee_fusion a weight per model, which they ignore.
    "karcher": ("karcher", [{"weight": 0.6}, {"weight": 0.4}], {"max_iter": 5, "tol": 1e-5}, True),
    "nearswap": ("nearswap", [{"weight": 0.6}], {"t": 0.01}, True),
    "arcee_fusion": ("arcee_fusion", [{"weight": 0.6}], None, True),
    # as mergekit's tests and examples/arcee_fusion.yml write them: the base listed among the models too
    "nearswap-listed-base": ("nearswap", [{"weight": 0.6}], {"t": 0.01}, "listed"),
    "arcee_fusion-listed-base": ("arcee_fusion", [{"weight": 0.6}], None, "listed"),
}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", RECIPES)
def test_merge_equals_mergekit(models, tmp_path, case, dtype):
    """float32: equal within 1e-6; bfloat16 (the compute dtype, as in mergekit): the same bytes."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions
    from mergekit.merge import run_merge as mk_run

    method, params, global_params, with_base = RECIPES[case]
    recipe = {"merge_method": method, "dtype": dtype,
              "models": [{"model": str(models / f"ft{i + 1}"), "parameters": p} for i, p in enumerate(params)]}
    if with_base:
        recipe["base_model"] = str(models / "base")
    if with_base == "listed":
        recipe["models"].insert(0, {"model": str(models / "base"), "parameters": {"weight": 0.4}})
    if global_params:
        recipe["parameters"] = global_params
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_merge(recipe, tmp_path / "ours", progress=False)
    ignores_weight = "weight" not in op(method).params
    assert any("does not use 'weight'" in str(w.message) for w in caught) == ignores_weight
    mk_run(MergeConfiguration.model_validate(recipe), str(tmp_path / "mk"),
           MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, lazy_unpickle=False))
    ours, theirs = state(tmp_path / "ours"), state(tmp_path / "mk")
    assert set(ours) == set(theirs)
    first = state(models / ("base" if with_base else "ft1"))
    for name in theirs:
        if dtype == "bfloat16":
            # arcee_fusion's float32 mask makes its result float32, which mergekit writes as it is;
            # adaptkit writes the recipe's dtype: that result rounded once.
            expected = theirs[name]
            if method == "arcee_fusion":
                assert expected.dtype == torch.float32
                expected = expected.bfloat16()
            assert ours[name].dtype == torch.bfloat16 and torch.equal(ours[name], expected), name
        else:
            assert_close(ours[name], theirs[name], rtol=1e-6, atol=1e-7, msg=name)
    assert any(not torch.equal(theirs[n], first[n]) for n in theirs)  # the merge did something


def test_yaml_exponents_without_a_dot_are_numbers(models, tmp_path):
    """mergekit's docs write tolerances as `1e-5`, which YAML 1.1 reads as a string; the recipe reader
    takes it as the number mergekit takes it for (`io.readers`), so the same file runs in both."""
    from hostile import run_cli

    recipe = tmp_path / "karcher.yml"
    recipe.write_text(f"merge_method: karcher\nmodels:\n  - model: {models / 'ft1'}\n  - model: {models / 'ft2'}\n"
                      "parameters:\n  max_iter: 5\n  tol: 1e-5\n")
    result = run_cli("-q", "merge", recipe, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    name = "model.layers.0.self_attn.q_proj.weight"
    inputs = [state(models / f"ft{i}")[name].float() for i in (1, 2)]
    assert torch.equal(state(tmp_path / "out")[name].float(), op("karcher").merge(inputs, max_iter=5, tol=1e-5))
