"""mergekit's `modules:` (modules.py): a multimodal model's text decoder, vision tower and projector each
merged from its own slices or models with its own parameters; bytes and config.json against mergekit's
own merge of the same YAML on tiny Mistral 3 models, the layers of a `models:` recipe counted per
module, the output running in transformers, bad modules."""
from __future__ import annotations

import json

import pytest
import torch

from adaptkit.errors import AdaptkitError
from adaptkit.merge.card import describe_group
from adaptkit.merge.engine import Plan, run_merge
from adaptkit.merge.modules import ARCHITECTURES, architecture_modules, owner
from adaptkit.merge.recipe import load_recipe
from builders import assert_before_and_after, mergekit_architectures, merges_like_mergekit, state, tiny_llama

TEXT_LAYERS, VISION_LAYERS = 3, 2


def tiny_mistral3(seed: int, text_layers: int = TEXT_LAYERS):
    """A Mistral 3 (Pixtral vision tower, projector, Mistral text decoder) of 32 wide, weights N(0, 0.05²), bf16."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    torch.manual_seed(seed)
    text = dict(model_type="mistral", hidden_size=32, intermediate_size=64, num_hidden_layers=text_layers,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=100, head_dim=8, tie_word_embeddings=False)
    vision = dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=VISION_LAYERS,
                  num_attention_heads=4, image_size=32, patch_size=8, head_dim=8)
    model = Mistral3ForConditionalGeneration(Mistral3Config(text_config=text, vision_config=vision,
                                                            image_token_index=5)).to(torch.bfloat16)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return model.eval()


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    root = tmp_path_factory.mktemp("vlm")
    for i in range(3):
        tiny_mistral3(i).save_pretrained(root / f"m{i}")
    return root


def per_module(vlm, method="slerp", dtype="bfloat16"):
    """Text layers sliced from two models (a slice's parameters over the module's), the vision tower and
    projector merged whole; a global t under both."""
    m = [str(vlm / f"m{i}") for i in range(3)]
    return {"modules": {
        "text_decoder": {"slices": [{"sources": [{"model": m[0], "layer_range": [0, 2]},
                                                 {"model": m[1], "layer_range": [1, 3]}], "parameters": {"t": 0.3}},
                                    {"sources": [{"model": m[2], "layer_range": [0, 3]},
                                                 {"model": m[0], "layer_range": [0, 3]}]}],
                         "parameters": {"t": [0.1, 0.9]}},
        "vision_tower": {"models": [{"model": m[0]}, {"model": m[1]}], "parameters": {"t": [0.2, 0.6]}},
        "multi_modal_projector": {"models": [{"model": m[0]}, {"model": m[1]}]}},
        "merge_method": method, "base_model": m[0], "parameters": {"t": 0.5}, "dtype": dtype}


def ties_per_module(vlm, dtype="bfloat16"):
    """TIES with the base added to each module's models (as mergekit adds it), a filter and a gradient
    in module parameters, a per-model weight."""
    m = [str(vlm / f"m{i}") for i in range(3)]
    return {"modules": {
        "text_decoder": {"slices": [{"sources": [{"model": m[0], "layer_range": [0, 3]},
                                                 {"model": m[1], "layer_range": [0, 3], "parameters": {"weight": 0.7}},
                                                 {"model": m[2], "layer_range": [0, 3]}]}],
                         "parameters": {"density": [0.3, 0.9]}},
        "vision_tower": {"models": [{"model": m[1], "parameters": {"weight": 0.4}}, {"model": m[2]}],
                         "parameters": {"density": {"filter": "mlp", "value": 0.2}}},
        "multi_modal_projector": {"models": [{"model": m[1]}, {"model": m[2]}]}},
        "merge_method": "ties", "base_model": m[0], "parameters": {"weight": 1.0, "density": 0.5}, "dtype": dtype}


def linear_with_base(vlm, dtype="float16"):
    """linear takes no base: the base is one more input of every module, with the global weight."""
    m = [str(vlm / f"m{i}") for i in range(3)]
    return {"modules": {
        "text_decoder": {"models": [{"model": m[1], "parameters": {"weight": [1, 2]}}, {"model": m[2]}]},
        "vision_tower": {"models": [{"model": m[1]}, {"model": m[2]}], "parameters": {"weight": 0.25}},
        "multi_modal_projector": {"models": [{"model": m[1]}, {"model": m[2]}]}},
        "merge_method": "linear", "base_model": m[0], "parameters": {"weight": 1.0}, "dtype": dtype}


def frankenmerge(vlm, dtype="bfloat16"):
    """Passthrough: 5 text layers from three models, vision layers renumbered, one model's projector."""
    m = [str(vlm / f"m{i}") for i in range(3)]
    return {"modules": {
        "text_decoder": {"slices": [{"sources": [{"model": m[1], "layer_range": [0, 2]}]},
                                    {"sources": [{"model": m[2], "layer_range": [1, 3]}]},
                                    {"sources": [{"model": m[0], "layer_range": [2, 3]}]}]},
        "vision_tower": {"slices": [{"sources": [{"model": m[1], "layer_range": [1, 2]}]},
                                    {"sources": [{"model": m[2], "layer_range": [0, 2]}]}]},
        "multi_modal_projector": {"models": [{"model": m[2]}]}},
        "merge_method": "passthrough", "dtype": dtype}


