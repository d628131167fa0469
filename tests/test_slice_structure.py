"""Frankenmerges of models whose layers differ in kind: the output's config.json describes its layers.

Mixture-of-experts models may keep their first layers dense, said by index in config.json (GLM-4-MoE's and
DeepSeek's `first_k_dense_replace`, Qwen-MoE's `mlp_only_layers` and `decoder_sparse_step`). A slice that
puts an expert layer first must say so in the output's config, or transformers builds a dense layer there,
finds its tensors missing and initializes them at random (adaptkit wrote such a model once; mergekit
0.1.5 fails on it). Layers that differ in a way no key adaptkit knows describes keep their order or the
merge is refused.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from adaptkit.errors import AdaptkitError
from adaptkit.merge.engine import run_merge
from builders import tiny_llama

SMALL = dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
             vocab_size=64, num_hidden_layers=4, moe_intermediate_size=16, num_experts_per_tok=2)


def build(folder, family: str, seed: int = 0, **config):
    import transformers

    torch.manual_seed(seed)
    if family == "glm4_moe":
        cfg = transformers.Glm4MoeConfig(**SMALL, n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=2,
                                         **config)
        model = transformers.Glm4MoeForCausalLM(cfg)
    else:
        cfg = transformers.Qwen3MoeConfig(**SMALL, num_experts=4, **config)
        model = transformers.Qwen3MoeForCausalLM(cfg)
    model.save_pretrained(folder)
    return folder


def loads_whole(folder):
    """transformers loads every parameter from the folder's tensors: none initialized, none left over."""
    import transformers

    config = json.loads((folder / "config.json").read_text())
    model, info = getattr(transformers, config["architectures"][0]).from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return config


def passthrough(*ranges, model):
    return {"merge_method": "passthrough", "dtype": "float32",
            "slices": [{"sources": [{"model": str(model), "layer_range": list(r)}]} for r in ranges]}


def test_glm4_moe_slice_starting_at_an_expert_layer_says_so(tmp_path):
    model = build(tmp_path / "glm", "glm4_moe")  # layers 0, 1 dense; 2, 3 experts
    run_merge(passthrough((3, 4), (2, 4), model=model), tmp_path / "out", progress=False, card=False)
    config = loads_whole(tmp_path / "out")
    assert config["first_k_dense_replace"] == 0 and config["num_hidden_layers"] == 3
    ours, source = load_file(tmp_path / "out" / "model.safetensors"), load_file(model / "model.safetensors")
    for out_layer, in_layer in enumerate([3, 2, 3]):  # each output layer the source layer, renamed
        mine = {k.split(".", 3)[3]: v for k, v in ours.items() if k.startswith(f"model.layers.{out_layer}.")}
        theirs = {k.split(".", 3)[3]: v for k, v in source.items() if k.startswith(f"model.layers.{in_layer}.")}
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
        assert any("experts" in k for k in mine)


def test_glm4_moe_dense_layers_first_keep_their_count(tmp_path):
    model = build(tmp_path / "glm", "glm4_moe")
    run_merge(passthrough((1, 2), (0, 1), (2, 4), model=model), tmp_path / "out", progress=False, card=False)
    assert loads_whole(tmp_path / "out")["first_k_dense_replace"] == 2  # (unchanged: the donor's says it)
    run_merge(passthrough((1, 3), model=model), tmp_path / "one", progress=False, card=False)
    assert loads_whole(tmp_path / "one")["first_k_dense_replace"] == 1


def test_glm4_moe_dense_after_experts_is_refused(tmp_path):
    model = build(tmp_path / "glm", "glm4_moe")
    with pytest.raises(AdaptkitError, match=r"dense layers after expert layers.*first_k_dense_replace.*"
                                            r"expert, dense, expert"):
        run_merge(passthrough((2, 3), (0, 1), (3, 4), model=model), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_qwen_moe_dense_layers_listed_where_the_slices_put_them(tmp_path):
    model = build(tmp_path / "qwen", "qwen3_moe", mlp_only_layers=[0], decoder_sparse_step=1)
    run_merge(passthrough((2, 4), (0, 1), (1, 2), model=model), tmp_path / "out", progress=False, card=False)
    config = loads_whole(tmp_path / "out")
    assert config["mlp_only_layers"] == [2] and config["decoder_sparse_step"] == 1
    sparse = build(tmp_path / "step", "qwen3_moe", decoder_sparse_step=2)  # layers 1 and 3 experts
    run_merge(passthrough((1, 2), (0, 1), model=sparse), tmp_path / "two", progress=False, card=False)
    config = loads_whole(tmp_path / "two")
    assert config["mlp_only_layers"] == [1] and config["decoder_sparse_step"] == 1


@pytest.fixture
def odd_llama(tmp_path):
    """A Llama whose layer 1 holds a tensor the others lack, which its config.json does not say."""
    folder = tmp_path / "odd"
    tiny_llama(seed=3, num_hidden_layers=3).save_pretrained(folder)
    weights = load_file(folder / "model.safetensors")
    weights["model.layers.1.mlp.extra.weight"] = torch.ones(4)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_layers_that_differ_unsaid_keep_their_order(odd_llama, tmp_path):
    run_merge(passthrough((0, 2), (2, 3), model=odd_llama), tmp_path / "same", progress=False, card=False)
    assert "model.layers.1.mlp.extra.weight" in load_file(tmp_path / "same" / "model.safetensors")
    with pytest.raises(AdaptkitError, match=r"layer 1 of .*odd has other tensors than layer 0 of .*odd "
                                            r"\('mlp.extra.weight'\).*cannot describe the layers"):
        run_merge(passthrough((1, 2), (0, 1), model=odd_llama), tmp_path / "moved", progress=False)
    assert not (tmp_path / "moved").exists()
