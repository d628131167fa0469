"""The merge engine end to end: against mergekit (models) and PEFT (base + adapters), determinism,
recipes, and bad input."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from adaptkit.errors import AdaptkitError
from adaptkit.merge.engine import layer_positions, run_merge
from adaptkit.merge.positions import evaluate
from builders import llama_finetunes, mergekit_merge, state, tiny_gpt2, tiny_llama


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A base and three fine-tunes of a tiny Llama (float32)."""
    return llama_finetunes(tmp_path_factory.mktemp("models"))


def recipe_for(models, method, params, global_params=None, base=True, n=3):
    recipe = {"merge_method": method, "dtype": "float32",
              "models": [{"model": str(models / f"ft{i}"), "parameters": p} for i, p in zip(range(1, n + 1), params)]}
    if base:
        recipe["base_model"] = str(models / "base")
    if global_params:
        recipe["parameters"] = global_params
    return recipe


CASES = {
    "linear": ("linear", [{"weight": 0.2}, {"weight": 0.3}, {"weight": [0.1, 0.9]}], None, False),
    # mergekit makes a base that linear has no use for one more input, with the global parameters.
    "linear_with_base": ("linear", [{"weight": 0.2}, {"weight": 0.3}, {"weight": 0.5}], {"weight": 0.4}, True),
    "task_arithmetic": ("task_arithmetic", [{"weight": 0.5}, {"weight": -0.3}, {"weight": 0.8}], {"lambda": 0.9}, True),
    "ties": ("ties", [{"weight": 0.4, "density": 0.5}, {"weight": 0.3, "density": [0.2, 0.9]},
                      {"weight": [{"filter": "mlp", "value": 0.7}, {"value": 0.2}], "density": 0.7}], None, True),
    "breadcrumbs": ("breadcrumbs", [{"weight": 0.5, "density": 0.8, "gamma": 0.05}] * 3, None, True),
    "model_stock": ("model_stock", [{}, {}, {}], None, True),
}


@pytest.mark.parametrize("case", CASES)
def test_models_merge_equals_mergekit(models, tmp_path, case):
    method, params, global_params, base = CASES[case]
    recipe = recipe_for(models, method, params, global_params, base)
    ours = run_merge(recipe, tmp_path / "ours", progress=False)
    assert ours["tensors"] == len(state(models / "base"))
    expected = mergekit_merge(recipe, tmp_path / "mk")
    got = state(tmp_path / "ours")
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_slerp_equals_mergekit(models, tmp_path):
    recipe = {"merge_method": "slerp", "base_model": str(models / "ft1"), "dtype": "float32",
              "models": [{"model": str(models / "ft1")}, {"model": str(models / "ft2")}],
              "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"value": 0.3}]}}
    run_merge(recipe, tmp_path / "ours", progress=False)
    expected, got = mergekit_merge(recipe, tmp_path / "mk"), state(tmp_path / "ours")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_gradient_rule_matches_mergekit():
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(4)] + ["model.embed_tokens.weight", "lm_head.weight"]
    t = layer_positions(names, {"num_hidden_layers": 4})
    assert [t[n] for n in names] == [0, 1 / 3, 2 / 3, 1, 0, 0]
    assert evaluate([0.0, 1.0, 0.5], names[1], t[names[1]]) == pytest.approx(2 / 3)
    assert evaluate([{"filter": "mlp", "value": [0, 1]}, {"value": 7}], names[3], 1.0) == 1
    assert evaluate([{"filter": "attn", "value": 3}, {"value": 7}], names[3], 1.0) == 7


def test_bf16_inputs_computed_in_float32_rounded_once(models, tmp_path):
    recipe = recipe_for(models, "linear", [{"weight": 1 / 3}] * 3, base=False)
    # `dtype` alone would round the float32 inputs to bfloat16 first, as mergekit loads them
    recipe.update(dtype="bfloat16", compute_dtype="float32")
    run_merge(recipe, tmp_path / "out", progress=False)
    got = state(tmp_path / "out")
    inputs = [state(models / f"ft{i}") for i in (1, 2, 3)]
    for name, tensor in got.items():
        expected = sum(x[name].float() / 3 for x in inputs)  # the float32 formula
        assert tensor.dtype == torch.bfloat16
        # One rounding of the float32 result: within half a bf16 ulp (2^-9 relative), plus float32
        # summation-order noise where the inputs cancel.
        torch.testing.assert_close(tensor.float(), expected, rtol=2**-8, atol=1e-7, msg=name)


