"""(IA)³ (arXiv 2205.05638): y = l ⊙ (W·x + b), or y = W·(l ⊙ x) + b for feed-forward layers.

The formula is written out on a plain module; PEFT writes and we load (and back) with equal outputs on
a tiny Llama and on GPT-2 (Conv1D, fan_in_fan_out, biases); merging — live, from files, into a saved
base — equals the adapted model, biases included.
"""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from peft import IA3Config, PeftModel, get_peft_model
from torch import nn

import adaptkit as ak
from adaptkit import registry
from adaptkit.adapter import read_adapter
from adaptkit.errors import AdaptkitError
from builders import tiny_gpt2, tiny_llama

IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
TOL = dict(atol=1e-5, rtol=1e-5)
ARCHS = {  # builder, IA3 targets, feed-forward targets
    "llama": (tiny_llama, ["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gpt2": (tiny_gpt2, ["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def peft_ia3(base, targets, ff):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GPT-2: "fan_in_fan_out is set to False but ... Conv1D"
        return get_peft_model(copy.deepcopy(base), IA3Config(target_modules=targets, feedforward_modules=ff,
                                                             init_ia3_weights=False)).eval()


def ours(base, targets, ff, **extra):
    model = copy.deepcopy(base)
    return model, ak.inject(model, "ia3", target_modules=targets, feedforward_modules=ff, init_ia3_weights=False, **extra)


def test_formula_on_a_plain_module():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    x = torch.randn(3, 6)
    (w0, b0), (w2, b2) = [(m.weight.detach().clone(), m.bias.detach().clone()) for m in (net[0], net[2])]
    handle = ak.inject(net, "ia3", target_modules=["0", "2"], feedforward_modules=["2"], init_ia3_weights=False)
    l0, l2 = net[0].branches["default"].params["ia3_l"].detach(), net[2].branches["default"].params["ia3_l"].detach()
    assert l0.shape == (5, 1) and l2.shape == (1, 5)  # PEFT's shapes: (out, 1); feed-forward (1, in)
    hidden = torch.relu(l0.flatten() * (x @ w0.T + b0))  # the output (bias included) scaled
    expected = (hidden * l2.flatten()) @ w2.T + b2  # the input scaled, the bias not
    torch.testing.assert_close(net(x), expected)
    assert handle.trainable_parameters()[0] == 5 + 5
    # ΔW written out: diag(l)·W − W and W·diag(l) − W; the output scaling also scales the bias.
    handle.merge()
    torch.testing.assert_close(net[0].base_layer.weight, l0 * w0)
    torch.testing.assert_close(net[0].base_layer.bias, l0.flatten() * b0)
    torch.testing.assert_close(net[2].base_layer.weight, w2 * l2)
    torch.testing.assert_close(net[2].base_layer.bias, b2)
    torch.testing.assert_close(net(x), expected)
    handle.unmerge()
    torch.testing.assert_close(net[0].base_layer.bias, b0, atol=1e-7, rtol=0)


def test_ones_init_is_the_base_model():
    base = tiny_llama()
    model = copy.deepcopy(base)
    ak.inject(model, "ia3", target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    assert all(torch.equal(p, torch.ones_like(p)) for n, p in model.named_parameters() if n.endswith("ia3_l"))
    torch.testing.assert_close(logits(model), logits(base), atol=0, rtol=0)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_peft_writes_we_load_and_peft_loads_what_we_write(arch, tmp_path):
    build, targets, ff = ARCHS[arch]
    base = build()
    pm = peft_ia3(base, targets, ff)
    pm.save_pretrained(tmp_path / "peft")
    expected = logits(pm)
    assert not torch.allclose(expected, logits(base), atol=1e-3)

    model = copy.deepcopy(base)
    handle = ak.load_adapter(model, tmp_path / "peft")
    torch.testing.assert_close(logits(model), expected, **TOL)
    handle.save(tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3" and config["fan_in_fan_out"] is (arch == "gpt2")
    assert config["feedforward_modules"] and all(m.endswith(ff[0]) for m in config["feedforward_modules"])
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(theirs), expected, **TOL)

    fresh, mine = ours(base, targets, ff)  # injected by us (random l), saved, loaded by PEFT
    mine.save(tmp_path / "mine")
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "mine").eval()
    torch.testing.assert_close(logits(theirs), logits(fresh), **TOL)
    keys = read_adapter(tmp_path / "mine").store.keys()
    assert all(k.startswith("base_model.model.") and k.endswith(".ia3_l") for k in keys)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_merge_unmerge_equal_peft_merge_and_tensor_delta(arch, tmp_path):
    build, targets, ff = ARCHS[arch]
    base = build()
    model, handle = ours(base, targets, ff)
    expected = logits(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    handle.merge()
    torch.testing.assert_close(logits(model), expected, **TOL)
    handle.save(tmp_path / "a")
    # PEFT's merge of the same adapter gives the same weights and biases.
    peft_state = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a").merge_and_unload().state_dict()
    live = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if ".branches." not in k}
    for key, value in peft_state.items():
        torch.testing.assert_close(live[key], value, atol=1e-6, rtol=1e-5, msg=key)
    # The tensor plane from the saved files gives the same change, against the original tensors.
    files, variant = read_adapter(tmp_path / "a"), registry.get("variant", "ia3")
    originals = dict(base.named_parameters())
    for module in files.modules:
        w0 = originals[f"{module}.weight"].detach()
        torch.testing.assert_close(variant.delta(files, module, w0), peft_state[f"{module}.weight"] - w0, atol=1e-6, rtol=1e-5)
        b0 = originals.get(f"{module}.bias")
        db = None if b0 is None else variant.delta_bias(files, module, b0.detach())
        if variant.feedforward(files, module) or b0 is None:
            assert db is None
        else:
            torch.testing.assert_close(db, peft_state[f"{module}.bias"] - b0, atol=1e-6, rtol=1e-5)
    with pytest.raises(AdaptkitError, match="rescales the base weight.*give the base model"):
        variant.delta(files, sorted(files.modules)[0])
    handle.unmerge()
    torch.testing.assert_close(logits(model), expected, **TOL)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], atol=1e-6, rtol=0, msg=key)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_merge_into_a_saved_base_equals_the_adapted_model(arch, tmp_path):
    from adaptkit.merge.engine import run_merge

    build, targets, ff = ARCHS[arch]
    base = build()
    base.save_pretrained(tmp_path / "base")
    model, handle = ours(base, targets, ff)
    handle.save(tmp_path / "a")
    run_merge({"base_model": str(tmp_path / "base"), "merge_method": "task_arithmetic",
               "models": [{"model": str(tmp_path / "a"), "parameters": {"weight": 1.0}}]}, tmp_path / "m", progress=False)
    merged = type(base).from_pretrained(tmp_path / "m").eval()
    torch.testing.assert_close(logits(merged), logits(model), **TOL)


def test_two_adapters_multiply_like_peft():
    base = tiny_llama()
    model, handle = ours(base, ["k_proj", "down_proj"], ["down_proj"])
    ak.inject(model, "ia3", name="b", target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"],
              init_ia3_weights=False)
    handle.set_active(["default", "b"])
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(2, 3, 64)
    la, lb = (layer.branches[n].params["ia3_l"].detach().flatten() for n in ("default", "b"))
    torch.testing.assert_close(layer(x), layer.base_layer(x * la * lb))
    expected = logits(model)
    handle.merge()
    torch.testing.assert_close(logits(model), expected, **TOL)


def test_defaults_follow_peft_for_the_model_type():
    base = tiny_llama()
    pm = get_peft_model(copy.deepcopy(base), IA3Config())
    theirs = {n: m.is_feedforward for n, m in pm.base_model.model.named_modules() if hasattr(m, "is_feedforward")}
    model = copy.deepcopy(base)
    handle = ak.inject(model, "ia3")
    mine = {p: model.get_submodule(p).branches["default"].settings["feedforward"] for p in handle.adapters["default"].layers}
    assert mine == theirs and any(mine.values()) and not all(mine.values())


def test_one_line_errors():
    base = tiny_llama()
    with pytest.raises(AdaptkitError, match=r"feedforward_modules \['up_proj'\] must be a subset"):
        ak.inject(copy.deepcopy(base), "ia3", target_modules=["k_proj"], feedforward_modules=["up_proj"])
    with pytest.raises(AdaptkitError, match="IA3 scales Linear, Conv1D and Conv1d/2d/3d layers; leave embedding"):
        ak.inject(copy.deepcopy(base), "ia3", target_modules=["embed_tokens"], feedforward_modules=[])
    with pytest.raises(AdaptkitError, match="no default feedforward_modules for model type None"):
        ak.inject(nn.Sequential(nn.Linear(3, 3)), "ia3", target_modules=["0"])
    with pytest.raises(AdaptkitError, match="init_ia3_weights must be true or false"):
        ak.inject(copy.deepcopy(base), "ia3", target_modules=["k_proj"], feedforward_modules=[], init_ia3_weights="x")


def test_inspect_reports_feedforward_modules(tmp_path):
    _, handle = ours(tiny_llama(), ["k_proj", "down_proj"], ["down_proj"])
    handle.save(tmp_path / "a")
    found = ak.inspect(tmp_path / "a")["adapter"]
    assert found["variant"] == "ia3" and found["targeted_modules"] == 4
    assert found["feedforward_modules"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


def test_convert_to_lora_keeps_the_bias_change(tmp_path):
    """IA3 on GPT-2's c_attn scales its output, bias included. As a LoRA (by SVD, with --base) the
    weight change becomes factors and the new bias travels whole in the module's base layer, as PEFT
    saves a trained bias: PEFT's LoRA on the base then gives the IA3 model's outputs."""
    from adaptkit.files.convert import convert

    base = tiny_gpt2()
    pm = peft_ia3(base, ["c_attn", "c_fc"], ["c_fc"])
    pm.save_pretrained(tmp_path / "ia3")
    base.save_pretrained(tmp_path / "base")
    report = convert(tmp_path / "ia3", "peft", tmp_path / "lora", rank=32, base=tmp_path / "base")
    assert "transformer.h.0.attn.c_attn.bias" in report["saved"]
    assert "transformer.h.0.mlp.c_fc.bias" not in report["saved"]  # input scaling leaves the bias alone
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora").eval()
    torch.testing.assert_close(logits(lora), logits(pm), atol=1e-4, rtol=1e-4)
    with pytest.raises(AdaptkitError, match="give the base model"):  # its ΔW needs W anyway
        convert(tmp_path / "ia3", "peft", tmp_path / "x", rank=32)