def models_gradient(vlm, dtype="bfloat16"):
    """No modules: a `models:` recipe, whose gradient mergekit spreads over each module's own layers."""
    m = [str(vlm / f"m{i}") for i in range(2)]
    return {"models": [{"model": m[0]}, {"model": m[1]}], "merge_method": "slerp", "base_model": m[0],
            "parameters": {"t": [0, 0.3, 1]}, "dtype": dtype}


RECIPES = {"per_module": per_module, "ties_per_module": ties_per_module, "linear_with_base": linear_with_base,
           "frankenmerge": frankenmerge, "models_gradient": models_gradient}


@pytest.mark.parametrize("case", RECIPES)
def test_bytes_and_config_equal_mergekit(vlm, tmp_path, case):
    got, ours, theirs = merges_like_mergekit(RECIPES[case](vlm), tmp_path)
    for key in ("text_config", "vision_config"):
        assert ours[key]["num_hidden_layers"] == theirs[key]["num_hidden_layers"], key
    if case == "frankenmerge":
        assert (ours["text_config"]["num_hidden_layers"], ours["vision_config"]["num_hidden_layers"]) == (5, 3)
        assert "vision_tower.transformer.layers.2.attention.q_proj.weight" in got


def test_tokenizer_union_aligns_the_text_decoders_rows_as_mergekit(tmp_path):
    """A union vocabulary over two Mistral 3 models (64 tokens, and 66 with ChatML): the text decoder's
    embedding rows re-indexed, config.json's text_config.vocab_size set, bytes equal to mergekit's."""
    from test_merge_tokenizers import CHATML, make_tokenizer

    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    folders = []
    for seed, (rows, added) in enumerate([(64, []), (66, CHATML)]):
        torch.manual_seed(seed)
        text = dict(model_type="mistral", hidden_size=32, intermediate_size=64, num_hidden_layers=2, head_dim=8,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=rows, tie_word_embeddings=False)
        vision = dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=1, head_dim=8,
                      num_attention_heads=4, image_size=32, patch_size=8)
        model = Mistral3ForConditionalGeneration(Mistral3Config(text_config=text, vision_config=vision,
                                                                image_token_index=5))
        folders.append(tmp_path / f"v{seed}")
        model.save_pretrained(folders[-1])
        make_tokenizer(added).save_pretrained(folders[-1])
    models = [{"model": str(f), "parameters": {"weight": 0.5}} for f in folders]
    recipe = {"modules": {m: {"models": models} for m in ("text_decoder", "vision_tower", "multi_modal_projector")},
              "merge_method": "linear", "tokenizer_source": "union", "dtype": "float32"}
    got, ours, theirs = merges_like_mergekit(recipe, tmp_path, copy_tokenizer=True)
    assert got["language_model.model.embed_tokens.weight"].shape[0] == 66
    assert ours["text_config"]["vocab_size"] == theirs["text_config"]["vocab_size"] == 66


