"""What a merge leaves besides the weights and what it says before and while it runs: the model card
and recipe copy, --no-card, --dry-run's resolved plan, recipe messages (unknown method, a parameter the
method ignores, a misspelled one) and multi-stage recipes (mergekit-multi's format)."""
from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from adaptkit.cli import cli
from adaptkit.errors import AdaptkitError
from adaptkit.merge.card import model_card
from adaptkit.merge.engine import Plan, run_merge
from adaptkit.merge.schedule import default_workers
from adaptkit.merge.recipe import load_recipe

LAYERS = 3


def tiny_llama_files(folder, seed: int) -> None:
    """A three-layer Llama's tensor names and shapes with random values, and its config.json (written
    directly: building the model through transformers would take most of this file's time)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"model.embed_tokens.weight": (64, 16), "model.norm.weight": (16,), "lm_head.weight": (64, 16)}
    for i in range(LAYERS):
        for proj, shape in (("q", (16, 16)), ("k", (8, 16)), ("v", (8, 16)), ("o", (16, 16))):
            shapes[f"model.layers.{i}.self_attn.{proj}_proj.weight"] = shape
        for proj, shape in (("gate", (32, 16)), ("up", (32, 16)), ("down", (16, 32))):
            shapes[f"model.layers.{i}.mlp.{proj}_proj.weight"] = shape
        shapes[f"model.layers.{i}.input_layernorm.weight"] = (16,)
        shapes[f"model.layers.{i}.post_attention_layernorm.weight"] = (16,)
    folder.mkdir(parents=True)
    save_file({name: torch.randn(shape, generator=g) * 0.1 for name, shape in shapes.items()},
              folder / "model.safetensors")
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16,
              "num_hidden_layers": LAYERS, "vocab_size": 64, "torch_dtype": "float32"}
    (folder / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A base and two fine-tunes (float32)."""
    root = tmp_path_factory.mktemp("models")
    for i, name in enumerate(("base", "ft1", "ft2")):
        tiny_llama_files(root / name, seed=i)
    return root


def write(path, data, *, documents: bool = False):
    path.write_text(yaml.safe_dump_all(data, sort_keys=False) if documents else yaml.safe_dump(data, sort_keys=False))
    return path


def adaptkit(*args) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["--quiet", *map(str, args)])
    return result.exit_code, result.output


def front_matter(text: str) -> tuple[dict, str]:
    match = re.match(r"^---\n(.*?)\n---\n(.*)$", text, re.S)
    assert match, text[:200]
    return yaml.safe_load(match.group(1)), match.group(2)


def ties(models, **extra) -> dict:
    return {"merge_method": "ties", "base_model": str(models / "base"), "dtype": "float32",
            "models": [{"model": str(models / "ft1"), "parameters": {"weight": 0.6, "density": 0.5}},
                       {"model": str(models / "ft2"), "parameters": {"weight": [0.2, 0.8], "density": 0.7}}],
            "parameters": {"normalize": True}, **extra}


# -- the card and the recipe copy ------------------------------------------------------------------------

def test_card_front_matter_and_body(models, tmp_path):
    run_merge(ties(models), tmp_path / "out", progress=False)
    meta, body = front_matter((tmp_path / "out" / "README.md").read_text())
    # local folders are no Hub models: no base_model is claimed
    assert meta == {"tags": ["merge", "adaptkit"], "library_name": "transformers"}
    assert body.startswith("\n# A ties merge\n")
    assert f"Method: `ties`, with `{models / 'base'}` as the base." in body
    assert f"| `{models / 'ft1'}` | weight: 0.6, density: 0.5 |" in body
    assert f"| `{models / 'ft2'}` | weight: [0.2, 0.8], density: 0.7 |" in body
    assert "Global parameters: normalize: true" in body
    assert "```yaml\n" + (tmp_path / "out" / "adaptkit_recipe.yml").read_text() + "```" in body


def test_card_of_a_slices_recipe(models, tmp_path):
    recipe = {"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": str(models / "base"), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(models / "ft1"), "layer_range": [1, 3], "parameters": {"scale": 0.5}}]}]}
    run_merge(recipe, tmp_path / "out", progress=False)
    _, body = front_matter((tmp_path / "out" / "README.md").read_text())
    assert (f"| output slice | model | layers | parameters |\n|---|---|---|---|\n| 0 | `{models / 'base'}` | [0, 2] |  |\n"
            f"| 1 | `{models / 'ft1'}` | [1, 3] | scale: 0.5 |\n") in body


@pytest.mark.parametrize("refs, base_model", [
    (["org-a/model-x", "org-b/model-y@v1.0"], ["org-a/model-x", "org-b/model-y"]),  # a revision is no part of the id
    (["org-a/model-x+org-c/lora"], ["org-a/model-x", "org-c/lora"]),  # mergekit lists the adapter too
    (["LOCAL", "org-a/model-x"], ["org-a/model-x"]),
    (["LOCAL"], None),
], ids=["hub", "base+adapter", "mixed", "local only"])
def test_card_names_only_hub_repositories(models, refs, base_model):
    recipe = load_recipe({"merge_method": "linear", "models": [
        {"model": ref.replace("LOCAL", str(models / "ft1")), "parameters": {"weight": 1.0}} for ref in refs]})
    meta, body = front_matter(model_card([(None, recipe)], None))
    assert meta.get("base_model") == base_model
    assert meta.get("base_model_relation") == ("merge" if base_model else None)
    for repo in base_model or []:
        assert f"(https://huggingface.co/{repo})" in body


def test_adapter_card_names_the_base_only():
    """An adapter output applies to the recipe's base: the input adapters are no base model of it."""
    recipe = load_recipe({"merge_method": "linear", "base_model": "org-a/base", "output": {"kind": "adapter"},
                          "models": [{"model": "org-b/lora", "parameters": {"weight": 1.0}}]})
    meta, _ = front_matter(model_card([(None, recipe)], None, model=False))
    assert meta == {"base_model": ["org-a/base"], "tags": ["merge", "adaptkit"]}


