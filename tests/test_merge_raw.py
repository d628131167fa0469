"""Recipes over lone weight files, mergekit-pytorch's inputs (`models: - model: path/to/file.safetensors`):
the same bytes as mergekit 0.1.5's `mergekit-pytorch` (its `plan_flat_merge`, executed in process on
CPU), and nothing from beside the files in the output (a folder of downloads is not the model's).
"""
from __future__ import annotations

import os

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from adaptkit.merge import run_merge
from hostile import run_cli

SHAPES = {"encoder.proj.weight": (16, 8), "encoder.proj.bias": (16,), "head.weight": (4, 16)}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Three bf16 checkpoints (a base and two fine-tunes) in one folder with other people's files."""
    folder = tmp_path_factory.mktemp("downloads")
    base = {k: torch.randn(s, generator=torch.Generator().manual_seed(len(k))) for k, s in SHAPES.items()}
    for i in range(3):
        g = torch.Generator().manual_seed(10 + i)
        tensors = {k: (v + (0.1 * torch.randn(v.shape, generator=g) if i else 0)).to(torch.bfloat16)
                   for k, v in base.items()}
        save_file(tensors, folder / f"m{i}.safetensors")
    (folder / "config.json").write_text('{"model_type": "llama"}')  # someone else's
    (folder / "notes.txt").write_text("not a model file")
    return [folder / f"m{i}.safetensors" for i in range(3)]


def _mergekit_pytorch(recipe: dict, out):
    from mergekit.graph import Executor
    from mergekit.options import MergeOptions
    from mergekit.scripts.merge_raw_pytorch import RawPyTorchMergeConfig, plan_flat_merge

    config = RawPyTorchMergeConfig.model_validate(recipe)
    tasks = plan_flat_merge(config, str(out), False, False, MergeOptions(device="cpu"))
    Executor(tasks, math_device="cpu", storage_device="cpu").execute()
    return load_file(out / "model.safetensors")


RECIPES = {
    "linear": lambda f: {"merge_method": "linear", "models": [{"model": str(f[1]), "parameters": {"weight": 0.3}},
                                                              {"model": str(f[2]), "parameters": {"weight": 0.7}}]},
    "task_arithmetic": lambda f: {"merge_method": "task_arithmetic", "base_model": str(f[0]),
                                  "models": [{"model": str(p), "parameters": {"weight": 0.6}} for p in f[1:]]},
    "ties": lambda f: {"merge_method": "ties", "base_model": str(f[0]), "parameters": {"density": 0.5},
                       "models": [{"model": str(p), "parameters": {"weight": 0.5}} for p in f[1:]]},
    "slerp": lambda f: {"merge_method": "slerp", "base_model": str(f[1]), "parameters": {"t": 0.3},
                        "models": [{"model": str(f[1])}, {"model": str(f[2])}]},
    "model_stock": lambda f: {"merge_method": "model_stock", "base_model": str(f[0]),
                              "models": [{"model": str(p)} for p in f[1:]]},
}


@pytest.mark.parametrize("method", RECIPES)
def test_lone_files_merge_as_mergekit_pytorch_merges_them(tmp_path, files, method):
    recipe = {**RECIPES[method](files), "dtype": "bfloat16"}
    theirs = _mergekit_pytorch(recipe, tmp_path / "mk")
    run_merge(recipe, tmp_path / "ours")
    ours = load_file(tmp_path / "ours" / "model.safetensors")
    assert sorted(ours) == sorted(theirs) == sorted(SHAPES)
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype and torch.equal(ours[name], tensor), name
    # the files beside the inputs are not the model's: only the weights, the card and the recipe
    assert sorted(os.listdir(tmp_path / "ours")) == ["README.md", "adaptkit_recipe.yml", "model.safetensors"]
    card = (tmp_path / "ours" / "README.md").read_text()
    assert "library_name" not in card.split("---")[1]  # weights alone: no library loads the folder


def test_a_lone_file_quantized_gets_nothing_from_beside_it(tmp_path, files):
    result = run_cli("quantize", files[0], "-o", tmp_path / "q", "--method", "int8")
    assert result.exit_code == 0, result.stderr
    assert not {"config.json", "notes.txt"} & set(os.listdir(tmp_path / "q"))


def test_files_with_other_tensors_are_one_line(tmp_path, files):
    """mergekit-pytorch stops at a tensor some input lacks (unless -u/-i); adaptkit names it."""
    save_file({k: torch.zeros(s, dtype=torch.bfloat16) for k, s in SHAPES.items() if k != "head.weight"},
              tmp_path / "short.safetensors")
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(files[1]), "parameters": {"weight": 1}}, {"model": str(tmp_path / "short.safetensors"),
                                                                "parameters": {"weight": 1}}]}))
    result = run_cli("merge", recipe, "-o", tmp_path / "out")
    assert result.exit_code == 1 and "tensor 'head.weight'" in result.stderr and "missing from" in result.stderr
    assert not (tmp_path / "out").exists()
