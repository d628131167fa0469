"""OFT and BOFT (plugins/variants/oft.py, boft.py) against the papers' math and against PEFT.

PEFT's own matrix (the OFT and BOFT rows of TEST_CASES in its tests/test_custom_models.py, on the same
small models) runs both ways: PEFT writes with non-zero weights, adaptkit loads it (outputs equal), merges
it live and streamed into a saved base (equal to PEFT's merge_and_unload), and writes it back for PEFT to
load. PEFT builds BOFT's butterfly factors only with its CUDA extension (without it, it quietly uses one
factor); the extension only assembles block-diagonal matrices, so a stand-in doing that with
torch.block_diag lets PEFT run every factor count on the CPU.
"""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from peft import BOFTConfig, OFTConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

import adaptkit as ak
from adaptkit.errors import AdaptkitError
from adaptkit_plugins.variants import _orthogonal as orth
from builders import tiny_gpt2

X = torch.arange(90).view(9, 10)  # PEFT's inputs for these models
REL = 1e-4


class MLP(nn.Module):
    def __init__(self, hidden: int = 20):
        super().__init__()
        self.lin0, self.lin1 = nn.Linear(10, hidden), nn.Linear(hidden, 2)

    def forward(self, x):
        return torch.log_softmax(self.lin1(torch.relu(self.lin0(x.float()))), -1)


class Conv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv2d, self.lin0 = nn.Conv2d(5, 10, 3), nn.Linear(10, 2)

    def forward(self, x):
        return torch.log_softmax(self.lin0(torch.relu(self.conv2d(x.float().reshape(-1, 5, 3, 3))).flatten(1)), -1)


