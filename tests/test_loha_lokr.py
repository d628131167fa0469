"""LoHa (FedPara, arXiv 2108.06098) and LoKr (LyCORIS, arXiv 2309.14859) against PEFT and the written-out math.

    LoHa  ΔW = alpha/r · (W1a·W1b) ⊙ (W2a·W2b)   (Tucker cores for conv layers with use_effective_conv2d)
    LoKr  ΔW = alpha/r · W1 ⊗ W2                 (each factor full, low-rank or a Tucker core)

PEFT is the oracle: the LoHa/LoKr cases of PEFT's own matrix (tests/test_custom_models.py TEST_CASES,
on the same small Linear / Conv1d / Conv2d models, grouped and 1×1 ones included) are created by PEFT
with random weights and saved; adaptkit loads them with PEFT's outputs, its tensor-plane ΔW equals
PEFT's `get_delta_weight`, a live merge and a merge into a saved base equal `merge_and_unload`, and
what adaptkit saves PEFT loads with the same outputs. LyCORIS/kohya single files are checked against
the formulas written out here (index by index, not through the code under test).
"""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import adaptkit as ak
from adaptkit import registry
from adaptkit.adapter import read_adapter
from adaptkit.errors import AdaptkitError
from builders import fit_to_teacher, outputs

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest

TOL = dict(atol=1e-5, rtol=1e-4)


class Net(nn.Module):
    """One adapted layer (`layer`) and a linear head (`head`), as PEFT's small test models."""

    def __init__(self, layer: nn.Module, head: nn.Module, shape: tuple[int, ...]):
        super().__init__()
        self.layer, self.head, self.shape = layer, head, shape

    def forward(self, x):
        return self.head(torch.relu(self.layer(x.reshape(-1, *self.shape))).flatten(1))


# PEFT's models (MLP, ModelConv2D, ModelConv1DBigger, ...): layer, head, input shape.
MODELS = {
    "MLP": lambda: Net(nn.Linear(10, 20), nn.Linear(20, 2), (10,)),
    "Conv2d": lambda: Net(nn.Conv2d(5, 10, 3), nn.Linear(10, 2), (5, 3, 3)),
    "Conv2d1x1": lambda: Net(nn.Conv2d(1, 10, 1), nn.Linear(90, 2), (1, 3, 3)),
    "Conv2dGroups": lambda: Net(nn.Conv2d(16, 16, 3, groups=8), nn.Linear(16, 2), (16, 3, 3)),
    "Conv2dGroups2": lambda: Net(nn.Conv2d(16, 32, 3, padding=1, groups=2), nn.Linear(32 * 9, 2), (16, 3, 3)),
    "Conv1d": lambda: Net(nn.Conv1d(1, 1, 2), nn.Linear(9, 2), (1, 10)),
    "Conv1dBigger": lambda: Net(nn.Conv1d(64, 16, 2), nn.Linear(144, 2), (64, 10)),
    "Conv1dGroups": lambda: Net(nn.Conv1d(8, 8, 3, groups=2), nn.Linear(64, 2), (8, 10)),
}
INPUTS = {"MLP": (10,), "Conv2d": (5, 3, 3), "Conv2d1x1": (1, 3, 3), "Conv2dGroups": (16, 3, 3),
          "Conv2dGroups2": (16, 3, 3), "Conv1d": (1, 10), "Conv1dBigger": (64, 10), "Conv1dGroups": (8, 10)}
BOTH = ["layer", "head"]