def test_a_tensor_that_takes_the_whole_budget_first_frees_the_heap(models, tmp_path, monkeypatch):
    """A tensor whose working memory is the whole budget runs alone; it first hands the heap's free
    memory back (allocator.release), so the other worker's freed memory does not add to its peak, and
    runs on all of torch's threads (two workers share them otherwise). Smaller tensors do not pay for
    the trim. The bytes are those of a run without it, and torch's thread count is restored after."""
    from adaptkit import allocator
    from adaptkit.merge import engine

    before, threads, real_set, seen = torch.get_num_threads(), 4, torch.set_num_threads, []
    real_set(threads)

    recipe = recipe_for(models, "ties", [{"weight": 0.5, "density": 0.5}] * 3)
    run_merge(recipe, tmp_path / "plain", threads=2, progress=False)
    from adaptkit.merge.recipe import load_recipe

    plan = engine.Plan(load_recipe(recipe))
    sizes = sorted(plan.working_bytes(torch.Size(s).numel()) for _, _, s in plan.layout)
    monkeypatch.setattr(engine, "WORKING_MEMORY", sizes[-1])  # only the largest tensors take it all
    calls = []
    monkeypatch.setattr(allocator, "release", lambda: calls.append(1))
    monkeypatch.setattr(torch, "set_num_threads", lambda n: seen.append(n) or real_set(n))
    try:
        run_merge(recipe, tmp_path / "trimmed", threads=2, progress=False)
        assert torch.get_num_threads() == threads
    finally:
        real_set(before)
    assert len(calls) == sizes.count(sizes[-1]) > 0
    assert (tmp_path / "trimmed" / "model.safetensors").read_bytes() == (tmp_path / "plain" / "model.safetensors").read_bytes()
    assert seen.count(threads) == len(calls) + 1 and set(seen) == {threads, threads // 2}  # (+ 1: the restore)


def test_block_operators_count_what_they_hold(models):
    """A `block_upcast` operator's working memory is its inputs counted as float32 plus what it says it
    holds (`entry_bytes`), written out here for a 32000 × 1024 embedding (recipe dtype float32, 3 inputs
    and a base): DARE holds the result (4 B an entry) and its masks as bits; TIES with mergekit's tie order
    also follows the sort of a whole |τ| (4 B of float32 bits, a byte for the followed ties and 2 for the C
    walk's numbers), with
    `tie_break: index` the places of the ties kept at its cut (a byte); SCE at most
    a bool mask, the mask in the dtype and one input's float32 squares (the variances and a byte for the
    selection and its followed ties come before, and hold less); an operator without the hook (karcher,
    three inputs and no base) keeps the engine's float32 estimate, which makes that tensor take the whole
    budget and run alone, while the others merge beside smaller tensors."""
    from adaptkit.merge import engine
    from adaptkit.merge.recipe import load_recipe

    n = 32000 * 1024
    params = [{"weight": 0.5, "density": 0.5}] * 3
    need = {name: engine.Plan(load_recipe(recipe_for(models, method, params if method in ("dare_ties", "ties")
                                                     else [{}] * 3, extra, base))).working_bytes(n)
            for name, method, extra, base in [("dare", "dare_ties", None, True), ("ties", "ties", None, True),
                                              ("ties-index", "ties", {"tie_break": "index"}, True),
                                              ("sce", "sce", {"select_topk": 0.5}, True),
                                              ("karcher", "karcher", None, False)]}
    inputs_as_float32, result_and_bits = 4 * 4, 4 + 3 // 8 + 1
    assert need["dare"] == need["ties-index"] - n == n * (inputs_as_float32 + result_and_bits)
    assert need["ties"] == n * (inputs_as_float32 + result_and_bits + 4 + 1 + 2)
    assert need["sce"] == n * (inputs_as_float32 + 1 + 4 + 4)
    assert need["karcher"] == n * (4 * (3 + 2) + 4 * 3 + 8)
    assert need["dare"] < need["sce"] < need["ties"] < engine.WORKING_MEMORY <= need["karcher"]


def test_dare_is_deterministic_across_reruns_and_threads(models, tmp_path):
    recipe = recipe_for(models, "dare_ties", [{"weight": 0.5, "density": 0.5}] * 3)
    run_merge(recipe, tmp_path / "a", threads=1, seed=7, progress=False)
    run_merge(recipe, tmp_path / "b", threads=2, seed=7, progress=False)
    run_merge(recipe, tmp_path / "c", threads=2, seed=8, progress=False)
    a, b, c = ((tmp_path / x / "model.safetensors").read_bytes() for x in "abc")
    assert a == b and a != c


# -- mode 2: base + adapters -> model, against PEFT's merge_and_unload ------------------------------

def peft_adapter(model, out, **config):
    from peft import LoraConfig, get_peft_model

    get_peft_model(model, LoraConfig(init_lora_weights=False, **config)).save_pretrained(out)
    return out


def peft_merged(model, adapter_dir):
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter_dir).merge_and_unload().state_dict()


