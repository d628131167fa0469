"""The module plane: inject, switch, merge, save and load adapters on live models — against PEFT."""
from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

import adaptkit as ak
from adaptkit.errors import AdaptkitError
from builders import tiny_gpt2, tiny_llama

IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
TOL = dict(atol=1e-5, rtol=1e-5)


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def peft_model(base, **config):
    config.setdefault("init_lora_weights", False)
    return get_peft_model(copy.deepcopy(base), LoraConfig(**config)).eval()


def nudge_saved(pm):
    """PEFT copies modules_to_save unchanged; move them so the test sees they are loaded."""
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.05)


# ---- PEFT writes, we load; we write, PEFT loads ------------------------------------------------

LLAMA_CASES = {
    "lora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "rslora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"], use_rslora=True),
    "dora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], use_dora=True),
    "dora+embedding": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], use_dora=True),
    "patterns": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"],
                     rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 3}),
    "embedding+saved": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], modules_to_save=["lm_head"]),
    "dropout": dict(r=4, lora_alpha=16, target_modules=["q_proj"], lora_dropout=0.1),
}


@pytest.mark.parametrize("case", sorted(LLAMA_CASES))
def test_peft_adapters_load_with_equal_outputs_and_save_back(case, tmp_path):
    base = tiny_llama()
    pm = peft_model(base, **LLAMA_CASES[case])
    nudge_saved(pm)
    pm.save_pretrained(tmp_path / "peft")
    expected = logits(pm)

    model = copy.deepcopy(base)
    handle = ak.load_adapter(model, tmp_path / "peft")
    torch.testing.assert_close(logits(model), expected, **TOL)

    handle.save(tmp_path / "ours")
    again = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(again), expected, **TOL)


def test_gpt2_conv1d_fan_in_fan_out_both_ways(tmp_path):
    base = tiny_gpt2()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft_model(base, r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    pm.save_pretrained(tmp_path / "peft")
    model = copy.deepcopy(base)
    handle = ak.load_adapter(model, tmp_path / "peft")
    torch.testing.assert_close(logits(model), logits(pm), **TOL)
    fresh = copy.deepcopy(base)
    mine = ak.inject(fresh, "lora", r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False)
    mine.save(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(theirs), logits(fresh), **TOL)
    handle.merge()
    torch.testing.assert_close(logits(model), logits(pm), **TOL)


@pytest.mark.parametrize("variant,extra", [("lora", {}), ("lora", {"use_rslora": True}), ("lora", {"use_dora": True}),
                                           ("lora_fa", {}), ("lora_plus", {})])
def test_peft_loads_what_we_save(variant, extra, tmp_path):
    base = tiny_llama()
    model = copy.deepcopy(base)
    handle = ak.inject(model, variant, r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, **extra)
    handle.save(tmp_path / "a")
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a").eval()
    torch.testing.assert_close(logits(theirs), logits(model), **TOL)
    again = ak.load_adapter(copy.deepcopy(base), tmp_path / "a")
    assert again.adapters["default"].variant.name == variant


def test_partial_fine_tuning_last_layers_round_trips_through_peft(tmp_path):
    base = tiny_llama(num_hidden_layers=3)
    model = copy.deepcopy(base)
    handle = ak.inject(model, "partial", last_layers=1)
    trainable, _ = handle.trainable_parameters()
    assert trainable == sum(p.numel() for p in base.model.layers[2].parameters())
    opt = torch.optim.AdamW(handle.param_groups(1e-2))
    for _ in range(2):
        model.train()
        model(IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    assert not torch.allclose(logits(model), logits(base))
    handle.save(tmp_path / "p")
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "p").eval()
    torch.testing.assert_close(logits(theirs), logits(model), **TOL)
    ours = copy.deepcopy(base)
    ak.load_adapter(ours, tmp_path / "p")
    torch.testing.assert_close(logits(ours), logits(model), **TOL)
    with handle.disabled():
        torch.testing.assert_close(logits(model), logits(base), **TOL)


def test_partial_merges_into_the_base_on_disk(tmp_path):
    from adaptkit.merge.engine import run_merge as run

    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    model = copy.deepcopy(base)
    handle = ak.inject(model, "partial", modules=["model.norm", "lm_head"])
    with torch.no_grad():
        for _, p in handle.parameters():
            p.mul_(1.5)
    handle.save(tmp_path / "p")
    run({"base_model": str(tmp_path / "base"), "models": [{"model": str(tmp_path / "p"), "parameters": {"weight": 1.0}}],
         "merge_method": "task_arithmetic"}, out=tmp_path / "merged", progress=False)
    from transformers import LlamaForCausalLM

    merged = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(merged), logits(model), **TOL)


