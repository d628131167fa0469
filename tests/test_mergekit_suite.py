"""mergekit's own recipes that adaptkit already runs with mergekit's numbers stay that way.

The recipes, the local models standing in for their Hub names and the comparison are
benchmarks/mergekit_suite.py's (see its docstring for the statuses); this file runs the subset in
MUST_PASS through mergekit 0.1.5 and adaptkit and wants the status written there: "equal" is every tensor
byte-identical to mergekit's, "close" (random methods only) the same tensors with mergekit's keep
fraction and norm. The recipes that do not pass yet are not here: `benchmarks/mergekit_suite.py`
lists them with what goes wrong. Only fast ones are here (the 40-layer examples and the MoE configs,
which build eight more models, run in the benchmark): one or more per method, slices, tokenizer and
chat-template work, a multi-stage recipe and a Llava.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import mergekit_suite as suite  # noqa: E402  (benchmarks/ is not a package)

BASIC = "tests/test_basic_merges.py::"
MUST_PASS = {
    "examples/bio-merge.yml": "equal",
    "docs/multimerge.md#0": "close",
    BASIC + "test_linear_merge": "equal",
    BASIC + "test_granite_slerp": "equal",
    BASIC + "test_slerp_merge": "equal",
    BASIC + "test_passthrough_scale": "equal",
    BASIC + "test_gpt2_stack": "equal",
    BASIC + "test_nuslerp_merges[base=None,row_wise=True,flatten=False]": "equal",
    BASIC + "test_nuslerp_merges[base=model_c,row_wise=False,flatten=False]": "equal",
    BASIC + "test_nuslerp_merges[weights_sum_to_zero]": "equal",
    BASIC + "test_task_arithmetic_merge": "equal",
    BASIC + "test_breadcrumbs_merge": "equal",
    BASIC + "test_ties_merge": "equal",
    BASIC + "test_sce_merge": "equal",
    BASIC + "test_ram_merge": "equal",
    BASIC + "test_multislerp_merge": "equal",
    BASIC + "test_model_stock_filterwise_merge": "equal",
    BASIC + "test_nearswap_merge": "equal",
    BASIC + "test_dare_ties_merge": "close",
    BASIC + "test_della_merge": "close",
    BASIC + "test_karcher_merge": "equal",
    BASIC + "test_linear_VLM_merge": "equal",
    "tests/test_tokenizer.py::test_source_union": "equal",
    "tests/test_tokenizer.py::test_slerp_union": "equal",
    "tests/test_tokenizer.py::test_force_token": "equal",
    "tests/test_tokenizer.py::test_model_token_id": "equal",
    "tests/test_tokenizer.py::test_pad_to_multiple_of": "equal",
    "tests/test_chat_template.py::test_template_literal_jinja": "equal",
    "tests/test_chat_template.py::test_template_chatml": "equal",  # (written otherwise, renders alike)
}


# published recipes (benchmarks/wild_recipes.yml), quick ones: a LoRA merged in (`model+lora`), top-level
# `normalize` (ignored as mergekit ignores it), a frankenmerge, Gemma-2 and Qwen2 stand-ins, per-filter weights
WILD_MUST_PASS = {
    "hub:unknown/merge@70080610395": "equal",
    "hub:Retreatcost/VerbaMaxima-12B#2": "equal",
    "hub:Undi95/Mistral-11B-v0.1": "equal",
    "hub:unknown/gemma2-9b-ties-merge@61680058542": "equal",
    "github:unknown/jekyll-blog/_posts (Merging Intelligence: Combining Qwen and DeepSeek with SLERP, 2025-09-20; "
    "model Cruz-reasoning-7b-v1)": "equal",
    "hub:redrix/AngelSlayer-12B-Unslop-Mell-RPMax-DARKNESS-v3": "close",
}


# one set of recipe shapes on twenty-six architectures (benchmarks/arch_recipes.yml), some of each: tied embeddings and
# q/k norms (Qwen3), fused projections (Phi-3, Falcon), Gemma-3's four norms, OLMo-2's post-norms, StarCoder2's
# biases, Gemma-3's and Qwen2.5-VL's modules, and a Mixtral's and a Qwen3-MoE's experts, which mergekit 0.1.5
# merges in transformers 5's fused layout, as adaptkit does then (adaptkit/merge/converted.py)
ARCH_MUST_PASS = {
    "qwen3/ties": "equal",
    "qwen3/slerp_gradient": "equal",
    "phi3/slerp_gradient": "equal",
    "gemma3/ties": "equal",
    "olmo2/passthrough": "equal",
    "starcoder2/slerp_gradient": "equal",
    "falcon/ties": "equal",
    "mixtral/linear": "equal",
    "mixtral/passthrough": "equal",
    "mixtral/slerp_gradient": "equal",
    "mixtral/ties": "equal",
    "qwen3_moe/ties": "equal",
    "qwen2_5_vl/ties": "equal",  # (the projector MLP at its module's last layer, as mergekit's table places it)
    "qwen2_5_vl/modules_slerp": "equal",
    "gemma3_vl/modules_slerp": "equal",
    "glm4_moe/ties": "equal",
    "mixtral/moe_model_stock": "equal",
    "qwen3_moe/moe_karcher": "equal",
    "mixtral/moe_dare_ties": "close",  # (routed experts stacked, the shared expert and the router's correction bias not)
    "lfm2/ties": "equal",
    "mamba/slerp_gradient": "equal",
    "gte/slerp_gradient": "equal",  # (q, k, v split from the stored qkv_proj and merged one by one, as mergekit)
    "gte/passthrough": "mergekit-failed",  # (mergekit's config.json keeps 4 layers of the 6 it writes)
    "qwen3_vl/modules_slerp": "equal",  # (three deepstack mergers in the projector module)
    "t5/t5_modules": "equal",  # an encoder-decoder: encoder sliced, decoder and shared embeddings merged
    "whisper/encoder_decoder_modules": "mergekit-failed",  # (its table names model.decoderembed_tokens.weight)
}


@pytest.fixture(scope="module")
def loaded():
    return suite.load_suite()


@pytest.fixture(scope="module")
def wild():
    return suite.load_suite(suite.ROOT / "wild_recipes.yml")


@pytest.fixture(scope="module")
def arch():
    return suite.load_suite(suite.ROOT / "arch_recipes.yml")


@pytest.fixture(scope="module")
def wild_models(tmp_path_factory):
    """One folder for the published recipes' stand-ins: a model two recipes share is built once."""
    return tmp_path_factory.mktemp("wild-models")