def tiny_qwen2_vl(seed: int, folder) -> None:
    """A Qwen2-VL (text under `model.`, vision and projector under `visual.`) saved with its text layer
    count at the top of config.json too, as transformers 4 wrote it (and mergekit reads it)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=TEXT_LAYERS, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=100, head_dim=8, bos_token_id=1, eos_token_id=2)
    vision = dict(depth=VISION_LAYERS, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=2,
                  spatial_merge_size=1, temporal_patch_size=1)
    model = Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text, vision_config=vision)).to(torch.bfloat16)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": TEXT_LAYERS}))


def test_qwen2_vl_modules_without_prefixes_equal_mergekit(tmp_path):
    """Qwen2-VL's modules share prefixes (`visual.` holds the vision tower and, under `visual.merger.`,
    the projector; `lm_head` is the text decoder's): the longest prefix decides. Text layers counted at
    both of config.json's keys, which agree (mergekit sets only the top one; transformers 5 reads the other)."""
    q = [tmp_path / f"q{i}" for i in range(3)]
    for i, folder in enumerate(q):
        tiny_qwen2_vl(i, folder)
    q = list(map(str, q))
    recipe = {"modules": {
        "text_decoder": {"slices": [{"sources": [{"model": q[0], "layer_range": [0, 2]},
                                                 {"model": q[1], "layer_range": [1, 3]}]},
                                    {"sources": [{"model": q[0], "layer_range": [2, 3]},
                                                 {"model": q[2], "layer_range": [0, 1]}]}], "parameters": {"t": [0.1, 0.9]}},
        "vision_tower": {"models": [{"model": q[0]}, {"model": q[1]}], "parameters": {"t": [0.2, 0.6]}},
        "multi_modal_projector": {"models": [{"model": q[0]}, {"model": q[2]}]}},
        "merge_method": "slerp", "base_model": q[0], "parameters": {"t": 0.5}, "dtype": "bfloat16"}
    _, config, _ = merges_like_mergekit(recipe, tmp_path)
    assert config["num_hidden_layers"] == config["text_config"]["num_hidden_layers"] == 3
    assert config["vision_config"]["depth"] == VISION_LAYERS
    frankenmerge = {"modules": {
        "text_decoder": {"slices": [{"sources": [{"model": q[1], "layer_range": [0, 2]}]},
                                    {"sources": [{"model": q[2], "layer_range": [1, 3]}]}]},
        "vision_tower": {"slices": [{"sources": [{"model": q[2], "layer_range": [0, 2]}]},
                                    {"sources": [{"model": q[1], "layer_range": [1, 2]}]}]},
        "multi_modal_projector": {"models": [{"model": q[1]}]}}, "merge_method": "passthrough", "dtype": "bfloat16"}
    _, ours, theirs = merges_like_mergekit(frankenmerge, tmp_path, "ours2", "mk2")
    assert ours["num_hidden_layers"] == theirs["num_hidden_layers"] == ours["text_config"]["num_hidden_layers"] == 4
    assert ours["vision_config"]["depth"] == theirs["vision_config"]["depth"] == 3