# ---- the core: merge/unmerge, switching, counting, formulas --------------------------------------


def test_lora_formula_on_a_plain_module():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    x = torch.randn(3, 6)
    w0, b0 = net[0].weight.detach().clone(), net[0].bias.detach().clone()
    handle = ak.inject(net, "lora", r=2, lora_alpha=3, target_modules=["0"], init_lora_weights=False)
    branch = net[0].branches["default"].params
    a, b = branch["lora_A"].detach(), branch["lora_B"].detach()
    hidden = x @ w0.T + b0 + (3 / 2) * x @ a.T @ b.T
    expected = torch.relu(hidden) @ net[2].weight.T + net[2].bias
    torch.testing.assert_close(net(x), expected)
    assert handle.trainable_parameters() == (2 * 6 + 5 * 2, 2 * 6 + 5 * 2 + 6 * 5 + 5 + 5 * 4 + 4)


def test_dora_formula_on_a_plain_module():
    torch.manual_seed(2)
    lin = nn.Linear(6, 5)
    net = nn.Sequential(lin)
    x = torch.randn(3, 6)
    w0 = lin.weight.detach().clone()
    ak.inject(net, "lora", r=2, lora_alpha=4, target_modules=["0"], init_lora_weights=False, use_dora=True)
    p = net[0].branches["default"].params
    with torch.no_grad():
        p["lora_magnitude_vector"].mul_(1.3)
    a, b, m = p["lora_A"].detach(), p["lora_B"].detach(), p["lora_magnitude_vector"].detach()
    w = w0 + 2 * b @ a
    expected = x @ (m[:, None] * w / w.norm(dim=1, keepdim=True)).T + lin.bias
    torch.testing.assert_close(net(x), expected.detach())


@pytest.mark.parametrize("extra", [{}, {"use_dora": True}, {"use_rslora": True}, {"init_lora_weights": "pissa"}])
def test_merge_unmerge_and_module_delta_equals_tensor_delta(extra, tmp_path):
    from adaptkit.adapter import read_adapter

    base = tiny_llama()
    model = copy.deepcopy(base)
    init = {} if "init_lora_weights" in extra else {"init_lora_weights": False}
    handle = ak.inject(model, "lora", r=4, lora_alpha=8, target_modules=["q_proj", "gate_proj"], **init, **extra)
    if "init_lora_weights" in extra:  # PiSSA starts equal to the base; move it
        with torch.no_grad():
            for _, p in handle.parameters():
                if p.requires_grad:
                    p.add_(0.01 * torch.randn_like(p))
    expected = logits(model)
    w_before = model.model.layers[0].self_attn.q_proj.base_layer.weight.detach().clone()
    handle.merge()
    torch.testing.assert_close(logits(model), expected, **TOL)
    handle.unmerge()
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.base_layer.weight, w_before, atol=1e-6, rtol=0)
    # The tensor plane's ΔW of the saved adapter equals the module plane's, against the original base.
    handle.save(tmp_path / "a")
    files = read_adapter(tmp_path / "a")
    original = base.model.layers[1].mlp.gate_proj.weight.detach()
    live = model.model.layers[1].mlp.gate_proj
    merged_change = live.math_weight().detach() + live.delta("default") - original
    tensor_delta = files_delta(files, "model.layers.1.mlp.gate_proj", original)
    torch.testing.assert_close(tensor_delta, merged_change, atol=1e-5, rtol=1e-5)
    handle.remove()
    torch.testing.assert_close(logits(model), logits(base), **TOL)


def files_delta(files, module, base_weight):
    from adaptkit import registry

    return registry.get("variant", files.variant).delta(files, module, base_weight)