def test_recipe_copy_runs_again_to_the_same_bytes(models, tmp_path):
    """A random method with --seed and dtypes from the command line: the copy carries them."""
    recipe = write(tmp_path / "r.yml", {**ties(models), "merge_method": "dare_ties"})
    assert adaptkit("merge", recipe, "-o", tmp_path / "one", "--seed", 7, "--dtype", "bfloat16")[0] == 0
    copy = tmp_path / "one" / "adaptkit_recipe.yml"
    assert yaml.safe_load(copy.read_text()) == {**ties(models), "merge_method": "dare_ties", "dtype": "bfloat16",
                                                "seed": 7}
    assert adaptkit("merge", copy, "-o", tmp_path / "two")[0] == 0
    for name in ("model.safetensors", "adaptkit_recipe.yml", "README.md"):  # the card names no output folder
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    assert adaptkit("merge", recipe, "-o", tmp_path / "other", "--seed", 8, "--dtype", "bfloat16")[0] == 0
    assert (tmp_path / "other" / "model.safetensors").read_bytes() != (tmp_path / "one" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("card", [True, False], ids=["card", "no card"])
def test_no_card_and_no_card_of_the_base(models, tmp_path, card):
    """A base that is itself a merge output has a card and recipe of its own; neither is copied along."""
    shutil.copytree(models / "base", tmp_path / "base")
    for name in ("README.md", "adaptkit_recipe.yml"):
        (tmp_path / "base" / name).write_text("the base's own\n")
    recipe = write(tmp_path / "r.yml", dict(ties(models), base_model=str(tmp_path / "base")))
    assert adaptkit("merge", recipe, "-o", tmp_path / "out", *([] if card else ["--no-card"]))[0] == 0
    files = {p.name: p.read_text() for p in (tmp_path / "out").iterdir() if p.suffix != ".safetensors"}
    assert sorted(files) == sorted(["config.json", *(["README.md", "adaptkit_recipe.yml"] if card else [])])
    assert "the base's own\n" not in files.values()


def lora_files(folder, seed: int) -> None:
    """A PEFT LoRA (rank 2, on every q_proj of the models above), written directly."""
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True)
    prefix = "base_model.model.model.layers.{}.self_attn.q_proj.lora_{}.weight"
    save_file({prefix.format(i, part): torch.randn(shape, generator=g) for i in range(LAYERS)
               for part, shape in (("A", (2, 16)), ("B", (16, 2)))}, folder / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}
    (folder / "adapter_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("card", [True, False], ids=["card", "no card"])
def test_adapter_output_card(tmp_path, card):
    """Adapters into an adapter: the card claims no library (the folder is an adapter, not a model)."""
    for i, name in enumerate("ab"):
        lora_files(tmp_path / name, seed=i)
    args = ["merge", "--method", "concat", "-m", tmp_path / "a", "-m", f"{tmp_path / 'b'}:0.5", "--rank", 4,
            "-o", tmp_path / "out"]
    assert adaptkit(*args, *([] if card else ["--no-card"]))[0] == 0
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == sorted(["adapter_config.json", "adapter_model.safetensors",
                            *(["README.md", "adaptkit_recipe.yml"] if card else [])])
    if card:
        meta, body = front_matter((tmp_path / "out/README.md").read_text())
        assert meta == {"tags": ["merge", "adaptkit"]} and body.startswith("\n# A concat merge\n\nThis adapter was merged")
        assert f"| `{tmp_path / 'b'}` | weight: 0.5 |" in body
        assert yaml.safe_load((tmp_path / "out/adaptkit_recipe.yml").read_text())["output"] == {"kind": "adapter",
                                                                                              "rank": 4}


# -- --dry-run ----------------------------------------------------------------------------------------------

# (recipe, the parameter shown, [(its value, layers, tensor count)]): 9 tensors per layer (4 attention,
# 3 MLP, 2 norms) and 3 outside the layers, which take a gradient's first value (position 0).
DRY_RUNS = {
    "gradient with filters": (
        {"merge_method": "slerp", "base_model": "BASE", "models": ["BASE", "FT1"],
         "parameters": {"t": [{"filter": "self_attn", "value": [0.2, 1.0]}, {"value": 0.5}]}}, "t",
        [(0.5, [0, 1, 2], 3 + 5 * LAYERS), (0.2, [0], 4), (0.6, [1], 4), (1.0, [2], 4)]),
    "per-model gradient": (
        {"merge_method": "linear", "models": [{"model": "FT1", "parameters": {"weight": [0.0, 1.0]}},
                                              {"model": "FT2", "parameters": {"weight": 0.5}}]}, "weight",
        [([i / (LAYERS - 1), 0.5], [i], 9 + (3 if i == 0 else 0)) for i in range(LAYERS)]),
}


def placed(recipe: dict, models) -> dict:
    text = json.dumps(recipe)
    for name, folder in (("BASE", "base"), ("FT1", "ft1"), ("FT2", "ft2")):
        text = text.replace(f'"{name}"', json.dumps(str(models / folder)))
    return json.loads(text)


@pytest.mark.parametrize("case", DRY_RUNS)
def test_dry_run_shows_parameters_after_gradients(models, tmp_path, case):
    parts, key, expected = DRY_RUNS[case]
    recipe = placed(parts, models)
    path = write(tmp_path / "r.yml", recipe)
    code, out = adaptkit("merge", path, "-o", tmp_path / "out", "--dry-run", "--json")
    assert code == 0, out
    summary = json.loads(out)
    found = [(g["parameters"][key], g["layers"], len(g["tensors"])) for g in summary["groups"]]
    assert len(found) == len(expected)
    for (value, layers, count), (want, want_layers, want_count) in zip(found, expected):
        assert value == pytest.approx(want) and (layers, count) == (want_layers, want_count), found
    assert sum(len(g["tensors"]) for g in summary["groups"]) == summary["tensors"] == 3 + 9 * LAYERS
    plan = Plan(load_recipe(recipe))  # the workers the merge itself would use (2 for elementwise methods)
    assert summary["threads"] == default_workers(plan.method)
    assert summary["working_bytes"] == plan.peak_bytes(default_workers(plan.method)) > 0
    assert summary["estimated_peak_bytes"] == summary["working_bytes"] + summary["process_bytes"]
    assert summary["process_bytes"] > 50e6  # (Python with torch imported: the floor under the merge's peak)
    code, text = adaptkit("merge", path, "-o", tmp_path / "out", "--dry-run")
    assert code == 0 and "estimated peak" in text and not (tmp_path / "out").exists()
    lines = text.splitlines()
    heading = next(i for i, line in enumerate(lines) if line.startswith("parameters by tensor ("))
    assert lines[heading].startswith(f"parameters by tensor ({len(expected)} group(s)")
    assert len(lines) == heading + 1 + len(expected)


def test_dry_run_text_lines(models, tmp_path):
    recipe = placed(DRY_RUNS["gradient with filters"][0], models)
    code, text = adaptkit("merge", write(tmp_path / "r.yml", recipe), "-o", tmp_path / "out", "--dry-run")
    assert code == 0, text
    lines = text.splitlines()
    assert lines[1].startswith("  base   ") and lines[2].startswith("  input  ")
    assert lines[-4:] == ["  layers 0-2 and outside them (18 tensors): t=0.5", "  layer 0 (4 tensors): t=0.2",
                                     "  layer 1 (4 tensors): t=0.6", "  layer 2 (4 tensors): t=1"]


# -- recipe messages ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["nuslerpp", "slerpp", "tie", "Linear"])
def test_unknown_method_lists_the_methods_and_suggests_none(models, method):
    with pytest.raises(AdaptkitError) as e:
        load_recipe({"merge_method": method, "models": [str(models / "ft1")]})
    message = str(e.value)
    assert message.startswith(f"unknown merge method '{method}' (methods: ") and "did you mean" not in message
    assert "\n" not in message and ", slerp," in message and ", ties" in message


@pytest.mark.parametrize("method, extra", [("slerp", {"t": 0.3}), ("model_stock", {})])
@pytest.mark.parametrize("where", ["per model", "global"])
def test_ignored_weight_is_a_warning_and_changes_nothing(models, tmp_path, method, extra, where):
    inputs = (1,) if method == "slerp" else (1, 2)  # slerp: the base and one model
    plain = {"merge_method": method, "base_model": str(models / "base"), "dtype": "float32", "parameters": extra,
             "models": [str(models / f"ft{i}") for i in inputs]}
    weighted = dict(plain, parameters={**extra, "weight": 0.5}) if where == "global" else dict(
        plain, models=[{"model": str(models / f"ft{i}"), "parameters": {"weight": 0.5}} for i in inputs])
    with pytest.warns(UserWarning, match=f"'{method}' does not use 'weight' \\(given in "):
        run_merge(weighted, tmp_path / "weighted", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_merge(plain, tmp_path / "plain", progress=False)
    assert (tmp_path / "weighted/model.safetensors").read_bytes() == (tmp_path / "plain/model.safetensors").read_bytes()


LAZYMERGEKIT = {"normalize": True, "int8_mask": True, "rescale": True, "filter_wise": False, "smooth": False,
                "allow_negative_weights": False, "lambda": 1.0, "select_topk": 0.1}


def test_other_methods_parameters_are_one_warning_and_mergekits_bytes(tmp_path):
    """A LazyMergekit-style recipe gives every method every parameter (and mergekit-evolve's settings):
    mergekit reads the ones the method has and ignores the rest, so adaptkit drops those with one warning
    line and gives mergekit's bytes; a name no method has is still an error."""
    from builders import llama_finetunes, mergekit_merge, state

    models = llama_finetunes(tmp_path / "zoo", count=2)
    recipe = {"merge_method": "sce", "base_model": str(models / "base"), "dtype": "bfloat16", "parameters": LAZYMERGEKIT,
              "models": [{"model": str(models / f"ft{i}"), "parameters": {"weight": 1.0, "density": 0.9}} for i in (1, 2)]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_merge(recipe, tmp_path / "ours", progress=False, card=False)
    lines = [str(w.message) for w in caught if "does not use" in str(w.message)]
    assert len(lines) == 1 and lines[0].startswith("'sce' does not use 'allow_negative_weights' (given in parameters), "
                                                   "'density' (given in model ")
    assert lines[0].endswith("'weight' (given in model %s, model %s): ignored, as mergekit ignores them" % (
        models / "ft1", models / "ft2"))
    expected, got = mergekit_merge(recipe, tmp_path / "mk"), state(tmp_path / "ours")
    assert sorted(got) == sorted(expected) and all(torch.equal(got[n], expected[n]) for n in expected)
    with pytest.raises(AdaptkitError, match=r"parameters: 'sce' has no parameter 'normalise' \(parameters: int8_mask, "):
        load_recipe({**recipe, "parameters": {"normalise": True}})


def test_top_level_merge_parameters_are_a_warning_and_mergekits_bytes(tmp_path):
    """Published recipes put `normalize: true` beside `merge_method`; mergekit reads parameters only under
    `parameters:`, so it merged without it: dropped with a warning, mergekit's bytes. Any other unknown
    top-level key is still an error."""
    from builders import llama_finetunes, merges_like_mergekit

    models = llama_finetunes(tmp_path / "zoo", count=2)
    recipe = {"merge_method": "task_arithmetic", "base_model": str(models / "base"), "dtype": "bfloat16",
              "normalize": True, "int8_mask": True,
              "models": [{"model": str(models / f"ft{i}"), "parameters": {"weight": 0.7}} for i in (1, 2)]}
    with pytest.warns(UserWarning, match=r"recipe: top-level 'normalize', 'int8_mask' not read, as mergekit does not "
                                         r"read them there \(a merge parameter goes under 'parameters:'\)"):
        merges_like_mergekit(recipe, tmp_path)
    with pytest.raises(AdaptkitError, match="unknown key 'normalise'"):
        load_recipe({**recipe, "normalise": True})


def test_a_model_listed_twice_is_two_inputs_with_a_warning(models):
    """A published karcher recipe lists one of its 17 models twice: both entries are inputs (the model
    counts twice), and the warning says so (mergekit 0.1.5 refuses such a recipe)."""
    recipe = {"merge_method": "linear", "parameters": {"weight": 1.0},
              "models": [str(models / "ft1"), str(models / "ft2"), str(models / "ft1")]}
    with pytest.warns(UserWarning, match=r"recipe: .*ft1 is listed more than once under models: each entry is one "
                                         r"more input \(mergekit 0.1.5 refuses duplicate inputs\)"):
        assert len(load_recipe(recipe).models) == 3


def test_task_arithmetic_density_is_a_warning_and_mergekits_bytes(tmp_path):
    """mergekit's task_arithmetic takes density and rescale and reads neither: every entry is kept."""
    from builders import llama_finetunes, merges_like_mergekit

    models = llama_finetunes(tmp_path / "zoo", count=2)
    recipe = {"merge_method": "task_arithmetic", "base_model": str(models / "base"), "dtype": "bfloat16",
              "parameters": {"rescale": True},
              "models": [{"model": str(models / f"ft{i}"), "parameters": {"weight": 0.5, "density": 0.3}} for i in (1, 2)]}
    with pytest.warns(UserWarning, match=r"'task_arithmetic' does not use 'density' \(given in model .*ft1, model "
                                         r".*ft2\), 'rescale' \(given in parameters\): ignored, as mergekit ignores them"):
        merges_like_mergekit(recipe, tmp_path)
    plain = {**recipe, "parameters": {}, "models": [{"model": str(models / f"ft{i}"), "parameters": {"weight": 0.5}}
                                                    for i in (1, 2)]}
    run_merge(plain, tmp_path / "plain", progress=False, card=False)
    assert (tmp_path / "plain/model.safetensors").read_bytes() == (tmp_path / "ours/model.safetensors").read_bytes()


def test_older_mergekits_embed_slerp_is_a_warning(models):
    recipe = {"merge_method": "slerp", "base_model": str(models / "base"), "models": [str(models / "ft1")],
              "parameters": {"t": 0.5, "embed_slerp": True}}
    with pytest.warns(UserWarning, match="'slerp' does not use 'embed_slerp' \\(given in parameters\\): ignored"):
        assert load_recipe(recipe).parameters == {"t": 0.5}


def test_ignored_weight_prints_one_warning_line(models, tmp_path):
    recipe = {"merge_method": "slerp", "base_model": str(models / "base"), "parameters": {"t": 0.5},
              "models": [{"model": str(models / f"ft{i}"), "parameters": {"weight": 0.5}} for i in (1, 2)]}
    recipe["models"][0] = str(models / "base")  # slerp: the base and one model
    result = CliRunner().invoke(cli, ["merge", str(write(tmp_path / "r.yml", recipe)), "-o", str(tmp_path / "o"),
                                      "--dry-run"])
    lines = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert result.exit_code == 0 and lines == [
        f"warning: 'slerp' does not use 'weight' (given in model {models / 'ft2'}): ignored, as mergekit ignores it"]


@pytest.mark.parametrize("method, key", [("slerp", "weigth"), ("model_stock", "wieght"), ("slerp", "densty")])
def test_misspelled_parameter_is_an_error(models, method, key):
    with pytest.raises(AdaptkitError, match=f"models\\[0\\].parameters: '{method}' has no parameter '{key}'"):
        load_recipe({"merge_method": method, "base_model": str(models / "base"),
                     "parameters": {"t": 0.5} if method == "slerp" else {},
                     "models": [{"model": str(models / "ft1"), "parameters": {key: 0.5}}, str(models / "ft2")]})


def test_another_methods_parameter_is_a_warning(models):
    """`density` is TIES's; slerp does not read it, and mergekit ignores it (a warning, not an error)."""
    with pytest.warns(UserWarning, match=r"'slerp' does not use 'density' \(given in model .*ft1\): ignored"):
        recipe = load_recipe({"merge_method": "slerp", "base_model": str(models / "base"), "parameters": {"t": 0.5},
                              "models": [{"model": str(models / "ft1"), "parameters": {"density": 0.5}}]})
    assert recipe.model_params == [{}]


# -- multi-stage recipes --------------------------------------------------------------------------------------

def stages(models, final_extra=None) -> list[dict]:
    first = {"name": "mix", "merge_method": "linear", "dtype": "float32",
             "models": [{"model": str(models / "ft1"), "parameters": {"weight": 0.7}},
                        {"model": str(models / "ft2"), "parameters": {"weight": 0.3}}]}
    final = {"merge_method": "slerp", "base_model": str(models / "base"), "dtype": "float32",
             "models": [str(models / "base"), "mix"], "parameters": {"t": [0.1, 0.9]}, **(final_extra or {})}
    return [first, final]


def leftovers(folder) -> list[str]:
    return sorted(name for name in os.listdir(folder) if ".adaptkit." in name)


def test_two_stages_equal_running_them_by_hand(models, tmp_path):
    docs = stages(models)
    by_hand = tmp_path / "by-hand"
    run_merge({k: v for k, v in docs[0].items() if k != "name"}, by_hand / "mix", progress=False)
    final = dict(docs[1], models=[str(models / "base"), str(by_hand / "mix")])
    run_merge(final, by_hand / "final", progress=False)
    code, out = adaptkit("merge", write(tmp_path / "multi.yml", docs, documents=True), "-o", tmp_path / "out", "--json")
    assert code == 0, out
    report = json.loads(out)
    assert [s["name"] for s in report["stages"]] == ["mix", None] and report["method"] == "slerp"
    assert (tmp_path / "out/model.safetensors").read_bytes() == (by_hand / "final/model.safetensors").read_bytes()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "README.md", "adaptkit_recipe.yml", "config.json", "model.safetensors"]
    assert leftovers(tmp_path) == []
    copy = tmp_path / "out/adaptkit_recipe.yml"
    assert list(yaml.safe_load_all(copy.read_text())) == docs  # stage names, not where they were written
    meta, body = front_matter((tmp_path / "out/README.md").read_text())
    assert "## Stage 1: `mix`" in body and "## Stage 2: the output" in body and "| stage `mix` |" in body
    assert adaptkit("merge", copy, "-o", tmp_path / "again")[0] == 0
    for name in ("model.safetensors", "adaptkit_recipe.yml"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "out" / name).read_bytes()


def test_stages_draw_independently_with_one_seed(models, tmp_path):
    """Stage `first` keeps each entry of τ = ft1 − base with probability ½ (DARE, no rescale); the final stage
    merges ft1 onto `first` the same way: where `first` kept ft1's entry, τ' = ft1 − first is 0 and the output is
    ft1's (to float32 rounding), elsewhere it is ft1's where the final stage keeps τ'. With independent draws P(out = ft1) = ½ + ¼;
    had both stages drawn with the same generators (one seed, one tensor, input 0), the final stage would keep
    exactly where `first` had, and the output would equal `first` (P = ½)."""
    dare = {"merge_method": "dare_linear", "dtype": "float32", "parameters": {"rescale": False},
            "models": [{"model": str(models / "ft1"), "parameters": {"weight": 1.0, "density": 0.5}}]}
    docs = [dict(dare, name="first", base_model=str(models / "base")), dict(dare, base_model="first")]
    code, out = adaptkit("merge", write(tmp_path / "multi.yml", docs, documents=True), "-o", tmp_path / "out")
    assert code == 0, out
    merged, ft1 = (load_file(tmp_path / "out/model.safetensors"), load_file(models / "ft1/model.safetensors"))
    same = sum(int(torch.isclose(merged[n], ft1[n], rtol=0, atol=1e-6).sum()) for n in ft1) / sum(t.numel() for t in ft1.values())
    assert abs(same - 0.75) < 0.02, same  # (about 9000 entries: the spread of `same` is 0.005)


def test_a_stage_named_in_a_reference_mapping(models, tmp_path):
    """mergekit's mapping form of a reference ({model: {path: ...}}) names a stage as the string form does."""
    docs = stages(models)
    code, out = adaptkit("merge", write(tmp_path / "s.yml", docs, documents=True), "-o", tmp_path / "a")
    assert code == 0, out
    docs[1] = dict(docs[1], base_model={"model": {"path": str(models / "base")}},
                   models=[str(models / "base"), {"model": {"model": {"path": "mix"}}}])
    code, out = adaptkit("merge", write(tmp_path / "m.yml", docs, documents=True), "-o", tmp_path / "b")
    assert code == 0, out
    assert (tmp_path / "a/model.safetensors").read_bytes() == (tmp_path / "b/model.safetensors").read_bytes()


def test_intermediates_live_only_until_their_last_use(models, tmp_path, monkeypatch):
    """Three stages in a chain: when the last runs, the first one's result is already gone."""
    from adaptkit.merge import engine

    first, final = stages(models)
    middle = dict(first, name="mid", models=[{"model": "mix", "parameters": {"weight": 0.5}},
                                             {"model": str(models / "base"), "parameters": {"weight": 0.5}}])
    seen = []
    real = engine.run_merge

    def spy(recipe, out, **options):
        folder = Path(out).parent  # the intermediates' folder (made with the first of them)
        seen.append(sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.exists() else [])
        return real(recipe, out, **options)

    monkeypatch.setattr(engine, "run_merge", spy)
    path = write(tmp_path / "m.yml", [first, middle, dict(final, models=[str(models / "base"), "mid"])], documents=True)
    assert adaptkit("merge", path, "-o", tmp_path / "out")[0] == 0
    assert seen == [[], ["mix"], ["mid"]] and leftovers(tmp_path) == []


def test_multi_stage_dry_run(models, tmp_path):
    code, out = adaptkit("merge", write(tmp_path / "m.yml", stages(models)[::-1], documents=True), "-o",
                         tmp_path / "out", "--dry-run", "--json")
    assert code == 0, out
    plan = json.loads(out)
    assert [(s["name"], s["method"], s["uses"]) for s in plan["stages"]] == [("mix", "linear", []),
                                                                            (None, "slerp", ["mix"])]
    # the stage on existing models is planned as a recipe of its own; the one on its result cannot be yet
    first, final = plan["stages"]
    alone = Plan(load_recipe({k: v for k, v in stages(models)[0].items() if k != "name"}))
    assert first["plan"]["working_bytes"] == alone.peak_bytes(default_workers(alone.method)) > 0
    assert first["plan"]["estimated_peak_bytes"] == first["plan"]["working_bytes"] + first["plan"]["process_bytes"]
    assert [g["parameters"]["weight"] for g in first["plan"]["groups"]] == [[0.7, 0.3]]
    assert first["plan"]["tensors"] == 3 + 9 * LAYERS and final["plan"] is None
    for dtype, size in (("float16", 2), ("float32", 4)):  # the command line's settings planned as each stage runs
        code, out = adaptkit("merge", tmp_path / "m.yml", "-o", tmp_path / "out", "--dry-run", "--json", "--out-dtype", dtype)
        assert json.loads(out)["stages"][0]["plan"]["output_bytes"] == size * first["plan"]["parameters"]
    code, text = adaptkit("merge", tmp_path / "m.yml", "-o", tmp_path / "out", "--dry-run")
    assert code == 0 and text.count("estimated peak") == 1 and "weight=[0.7, 0.3]" in text, text
    assert not (tmp_path / "out").exists()


MULTI_ERRORS = {
    "cycle": (lambda d: [dict(d[0], models=["again", str(d[0]["models"][1]["model"])]), dict(d[1], name="again",
              models=["mix"]), {**d[1], "models": [d[1]["models"][0], "again"]}],
              "the stages use each other in a cycle: again -> mix -> again"),
    "unknown name": (lambda d: [d[0], dict(d[1], models=[d[1]["models"][0], "mixx"])],
                     "stage (final): 'mixx' is neither a stage (stages: mix) nor a folder nor a Hub reference"),
    # as recipes written for mergekit-multi --intermediate-dir ./intermediates name a stage's folder
    "stage by its folder": (lambda d: [d[0], dict(d[1], models=[d[1]["models"][0], "./intermediates/mix"])],
                            "'./intermediates/mix' is neither a stage (stages: mix) nor a folder nor a Hub "
                            "reference; for the result of stage 'mix', write 'mix'"),
    "same name twice": (lambda d: [d[0], d[0], d[1]], "two stages are named 'mix'"),
    "two unnamed": (lambda d: [d[0], d[1], d[1]], "two documents have no name"),
    "unused stage": (lambda d: [d[0], dict(d[0], name="spare"), d[1]], "does not use stage 'spare'"),
    "bad name": (lambda d: [dict(d[0], name="../up"), d[1]], "a stage name is letters, digits"),
}


@pytest.mark.parametrize("case", MULTI_ERRORS)
def test_multi_stage_errors_are_one_line(models, tmp_path, case):
    edit, message = MULTI_ERRORS[case]
    path = write(tmp_path / "m.yml", edit(stages(models)), documents=True)
    code, out = adaptkit("merge", path, "-o", tmp_path / "out")
    assert code != 0 and message in out and len(out.strip().splitlines()) == 1, out
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_failing_second_stage_leaves_nothing_behind(models, tmp_path):
    """The first stage runs, the second fails in its operator: no output, no intermediate, no temporary
    folder; an existing output replaced with --force stays as it was."""
    docs = stages(models, {"merge_method": "ties", "parameters": {"density": 1.5}})
    docs[1]["models"] = [{"model": "mix", "parameters": {"weight": 1.0}}]
    path = write(tmp_path / "m.yml", docs, documents=True)
    code, out = adaptkit("merge", path, "-o", tmp_path / "out")
    assert code != 0 and "density" in out, out
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "file").write_text("old")
    assert adaptkit("merge", path, "-o", tmp_path / "kept", "--force")[0] != 0
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["file"] and leftovers(tmp_path) == []


def test_side_files_come_from_the_base_even_for_a_method_without_one(tmp_path):
    """mergekit takes config and tokenizer files from `base_model`, else the first model — also for
    linear, whose base is no input of its own."""
    from builders import llama_finetunes
    from hostile import run_cli

    root = llama_finetunes(tmp_path / "m", count=2)
    (root / "base" / "tokenizer_config.json").write_text('{"from": "base"}')
    (root / "ft1" / "tokenizer_config.json").write_text('{"from": "ft1"}')
    recipe = tmp_path / "linear.yml"
    recipe.write_text(f"merge_method: linear\nbase_model: {root / 'base'}\nmodels:\n"  # linear: the base is an input too
                      f"  - model: {root / 'ft1'}\n    parameters: {{weight: 0.4}}\n"
                      f"  - model: {root / 'ft2'}\n    parameters: {{weight: 0.4}}\n"
                      f"  - model: {root / 'base'}\n    parameters: {{weight: 0.2}}\n")
    result = run_cli("-q", "merge", recipe, "-o", tmp_path / "out", "--no-card")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "out" / "tokenizer_config.json").read_text() == '{"from": "base"}'