ADAPTERS = {
    "lora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "rslora_patterns": dict(r=8, lora_alpha=16, use_rslora=True, target_modules="all-linear",
                            rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3}),
    "embedding_modules_to_save": dict(r=4, lora_alpha=4, target_modules=["embed_tokens", "q_proj"],
                                      modules_to_save=["lm_head"]),
    "dora": dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "o_proj"]),
    "dora_embedding": dict(r=4, lora_alpha=8, use_dora=True, target_modules=["embed_tokens", "q_proj"]),
}


@pytest.mark.parametrize("case", ADAPTERS)
def test_base_plus_adapter_equals_peft_merge_and_unload(llama_dir, tmp_path, case):
    torch.manual_seed(1)
    adapter = peft_adapter(tiny_llama(), tmp_path / "adapter", **ADAPTERS[case])
    if case == "embedding_modules_to_save":  # make the saved lm_head differ from the base
        tensors = load_file(adapter / "adapter_model.safetensors")
        tensors["base_model.model.lm_head.weight"] += 1.0
        save_file(tensors, adapter / "adapter_model.safetensors")
    run_merge({"merge_method": "task_arithmetic", "base_model": str(llama_dir),
               "models": [{"model": str(adapter), "parameters": {"weight": 1.0}}]}, tmp_path / "out", progress=False)
    expected, got = peft_merged(tiny_llama(), adapter), state(tmp_path / "out")
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_gpt2_fan_in_fan_out_equals_peft(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path / "base")
    adapter = peft_adapter(tiny_gpt2(), tmp_path / "adapter", r=4, lora_alpha=8, fan_in_fan_out=True,
                           target_modules=["c_attn", "c_proj"])
    run_merge({"merge_method": "task_arithmetic", "base_model": str(tmp_path / "base"),
               "models": [{"model": str(adapter), "parameters": {"weight": 1.0}}]}, tmp_path / "out", progress=False)
    expected, got = peft_merged(tiny_gpt2(), adapter), state(tmp_path / "out")
    for name, tensor in expected.items():
        if name in got:
            torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_weighted_adapters_and_plus_reference(llama_dir, tmp_path):
    a = peft_adapter(tiny_llama(), tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj"])
    b = peft_adapter(tiny_llama(seed=3), tmp_path / "b", r=2, lora_alpha=2, target_modules=["q_proj", "k_proj"])
    run_merge({"merge_method": "task_arithmetic", "base_model": str(llama_dir),
               "models": [{"model": str(a), "parameters": {"weight": 0.5}},
                          {"model": str(b), "parameters": {"weight": -1.0}}]}, tmp_path / "out", progress=False)
    # `base+adapter` references give the same thing as bare adapters with a base.
    run_merge({"merge_method": "task_arithmetic", "base_model": str(llama_dir),
               "models": [{"model": f"{llama_dir}+{a}", "parameters": {"weight": 0.5}},
                          {"model": f"{llama_dir}+{b}", "parameters": {"weight": -1.0}}]}, tmp_path / "plus", progress=False)
    base, pa, pb = state(llama_dir), peft_merged(tiny_llama(), a), peft_merged(tiny_llama(), b)
    got, plus = state(tmp_path / "out"), state(tmp_path / "plus")
    for name in base:
        expected = base[name] + 0.5 * (pa[name] - base[name]) - (pb[name] - base[name])
        torch.testing.assert_close(got[name], expected, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(plus[name], got[name], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_plus_reference_like_mergekit(tmp_path, dtype):
    """A `base+lora` model reference is the base with the LoRA merged in, stored as the base is: ΔW added in
    float32 and rounded once to bf16 (mergekit's default: its LoRA merge saves that model, which it then
    loads in `dtype`), mergekit's bytes for a bf16 and a float32 recipe. With `compute_dtype` the sum is
    rounded to the compute dtype alone: mergekit's bytes under --lora-merge-dtype float32."""
    from peft import LoraConfig, get_peft_model

    tiny_llama(seed=1).to(torch.bfloat16).save_pretrained(tmp_path / "base")
    torch.manual_seed(3)
    lora = get_peft_model(tiny_llama(seed=1).to(torch.bfloat16), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "lora")
    recipe = {"merge_method": "linear", "dtype": dtype,
              "models": [{"model": f"{tmp_path / 'base'}+{tmp_path / 'lora'}", "parameters": {"weight": 1.0}}]}
    run_merge(recipe, tmp_path / "ours", progress=False, card=False)
    run_merge(dict(recipe, compute_dtype=dtype), tmp_path / "ours-exact", progress=False, card=False)
    got, got_exact = state(tmp_path / "ours"), state(tmp_path / "ours-exact")
    default = mergekit_merge(recipe, tmp_path / "mk", lora_merge_cache=str(tmp_path / "c"))
    exact = mergekit_merge(recipe, tmp_path / "mk32", lora_merge_cache=str(tmp_path / "c32"), lora_merge_dtype="float32")
    assert sorted(got) == sorted(got_exact) == sorted(default) == sorted(exact)
    changed = [n for n in got if "q_proj" in n or "v_proj" in n]
    assert len(changed) == 4 and all(got[n].dtype == default[n].dtype == getattr(torch, dtype) for n in got)
    assert all(torch.equal(got[n], default[n]) and torch.equal(got_exact[n], exact[n]) for n in got)
    peft_merged = lora.merge_and_unload().state_dict()  # (PEFT's merge of the bf16 model: the same rounding)
    assert all(torch.equal(got[n], peft_merged[n].to(got[n].dtype)) for n in changed)
    if dtype == "float32":  # the exact sum: within a bf16 rounding of the stored one, and not all equal to it
        for n in changed:
            torch.testing.assert_close(got_exact[n], got[n], rtol=2 ** -8, atol=0)
        assert not all(torch.equal(got_exact[n], got[n]) for n in changed)


# -- recipes and the CLI ------------------------------------------------------------------------------

def test_cli_recipe_and_quick_form(models, tmp_path):
    from click.testing import CliRunner

    from adaptkit.cli import cli

    recipe = recipe_for(models, "ties", [{"weight": 0.5, "density": 0.5}] * 3)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    runner = CliRunner()
    r1 = runner.invoke(cli, ["--quiet", "merge", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "o1"), "--json"])
    assert r1.exit_code == 0, r1.output
    assert json.loads(r1.output)["method"] == "ties"
    quick = ["--quiet", "merge", "--method", "ties", "--base", str(models / "base"), "--set", "density=0.5",
             *[arg for i in (1, 2, 3) for arg in ("-m", f"{models / f'ft{i}'}:0.5")], "-o", str(tmp_path / "o2")]
    assert runner.invoke(cli, quick).exit_code == 0
    assert (tmp_path / "o1/model.safetensors").read_bytes() == (tmp_path / "o2/model.safetensors").read_bytes()
    dry = runner.invoke(cli, ["merge", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "o3"), "--dry-run", "--json"])
    assert json.loads(dry.output)["tensors"] == len(state(models / "base")) and not (tmp_path / "o3").exists()
    assert (tmp_path / "o1" / "config.json").is_file()


@pytest.mark.parametrize("change, message", [
    ({"merge_methd": "ties"}, "unknown key 'merge_methd'; did you mean 'merge_method'"),
    ({"merge_method": "tie"}, r"unknown merge method 'tie' \(methods: .*\bties\b"),
    ({"parameters": {"desnity": 0.5}}, "'ties' has no parameter 'desnity'; did you mean 'density'"),
])
def test_recipe_errors_name_the_nearest(models, tmp_path, change, message):
    recipe = recipe_for(models, "ties", [{"weight": 0.5}] * 3)
    if "merge_methd" in change:
        recipe.pop("merge_method")
    recipe.update(change)
    with pytest.raises(AdaptkitError, match=message):
        run_merge(recipe, tmp_path / "out", progress=False)


# -- bad input ------------------------------------------------------------------------------------------

def edited_copy(src, dst, edit):
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_shape_mismatch(models, tmp_path):
    bad = edited_copy(models / "ft2", tmp_path / "bad", lambda t: t.update({"lm_head.weight": torch.zeros(3, 3)}))
    recipe = recipe_for(models, "linear", [{"weight": 1}] * 2, base=False, n=2)
    recipe["models"][1]["model"] = str(bad)
    with pytest.raises(AdaptkitError, match=r"'lm_head.weight' has shape \(3, 3\) in .*bad but \(128, 32\) in \S+ft1$"):
        run_merge(recipe, tmp_path / "out", progress=False)


def test_vocabulary_mismatch_says_how_to_align(models, tmp_path):
    """Token rows that differ in number only: the error names the tokenizer settings that align them."""
    bad = edited_copy(models / "ft2", tmp_path / "bad", lambda t: t.update({"lm_head.weight": torch.zeros(130, 32)}))
    recipe = recipe_for(models, "linear", [{"weight": 1}] * 2, base=False, n=2)
    recipe["models"][1]["model"] = str(bad)
    with pytest.raises(AdaptkitError, match=r"has shape \(130, 32\) in .*bad but \(128, 32\) in .* \(the vocabularies "
                                            r"differ: `tokenizer_source: union`, `base` or `model:<path>` aligns rows"):
        run_merge(recipe, tmp_path / "out", progress=False)


def test_missing_tensor(models, tmp_path):
    bad = edited_copy(models / "ft2", tmp_path / "bad", lambda t: t.pop("lm_head.weight"))
    recipe = recipe_for(models, "linear", [{"weight": 1}] * 2, base=False, n=2)
    recipe["models"][1]["model"] = str(bad)
    with pytest.raises(AdaptkitError, match="tensor 'lm_head.weight' of .* is missing from .*bad"):
        run_merge(recipe, tmp_path / "out", progress=False)


def test_different_architectures(models, tmp_path):
    tiny_gpt2().save_pretrained(tmp_path / "gpt2")
    recipe = recipe_for(models, "linear", [{"weight": 1}] * 2, base=False, n=2)
    recipe["models"][1]["model"] = str(tmp_path / "gpt2")
    with pytest.raises(AdaptkitError, match="different architectures: .* is llama, .* is gpt2"):
        run_merge(recipe, tmp_path / "out", progress=False)


def test_unsafe_truncate_embeddings(models, tmp_path):
    """--unsafe-truncate-embeddings: each input's first 128 token rows, mergekit's bytes; config.json's
    vocab_size says 128 (mergekit's keeps a donor's 130: that output does not load), and transformers
    loads the output. Tensors that would be cut to different counts, and tokenizer settings, are said."""
    from transformers import AutoModelForCausalLM

    from hostile import run_cli

    tiny_llama(seed=2, vocab_size=130).save_pretrained(tmp_path / "v130")
    recipe = recipe_for(models, "linear", [{"weight": 1}] * 2, base=False, n=2)
    recipe["models"][0]["model"] = str(tmp_path / "v130")
    recipe["dtype"] = "bfloat16"
    with pytest.warns(UserWarning, match=r"token rows cut to the first 128 \(the inputs have 128, 130; "):
        run_merge(recipe, tmp_path / "ours", progress=False, unsafe_truncate_embeddings=True)
    expected, got = mergekit_merge(recipe, tmp_path / "mk", unsafe_truncate_embeddings=True), state(tmp_path / "ours")
    assert sorted(got) == sorted(expected) and got["lm_head.weight"].shape[0] == 128
    assert all(torch.equal(got[n], expected[n]) for n in expected)
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["vocab_size"] == 128
    AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    (tmp_path / "r.yml").write_text(yaml.safe_dump(recipe))
    result = run_cli("merge", tmp_path / "r.yml", "-o", tmp_path / "cli", "--unsafe-truncate-embeddings")
    assert result.exit_code == 0 and all(torch.equal(t, got[n]) for n, t in state(tmp_path / "cli").items())
    odd = edited_copy(models / "ft2", tmp_path / "odd", lambda t: t.update({"lm_head.weight": torch.zeros(120, 32)}))
    recipe["models"][1]["model"] = str(odd)
    with pytest.raises(AdaptkitError, match=r"would be cut to different row counts \(lm_head.weight: 120, "
                                            r"model.embed_tokens.weight: 128\)"):
        run_merge(recipe, tmp_path / "odd-out", progress=False, unsafe_truncate_embeddings=True)


def test_mixed_architectures(tmp_path):
    """A Llama and a Mistral of one shape: refused (as mergekit refuses without --allow-crimes), and with
    --allow-mixed-architectures merged by tensor name with mergekit's --allow-crimes bytes; config.json is
    the first model's; a warning says so."""
    from transformers import MistralConfig, MistralForCausalLM

    from builders import tiny_llama_config
    from hostile import run_cli

    tiny_llama(seed=1).save_pretrained(tmp_path / "llama")
    torch.manual_seed(2)
    MistralForCausalLM(MistralConfig(**tiny_llama_config().to_diff_dict() | {"model_type": "mistral"})).save_pretrained(
        tmp_path / "mistral")
    recipe = {"merge_method": "linear", "dtype": "bfloat16",
              "models": [{"model": str(tmp_path / n), "parameters": {"weight": w}} for n, w in (("llama", 0.3), ("mistral", 0.7))]}
    with pytest.raises(AdaptkitError, match=r"different architectures: .*llama is llama, .*mistral is mistral "
                                            r"\(--allow-mixed-architectures merges them"):
        run_merge(recipe, tmp_path / "refused", progress=False)
    with pytest.raises(RuntimeError, match="allow-crimes"):
        mergekit_merge(recipe, tmp_path / "mk-refused")
    with pytest.warns(UserWarning, match="different architectures: .*: merged by tensor name and shape"):
        run_merge(recipe, tmp_path / "ours", progress=False, allow_mixed_architectures=True)
    expected, got = mergekit_merge(recipe, tmp_path / "mk", allow_crimes=True), state(tmp_path / "ours")
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(got[n], expected[n]) for n in expected)
    configs = [json.loads((tmp_path / d / "config.json").read_text()) for d in ("ours", "mk")]
    # mergekit takes the base's, else the first of a set of models: either one, by the process's hash seed
    assert configs[0]["model_type"] == "llama" and configs[1]["model_type"] in ("llama", "mistral")
    recipe_file = tmp_path / "r.yml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    for flag, extra in (("--allow-mixed-architectures", ["--dry-run"]), ("--allow-crimes", [])):  # (mergekit's name too)
        result = run_cli("merge", recipe_file, "-o", tmp_path / "cli", flag, *extra)
        assert result.exit_code == 0, result.output
    assert all(torch.equal(t, got[n]) for n, t in state(tmp_path / "cli").items())