def test_several_adapters_switch_by_name_and_hot_swap(tmp_path):
    base = tiny_llama()
    outs = {}
    for seed in (1, 2):
        torch.manual_seed(seed)
        pm = peft_model(base, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
        pm.save_pretrained(tmp_path / f"a{seed}")
        outs[seed] = logits(pm)
    model = copy.deepcopy(base)
    handle = ak.load_adapter(model, tmp_path / "a1", name="one")
    handle.load(tmp_path / "a2", name="two")
    assert handle.active == ["two"]
    torch.testing.assert_close(logits(model), outs[2], **TOL)
    handle.set_active("one")
    torch.testing.assert_close(logits(model), outs[1], **TOL)
    with handle.disabled():
        torch.testing.assert_close(logits(model), logits(base), **TOL)
    handle.load(tmp_path / "a2", name="one", swap=True)  # same slot, new weights, no re-injection
    torch.testing.assert_close(logits(model), outs[2], **TOL)
    with pytest.raises(AdaptkitError, match="already loaded"):
        handle.load(tmp_path / "a1", name="two")
    handle.remove("one")
    assert handle.names == ["two"]


def test_only_adapter_parameters_train_and_loss_goes_down():
    model = tiny_llama()
    handle = ak.inject(model, "lora", r=4, lora_alpha=8, target_modules="all-linear")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".branches." in n for n in names)
    assert "lm_head" not in " ".join(names)  # all-linear leaves the output head alone, as PEFT does
    opt = torch.optim.AdamW(handle.param_groups(5e-3))
    model.train()
    losses = []
    for _ in range(25):
        loss = model(IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1


def test_lora_plus_puts_b_in_a_faster_group():
    model = tiny_llama()
    handle = ak.inject(model, "lora_plus", r=4, target_modules=["q_proj"], loraplus_lr_ratio=8)
    slow, fast = handle.param_groups(1e-3)
    assert fast["lr"] == pytest.approx(8e-3) and slow["lr"] == pytest.approx(1e-3)
    assert {p.shape[1] for p in fast["params"]} == {4} and {p.shape[0] for p in slow["params"]} == {4}


def test_lora_fa_keeps_a_frozen_and_saves_only_the_rank_activation():
    torch.manual_seed(0)

    def saved_bytes(variant):
        net = nn.Sequential(nn.Linear(256, 256), nn.Linear(256, 256))
        handle = ak.inject(net, variant, r=4, target_modules=["0", "1"], init_lora_weights=False)
        a_before = net[0].branches["default"].params["lora_A"].detach().clone()
        x = torch.randn(64, 256)
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size() if t.dim() > 1 and t.shape[0] == 64 else 0
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = net(x).square().mean()
        loss.backward()
        torch.optim.SGD(handle.param_groups(0.1)).step()
        return total, torch.equal(a_before, net[0].branches["default"].params["lora_A"].detach())

    lora_bytes, lora_a_same = saved_bytes("lora")
    fa_bytes, fa_a_same = saved_bytes("lora_fa")
    assert fa_a_same and not lora_a_same
    assert fa_bytes < lora_bytes  # x (256 per token) is not kept for A's gradient; B's needs only A·x (4)


def test_gaussian_and_pissa_inits():
    model = tiny_llama()
    w = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    ak.inject(model, "lora", r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights="pissa")
    layer = model.model.layers[0].self_attn.q_proj
    p = layer.branches["default"].params
    # PiSSA: starts equal to the base, with A, B from the top singular vectors of W / s.
    torch.testing.assert_close(layer.base_layer.weight + 2 * p["lora_B"] @ p["lora_A"], w, atol=1e-5, rtol=0)
    s = torch.linalg.svdvals(w)
    torch.testing.assert_close(torch.linalg.svdvals(2 * p["lora_B"] @ p["lora_A"]).detach()[:4], s[:4], atol=1e-4, rtol=1e-4)
    g = tiny_llama()
    ak.inject(g, "lora", r=4, target_modules=["q_proj"], init_lora_weights="gaussian")
    gp = g.model.layers[0].self_attn.q_proj.branches["default"].params
    assert torch.count_nonzero(gp["lora_B"]) == 0 and abs(gp["lora_A"].std().item() - 0.25) < 0.05


def test_target_forms_regex_exclude_and_layers():
    model = tiny_llama(num_hidden_layers=3)
    handle = ak.inject(model, "lora", r=2, target_modules=r".*\.(q|v)_proj", exclude_modules=["layers.0.self_attn.v_proj"],
                       layers_to_transform=[0, 2])
    assert handle.adapters["default"].layers == [
        "model.layers.0.self_attn.q_proj", "model.layers.2.self_attn.q_proj", "model.layers.2.self_attn.v_proj"]


# ---- bad input ------------------------------------------------------------------------------------


def test_targets_matching_nothing_list_module_names():
    with pytest.raises(AdaptkitError, match=r"match no layer; layers here include: .*q_proj"):
        ak.inject(tiny_llama(), "lora", target_modules=["qproj"])


def test_pissa_rank_too_large_for_the_layer():  # plain LoRA takes any rank, as PEFT (tests/test_peft_config_keys.py)
    with pytest.raises(AdaptkitError, match=r"PiSSA rank 40 does not fit a 32 × 32 layer"):
        ak.inject(tiny_llama(), "lora", r=40, init_lora_weights="pissa", target_modules=["q_proj"])


def test_unknown_parameter_suggests_the_nearest():
    with pytest.raises(AdaptkitError, match="did you mean 'lora_alpha'"):
        ak.inject(tiny_llama(), "lora", lora_alhpa=8, target_modules=["q_proj"])


def test_adapter_for_other_shapes_names_module_and_shapes(tmp_path):
    ak.inject(tiny_llama(), "lora", r=4, target_modules=["q_proj"]).save(tmp_path / "a")
    other = tiny_llama(hidden_size=48, num_attention_heads=4)
    with pytest.raises(AdaptkitError, match=r"model\.layers\.0\.self_attn\.q_proj\.lora_A: the adapter has shape "
                                            r"\(4, 32\) but this model needs \(4, 48\)"):
        ak.load_adapter(other, tmp_path / "a")


def test_newer_peft_config_keys_load_with_a_warning_when_unset_and_are_refused_when_set(tmp_path):
    """A newer PEFT's key left at null turns nothing on: a warning, PEFT's outputs. Set, it may change
    the math: load refuses in one line naming it, and the model is left as it was."""
    base = tiny_llama()
    pm = peft_model(base, r=4, target_modules=["q_proj"])
    pm.save_pretrained(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, "lora_future_option": None}))
    model = copy.deepcopy(base)
    with pytest.warns(UserWarning, match="lora_future_option"):
        ak.load_adapter(model, tmp_path / "a")
    torch.testing.assert_close(logits(model), logits(pm), **TOL)
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, "lora_future_option": 3}))
    model = copy.deepcopy(base)
    with pytest.raises(AdaptkitError, match="unknown config key lora_future_option=3"):
        ak.load_adapter(model, tmp_path / "a")
    torch.testing.assert_close(logits(model), logits(base), **TOL)


