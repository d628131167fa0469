"""Trainable tokens (PEFT's TrainableTokensConfig): E'[t] = T[j] for t = token_indices[j], E'[t] = E[t] otherwise.

The formula is written out on a plain embedding; a head tied to the embedding (GPT-2's lm_head) reads
the same rows (logits = h·E'ᵀ, written out). PEFT writes and adaptkit loads with equal logits on a tiny
Llama (untied) and GPT-2 (tied), and back (adaptkit writes, PEFT loads); merging live and into a saved
base equals PEFT's merge_and_unload; unmerge restores the base; bad settings are one line.
`adaptkit train` runs it (tests/test_train.py's VARIANTS).
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel, TrainableTokensConfig, get_peft_model
from safetensors.torch import load_file
from torch import nn

import adaptkit as ak
from adaptkit import registry
from adaptkit.adapter import read_adapter
from adaptkit.errors import AdaptkitError
from adaptkit.merge.engine import run_merge
from builders import tiny_gpt2, tiny_llama

ARCHS = {"llama": (tiny_llama, "model.embed_tokens"), "gpt2": (tiny_gpt2, "transformer.wte")}
INDICES = [3, 5, 7, 60]
IDS = torch.tensor([[1, 3, 5, 9, 7, 2, 60], [5, 60, 3, 0, 7, 11, 4]])
TOL = dict(atol=1e-5, rtol=1e-5)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def peft_made(tmp_path_factory):
    """Per architecture: the base, PEFT's adapter folder (rows drawn at random), its logits, its merged model."""
    made = {}
    for arch, (build, _) in ARCHS.items():
        base = build()
        folder = tmp_path_factory.mktemp(arch)
        torch.manual_seed(1)
        peft = get_peft_model(copy.deepcopy(base), TrainableTokensConfig(token_indices=INDICES, init_weights=False))
        peft.save_pretrained(folder / "peft")
        base.save_pretrained(folder / "base")
        expected = logits(peft)
        merged = peft.merge_and_unload()
        made[arch] = dict(base=base, folder=folder, expected=expected, merged=merged)
    return made


def test_formula_on_a_plain_embedding():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(10, 4))
    table = net[0].weight.detach().clone()
    handle = ak.inject(net, "trainable_tokens", target_modules=["0"], token_indices=[2, 7], init_weights=False)
    rows = net[0].branches["default"].params["trainable_tokens_delta"].detach().clone()
    x = torch.tensor([[2, 1, 7, 2, 9]])
    expected = torch.stack([rows[[2, 7].index(t)] if t in (2, 7) else table[t] for t in x[0].tolist()])[None]
    torch.testing.assert_close(net(x), expected, atol=0, rtol=0)
    handle.merge()  # the rows replaced in the table itself (as E + (T − E): to float rounding)
    merged = net[0].base_layer.weight.detach()
    torch.testing.assert_close(merged[[2, 7]], rows, atol=1e-6, rtol=0)
    keep = [i for i in range(10) if i not in (2, 7)]
    torch.testing.assert_close(merged[keep], table[keep], atol=0, rtol=0)
    torch.testing.assert_close(net(x), expected, atol=1e-6, rtol=0)
    handle.unmerge()
    torch.testing.assert_close(net[0].base_layer.weight.detach(), table, atol=1e-6, rtol=0)


def test_other_adapters_on_the_layer_are_kept():
    """Under an embedding LoRA the other tokens keep the LoRA's change; the chosen ones are T."""
    model = tiny_llama()
    ak.inject(model, "lora", name="lora", target_modules=["embed_tokens"], r=2, init_lora_weights=False)
    handle = ak.inject(model, "trainable_tokens", name="tokens", token_indices=INDICES, init_weights=False)
    layer = model.model.embed_tokens
    with torch.no_grad():
        handle.set_active("lora")
        lora_only = layer(IDS)
        handle.set_active(["lora", "tokens"])
        both = layer(IDS)
    chosen = torch.isin(IDS, torch.tensor(INDICES))
    torch.testing.assert_close(both[~chosen], lora_only[~chosen], atol=0, rtol=0)
    rows = layer.branches["tokens"].params["trainable_tokens_delta"].detach()
    torch.testing.assert_close(both[chosen], rows[[INDICES.index(t) for t in IDS[chosen].tolist()]], atol=0, rtol=0)


