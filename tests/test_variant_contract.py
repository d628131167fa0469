"""Every registered variant with a module plane passes the same checks on a tiny Llama.

Save → load gives identical outputs; merged forward equals unmerged; disabled equals the base;
remove restores the base; only adapter tensors train; the tensor plane's ΔW of the saved files
equals the module plane's merged change. A new variant needs an entry in CONFIGS (a test checks).
"""
from __future__ import annotations

import copy

import pytest
import torch

import adaptkit as ak
from adaptkit import registry
from adaptkit.adapter import read_adapter
from adaptkit.live.layer import AdaptedLayer, ReplacedModule
from builders import tiny_llama

CONFIGS = {
    "adalora": dict(init_r=4, target_r=2, lora_alpha=8, target_modules=["q_proj", "v_proj"], total_step=3, tfinal=1),
    "lora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "lora_fa": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "lora_plus": dict(r=4, lora_alpha=8, target_modules=["k_proj", "up_proj"]),
    "delta_lora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"], start_step=1),
    "ia3": dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "loha": dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_weights=False),
    "lokr": dict(r=2, alpha=4, decompose_both=True, target_modules=["q_proj", "up_proj"], init_weights=False),
    "oft": dict(oft_block_size=8, coft=True, eps=0.5, target_modules=["q_proj", "v_proj", "down_proj"]),
    "boft": dict(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["q_proj", "o_proj", "up_proj"]),
    "tied_lora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "gate_proj"]),
    "trainable_tokens": dict(token_indices=list(range(0, 128, 2))),
    "partial": dict(last_layers=1),
    "vera": dict(r=4, target_modules=["q_proj", "v_proj"]),
}
IDS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
TOL = dict(atol=1e-5, rtol=1e-5)


def module_variants() -> list[str]:
    return [n for n in registry.names("variant") if hasattr(registry.get("variant", n), "defaults")]


def out(model):
    with torch.no_grad():
        return model(IDS).logits


def trained(name):
    """A base and a copy carrying the variant after two optimizer steps (non-trivial adapter)."""
    base = tiny_llama()
    model = copy.deepcopy(base)
    handle = ak.inject(model, name, **CONFIGS[name])
    opt = torch.optim.AdamW(handle.param_groups(5e-2))
    model.train()
    for step in (1, 2, 3):
        model(IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()
        handle.step_end(step)
    model.eval()
    return base, model, handle


def activation_space(name: str) -> bool:
    """Variants that edit activations, not weights (no ΔW to merge: no `weight_delta`, and the tensor
    plane refuses them in `check_mergeable`). They cannot pass the merge checks here; each has its own
    test file with the same non-merge checks (LoReFT: tests/test_loreft.py)."""
    variant = registry.get("variant", name)
    return not hasattr(variant, "weight_delta") and hasattr(variant, "check_mergeable")


def test_every_module_variant_has_a_contract_config():
    missing = {n for n in module_variants() if not activation_space(n)} - set(CONFIGS)
    assert not missing, f"add the new variant(s) {sorted(missing)} to CONFIGS"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_variant_contract(name, tmp_path):
    base, model, handle = trained(name)
    expected = out(model)
    assert not torch.allclose(expected, out(base), atol=1e-4)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".branches." in n or ".copies." in n for n in trainable)

    with handle.disabled():
        torch.testing.assert_close(out(model), out(base), **TOL)
    torch.testing.assert_close(out(model), expected, **TOL)

    handle.save(tmp_path / "a")
    fresh = copy.deepcopy(base)
    ak.load_adapter(fresh, tmp_path / "a")
    torch.testing.assert_close(out(fresh), expected, **TOL)

    files = read_adapter(tmp_path / "a")
    variant = registry.get("variant", files.variant)
    originals = dict(base.named_parameters())
    handle.merge()
    torch.testing.assert_close(out(model), expected, **TOL)
    for module in files.modules:  # tensor plane == module plane, against the original base weight
        live = model.get_submodule(module)
        original = originals[f"{module}.weight"].detach()
        change = live.math_weight().detach() - (original.T if live.target.transposed else original)
        delta = variant.delta(files, module, original)
        torch.testing.assert_close(delta, change.T if live.target.transposed else change, atol=1e-5, rtol=1e-4)
    handle.unmerge()
    torch.testing.assert_close(out(model), expected, **TOL)

    handle.remove()
    torch.testing.assert_close(out(model), out(base), **TOL)
    assert not any(isinstance(m, (AdaptedLayer, ReplacedModule)) for m in model.modules())