def test_missing_adapter_file_and_folder(tmp_path):
    ak.inject(tiny_llama(), "lora", target_modules=["q_proj"]).save(tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdaptkitError, match="truncated"):
        ak.load_adapter(tiny_llama(), tmp_path / "a")
    weights.unlink()
    with pytest.raises(AdaptkitError, match="no weights found"):
        ak.load_adapter(tiny_llama(), tmp_path / "a")
    with pytest.raises(AdaptkitError, match="no such adapter folder"):
        ak.load_adapter(tiny_llama(), tmp_path / "nowhere")


def test_same_name_twice_and_existing_output(tmp_path):
    model = tiny_llama()
    handle = ak.inject(model, "lora", target_modules=["q_proj"])
    with pytest.raises(AdaptkitError, match="already on this model"):
        ak.inject(model, "lora", target_modules=["v_proj"])
    handle.save(tmp_path / "a")
    with pytest.raises(AdaptkitError, match="already exists"):
        handle.save(tmp_path / "a")
    handle.save(tmp_path / "a", force=True)


def test_disable_while_merged_is_refused():
    model = tiny_llama()
    handle = ak.inject(model, "lora", target_modules=["q_proj"], init_lora_weights=False)
    handle.merge()
    with pytest.raises(AdaptkitError, match="unmerge"):
        handle.disable()
    assert math.isfinite(logits(model).sum().item())


def test_load_adapter_from_a_hub_reference(tmp_path, offline_hub):
    """`org/name` goes through huggingface_hub (offline here: a cached snapshot is used)."""
    base = tiny_llama()
    pm = peft_model(base, r=4, target_modules=["q_proj"])
    pm.save_pretrained(tmp_path / "saved")
    offline_hub(tmp_path / "saved", "org/tiny-lora", "b" * 40)
    model = copy.deepcopy(base)
    ak.load_adapter(model, "org/tiny-lora")
    torch.testing.assert_close(logits(model), logits(pm), **TOL)
    with pytest.raises(AdaptkitError, match="the Hub cannot be reached"):
        ak.load_adapter(copy.deepcopy(base), "org/missing@v1", name="x")