def test_llava_next_modules_merge_load_and_run(tmp_path):
    """LLaVA-NeXT, which mergekit has no table for: named as its other Llava-style models, with the
    top-level `image_newline` in the projector. Layers renumbered per module, the output loads and runs."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    text = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=100, head_dim=8)
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, image_size=16, patch_size=4, projection_dim=32)
    m = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        LlavaNextForConditionalGeneration(LlavaNextConfig(text_config=text, vision_config=vision, image_token_index=5)
                                          ).save_pretrained(tmp_path / f"n{seed}")
        m.append(str(tmp_path / f"n{seed}"))
    recipe = {"modules": {
        "text_decoder": {"slices": [{"sources": [{"model": m[0], "layer_range": [0, 3]}]},
                                    {"sources": [{"model": m[1], "layer_range": [1, 3]}]}]},
        "vision_tower": {"slices": [{"sources": [{"model": m[1], "layer_range": [0, 1]}]}]},
        "multi_modal_projector": {"models": [{"model": m[0]}]}}, "merge_method": "passthrough"}
    run_merge(recipe, tmp_path / "out", progress=False, card=False)
    got, first = state(tmp_path / "out"), state(tmp_path / "n1")
    assert torch.equal(got["image_newline"], first["image_newline"])
    assert torch.equal(got["language_model.model.layers.4.mlp.up_proj.weight"],
                       state(tmp_path / "n2")["language_model.model.layers.2.mlp.up_proj.weight"])
    model = LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    assert model.config.text_config.num_hidden_layers == 5 and model.config.vision_config.num_hidden_layers == 1
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 7, 9]])).logits).all()


def test_positions_are_counted_per_module(vlm):
    """t = i / (N − 1) over each module's own N layers: vision layer 1 of 2 is at 1 (counted over the text
    decoder's 3 layers it was at 0.5 before, against mergekit); tensors outside the layers at 0."""
    plan = Plan(load_recipe(models_gradient(vlm)))
    vision = "vision_tower.transformer.layers.{}.feed_forward.up_proj.weight"
    text = "language_model.model.layers.{}.mlp.up_proj.weight"
    assert [plan.positions[vision.format(i)] for i in range(2)] == [0.0, 1.0]
    assert [plan.positions[text.format(i)] for i in range(3)] == [0.0, 0.5, 1.0]
    assert plan.positions["multi_modal_projector.linear_1.weight"] == plan.positions["vision_tower.ln_pre.weight"] == 0


def test_a_single_layer_is_at_one_as_mergekit(tmp_path):
    """mergekit plans a `models:` recipe as one slice, and a one-layer slice takes t = 1 (not 0)."""
    for seed in (1, 2):
        tiny_llama(seed=seed, num_hidden_layers=1).save_pretrained(tmp_path / f"l{seed}")
    recipe = {"models": [{"model": str(tmp_path / "l1")}, {"model": str(tmp_path / "l2")}], "merge_method": "slerp",
              "base_model": str(tmp_path / "l1"), "parameters": {"t": [0.0, 0.3]}, "dtype": "float32"}
    assert Plan(load_recipe(recipe)).positions["model.layers.0.mlp.up_proj.weight"] == 1.0
    merges_like_mergekit(recipe, tmp_path)


def test_output_runs_in_transformers(vlm, tmp_path):
    from transformers import Mistral3ForConditionalGeneration

    run_merge(frankenmerge(vlm), tmp_path / "out", progress=False)
    model = Mistral3ForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    assert model.config.text_config.num_hidden_layers == 5 and model.config.vision_config.num_hidden_layers == 3
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 7, 9, 11]])).logits
    assert logits.shape == (1, 4, 100) and torch.isfinite(logits).all()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| module | output slice | model | layers | parameters |" in card
    assert "| vision_tower | 1 |" in card and "| multi_modal_projector |  |" in card


def test_dry_run_groups_say_the_module(vlm):
    groups = Plan(load_recipe(per_module(vlm))).dry_run()["groups"]
    assert {g["module"] for g in groups} == {"text_decoder", "vision_tower", "multi_modal_projector"}
    vision = [g for g in groups if g["module"] == "vision_tower" and g["layers"] == [1]]
    assert vision and vision[0]["parameters"]["t"] == pytest.approx(0.6)  # the module's gradient at layer 1 of 2
    assert describe_group(vision[0]).startswith("vision_tower: layer 1 (")


def test_default_module_is_a_slices_recipe(tmp_path):
    """A model of one stack has one module, `default` (mergekit's name): the same merge as `slices:`."""
    for seed in (1, 2):
        tiny_llama(seed=seed, num_hidden_layers=3).save_pretrained(tmp_path / f"m{seed}")
    slices = [{"sources": [{"model": str(tmp_path / "m1"), "layer_range": [0, 2]}]},
              {"sources": [{"model": str(tmp_path / "m2"), "layer_range": [1, 3]}]}]
    run_merge({"slices": slices, "merge_method": "passthrough"}, tmp_path / "a", progress=False, card=False)
    run_merge({"modules": {"default": {"slices": slices}}, "merge_method": "passthrough"}, tmp_path / "b",
              progress=False, card=False)
    assert (tmp_path / "a/model.safetensors").read_bytes() == (tmp_path / "b/model.safetensors").read_bytes()
    assert json.loads((tmp_path / "b/config.json").read_text())["num_hidden_layers"] == 4


