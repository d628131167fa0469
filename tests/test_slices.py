"""`slices:` recipes (frankenmerges) and the `passthrough` method: the layer mapping written out, the
bytes against mergekit's own merge of the same YAML, the output running in transformers, bad slices.
"""
from __future__ import annotations

import contextlib
import json
import re

import pytest
import torch
import yaml
from safetensors.torch import load_file

from adaptkit import registry
from adaptkit.errors import AdaptkitError
from adaptkit.merge.engine import Plan, run_merge
from adaptkit.merge.recipe import load_recipe
from builders import assert_before_and_after, mergekit_architectures, mergekit_merge, merges_like_mergekit, tiny_llama

LAYERS = 4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two unrelated tiny Llamas of 4 layers (seeds 1 and 2), float32."""
    root = tmp_path_factory.mktemp("slice-models")
    for seed in (1, 2):
        tiny_llama(seed=seed, num_hidden_layers=LAYERS).save_pretrained(root / f"m{seed}")
    return root


def state(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def frankenmerge(models, dtype="float32", scale=None):
    """mergekit's examples/orcamini-platy-44layer.yml in miniature: layers 0-2 of m1, then 1-3 of m2."""
    second = {"model": str(models / "m2"), "layer_range": [1, 4]}
    if scale is not None:
        second["parameters"] = {"scale": scale}
    return {"slices": [{"sources": [{"model": str(models / "m1"), "layer_range": [0, 3]}]}, {"sources": [second]}],
            "merge_method": "passthrough", "dtype": dtype}