# A stage named as the model a tokenizer comes from: (id, recipe part, the same part once swapped)
TOKENIZER_REFS = [
    ("tokenizer_source model:", {"tokenizer_source": "model:mix"}, {"tokenizer_source": "model:/w/mix"}),
    ("tokenizer_source by name", {"tokenizer_source": "mix"}, {"tokenizer_source": "/w/mix"}),
    ("base and union stay", {"tokenizer_source": "union", "tokenizer": {"source": "base"}},
     {"tokenizer_source": "union", "tokenizer": {"source": "base"}}),
    ("tokenizer block", {"tokenizer": {"source": "mix", "tokens": {"<t>": {"source": "model:mix", "force": True},
                                                                     "<u>": {"source": {"kind": "model_token",
                                                                                        "model": "mix", "token": "a"}}}}},
     {"tokenizer": {"source": "/w/mix", "tokens": {"<t>": {"source": "model:/w/mix", "force": True},
                                                  "<u>": {"source": {"kind": "model_token", "model": "/w/mix",
                                                                     "token": "a"}}}}}),
]


@pytest.mark.parametrize("part,expected", [r[1:] for r in TOKENIZER_REFS], ids=[r[0] for r in TOKENIZER_REFS])
def test_a_stage_may_be_the_model_a_tokenizer_comes_from(part, expected):
    """Stage names in tokenizer settings are swapped for the stage's folder (and make a dependency) like
    stage names among the models; `base` and `union` are no model names."""
    from adaptkit.merge.multi import _rewrite

    assert _rewrite(part, lambda name: {"mix": "/w/mix"}.get(name, name)) == expected


