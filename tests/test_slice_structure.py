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


def edit_config(folder, **changes):
    """config.json with `changes` (a value None: the key removed), as older or other checkpoints write it."""
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        config.pop(key, None) if value is None else config.__setitem__(key, value)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_gemma2_without_layer_types_gets_each_layers_kind(tmp_path):
    """Gemma-2 checkpoints of 2024 have no `layer_types`: transformers alternates sliding and full attention
    by index, so a moved layer would change its kind. The output lists each layer's own (transformers' rule
    applied to its source), which transformers reads before its rule."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Gemma2Config(**{k: v for k, v in SMALL.items() if "moe" not in k and "experts" not in k})
    transformers.Gemma2ForCausalLM(cfg).save_pretrained(tmp_path / "g2")
    model = edit_config(tmp_path / "g2", layer_types=None)
    run_merge(passthrough((1, 2), (0, 1), (2, 4), model=model), tmp_path / "out", progress=False, card=False)
    config = loads_whole(tmp_path / "out")
    assert config["layer_types"] == ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]
    run_merge(passthrough((0, 4), model=model), tmp_path / "same", progress=False, card=False)
    assert "layer_types" not in json.loads((tmp_path / "same" / "config.json").read_text())  # (nothing moved)


def test_per_layer_and_index_lists_follow_their_layers(tmp_path):
    """A list with one entry per layer under any name with "layer" in it (SmolLM3's `no_rope_layers`), and
    a list of layer indices (Mllama's `cross_attention_layers`, here on a Llama): each output layer's
    own, from its source."""
    folder = tmp_path / "llama"
    tiny_llama(seed=4, num_hidden_layers=4).save_pretrained(folder)
    edit_config(folder, no_rope_layers=[1, 0, 1, 1], cross_attention_layers=[1, 3])
    run_merge(passthrough((3, 4), (0, 2), model=folder), tmp_path / "out", progress=False, card=False)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["no_rope_layers"] == [1, 1, 0] and config["cross_attention_layers"] == [0, 2]
    assert config["num_hidden_layers"] == 3


def test_a_rule_on_indices_with_no_list_is_refused_when_layers_move(tmp_path):
    folder = tmp_path / "llama"
    tiny_llama(seed=5, num_hidden_layers=4).save_pretrained(folder)
    edit_config(folder, attn_layer_period=2)
    run_merge(passthrough((0, 3), model=folder), tmp_path / "kept", progress=False, card=False)  # (in place)
    with pytest.raises(AdaptkitError, match=r"config.json's 'attn_layer_period' gives the layers' kinds by a rule"):
        run_merge(passthrough((1, 2), (0, 1), model=folder), tmp_path / "moved", progress=False)
    assert not (tmp_path / "moved").exists()


def test_t5_encoder_without_its_first_block_is_refused(tmp_path):
    """T5 keeps its relative position bias in block 0 alone. An encoder sliced from block 1 on puts a block
    without it first, where transformers expects it: mergekit 0.1.5 writes that model, and transformers then
    initializes the bias at random. adaptkit refuses it; slices that keep block 0 first run."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_heads=2, num_layers=4,
                                feed_forward_proj="gated-gelu", decoder_start_token_id=0)
    transformers.T5ForConditionalGeneration(cfg).save_pretrained(tmp_path / "t5")
    model = str(tmp_path / "t5")

    def recipe(*ranges):
        return {"merge_method": "passthrough", "dtype": "float32", "modules": {
            "encoder": {"slices": [{"sources": [{"model": model, "layer_range": list(r)}]} for r in ranges]},
            "decoder": {"models": [{"model": model}]}, "shared": {"models": [{"model": model}]}}}

    with pytest.raises(AdaptkitError, match=r"layer 1 of .*t5 has other tensors than layer 0 of .*t5 "
                                            r"\('layer.0.SelfAttention.relative_attention_bias.weight'\)"):
        run_merge(recipe((1, 4)), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    run_merge(recipe((0, 2), (1, 4)), tmp_path / "kept", progress=False, card=False)
    assert loads_whole(tmp_path / "kept")["num_layers"] == 5
