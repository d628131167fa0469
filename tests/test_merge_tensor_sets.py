"""Inputs holding different tensors: a recipe's `tensors: union | intersection` (or --tensors), mergekit-pytorch's
--tensor-union and --tensor-intersection. Each tensor of a union is merged over the inputs that have it: the
bytes mergekit 0.1.5's `mergekit-pytorch` writes (its `plan_flat_merge`, executed in process on CPU). Where
mergekit drops a tensor only the base has, adaptkit keeps the base's; where the base lacks one that a
method with a base needs, both refuse.
"""
from __future__ import annotations

import json
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from adaptkit.errors import AdaptkitError
from adaptkit.merge import run_merge
from hostile import run_cli

# m0 (the base where a method takes one) has every tensor but 'only2'; the others lack some ('pos' is an
# integer buffer, as transformers' position ids).
TENSORS = {
    0: {"a": (4, 6), "b": (5,), "c": (7,), "e": (3, 2), "pos": (4,)},
    1: {"a": (4, 6), "c": (7,), "e": (3, 2), "pos": (4,)},
    2: {"a": (4, 6), "b": (5,), "c": (7,), "only2": (2, 2)},
    3: {"a": (4, 6), "b": (5,), "c": (7,), "e": (3, 2)},
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sets")
    paths = []
    for i, shapes in TENSORS.items():
        g = torch.Generator().manual_seed(20 + i)
        tensors = {k: torch.arange(s[0]) if k == "pos" else torch.randn(s, generator=g).to(torch.bfloat16)
                   for k, s in shapes.items()}
        paths.append(folder / f"m{i}.safetensors")
        save_file(tensors, paths[-1])
    return paths


def _mergekit_pytorch(recipe: dict, out, mode: str):
    from mergekit.graph import Executor
    from mergekit.options import MergeOptions
    from mergekit.scripts.merge_raw_pytorch import RawPyTorchMergeConfig, SimpleLoaderCache, plan_flat_merge

    SimpleLoaderCache._instance = None  # (its loaders are a process-wide cache)
    config = RawPyTorchMergeConfig.model_validate(recipe)
    tasks = plan_flat_merge(config, str(out), mode == "union", mode == "intersection", MergeOptions(device="cpu"))
    Executor(tasks, math_device="cpu", storage_device="cpu").execute()
    return load_file(out / "model.safetensors")


def _ours(recipe: dict, out, mode: str):
    with pytest.warns(UserWarning, match=r"not in every input"):
        run_merge({**recipe, "tensors": mode}, out, progress=False)
    return load_file(out / "model.safetensors")


def _models(files, which, **params):
    return [{"model": str(files[i]), "parameters": params or {"weight": 0.3 + 0.2 * i}} for i in which]


RECIPES = {  # methods without a base see every input's tensors; those with one, the base's
    "linear": lambda f: {"merge_method": "linear", "models": _models(f, (0, 1, 2))},
    "linear_unnormalized": lambda f: {"merge_method": "linear", "parameters": {"normalize": False},
                                      "models": _models(f, (0, 1, 2))},
    "karcher": lambda f: {"merge_method": "karcher", "models": [{"model": str(p)} for p in f[:3]]},
    "task_arithmetic": lambda f: {"merge_method": "task_arithmetic", "base_model": str(f[0]),
                                  "models": _models(f, (1, 3))},
    "ties": lambda f: {"merge_method": "ties", "base_model": str(f[0]), "parameters": {"density": 0.5},
                       "models": _models(f, (1, 3))},
}


@pytest.mark.parametrize("method", RECIPES)
@pytest.mark.parametrize("mode", ["union", "intersection"])
def test_mergekit_pytorch_bytes(files, tmp_path, method, mode):
    """Every tensor mergekit writes, byte for byte, and no other (each tensor here is in some input other
    than the base: see the next tests for one that is not)."""
    recipe = RECIPES[method](files)
    theirs = _mergekit_pytorch(recipe, tmp_path / "mk", mode)
    ours = _ours(recipe, tmp_path / "ours", mode)
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype
        assert torch.equal(ours[name], tensor), name


def test_union_formula(files, tmp_path):
    """A tensor some inputs lack is the weighted mean over those that have it (mergekit's normalize): 'b' of
    m0 and m2, 'e' of m0 and m1, 'only2' m2's own, 'a' and 'c' of all three; bf16, computed in bf16 as mergekit's."""
    recipe = RECIPES["linear"](files)
    out = _ours(recipe, tmp_path / "o", "union")
    m = [load_file(p) for p in files]
    w = [0.3, 0.5, 0.7]

    def mean(name, which):
        total = sum(w[i] for i in which)
        acc = sum(m[i][name].float() * w[i] for i in which)  # within float32 of mergekit's bf16 steps
        return acc / total

    assert set(out) == {"a", "b", "c", "e", "pos", "only2"}
    for name, which in {"a": (0, 1, 2), "b": (0, 2), "c": (0, 1, 2), "e": (0, 1), "only2": (2,)}.items():
        torch.testing.assert_close(out[name].float(), mean(name, which), atol=2e-2, rtol=2e-2)
    assert torch.equal(out["only2"], m[2]["only2"])  # one input: its own tensor
    assert torch.equal(out["pos"], torch.arange(4))


def test_intersection_leaves_out_and_says_so(files, tmp_path):
    with pytest.warns(UserWarning, match=r"4 tensor\(s\) such as 'b' are not in every input: left out"):
        run_merge({**RECIPES["linear"](files), "tensors": "intersection"}, tmp_path / "o", progress=False)
    assert set(load_file(tmp_path / "o" / "model.safetensors")) == {"a", "c"}


def test_union_keeps_a_tensor_only_the_base_has(files, tmp_path):
    """mergekit-pytorch lists tensors from `models` only, so a tensor only the base has is missing from its
    output; adaptkit writes the base's (the merge of no task vector is the base)."""
    recipe = {"merge_method": "task_arithmetic", "base_model": str(files[0]),
              "models": [{"model": str(files[1]), "parameters": {"weight": 0.5}}]}
    theirs = _mergekit_pytorch(recipe, tmp_path / "mk", "union")
    ours = _ours(recipe, tmp_path / "ours", "union")
    assert "b" not in theirs and set(ours) - set(theirs) == {"b"}
    assert torch.equal(ours["b"], load_file(files[0])["b"])
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name


def test_union_base_lacks_a_tensor(files, tmp_path):
    recipe = {**RECIPES["task_arithmetic"](files), "models": _models(files, (1, 2)), "tensors": "union"}
    with pytest.raises(AdaptkitError, match=r"tensor 'only2' is not in the base model .*m0.safetensors"):
        run_merge(recipe, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_union_too_few_inputs_for_the_method(files, tmp_path):
    """slerp needs two models: a tensor only one has is an error that says so (as mergekit's), nothing written."""
    recipe = {"merge_method": "slerp", "parameters": {"t": 0.5}, "tensors": "union",
              "models": [{"model": str(files[0])}, {"model": str(files[1])}]}
    with pytest.warns(UserWarning), pytest.raises(AdaptkitError, match=r"tensor '\w+' is in 1 of 2 inputs: slerp: "):
        run_merge(recipe, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_without_a_setting_the_error_points_at_it(files, tmp_path):
    with pytest.raises(AdaptkitError, match=r"is missing from .*`tensors: union` or `intersection`, or --tensors"):
        run_merge(RECIPES["linear"](files), tmp_path / "o", progress=False)


def test_shapes_must_agree(tmp_path):
    save_file({"a": torch.zeros(2, 3), "x": torch.zeros(4)}, tmp_path / "p.safetensors")
    save_file({"a": torch.zeros(2, 3), "x": torch.zeros(5), "y": torch.zeros(1)}, tmp_path / "q.safetensors")
    recipe = {"merge_method": "linear", "tensors": "union",
              "models": [{"model": str(tmp_path / n), "parameters": {"weight": 1.0}} for n in ("p.safetensors", "q.safetensors")]}
    with pytest.warns(UserWarning), pytest.raises(AdaptkitError, match=r"tensor 'x' has shape \(5,\) in .* but \(4,\)"):
        run_merge(recipe, tmp_path / "o", progress=False)


@pytest.mark.parametrize("bad, message", [
    ({"tensors": "all"}, r"tensors must be 'union' or 'intersection', got 'all'"),
    ({"tensors": 3}, r"tensors must be"),
    ({"output": {"kind": "adapter", "rank": 4}}, r"applies to a `models:` recipe that makes a model; an adapter"),
])
def test_refused(files, tmp_path, bad, message):
    recipe = {**RECIPES["linear"](files), "tensors": "union", **bad}
    with pytest.raises(AdaptkitError, match=message):
        run_merge(recipe, tmp_path / "o", progress=False)


def test_refused_with_slices(files, tmp_path):
    recipe = {"merge_method": "passthrough", "tensors": "union",
              "slices": [{"sources": [{"model": str(files[0]), "layer_range": [0, 1]}]}]}
    with pytest.raises(AdaptkitError, match=r"slices name their tensors layer by layer"):
        run_merge(recipe, tmp_path / "o", progress=False)


def test_cli(files, tmp_path):
    """--tensors on the quick form and over a recipe; the output's adaptkit_recipe.yml records it; --dry-run
    shows it; a bad value is click's one-line usage error."""
    out = tmp_path / "quick"
    result = run_cli("merge", "--method", "linear", "-m", f"{files[0]}:0.3", "-m", f"{files[2]}:0.7",
                     "--tensors", "intersection", "-o", out)
    assert result.exit_code == 0, result.output
    assert set(load_file(out / "model.safetensors")) == {"a", "b", "c"}
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump(RECIPES["linear"](files)))
    result = run_cli("merge", recipe, "--tensors", "union", "-o", tmp_path / "u")
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((tmp_path / "u" / "adaptkit_recipe.yml").read_text())["tensors"] == "union"
    assert len(load_file(tmp_path / "u" / "model.safetensors")) == 6
    result = run_cli("merge", recipe, "--tensors", "union", "-o", tmp_path / "d", "--dry-run")
    assert result.exit_code == 0 and "tensors union" in result.output and "6 tensors" in result.output
    assert f"(1 tensor of {files[2]}): weight=[0.7], normalize=true" in result.output  # 'only2'
    result = run_cli("merge", recipe, "--tensors", "union", "-o", tmp_path / "d", "--dry-run", "--json")
    groups = json.loads(result.stdout)["groups"]
    assert {g["tensors"][0]: g.get("inputs") for g in groups if len(g["tensors"]) == 1}["only2"] == [str(files[2])]
    result = run_cli("merge", recipe, "--tensors", "both", "-o", tmp_path / "x")
    assert result.exit_code != 0 and "'both' is not one of 'union', 'intersection'" in result.output


def test_pipeline_folders(tmp_path):
    """Pipeline folders keep the first input's files and names in the output: a union tensor it lacks has
    no place there (refused, naming the way out); the other order, and an intersection, merge."""
    for name, extra in (("p1", {}), ("p2", {"extra.weight": torch.ones(3)})):
        (tmp_path / name / "unet").mkdir(parents=True)
        save_file({"conv_in.weight": torch.full((2, 2), float(len(extra))), **extra},
                  tmp_path / name / "unet" / "diffusion_pytorch_model.safetensors")
        (tmp_path / name / "model_index.json").write_text(json.dumps(
            {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}))

    def recipe(*names, mode):
        return {"merge_method": "linear", "tensors": mode,
                "models": [{"model": str(tmp_path / n), "parameters": {"weight": 1.0}} for n in names]}

    with pytest.warns(UserWarning), pytest.raises(AdaptkitError, match=r"'unet.extra.weight' is not in .*p1, whose files "
                                                                   r"and names the output keeps .*: list first an input"):
        run_merge(recipe("p1", "p2", mode="union"), tmp_path / "o1", progress=False)
    assert not (tmp_path / "o1").exists()
    with pytest.warns(UserWarning):
        run_merge(recipe("p2", "p1", mode="union"), tmp_path / "o2", progress=False)
        run_merge(recipe("p1", "p2", mode="intersection"), tmp_path / "o3", progress=False)
    union = load_file(tmp_path / "o2" / "unet" / "diffusion_pytorch_model.safetensors")
    assert torch.equal(union["extra.weight"], torch.ones(3)) and torch.equal(union["conv_in.weight"], torch.full((2, 2), 0.5))
    assert set(load_file(tmp_path / "o3" / "unet" / "diffusion_pytorch_model.safetensors")) == {"conv_in.weight"}