# PEFT's TEST_CASES for LoHa and LoKr (its ids; `layer`/`head` stand for its lin0/lin1/conv names).
CASES = [
    ("Vanilla MLP 1 LOHA", "MLP", "loha", {"target_modules": "layer"}),
    ("Vanilla MLP 4 LOHA", "MLP", "loha", {"target_modules": BOTH}),
    ("Vanilla MLP 5 LOHA", "MLP", "loha", {"target_modules": ["layer"], "modules_to_save": ["head"]}),
    ("Vanilla MLP 6 LOHA", "MLP", "loha", {"target_modules": ["layer"], "alpha": 4, "module_dropout": 0.1}),
    ("Vanilla MLP 7 LOHA", "MLP", "loha", {"target_modules": "layer", "rank_dropout": 0.5}),
    ("Conv2d 1 LOHA", "Conv2d", "loha", {"target_modules": ["layer"]}),
    ("Conv2d 2 LOHA", "Conv2d", "loha", {"target_modules": BOTH}),
    ("Conv2d 3 LOHA", "Conv2d", "loha", {"target_modules": ["layer"], "use_effective_conv2d": True}),
    ("Conv2d 4 LOHA", "Conv2d", "loha", {"target_modules": BOTH, "use_effective_conv2d": True}),
    ("Conv1d LOHA", "Conv1d", "loha", {"target_modules": ["layer"]}),
    ("Conv1d LOHA 2", "Conv1d", "loha", {"target_modules": ["layer"], "r": 2}),
    ("Conv1d LOHA 3", "Conv1dBigger", "loha", {"target_modules": ["layer"], "r": 2, "use_effective_conv2d": True}),
    ("Conv1d LOHA 4", "Conv1dBigger", "loha", {"target_modules": ["layer"], "r": 2, "use_effective_conv2d": False}),
    ("Conv1d Groups LOHA", "Conv1dGroups", "loha", {"target_modules": ["layer"], "r": 4}),
    ("Conv2d 1x1 LOHA", "Conv2d1x1", "loha", {"target_modules": ["layer"]}),
    ("Conv2d Groups LOHA", "Conv2dGroups", "loha", {"target_modules": ["layer"]}),
    ("Conv2d Groups2 LOHA", "Conv2dGroups2", "loha", {"target_modules": ["layer"]}),
    ("patterns LOHA", "Conv2d", "loha", {"target_modules": BOTH, "rank_pattern": {"head": 3},
                                         "alpha_pattern": {"layer": 5.0}}),
    ("Vanilla MLP 1 LOKR", "MLP", "lokr", {"target_modules": "layer"}),
    ("Vanilla MLP 4 LOKR", "MLP", "lokr", {"target_modules": BOTH}),
    ("Vanilla MLP 5 LOKR", "MLP", "lokr", {"target_modules": ["layer"], "modules_to_save": ["head"]}),
    ("Vanilla MLP 6 LOKR", "MLP", "lokr", {"target_modules": ["layer"], "alpha": 4, "module_dropout": 0.1}),
    ("Vanilla MLP 7 LOKR", "MLP", "lokr", {"target_modules": "layer", "rank_dropout": 0.5}),
    ("Vanilla MLP 8 LOKR", "MLP", "lokr", {"target_modules": "layer", "decompose_both": True, "r": 1, "alpha": 1}),
    ("Conv1d LOKR 1", "Conv1d", "lokr", {"target_modules": ["layer"]}),
    ("Conv1d LOKR 2", "Conv1d", "lokr", {"target_modules": ["layer"], "r": 2}),
    ("Conv1d LOKR 3", "Conv1dBigger", "lokr", {"target_modules": ["layer"], "r": 2, "use_effective_conv2d": True}),
    ("Conv1d LOKR 4", "Conv1dBigger", "lokr", {"target_modules": ["layer"], "r": 2, "use_effective_conv2d": False}),
    ("Conv1d full W2 LOKR", "Conv1dBigger", "lokr", {"target_modules": ["layer"]}),  # PEFT's 3-d kron layout
    ("Conv1d Groups LOKR", "Conv1dGroups", "lokr", {"target_modules": ["layer"], "r": 4}),
    ("Conv2d 1 LOKR", "Conv2d", "lokr", {"target_modules": ["layer"]}),
    ("Conv2d 2 LOKR", "Conv2d", "lokr", {"target_modules": BOTH}),
    ("Conv2d 3 LOKR", "Conv2d", "lokr", {"target_modules": ["layer"], "use_effective_conv2d": True}),
    ("Conv2d 4 LOKR", "Conv2d", "lokr", {"target_modules": BOTH, "use_effective_conv2d": True}),
    ("Conv2d 5 LOKR", "Conv2d", "lokr", {"target_modules": BOTH, "use_effective_conv2d": True, "decompose_both": True}),
    ("Conv2d 6 LOKR", "Conv2d", "lokr", {"target_modules": BOTH, "use_effective_conv2d": True, "decompose_factor": 4}),
    ("Conv2d 7 LOKR", "Conv2d", "lokr", {"target_modules": BOTH, "use_effective_conv2d": True, "decompose_both": True,
                                         "decompose_factor": 4}),
    ("Conv2d Tucker r1 LOKR", "Conv2d", "lokr", {"target_modules": ["layer"], "use_effective_conv2d": True, "r": 1}),
    ("Conv2d 1x1 LOKR", "Conv2d1x1", "lokr", {"target_modules": ["layer"]}),
    ("Conv2d Groups LOKR", "Conv2dGroups", "lokr", {"target_modules": ["layer"]}),
    ("Conv2d Groups2 LOKR", "Conv2dGroups2", "lokr", {"target_modules": ["layer"]}),
    ("rank_dropout_scale LOKR", "Conv2d", "lokr", {"target_modules": BOTH, "rank_dropout_scale": True, "r": 2}),
]
IDS = [c[0] for c in CASES]


def peft_config(variant: str, **kwargs):
    from peft import LoHaConfig, LoKrConfig

    return (LoHaConfig if variant == "loha" else LoKrConfig)(init_weights=False, **kwargs)