def test_tied_head_reads_the_same_rows():
    model = tiny_gpt2()
    handle = ak.inject(model, "trainable_tokens", token_indices=INDICES, init_weights=False)
    assert handle.adapters["default"].layers == ["transformer.wte", "lm_head"]
    rows = model.transformer.wte.branches["default"].params["trainable_tokens_delta"]
    assert model.lm_head.branches["default"].params["trainable_tokens_delta"] is rows  # one table, tied
    table = model.transformer.wte.base_layer.weight.detach().clone()
    table[INDICES] = rows.detach()
    with torch.no_grad():
        hidden = model.transformer(IDS).last_hidden_state
    torch.testing.assert_close(logits(model), hidden @ table.T, **TOL)
    assert len([p for _, p in handle.parameters()]) == 1


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_peft_writes_adaptkit_loads_and_merges(arch, peft_made, tmp_path):
    made = peft_made[arch]
    model = copy.deepcopy(made["base"])
    handle = ak.load_adapter(model, made["folder"] / "peft")
    torch.testing.assert_close(logits(model), made["expected"], **TOL)
    with handle.disabled():
        torch.testing.assert_close(logits(model), logits(made["base"]), atol=0, rtol=0)
    handle.merge_and_unload()  # live: the rows replaced, as PEFT's merge_and_unload
    torch.testing.assert_close(logits(model), logits(made["merged"]), **TOL)
    embedding = ARCHS[arch][1]
    torch.testing.assert_close(model.get_submodule(embedding).weight, made["merged"].get_submodule(embedding).weight,
                               atol=1e-6, rtol=0)
    # the tensor plane: merged into the saved base (a tied head is the embedding's tensor: stored once)
    run_merge({"base_model": str(made["folder"] / "base"), "merge_method": "task_arithmetic",
               "models": [{"model": str(made["folder"] / "peft"), "parameters": {"weight": 1.0}}]}, tmp_path / "m",
              progress=False)
    merged = type(made["base"]).from_pretrained(tmp_path / "m").eval()
    torch.testing.assert_close(logits(merged), logits(made["merged"]), **TOL)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_adaptkit_writes_peft_loads(arch, peft_made, tmp_path):
    made = peft_made[arch]
    model = copy.deepcopy(made["base"])
    handle = ak.inject(model, "trainable_tokens", token_indices=INDICES, init_weights=False)
    handle.save(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "TRAINABLE_TOKENS" and config["target_modules"] == [ARCHS[arch][1]]
    peft_keys = set(load_file(made["folder"] / "peft" / "adapter_model.safetensors"))
    assert set(load_file(tmp_path / "a" / "adapter_model.safetensors")) == peft_keys  # the tied copy too
    peft = PeftModel.from_pretrained(copy.deepcopy(made["base"]), tmp_path / "a").eval()
    torch.testing.assert_close(logits(peft), logits(model), **TOL)
    assert not torch.allclose(logits(model), logits(made["base"]), atol=1e-4)


def test_tensor_plane_delta_is_the_replaced_rows(peft_made):
    made = peft_made["llama"]
    files = read_adapter(made["folder"] / "peft")
    variant = registry.get("variant", "trainable_tokens")
    base = made["base"].model.embed_tokens.weight.detach()
    delta = variant.delta(files, "model.embed_tokens", base)
    rows = files.tensor("model.embed_tokens", "trainable_tokens_delta")
    torch.testing.assert_close((base + delta)[INDICES], rows, atol=1e-6, rtol=0)
    assert not delta[[i for i in range(base.shape[0]) if i not in INDICES]].any()
    with pytest.raises(AdaptkitError, match="give the base model"):
        variant.delta(files, "model.embed_tokens")


@pytest.mark.parametrize("settings, message", [
    ({}, "token_indices must be a list"),
    ({"token_indices": [3, 3]}, "distinct ids in 0..127"),
    ({"token_indices": [128]}, r"distinct ids in 0\.\.127"),
    ({"token_indices": [1], "init_weights": "yes"}, "init_weights must be"),
    ({"token_indices": [1], "target_modules": ["c_attn"]}, "not of a linear layer"),
], ids=["missing", "repeated", "outside", "init", "conv1d"])
def test_bad_settings_are_one_line(settings, message):
    with pytest.raises(AdaptkitError, match=message) as err:
        ak.inject(tiny_gpt2(), "trainable_tokens", **settings)
    assert "\n" not in str(err.value)


def test_a_file_with_the_wrong_row_count_is_refused(peft_made, tmp_path):
    import shutil

    shutil.copytree(peft_made["llama"]["folder"] / "peft", tmp_path / "p")
    config = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps({**config, "token_indices": [1, 2]}))
    with pytest.raises(AdaptkitError, match="token_indices lists 2 tokens"):
        read_adapter(tmp_path / "p")


class EmbConv1D(nn.Module):
    """PEFT's `EmbConv1D` test model (tests/test_custom_models.py): embedding, transformers Conv1D, linear."""

    def __init__(self):
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        self.emb, self.conv1d, self.lin0 = nn.Embedding(100, 5), Conv1D(1, 5), nn.Linear(10, 2)

    def forward(self, x):
        return torch.log_softmax(self.lin0(torch.relu(self.conv1d(self.emb(x))).flatten(1)), dim=-1)


def test_peft_custom_model_case(tmp_path):
    """PEFT's matrix case "Embedding + transformers Conv1D 1 trainable_tokens" (a plain nn.Module)."""
    torch.manual_seed(0)
    base = EmbConv1D().eval()
    x = torch.arange(20).reshape(2, 10) % 7
    peft = get_peft_model(copy.deepcopy(base), TrainableTokensConfig(target_modules=["emb"], token_indices=[0, 1, 3],
                                                                     init_weights=False))
    peft.save_pretrained(tmp_path / "p")
    with torch.no_grad():
        expected, merged = peft(x), peft.merge_and_unload()(x)
    model = copy.deepcopy(base)
    handle = ak.load_adapter(model, tmp_path / "p")
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, **TOL)
        assert not torch.allclose(base(x), expected)
        handle.merge_and_unload()
        torch.testing.assert_close(model(x), merged, **TOL)