def test_adapter_for_a_different_base(models, tmp_path):
    adapter = peft_adapter(tiny_llama(hidden_size=48), tmp_path / "wide", r=2, lora_alpha=2, target_modules=["q_proj"])
    with pytest.raises(AdaptkitError, match=r"q_proj' gives ΔW of shape \(48, 48\) but .* has \(32, 32\): wrong base"):
        run_merge({"merge_method": "task_arithmetic", "base_model": str(models / "base"),
                   "models": [{"model": str(adapter), "parameters": {"weight": 1}}]}, tmp_path / "out", progress=False)
    gpt = peft_adapter(tiny_gpt2(), tmp_path / "gpt", r=2, lora_alpha=2, target_modules=["c_attn"])
    with pytest.raises(AdaptkitError, match="targets 'transformer.h.0.attn.c_attn', which .* does not have"):
        run_merge({"merge_method": "task_arithmetic", "base_model": str(models / "base"),
                   "models": [{"model": str(gpt), "parameters": {"weight": 1}}]}, tmp_path / "out", progress=False)


def test_a_base_saved_without_the_adapters_prefix_is_named(models, tmp_path):
    """A component saved on its own (here the Llama body without `model.`, as a diffusers UNet folder
    lacks `unet.`): the error says which prefix is missing instead of blaming another base."""
    from safetensors.torch import load_file, save_file

    body = tmp_path / "body"
    body.mkdir()
    weights = load_file(models / "base" / "model.safetensors")
    save_file({k.removeprefix("model."): v for k, v in weights.items() if k.startswith("model.")},
              body / "model.safetensors")
    adapter = peft_adapter(tiny_llama(), tmp_path / "a", r=2, lora_alpha=2, target_modules=["q_proj"])
    with pytest.raises(AdaptkitError, match=r"targets 'model\.layers\.0\.self_attn\.q_proj', which .* does not have: "
                                            r"it has 'layers\.0\.self_attn\.q_proj', without the prefix 'model\.'") as e:
        run_merge({"merge_method": "task_arithmetic", "base_model": str(body),
                   "models": [{"model": str(adapter), "parameters": {"weight": 1}}]}, tmp_path / "out", progress=False)
    assert "different base" not in str(e.value)