def inputs(model: str) -> torch.Tensor:
    return torch.randn(3, *INPUTS[model], generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """case -> (base, PEFT model, its folder): each case built and saved by PEFT once."""
    from peft import get_peft_model

    cache = {}

    def get(case):
        name, model, variant, kwargs = case
        if name not in cache:
            torch.manual_seed(0)
            base = MODELS[model]().eval()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                peft = get_peft_model(copy.deepcopy(base), peft_config(variant, **kwargs)).eval()
            folder = tmp_path_factory.mktemp("peft") / name.replace(" ", "_")
            peft.save_pretrained(folder)
            cache[name] = base, peft, folder
        return cache[name]

    return get


def targets(kwargs) -> list[str]:
    t = kwargs["target_modules"]
    return [t] if isinstance(t, str) else list(t)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_peft_file_loads_with_peft_outputs_and_its_delta(case, saved):
    base, peft, folder = saved(case)
    x = inputs(case[1])
    handle = ak.load_adapter(copy.deepcopy(base), folder)
    torch.testing.assert_close(outputs(handle.model, x), outputs(peft, x), **TOL)
    files = read_adapter(folder)
    variant = registry.get("variant", case[2])
    assert files.variant == case[2]
    for path in targets(case[3]):
        theirs = peft.base_model.model.get_submodule(path).get_delta_weight("default")
        torch.testing.assert_close(variant.delta(files, path, getattr(base, path).weight), theirs, **TOL)
        torch.testing.assert_close(handle.model.get_submodule(path).delta("default"), theirs, **TOL)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_merges_equal_peft_merge_and_unload(case, saved, tmp_path):
    from adaptkit.io import open_store
    from adaptkit.merge.engine import run_merge

    base, peft, folder = saved(case)
    x = inputs(case[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = copy.deepcopy(peft).merge_and_unload()
    want = merged.state_dict()
    ours = ak.load_adapter(copy.deepcopy(base), folder).merge_and_unload()
    torch.testing.assert_close(outputs(ours, x), outputs(merged, x), **TOL)
    live = ours.state_dict()
    (tmp_path / "base").mkdir()
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, tmp_path / "base" / "model.safetensors")
    run_merge({"base_model": str(tmp_path / "base"), "merge_method": "task_arithmetic",
               "models": [{"model": str(folder), "parameters": {"weight": 1.0}}]}, tmp_path / "m", progress=False,
              card=False)
    files = open_store(tmp_path / "m")
    for key, value in want.items():
        torch.testing.assert_close(live[key], value, **TOL)
        torch.testing.assert_close(files.get(key).float(), value, **TOL)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_we_write_peft_loads(case, saved, tmp_path):
    from peft import PeftModel

    base, _, _ = saved(case)
    name, model, variant, kwargs = case
    x = inputs(model)
    ours = copy.deepcopy(base)
    torch.manual_seed(5)
    handle = ak.inject(ours, variant, **{**kwargs, "init_weights": False})
    handle.model.eval()
    expected = outputs(ours, x)
    handle.save(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == variant.upper() and "adaptkit_variant" not in config
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a").eval()
    assert not [w for w in caught if "unexpected" in str(w.message).lower() or "missing" in str(w.message).lower()]
    torch.testing.assert_close(outputs(theirs, x), expected, **TOL)


# -- LyCORIS / kohya single files: the formulas written out --------------------------------------------------
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"  # a 3×3 conv of the SD UNet
LINEAR = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"  # a linear layer of the CLIP text encoder
PATHS = {CONV: "unet.down_blocks.0.resnets.0.conv1", LINEAR: "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"}


def rand(*shape, seed=[0]):
    seed[0] += 1
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed[0]))


def loha_linear(w1a, w1b, w2a, w2b, alpha):
    """ΔW[i, j] = alpha/r · Σ_k w1a[i,k]·w1b[k,j] · Σ_l w2a[i,l]·w2b[l,j], r = w1b.shape[0]."""
    return alpha / w1b.shape[0] * torch.einsum("ik,kj,il,lj->ij", w1a, w1b, w2a, w2b)


def loha_tucker(t1, w1a, w1b, t2, w2a, w2b, alpha):
    """ΔW[o,i,h,w] = alpha/r · (Σ_ab t1[a,b,h,w]·w1a[a,o]·w1b[b,i]) · (the same with t2, w2a, w2b)."""
    return alpha / w1b.shape[0] * torch.einsum("abhw,ao,bi->oihw", t1, w1a, w1b) * \
        torch.einsum("abhw,ao,bi->oihw", t2, w2a, w2b)


def kron_written_out(w1, w2):
    """(W1 ⊗ W2)[p·b + q, s·d + t, …] = W1[p, s] · W2[q, t, …], index by index."""
    a, c = w1.shape
    b, d = w2.shape[:2]
    out = torch.empty(a * b, c * d, *w2.shape[2:])
    for p in range(a):
        for s in range(c):
            out[p * b:(p + 1) * b, s * d:(s + 1) * d] = w1[p, s] * w2
    return out


def kohya_file(path, modules: dict[str, dict[str, torch.Tensor]]):
    save_file({f"{name}.{role}": t.contiguous() for name, roles in modules.items() for role, t in roles.items()},
              path)
    return path


def kohya_cases():
    """(id, {kohya name: tensors}, {kohya name: (expected ΔW, base weight)}) written out by hand."""
    w1a, w1b, w2a, w2b = rand(12, 3), rand(3, 10), rand(12, 3), rand(3, 10)
    t1, t2, c1a, c1b, c2a, c2b = rand(2, 2, 3, 3), rand(2, 2, 3, 3), rand(2, 8), rand(2, 4), rand(2, 8), rand(2, 4)
    f1a, f1b, f2a, f2b = rand(8, 2), rand(2, 36), rand(8, 2), rand(2, 36)  # a conv without Tucker: r × in·kh·kw
    base_lin, base_conv = rand(12, 10), rand(8, 4, 3, 3)
    k1, k2, k2a, k2b, k1a, k1b = rand(3, 2), rand(4, 5), rand(4, 1), rand(1, 5), rand(3, 1), rand(1, 2)
    kt, kc2a, kc2b, kc1 = rand(1, 1, 3, 3), rand(1, 4), rand(1, 2), rand(2, 2)
    kw2 = rand(4, 2, 3, 3)
    mag_out, mag_in = rand(12, 1).abs() + 1, rand(1, 10).abs() + 1
    return [
        ("loha linear and tucker conv", {
            LINEAR: {"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b, "alpha": torch.tensor(6.0)},
            CONV: {"hada_w1_a": c1a, "hada_w1_b": c1b, "hada_w2_a": c2a, "hada_w2_b": c2b, "hada_t1": t1, "hada_t2": t2,
                   "alpha": torch.tensor(1.0)}},
         {LINEAR: (loha_linear(w1a, w1b, w2a, w2b, 6.0), base_lin),
          CONV: (loha_tucker(t1, c1a, c1b, t2, c2a, c2b, 1.0), base_conv)}),
        ("loha conv flattened", {CONV: {"hada_w1_a": f1a, "hada_w1_b": f1b, "hada_w2_a": f2a, "hada_w2_b": f2b,
                                        "alpha": torch.tensor(4.0, dtype=torch.float16)}},
         {CONV: (loha_linear(f1a, f1b, f2a, f2b, 4.0).reshape(8, 4, 3, 3), base_conv)}),
        ("lokr full w1, low-rank w2", {LINEAR: {"lokr_w1": k1, "lokr_w2_a": k2a, "lokr_w2_b": k2b,
                                                "alpha": torch.tensor(3.0)}},
         {LINEAR: (3.0 / 1 * kron_written_out(k1, k2a @ k2b), base_lin)}),
        ("lokr both full: scale 1", {LINEAR: {"lokr_w1": k1, "lokr_w2": k2, "alpha": torch.tensor(7.0)}},
         {LINEAR: (kron_written_out(k1, k2), base_lin)}),
        ("lokr decompose both", {LINEAR: {"lokr_w1_a": k1a, "lokr_w1_b": k1b, "lokr_w2": k2, "alpha": torch.tensor(0.5)}},
         {LINEAR: (0.5 / 1 * kron_written_out(k1a @ k1b, k2), base_lin)}),
        ("lokr tucker conv", {CONV: {"lokr_w1": kc1, "lokr_w2_a": kc2a, "lokr_w2_b": kc2b, "lokr_t2": kt,
                                     "alpha": torch.tensor(2.0)}},
         {CONV: (2.0 * kron_written_out(kc1, torch.einsum("abhw,ao,bi->oihw", kt, kc2a, kc2b)), base_conv)}),
        ("lokr full conv w2", {CONV: {"lokr_w1": kc1, "lokr_w2": kw2, "alpha": torch.tensor(2.0)}},
         {CONV: (kron_written_out(kc1, kw2), base_conv)}),
        ("loha dora on the output axis", {LINEAR: {"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a,
                                                   "hada_w2_b": w2b, "alpha": torch.tensor(6.0), "dora_scale": mag_out}},
         {LINEAR: (dora(loha_linear(w1a, w1b, w2a, w2b, 6.0), base_lin, mag_out, axis=1), base_lin)}),
        ("lokr dora on the input axis", {LINEAR: {"lokr_w1": k1, "lokr_w2": k2, "alpha": torch.tensor(1.0),
                                                  "dora_scale": mag_in}},
         {LINEAR: (dora(kron_written_out(k1, k2), base_lin, mag_in, axis=0), base_lin)}),
    ]


def dora(delta, base, magnitude, axis):
    """LyCORIS's weight decomposition as a change: m · (W + ΔW) / (‖W + ΔW‖ + eps) − W, the norm over `axis`."""
    merged = base + delta
    return magnitude * merged / (merged.norm(dim=axis, keepdim=True) + torch.finfo(torch.float32).eps) - base


KOHYA_CASES = kohya_cases()


@pytest.mark.parametrize("case", KOHYA_CASES, ids=[c[0] for c in KOHYA_CASES])
def test_lycoris_file_delta_is_the_written_out_formula(case, tmp_path):
    _, modules, expected = case
    files = read_adapter(kohya_file(tmp_path / "lycoris.safetensors", modules))
    variant = registry.get("variant", files.variant)
    assert files.format == "kohya" and files.variant == ("loha" if "loha" in case[0] else "lokr")
    for name, (want, base) in expected.items():
        torch.testing.assert_close(variant.delta(files, PATHS[name], base), want, **TOL)
        if "dora_scale" in modules[name]:
            with pytest.raises(AdaptkitError, match="give the base model"):
                variant.delta(files, PATHS[name])


def test_lycoris_file_without_alpha_warns_and_mixed_files_are_refused(tmp_path):
    w1a, w1b, w2a, w2b = rand(12, 3), rand(3, 10), rand(12, 3), rand(3, 10)
    loha = {"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b}
    with pytest.warns(UserWarning, match="1 of 1 loha modules have no alpha"):
        files = read_adapter(kohya_file(tmp_path / "a.safetensors", {LINEAR: loha}))
    torch.testing.assert_close(registry.get("variant", "loha").delta(files, PATHS[LINEAR]),
                               loha_linear(w1a, w1b, w2a, w2b, 3.0), **TOL)  # alpha = r: scale 1
    lora = {"lora_down.weight": rand(2, 4, 3, 3), "lora_up.weight": rand(8, 2, 1, 1), "alpha": torch.tensor(2.0)}
    with pytest.raises(AdaptkitError, match=r"several LyCORIS families.*loha.*lora") as err:
        read_adapter(kohya_file(tmp_path / "b.safetensors", {LINEAR: loha, CONV: lora}))
    assert "\n" not in str(err.value)
    with pytest.raises(AdaptkitError, match="hada_w2_b"):
        read_adapter(kohya_file(tmp_path / "c.safetensors", {LINEAR: {k: v for k, v in loha.items() if k != "hada_w2_b"}}))


# -- conversion, listing, training, refusals ----------------------------------------------------------------
@pytest.mark.parametrize("case, rank, exact", [
    (CASES[IDS.index("Vanilla MLP 4 LOHA")], 64, True),  # r² = 64 ≥ min(out, in): the SVD holds ΔW whole
    (CASES[IDS.index("Vanilla MLP 4 LOHA")], 1, False),
    (CASES[IDS.index("Conv2d 1 LOHA")], 45, True),  # a conv: the kernel shape comes from the base (--base)
    (CASES[IDS.index("Conv2d 7 LOKR")], 1, False),
], ids=["loha-mlp-full", "loha-mlp-r1", "loha-conv-full", "lokr-conv-r1"])
def test_converts_to_lora_by_svd_with_the_error_reported(case, rank, exact, saved, tmp_path):
    from peft import PeftModel

    from adaptkit.files.convert import convert

    base, peft, folder = saved(case)
    (tmp_path / "base").mkdir()
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, tmp_path / "base" / "model.safetensors")
    with pytest.raises(AdaptkitError, match="no exact low-rank form; give --rank"):
        convert(folder, "peft", tmp_path / "none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a rank above ΔW's own is clamped, with a warning
        report = convert(folder, "peft", tmp_path / "lora", rank=rank, base=tmp_path / "base")
    lora = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora").eval()
    for path in targets(case[3]):
        want = peft.base_model.model.get_submodule(path).get_delta_weight("default").detach()
        got = lora.base_model.model.get_submodule(path).get_delta_weight("default").detach()
        error = float(torch.linalg.norm(got - want) / torch.linalg.norm(want))
        assert report["modules"][path]["error"] == pytest.approx(error, abs=1e-5)
        assert (error < 1e-5) == exact


def test_listed_with_formula_and_paper():
    from click.testing import CliRunner

    from adaptkit.cli import cli

    rows = {r["name"]: r for r in json.loads(CliRunner().invoke(cli, ["plugins", "--kind", "variant", "--json"]).stdout)}
    assert "(W1a·W1b) ⊙ (W2a·W2b)" in rows["loha"]["description"] and "2108.06098" in rows["loha"]["description"]
    assert "W1 ⊗ W2" in rows["lokr"]["description"] and "2309.14859" in rows["lokr"]["description"]


@pytest.mark.parametrize("variant", ["loha", "lokr"])
def test_starts_at_the_base_and_loss_goes_down(variant):
    teacher, student = MODELS["MLP"](), MODELS["MLP"]()
    before = outputs(student, inputs("MLP"))
    h = ak.inject(student, variant, r=4, target_modules=BOTH)
    torch.testing.assert_close(outputs(student, inputs("MLP")), before)  # ΔW = 0 at the start
    torch.manual_seed(3)
    ak.inject(teacher, variant, r=4, target_modules=BOTH, init_weights=False)
    fit = Net(nn.Linear(8, 10), student, (8,))  # fit_to_teacher feeds 8 features
    for p in fit.layer.parameters():
        p.requires_grad_(False)
    losses = fit_to_teacher(fit, Net(fit.layer, teacher, (8,)), h)
    assert losses[-1] < 0.3 * losses[0]


@pytest.mark.parametrize("model, variant, config, error", [
    ("gpt2", "loha", {"target_modules": ["c_attn"]}, "not a transformers Conv1D"),
    ("conv3d", "lokr", {"target_modules": ["layer"]}, "not a 3-d convolution"),
    ("MLP", "loha", {"target_modules": ["layer"], "rank_dropout": 1.0}, r"rank_dropout must be a number in \[0, 1\)"),
    ("MLP", "lokr", {"target_modules": ["layer"], "decompose_factor": 0}, "decompose_factor must be"),
    ("MLP", "lokr", {"target_modules": ["layer"], "init_weights": "pissa"}, "init_weights must be true, false or 'lycoris'"),
])
def test_unsupported_layers_and_settings_are_refused_by_name(model, variant, config, error):
    from builders import tiny_gpt2

    built = tiny_gpt2() if model == "gpt2" else Net(nn.Conv3d(2, 4, 2), nn.Linear(4, 2), (2, 2, 2, 2)) \
        if model == "conv3d" else MODELS[model]()
    with pytest.raises(AdaptkitError, match=error) as err:
        ak.inject(built, variant, **config)
    assert "\n" not in str(err.value)


class StableDiffusionShaped(nn.Module):
    """Two layers at Stable Diffusion paths (a UNet 3×3 conv, a CLIP q_proj), so kohya names exist for them."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        resnet = nn.ModuleDict({"conv1": nn.Conv2d(4, 8, 3, padding=1)})
        block = nn.ModuleDict({"resnets": nn.ModuleList([resnet])})
        self.unet = nn.ModuleDict({"down_blocks": nn.ModuleList([block])})
        attn = nn.ModuleDict({"q_proj": nn.Linear(10, 12)})
        layer = nn.ModuleDict({"self_attn": attn})
        encoder = nn.ModuleDict({"layers": nn.ModuleList([layer])})
        self.text_encoder = nn.ModuleDict({"text_model": nn.ModuleDict({"encoder": encoder})})

    def forward(self, image, text):
        conv = self.unet.down_blocks[0].resnets[0].conv1
        return conv(image).sum() + self.text_encoder.text_model.encoder.layers[0].self_attn.q_proj(text).sum()


def lycoris_delta(tensors: dict[str, torch.Tensor], name: str, shape) -> torch.Tensor:
    """ΔW of module `name` of a LyCORIS file by its formulas, written out: alpha / r from the file itself."""
    t = {k.split(".", 1)[1]: v.float() for k, v in tensors.items() if k.startswith(name + ".")}
    alpha = float(t.pop("alpha"))
    if "hada_t1" in t:
        return loha_tucker(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"], t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"], alpha)
    if "hada_w1_a" in t:
        return loha_linear(t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"], alpha).reshape(shape)
    r = t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else alpha
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    if "lokr_t2" in t:
        w2 = torch.einsum("abhw,ao,bi->oihw", t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
    else:
        w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
    w2 = w2 if w2.dim() == len(shape) else w2.reshape(w2.shape[0], shape[1] // w1.shape[1], *shape[2:])
    return alpha / r * kron_written_out(w1, w2)


SD_LAYERS = {"unet.down_blocks.0.resnets.0.conv1": CONV, "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": LINEAR}


@pytest.mark.parametrize("variant, config", [
    ("loha", {"r": 2, "alpha": 3}),
    ("loha", {"r": 2, "alpha": 5, "use_effective_conv2d": True}),
    ("lokr", {"r": 1, "alpha": 2, "use_effective_conv2d": True}),
    ("lokr", {"r": 1, "alpha": 2, "decompose_both": True}),
    ("lokr", {"r": 8, "alpha": 3}),  # both factors full: the scale goes into lokr_w1
], ids=["loha", "loha-tucker", "lokr-tucker", "lokr-decompose-both", "lokr-full"])
def test_peft_adapter_to_lycoris_file_and_back(variant, config, tmp_path):
    from peft import get_peft_model

    from adaptkit.files.convert import convert

    base = StableDiffusionShaped()
    peft = get_peft_model(copy.deepcopy(base), peft_config(variant, target_modules=["conv1", "q_proj"], **config))
    peft.save_pretrained(tmp_path / "peft")
    report = convert(tmp_path / "peft", "kohya", tmp_path / "kohya")
    assert report["max_error"] == 0.0 and all(m["exact"] for m in report["modules"].values())
    tensors = load_file(tmp_path / "kohya" / "lora.safetensors")
    files = read_adapter(tmp_path / "kohya" / "lora.safetensors")
    assert (files.format, files.variant) == ("kohya", variant)
    for path, name in SD_LAYERS.items():
        want = peft.base_model.model.get_submodule(path).get_delta_weight("default").detach()
        weight = base.get_submodule(path).weight
        torch.testing.assert_close(lycoris_delta(tensors, name, weight.shape), want, **TOL)  # LyCORIS's reading
        torch.testing.assert_close(registry.get("variant", variant).delta(files, path, weight), want, **TOL)


def test_live_adapter_saves_as_a_lycoris_file(tmp_path):
    model = StableDiffusionShaped()
    torch.manual_seed(2)
    handle = ak.inject(model, "loha", r=2, alpha=4, target_modules=["conv1", "q_proj"], init_weights=False)
    handle.save(tmp_path / "out", format="kohya")
    tensors = load_file(tmp_path / "out" / "lora.safetensors")
    assert f"{CONV}.hada_w1_a" in tensors and f"{LINEAR}.alpha" in tensors
    for path, name in SD_LAYERS.items():
        layer = model.get_submodule(path)
        torch.testing.assert_close(lycoris_delta(tensors, name, layer.weight.shape), layer.delta("default"), **TOL)


@pytest.mark.parametrize("case", [KOHYA_CASES[0], KOHYA_CASES[5], KOHYA_CASES[7]], ids=["loha", "lokr-tucker", "loha-dora"])
def test_lycoris_file_merges_into_a_saved_base_by_the_formula(case, tmp_path):
    from click.testing import CliRunner

    from adaptkit.cli import cli
    from adaptkit.io import open_store
    from adaptkit.merge.engine import run_merge

    _, modules, expected = case
    kohya_file(tmp_path / "lycoris.safetensors", modules)
    base = {f"{PATHS[n]}.weight": b for n, (_, b) in expected.items()}
    base |= {f"{PATHS[n]}.bias": torch.zeros(b.shape[0]) for n, (_, b) in expected.items()}
    (tmp_path / "base").mkdir()
    save_file(base, tmp_path / "base" / "model.safetensors")
    run_merge({"base_model": str(tmp_path / "base"), "merge_method": "task_arithmetic",
               "models": [{"model": str(tmp_path / "lycoris.safetensors"), "parameters": {"weight": 1.0}}]},
              tmp_path / "m", progress=False, card=False)
    merged = open_store(tmp_path / "m")
    for name, (want, weight) in expected.items():
        torch.testing.assert_close(merged.get(f"{PATHS[name]}.weight"), weight + want, **TOL)
    shown = CliRunner().invoke(cli, ["inspect", str(tmp_path / "lycoris.safetensors"), "--json"])
    assert shown.exit_code == 0, shown.output
    adapter = json.loads(shown.stdout)["adapter"]
    assert adapter["variant"] == case[0][:4] and adapter["targeted_modules"] == len(expected)
    assert [m["dora"] for m in adapter["modules"].values()] == ["dora" in case[0]] * len(expected)


def sd_modules(kind: str) -> dict[str, dict[str, torch.Tensor]]:
    """LyCORIS modules for StableDiffusionShaped's two layers (conv 8 × 4 × 3 × 3, linear 12 × 10), laid out as
    LyCORIS builds them (factorization 8 = 2·4, 4 = 2·2, 12 = 3·4, 10 = 2·5)."""
    if kind == "loha-tucker":
        return {CONV: {"hada_w1_a": rand(2, 8), "hada_w1_b": rand(2, 4), "hada_w2_a": rand(2, 8), "hada_w2_b": rand(2, 4),
                       "hada_t1": rand(2, 2, 3, 3), "hada_t2": rand(2, 2, 3, 3), "alpha": torch.tensor(1.0)},
                LINEAR: {"hada_w1_a": rand(12, 3), "hada_w1_b": rand(3, 10), "hada_w2_a": rand(12, 3),
                         "hada_w2_b": rand(3, 10), "alpha": torch.tensor(6.0)}}
    if kind == "lokr-tucker-decompose-both":
        return {CONV: {"lokr_w1": rand(2, 2), "lokr_w2_a": rand(1, 4), "lokr_w2_b": rand(1, 2),
                       "lokr_t2": rand(1, 1, 3, 3), "alpha": torch.tensor(2.0)},
                LINEAR: {"lokr_w1_a": rand(3, 1), "lokr_w1_b": rand(1, 2), "lokr_w2_a": rand(4, 1), "lokr_w2_b": rand(1, 5),
                         "alpha": torch.tensor(0.5)}}
    return {CONV: {"lokr_w1": rand(2, 2), "lokr_w2": rand(4, 2, 3, 3), "alpha": torch.tensor(9.0)},  # both full
            LINEAR: {"lokr_w1": rand(3, 2), "lokr_w2": rand(4, 5), "alpha": torch.tensor(9.0)}}


@pytest.mark.parametrize("kind", ["loha-tucker", "lokr-tucker-decompose-both", "lokr-full"])
def test_lycoris_file_loads_onto_a_live_model_by_the_formula_and_saves_for_peft(kind, tmp_path):
    from peft import PeftModel

    path = kohya_file(tmp_path / "lycoris.safetensors", sd_modules(kind))
    tensors = load_file(path)
    model = StableDiffusionShaped()
    handle = ak.load_adapter(model, path)
    for module, name in SD_LAYERS.items():
        layer = model.get_submodule(module)
        torch.testing.assert_close(layer.delta("default"), lycoris_delta(tensors, name, layer.weight.shape), **TOL)
    handle.save(tmp_path / "peft")  # a LyCORIS file as a PEFT folder: through the live model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(StableDiffusionShaped(), tmp_path / "peft")
    for module, name in SD_LAYERS.items():
        want = lycoris_delta(tensors, name, model.get_submodule(module).weight.shape)
        torch.testing.assert_close(theirs.base_model.model.get_submodule(module).get_delta_weight("default").detach(),
                                   want, **TOL)


def test_lycoris_conv1d_lokr_merges_by_lycoris_but_is_not_run_live(tmp_path):
    w1, w2 = rand(2, 2), rand(4, 2, 3)  # W2 full and 3-d: LyCORIS's W1 gets a trailing unit dim, PEFT's does not
    files = read_adapter(kohya_file(tmp_path / "c.safetensors", {CONV: {"lokr_w1": w1, "lokr_w2": w2,
                                                                        "alpha": torch.tensor(1.0)}}))
    base = rand(8, 4, 3)
    torch.testing.assert_close(registry.get("variant", "lokr").delta(files, PATHS[CONV], base), kron_written_out(w1, w2), **TOL)
    with pytest.raises(AdaptkitError, match="cannot run on a live model"):
        registry.get("variant", "lokr").config_from_file(files)


@pytest.mark.parametrize("model, variants, with_base", [
    ("MLP", [("loha", {"r": 2}), ("loha", {"r": 3, "alpha": 2})], False),
    ("Conv2d", [("lokr", {"r": 1, "use_effective_conv2d": True}), ("lokr", {"r": 2, "decompose_both": True})], True),
], ids=["loha-mlp", "lokr-conv-with-base"])
def test_adapters_merge_into_a_lora_adapter_that_peft_loads(model, variants, with_base, tmp_path):
    from peft import PeftModel, get_peft_model

    from adaptkit.merge.engine import run_merge

    torch.manual_seed(0)
    base = MODELS[model]().eval()
    inputs_, want = [], {}
    for i, (variant, config) in enumerate(variants):
        peft = get_peft_model(copy.deepcopy(base), peft_config(variant, target_modules=BOTH, **config))
        peft.save_pretrained(tmp_path / f"in{i}")
        inputs_.append({"model": str(tmp_path / f"in{i}"), "parameters": {"weight": 1.0}})
        for path in BOTH:
            want[path] = want.get(path, 0) + peft.base_model.model.get_submodule(path).get_delta_weight("default").detach()
    recipe = {"merge_method": "linear", "parameters": {"normalize": False}, "models": inputs_,
              "output": {"kind": "adapter", "rank": 45}}
    if with_base:  # a conv LoHa/LoKr without Tucker cores stores its kernel flattened: the base gives its shape
        (tmp_path / "base").mkdir()
        save_file({k: v.contiguous() for k, v in base.state_dict().items()}, tmp_path / "base" / "model.safetensors")
        recipe["base_model"] = str(tmp_path / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rank 45 is above some modules' min(out, in): used there as it is
        report = run_merge(recipe, tmp_path / "out", progress=False, card=False)
    assert report["max_error"] < 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "out")
    assert lora.peft_config["default"].peft_type.value == "LORA"
    for path in BOTH:
        torch.testing.assert_close(lora.base_model.model.get_submodule(path).get_delta_weight("default").detach(),
                                   want[path], **TOL)


@pytest.mark.parametrize("variant, config, scale", [
    ("loha", {"rank_dropout": 0.5}, "1/kept"),  # PEFT's LoHa always rescales the kept rows
    ("lokr", {"rank_dropout": 0.5}, "1"),
    ("lokr", {"rank_dropout": 0.5, "rank_dropout_scale": True}, "1/kept"),
])
def test_training_drops_whole_rows_of_delta_as_peft(variant, config, scale):
    model = nn.Sequential(nn.Linear(16, 24, bias=False))
    torch.manual_seed(4)
    handle = ak.inject(model, variant, r=2, target_modules=["0"], init_weights=False, **config)
    layer = model[0]
    delta = layer.delta("default").detach()
    model.train()
    for _ in range(5):
        with torch.no_grad():
            rows = (model(torch.eye(16)) - torch.eye(16) @ layer.base_layer.weight.T).T  # row j: ΔW[j] · keep_j
        kept = rows.abs().sum(dim=1) > 0
        factor = 1 / kept.float().mean() if scale == "1/kept" else 1.0
        torch.testing.assert_close(rows[kept], delta[kept] * factor, **TOL)
        assert 0 < int(kept.sum()) < 24  # some rows dropped, some kept (seeded)
    handle.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(torch.eye(16)) - layer.base_layer(torch.eye(16)), delta.T, **TOL)


def test_module_dropout_skips_the_whole_branch_while_training():
    model = nn.Sequential(nn.Linear(6, 4))
    torch.manual_seed(1)
    ak.inject(model, "loha", r=2, target_modules=["0"], init_weights=False, module_dropout=0.5)
    x = torch.randn(3, 6)
    base = model[0].base_layer(x).detach()
    model.eval()
    with torch.no_grad():
        full = model(x)
    model.train()
    with torch.no_grad():
        seen = [model(x) for _ in range(40)]
    skipped = sum(torch.equal(y, base) for y in seen)
    assert 5 < skipped < 35 and all(torch.equal(y, base) or torch.allclose(y, full) for y in seen)