def peft_lora_bias(base, tmp_path):
    """A PEFT LoRA with `lora_bias` (a bias on B), its biases moved off zero, saved."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft_model(base, r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], lora_bias=True)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name and name.endswith("bias"):
                p.normal_(0, 0.5)
    pm.save_pretrained(tmp_path / "peft")
    return pm


def test_lora_bias_both_ways_and_merged(tmp_path):
    """PEFT's lora_bias: y += s·(B·A·x + β). Loaded and saved both ways with equal outputs; merged,
    the layer's bias takes s·β (live and on disk), as PEFT's merge_and_unload."""
    from adaptkit.merge.engine import run_merge

    base = tiny_gpt2()
    pm = peft_lora_bias(base, tmp_path)
    expected = logits(pm)
    model = copy.deepcopy(base)
    handle = ak.load_adapter(model, tmp_path / "peft")
    torch.testing.assert_close(logits(model), expected, **TOL)
    handle.save(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["lora_bias"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(theirs), expected, **TOL)

    handle.merge()
    torch.testing.assert_close(logits(model), expected, **TOL)
    merged = pm.merge_and_unload().state_dict()
    for name, tensor in model.state_dict().items():
        if name.endswith("c_attn.base_layer.bias"):
            torch.testing.assert_close(tensor, merged[name.replace(".base_layer", "")], **TOL)
    base.save_pretrained(tmp_path / "base")
    run_merge({"merge_method": "task_arithmetic", "base_model": str(tmp_path / "base"),
               "models": [{"model": str(tmp_path / "peft"), "parameters": {"weight": 1.0}}]}, tmp_path / "out",
              progress=False)
    from safetensors.torch import load_file

    on_disk = load_file(tmp_path / "out" / "model.safetensors")
    for name in ("transformer.h.0.attn.c_attn.bias", "transformer.h.1.mlp.c_fc.bias", "transformer.h.0.attn.c_attn.weight"):
        torch.testing.assert_close(on_disk[name], merged[name], **TOL)
    # converted to a plain LoRA (factors as stored; the new bias whole in the base layer), then to
    # kohya, which holds factors only: refused in one line
    from adaptkit.files.convert import convert

    convert(tmp_path / "peft", "peft", tmp_path / "plain", base=tmp_path / "base")
    assert json.loads((tmp_path / "plain" / "adapter_config.json").read_text()).get("lora_bias") is not True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "plain").eval()
    torch.testing.assert_close(logits(plain), expected, **TOL)
    with pytest.raises(AdaptkitError, match="not whole tensors"):
        convert(tmp_path / "peft", "kohya", tmp_path / "k", base=tmp_path / "base")


def test_lora_bias_trains_and_refuses_what_cannot_hold_it(tmp_path):
    from adaptkit.files.convert import convert
    from adaptkit.merge.engine import run_merge

    model = tiny_llama()  # no biases in its linear layers
    handle = ak.inject(model, "lora", r=2, target_modules=["q_proj"], lora_bias=True)
    beta = [p for n, p in handle.parameters() if n.endswith("lora_B_bias")]
    assert len(beta) == 2 and all(p.requires_grad and not p.any() for p in beta)
    model(IDS, labels=IDS).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in beta)
    with torch.no_grad():
        beta[0].add_(1.0)
    before = logits(model)
    with pytest.raises(AdaptkitError, match="changes the bias, but this layer has none"):
        handle.merge()
    torch.testing.assert_close(logits(model), before, **TOL)  # nothing half-merged
    handle.save(tmp_path / "a")
    tiny_llama().save_pretrained(tmp_path / "base")
    with pytest.raises(AdaptkitError, match="changes the bias of 'model.layers.0.self_attn.q_proj', which has none"):
        run_merge({"merge_method": "task_arithmetic", "base_model": str(tmp_path / "base"),
                   "models": [{"model": str(tmp_path / "a"), "parameters": {"weight": 1.0}}]}, tmp_path / "m",
                  progress=False)
    for rank in (None, 2):
        with pytest.raises(AdaptkitError, match="changes the layer's bias too; give --base"):
            convert(tmp_path / "a", "peft", tmp_path / "k", rank=rank)
    with pytest.raises(AdaptkitError, match="changes the layer's bias too; the base has no bias there"):
        convert(tmp_path / "a", "peft", tmp_path / "k", base=tmp_path / "base")
    with pytest.raises(AdaptkitError, match="lora_bias"):
        run_merge({"merge_method": "concat", "models": [{"model": str(tmp_path / "a"), "parameters": {"weight": 1.0}}] * 2},
                  tmp_path / "c", progress=False)
    with pytest.raises(AdaptkitError, match="lora_bias works on linear layers without DoRA"):
        ak.inject(tiny_llama(), "lora", r=2, target_modules=["q_proj"], lora_bias=True, use_dora=True)
