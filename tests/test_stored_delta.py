"""ΔW from factors: a variant need not define `delta` when its ΔW is its low-rank product.

The core forms ΔW = s·B·A from `factors`, transposed where `factor_layout` says the base weight lies
in × out (`adaptkit.files.lowrank.module_delta`), so a third-party variant with only `factors` and
`factor_layout` merges into a base (`adaptkit merge --base ... -m adapter`). The registry refuses a
variant with no ΔW at all (no `delta`, no `factors`) unless it says it edits activations
(`check_mergeable`).
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from adaptkit import registry
from adaptkit.errors import PluginError
from hostile import run_cli

# A variant with the tensor plane only and no `delta`: ΔW comes from its factors.
FACTOR_ONLY = """
class FactorOnly:
    name = "factor_only"
    param_names = ("lora_A", "lora_B")
    config_keys = frozenset({"r", "lora_alpha", "fan_in_fan_out"})

    def describe(self, adapter):
        return {"rank": adapter.config["r"]}

    def factors(self, adapter, module):
        a, b = adapter.tensor(module, "lora_A").float(), adapter.tensor(module, "lora_B").float()
        return a, b, adapter.config["lora_alpha"] / adapter.config["r"]

    def factor_layout(self, adapter, module):
        return {"embedding": False, "transposed": bool(adapter.config.get("fan_in_fan_out"))}

VARIANT = FactorOnly()
"""

MODULE = "model.layers.0.self_attn.k_proj"  # 16 × 32 in the tiny Llama: a wrong transpose cannot fit


def write_adapter(folder, transposed: bool):
    """A factor_only adapter on k_proj with known A, B (rank 2, alpha 3): A r × in, B out × r as
    stored, or for a transposed layout A r × out, B in × r (the base weight is then (s·B·A)ᵀ)."""
    gen = torch.Generator().manual_seed(7)
    out_f, in_f = (32, 16) if transposed else (16, 32)
    a, b = torch.randn(2, in_f, generator=gen), torch.randn(out_f, 2, generator=gen)
    folder.mkdir()
    prefix = f"base_model.model.{MODULE}"
    save_file({f"{prefix}.lora_A.weight": a, f"{prefix}.lora_B.weight": b}, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "adaptkit_variant": "factor_only", "r": 2, "lora_alpha": 3,
              "fan_in_fan_out": transposed, "target_modules": ["k_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    update = 1.5 * (b @ a)  # s·B·A, s = alpha / r = 3 / 2
    return update.T if transposed else update


# (id, layout transposed)
LAYOUTS = [("out × in", False), ("transposed (fan_in_fan_out)", True)]


@pytest.mark.parametrize("case, transposed", LAYOUTS, ids=[c[0] for c in LAYOUTS])
def test_a_variant_with_factors_only_merges_into_a_base(case, transposed, llama_dir, tmp_path, fake_plugin_dist):
    fake_plugin_dist("fakeplug-factors", {"adaptkit.variant": {"factor_only": "fakeplug_factors:VARIANT"}},
                     {"fakeplug_factors": FACTOR_ONLY})
    assert not hasattr(registry.get("variant", "factor_only"), "delta")
    expected = write_adapter(tmp_path / "adapter", transposed)
    result = run_cli("-q", "merge", "--base", llama_dir, "-m", tmp_path / "adapter", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    base, merged = load_file(str(llama_dir / "model.safetensors")), load_file(str(tmp_path / "out" / "model.safetensors"))
    key = f"{MODULE}.weight"
    torch.testing.assert_close(merged[key].float() - base[key].float(), expected, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(merged[k], base[k]) for k in base if k != key)  # nothing else moves


# (id, plugin source, fragment of the one-line refusal; None: it loads)
CONTRACT = [
    ("factors only", FACTOR_ONLY, None),
    ("no delta, no factors",
     FACTOR_ONLY.replace("    def factors(", "    def factorz("),
     "variant plugin 'factor_only' (fakeplug-factors 1.0) does not fulfil the variant contract: missing delta "
     "(or factors and factor_layout; or check_mergeable, for a variant that edits activations)"),
    ("factors without their layout",
     FACTOR_ONLY.replace("    def factor_layout(", "    def layout("),
     "does not fulfil the variant contract: missing delta (or factors and factor_layout"),
    ("an activation-space variant says so",
     FACTOR_ONLY.replace("    def factors(", "    def check_mergeable(self, adapter):\n        raise ValueError\n\n"
                         "    def factorz("), None),
]


@pytest.mark.parametrize("case, source, fragment", CONTRACT, ids=[c[0] for c in CONTRACT])
def test_registry_requires_a_way_to_delta(case, source, fragment, fake_plugin_dist):
    fake_plugin_dist("fakeplug-factors", {"adaptkit.variant": {"factor_only": "fakeplug_factors:VARIANT"}},
                     {"fakeplug_factors": source})
    if fragment is None:
        assert registry.get("variant", "factor_only").name == "factor_only"
        return
    with pytest.raises(PluginError) as info:
        registry.get("variant", "factor_only")
    message = str(info.value)
    assert fragment in message and "\n" not in message
