"""LoReFT (arXiv 2404.03592): Φ(h) = h + Rᵀ(W·h + b − R·h) on chosen layers' hidden states.

The formula is written out on a tiny model's block output. LoReFT has no ΔW, so instead of the
generic contract (tests/test_variant_contract.py merges) this file checks the same things without
merging — save/load equal, disabled = base, remove = base, only adapter tensors train, the loss goes
down — and that every merge and export path refuses it in one line.
"""
from __future__ import annotations

import copy
import json
import re
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

import adaptkit as ak
from adaptkit import registry
from adaptkit.adapter import read_adapter
from adaptkit.files.convert import convert
from adaptkit.errors import AdaptkitError
from adaptkit.live.layer import AdaptedLayer
from adaptkit.merge.engine import run_merge
from adaptkit_plugins.variants.loreft import positions
from builders import tiny_gpt2, tiny_llama

IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
NOT_WEIGHTS = re.escape("LoReFT edits activations (hidden states), not weights")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def train(model, handle, steps=3, lr=1e-2):
    opt = torch.optim.AdamW(handle.param_groups(lr))
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def trained(build=tiny_llama, **config):
    base = build()
    model = copy.deepcopy(base)
    handle = ak.inject(model, "loreft", **{"layers": [0, 1], "r": 2, "first_n": 2, "last_n": 3, **config})
    train(model, handle)
    return base, model, handle


def rotations(model):
    return [m.branches["default"].params.rotation.weight.detach() for m in model.modules()
            if isinstance(m, AdaptedLayer)]


def capture(module):
    seen = []
    module.register_forward_hook(lambda mod, args, out: seen.append(out[0] if isinstance(out, tuple) else out))
    return seen


def test_positions_first_and_last_each_once():
    assert positions(10, 2, 3).tolist() == [0, 1, 7, 8, 9]
    assert positions(4, 2, 3).tolist() == [0, 1, 2, 3]  # overlap: each position once
    assert positions(1, 2, 3).tolist() == [0]
    assert positions(5, 0, 2).tolist() == [3, 4] and positions(5, 2, 0).tolist() == [0, 1]


@pytest.mark.parametrize("length", [9, 4, 1])
def test_formula_on_a_block_output(length):
    base, model, _ = trained()
    block = model.model.layers[0]
    before, after = capture(block.base_layer), capture(block)
    ids = IDS[:, :length]
    logits(model, ids)
    h, out = before[0], after[0]
    p = block.branches["default"].params
    rot, w, b = p.rotation.weight.detach(), p["loreft_W"].detach(), p["loreft_b"].detach()
    edited = sorted({*range(min(2, length)), *range(max(length - 3, 0), length)})
    phi = h + (h @ w.T + b - h @ rot.T) @ rot  # Φ(h) = h + Rᵀ(W·h + b − R·h), row vectors
    torch.testing.assert_close(out[:, edited], phi[:, edited])
    untouched = [i for i in range(length) if i not in edited]
    assert torch.equal(out[:, untouched], h[:, untouched])
    assert rot.shape == (2, 32)
    torch.testing.assert_close(rot @ rot.T, torch.eye(2), atol=1e-5, rtol=0)


@pytest.mark.parametrize("orthogonal_map", ["matrix_exp", "cayley", "householder"])
def test_r_stays_orthonormal_and_the_loss_goes_down(orthogonal_map):
    torch.manual_seed(0)
    model = tiny_llama()
    handle = ak.inject(model, "loreft", layers=[1], r=4, first_n=3, last_n=3, orthogonal_map=orthogonal_map)
    start = [r.clone() for r in rotations(model)]
    losses = train(model, handle, steps=12, lr=2e-2)
    assert losses[-1] < losses[0] - 0.05
    for r0, r in zip(start, rotations(model)):
        assert not torch.allclose(r0, r, atol=1e-3)  # R moved ...
        torch.testing.assert_close(r @ r.T, torch.eye(4), atol=1e-5, rtol=0)  # ... and stayed orthonormal


def test_only_adapter_tensors_train():
    base, model, handle = trained()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".branches." in n for n in trainable)
    assert handle.trainable_parameters()[0] == 2 * (2 * 32 + 2 * 32 + 2)  # per layer: R, W (r × d), b (r)
    base_state = base.state_dict()
    for name, value in model.state_dict().items():
        if ".branches." not in name:
            assert torch.equal(value, base_state[name.replace(".base_layer.", ".")]), name


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_save_load_exact_disabled_and_removed_are_the_base(build, tmp_path):
    base, model, handle = trained(build)
    expected = logits(model)
    assert not torch.allclose(expected, logits(base), atol=1e-3)
    with handle.disabled():
        assert torch.equal(logits(model), logits(base))
    handle.save(tmp_path / "a")

    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["adaptkit_variant"] == "loreft" and "peft_type" not in config
    assert (config["r"], config["first_n"], config["last_n"], config["layers"]) == (2, 2, 3, [0, 1])
    with safe_open(tmp_path / "a" / "adapter_model.safetensors", "pt") as f:
        assert f.metadata()["adaptkit_variant"] == "loreft"
        keys = set(f.keys())
        blocks = handle.adapters["default"].layers
        assert keys == {f"base_model.model.{b}.loreft_{t}" for b in blocks for t in "RWb"}
        saved_r = f.get_tensor(f"base_model.model.{blocks[0]}.loreft_R")
    assert torch.equal(saved_r, rotations(model)[0])  # R itself, orthonormal

    fresh = copy.deepcopy(base)
    again = ak.load_adapter(fresh, tmp_path / "a")
    assert torch.equal(logits(fresh), expected)
    assert all(torch.equal(a, b) for a, b in zip(rotations(fresh), rotations(model)))
    train(fresh, again)  # a loaded adapter trains on with R orthonormal
    for r in rotations(fresh):
        torch.testing.assert_close(r @ r.T, torch.eye(2), atol=1e-5, rtol=0)

    handle.remove()
    assert torch.equal(logits(model), logits(base))
    assert not any(isinstance(m, AdaptedLayer) for m in model.modules())