@pytest.fixture(scope="module")
def paths(loaded, tmp_path_factory, one_thread):
    models, hub, recipes, _ = loaded
    wanted = [r for r in recipes if r.id in MUST_PASS or r.expect == "refused"]
    return suite.ensure_models(set().union(*(suite.model_names(r, models, hub) for r in wanted)), models,
                               tmp_path_factory.mktemp("mergekit-suite-models"))


@pytest.mark.parametrize("recipe_id", sorted(MUST_PASS))
def test_recipe_gives_mergekits_numbers(recipe_id, loaded, paths, tmp_path):
    _, hub, recipes, _ = loaded
    (recipe,) = [r for r in recipes if r.id == recipe_id]
    row = suite.run_one(recipe, hub, paths, tmp_path)
    assert row["status"] == MUST_PASS[recipe_id], row["detail"]


def test_what_mergekit_refuses_adaptkit_refuses(loaded, paths, tmp_path):
    """The recipes mergekit's tests expect an error from (della with density + epsilon > 1) must not run."""
    _, hub, recipes, _ = loaded
    refused = [r for r in recipes if r.expect == "refused"]
    assert refused
    for recipe in refused:
        row = suite.run_one(recipe, hub, paths, tmp_path)
        assert row["status"] == "mergekit-failed" and "adaptkit refused" in row["detail"], row["detail"]


@pytest.mark.parametrize("collection, recipe_id", [("published", r) for r in sorted(WILD_MUST_PASS)]
                         + [("architectures", r) for r in sorted(ARCH_MUST_PASS)])
def test_collected_recipe_gives_mergekits_numbers(collection, recipe_id, wild, arch, wild_models, tmp_path, one_thread):
    """A published recipe (wild_recipes.yml) or an architecture's (arch_recipes.yml); their stand-ins share a folder."""
    (models, hub, recipes, _), want = {"published": (wild, WILD_MUST_PASS), "architectures": (arch, ARCH_MUST_PASS)}[
        collection]
    (recipe,) = [r for r in recipes if r.id == recipe_id]
    paths = suite.ensure_models(suite.model_names(recipe, models, hub), models, wild_models)
    row = suite.run_one(recipe, hub, paths, tmp_path)
    assert row["status"] == want[recipe_id], row["detail"]


@pytest.mark.parametrize("which", ["mergekit's", "published", "architectures"])
def test_every_model_name_resolves(which, loaded, wild, arch):
    """A Hub name missing from the table would reach both tools unchanged and fail offline as 'not found',
    counted against the wrong thing; every model reference (each side of `model+lora`) must be a local
    model or an earlier stage, except the published recipes' misspelled stage folders."""
    models, hub, recipes, _ = {"mergekit's": loaded, "published": wild, "architectures": arch}[which]
    assert len({r.id for r in recipes}) == len(recipes)
    for recipe in recipes:
        stages = {d.get("name") for d in recipe.docs}
        for doc in recipe.docs:
            parts = [doc] + [m for m in doc.get("modules", {}).values()]
            refs = [doc.get("base_model")] + [m.get("model") for m in doc.get("models", [])]
            refs += [s.get("model") for p in parts for sl in p.get("slices", []) for s in sl["sources"]]
            refs += [e["source_model"] for e in doc.get("experts", [])]
            for ref in filter(None, refs):
                if ref.startswith("./intermediates/"):
                    continue  # (mergekit-multi's folder of a stage: both tools refuse it as a model)
                assert all(hub.get(p, p) in models for p in suite._parts(ref)) or ref in stages, (recipe.id, ref)


def _next_bf16(x):
    import torch

    return (x.view(torch.int16) + 1).view(torch.bfloat16)  # the next representable value (same sign)


@pytest.mark.parametrize("move, status", [(lambda x: x, "equal"), (_next_bf16, "close"), (lambda x: x + 0.5, "different")],
                         ids=["untouched", "one-bf16-step", "large"])
def test_compare_sees_a_changed_entry(move, status, loaded, paths, tmp_path):
    """The comparison itself: mergekit's output (bfloat16) against a copy with one entry moved."""
    import shutil

    from safetensors.torch import load_file, save_file

    _, hub, recipes, _ = loaded
    (recipe,) = [r for r in recipes if r.id == BASIC + "test_linear_merge"]
    path = tmp_path / "recipe.yml"
    path.write_text(suite.localize(recipe, hub, paths))
    suite.run_mergekit(recipe, path, tmp_path / "mergekit")
    shutil.copytree(tmp_path / "mergekit", tmp_path / "copy")
    (file,) = (tmp_path / "copy").glob("*.safetensors")
    tensors = load_file(file)
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name] = tensors[name].clone()
    tensors[name][0, :1] = move(tensors[name][0, :1])
    save_file(tensors, file, metadata={"format": "pt"})
    got, detail = suite.compare(recipe, tmp_path / "copy", tmp_path / "mergekit", None)
    assert got == status, detail
    if status != "equal":
        assert name in detail