# -- output heads tied to the embeddings -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tied_zoo(tmp_path_factory):
    """Three tiny Llamas, bf16: `untied0` and `untied2` store lm_head.weight, `tied1` ties it to its embeddings
    (tie_word_embeddings: true, so its checkpoint has no lm_head.weight)."""
    from builders import tiny_llama

    root = tmp_path_factory.mktemp("tied")
    for seed, name in enumerate(("untied0", "tied1", "untied2")):
        model = tiny_llama(seed=10 + seed, tie_word_embeddings=name.startswith("tied")).to(torch.bfloat16)
        model.save_pretrained(root / name)
    return root


def tied_recipe(zoo, first, second, method="linear", **extra):
    return {"models": [{"model": str(zoo / first), "parameters": {"weight": 0.5, **extra}},
                       {"model": str(zoo / second), "parameters": {"weight": 0.5, **extra}}],
            "merge_method": method, "dtype": "bfloat16"}


def test_a_head_tied_to_the_embeddings_is_read_from_them(tied_zoo, tmp_path):
    """As mergekit's `tied_names`: a model that leaves lm_head.weight out (tied) gives its embeddings for it,
    θ = (0.5·head₀ + 0.5·E₁) / (0.5 + 0.5) in float32, rounded once; adaptkit refused the recipe before."""
    from builders import merges_like_mergekit, state

    got, _, _ = merges_like_mergekit(tied_recipe(tied_zoo, "untied0", "tied1"), tmp_path)
    head, embed = state(tied_zoo / "untied0")["lm_head.weight"], state(tied_zoo / "tied1")["model.embed_tokens.weight"]
    assert torch.equal(got["lm_head.weight"], ((0.5 * head.float() + 0.5 * embed.float()) / 1.0).bfloat16())