@pytest.mark.parametrize(("given", "text"), [
    ("org/name@v1+lora", "org/name@v1+lora"),
    ({"model": "org/name"}, "org/name"),
    ({"model": {"path": "org/name", "revision": "main"}, "lora": {"path": "org/adapter"}}, "org/name@main+org/adapter"),
    ({"model": {"path": "org/name", "revision": None}, "lora": None}, "org/name"),
])
def test_model_references_as_mergekit_writes_them(given, text):
    from adaptkit.merge.refs import Ref

    assert str(Ref.parse(given)) == text


@pytest.mark.parametrize(("given", "message"), [
    ({"model": "org/name", "override_architecture": "MistralForCausalLM"}, "'override_architecture' is not supported"),
    ({"model": "org/name", "revison": "main"}, "has 'model' and optionally 'lora', got revison"),
    ({"lora": "org/adapter"}, "got no model"),
    ({"model": {"path": "org/name", "rev": "x"}}, "a model path mapping has a 'path' string"),
    ({"model": {"path": "org/name", "revision": 3}}, "revision must be a name or commit"),
    ({"model": 5}, r"models\[0\]\.model\.model must be a path or repo id, got 5"),
    ({"model": "org/name", "lora": ["a"]}, r"\.lora must be a path or repo id"),
])
def test_model_reference_mappings_refuse_what_they_do_not_read(given, message):
    from adaptkit.merge.refs import Ref

    with pytest.raises(AdaptkitError, match=message):
        Ref.parse(given, "models[0].model")