def test_every_tensor_has_one_module():
    names = {"language_model.model.layers.0.mlp.up_proj.weight": "text_decoder",
             "language_model.lm_head.weight": "text_decoder", "model.language_model.norm.weight": "text_decoder",
             "vision_tower.transformer.layers.1.attention.q_proj.weight": "vision_tower",
             "multi_modal_projector.linear_1.weight": "multi_modal_projector"}
    modules = architecture_modules({"model_type": "mistral3"})
    assert {n: owner(n, modules) for n in names} == names
    qwen = architecture_modules({"model_type": "qwen2_vl"})  # no prefix of their own: the longest prefix wins
    assert [owner(n, qwen) for n in ("model.layers.0.mlp.up_proj.weight", "lm_head.weight", "visual.blocks.0.norm1.weight",
                                     "visual.merger.mlp.0.weight")] == \
        ["text_decoder", "text_decoder", "vision_tower", "multi_modal_projector"]
    assert architecture_modules({"model_type": "llama"}) == {"default": architecture_modules(None)["default"]}


def test_modules_as_mergekits_architecture_tables():
    """Each of mergekit's modular architectures is in the table with the same module names, and a layered
    module's pre-weights are named as before its layers, its post-weights as after them."""
    checked = 0
    for file, arch in mergekit_architectures():
        if arch.get("kind") != "modular":
            continue
        ours = ARCHITECTURES[arch["model_type"]] if arch["model_type"] in ARCHITECTURES else \
            ARCHITECTURES[{"qwen3_vl_dense.json": "qwen3_vl"}.get(file, file.removesuffix(".json"))]
        assert set(ours) == set(arch["modules"]), file
        for name, module in arch["modules"].items():
            if ours[name].layered and "override_num_layers" not in module["architecture"]:  # (else nothing
                assert_before_and_after(module["architecture"], f"{file} {name}")  # is before or after them)
                checked += 1
    assert checked >= 15


def bad(vlm, edit):
    recipe = per_module(vlm)
    edit(recipe)
    return recipe