def test_a_head_other_inputs_store_is_in_the_output(tied_zoo, tmp_path):
    """The first model ties its head, the other stores one: the output has lm_head.weight (mergekit's optional
    weight, present when any input has it), and a warning says the first model's config ties it."""
    from builders import merges_like_mergekit

    with pytest.warns(UserWarning, match=r"the output has 'lm_head.weight' \(other inputs store it\), but its "
                                         r"config.json, from .*tied1, says tie_word_embeddings: true"):
        got, _, _ = merges_like_mergekit(tied_recipe(tied_zoo, "tied1", "untied0"), tmp_path)
    assert "lm_head.weight" in got


@pytest.mark.parametrize("layout", ["ties", "slices"])
def test_a_tied_base_equals_mergekit(tied_zoo, tmp_path, layout):
    from builders import merges_like_mergekit

    if layout == "ties":
        recipe = {**tied_recipe(tied_zoo, "untied0", "untied2", "ties", density=0.5), "base_model": str(tied_zoo / "tied1")}
    else:
        recipe = {"slices": [{"sources": [{"model": str(tied_zoo / "tied1"), "layer_range": [0, 2]},
                                          {"model": str(tied_zoo / "untied0"), "layer_range": [0, 2]}]}],
                  "merge_method": "slerp", "base_model": str(tied_zoo / "tied1"), "parameters": {"t": 0.3},
                  "dtype": "bfloat16"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the tied config's warning: the test above)
        got, _, _ = merges_like_mergekit(recipe, tmp_path)
    assert "lm_head.weight" in got


def test_a_missing_tensor_without_a_tie_is_still_an_error(tied_zoo, tmp_path):
    from safetensors.torch import load_file

    broken = tmp_path / "broken"
    shutil.copytree(tied_zoo / "untied0", broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(AdaptkitError, match=r"tensor 'model.norm.weight' of .*untied2 is missing from .*broken"):
        run_merge({**tied_recipe(tied_zoo, "untied2", "x"), "parameters": {"weight": 0.5},
                   "models": [str(tied_zoo / "untied2"), str(broken)]}, tmp_path / "out", progress=False)


# -- checkpoints that name the same tensors otherwise --------------------------------------------------------------

def gpt2_checkpoints(root):
    """`hub`: GPT-2 saved as its own checkpoint is (from the bare GPT2Model: `h.0.…`, `wte.weight`, with the
    causal-mask buffers `h.N.attn.bias` and `attn.masked_bias`, config GPT2LMHeadModel); `lm`: a fine-tune
    saved from GPT2LMHeadModel (`transformer.h.0.…`, no buffers)."""
    from safetensors.torch import load_file
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model

    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64)
    torch.manual_seed(0)
    GPT2Model(config).save_pretrained(root / "hub")
    torch.manual_seed(1)
    GPT2LMHeadModel(config).save_pretrained(root / "lm")
    settings = json.loads((root / "hub/config.json").read_text())
    (root / "hub/config.json").write_text(json.dumps({**settings, "architectures": ["GPT2LMHeadModel"]}))
    tensors = load_file(root / "hub/model.safetensors")
    for i in range(2):
        tensors[f"h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64)
        tensors[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(tensors, root / "hub/model.safetensors", metadata={"format": "pt"})
    return root / "hub", root / "lm"


def test_a_bare_model_checkpoint_merges_with_a_language_model_one(tmp_path):
    """As mergekit's aliases: GPT-2's own checkpoint (bare names, mask buffers) and a fine-tune saved with the
    `transformer.` prefix; the buffers left out with a warning. The output keeps the first model's names and
    mergekit's values, and loads and runs in transformers."""
    from transformers import GPT2LMHeadModel

    from builders import mergekit_merge, state

    hub, lm = gpt2_checkpoints(tmp_path)
    for order in ((hub, lm), (lm, hub)):
        recipe = {"models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in order],
                  "merge_method": "linear", "dtype": "float32"}
        out = tmp_path / f"ours-{order[0].name}"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run_merge(recipe, out, progress=False, card=False)
        said = [str(w.message) for w in caught if "buffer" in str(w.message)]  # (only the first model's names are kept)
        assert said == (["4 buffer(s) such as 'h.0.attn.bias' are left out of the output: some inputs do not store "
                         "them (transformers makes them when it loads the model)"] if order[0] == hub else [])
        got, expected = state(out), mergekit_merge(recipe, tmp_path / f"mk-{order[0].name}")
        canonical = {n if n.startswith(("transformer.", "lm_head")) else "transformer." + n: t for n, t in got.items()}
        assert sorted(canonical) == sorted(expected) and all(torch.equal(canonical[n], expected[n]) for n in expected)
        assert next(iter(sorted(got))).startswith("transformer.") == (order[0] == lm)
        with torch.no_grad():
            assert torch.isfinite(GPT2LMHeadModel.from_pretrained(out)(torch.tensor([[1, 2, 3]])).logits).all()


def test_a_bare_model_checkpoint_in_slices(tmp_path):
    """The same checkpoints in a slices recipe: each layer's buffers are left out where a source lacks them."""
    from builders import mergekit_merge, state

    hub, lm = gpt2_checkpoints(tmp_path)
    recipe = {"slices": [{"sources": [{"model": str(m), "layer_range": [0, 2]} for m in (hub, lm)]}],
              "merge_method": "slerp", "base_model": str(hub), "parameters": {"t": 0.3}, "dtype": "float32"}
    run_merge(recipe, tmp_path / "ours", progress=False, card=False)
    got, expected = state(tmp_path / "ours"), mergekit_merge(recipe, tmp_path / "mk")
    assert sorted("transformer." + n for n in got) == sorted(expected)
    assert all(torch.equal(got[n], expected["transformer." + n]) for n in got)


def test_layer_norm_gamma_and_beta_are_weight_and_bias(tmp_path):
    """BERT checkpoints converted from TensorFlow name LayerNorm's weight and bias gamma and beta."""
    from safetensors.torch import load_file
    from transformers import BertConfig, BertForMaskedLM

    from builders import state

    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        vocab_size=100, max_position_embeddings=64)
    for seed in (0, 1):
        torch.manual_seed(seed)
        BertForMaskedLM(config).save_pretrained(tmp_path / f"b{seed}")
    tensors = load_file(tmp_path / "b1/model.safetensors")
    shutil.copytree(tmp_path / "b1", tmp_path / "tf")
    save_file({n.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): t
               for n, t in tensors.items()}, tmp_path / "tf/model.safetensors", metadata={"format": "pt"})
    recipe = {"models": [{"model": str(tmp_path / m), "parameters": {"weight": 0.5}} for m in ("b0", "tf")],
              "merge_method": "linear", "dtype": "float32"}
    run_merge(recipe, tmp_path / "out", progress=False, card=False)
    got, a = state(tmp_path / "out"), state(tmp_path / "b0")
    assert sorted(got) == sorted(a) and any(".LayerNorm.weight" in n for n in got)
    assert all(torch.equal(got[n], (0.5 * a[n] + 0.5 * tensors[n]) / 1.0) for n in a)


def test_buffers_stay_where_every_input_has_them(tmp_path):
    from safetensors.torch import load_file

    from builders import state, tiny_llama

    for seed in (0, 1, 2):
        tiny_llama(seed=seed).save_pretrained(tmp_path / f"m{seed}")
    frequencies = 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8)
    for seed in (0, 1):
        tensors = load_file(tmp_path / f"m{seed}/model.safetensors")
        tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = frequencies
        save_file(tensors, tmp_path / f"m{seed}/model.safetensors", metadata={"format": "pt"})
    both = {"models": [str(tmp_path / "m0"), str(tmp_path / "m1")], "merge_method": "linear",
            "parameters": {"weight": 0.5}, "dtype": "float32"}
    run_merge(both, tmp_path / "both", progress=False, card=False)
    assert torch.equal(state(tmp_path / "both")["model.layers.0.self_attn.rotary_emb.inv_freq"], frequencies)
    with pytest.warns(UserWarning, match="1 buffer"):
        run_merge({**both, "models": [str(tmp_path / "m0"), str(tmp_path / "m2")]}, tmp_path / "one", progress=False,
                  card=False)
    assert "model.layers.0.self_attn.rotary_emb.inv_freq" not in state(tmp_path / "one")