def gradient_slerp(models, dtype="float32"):
    """mergekit's examples/gradient-slerp.yml in miniature: one slice of all layers, t per filter and layer."""
    return {"slices": [{"sources": [{"model": str(models / "m1"), "layer_range": [0, LAYERS]},
                                    {"model": str(models / "m2"), "layer_range": [0, LAYERS]}]}],
            "merge_method": "slerp", "base_model": str(models / "m1"), "dtype": dtype,
            "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                 {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]}}


def sliced_linear(models, dtype="float32"):
    """Two slices of two sources with different ranges; per-source, per-slice and global settings, filters
    that miss (falling through to the next scope), a source's filter on its own layer names (layer 1 of
    m2 is output layer 0) and one slice of a single layer."""
    m1, m2 = str(models / "m1"), str(models / "m2")
    return {"slices": [
        {"sources": [{"model": m1, "layer_range": [0, 3], "parameters": {"weight": [0.2, 0.8]}},
                     {"model": m2, "layer_range": [1, 4],  # its filters see its own layer names
                      "parameters": {"weight": [{"filter": "layers.1.", "value": 0.6}]}}],
         "parameters": {"weight": [{"filter": "self_attn", "value": 0.9}]}},
        {"sources": [{"model": m2, "layer_range": [3, 4], "parameters": {"weight": [0.1, 0.9]}},
                     {"model": m1, "layer_range": [2, 3], "parameters": {"weight": 0.25}}]}],
        "merge_method": "linear", "parameters": {"weight": 0.5, "normalize": False}, "dtype": dtype}


def sliced_ties(models, dtype="float32"):
    """TIES per slice, each slice's base one of its sources (without parameters, as mergekit allows),
    the second slice naming its own base."""
    m1, m2 = str(models / "m1"), str(models / "m2")
    return {"slices": [
        {"sources": [{"model": m1, "layer_range": [0, 2]},
                     {"model": m2, "layer_range": [0, 2], "parameters": {"weight": 0.7, "density": 0.5}}]},
        {"sources": [{"model": m2, "layer_range": [2, 4]},
                     {"model": m1, "layer_range": [1, 3], "parameters": {"weight": [0.2, 0.9], "density": 0.6}}],
         "base_model": m2}],
        "merge_method": "ties", "base_model": m1, "dtype": dtype}


RECIPES = {"frankenmerge": frankenmerge, "frankenmerge_scaled": lambda m, d: frankenmerge(m, d, scale=[1.0, 0.5]),
           "gradient_slerp": gradient_slerp, "sliced_linear": sliced_linear, "sliced_ties": sliced_ties}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("case", RECIPES)
def test_bytes_equal_mergekit(models, tmp_path, case, dtype):
    got, ours, theirs = merges_like_mergekit(RECIPES[case](models, dtype), tmp_path)
    assert ours["num_hidden_layers"] == theirs["num_hidden_layers"] == len(
        {n.split(".")[2] for n in got if n.startswith("model.layers.")})


def test_gpt2_frankenmerge_equals_mergekit(tmp_path):
    """Another naming (`transformer.h.<i>`, `n_layer`, `wte`/`wpe` before the layers, `ln_f` after)."""
    from builders import tiny_gpt2

    for seed in (1, 2):
        tiny_gpt2(seed=seed).save_pretrained(tmp_path / f"g{seed}")
    recipe = {"slices": [{"sources": [{"model": str(tmp_path / "g1"), "layer_range": [0, 2]}]},
                         {"sources": [{"model": str(tmp_path / "g2"), "layer_range": [1, 2]}]}],
              "merge_method": "passthrough", "dtype": "bfloat16"}
    run_merge(recipe, tmp_path / "ours", progress=False, card=False)
    expected, got = mergekit_merge(recipe, tmp_path / "mk"), state(tmp_path / "ours")
    assert sorted(got) == sorted(expected) and all(torch.equal(got[n], expected[n]) for n in expected)
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["n_layer"] == 3


def test_a_slice_base_takes_no_parameters(models):
    """As mergekit: the base of a slice is no input, so its per-model parameters go unused (a warning)."""
    recipe = sliced_ties(models)
    recipe["slices"][0]["sources"][0]["parameters"] = {"weight": 0.5}
    with pytest.warns(UserWarning, match=r"slices\[0\]\.sources\[0\]: .*m1 is the slice's base; its parameters"):
        load_recipe(recipe)
    plan = Plan(load_recipe(sliced_ties(models)))
    job = plan.job("model.layers.3.mlp.up_proj.weight")  # slice 1: base m2 (its layer 3), input m1 (layer 2)
    assert job.base[1] == "model.layers.3.mlp.up_proj.weight" and job.base[0].ref.model.endswith("m2")
    assert [n for _, n in job.inputs] == ["model.layers.2.mlp.up_proj.weight"]


@pytest.mark.parametrize("method", ["passthrough", "linear"])
def test_slices_with_a_tokenizer_union_equal_mergekit(tmp_path, method):
    """Embedding and LM-head rows aligned to the union vocabulary, from the first and last slices' sources."""
    from test_merge_tokenizers import CHATML, make_tokenizer, save_llama

    base, chatml = tmp_path / "base", tmp_path / "chatml"
    save_llama(base, 64, 0)
    make_tokenizer([], None, 64).save_pretrained(base)
    save_llama(chatml, 66, 2)
    make_tokenizer(CHATML, None, 64).save_pretrained(chatml)
    if method == "passthrough":  # embeddings from base only: the ChatML rows are zeros, as mergekit's
        slices = [{"sources": [{"model": str(base), "layer_range": [0, 2]}]},
                  {"sources": [{"model": str(chatml), "layer_range": [1, 2]}]}]
    else:
        slices = [{"sources": [{"model": str(base), "layer_range": [0, 2]}, {"model": str(chatml), "layer_range": [0, 2]}]}]
    recipe = {"slices": slices, "merge_method": method, "base_model": str(base), "tokenizer_source": "union",
              "dtype": "bfloat16", **({"parameters": {"weight": 0.5}} if method == "linear" else {})}
    if method == "passthrough":
        del recipe["base_model"]
    with pytest.warns(UserWarning) if method == "passthrough" else contextlib.nullcontext():
        run_merge(recipe, tmp_path / "ours", progress=False, card=False)
    expected, got = mergekit_merge(recipe, tmp_path / "mk"), state(tmp_path / "ours")
    assert sorted(got) == sorted(expected) and all(torch.equal(got[n], expected[n]) for n in expected)
    assert got["lm_head.weight"].shape[0] == json.loads((tmp_path / "ours" / "config.json").read_text())["vocab_size"] == 66


def test_frankenmerge_layers_written_out(models, tmp_path):
    """Output layer j is a copy of the source layer the recipe names; embeddings from the first slice's
    model, final norm and LM head from the last slice's; `scale` multiplies, over a gradient."""
    run_merge(frankenmerge(models, scale=[1.0, 0.5]), tmp_path / "out", progress=False, card=False)
    out, m1, m2 = state(tmp_path / "out"), state(models / "m1"), state(models / "m2")
    origin = [(m1, 0, 1.0), (m1, 1, 1.0), (m1, 2, 1.0), (m2, 1, 1.0), (m2, 2, 0.75), (m2, 3, 0.5)]
    for j, (src, i, s) in enumerate(origin):
        for rest in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
            assert torch.equal(out[f"model.layers.{j}.{rest}"], src[f"model.layers.{i}.{rest}"] * s), (j, rest)
    assert torch.equal(out["model.embed_tokens.weight"], m1["model.embed_tokens.weight"])
    assert torch.equal(out["model.norm.weight"], m2["model.norm.weight"])
    assert torch.equal(out["lm_head.weight"], m2["lm_head.weight"])
    assert len(out) == 3 + 9 * len(origin)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == len(origin)


def test_config_comes_from_the_base_model(models, tmp_path):
    """As mergekit: config.json is the base model's (even when no slice reads it), with the new layer count."""
    tiny_llama(seed=5, num_hidden_layers=2, rms_norm_eps=1e-5).save_pretrained(tmp_path / "donor")
    recipe = {**frankenmerge(models), "base_model": str(tmp_path / "donor")}
    run_merge(recipe, tmp_path / "ours", progress=False, card=False)
    mergekit_merge(recipe, tmp_path / "mk")
    for folder in ("ours", "mk"):
        config = json.loads((tmp_path / folder / "config.json").read_text())
        assert (config["num_hidden_layers"], config["rms_norm_eps"]) == (6, 1e-5), folder


def test_slice_gradient_positions(models):
    """t = k/(n − 1) over each slice's own layers, t = 1 for a one-layer slice, t = 0 outside the layers."""
    plan = Plan(load_recipe(sliced_linear(models)))
    t = {n: plan.job(n).t for n in plan.names}
    assert [t[f"model.layers.{j}.mlp.up_proj.weight"] for j in range(4)] == [0, 0.5, 1, 1]
    assert t["model.embed_tokens.weight"] == t["lm_head.weight"] == 0
    job = plan.job("model.layers.3.mlp.up_proj.weight")
    assert [name for _, name in job.inputs] == ["model.layers.3.mlp.up_proj.weight", "model.layers.2.mlp.up_proj.weight"]


def test_output_runs_in_transformers(models, tmp_path):
    from transformers import AutoModelForCausalLM

    run_merge(frankenmerge(models, "bfloat16"), tmp_path / "out", progress=False, card=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert model.config.num_hidden_layers == len(model.model.layers) == 6
    logits = model(torch.tensor([[1, 5, 9, 3]])).logits
    assert logits.shape == (1, 4, 128) and torch.isfinite(logits).all()


def test_passthrough_formula():
    """θ = s·θ₁; no scale leaves the tensor as it is; one input only, as mergekit's contract says."""
    op = registry.get("merge", "passthrough")
    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(op.merge([x]), x)
    torch.testing.assert_close(op.merge([x], scale=[0.3]), (x.double() * 0.3).float())
    with pytest.raises(AdaptkitError, match="exactly one model"):
        op.merge([x, x])


def test_passthrough_is_registered():
    from adaptkit.spec import MergeMethod

    obj = registry.get("merge", "passthrough")
    assert isinstance(obj, MergeMethod) and obj.name == "passthrough" and set(obj.per_model) <= set(obj.params)
    line, problem = registry.describe(registry.entry("merge", "passthrough"))
    assert problem is None and type(obj).__doc__.splitlines()[0] == line and "arXiv" in type(obj).__doc__


def test_passthrough_matches_mergekit():
    from mergekit.merge_methods import registry as mk_registry
    from mergekit.merge_methods.base import TensorGroup

    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(1))
    group = TensorGroup.from_tensors([x])
    mk = mk_registry.get("passthrough")
    assert torch.equal(registry.get("merge", "passthrough").merge([x]), mk([group])[0])
    entry_id = group.entries[0].id
    assert torch.equal(registry.get("merge", "passthrough").merge([x], scale=[0.3]),
                       mk([group], parameters={"scale": {entry_id: 0.3}})[0])


def test_before_and_after_the_layers_as_mergekit_architectures():
    """Every single-stack architecture mergekit knows: its pre_weights are named as before the layers,
    its post_weights as after them."""
    checked = 0
    for name, arch in mergekit_architectures():
        if "pre_weights" not in arch or name == "phi-1.json":  # phi-1 numbers its embedding as a layer
            continue
        assert_before_and_after(arch, name)
        checked += 1
    assert checked > 40


def bad(models, edit):
    recipe = frankenmerge(models)
    edit(recipe)
    return recipe


BAD = {
    "past_the_layers": (lambda r: r["slices"][1]["sources"][0].update(layer_range=[2, 5]),
                        r"slices\[1\]\.sources\[0\]: layer_range \[2, 5\] is past the 4 layers of .*m2"),
    "empty_range": (lambda r: r["slices"][0]["sources"][0].update(layer_range=[2, 2]),
                    r"slices\[0\]\.sources\[0\]\.layer_range must be \[start, stop\) with 0 <= start < stop"),
    "not_a_range": (lambda r: r["slices"][0]["sources"][0].update(layer_range=[0, "3"]),
                    r"slices\[0\]\.sources\[0\]\.layer_range must be"),
    "lengths_differ": (lambda r: r["slices"][0]["sources"].append({"model": r["slices"][1]["sources"][0]["model"],
                                                                  "layer_range": [0, 2]}),
                       r"slices\[0\]: its sources' layer ranges \[0, 3\], \[0, 2\] differ in length"),
    "model_not_found": (lambda r: r["slices"][1]["sources"][0].update(model="/nonexistent/model"),
                        r"slices\[1\]\.sources\[0\]: .*nonexistent"),
    "two_inputs_to_passthrough": (lambda r: r["slices"][0]["sources"].append(
        {"model": r["slices"][1]["sources"][0]["model"], "layer_range": [0, 3]}),
        "passthrough: takes exactly one model per tensor"),
    "unknown_slice_key": (lambda r: r["slices"][0].update(residual_wieght=0.5),
                          r"slices\[0\]: unknown key 'residual_wieght'; did you mean 'residual_weight'"),
    "residual_weight_not_a_number": (lambda r: r["slices"][0].update(residual_weight="half"),
                                     r"slices\[0\].residual_weight must be a finite number"),
    "misspelled_source_key": (lambda r: r["slices"][0]["sources"][0].update(layer_rnage=[0, 1]),
                              r"slices\[0\]\.sources\[0\]: unknown key 'layer_rnage'; did you mean 'layer_range'"),
    "misspelled_parameter": (lambda r: r["slices"][0]["sources"][0].update(parameters={"scael": 1}),
                             r"slices\[0\]\.sources\[0\]\.parameters: 'passthrough' has no parameter 'scael'"),
    "models_and_slices": (lambda r: r.update(models=[r["slices"][0]["sources"][0]["model"]]),
                          "give one of 'models', 'slices' and 'modules', not models and slices"),
    "same_model_twice": (lambda r: r["slices"][0]["sources"].append(dict(r["slices"][0]["sources"][0])),
                         r"slices\[0\]: a model is listed twice among its sources"),
    "base_not_in_slice": (lambda r: r.update(merge_method="slerp", parameters={"t": 0.5},
                                             base_model=r["slices"][1]["sources"][0]["model"]),
                          r"slices\[0\]: the base model .*m2 is not among its sources"),
    "no_slices": (lambda r: r.update(slices=[]), "slices must be a non-empty list"),
    "no_sources": (lambda r: r["slices"][1].update(sources=[]), r"slices\[1\]\.sources must be a non-empty list"),
    "adapter_output": (lambda r: r.update(output={"kind": "adapter", "rank": 4}),
                       "slices make a model; an adapter output takes 'models'"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_slices_are_one_line(models, tmp_path, case):
    edit, message = BAD[case]
    with pytest.raises(AdaptkitError, match=message) as info:
        run_merge(bad(models, edit), tmp_path / "out", progress=False, card=False)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_layers_of_other_shapes_are_refused(models, tmp_path):
    tiny_llama(seed=3, num_hidden_layers=2, intermediate_size=48).save_pretrained(tmp_path / "narrow")
    recipe = {"slices": [{"sources": [{"model": str(models / "m1"), "layer_range": [0, 2]},
                                      {"model": str(tmp_path / "narrow"), "layer_range": [0, 2]}]}],
              "merge_method": "linear", "parameters": {"weight": 0.5}}
    with pytest.raises(AdaptkitError, match=r"slices\[0\]: tensor 'model.layers.0.mlp.down_proj.weight' has different "
                                            r"shapes in its sources \(\(32, 48\), \(32, 64\)\)"):
        run_merge(recipe, tmp_path / "out", progress=False, card=False)


def test_yaml_file_and_cli(models, tmp_path):
    from click.testing import CliRunner

    from adaptkit.cli import cli

    (tmp_path / "frank.yaml").write_text(yaml.safe_dump(frankenmerge(models)))
    result = CliRunner().invoke(cli, ["--quiet", "merge", str(tmp_path / "frank.yaml"), "-o", str(tmp_path / "o"),
                                      "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["tensors"] == 3 + 9 * 6 and re.search("m1", " ".join(report["inputs"]))


def test_residual_weight_is_a_warning_and_changes_nothing(models, tmp_path):
    """mergekit's slice schema has `residual_weight`, which none of its code reads: accepted with a warning."""
    plain = frankenmerge(models)
    weighted = yaml.safe_load(yaml.safe_dump(plain))
    weighted["slices"][1]["residual_weight"] = 0.5
    with pytest.warns(UserWarning, match=r"slices\[1\]: 'residual_weight' is ignored, as mergekit ignores it"):
        run_merge(weighted, tmp_path / "weighted", progress=False, card=False)
    run_merge(plain, tmp_path / "plain", progress=False, card=False)
    assert (tmp_path / "weighted/model.safetensors").read_bytes() == (tmp_path / "plain/model.safetensors").read_bytes()
    assert mergekit_merge(weighted, tmp_path / "mk").keys() == state(tmp_path / "plain").keys()


# ---- bakllama configs ---------------------------------------------------------------------------

def _bakllama_models(tmp_path):
    paths = [tmp_path / f"m{seed}" for seed in range(2)]
    for seed, path in enumerate(paths):
        tiny_llama(seed, num_hidden_layers=4).save_pretrained(path)
    return paths


def test_bakllama_config_is_the_passthrough_recipe_mergekit_means(tmp_path):
    """A bakllama config merges as mergekit's bakllama script builds it: one passthrough slice per entry,
    `scale` on the slice's down_proj only (its filter), layers renumbered. (mergekit 0.1.5's script hands
    its slices over where pydantic wants output slices and fails on every config; its recipe, each slice
    wrapped as meant, is run through mergekit's own types and merge here.)"""
    from hostile import run_cli
    from mergekit.config import ConditionalParameter, InputSliceDefinition, MergeConfiguration, OutputSliceDefinition
    from mergekit.merge import MergeOptions
    from mergekit.merge import run_merge as mk_run

    a, b = _bakllama_models(tmp_path)
    config = {"layer_slices": [{"model": str(a), "start": 0, "end": 3},
                               {"model": str(b), "start": 1, "end": 4, "scale": 0.5}],
              "embedding_source": str(a), "lm_head_source": str(b)}
    (tmp_path / "bak.yml").write_text(yaml.safe_dump(config))
    result = run_cli("merge", tmp_path / "bak.yml", "-o", tmp_path / "ours", "--no-card")
    assert result.exit_code == 0, result.stderr
    slices = [OutputSliceDefinition(sources=[InputSliceDefinition(
        model=s["model"], layer_range=(s["start"], s["end"]),
        parameters={"scale": ConditionalParameter(value=s["scale"], filter="down_proj")} if "scale" in s else {})])
        for s in config["layer_slices"]]
    mk_run(MergeConfiguration(merge_method="passthrough", slices=slices), str(tmp_path / "mk"),
           MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
    ours, theirs = load_file(tmp_path / "ours" / "model.safetensors"), load_file(tmp_path / "mk" / "model.safetensors")
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], v) for k, v in theirs.items())
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["num_hidden_layers"] == 3 + 3
    source = load_file(b / "model.safetensors")  # output layer 3 is b's layer 1: down_proj halved, the rest as is
    assert torch.equal(ours["model.layers.3.mlp.down_proj.weight"], source["model.layers.1.mlp.down_proj.weight"] * 0.5)
    assert torch.equal(ours["model.layers.3.mlp.up_proj.weight"], source["model.layers.1.mlp.up_proj.weight"])


@pytest.mark.parametrize("edit,fragment", [
    (lambda c: c.update(merge_method="linear"), "unknown key in a bakllama config: merge_method"),
    (lambda c: c["layer_slices"][0].pop("end"), "layer_slices[0]: 'end' is missing"),
    (lambda c: c["layer_slices"][1].update(scale="half"), "layer_slices[1].scale"),
    (lambda c: c["layer_slices"][0].update(weight=1), "layer_slices[0]: unknown key weight"),
    (lambda c: c.update(layer_slices=[]), "layer_slices must be a non-empty list"),
    (lambda c: c.update(lm_head_source=c["layer_slices"][0]["model"]), "lm_head_source"),
    (lambda c: c["layer_slices"][1].update(end=9), "layer_range [1, 9] is past the 4 layers"),
], ids=["other format's key", "no end", "scale not a number", "unknown slice key", "no slices",
        "lm head from another model", "past the layers"])
def test_bad_bakllama_configs_are_one_line(tmp_path, edit, fragment):
    """Refused by name: keys of neither format, missing or mistyped fields, and an embedding or LM head
    source other than the slice that gives it (mergekit reads those keys nowhere)."""
    from hostile import assert_one_line_error, run_cli

    a, b = _bakllama_models(tmp_path)
    config = {"layer_slices": [{"model": str(a), "start": 0, "end": 3}, {"model": str(b), "start": 1, "end": 4}]}
    edit(config)
    (tmp_path / "bak.yml").write_text(yaml.safe_dump(config))
    assert_one_line_error(run_cli("merge", tmp_path / "bak.yml", "-o", tmp_path / "out"), fragment)
    assert not (tmp_path / "out").exists()
