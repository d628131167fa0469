"""AdaLoRA (Zhang et al. 2023) against PEFT: the forward formula, the cubic budget, the orthogonality
loss, the same masks as PEFT from the same start, files both ways (pruned ones too), export to LoRA."""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from peft import AdaLoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

import adaptkit as ak
from adaptkit import registry
from adaptkit.adapter import read_adapter
from adaptkit.errors import AdaptkitError
from adaptkit.files.convert import convert
from builders import tiny_gpt2, tiny_llama

TOL = dict(atol=1e-5, rtol=1e-5)
CONFIG = dict(init_r=6, target_r=2, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
              total_step=10, tinit=2, tfinal=3, deltaT=2)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest


def batch(step: int) -> torch.Tensor:
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(step))


IDS = batch(0)


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def peft_adalora(base, **config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # CAUSAL_LM: a PeftModelForCausalLM runs AdaLoraModel.forward, which adds the orthogonality loss
        # (a plain PeftModel, task_type None, calls the base model directly and skips it)
        return get_peft_model(copy.deepcopy(base), AdaLoraConfig(task_type="CAUSAL_LM", **config))


def layers_e(model, suffix=""):
    """{module path: E (r)} of a PEFT (suffix '.lora_E.default') or adaptkit model."""
    found = {}
    for name, p in model.named_parameters():
        if name.endswith("lora_E" + suffix):
            path = name.removeprefix("base_model.model.").split(".lora_E")[0].replace(".branches.default.params", "")
            found[path] = p.detach().view(-1).clone()
    return found


def train_ours(model, handle, steps, *, order="after_zero_grad", lr=1e-2, record=None):
    opt = torch.optim.AdamW(handle.param_groups(lr))
    model.train()
    losses = []
    for step in range(1, steps + 1):
        loss = model(batch(step), labels=batch(step)).loss + handle.extra_loss()
        loss.backward()
        opt.step()
        if order == "before_zero_grad":  # PEFT's documented order
            handle.step_end(step)
            opt.zero_grad()
        else:  # the order of a plain loop; the gradient hooks keep what the allocator needs
            opt.zero_grad(set_to_none=order == "after_zero_grad")
            handle.step_end(step)
        losses.append(loss.item())
        if record is not None:
            record.append(layers_e(model))
    model.eval()
    return losses


def trained(steps=CONFIG["total_step"], **overrides):
    base = tiny_llama()
    model = copy.deepcopy(base)
    handle = ak.inject(model, "adalora", **{**CONFIG, **overrides})
    train_ours(model, handle, steps)
    return base, model, handle


# ---- formulas ---------------------------------------------------------------------------------

def test_forward_and_delta_follow_the_formula():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    x = torch.randn(3, 6)
    w0, b0 = net[0].weight.detach().clone(), net[0].bias.detach().clone()
    handle = ak.inject(net, "adalora", init_r=3, target_r=1, lora_alpha=4, total_step=10, target_modules=["0"],
                       init_lora_weights=False)
    p = net[0].branches["default"].params
    a, e, b = p["lora_A"].detach(), p["lora_E"].detach(), p["lora_B"].detach()
    assert (a.shape, e.shape, b.shape) == ((3, 6), (3, 1), (5, 3)) and bool((e != 0).all())
    delta = b @ (a * e) * 4 / (3 + 1e-5)  # ΔW = B·(A ⊙ E)·alpha / (ranknum + 1e-5)
    expected = torch.relu(x @ (w0 + delta).T + b0) @ net[2].weight.T + net[2].bias
    torch.testing.assert_close(net(x), expected)
    torch.testing.assert_close(net[0].delta("default"), delta)
    assert handle.trainable_parameters()[0] == 3 * 6 + 3 + 5 * 3


def test_default_init_is_peft_s_and_starts_at_zero():
    base = tiny_llama()
    torch.manual_seed(3)
    pm = peft_adalora(base, **CONFIG)
    torch.manual_seed(3)
    model = copy.deepcopy(base)
    ak.inject(model, "adalora", **CONFIG)  # same order of random draws as PEFT
    ours, peft = dict(model.named_parameters()), dict(pm.named_parameters())
    for name, p in ours.items():
        if ".branches." in name:
            role = name.rsplit(".", 1)[-1]
            path = name.split(".branches.")[0]
            torch.testing.assert_close(p, peft[f"base_model.model.{path}.{role}.default"], atol=0, rtol=0)
    torch.testing.assert_close(logits(model), logits(base), atol=0, rtol=0)  # E = 0


def test_budget_follows_the_cubic_schedule_and_ends_in_the_rank_pattern():
    cfg = dict(CONFIG, total_step=14, tinit=2, tfinal=3, deltaT=2)
    model = tiny_llama()
    handle = ak.inject(model, "adalora", **cfg)
    n = len(handle.adapters["default"].layers)
    init_bgt, target_bgt, last = cfg["init_r"] * n, cfg["target_r"] * n, cfg["total_step"] - cfg["tfinal"]
    record = []
    train_ours(model, handle, cfg["total_step"], record=record)
    checked = 0
    for step, es in enumerate(record, 1):
        nonzero = sum(int((e != 0).sum()) for e in es.values())
        if step <= cfg["tinit"]:
            assert nonzero == init_bgt, step
        elif step < last and step % cfg["deltaT"] == 0:
            # b(t) = target + (init − target)·(1 − (t − tinit)/(T − tinit))³, T = total_step − tfinal, truncated
            budget = int((init_bgt - target_bgt) * (1 - (step - cfg["tinit"]) / (last - cfg["tinit"])) ** 3 + target_bgt)
            assert nonzero == budget, step
            checked += 1
        elif step >= last:
            assert nonzero == target_bgt, step
    assert checked == 4 and init_bgt > target_bgt
    pattern = handle.adapters["default"].config["rank_pattern"]
    assert set(pattern) == {f"{path}.lora_E" for path in record[-1]}
    for path, e in record[-1].items():
        assert pattern[f"{path}.lora_E"] == (e != 0).tolist()
    assert sum(map(sum, pattern.values())) == target_bgt


def test_orthogonality_loss_equals_the_formula_and_peft_s():
    base = tiny_llama()
    cfg = dict(CONFIG, init_lora_weights=False, orth_reg_weight=0.3)
    pm = peft_adalora(base, **cfg)
    model = copy.deepcopy(base)
    handle = ak.inject(model, "adalora", **cfg)
    copy_peft_tensors(pm, model)
    norms = []
    for path in handle.adapters["default"].layers:
        p = model.get_submodule(path).branches["default"].params
        a, b = p["lora_A"], p["lora_B"]
        norms.append(torch.linalg.matrix_norm(a @ a.T - torch.eye(a.shape[0])))  # ‖PᵀP − I‖_F
        norms.append(torch.linalg.matrix_norm(b.T @ b - torch.eye(b.shape[1])))  # ‖QQᵀ − I‖_F
    expected = 0.3 * torch.stack(norms).mean()
    torch.testing.assert_close(handle.extra_loss(), expected)
    plain = model(IDS, labels=IDS).loss
    torch.testing.assert_close(pm(IDS, labels=IDS).loss, plain + handle.extra_loss())  # PEFT adds it in forward


def test_loss_goes_down_and_only_adapter_tensors_train():
    model = tiny_llama()
    handle = ak.inject(model, "adalora", **{**CONFIG, "total_step": 16, "tfinal": 4})
    opt = torch.optim.AdamW(handle.param_groups(5e-2))
    losses = []
    for step in range(1, 17):  # one batch over and over: the loss must fall
        loss = model(IDS, labels=IDS).loss + handle.extra_loss()
        loss.backward()
        opt.step()
        opt.zero_grad()
        handle.step_end(step)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B", "lora_E"}


# ---- the same run as PEFT ---------------------------------------------------------------------

def copy_peft_tensors(pm, model):
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if ".lora_" in name and name.endswith(".default") and p.numel():
                path, role = name.removeprefix("base_model.model.").removesuffix(".default").rsplit(".", 1)
                model.get_submodule(path).branches["default"].params[role].copy_(p)


@pytest.mark.parametrize("order", ["before_zero_grad", "after_zero_grad", "after_zero_grad_keep"])
def test_same_run_as_peft_gives_the_same_masks_and_rank_pattern(order):
    base = tiny_llama()
    pm = peft_adalora(base, **CONFIG)
    model = copy.deepcopy(base)
    handle = ak.inject(model, "adalora", **CONFIG)
    copy_peft_tensors(pm, model)
    torch.testing.assert_close(logits(model), logits(pm), atol=0, rtol=0)

    theirs, ours = [], []
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    pm.train()
    for step in range(1, CONFIG["total_step"] + 1):
        pm(batch(step), labels=batch(step)).loss.backward()  # PEFT adds the orthogonality loss itself
        opt.step()
        pm.base_model.update_and_allocate(step)
        opt.zero_grad()
        theirs.append(layers_e(pm, ".default"))
    train_ours(model, handle, CONFIG["total_step"], order=order, record=ours)

    masked_steps = 0
    for step, (e_peft, e_ours) in enumerate(zip(theirs, ours), 1):
        assert e_peft.keys() == e_ours.keys()
        for path in e_peft:
            assert torch.equal(e_peft[path] == 0, e_ours[path] == 0), (step, path)
            torch.testing.assert_close(e_ours[path], e_peft[path], atol=1e-5, rtol=1e-4)
        masked_steps += any(bool((e == 0).any()) for e in e_ours.values())
    assert masked_steps >= 6
    peft_pattern = {k.replace(".default", ""): v for k, v in pm.peft_config["default"].rank_pattern.items()}
    assert handle.adapters["default"].config["rank_pattern"] == peft_pattern
    assert {sum(m) for m in peft_pattern.values()} != {CONFIG["target_r"]}  # the budget moved between layers
    torch.testing.assert_close(logits(model), logits(pm.eval()), **TOL)


def test_gradient_accumulation_gives_the_summed_gradient_whenever_step_end_runs():
    """Two half-batches per step: the hooks keep the accumulated gradient, as p.grad holds it for PEFT."""
    runs = []
    for order in ("before_zero_grad", "after_zero_grad"):
        model = tiny_llama()
        handle = ak.inject(model, "adalora", **CONFIG)
        opt = torch.optim.AdamW(handle.param_groups(1e-2))
        for step in range(1, CONFIG["total_step"] + 1):
            ids = batch(step)
            for half in (ids[:1], ids[1:]):
                ((model(half, labels=half).loss + handle.extra_loss()) / 2).backward()
            opt.step()
            if order == "before_zero_grad":
                handle.step_end(step)
            opt.zero_grad()
            if order == "after_zero_grad":
                handle.step_end(step)
        runs.append((layers_e(model), handle.adapters["default"].config["rank_pattern"]))
    (e1, p1), (e2, p2) = runs
    assert p1 == p2 and p1 is not None
    for path in e1:
        torch.testing.assert_close(e1[path], e2[path], atol=0, rtol=0)


# ---- files: both ways -------------------------------------------------------------------------

def test_peft_s_pruned_adapter_loads_and_saves_back_as_peft_writes_it(tmp_path):
    base = tiny_llama()
    pm = peft_adalora(base, **CONFIG)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    for step in range(1, CONFIG["total_step"] + 1):
        pm(batch(step), labels=batch(step)).loss.backward()
        opt.step()
        pm.base_model.update_and_allocate(step)
        opt.zero_grad()
    pm.eval().save_pretrained(tmp_path / "peft")
    expected = logits(pm)
    written = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    pattern = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["rank_pattern"]

    model = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every config key PEFT writes is known
        handle = ak.load_adapter(model, tmp_path / "peft")
    torch.testing.assert_close(logits(model), expected, **TOL)
    files = read_adapter(tmp_path / "peft")
    figures = registry.get("variant", "adalora").describe(files)
    for module, info in figures["modules"].items():
        assert info["rank"] == info["stored_rank"] == sum(pattern[f"{module}.lora_E"])
        peft_layer = pm.base_model.model.get_submodule(module)
        torch.testing.assert_close(registry.get("variant", "adalora").delta(files, module),
                                   peft_layer.get_delta_weight("default").detach(), atol=1e-6, rtol=1e-5)

    handle.save(tmp_path / "ours")
    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert ours.keys() == written.keys() and all(k.endswith(("lora_A", "lora_B", "lora_E")) for k in ours)
    for key in ours:
        torch.testing.assert_close(ours[key], written[key], atol=0, rtol=0)
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["rank_pattern"] == pattern
    torch.testing.assert_close(logits(PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")), expected, **TOL)

    with pytest.raises(AdaptkitError, match="loaded pruned"):  # no allocator on a pruned adapter
        handle.step_end(1)
    handle.step_end(CONFIG["total_step"])  # past total_step − tfinal: nothing to mask


@pytest.mark.parametrize("steps", [1, CONFIG["total_step"] - CONFIG["tfinal"] - 1, CONFIG["total_step"]])
def test_peft_loads_what_we_save_at_any_step(steps, tmp_path):
    base, model, handle = trained(steps=steps)
    expected = logits(model)
    handle.save(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    keys = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert config["peft_type"] == "ADALORA" and "adaptkit_variant" not in config
    assert {k: config[k] for k in ("init_r", "target_r", "tinit", "tfinal", "deltaT", "total_step")} == \
        {k: CONFIG[k] for k in ("init_r", "target_r", "tinit", "tfinal", "deltaT", "total_step")}
    assert all(k.startswith("base_model.model.") and k.endswith(("lora_A", "lora_B", "lora_E")) for k in keys)
    pattern = config["rank_pattern"]
    assert (pattern is None) == (steps <= CONFIG["tinit"])
    for key, tensor in keys.items():
        if key.endswith("lora_E"):
            kept = CONFIG["init_r"] if pattern is None else sum(pattern[key.removeprefix("base_model.model.")])
            assert tensor.shape == (kept, 1)
    torch.testing.assert_close(logits(PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a")), expected, **TOL)
    fresh = copy.deepcopy(base)
    ak.load_adapter(fresh, tmp_path / "a")
    torch.testing.assert_close(logits(fresh), expected, **TOL)


def test_gpt2_conv1d_fan_in_fan_out_round_trips_through_peft(tmp_path):
    base = tiny_gpt2()
    model = copy.deepcopy(base)
    cfg = dict(CONFIG, target_modules=["c_attn", "c_proj"])
    handle = ak.inject(model, "adalora", **cfg)
    train_ours(model, handle, cfg["total_step"])
    expected = logits(model)
    handle.save(tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a")
    torch.testing.assert_close(logits(pm), expected, **TOL)
    files = read_adapter(tmp_path / "a")
    for module in files.modules:
        delta = registry.get("variant", "adalora").delta(files, module)
        torch.testing.assert_close(delta, pm.base_model.model.get_submodule(module).get_delta_weight("default").detach(),
                                   atol=1e-6, rtol=1e-5)
    convert(tmp_path / "a", "peft", tmp_path / "lora")
    torch.testing.assert_close(logits(PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora")), expected, **TOL)


def test_export_to_lora_is_exact_at_the_kept_rank(tmp_path):
    base, model, handle = trained()
    expected = logits(model)
    handle.save(tmp_path / "a")
    pattern = handle.adapters["default"].config["rank_pattern"]
    convert(tmp_path / "a", "peft", tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and not {"init_r", "target_r", "total_step"} & set(config)
    keys = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    for key, mask in pattern.items():
        module = key.removesuffix(".lora_E")
        a = keys.get(f"base_model.model.{module}.lora_A.weight")
        assert (0 if a is None else a.shape[0]) == sum(mask), module  # rank-0 modules are left out
    lora = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora").eval()
    torch.testing.assert_close(logits(lora), expected, **TOL)


def test_bad_settings_are_refused():
    with pytest.raises(AdaptkitError, match="needs total_step"):
        ak.inject(tiny_llama(), "adalora", target_modules=["q_proj"])
    with pytest.raises(AdaptkitError, match="no budgeting"):
        ak.inject(tiny_llama(), "adalora", target_modules=["q_proj"], total_step=5, tinit=3, tfinal=2)
    with pytest.raises(AdaptkitError, match="Conv2d \(groups=1\) layers only .*leave this embedding layer out"):
        ak.inject(tiny_llama(), "adalora", target_modules=["embed_tokens"], total_step=5)
    with pytest.raises(AdaptkitError, match="init_r"):
        ak.inject(tiny_llama(), "adalora", target_modules=["q_proj"], total_step=5, r=4)
    with pytest.raises(AdaptkitError, match="beta1"):
        ak.inject(tiny_llama(), "adalora", target_modules=["q_proj"], total_step=5, beta1=1.0)