def tiny_mixtral_files(folder, seed: int, layers: int = 2) -> None:
    """A Mixtral of two experts a layer, tensors named as the checkpoint stores them (config.json written directly)."""
    shapes = {"model.embed_tokens.weight": (32, 8), "model.norm.weight": (8,), "lm_head.weight": (32, 8)}
    for i in range(layers):
        shapes |= {f"model.layers.{i}.block_sparse_moe.gate.weight": (2, 8), f"model.layers.{i}.self_attn.q_proj.weight": (8, 8)}
        for e in range(2):
            for w, shape in (("w1", (16, 8)), ("w2", (8, 16)), ("w3", (16, 8))):
                shapes[f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight"] = shape
    tiny_files(folder, {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_hidden_layers": layers,
                        "num_local_experts": 2}, shapes, seed)


def tiny_files(folder, config: dict, shapes: dict, seed: int = 0) -> None:
    """A checkpoint of these tensor names and shapes, random values from `seed`, and this config.json."""
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True)
    save_file({n: torch.randn(s, generator=g) for n, s in shapes.items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def mixtrals(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixtrals")
    for i in range(2):
        tiny_mixtral_files(root / f"m{i}", seed=i)
    return root


def fused_slerp(folders, layer: int, t_experts: float, t_gate: float) -> dict:
    """Layer `layer`'s expert and router tensors slerped by hand as mergekit 0.1.5 merges them in transformers 5's
    layout: w1 and w3 of every expert stacked (experts first) and the two stacks concatenated on their rows (one
    `mlp.experts.gate_up_proj`), the w2s stacked (`mlp.experts.down_proj`), each one slerp; the router is
    `mlp.gate.weight` there, so `filter: mlp` gives it t_gate."""
    from safetensors.torch import load_file

    from adaptkit import registry
    a, b = (load_file(f / "model.safetensors") for f in folders)
    slerp, out = registry.get("merge", "slerp"), {}
    at = f"model.layers.{layer}.block_sparse_moe."

    def stack(m, w):
        return torch.stack([m[f"{at}experts.{e}.{w}.weight"] for e in range(2)])

    gate_up = slerp.merge([torch.cat([stack(b, "w1"), stack(b, "w3")], dim=1)],
                          torch.cat([stack(a, "w1"), stack(a, "w3")], dim=1), t=t_experts)
    down = slerp.merge([stack(b, "w2")], stack(a, "w2"), t=t_experts)
    for e in range(2):
        out |= {f"{at}experts.{e}.w1.weight": gate_up[e, :16], f"{at}experts.{e}.w3.weight": gate_up[e, 16:],
                f"{at}experts.{e}.w2.weight": down[e]}
    out[f"{at}gate.weight"] = slerp.merge([b[f"{at}gate.weight"]], a[f"{at}gate.weight"], t=t_gate)
    return out


@pytest.mark.parametrize("layers", [None, (1, 2)])
def test_experts_merge_as_mergekit_merges_them(mixtrals, tmp_path, layers):
    """mergekit 0.1.5 merges a Mixtral's experts in transformers 5's fused layout, where slerp takes one angle
    over all experts of a layer and `filter: mlp` matches the router (`mlp.gate`): the same here, written back
    in the checkpoint's layout (converted.py); with slices, a layer taken from another place in the sources."""
    from safetensors.torch import load_file

    t = [{"filter": "mlp", "value": 0.3}, {"value": 0.6}]
    recipe = {"merge_method": "slerp", "base_model": str(mixtrals / "m0"), "dtype": "float32", "parameters": {"t": t}}
    if layers:
        recipe["slices"] = [{"sources": [{"model": str(mixtrals / m), "layer_range": list(layers)} for m in ("m0", "m1")]}]
    else:
        recipe["models"] = [{"model": str(mixtrals / "m1")}]
    run_merge(recipe, tmp_path / "out", progress=False, card=False)
    merged = load_file(tmp_path / "out" / "model.safetensors")
    source_layer, output_layer = (1, 0) if layers else (0, 0)
    want = fused_slerp([mixtrals / "m0", mixtrals / "m1"], source_layer, 0.3, 0.3)
    experts = {k.replace(f".{source_layer}.", f".{output_layer}.", 1) for k in want if ".experts." in k}
    if not layers:  # (both layers merged)
        experts |= {k.replace(".0.", ".1.", 1) for k in experts}
    assert {k for k in merged if ".experts." in k} == experts  # (the checkpoint's names, each expert's own)
    for name, value in want.items():
        assert torch.equal(merged[name.replace(f".{source_layer}.", f".{output_layer}.", 1)], value), name
    per_expert = fused_slerp([mixtrals / "m0", mixtrals / "m1"], source_layer, 0.6, 0.6)  # (what merging each
    assert not torch.equal(merged[f"model.layers.{output_layer}.block_sparse_moe.gate.weight"],  # stored name gave)
                           per_expert[f"model.layers.{source_layer}.block_sparse_moe.gate.weight"])


def test_experts_stay_as_stored_where_that_changes_no_number(mixtrals, models):
    """An elementwise method without filters gives the same numbers in either layout: nothing is fused (and
    transformers' table is not read); nor is a model without per-expert tensors."""
    from adaptkit.merge.engine import Plan

    linear = {"merge_method": "linear", "models": [{"model": str(mixtrals / m), "parameters": {"weight": 0.5}}
                                                   for m in ("m0", "m1")]}
    assert Plan(load_recipe(linear)).fused == {}
    slerp = {"merge_method": "slerp", "base_model": str(models / "base"), "models": [str(models / "ft1")],
             "parameters": {"t": [{"filter": "mlp", "value": 0.3}, {"value": 0.6}]}}
    assert Plan(load_recipe(slerp)).fused == {}
    fused = Plan(load_recipe({**slerp, "base_model": str(mixtrals / "m0"), "models": [str(mixtrals / "m1")]}))
    assert sorted(fused.fused) == [f"model.layers.{i}.mlp.{n}" for i in range(2)
                                   for n in ("experts.down_proj", "experts.gate_up_proj", "gate.weight")]


def test_a_conversion_step_not_followed_is_a_warning(mixtrals, tmp_path, monkeypatch):
    """A step of transformers' table other than stacking and concatenating is not followed: the merge warns that
    mergekit's numbers differ, and merges the tensors as stored."""
    import transformers.conversion_mapping as table
    from transformers.core_model_loading import MergeModulelist, Transpose, WeightConverter

    from adaptkit.merge import converted

    monkeypatch.delitem(converted.TABLE, "mixtral")  # (read from transformers' table, then)
    odd = [WeightConverter([".experts.*.w2.weight"], [".experts.down_proj"], operations=[MergeModulelist(dim=0),
                                                                                           Transpose(dim0=1, dim1=2)])]
    monkeypatch.setattr(table, "get_checkpoint_conversion_mapping", lambda model_type: odd)
    recipe = {"merge_method": "slerp", "base_model": str(mixtrals / "m0"), "models": [str(mixtrals / "m1")],
              "parameters": {"t": 0.6}}
    with pytest.warns(UserWarning, match=r"^mixtral: mergekit 0.1.5 merges these experts in transformers 5's "
                                         r"layout \('model.layers.0.block_sparse_moe.experts.0.w2.weight' read as "
                                         r"'model.layers.0.block_sparse_moe.experts.down_proj'\), where each statistic "
                                         r"covers all experts at once: its numbers differ from these. adaptkit merges "
                                         r"and writes the checkpoint's tensors as stored$"):
        run_merge(recipe, tmp_path / "out", progress=False, card=False)


def test_experts_of_different_shapes_are_one_line(tmp_path):
    """A checkpoint whose experts of a layer differ in shape cannot be stacked (nor loaded by transformers): one
    line naming the tensor, before anything is written."""
    from safetensors.torch import load_file

    for i in range(2):
        tiny_mixtral_files(tmp_path / f"m{i}", seed=i)
        weights = load_file(tmp_path / f"m{i}" / "model.safetensors")
        weights["model.layers.0.block_sparse_moe.experts.1.w1.weight"] = torch.zeros(12, 8)
        save_file(weights, tmp_path / f"m{i}" / "model.safetensors")
    recipe = write(tmp_path / "r.yml", {"merge_method": "slerp", "base_model": str(tmp_path / "m0"),
                                        "models": [str(tmp_path / "m1")], "parameters": {"t": 0.3}})
    code, output = adaptkit("merge", recipe, "-o", tmp_path / "out")
    assert code == 1 and output.strip().splitlines() == [
        f"error: 'model.layers.0.block_sparse_moe.experts.1.w1.weight' of {tmp_path / 'm0'} has shape (12, 8) where "
        "'model.layers.0.block_sparse_moe.experts.0.w1.weight' has (16, 8): a layer's experts must be alike "
        "(transformers stacks them)"]
    assert not (tmp_path / "out").exists()


def test_a_tensor_transformers_splits_merges_as_its_parts(tmp_path):
    """GTE's checkpoint stores q, k and v as one `qkv_proj`, which transformers 5 splits into three equal row
    chunks (`self_attn.q_proj` …), and mergekit 0.1.5 merges each (its own slerp angle): so here, written back into
    the stored tensor; `filter: self_attn` matches them and the renamed `o_proj` (stored `attention.o_proj`), as
    mergekit's names. Kimi-Linear's q, k and v convolutions are one `conv1d` there (concatenated on their rows,
    however many each has: one slerp), written back each as stored. A step in place (Qwen3-VL-MoE's transposed stacks, which mergekit
    reads as stored) changes nothing, and one that is not followed (Inkling's interleaved experts) is the
    warning."""
    from safetensors.torch import load_file

    from adaptkit import registry

    gte = {"embeddings.word_embeddings.weight": (32, 8), "encoder.layer.0.attention.qkv_proj.weight": (24, 8),
           "encoder.layer.0.attention.qkv_proj.bias": (24,), "encoder.layer.0.attention.o_proj.weight": (8, 8),
           "encoder.layer.0.attn_ln.weight": (8,)}
    stacked = {"model.language_model.embed_tokens.weight": (32, 8),
               "model.language_model.layers.0.mlp.experts.gate_up_proj": (2, 8, 32)}
    kimi = {"model.embed_tokens.weight": (32, 8), **{f"model.layers.0.self_attn.{x}_conv1d.weight": (rows, 1, 4)
                                                      for x, rows in zip("qkv", (8, 8, 12))}}  # (v's heads wider)
    inkling = {"model.embed_tokens.weight": (32, 8), "model.layers.0.mlp.experts.w13_weight": (2, 16, 8)}
    for model_type, shapes in (("gte", gte), ("qwen3_vl_moe", stacked), ("kimi_linear", kimi), ("inkling2_text", inkling)):
        for i in range(2):
            tiny_files(tmp_path / model_type / f"m{i}", {"model_type": model_type, "num_hidden_layers": 1}, shapes, i)

    def recipe(model_type):
        return {"merge_method": "slerp", "base_model": str(tmp_path / model_type / "m0"), "dtype": "float32",
                "models": [str(tmp_path / model_type / "m1")],
                "parameters": {"t": [{"filter": "self_attn", "value": 0.3}, {"value": 0.6}]}}

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_merge(recipe("gte"), tmp_path / "out", progress=False, card=False)
        run_merge(recipe("kimi_linear"), tmp_path / "kimi", progress=False, card=False)
        assert Plan(load_recipe(recipe("qwen3_vl_moe"))).fused == {}
    a, b, merged = (load_file(f / "model.safetensors") for f in (tmp_path / "gte" / "m0", tmp_path / "gte" / "m1",
                                                                  tmp_path / "out"))
    slerp = registry.get("merge", "slerp")
    for name in ("encoder.layer.0.attention.qkv_proj.weight", "encoder.layer.0.attention.qkv_proj.bias"):
        parts = [slerp.merge([y], x, t=0.3) for x, y in zip(a[name].chunk(3), b[name].chunk(3))]
        assert torch.equal(merged[name], torch.cat(parts)), name
        assert not torch.equal(merged[name], slerp.merge([b[name]], a[name], t=0.3))  # (one angle: not mergekit's)
    name = "encoder.layer.0.attention.o_proj.weight"
    assert torch.equal(merged[name], slerp.merge([b[name]], a[name], t=0.3))
    name = "encoder.layer.0.attn_ln.weight"  # (renamed `layers.0.post_attention_layernorm.weight`: one vector)
    assert torch.equal(merged[name], slerp.merge([b[name]], a[name], t=0.6))
    name = "embeddings.word_embeddings.weight"
    assert torch.equal(merged[name], slerp.merge([b[name]], a[name], t=0.6))
    a, b, merged = (load_file(f / "model.safetensors") for f in (tmp_path / "kimi_linear" / "m0",
                                                                  tmp_path / "kimi_linear" / "m1", tmp_path / "kimi"))
    names = [f"model.layers.0.self_attn.{x}_conv1d.weight" for x in "qkv"]
    conv = slerp.merge([torch.cat([b[n] for n in names])], torch.cat([a[n] for n in names]), t=0.3)
    for n, part in zip(names, conv.split([8, 8, 12])):
        assert torch.equal(merged[n], part), n
    with pytest.warns(UserWarning, match=r"^inkling2_text: mergekit 0.1.5 merges this model in transformers 5's layout "
                                         r"\('model.layers.0.mlp.experts.w13_weight' read as "
                                         r"'model.layers.0.mlp.experts.gate_up_proj'\), where each statistic covers a "
                                         r"tensor as transformers 5 builds it and its filters match the names there: its "
                                         r"numbers differ from these"):
        assert Plan(load_recipe(recipe("inkling2_text"))).fused == {}


def test_a_tensor_split_in_unequal_parts_is_one_line(tmp_path):
    """A `qkv_proj` whose rows do not split into three equal parts cannot be what transformers loads: one line."""
    shapes = {"embeddings.word_embeddings.weight": (32, 8), "encoder.layer.0.attention.qkv_proj.weight": (25, 8)}
    for i in range(2):
        tiny_files(tmp_path / f"m{i}", {"model_type": "gte", "num_hidden_layers": 1}, shapes, i)
    recipe = write(tmp_path / "r.yml", {"merge_method": "slerp", "base_model": str(tmp_path / "m0"),
                                        "models": [str(tmp_path / "m1")], "parameters": {"t": 0.3}})
    code, output = adaptkit("merge", recipe, "-o", tmp_path / "out")
    assert code == 1 and output.strip().splitlines() == [
        f"error: 'encoder.layer.0.attention.qkv_proj.weight' of {tmp_path / 'm0'} has shape (25, 8): transformers "
        "splits it into 3 equal parts on its rows"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model_type", sorted(__import__("adaptkit.merge.converted", fromlist=["ONLY_RENAMED"]).ONLY_RENAMED))
def test_only_renamed_model_types_are_transformers(model_type):
    """converted.ONLY_RENAMED lists model types whose tensors transformers 5's table at most renames (a merge of
    one without per-expert tensors then reads nothing from it): no step of theirs builds a tensor."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightConverter

    assert not any(isinstance(t, WeightConverter) for t in get_checkpoint_conversion_mapping(model_type) or [])


@pytest.mark.parametrize("model_type", sorted(__import__("adaptkit.merge.converted", fromlist=["TABLE"]).TABLE))
def test_built_in_conversion_steps_are_transformers(model_type):
    """converted.TABLE writes out transformers 5's conversion table for the MoE checkpoints most merged (so
    that merging them does not import it): each step as transformers' (patterns, stacking, concatenation
    axis), and the same new name for per-expert and renamed tensors."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter

    from adaptkit.merge.converted import TABLE

    theirs, ours = get_checkpoint_conversion_mapping(model_type), TABLE[model_type]
    assert len(theirs) == len(ours)
    for t, step in zip(theirs, ours):
        assert (list(t.source_patterns), list(t.target_patterns)) == (list(step.sources), [step.target])
        ops = [(type(o), getattr(o, "dim", None)) for o in getattr(t, "operations", None) or []]
        want = [(MergeModulelist, 0)] + ([(Concatenate, step.axis)] if len(step.sources) > 1 else [])
        assert isinstance(t, WeightConverter) == step.stack and ops == (want if step.stack else [])
    names = [f"model.layers.3.{where}.{e}.{w}.weight" for where in ("block_sparse_moe.experts", "mlp.experts",
             "feed_forward.experts") for e in (0, 7) for w in ("w1", "w2", "w3", "gate_proj", "up_proj", "down_proj")]
    for name in names + ["model.layers.3.block_sparse_moe.gate.weight", "model.layers.3.self_attn.q_proj.weight"]:
        mine = theirs_ = name
        for t, step in zip(theirs, ours):
            theirs_, mine = t.rename_source_key(theirs_)[0], step.apply(mine)[0]
        assert mine == theirs_, name


@pytest.mark.parametrize("stacked", [True, False])
def test_built_in_steps_import_no_transformers(tmp_path, stacked):
    """A merge of a Mixtral whose experts are stacked reads converted.TABLE, and a filtered slerp of a Llama
    (converted.ONLY_RENAMED) nothing: neither imports transformers' table."""
    import subprocess
    import sys

    for i in range(2):
        (tiny_mixtral_files if stacked else tiny_llama_files)(tmp_path / f"m{i}", seed=i)
    recipe = write(tmp_path / "r.yml", {"merge_method": "slerp", "base_model": str(tmp_path / "m0"),
                                        "models": [str(tmp_path / "m1")],
                                        "parameters": {"t": [{"filter": "mlp", "value": 0.3}, {"value": 0.6}]}})
    code = ("import sys; from adaptkit.merge.engine import Plan; from adaptkit.merge.recipe import load_recipe; "
            f"plan = Plan(load_recipe({str(recipe)!r})); assert bool(plan.fused) == {stacked}, plan.fused; "
            "print('transformers' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr[-2000:]


def test_stacked_experts_of_a_quantized_base_are_packed_again(mixtrals, tmp_path):
    """--requantize with a quantized Mixtral base whose experts merge stacked: each expert's merged matrix is
    packed again, as the base's quantizer packs the same merge written plainly."""
    from adaptkit import registry
    from adaptkit.io.store import open_store

    quantized = tmp_path / "m0q"
    assert adaptkit("quantize", mixtrals / "m0", "--method", "nf4", "-o", quantized)[0] == 0
    recipe = write(tmp_path / "r.yml", {"merge_method": "slerp", "base_model": str(quantized),
                                        "models": [str(mixtrals / "m1")], "parameters": {"t": 0.6}})
    for out, extra in (("packed", ["--requantize"]), ("plain", [])):
        code, output = adaptkit("merge", recipe, "-o", tmp_path / out, *extra)
        assert code == 0, output
    nf4, name = registry.get("quantizer", "nf4"), "model.layers.1.block_sparse_moe.experts.1.w3.weight"
    with open_store(tmp_path / "packed") as packed, open_store(tmp_path / "plain") as plain:
        got = {k.replace(name, "weight", 1): packed.get(k) for k in packed.keys() if k.startswith(name)}
        want = nf4.quantize(plain.get(name))
    assert got.keys() == want.keys() and len(got) > 1
    for key in got:
        assert torch.equal(got[key], want[key]), key
