"""Sums to one number on workers with fewer threads (`_split.whole_sum`, `schedule.command_threads`): torch splits such
a sum over its threads and rounds each part, so a worker reproduces the command's split: model_stock on two workers,
and slerp and nuslerp on `--threads 2`, give the bytes of one worker on all of torch's threads (mergekit's)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from adaptkit.merge.engine import run_merge
from adaptkit.merge.schedule import command_threads, command_threads_held, default_workers


def spread(n: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * torch.exp2(torch.randint(-8, 8, (n,), generator=g).float())).to(dtype)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    width = {2: torch.int16, 4: torch.int32}[a.element_size()]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(width), b.view(width))


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_whole_sum_is_the_commands_threads_sum(threads):
    from adaptkit_plugins.merges._split import whole_sum

    split_matters = 0
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for seed, n in enumerate((1000, 32767, 32768, 65537, 100_003, 1 << 20)):
            x = spread(n, seed, dtype)
            torch.set_num_threads(1)
            alone = x.sum()
            for count, worker in ((2, 1), (3, 1), (4, 2), (8, 1)):
                torch.set_num_threads(count)
                expected = x.sum()  # torch's own split over `count` threads
                split_matters += not same(expected, alone)
                torch.set_num_threads(worker)
                with command_threads_held(count):
                    assert same(whole_sum(x), expected), (dtype, n, count, worker)
                assert torch.get_num_threads() == worker  # (put back)
                assert same(whole_sum(x), x.sum())  # outside a merge's workers: torch's sum as it is
    assert split_matters  # (without the split, these sums would differ)
    assert command_threads() is None


def test_where_torch_splits_otherwise_the_worker_sums_on_the_commands_threads(threads, monkeypatch):
    """A torch whose split is not `_split_sum`'s (another build) fails the probe; the worker then sums on the
    command's count of threads itself: torch's bytes either way."""
    from adaptkit_plugins.merges import _split as _base

    assert _base._splits_as_torch(2) and _base._splits_as_torch(3)
    monkeypatch.setattr(_base, "_split_sum", lambda x, threads: x[:-1].sum() + x[-1])  # (adds otherwise)
    _base._splits_as_torch.cache_clear()
    try:
        assert not _base._splits_as_torch(2)
        x = spread(100_003, 7, torch.bfloat16)
        torch.set_num_threads(2)
        expected = x.sum()
        torch.set_num_threads(1)
        with command_threads_held(2):
            assert same(_base.whole_sum(x), expected)
        assert torch.get_num_threads() == 1
    finally:
        _base._splits_as_torch.cache_clear()


def write_model(folder, seed: int) -> None:
    """A one-layer Llama-shaped bf16 model whose big tensors have 2¹⁶-2¹⁷ entries (two threads' parts each)."""
    g = torch.Generator().manual_seed(1000)
    layer = "model.layers.0."
    shapes = {"model.embed_tokens.weight": (512, 256), "model.norm.weight": (256,), "lm_head.weight": (512, 256),
              layer + "self_attn.q_proj.weight": (256, 256), layer + "self_attn.k_proj.weight": (128, 256),
              layer + "self_attn.v_proj.weight": (128, 256), layer + "self_attn.o_proj.weight": (256, 256),
              layer + "mlp.gate_proj.weight": (512, 256), layer + "mlp.up_proj.weight": (512, 256),
              layer + "mlp.down_proj.weight": (256, 512), layer + "input_layernorm.weight": (256,),
              layer + "post_attention_layernorm.weight": (256,)}
    base = {name: torch.randn(shape, generator=g) * 0.05 for name, shape in shapes.items()}
    shared = {name: torch.randn(shape, generator=g) * 0.01 for name, shape in shapes.items()}
    g.manual_seed(seed)  # (task vectors at cos ≈ 0.8: near 0, the angle's bf16 rounding hides a sum's last bit)
    folder.mkdir()
    save_file({name: (w + (shared[name] + torch.randn(w.shape, generator=g) * 0.005 if seed else 0)).bfloat16()
               for name, w in base.items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
        "torch_dtype": "bfloat16"}))


def test_model_stock_on_two_workers_gives_one_workers_bytes(tmp_path, monkeypatch, threads):
    from safetensors.torch import load_file

    from adaptkit_plugins.merges import model_stock

    for seed in range(4):
        write_model(tmp_path / f"m{seed}", seed)
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(f"base_model: {tmp_path / 'm0'}\nmodels:\n" + "".join(
        f"  - model: {tmp_path / f'm{s}'}\n" for s in (1, 2, 3)) + "merge_method: model_stock\ndtype: bfloat16\n")

    def merged(name: str, owner=None, attribute: str = "", value=None) -> dict:
        with monkeypatch.context() as patch:
            if owner is not None:
                patch.setattr(owner, attribute, value)
            run_merge(str(recipe), str(tmp_path / name), force=True, card=False, progress=False)
        return load_file(tmp_path / name / "model.safetensors")

    one = merged("one", model_stock.ModelStock, "serial_kernels", False)  # one worker on all of torch's threads
    two = merged("two")  # two workers of fewer threads each, where there are two cores
    assert one.keys() == two.keys()
    assert all(same(one[k], two[k]) for k in one)
    if default_workers(model_stock.MODEL_STOCK) > 1 and torch.get_num_threads() > 1:
        # each worker's own sums would differ: the split is what keeps the bytes
        plain = merged("plain", model_stock, "whole_sum", lambda x, keepdim=False: x.sum(dim=-1, keepdim=keepdim))
        assert any(not same(one[k], plain[k]) for k in one)


SPHERICAL = {
    "nuslerp": lambda d: f"base_model: {d / 'm0'}\nmodels:\n" + "".join(
        f"  - model: {d / f'm{s}'}\n    parameters: {{weight: {w}}}\n" for s, w in ((1, 0.3), (2, 0.7))),
    "slerp": lambda d: f"base_model: {d / 'm1'}\nmodels:\n  - model: {d / 'm1'}\n  - model: {d / 'm2'}\n"
                       "parameters: {t: 0.3}\n",
}


@pytest.mark.parametrize("method", sorted(SPHERICAL))
def test_spherical_methods_give_the_same_bytes_on_any_threads(tmp_path, monkeypatch, threads, method):
    """slerp's and nuslerp's angles of whole tensors are sums to one number: on two workers (`--threads 2`) each is
    split as one worker on all of torch's threads splits it."""
    import importlib

    from safetensors.torch import load_file

    for seed in range(3):
        write_model(tmp_path / f"m{seed}", seed)
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(SPHERICAL[method](tmp_path) + f"merge_method: {method}\ndtype: bfloat16\n")

    def merged(name: str, threads: int) -> dict:
        run_merge(str(recipe), str(tmp_path / name), force=True, card=False, progress=False, threads=threads)
        return load_file(tmp_path / name / "model.safetensors")

    one, two = merged("one", 1), merged("two", 2)
    assert one.keys() == two.keys() and all(same(one[k], two[k]) for k in one)
    if torch.get_num_threads() > 1:
        monkeypatch.setattr(importlib.import_module(f"adaptkit_plugins.merges.{method}"), "whole_sum",
                            lambda x, keepdim=False: x.sum(dim=-1, keepdim=keepdim))
        plain = merged("plain", 2)
        assert any(not same(one[k], plain[k]) for k in one)
