"""Delta-LoRA (Zi et al. 2023): W moves by λ·s·(B′A′ − BA) after each step past start_step; the
change comes out on disable/remove, is saved, reloaded, merged into a base and exported to PEFT LoRA."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import adaptkit as ak
from adaptkit.errors import AdaptkitError
from adaptkit.merge.engine import run_merge
from adaptkit.files.convert import convert
from builders import tiny_gpt2, tiny_llama

IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
TOL = dict(atol=1e-5, rtol=1e-5)
R, ALPHA, LAM, START = 4, 8, 2.0, 2
S = ALPHA / R
MODELS = {"llama": (tiny_llama, ["q_proj", "v_proj"]), "gpt2": (tiny_gpt2, ["c_attn", "c_proj"])}


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def train(kind="llama", steps=4, lr=1e-2, **config):
    """A fresh tiny model with a Delta-LoRA trained `steps` steps on IDS (loss: next-token prediction)."""
    build, targets = MODELS[kind]
    model = build()
    handle = ak.inject(model, "delta_lora", r=R, lora_alpha=ALPHA, target_modules=targets,
                       start_step=START, update_ratio=LAM, **config)
    opt = torch.optim.AdamW(handle.param_groups(lr))
    losses = []
    for step in range(1, steps + 1):
        loss = model(IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        handle.step_end(step)
        losses.append(loss.item())
    return model, handle, build, losses


def test_w_moves_by_the_product_change_only_past_start_step():
    model = tiny_llama()
    original = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    handle = ak.inject(model, "delta_lora", r=R, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"],
                       start_step=START, update_ratio=LAM, init_lora_weights=False)
    layer = model.model.layers[0].self_attn.q_proj
    p = layer.branches["default"].params
    opt = torch.optim.AdamW(handle.param_groups(1e-2))
    for step in range(1, 6):
        w, a, b = layer.base_layer.weight.detach().clone(), p["lora_A"].detach().clone(), p["lora_B"].detach().clone()
        model(IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()
        handle.step_end(step)
        new_w = layer.base_layer.weight.detach()
        if step <= START:
            assert torch.equal(new_w, w), f"W moved at step {step} ≤ start_step"
            a_k, b_k = p["lora_A"].detach().clone(), p["lora_B"].detach().clone()  # factors at step K
        else:  # W ← W + λ·s·(B′A′ − BA)
            expected = w + LAM * S * (p["lora_B"] @ p["lora_A"] - b @ a)
            assert not torch.equal(new_w, w)
            torch.testing.assert_close(new_w, expected.detach(), atol=1e-6, rtol=1e-6)
        assert not layer.base_layer.weight.requires_grad
    # Telescoping: W_T − W_0 = λ·s·(B_T·A_T − B_K·A_K), which is also the resident change the core takes out.
    total = LAM * S * (p["lora_B"] @ p["lora_A"] - b_k @ a_k)
    torch.testing.assert_close(layer.base_layer.weight.detach() - original, total.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(layer.resident("default"), total.detach(), atol=1e-6, rtol=1e-5)


def test_loss_goes_down_disable_gives_the_base_enable_restores_remove_restores_weights():
    model, handle, build, losses = train(steps=12, lr=5e-2)
    assert losses[-1] < losses[0] - 0.2 and losses[-1] < losses[START]
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B"}
    base = build()
    trained, expected_base = logits(model), logits(base)
    assert not torch.allclose(trained, expected_base, **TOL)
    with handle.disabled():
        torch.testing.assert_close(logits(model), expected_base, **TOL)
    torch.testing.assert_close(logits(model), trained, **TOL)
    handle.merge()  # merge/unmerge move only s·B·A; W keeps its own change
    torch.testing.assert_close(logits(model), trained, **TOL)
    handle.unmerge()
    handle.remove()
    reference = base.state_dict()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, reference[name], atol=1e-6, rtol=1e-6, msg=name)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_save_load_merge_and_export_give_the_trained_model(kind, tmp_path):
    model, handle, build, _ = train(kind)
    trained = logits(model)
    handle.save(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["adaptkit_variant"] == "delta_lora" and config["peft_type"] == "DELTA_LORA"
    assert (config["start_step"], config["update_ratio"], config["fan_in_fan_out"]) == (START, LAM, kind == "gpt2")
    keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    module = next(k for k in keys if k.endswith("lora_A.weight")).removesuffix(".lora_A.weight")
    assert {k.removeprefix(module + ".") for k in keys if k.startswith(module + ".")} == \
        {"lora_A.weight", "lora_B.weight", "delta_A", "delta_B"}
    assert keys[module + ".delta_A"].shape[0] == 2 * R

    # load onto a fresh copy of the original base: the saved change of W goes back into W
    fresh = build()
    ak.load_adapter(fresh, tmp_path / "adapter")
    torch.testing.assert_close(logits(fresh), trained, **TOL)
    ak.load_adapter(fresh, tmp_path / "adapter", swap=True)  # hot-swap: the old R leaves W, the new one enters
    torch.testing.assert_close(logits(fresh), trained, **TOL)
    ak.Adapters.of(fresh).remove()
    torch.testing.assert_close(logits(fresh), logits(build()), **TOL)

    # mode 2: base + adapter -> model
    build().save_pretrained(tmp_path / "base")
    run_merge({"merge_method": "task_arithmetic", "base_model": str(tmp_path / "base"),
               "models": [{"model": str(tmp_path / "adapter"), "parameters": {"weight": 1.0}}]},
              tmp_path / "merged", progress=False)
    merged = type(model).from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(merged), trained, **TOL)

    # export to a plain PEFT LoRA of rank 2r
    from peft import PeftModel

    convert(tmp_path / "adapter", "peft", tmp_path / "lora")
    exported = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert exported["peft_type"] == "LORA" and exported["r"] == 2 * R and "adaptkit_variant" not in exported
    peft_model = PeftModel.from_pretrained(build(), tmp_path / "lora").eval()
    torch.testing.assert_close(logits(peft_model), trained, **TOL)
    if kind == "llama":  # the same LoRA through adapter merging (mode 3, exact concat)
        from click.testing import CliRunner

        from adaptkit.cli import cli

        result = CliRunner().invoke(cli, ["--quiet", "merge", "--method", "concat", "-m", str(tmp_path / "adapter"),
                                          "--rank", str(2 * R), "-o", str(tmp_path / "concat")])
        assert result.exit_code == 0, result.output
        from adaptkit import registry
        from adaptkit.adapter import read_adapter

        ours, concat = (read_adapter(tmp_path / d) for d in ("lora", "concat"))
        assert ours.modules.keys() == concat.modules.keys()
        lora = registry.get("variant", "lora")
        for module in ours.modules:  # the same ΔW (concat folds the scale into B, convert keeps alpha)
            torch.testing.assert_close(lora.delta(concat, module), lora.delta(ours, module), msg=module)


def test_before_start_step_nothing_moves_and_the_export_is_rank_r(tmp_path):
    model, handle, build, _ = train(steps=START)
    base = build()
    for path in handle.adapters["default"].layers:
        assert torch.equal(model.get_submodule(path).base_layer.weight, base.get_submodule(path).weight), path
    handle.save(tmp_path / "adapter")
    convert(tmp_path / "adapter", "peft", tmp_path / "lora")
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["r"] == R


def test_saving_between_optimizer_step_and_step_end_is_exact(tmp_path):
    """W holds the change up to the last step_end, the branch the newest factors: both are saved."""
    from peft import PeftModel

    model, handle, build, _ = train(steps=START + 1)
    opt = torch.optim.AdamW(handle.param_groups(1e-2))
    model(IDS, labels=IDS).loss.backward()
    opt.step()  # no step_end yet
    trained = logits(model)
    handle.save(tmp_path / "adapter")
    fresh = build()
    ak.load_adapter(fresh, tmp_path / "adapter")
    torch.testing.assert_close(logits(fresh), trained, **TOL)
    convert(tmp_path / "adapter", "peft", tmp_path / "lora")
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["r"] == 3 * R
    torch.testing.assert_close(logits(PeftModel.from_pretrained(build(), tmp_path / "lora")), trained, **TOL)


def test_dropout_and_bad_settings_are_refused():
    with pytest.raises(AdaptkitError, match="lora_dropout must be 0.*removes the dropout"):
        ak.inject(tiny_llama(), "delta_lora", r=4, lora_dropout=0.1, target_modules=["q_proj"])
    with pytest.raises(AdaptkitError, match="start_step"):
        ak.inject(tiny_llama(), "delta_lora", r=4, start_step=-1, target_modules=["q_proj"])
    with pytest.raises(AdaptkitError, match="linear layers only"):
        ak.inject(tiny_llama(), "delta_lora", r=4, target_modules=["embed_tokens"])