def test_hot_swap_and_inspect(tmp_path):
    base, model, handle = trained()
    handle.save(tmp_path / "a")
    other = copy.deepcopy(base)
    swapped = ak.inject(other, "loreft", layers=[0, 1], r=2, first_n=2, last_n=3)
    swapped.load(tmp_path / "a", swap=True)
    assert torch.equal(logits(other), logits(model))
    found = ak.inspect(tmp_path / "a")["adapter"]
    assert found["variant"] == "loreft" and found["rank"] == 2 and found["targeted_modules"] == 2


def test_every_merge_and_export_path_refuses_in_one_line(llama_dir, tmp_path):
    _, model, handle = trained()
    handle.save(tmp_path / "reft")
    for action in (handle.merge, handle.merge_and_unload):
        with pytest.raises(AdaptkitError, match="changes activations, not weights") as err:
            action()
        assert "\n" not in str(err.value)
    assert not any(isinstance(m, AdaptedLayer) and m.merged for m in model.modules())
    recipes = {  # into a base (mode 2); adapters -> adapter with and without a base; export to LoRA
        "mode 2": {"base_model": str(llama_dir), "merge_method": "task_arithmetic",
                   "models": [{"model": str(tmp_path / "reft"), "parameters": {"weight": 1.0}}]},
        "to adapter": {"merge_method": "linear", "output": {"kind": "adapter", "rank": 2},
                       "models": [{"model": str(tmp_path / "reft"), "parameters": {"weight": 1.0}}] * 2},
        "concat": {"merge_method": "concat", "output": {"kind": "adapter"},
                   "models": [{"model": str(tmp_path / "reft"), "parameters": {"weight": 1.0}}]},
    }
    recipes["to adapter with base"] = {**recipes["to adapter"], "base_model": str(llama_dir)}
    for what, recipe in recipes.items():
        with pytest.raises(AdaptkitError, match=NOT_WEIGHTS) as err:
            run_merge(recipe, tmp_path / "out", progress=False)
        assert "\n" not in str(err.value), what
        assert not (tmp_path / "out").exists()
    files = read_adapter(tmp_path / "reft")
    for call in (lambda: convert(tmp_path / "reft", "peft", tmp_path / "lora"),  # `adaptkit convert` (to LoRA)
                 lambda: convert(tmp_path / "reft", "peft", tmp_path / "lora", rank=2, base=llama_dir),
                 lambda: registry.get("variant", "loreft").delta(files, sorted(files.modules)[0])):
        with pytest.raises(AdaptkitError, match=NOT_WEIGHTS) as err:
            call()
        assert "\n" not in str(err.value)
    assert not (tmp_path / "lora").exists()


def test_cli_merge_into_a_base_exits_1_with_one_line(llama_dir, tmp_path):
    _, _, handle = trained()
    handle.save(tmp_path / "reft")
    proc = subprocess.run([sys.executable, "-m", "adaptkit", "merge", "--base", str(llama_dir), "-m",
                           str(tmp_path / "reft"), "-o", str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(NOT_WEIGHTS, lines[0]), proc.stderr
    assert not (tmp_path / "out").exists()


def test_one_line_config_errors():
    model = tiny_llama()
    cases = {"needs layers=": {}, r"integers in -2\.\.1": {"layers": [2]}, "rank r=64 does not fit": {"layers": [0], "r": 64},
             "not both 0": {"layers": [0], "first_n": 0, "last_n": 0},
             "not target_modules": {"layers": [0], "target_modules": ["q_proj"]},
             "orthogonal_map must be": {"layers": [0], "orthogonal_map": "qr"}}
    for message, config in cases.items():
        with pytest.raises(AdaptkitError, match=message):
            ak.inject(copy.deepcopy(model), "loreft", **config)
    handle = ak.inject(model, "loreft", layers=-1)  # negative indices count from the end
    assert handle.adapters["default"].layers == ["model.layers.1"]


def tiny_bert():
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForMaskedLM(cfg).eval()


def test_post_norm_encoder_blocks_bert(tmp_path):
    """A BertLayer has no norm of its own at the top level (its LayerNorms sit in attention.output and
    output): the width comes from the last norm inside it, the hidden size, not the 64-wide FFN."""
    base, model, handle = trained(tiny_bert)
    layers = [m for m in model.modules() if isinstance(m, AdaptedLayer)]
    assert len(layers) == 2 and all(layer.target.in_features == 32 for layer in layers)
    assert rotations(model)[0].shape == (2, 32)
    losses = train(model, handle, steps=6)
    assert losses[-1] < losses[0]
    handle.save(tmp_path / "bert")
    fresh = copy.deepcopy(base)
    ak.load_adapter(fresh, tmp_path / "bert")
    assert torch.equal(logits(fresh), logits(model))
    with handle.disabled():
        assert torch.equal(logits(model), logits(base))