def test_weights_summing_to_zero_with_normalize(models, tmp_path):
    recipe = recipe_for(models, "linear", [{"weight": 1}, {"weight": -1}], base=False, n=2)
    with pytest.raises(AdaptkitError, match="sum to zero"):
        run_merge(recipe, tmp_path / "out", progress=False)


@pytest.mark.parametrize("density", [0, 1.5, -0.1])
def test_density_out_of_range(models, tmp_path, density):
    with pytest.raises(AdaptkitError, match="density"):
        run_merge(recipe_for(models, "ties", [{"weight": 1, "density": density}] * 3), tmp_path / "o", progress=False)


def test_nan_input(models, tmp_path):
    def poison(t):
        t["model.norm.weight"][0] = float("nan")

    bad = edited_copy(models / "ft2", tmp_path / "bad", poison)
    recipe = recipe_for(models, "linear", [{"weight": 1}] * 2, base=False, n=2)
    recipe["models"][1]["model"] = str(bad)
    with pytest.raises(AdaptkitError, match="'model.norm.weight' of .*bad has NaN or Inf"):
        run_merge(recipe, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    run_merge(recipe, tmp_path / "out", allow_nonfinite=True, progress=False)
    assert torch.isnan(state(tmp_path / "out")["model.norm.weight"][0])


def test_nonfinite_output_from_finite_inputs(models, tmp_path):
    """A merge whose own steps overflow (λ = 10⁷ in float16: ±Inf, which mergekit writes) is refused, naming
    the tensor and the dtypes; nothing is written. --allow-nonfinite writes what the steps give."""
    recipe = recipe_for(models, "task_arithmetic", [{"weight": 1}] * 3, {"lambda": 1e7})
    recipe["dtype"] = "float16"
    with pytest.raises(AdaptkitError, match=r"^merging '[^']+' with task_arithmetic gave NaN or Inf values from finite "
                                            r"inputs \(computed in float16, written as float16\)"):
        run_merge(recipe, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    run_merge(recipe, tmp_path / "out", allow_nonfinite=True, progress=False)
    assert torch.isinf(state(tmp_path / "out")["model.layers.0.mlp.up_proj.weight"]).any()


def test_existing_output_and_killed_run(models, tmp_path, monkeypatch):
    recipe = recipe_for(models, "linear", [{"weight": 1}] * 2, base=False, n=2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(AdaptkitError, match="already exists"):
        run_merge(recipe, out, progress=False)
    from adaptkit.merge import engine

    calls = {"n": 0}
    real = engine.merge_tensor

    def dies(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # as if killed mid-way
        return real(*a, **k)

    monkeypatch.setattr(engine, "merge_tensor", dies)
    with pytest.raises(KeyboardInterrupt):
        run_merge(recipe, out, force=True, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "keep.txt").read_text() == "old"
    with pytest.raises(KeyboardInterrupt):
        calls["n"] = 0
        run_merge(recipe, tmp_path / "new", progress=False)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("method, params", [("linear", {"weight": 0.3}), ("task_arithmetic", {"weight": 0.6})])
def test_row_blocks_give_the_same_bytes(models, tmp_path, monkeypatch, method, params):
    """Elementwise operators see big tensors in row blocks; the output must not change."""
    from adaptkit.merge import engine

    recipe = recipe_for(models, method, [params] * 3, base=method != "linear")
    run_merge(recipe, tmp_path / "whole", progress=False)
    monkeypatch.setattr(engine, "BLOCK_ELEMENTS", 100)
    plan = engine.Plan(engine.load_recipe(recipe))
    assert len(engine.row_blocks(plan, "model.embed_tokens.weight")) > 10
    for name, _, shape in plan.layout:  # every block starts at a multiple of 256 entries, the last has 256 or more
        blocks, width = engine.row_blocks(plan, name), math.prod(shape[1:])
        if blocks != [None]:
            assert all(r * width % 256 == 0 for r, _ in blocks) and (blocks[-1][1] - blocks[-1][0]) * width >= 256
    run_merge(recipe, tmp_path / "blocks", progress=False, threads=2)
    assert (tmp_path / "whole/model.safetensors").read_bytes() == (tmp_path / "blocks/model.safetensors").read_bytes()


def test_adapter_output_dry_run(tmp_path):
    from click.testing import CliRunner

    from adaptkit.cli import cli

    a = peft_adapter(tiny_llama(), tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj"])
    b = peft_adapter(tiny_llama(), tmp_path / "b", r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"])
    r = CliRunner().invoke(cli, ["merge", "--method", "linear", "-m", str(a), "-m", str(b), "--rank", "4",
                                 "-o", str(tmp_path / "o"), "--dry-run", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["modules"] == 4 and json.loads(r.output)["rank"] == 4 and not (tmp_path / "o").exists()


def test_sharded_output_loads_in_transformers(models, tmp_path):
    from transformers import AutoModelForCausalLM

    recipe = recipe_for(models, "linear", [{"weight": 1}] * 2, base=False, n=2)
    report = run_merge(recipe, tmp_path / "out", shard_size="30KB", progress=False)
    assert len(report["files"]) > 1 and (tmp_path / "out/model.safetensors.index.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    expected = (state(models / "ft1")["lm_head.weight"] + state(models / "ft2")["lm_head.weight"]) / 2
    torch.testing.assert_close(model.lm_head.weight.detach(), expected)


def test_hub_reference_resolves_from_the_cache(models, tmp_path, offline_hub):
    """`org/name@rev` goes through huggingface_hub; offline, a cached snapshot is used."""
    offline_hub(models / "ft1", "org/tiny-ft")
    recipe = recipe_for(models, "linear", [{"weight": 1}] * 2, base=False, n=2)
    recipe["models"][0]["model"] = "org/tiny-ft"
    run_merge(recipe, tmp_path / "out", progress=False)
    expected = (state(models / "ft1")["lm_head.weight"] + state(models / "ft2")["lm_head.weight"]) / 2
    torch.testing.assert_close(state(tmp_path / "out")["lm_head.weight"], expected)
    recipe["models"][0]["model"] = "org/not-cached@v2"
    with pytest.raises(AdaptkitError, match="org/not-cached@v2: not a local path, and the Hub cannot be reached"):
        run_merge(recipe, tmp_path / "out2", progress=False)


def test_half_precision_inputs_upcast_block_by_block(models, tmp_path):
    """With `compute_dtype: float32`, bf16 inputs reach the task-arithmetic family as stored (converted
    block by block); the result equals the float32 formula on the upcast inputs, rounded once."""
    from adaptkit import registry

    half = {}
    for name in ("base", "ft1", "ft2"):
        (tmp_path / name).mkdir()
        tensors = {k: v.to(torch.bfloat16) for k, v in state(models / name).items()}
        save_file(tensors, tmp_path / name / "model.safetensors")
        shutil.copy(models / name / "config.json", tmp_path / name / "config.json")
        half[name] = tensors
    recipe = {"merge_method": "ties", "base_model": str(tmp_path / "base"), "compute_dtype": "float32",
              "models": [{"model": str(tmp_path / n), "parameters": {"weight": 0.6, "density": 0.4}} for n in ("ft1", "ft2")]}
    run_merge(recipe, tmp_path / "out", progress=False)
    got = state(tmp_path / "out")
    ties = registry.get("merge", "ties")
    for name, tensor in got.items():
        expected = ties.merge([half["ft1"][name].float(), half["ft2"][name].float()], half["base"][name].float(),
                              weight=[0.6, 0.6], density=[0.4, 0.4])
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, expected.to(torch.bfloat16)), name