BAD = {
    "unknown_module": (lambda r: r["modules"].update(text_encoder=r["modules"].pop("text_decoder")),
                       r"modules.text_encoder: .*m0 has no module 'text_encoder' \(its modules: text_decoder, "
                       r"vision_tower, multi_modal_projector\)"),
    "module_left_out": (lambda r: r["modules"].pop("vision_tower"),
                        r"modules: vision_tower of .*m0 is not in the recipe, so the output would lack its 20 tensors"),
    "slices_and_models": (lambda r: r["modules"]["vision_tower"].update(slices=[]),
                          r"modules.vision_tower: give 'slices' or 'models' \(one of them\)"),
    "misspelled_key": (lambda r: r["modules"]["vision_tower"].update(parameter={}),
                       r"modules.vision_tower: unknown key 'parameter'; did you mean 'parameters'"),
    "not_a_mapping": (lambda r: r.update(modules=[r["modules"]]), "modules must be a mapping of module names"),
    "with_models": (lambda r: r.update(models=[{"model": "x"}]),
                    "give one of 'models', 'slices' and 'modules', not models and modules"),
    "projector_sliced": (lambda r: r["modules"].update(multi_modal_projector={"slices": [
        {"sources": [{"model": r["base_model"], "layer_range": [0, 1]}]}]}),
        r"modules.multi_modal_projector.slices\[0\].sources\[0\]: layer_range \[0, 1\] is past the 0 layers"),
    "module_parameter": (lambda r: r["modules"]["vision_tower"]["parameters"].update(tt=1),
                         r"modules.vision_tower.parameters: 'slerp' has no parameter 'tt'; did you mean 't'"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_modules_are_one_line(vlm, tmp_path, case):
    edit, message = BAD[case]
    with pytest.raises(AdaptkitError, match=message) as info:
        run_merge(bad(vlm, edit), tmp_path / "out", progress=False)
    assert "\n" not in str(info.value) and not (tmp_path / "out").exists()


def test_plain_slices_of_a_modular_model_are_refused(vlm, tmp_path):
    recipe = {"slices": [{"sources": [{"model": str(vlm / "m0"), "layer_range": [0, 2]}]}],
              "merge_method": "passthrough"}
    with pytest.raises(AdaptkitError, match=r"is a mistral3 model of modules \(text_decoder, vision_tower, "
                                            r"multi_modal_projector\): slice it with `modules:`"):
        run_merge(recipe, tmp_path / "out", progress=False)


def test_models_of_a_module_with_other_layer_counts_are_refused(vlm, tmp_path):
    tiny_mistral3(5, text_layers=2).save_pretrained(tmp_path / "short")
    recipe = linear_with_base(vlm)
    recipe["modules"]["text_decoder"]["models"][1]["model"] = str(tmp_path / "short")
    with pytest.raises(AdaptkitError, match=r"modules.text_decoder: its sources have different numbers of layers"):
        run_merge(recipe, tmp_path / "out", progress=False)


def test_a_base_beside_two_models_is_refused_by_two_ended_methods(vlm, tmp_path):
    """slerp (and interpolate) merge two models: with a base that is neither, mergekit refuses (3 inputs);
    adaptkit used to interpolate the two and leave the base out."""
    recipe = {"models": [{"model": str(vlm / "m1")}, {"model": str(vlm / "m2")}], "merge_method": "slerp",
              "base_model": str(vlm / "m0"), "parameters": {"t": 0.5}}
    with pytest.raises(AdaptkitError, match="slerp: needs exactly 2 models, the base and 1 other; got the base and 2"):
        run_merge(recipe, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_token_indexed_tensors_include_mergekits():
    """Every tensor mergekit's architecture tables index by token (`vocabulary_axis`, module prefix
    included) is one the tokenizer settings align (phi-1's head, named after the layer count, aside)."""
    from adaptkit.merge.tokenizer import VOCABULARY_TENSORS

    marked = set()
    for _, arch in mergekit_architectures():
        modules = arch.get("modules", {}).values() if arch.get("kind") == "modular" else [{"architecture": arch}]
        for module in modules:
            prefix = (module.get("weight_prefix") or "").rstrip(".") + "." if module.get("weight_prefix") else ""
            info = module["architecture"]
            marked |= {prefix + w["name"] for w in info.get("pre_weights", []) + info.get("post_weights", [])
                       if w.get("vocabulary_axis") is not None and "${" not in w["name"]}
    assert len(marked) > 20 and marked <= VOCABULARY_TENSORS, sorted(marked - VOCABULARY_TENSORS)


def test_qwen2_vl_projector_mlp_sits_at_its_modules_last_layer():
    """mergekit's Qwen2-VL tables list the projector's MLP as layer weights without an index beside
    `override_num_layers: 2`: each layer's plan merges them and the last is written (t = 1); its norm is a
    pre-weight (t = 0). The vision blocks and text layers keep their own positions."""
    from adaptkit.merge.positions import layer_positions

    names = ["visual.merger.ln_q.weight", "visual.merger.mlp.0.weight", "visual.merger.mlp.2.bias",
             "visual.blocks.0.attn.qkv.weight", "visual.blocks.1.attn.qkv.weight", "model.layers.0.mlp.up_proj.weight",
             "model.layers.3.mlp.up_proj.weight"]
    config = {"model_type": "qwen2_5_vl", "vision_config": {"depth": 2}, "text_config": {"num_hidden_layers": 4}}
    assert layer_positions(names, config) == {
        "visual.merger.ln_q.weight": 0.0, "visual.merger.mlp.0.weight": 1.0, "visual.merger.mlp.2.bias": 1.0,
        "visual.blocks.0.attn.qkv.weight": 0.0, "visual.blocks.1.attn.qkv.weight": 1.0,
        "model.layers.0.mlp.up_proj.weight": 0.0, "model.layers.3.mlp.up_proj.weight": 1.0}
