"""Tiny models built from configs (no download), shared by the tests and benchmarks."""
from __future__ import annotations


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def tiny_llama(seed: int = 0, **overrides):
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


def tiny_gpt2(seed: int = 0):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def fit_to_teacher(student, teacher, handle, steps: int = 40, lr: float = 5e-2) -> list[float]:
    """AdamW on the adapter of `student` towards `teacher`'s outputs on fixed random inputs (an MLP
    taking 8 features); the loss of each step."""
    import torch
    from torch import nn

    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = teacher(x)
    opt = torch.optim.AdamW(handle.param_groups(lr), weight_decay=0.0)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(student(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def state(folder) -> dict:
    """Every tensor of the safetensors files in `folder`, by name (all shards)."""
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def mergekit_merge(recipe: dict, out, **options) -> dict:
    """mergekit's own merge of `recipe` into `out` (no tokenizer copy or card unless `options` say), its tensors."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions
    from mergekit.merge import run_merge as mk_run

    from mergekit.io.tasks import LoaderCache

    # mergekit keeps its loaders for the process, by model reference: a `base+lora` read again after other
    # options (--lora-merge-dtype) would be the first run's merged model
    LoaderCache.loaders.clear()
    settings = {**dict(copy_tokenizer=False, write_model_card=False, quiet=True, lazy_unpickle=False), **options}
    mk_run(MergeConfiguration.model_validate(yaml.safe_load(yaml.safe_dump(recipe))), str(out), MergeOptions(**settings))
    return state(out)


def mergekit_moe(config: dict, out, seed: int | None = None, **options):
    """mergekit 0.1.5's `mergekit-moe` (its `build`, in process, on CPU) of a config into `out`; `options`:
    its other command-line settings (load_in_4bit, load_in_8bit)."""
    import torch
    from mergekit.moe.config import MoEMergeConfig
    from mergekit.options import MergeOptions
    from mergekit.scripts.moe import build

    if seed is not None:
        torch.manual_seed(seed)  # what mergekit's --random-seed does (transformers' set_seed) for CPU torch
    build(MoEMergeConfig.model_validate(config), str(out), MergeOptions(device="cpu"), device="cpu", **options)
    return out


def merges_like_mergekit(recipe: dict, folder, ours: str = "ours", theirs: str = "mk", **options) -> tuple:
    """adaptkit's and mergekit's merge of `recipe` into `folder`/`ours` and `folder`/`theirs`, checked to have the
    same tensors, dtypes and bytes; (the tensors, adaptkit's config.json, mergekit's)."""
    import json

    import torch

    from adaptkit.merge.engine import run_merge

    run_merge(recipe, folder / ours, progress=False, card=False)
    expected, got = mergekit_merge(recipe, folder / theirs, **options), state(folder / ours)
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert got[name].dtype == expected[name].dtype, name
        assert torch.equal(got[name], expected[name]), name
    return got, *(json.loads((folder / d / "config.json").read_text()) for d in (ours, theirs))


def mergekit_architectures():
    """(file name, table) for each architecture table mergekit ships, in name order."""
    import importlib.resources
    import json

    from mergekit import _data

    for path in sorted(importlib.resources.files(_data).joinpath("architectures").iterdir(), key=lambda p: p.name):
        if path.name.endswith(".json"):
            yield path.name, json.loads(path.read_text())


def assert_before_and_after(info: dict, where: str) -> None:
    """A table's pre_weights are named as before the layers (slices.BEFORE_LAYERS), its post_weights as after."""
    from adaptkit.merge.slices import AFTER_LAYERS, BEFORE_LAYERS

    for w in info["pre_weights"]:
        assert BEFORE_LAYERS.search(w["name"]) and not AFTER_LAYERS.search(w["name"]), (where, w["name"])
    for w in info["post_weights"]:
        assert not BEFORE_LAYERS.search(w["name"]) or AFTER_LAYERS.search(w["name"]), (where, w["name"])


def llama_finetunes(root, count: int = 3, noise: float = 0.02, dtypes: dict | None = None):
    """`root`/base, a tiny Llama, and `root`/ft1.. ftN, each the base plus N(0, noise²) from seed i (float32);
    with `dtypes` ({name: torch dtype}) each saved in each dtype under `root`/name/ instead."""
    import copy

    import torch

    for i in range(count + 1):
        model = tiny_llama(seed=0)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * noise * (i > 0))
        tag = f"ft{i}" if i else "base"
        for name, dtype in (dtypes or {"": None}).items():
            (copy.deepcopy(model).to(dtype) if dtype else model).save_pretrained(root / name / tag)
    return root


def outputs(model, x):
    """The model's output for x, without building a graph."""
    import torch

    with torch.no_grad():
        return model(x)
