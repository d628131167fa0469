"""Tied-LoRA (arXiv 2311.09578): ΔW_l = s·diag(v_l)·B·diag(u_l)·A with A, B shared by layers of one shape.

The formula is written out here and checked against the forward pass, the merged weights, the
tensor plane and an exported plain LoRA that PEFT itself loads.
"""
from __future__ import annotations

import copy
import itertools
import json

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
ALL_TRAIN = ["".join(c.upper() if on else c for c, on in zip("vbua", bits))
             for bits in itertools.product([False, True], repeat=4) if any(bits)]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 6))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def randomize(handle, seed=1):
    """Move every adapter tensor away from its (ΔW = 0) start, so the tests see real updates."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in handle.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    return handle


def branch(model, path, name="default"):
    return model.get_submodule(path).branches[name].params


def test_forward_is_the_formula_and_two_shapes_make_two_groups():
    model = mlp()
    base = copy.deepcopy(model)
    h = randomize(ak.inject(model, "tied_lora", r=3, lora_alpha=6, target_modules=["0", "2", "4"]))
    shared = h.adapters["default"].shared
    assert sorted(shared) == ["tied_A_0", "tied_A_1", "tied_B_0", "tied_B_1"]
    p0, p2, p4 = (branch(model, p) for p in ("0", "2", "4"))
    assert p0["tied_A"] is p2["tied_A"] is shared["tied_A_0"] and p0["tied_B"] is p2["tied_B"]
    assert p4["tied_A"] is shared["tied_A_1"] and p4["tied_B"].shape == (6, 3)
    x = torch.randn(5, 8)
    s = 6 / 3
    expected = x
    for i, p in zip((0, 2, 4), (p0, p2, p4)):
        lin = base[i]
        y = lin(expected) + s * p["tied_v"] * ((p["tied_u"] * (expected @ p["tied_A"].T)) @ p["tied_B"].T)
        expected = torch.tanh(y) if i < 4 else y
    with torch.no_grad():
        assert torch.allclose(model(x), expected, **TOL)


def test_initialization_follows_the_global_seed():
    handles = []
    for seed in (5, 5, 6):
        model = mlp()  # seeds 0 itself: the adapter's seed is set after
        torch.manual_seed(seed)
        handles.append(dict(ak.inject(model, "tied_lora", r=2, target_modules=["0", "4"]).parameters()))
    a, b, c = handles
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["0.tied_A"], c["0.tied_A"])


def count(train, r, d_in, d_out, layers):
    on = {k: c.isupper() for k, c in zip("vBuA", train)}
    return on["A"] * r * d_in + on["B"] * d_out * r + layers * (on["u"] * r + on["v"] * d_out)


@pytest.mark.parametrize("train", ["VBUA", "vBuA", "vbuA", "VbUa", "vBUa", "VbuA"])
def test_trainable_counts_flags_and_zero_start(train):
    model = tiny_llama()
    before = logits(model)
    h = ak.inject(model, "tied_lora", r=4, lora_alpha=8, target_modules=["q_proj"], train=train)
    trainable = h.trainable_parameters()[0]
    assert trainable == count(train, 4, 32, 32, 2)
    if train == "VBUA":
        assert trainable == (32 + 32) * 4 + 2 * (4 + 32)
    if train == "vBuA":
        assert trainable == (32 + 32) * 4
    assert torch.allclose(logits(model), before, **TOL)  # ΔW = 0 at the start
    on = {k: c.isupper() for k, c in zip("vBuA", train)}
    zero = next(k for k in "BvuA" if on[k])
    for path in h.adapters["default"].layers:
        p = branch(model, path)
        for k in "vBuA":
            t = p[f"tied_{k}"]
            assert t.requires_grad == on[k]
            if k == zero:
                assert not t.any()
            elif k in "uv":
                assert torch.equal(t, torch.ones_like(t))
            else:
                assert t.abs().min() > 0 and t.std() > 0  # Kaiming-uniform


def test_every_train_setting_the_paper_studies_is_accepted():
    assert len(ALL_TRAIN) == 15
    for train in ALL_TRAIN:
        h = ak.inject(mlp(), "tied_lora", r=2, target_modules=["0", "2", "4"], train=train)
        assert h.trainable_parameters()[0] == count(train, 2, 8, 8, 2) + count(train, 2, 8, 6, 1)


@pytest.mark.parametrize("bad", ["vbua", "VBU", "ABUV", "vBuAx", "v B", "", 5, None])
def test_bad_train_is_a_one_line_error_with_examples(bad):
    with pytest.raises(AdaptkitError) as err:
        ak.inject(mlp(), "tied_lora", r=2, target_modules=["0"], train=bad)
    message = str(err.value)
    assert "train" in message and "vBuA" in message and "\n" not in message


@pytest.mark.parametrize("train", ["VBUA", "vBuA", "VbUa", "vbuA"])
def test_optimizer_moves_trained_tensors_only(train):
    model = tiny_llama()
    model.train()
    h = ak.inject(model, "tied_lora", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], train=train)
    start = {n: p.detach().clone() for n, p in h.parameters()}
    opt = torch.optim.AdamW(h.param_groups(1e-2), weight_decay=0.0)
    for _ in range(3):
        opt.zero_grad()
        model(IDS, labels=IDS).loss.backward()
        opt.step()
    on = {k: c.isupper() for k, c in zip("vBuA", train)}
    for n, p in h.parameters():
        if on[n.rsplit("_", 1)[-1]]:
            assert not torch.equal(p, start[n]), n
        else:
            assert torch.equal(p, start[n]) and p.grad is None, n


@pytest.mark.parametrize("train", ["VBUA", "vBuA"])
def test_loss_goes_down_on_a_toy_regression(train):
    teacher, student = mlp(), mlp()
    randomize(ak.inject(teacher, "tied_lora", r=2, target_modules=["0", "2", "4"]), seed=3)
    h = ak.inject(student, "tied_lora", r=2, lora_alpha=2, target_modules=["0", "2", "4"], train=train)
    losses = fit_to_teacher(student, teacher, h)
    assert losses[-1] < 0.3 * losses[0]


def test_save_load_round_trip(tmp_path):
    model = tiny_llama()
    h = randomize(ak.inject(model, "tied_lora", r=4, lora_alpha=8, lora_dropout=0.1,
                            target_modules=["q_proj", "v_proj"], train="vBuA"))
    model.eval()
    expected = logits(model)
    h.save(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["adaptkit_variant"] == "tied_lora" and not cfg.get("peft_type")
    assert (cfg["r"], cfg["lora_alpha"], cfg["train"], cfg["lora_dropout"]) == (4, 8, "vBuA", 0.1)
    assert [(g["in_features"], g["out_features"], len(g["modules"])) for g in cfg["tied_groups"]] == [(32, 32, 2), (32, 16, 2)]
    keys = sorted(load_file(tmp_path / "a" / "adapter_model.safetensors"))
    assert [k for k in keys if not k.startswith("base_model.model.")] == \
        ["base_model.tied_A_0", "base_model.tied_A_1", "base_model.tied_B_0", "base_model.tied_B_1"]
    assert all(k.endswith((".tied_u", ".tied_v")) for k in keys if k.startswith("base_model.model."))
    assert len(keys) == 4 + 2 * 4
    other = tiny_llama()
    h2 = ak.load_adapter(other, tmp_path / "a")
    assert torch.allclose(logits(other), expected, **TOL)
    assert h2.adapters["default"].config["train"] == "vBuA"
    assert h2.trainable_parameters()[0] == h.trainable_parameters()[0] == (32 + 32) * 4 + (32 + 16) * 4
    info = ak.inspect(tmp_path / "a")["adapter"]
    assert info["variant"] == "tied_lora" and info["layers"] == 4 and info["train"] == "vBuA"
    assert [(g["in_features"], g["out_features"], g["layers"]) for g in info["shape_groups"]] == [(32, 32, 2), (32, 16, 2)]


def test_merge_then_unmerge_restores_the_weights():
    model = tiny_llama()
    h = randomize(ak.inject(model, "tied_lora", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    expected = logits(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    h.merge()
    assert torch.allclose(logits(model), expected, atol=1e-5, rtol=1e-4)
    assert any(not torch.equal(p, weights[n]) for n, p in model.named_parameters() if n in weights)
    h.unmerge()
    for n, p in model.named_parameters():
        if n in weights:
            assert torch.allclose(p, weights[n], atol=1e-6), n
    assert torch.allclose(logits(model), expected, **TOL)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_tensor_plane_delta_is_the_merged_change(arch, tmp_path):
    build, targets = {"llama": (tiny_llama, ["q_proj", "v_proj", "down_proj"]),
                      "gpt2": (tiny_gpt2, ["c_attn", "c_fc", "mlp.c_proj"])}[arch]
    model = build()
    h = randomize(ak.inject(model, "tied_lora", r=4, lora_alpha=8, target_modules=targets))
    h.save(tmp_path / "a")
    files = read_adapter(tmp_path / "a")
    assert files.variant == "tied_lora" and files.config["fan_in_fan_out"] == (arch == "gpt2")
    variant = registry.get("variant", "tied_lora")
    before = {p: model.get_submodule(p).weight.detach().clone() for p in h.adapters["default"].layers}
    h.merge()
    for path, w in before.items():
        merged = model.get_submodule(path).weight.detach() - w
        assert torch.allclose(variant.delta(files, path), merged, atol=1e-6), path


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_export_to_plain_lora_is_exact_in_peft(arch, tmp_path):
    from peft import PeftModel

    build, targets = {"llama": (tiny_llama, ["q_proj", "v_proj", "down_proj"]),
                      "gpt2": (tiny_gpt2, ["c_attn", "c_fc", "mlp.c_proj"])}[arch]
    model = build()
    saved = ["lm_head"] if arch == "llama" else None  # full copies pass through unchanged
    h = randomize(ak.inject(model, "tied_lora", r=4, lora_alpha=12, target_modules=targets, train="vBuA",
                            modules_to_save=saved))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".copies." in n:
                p.add_(0.05)
    expected = logits(model)
    h.save(tmp_path / "tied")
    out = tmp_path / "lora"
    convert(tmp_path / "tied", "peft", out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"]) == ("LORA", 4, 12) and "adaptkit_variant" not in cfg
    assert cfg["modules_to_save"] == saved and cfg["fan_in_fan_out"] == (arch == "gpt2")
    peft_model = PeftModel.from_pretrained(build(), out).eval()
    assert torch.allclose(logits(peft_model), expected, **TOL)
    assert torch.allclose(logits(ak.load_adapter(build(), out).model), expected, **TOL)


def test_concat_merge_of_tied_adapters_is_a_plain_lora(tmp_path):
    from peft import PeftModel

    model = tiny_llama()
    h = randomize(ak.inject(model, "tied_lora", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), seed=1)
    h.save(tmp_path / "a")
    other = tiny_llama()
    randomize(ak.inject(other, "tied_lora", r=2, lora_alpha=2, target_modules=["q_proj"]), seed=2)
    ak.Adapters.of(other).save(tmp_path / "b")
    result = CliRunner().invoke(cli, ["-q", "merge", "--method", "concat", "-m", f"{tmp_path / 'a'}:1", "-m",
                                      f"{tmp_path / 'b'}:-0.5", "--rank", "6", "-o", str(tmp_path / "out"), "--json"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["ranks"]["model.layers.0.self_attn.q_proj"] == 6
    both = tiny_llama()
    ak.load_adapter(both, tmp_path / "a", name="a")
    handle = ak.load_adapter(both, tmp_path / "b", name="b")
    with torch.no_grad():
        for _, p in handle.parameters("b"):
            if p.shape[0] == 32 and p.dim() == 1:  # v of b: ΔW_b is linear in v, so -0.5·v gives -0.5·ΔW_b
                p.mul_(-0.5)
    handle.set_active(["a", "b"])
    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "out").eval()
    assert torch.allclose(logits(peft_model), logits(both), **TOL)
