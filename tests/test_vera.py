"""VeRA (arXiv 2310.11454): ΔW_l = diag(b_l)·B[:out_l]·diag(d_l)·A[:, :in_l] with one frozen random A, B.

Checked against the formula, against PEFT's own VeRA both ways (its PRNG projections bit for bit,
its folders with and without saved projections), the tensor plane, a LoRA export and a concat
merge that PEFT loads, and the one-projection-per-model rule.
"""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from torch import nn

import adaptkit as ak
from adaptkit.files.convert import convert
from adaptkit import registry
from adaptkit.adapter import read_adapter
from adaptkit.cli import cli
from adaptkit.errors import AdaptkitError
from builders import fit_to_teacher, tiny_gpt2, tiny_llama

IDS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
TOL = dict(atol=1e-5, rtol=1e-5)
SHAPES = ["q_proj", "v_proj", "up_proj", "down_proj"]  # out 32/16/64/32, in 32/32/32/64: A is 4 × 64, B 64 × 4
VERA = registry.get("variant", "vera")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def randomize(handle, name=None, seed=1):
    """Move b and d away from their start (b = 0), so the tests see real updates."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in handle.parameters(name):
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g))
    return handle


def peft_vera(base, **config):
    from peft import VeraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(copy.deepcopy(base), VeraConfig(**config)).eval()


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 6))


def test_projections_are_peft_s_bit_for_bit():
    base = tiny_llama()
    for key, r in ((0, 4), (1234, 7), (2**40 + 3, 96)):
        pm = peft_vera(base, r=r, target_modules=SHAPES, projection_prng_key=key)
        theirs_a, theirs_b = pm.base_model.vera_A["default"], pm.base_model.vera_B["default"]
        assert theirs_a.shape == (r, 64) and theirs_b.shape == (64, r)
        model = copy.deepcopy(base)
        shared = ak.inject(model, "vera", r=r, target_modules=SHAPES, projection_prng_key=key).adapters["default"].shared
        assert torch.equal(shared["vera_A"], theirs_a) and torch.equal(shared["vera_B"], theirs_b)
        assert not shared["vera_A"].requires_grad and not shared["vera_B"].requires_grad


def test_forward_is_the_formula_with_one_shared_pair():
    model = mlp()
    base = copy.deepcopy(model)
    h = randomize(ak.inject(model, "vera", r=5, target_modules=["0", "2"], vera_dropout=0.2))
    shared = h.adapters["default"].shared
    assert shared["vera_A"].shape == (5, 12) and shared["vera_B"].shape == (12, 5)  # max in 12, max out 12
    p0, p2 = (model.get_submodule(p).branches["default"].params for p in ("0", "2"))
    assert p0["vera_A"] is p2["vera_A"] is shared["vera_A"] and p0["vera_B"] is p2["vera_B"] is shared["vera_B"]
    a, b = shared["vera_A"], shared["vera_B"]
    x = torch.randn(5, 8)
    h1 = base[0](x) + p0["vera_lambda_b"] * ((p0["vera_lambda_d"] * (x @ a[:, :8].T)) @ b[:12].T)
    t = torch.tanh(h1)
    expected = base[2](t) + p2["vera_lambda_b"] * ((p2["vera_lambda_d"] * (t @ a[:, :12].T)) @ b[:6].T)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, **TOL)
    h.merge()  # ΔW = diag(b)·B[:out]·diag(d)·A[:, :in]
    d_w = torch.diag(p2["vera_lambda_b"]) @ b[:6] @ torch.diag(p2["vera_lambda_d"]) @ a[:, :12]
    torch.testing.assert_close(model[2].weight - base[2].weight, d_w.detach(), atol=1e-6, rtol=1e-5)


def test_start_is_the_base_and_only_vectors_train():
    model = tiny_llama()
    before = logits(model)
    h = ak.inject(model, "vera", r=8, target_modules=["q_proj", "up_proj"], d_initial=0.3)
    torch.testing.assert_close(logits(model), before, **TOL)  # b = 0
    layer = model.get_submodule("model.layers.0.mlp.up_proj").branches["default"].params
    assert not layer["vera_lambda_b"].any() and torch.equal(layer["vera_lambda_d"], torch.full((8,), 0.3))
    assert h.trainable_parameters()[0] == 2 * (32 + 8) + 2 * (64 + 8)
    assert {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad} == {"vera_lambda_b", "vera_lambda_d"}
    torch.manual_seed(3)
    h2 = ak.inject(tiny_llama(), "vera", r=8, target_modules=["q_proj"], init_weights=False)
    p = h2.model.get_submodule("model.layers.1.self_attn.q_proj").branches["default"].params
    assert torch.equal(p["vera_lambda_b"], torch.ones(32)) and p["vera_lambda_d"].std() > 0


def test_loss_goes_down():
    teacher, student = mlp(), mlp()
    randomize(ak.inject(teacher, "vera", r=16, target_modules=["0", "2"]), seed=3)
    h = ak.inject(student, "vera", r=16, target_modules=["0", "2"])
    losses = fit_to_teacher(student, teacher, h)
    assert losses[-1] < 0.3 * losses[0]


@pytest.mark.parametrize("save_projection", [True, False])
def test_peft_loads_what_we_save(save_projection, tmp_path):
    from peft import PeftModel

    base = tiny_llama()
    model = copy.deepcopy(base)
    h = randomize(ak.inject(model, "vera", r=6, target_modules=SHAPES, projection_prng_key=11,
                            save_projection=save_projection))
    expected = logits(model)
    h.save(tmp_path / "a")
    keys = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert ("base_model.vera_A" in keys and "base_model.vera_B" in keys) == save_projection
    assert len(keys) == 2 * 2 * len(SHAPES) + 2 * save_projection
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["projection_prng_key"], cfg["save_projection"]) == ("VERA", 6, 11, save_projection)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a").eval()
    torch.testing.assert_close(logits(theirs), expected, **TOL)
    again = ak.load_adapter(copy.deepcopy(base), tmp_path / "a")
    torch.testing.assert_close(logits(again.model), expected, **TOL)
    files = read_adapter(tmp_path / "a")  # the tensor plane regenerates unsaved projections from the record
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        torch.testing.assert_close(VERA.delta(files, module), again.model.get_submodule(module).delta("default"), **TOL)


@pytest.mark.parametrize("save_projection", [True, False])
def test_we_load_what_peft_saves(save_projection, tmp_path):
    base = tiny_llama()
    pm = peft_vera(base, r=5, target_modules=SHAPES, projection_prng_key=3, save_projection=save_projection,
                   init_weights=False, vera_dropout=0.1)
    pm.save_pretrained(tmp_path / "peft")
    expected = logits(pm)
    h = ak.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(logits(h.model), expected, **TOL)
    shared = h.adapters["default"].shared
    assert torch.equal(shared.vera_A, pm.base_model.vera_A["default"])  # regenerated (or loaded) exactly
    assert ("vera_A" in shared) == save_projection  # entries are saved; unsaved ones are attributes only
    h.save(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["save_projection"] == save_projection
    files = read_adapter(tmp_path / "peft")
    module = "model.layers.0.self_attn.q_proj"
    if save_projection:  # PEFT's files lack input sizes: the base weight gives them
        original = base.get_submodule(module).weight
        torch.testing.assert_close(VERA.delta(files, module, original), h.model.get_submodule(module).delta("default"), **TOL)
    else:
        with pytest.raises(AdaptkitError, match="save_projection: false"):
            VERA.delta(files, module)


def test_gpt2_conv1d_transposes_and_peft_agrees(tmp_path):
    from peft import PeftModel

    base = tiny_gpt2()
    model = copy.deepcopy(base)
    h = randomize(ak.inject(model, "vera", r=4, target_modules=["c_attn", "c_fc", "mlp.c_proj"]))
    expected = logits(model)
    h.save(tmp_path / "a")
    files = read_adapter(tmp_path / "a")
    assert files.config["fan_in_fan_out"] is True
    before = {p: model.get_submodule(p).weight.detach().clone() for p in h.adapters["default"].layers}
    h.merge()
    for path, w in before.items():  # stored in × out: ΔW comes transposed
        torch.testing.assert_close(VERA.delta(files, path), model.get_submodule(path).weight.detach() - w, atol=1e-6, rtol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a").eval()
    torch.testing.assert_close(logits(theirs), expected, **TOL)


def test_export_to_plain_lora_is_exact_in_peft(tmp_path):
    from peft import PeftModel

    base = tiny_llama()
    model = copy.deepcopy(base)
    h = randomize(ak.inject(model, "vera", r=6, target_modules=SHAPES, modules_to_save=["lm_head"], save_projection=False))
    with torch.no_grad():
        model.lm_head.copies["default"].weight.add_(0.05)
    expected = logits(model)
    h.save(tmp_path / "vera")
    out = tmp_path / "lora"
    convert(tmp_path / "vera", "peft", out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"], cfg["modules_to_save"]) == ("LORA", 6, 6, ["lm_head"])
    assert not set(cfg) & {"projection_prng_key", "save_projection", "d_initial", "adaptkit_in_features"}
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
    torch.testing.assert_close(logits(theirs), expected, **TOL)
    torch.testing.assert_close(logits(ak.load_adapter(copy.deepcopy(base), out).model), expected, **TOL)


def test_concat_merge_of_vera_adapters_with_different_keys_is_exact(tmp_path):
    from peft import PeftModel

    h = randomize(ak.inject(tiny_llama(), "vera", r=4, target_modules=["q_proj", "down_proj"]), seed=1)
    h.save(tmp_path / "a")
    other = randomize(ak.inject(tiny_llama(), "vera", r=3, target_modules=["q_proj"], projection_prng_key=9), seed=2)
    other.save(tmp_path / "b")
    result = CliRunner().invoke(cli, ["-q", "merge", "--method", "concat", "-m", f"{tmp_path / 'a'}:1", "-m",
                                      f"{tmp_path / 'b'}:-0.5", "--rank", "7", "-o", str(tmp_path / "out"), "--json"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["ranks"]["model.layers.0.self_attn.q_proj"] == 7
    # Expected: a merged into the weights, then b (another key: only once a has left) with -0.5·b.
    both = ak.load_adapter(tiny_llama(), tmp_path / "a").merge_and_unload()
    handle = ak.load_adapter(both, tmp_path / "b")
    with torch.no_grad():
        for name, p in handle.parameters():
            if name.endswith("vera_lambda_b"):
                p.mul_(-0.5)
    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "out").eval()
    torch.testing.assert_close(logits(peft_model), logits(both), **TOL)
    # Any other operator runs on each input's ΔW and re-factors by SVD: rank 7 holds the sum exactly.
    result = CliRunner().invoke(cli, ["-q", "merge", "--method", "linear", "-m", f"{tmp_path / 'a'}:1", "-m",
                                      f"{tmp_path / 'b'}:-0.5", "--param", "normalize=false", "--rank", "7",
                                      "-o", str(tmp_path / "svd"), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["max_error"] < 1e-5
    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "svd").eval()
    torch.testing.assert_close(logits(peft_model), logits(both), **TOL)


def test_one_projection_key_per_model(tmp_path):
    model = tiny_llama()
    h = randomize(ak.inject(model, "vera", r=4, target_modules=["q_proj"], projection_prng_key=1), name="default")
    with pytest.raises(AdaptkitError) as err:
        ak.inject(model, "vera", name="b", r=4, target_modules=["v_proj"], projection_prng_key=2)
    assert "projection_prng_key" in str(err.value) and "\n" not in str(err.value)
    pm = peft_vera(tiny_llama(), r=4, target_modules=["q_proj"], projection_prng_key=5, init_weights=False)
    pm.save_pretrained(tmp_path / "k5")
    with pytest.raises(AdaptkitError, match="projection_prng_key"):
        ak.load_adapter(model, tmp_path / "k5", name="c")
    assert h.names == ["default"]
    ak.inject(model, "vera", name="b", r=4, target_modules=["v_proj"], projection_prng_key=1)  # same key: fine
    randomize(h, name="b", seed=4)
    h.set_active(["default", "b"])
    expected = logits(model)
    h.merge()
    torch.testing.assert_close(logits(model), expected, atol=1e-5, rtol=1e-4)
    h.unmerge()
    # A hot-swap keeps the adapter's projections, so the key must stay too.
    h.load(tmp_path / "k5", name="default", swap=True)
    with pytest.raises(AdaptkitError, match="hot-swap must keep the key"):
        logits(model)


def test_missing_saved_projections_are_an_error(tmp_path):
    from safetensors.torch import save_file

    ak.inject(tiny_llama(), "vera", r=4, target_modules=["q_proj"]).save(tmp_path / "a")
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    save_file({k: v for k, v in tensors.items() if "vera_A" not in k}, tmp_path / "a" / "adapter_model.safetensors")
    with pytest.raises(AdaptkitError, match="save_projection but base_model.vera_A"):
        ak.load_adapter(tiny_llama(), tmp_path / "a")


def test_hot_swap_with_the_same_key_equals_a_fresh_load(tmp_path):
    base = tiny_llama()
    for i, seed in enumerate((1, 2)):
        randomize(ak.inject(copy.deepcopy(base), "vera", r=4, target_modules=["q_proj", "up_proj"]), seed=seed).save(tmp_path / f"a{i}")
    h = ak.load_adapter(copy.deepcopy(base), tmp_path / "a0")
    h.load(tmp_path / "a1", swap=True)
    torch.testing.assert_close(logits(h.model), logits(ak.load_adapter(copy.deepcopy(base), tmp_path / "a1").model), **TOL)


@pytest.mark.parametrize("config, message", [
    (dict(target_modules=["embed_tokens"]), "linear layers"),
    (dict(target_modules=["q_proj"], r=0), "positive integer"),
    (dict(target_modules=["q_proj"], projection_prng_key="seven"), "must be an integer"),
    (dict(target_modules=["q_proj"], vera_dropout=1.0), "vera_dropout"),
    (dict(target_modules=["q_proj"], lora_alpha=8), "lora_alpha"),
])
def test_bad_configs_are_one_line_errors(config, message):
    with pytest.raises(AdaptkitError, match=message) as err:
        ak.inject(tiny_llama(), "vera", **config)
    assert "\n" not in str(err.value)


def test_inspect_describes_the_projection(tmp_path):
    h = ak.inject(tiny_llama(), "vera", r=4, target_modules=["q_proj", "up_proj"], projection_prng_key=7)
    h.save(tmp_path / "a")
    info = ak.inspect(tmp_path / "a")["adapter"]
    assert (info["variant"], info["rank"], info["projection_prng_key"], info["layers"]) == ("vera", 4, 7, 4)
    assert info["projection_shape"] == {"A": [4, 32], "B": [64, 4]}
    assert info["modules"]["model.layers.0.mlp.up_proj"] == {"rank": 4, "out_features": 64, "in_features": 32}