class Conv2(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0, self.conv2d, self.lin1 = nn.Linear(10, 40), nn.Conv2d(8, 32, 3), nn.Linear(32, 2)

    def forward(self, x):
        h = torch.relu(self.lin0(x.float())).reshape(-1, 8, 3, 3)
        return torch.log_softmax(self.lin1(torch.relu(self.conv2d(h)).flatten(1)), -1)


class Emb(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.lin0 = nn.Embedding(100, 5), nn.Linear(10, 2)

    def forward(self, x):
        return torch.log_softmax(self.lin0(self.emb(x).reshape(-1, 10)), -1)


MODELS = {"MLP": MLP, "MLP2": lambda: MLP(32), "Conv2d": Conv, "Conv2d2": Conv2, "EmbConv1D": Emb}
# PEFT's TEST_CASES rows for OFT and BOFT (its Embedding + Conv1D model targets the embedding only).
CASES = [
    ("Vanilla MLP 1 OFT", "MLP", OFTConfig, {"r": 2, "oft_block_size": 0, "target_modules": "lin0", "use_cayley_neumann": False}),
    ("Vanilla MLP 2 OFT", "MLP", OFTConfig, {"r": 2, "oft_block_size": 0, "target_modules": ["lin0"], "use_cayley_neumann": False}),
    ("Vanilla MLP 5 OFT", "MLP", OFTConfig, {"r": 2, "oft_block_size": 0, "target_modules": ["lin0"], "modules_to_save": ["lin1"],
                                             "use_cayley_neumann": False}),
    ("Vanilla MLP 6 OFT", "MLP", OFTConfig, {"r": 2, "oft_block_size": 0, "target_modules": ["lin0"], "module_dropout": 0.1,
                                             "use_cayley_neumann": False}),
    ("Vanilla MLP 7 OFT", "MLP", OFTConfig, {"r": 2, "oft_block_size": 0, "target_modules": ["lin0"], "coft": True, "eps": 1e-2}),
    ("Vanilla MLP 8 OFT", "MLP", OFTConfig, {"r": 2, "oft_block_size": 0, "target_modules": ["lin0"], "block_share": True,
                                             "use_cayley_neumann": False}),
    ("Vanilla MLP 9 OFT", "MLP", OFTConfig, {"r": 2, "oft_block_size": 0, "target_modules": ["lin0"], "coft": True, "eps": 1e-2,
                                             "block_share": True}),
    ("Vanilla MLP 10 OFT", "MLP", OFTConfig, {"r": 0, "oft_block_size": 2, "target_modules": ["lin0"], "use_cayley_neumann": True}),
    ("Vanilla MLP 11 OFT", "MLP", OFTConfig, {"r": 0, "oft_block_size": 2, "target_modules": ["lin0"], "use_cayley_neumann": False}),
    ("Vanilla MLP 12 OFT", "MLP", OFTConfig, {"r": 0, "oft_block_size": 2, "target_modules": ["lin0"], "coft": True, "eps": 1e-2,
                                              "block_share": True, "use_cayley_neumann": True}),
    ("Vanilla MLP 13 OFT", "MLP", OFTConfig, {"r": 0, "oft_block_size": 2, "target_modules": ["lin0"], "coft": True, "eps": 1e-2,
                                              "block_share": True, "use_cayley_neumann": False}),
    ("Embedding + transformers Conv1D 1 OFT", "EmbConv1D", OFTConfig, {"r": 1, "oft_block_size": 0, "target_modules": ["emb"]}),
    ("Embedding + transformers Conv1D 2 OFT", "EmbConv1D", OFTConfig, {"r": 1, "oft_block_size": 0, "target_modules": ["emb"],
                                                                       "block_share": True}),
    ("Conv2d 1 OFT", "Conv2d", OFTConfig, {"r": 5, "oft_block_size": 0, "target_modules": ["conv2d"]}),
    ("Conv2d 3 OFT", "Conv2d", OFTConfig, {"r": 5, "oft_block_size": 0, "target_modules": ["conv2d"], "coft": True}),
    ("Conv2d 4 OFT", "Conv2d", OFTConfig, {"r": 5, "oft_block_size": 0, "target_modules": ["conv2d"], "block_share": True}),
    ("Conv2d 5 OFT", "Conv2d", OFTConfig, {"r": 5, "oft_block_size": 0, "target_modules": ["conv2d"], "coft": True,
                                           "block_share": True}),
    ("Vanilla MLP 1 BOFT", "MLP", BOFTConfig, {"target_modules": ["lin1"], "boft_block_size": 2}),
    ("Vanilla MLP 2 BOFT", "MLP", BOFTConfig, {"target_modules": ["lin1"], "modules_to_save": ["lin0"], "boft_block_size": 2}),
    ("Vanilla MLP 3 BOFT", "MLP", BOFTConfig, {"target_modules": ["lin1"], "boft_block_size": 2, "boft_dropout": 0.1}),
    ("Vanilla MLP 4 BOFT", "MLP", BOFTConfig, {"target_modules": ["lin1"], "boft_block_size": 2, "boft_block_num": 0,
                                               "boft_n_butterfly_factor": 1}),
    ("Vanilla MLP 5 BOFT", "MLP", BOFTConfig, {"target_modules": ["lin1"], "boft_block_size": 0, "boft_block_num": 2,
                                               "boft_n_butterfly_factor": 1}),
    ("Vanilla MLP 6 BOFT", "MLP", BOFTConfig, {"target_modules": ["lin1"], "boft_block_size": 10, "boft_block_num": 0,
                                               "boft_n_butterfly_factor": 2}),
    ("Conv2d 1 BOFT", "Conv2d", BOFTConfig, {"target_modules": ["conv2d"], "boft_block_size": 45, "boft_block_num": 0,
                                             "boft_n_butterfly_factor": 1}),
    ("Conv2d 2 BOFT", "Conv2d", BOFTConfig, {"target_modules": ["conv2d"], "boft_block_size": 0, "boft_block_num": 1,
                                             "boft_n_butterfly_factor": 1}),
    ("MLP2 1 BOFT", "MLP2", BOFTConfig, {"target_modules": ["lin1"], "boft_block_size": 2, "boft_block_num": 0,
                                         "boft_n_butterfly_factor": 3}),
    ("MLP2 2 BOFT", "MLP2", BOFTConfig, {"target_modules": ["lin1"], "boft_block_size": 0, "boft_block_num": 8,
                                         "boft_n_butterfly_factor": 3}),
    ("Conv2d2 1 BOFT", "Conv2d2", BOFTConfig, {"target_modules": ["conv2d"], "boft_block_size": 2, "boft_block_num": 0,
                                               "boft_n_butterfly_factor": 2}),
    ("Conv2d2 2 BOFT", "Conv2d2", BOFTConfig, {"target_modules": ["conv2d"], "boft_block_size": 2, "boft_block_num": 0,
                                               "boft_n_butterfly_factor": 3}),
]


class BlockDiagonal:
    """What PEFT's fbd_cuda kernel computes: per factor, the block-diagonal matrix of its blocks."""

    @staticmethod
    def forward(blocks):
        return [torch.stack([torch.block_diag(*factor.unbind(0)) for factor in blocks])]


@pytest.fixture(autouse=True)
def butterfly_kernel(monkeypatch):
    import peft.tuners.boft.layer as boft_layer

    monkeypatch.setattr(boft_layer, "_FBD_CUDA", BlockDiagonal())


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


def run(model) -> torch.Tensor:
    with torch.no_grad():
        return model(X)


def peft_model(model_id: str, cls, kwargs: dict):
    torch.manual_seed(0)
    base = MODELS[model_id]().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes on adjusted block sizes
        pm = get_peft_model(copy.deepcopy(base), cls(init_weights=False, **kwargs)).eval()
    return base, pm


def merge_into_saved_base(base: nn.Module, adapter, folder) -> nn.Module:
    """The streamed tensor-plane merge (base + adapter -> model), loaded back into the module."""
    from adaptkit.merge.engine import run_merge

    (folder / "base").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, folder / "base" / "model.safetensors")
    run_merge({"base_model": str(folder / "base"), "merge_method": "task_arithmetic",
               "models": [{"model": str(adapter), "parameters": {"weight": 1.0}}]}, folder / "merged", progress=False)
    merged = copy.deepcopy(base)
    merged.load_state_dict(load_file(folder / "merged" / "model.safetensors"))
    return merged


@pytest.mark.parametrize("model_id, cls, kwargs", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_peft_matrix_both_ways(model_id, cls, kwargs, tmp_path):
    base, pm = peft_model(model_id, cls, kwargs)
    expected = run(pm)
    pm.save_pretrained(tmp_path / "peft")
    ours = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        handle = ak.load_adapter(ours, tmp_path / "peft")
    assert rel(run(ours), expected) < REL
    handle.save(tmp_path / "ours")
    theirs = pm.merge_and_unload()
    handle.merge()
    assert rel(run(ours), run(theirs)) < REL
    streamed = merge_into_saved_base(base, tmp_path / "peft", tmp_path)
    assert rel(run(streamed), run(theirs)) < REL
    changed = 0
    for key, w in base.state_dict().items():  # ΔW itself, however small (COFT keeps it within eps)
        want = theirs.state_dict()[key] - w
        if want.abs().max() > 0:
            changed += 1
            # Below 1e-3 of W, W' = W + ΔW rounded to float32 holds ΔW only to about 1e-7/1e-3 of itself.
            tol = REL if want.abs().max() > 1e-3 * w.abs().max() else 1e-2
            assert rel(streamed.state_dict()[key] - w, want) < tol, key
    assert changed  # the adapter changes the model
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    assert [str(w.message) for w in caught if "/peft/" in str(w.filename).replace("\\", "/")] == []
    assert rel(run(back), expected) < REL


# -- the papers' math, written out ---------------------------------------------------------------

def skew_written_out(vec: torch.Tensor, size: int) -> torch.Tensor:
    """Q from its free entries: the strict upper triangle filled row by row, Q_ji = −Q_ij."""
    q = torch.zeros(vec.shape[0], size, size)
    k = 0
    for i in range(size):
        for j in range(i + 1, size):
            q[:, i, j], q[:, j, i] = vec[:, k], -vec[:, k]
            k += 1
    return q


def one_layer(variant: str, layer: nn.Module, **config):
    model = nn.Sequential(layer)
    ak.inject(model, variant, target_modules=["0"], init_weights=False, **config)
    return model, model[0]


def test_oft_is_the_papers_rotation():
    """Qiu et al. 2023 (eq. 2–4): z = (R·W⁰)ᵀ·x, W⁰ in × out, R = (I + Q)(I − Q)⁻¹ block-diagonal; PEFT's Q is
    the paper's −Q, so R_i = (I − Q_i)(I + Q_i)⁻¹. With W = W⁰ᵀ (out × in): W' = W·Rᵀ, the bias as it is."""
    torch.manual_seed(1)
    model, layer = one_layer("oft", nn.Linear(6, 4), r=2, oft_block_size=0, use_cayley_neumann=False)
    q = skew_written_out(layer.branches["default"].params["oft_R"].detach(), 3)
    eye = torch.eye(3)
    r = torch.block_diag(*[(eye - qi) @ torch.linalg.inv(eye + qi) for qi in q])
    torch.testing.assert_close(r.T @ r, torch.eye(6), atol=1e-6, rtol=0)
    w, b = layer.base_layer.weight.detach(), layer.base_layer.bias.detach()
    x = torch.randn(5, 6)
    torch.testing.assert_close(model(x), x @ (w @ r.T).T + b, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(layer.delta("default"), w @ r.T - w, atol=1e-6, rtol=1e-5)
    assert (layer.delta("default").abs() > 1e-4).any()


# The Cayley–Neumann series of (I + Q)(I − Q)⁻¹ = I + 2Q + 2Q² + …, coefficients of I, Q, Q², … as PEFT ≥ 0.18
# cuts it at `terms` terms.
SERIES = [(1, [1]), (2, [1, 2]), (3, [1, 2, 2, 1]), (4, [1, 2, 2, 1]), (5, [1, 2, 2, 2, 1]), (6, [1, 2, 2, 2, 2, 1])]


@pytest.mark.parametrize("terms, coefficients", SERIES, ids=[str(t) for t, _ in SERIES])
def test_cayley_neumann_series(terms, coefficients):
    from peft.tuners.oft.layer import OFTRotationModule

    torch.manual_seed(terms)
    vec = torch.randn(3, 6) * 0.1
    q = skew_written_out(vec, 4)
    expected = sum(c * torch.linalg.matrix_power(q, j) for j, c in enumerate(coefficients))
    torch.testing.assert_close(orth.neumann(orth.skew(vec, 4), terms), expected, atol=1e-6, rtol=1e-5)
    peft = OFTRotationModule(3, 6, 4, 12, use_cayley_neumann=True, num_cayley_neumann_terms=terms)
    torch.testing.assert_close(orth.neumann(orth.skew(vec, 4), terms), peft._cayley_batch(vec, 4, True, terms))


def test_neumann_approximates_the_other_cayley_sign():
    """PEFT's series sums (I + Q)(I − Q)⁻¹ while its exact path solves (I − Q)(I + Q)⁻¹: the two settings
    give transposed rotations for one stored Q. adaptkit follows PEFT in both."""
    vec = torch.randn(2, 3) * 0.05
    q = orth.skew(vec, 3)
    torch.testing.assert_close(orth.neumann(q, 30), orth.cayley(q).transpose(1, 2), atol=1e-6, rtol=0)


def test_coft_keeps_each_block_near_zero():
    """COFT (Qiu et al. 2023, eq. 5): ‖Q_i‖_F ≤ ε' (ε' = eps/√n over the n blocks stored, as PEFT scales it):
    blocks outside are scaled onto the sphere, blocks inside stay; PEFT's projection gives the same."""
    from peft.tuners.oft.layer import OFTRotationModule

    vec = torch.cat([torch.randn(2, 6), torch.full((1, 6), 1e-4)])
    out = orth.coft_project(vec, 4, 0.1)
    norms = torch.linalg.norm(skew_written_out(out, 4), dim=(1, 2))
    torch.testing.assert_close(norms[:2], torch.full((2,), 0.1 / 3 ** 0.5))
    torch.testing.assert_close(out[2], vec[2])
    peft = OFTRotationModule(3, 6, 4, 12, coft=True, eps=0.1)
    torch.testing.assert_close(out, peft._project_batch(vec, eps=0.1))


PERMS = [(8, 4, 1, 1), (8, 4, 1, 2), (16, 4, 2, 2), (16, 2, 2, 3), (72, 9, 2, 3), (32, 8, 1, 3)]


@pytest.mark.parametrize("n, blocks, half, factors", PERMS, ids=[str(p) for p in PERMS])
def test_butterfly_permutation_is_peft_s(n, blocks, half, factors):
    from peft.tuners.boft.layer import BOFTLayer

    expected = BOFTLayer.block_butterfly_perm(None, n, blocks, half, factors - 1).tolist()
    assert orth.butterfly_perm(n, blocks, half, factors) == expected


def test_boft_is_the_papers_butterfly():
    """Liu et al. 2024 (eq. 4–6): R = B̃_m ⋯ B̃_1, B̃_i = P_i·diag(B_i1 … B_iD)·P_iᵀ with P_i the block butterfly
    permutation (P_1 = I) and B_ij orthogonal (Cayley of the skew part of the stored block, PEFT's sign);
    PEFT's layer: W' = diag(s)·W·Rᵀ. With log₂(D) + 1 factors every output feature mixes every input."""
    torch.manual_seed(2)
    model, layer = one_layer("boft", nn.Linear(8, 3), boft_block_size=2, boft_n_butterfly_factor=3)
    stored = layer.branches["default"].params["boft_R"].detach()
    scale = layer.branches["default"].params["boft_s"].detach()
    eye = torch.eye(2)
    r = torch.eye(8)
    for i, factor in enumerate(stored):
        blocks = [(eye - q) @ torch.linalg.inv(eye + q) for q in 0.5 * (factor - factor.transpose(1, 2))]
        p = torch.eye(8)[orth.butterfly_perm(8, 4 // 2 ** i, 1, 3)]  # P[j, perm[j]] = 1
        r = p @ torch.block_diag(*blocks) @ p.T @ r
    torch.testing.assert_close(r.T @ r, torch.eye(8), atol=1e-6, rtol=0)
    assert (r.abs() > 1e-6).all()
    w, b = layer.base_layer.weight.detach(), layer.base_layer.bias.detach()
    torch.testing.assert_close(layer.delta("default"), scale * (w @ r.T) - w, atol=1e-6, rtol=1e-5)
    x = torch.randn(5, 8)
    torch.testing.assert_close(model(x), x @ (scale * (w @ r.T)).T + b, atol=1e-6, rtol=1e-5)


def test_conv_rotates_the_filter_whatever_the_image():
    """On a Conv2d the merged filter W·Rᵀ runs at the layer's stride and padding, so live equals merged equals
    PEFT's merge on any image. (PEFT's own live OFT conv unfolds the image into patches, rotates them and folds
    them back, summing overlaps: it equals its merge only where the kernel sees one patch, as in its tests.)"""
    torch.manual_seed(3)
    base = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, stride=2))
    pm = get_peft_model(copy.deepcopy(base), OFTConfig(r=2, oft_block_size=0, target_modules=["0"], init_weights=False))
    x = torch.randn(2, 4, 7, 7)
    ours = copy.deepcopy(base)
    handle = ak.inject(ours, "oft", r=2, oft_block_size=0, target_modules=["0"])
    ours[0].branches["default"].params["oft_R"].data.copy_(pm.base_model.model[0].oft_R["default"].weight.data)
    live = run_on(ours, x)
    expected = run_on(pm.merge_and_unload(), x)
    assert rel(live, expected) < REL
    handle.merge()
    assert rel(run_on(ours, x), expected) < REL


def run_on(model, x):
    with torch.no_grad():
        return model(x)


def test_dropout_only_while_training():
    """module_dropout / boft_dropout turn ⌊p·blocks⌋ blocks into I in training mode; eval runs them all."""
    torch.manual_seed(4)
    for variant, config in (("oft", dict(r=5, oft_block_size=0, module_dropout=0.5, use_cayley_neumann=False)),
                            ("boft", dict(boft_block_size=2, boft_dropout=0.5))):
        model, layer = one_layer(variant, nn.Linear(10, 4), **config)
        x = torch.randn(3, 10)
        merged = x @ (layer.base_layer.weight + layer.delta("default")).detach().T + layer.base_layer.bias.detach()
        assert rel(run_on(model.eval(), x), merged) < REL
        assert rel(run_on(model.train(), x), merged) > 1e-3


# -- refusals, conversion, listing ---------------------------------------------------------------

def grouped():
    return nn.Sequential(nn.Conv2d(4, 4, 1, groups=2))


REFUSALS = [
    ("oft bias", MLP, "oft", dict(target_modules=["lin0"], bias="all"), r"^OFT bias='all' trains the layers' biases"),
    ("oft conv1d", tiny_gpt2, "oft", dict(target_modules=["c_attn"]), r"c_attn: OFT goes on .* not on a GPT-2 Conv1D"),
    ("oft grouped conv", grouped, "oft", dict(target_modules=["0"], oft_block_size=2),
     r"^0: OFT goes on nn\.Linear, nn\.Conv2d \(groups=1\) and nn\.Embedding layers, not on a grouped convolution "
     r"\(groups=2\) \(PEFT's OFT neither\)"),
    ("oft conv1d of torch", lambda: nn.Sequential(nn.Conv1d(4, 4, 3)), "oft", dict(target_modules=["0"]),
     r"^0: OFT goes on .* not on an nn\.Conv1d"),
    ("oft r and block size", MLP, "oft", dict(target_modules=["lin0"], r=2, oft_block_size=5),
     r"^OFT needs exactly one of r \(2\) and oft_block_size \(5\) non-zero$"),
    ("boft embedding", Emb, "boft", dict(target_modules=["emb"]), r"^emb: BOFT goes on nn\.Linear and nn\.Conv2d \(groups=1\) layers, not on an nn\.Embedding"),
    ("boft bias", MLP, "boft", dict(target_modules=["lin0"], boft_block_size=2, bias="boft_only"),
     r"^BOFT bias='boft_only' trains"),
    ("boft size and number", MLP, "boft", dict(target_modules=["lin0"], boft_block_size=2, boft_block_num=5),
     r"^BOFT needs exactly one of boft_block_size \(2\) and boft_block_num \(5\)"),
    ("boft not dividing", MLP, "boft", dict(target_modules=["lin0"], boft_block_size=3),
     r"^lin0: boft_block_size 3 with boft_n_butterfly_factor 1 does not fit its 10 features"),
    ("boft odd blocks", MLP, "boft", dict(target_modules=["lin0"], boft_block_size=5, boft_n_butterfly_factor=2),
     r"^lin0: with boft_n_butterfly_factor 2, BOFT needs an even block number and size \(got 2 blocks of 5\)$"),
]


@pytest.mark.parametrize("build, variant, config, message", [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_unsupported_is_refused_in_one_line(build, variant, config, message):
    with pytest.raises(AdaptkitError, match=message) as caught:
        ak.inject(build(), variant, **config)
    assert "\n" not in str(caught.value)


def rewrite_config(folder, **changes):
    path = folder / "adapter_config.json"
    config = {k: v for k, v in json.loads(path.read_text()).items() if changes.get(k, 0) is not None}
    path.write_text(json.dumps({**config, **{k: v for k, v in changes.items() if v is not None}}))


FILE_REFUSALS = [
    ("neumann before peft 0.18", dict(peft_version=None), False, r"Cayley–Neumann series of PEFT 0\.16–0\.17"),
    ("neumann of peft 0.17", dict(peft_version="0.17.1"), False,
     r"Cayley–Neumann series of PEFT 0\.16–0\.17 \(peft_version 0\.17\.1\)"),
    ("oft of peft 0.15", dict(peft_version=None, use_cayley_neumann=None), True, r"an OFT adapter of PEFT 0\.14–0\.15"),
    ("oft of peft 0.13", dict(oft_block_size=None), False, r"an OFT adapter of PEFT < 0\.14"),
]


@pytest.mark.parametrize("changes, old_keys, message", [r[1:] for r in FILE_REFUSALS], ids=[r[0] for r in FILE_REFUSALS])
def test_files_of_older_peft_are_refused(changes, old_keys, message, tmp_path):
    _, pm = peft_model("MLP", OFTConfig, {"r": 2, "oft_block_size": 0, "target_modules": ["lin0"]})
    pm.save_pretrained(tmp_path / "a")
    rewrite_config(tmp_path / "a", **changes)
    if old_keys:  # PEFT 0.14–0.15 stored full blocks oft_r and a scale oft_s
        path = tmp_path / "a" / "adapter_model.safetensors"
        save_file({"base_model.model.lin0.oft_r": torch.zeros(2, 5, 5), "base_model.model.lin0.oft_s": torch.ones(20, 1)},
                  path)
    with pytest.raises(AdaptkitError, match=message):
        ak.load_adapter(MLP(), tmp_path / "a")
    with pytest.raises(AdaptkitError, match=message):
        ak.inspect(tmp_path / "a")


CONVERTIBLE = [("oft", "MLP", OFTConfig, {"r": 2, "oft_block_size": 0, "target_modules": ["lin0"]}),
               ("oft conv2d", "Conv2d", OFTConfig, {"r": 5, "oft_block_size": 0, "target_modules": ["conv2d"]}),
               ("boft", "MLP", BOFTConfig, {"boft_block_size": 2, "boft_n_butterfly_factor": 2, "target_modules": ["lin1"]}),
               ("boft conv2d", "Conv2d", BOFTConfig, {"boft_block_size": 9, "target_modules": ["conv2d"]})]


@pytest.mark.parametrize("model_id, cls, kwargs", [c[1:] for c in CONVERTIBLE], ids=[c[0] for c in CONVERTIBLE])
def test_converts_to_lora_by_svd_with_its_error(model_id, cls, kwargs, tmp_path):
    """ΔW = W·Rᵀ − W needs the base; at full rank the LoRA PEFT loads gives the adapter's outputs, at a lower
    rank the reported error is the SVD tail √(Σ_{i>k} σᵢ²/Σ σᵢ²) of that ΔW."""
    from adaptkit.files.convert import convert

    base, pm = peft_model(model_id, cls, kwargs)
    pm.save_pretrained(tmp_path / "a")
    (tmp_path / "base").mkdir()
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, tmp_path / "base" / "model.safetensors")
    module = kwargs["target_modules"][0]
    weight = getattr(base, module).weight
    full = min(weight.shape[0], weight[0].numel())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # OFT's ΔW has rank below min(out, in): the rank is clamped to it
        report = convert(tmp_path / "a", "peft", tmp_path / "full", rank=full, base=tmp_path / "base")
    assert report["modules"][module]["error"] < 1e-5
    lora = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "full").eval()
    assert rel(run(lora), run(pm)) < REL
    delta = pm.merge_and_unload().state_dict()[f"{module}.weight"] - base.state_dict()[f"{module}.weight"]
    s = torch.linalg.svdvals(delta.reshape(delta.shape[0], -1).double())
    report = convert(tmp_path / "a", "peft", tmp_path / "one", rank=1, base=tmp_path / "base")
    assert report["modules"][module]["error"] == pytest.approx(float((s[1:] ** 2).sum().sqrt() / s.norm()), rel=1e-3)
    with pytest.raises(AdaptkitError, match="give the base model"):
        convert(tmp_path / "a", "peft", tmp_path / "x", rank=1)


def test_listed_and_inspected(tmp_path):
    from click.testing import CliRunner

    from adaptkit.cli import cli

    listed = CliRunner().invoke(cli, ["plugins", "--kind", "variant"]).output
    assert "W' = W·Rᵀ" in listed and "arXiv 2306.07280" in listed
    assert "W' = diag(s)·W·Mᵀ" in listed and "arXiv 2311.06243" in listed
    _, pm = peft_model("MLP2", BOFTConfig, {"boft_block_size": 2, "boft_n_butterfly_factor": 3, "target_modules": ["lin1"]})
    pm.save_pretrained(tmp_path / "b")
    found = ak.inspect(tmp_path / "b")["adapter"]
    assert (found["variant"], found["block_size"], found["butterfly_factors"], found["ranks"]) == ("boft", 2, 3, [16])


def test_boft_factor_count_comes_from_the_tensors(monkeypatch, tmp_path):
    """PEFT without its CUDA extension builds one butterfly factor whatever boft_n_butterfly_factor says, and
    saves that config with one factor's boft_R: the file loads and merges as the one factor it holds."""
    import peft.tuners.boft.layer as boft_layer

    monkeypatch.setattr(boft_layer, "_FBD_CUDA", None)
    monkeypatch.setattr(boft_layer, "get_fbd_cuda", lambda: None)
    base, pm = peft_model("MLP2", BOFTConfig, {"boft_block_size": 2, "boft_n_butterfly_factor": 3, "target_modules": ["lin1"]})
    pm.save_pretrained(tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["boft_n_butterfly_factor"] == 3
    assert ak.inspect(tmp_path / "a")["adapter"]["butterfly_factors"] == 1
    ours = copy.deepcopy(base)
    handle = ak.load_adapter(ours, tmp_path / "a")
    assert rel(run(ours), run(pm)) < REL
    handle.merge()
    assert rel(run(ours), run(pm.merge_and_unload())) < REL


def test_boft_file_with_an_impossible_butterfly_is_refused(tmp_path):
    _, pm = peft_model("MLP", BOFTConfig, {"boft_block_size": 2, "target_modules": ["lin1"]})
    pm.save_pretrained(tmp_path / "a")
    path = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors["base_model.model.lin1.boft_R"] = torch.zeros(2, 5, 4, 4)  # 5 blocks cannot pair up
    save_file(tensors, path)
    with pytest.raises(AdaptkitError, match=r"BOFT module lin1 has tensors .* with boft_R \(2, 5, 4, 4\), not boft_R"):
        ak.inspect(tmp_path / "a")


@pytest.mark.parametrize("model_id, cls, kwargs", [c[1:] for c in CONVERTIBLE[::2]], ids=[c[0] for c in CONVERTIBLE[::2]])
def test_adapters_merge_into_a_lora(model_id, cls, kwargs, tmp_path):
    """adapters → adapter: ΔW₁ + ΔW₂ of two adapters on one base (task arithmetic), refactored at full rank into
    a LoRA that PEFT loads: the base plus both adapters' PEFT merges' changes."""
    from adaptkit.merge.engine import run_merge

    base, first = peft_model(model_id, cls, kwargs)
    torch.manual_seed(5)
    second = get_peft_model(copy.deepcopy(base), cls(init_weights=False, **kwargs)).eval()
    first.save_pretrained(tmp_path / "a")
    second.save_pretrained(tmp_path / "b")
    (tmp_path / "base").mkdir()
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, tmp_path / "base" / "model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rank 10 is above BOFT's 2-output ΔW's rank: clamped to it
        run_merge({"base_model": str(tmp_path / "base"), "merge_method": "task_arithmetic",
                   "output": {"kind": "adapter", "rank": 10},
                   "models": [{"model": str(tmp_path / n), "parameters": {"weight": 1.0}} for n in "ab"]},
                  tmp_path / "m", progress=False)
    expected = copy.deepcopy(base)
    state = expected.state_dict()
    for pm in (first, second):
        for key, value in pm.merge_and_unload().state_dict().items():
            state[key] += value - base.state_dict()[key]
    expected.load_state_dict(state)
    lora = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "m").eval()
    assert rel(run(lora), run(expected)) < REL
