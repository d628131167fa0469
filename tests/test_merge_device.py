"""`--device` (issue 15): merges compute on a GPU, inputs read and the output written on the CPU side.

No GPU here, so the device path runs on `fake_gpu`'s stand-in: every tensor the engine moves to "cuda"
says it is on the GPU and follows CUDA's rules (no mixing with CPU tensors, no `.numpy()`), while its
numbers stay the CPU's. Every method, with the parameters that take other code paths, must run there
and give the CPU run's bytes: the device path changes where tensors live, never the arithmetic. What a
real GPU's kernels give is tests/test_cuda.py's (run where one is present).
"""
from __future__ import annotations


import pytest
import torch

from adaptkit import registry
from adaptkit.errors import AdaptkitError
from adaptkit.merge.engine import run_merge
from builders import llama_finetunes, state
from fake_gpu import OnGpu, fake_cuda
from hostile import run_cli

#: case -> (method, per-model parameters of ft1, ft2, global parameters, with the base)
CASES = {
    "linear": ("linear", [{"weight": 0.3}, {"weight": [0.1, 0.9]}], None, False),
    "average": ("average", [{}, {}], None, False),
    "interpolate": ("interpolate", [{}, {}], {"alpha": 0.3}, False),
    "slerp": ("slerp", [{}, {}], {"t": [0, 0.5, 1]}, False),
    "task_arithmetic": ("task_arithmetic", [{"weight": 0.5}, {"weight": -0.3}], {"lambda": 0.9}, True),
    "ties": ("ties", [{"weight": 0.4, "density": 0.5}, {"weight": 0.3, "density": 0.3}], None, True),
    "ties-index": ("ties", [{"weight": 0.4, "density": 0.5}, {"weight": 0.3, "density": 0.3}],
                   {"tie_break": "index"}, True),
    "magnitude_prune": ("magnitude_prune", [{"weight": 0.6, "density": 0.4}] * 2, None, True),
    "breadcrumbs": ("breadcrumbs", [{"weight": 0.5, "density": 0.8, "gamma": 0.05}] * 2, None, True),
    "breadcrumbs_ties-index": ("breadcrumbs_ties", [{"weight": 0.5, "density": 0.7, "gamma": 0.1}] * 2,
                               {"tie_break": "index"}, True),
    "dare_linear": ("dare_linear", [{"weight": 0.5, "density": 0.5}] * 2, None, True),
    "dare_ties-inverse": ("dare_ties", [{"weight": 0.5, "density": 0.6}] * 2, {"rescale": "inverse"}, True),
    "della": ("della", [{"weight": 0.5, "density": 0.5, "epsilon": 0.1}] * 2, None, True),
    "della_linear-inverse": ("della_linear", [{"weight": 0.5, "density": 0.5, "epsilon": 0.1}] * 2,
                             {"rescale": "inverse"}, True),
    "sce": ("sce", [{}, {}], {"select_topk": 0.5}, True),
    "sce-index": ("sce", [{}, {}], {"select_topk": 0.5, "tie_break": "index"}, True),
    "ram": ("ram", [{}, {}], None, True),
    "ramplus_tl": ("ramplus_tl", [{}, {}], None, True),
    "model_stock": ("model_stock", [{}, {}], None, True),
    "nuslerp": ("nuslerp", [{"weight": 0.6}, {"weight": 0.4}], None, False),
    "nuslerp-base-flat": ("nuslerp", [{"weight": 0.6}, {"weight": 0.4}], {"nuslerp_flatten": True}, True),
    "multislerp": ("multislerp", [{"weight": 0.5}, {"weight": 0.3}], None, True),
    "karcher": ("karcher", [{}, {}], {"max_iter": 5}, False),
    "nearswap": ("nearswap", [{}], {"t": 0.01}, True),
    "arcee_fusion": ("arcee_fusion", [{}], None, True),
    "passthrough": ("passthrough", [{"scale": 0.5}], None, False),
}


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    return write_models(tmp_path_factory.mktemp("device"))


def write_models(root):
    """root/{float32,bfloat16}/{base,ft1,ft2}: a tiny Llama and two noisy copies (bf16: many equal |τ|,
    so the magnitude cuts go through ties)."""
    return llama_finetunes(root, count=2, dtypes={"float32": torch.float32, "bfloat16": torch.bfloat16})


def recipe_for(folder, case: str, dtype: str) -> dict:
    method, params, global_params, with_base = CASES[case]
    recipe = {"merge_method": method, "dtype": dtype, "seed": 7,
              "models": [{"model": str(folder / f"ft{i + 1}"), "parameters": p} for i, p in enumerate(params)]}
    if with_base:
        recipe["base_model"] = str(folder / "base")
    if global_params:
        recipe["parameters"] = global_params
    return recipe


def test_every_method_has_a_case():
    assert {m for m, *_ in CASES.values()} == set(registry.names("merge")) - {"concat"}  # (concat: adapters only)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("case", CASES)
def test_device_path_gives_the_cpu_bytes(stored, tmp_path, monkeypatch, case, dtype):
    recipe = recipe_for(stored / dtype, case, dtype)
    run_merge(recipe, tmp_path / "cpu", progress=False, card=False)
    operator = registry.get("merge", CASES[case][0])
    merge, seen = operator.merge, set()

    def recorded(tensors, *args, **kwargs):
        seen.add(type(tensors[0]))
        return merge(tensors, *args, **kwargs)

    monkeypatch.setattr(operator, "merge", recorded)
    with fake_cuda():
        report = run_merge(recipe, tmp_path / "gpu", progress=False, card=False, device="cuda", threads=2)
    assert report["device"] == "cuda:0"
    # every method computes on the device but passthrough, which only copies
    assert seen == ({torch.Tensor} if case == "passthrough" else {OnGpu})
    cpu, gpu = state(tmp_path / "cpu"), state(tmp_path / "gpu")
    assert cpu.keys() == gpu.keys()
    for name in cpu:
        assert type(gpu[name]) is torch.Tensor and gpu[name].dtype == cpu[name].dtype
        assert torch.equal(gpu[name].view(torch.uint8), cpu[name].view(torch.uint8)), name


def test_stand_in_catches_a_tensor_left_on_the_cpu():
    """The check the test above relies on: a CPU tensor of one or more dimensions mixed with a GPU one,
    or a GPU tensor handed to numpy, fails as on a GPU; CPU scalars and explicit moves pass."""
    with fake_cuda():
        x = torch.ones(3).to("cuda")
        with pytest.raises(RuntimeError, match="same device"):
            x + torch.ones(3)
        with pytest.raises(RuntimeError, match="same device"):
            torch.add(x, x, out=torch.empty(3))
        with pytest.raises(TypeError, match="numpy"):
            x.numpy()
        assert type(x * torch.tensor(2.0)) is OnGpu and type((x + 1).cpu()) is torch.Tensor
        assert type(torch.zeros(3, device=x.device)) is OnGpu and x.device == torch.device("cuda", 0)
        assert x.cpu().numpy().tolist() == [1.0, 1.0, 1.0]


def test_cpu_and_auto_without_a_gpu_are_the_default_path(stored, tmp_path):
    recipe = recipe_for(stored / "bfloat16", "ties", "bfloat16")
    first = run_merge(recipe, tmp_path / "a", progress=False, card=False)
    second = run_merge(recipe, tmp_path / "b", progress=False, card=False, device="auto")
    assert first["device"] == second["device"] == "cpu"
    a, b = state(tmp_path / "a"), state(tmp_path / "b")
    assert all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("device, message", [
    ("cuda", "--device cuda: this machine has no CUDA GPU that torch can use"),
    ("cuda:1", "--device cuda:1: this machine has no CUDA GPU"),
    ("tpu", "--device: 'tpu' is no device (cpu, cuda, cuda:N or auto)"),
    ("mps", "--device: mps is not supported (cpu, cuda, cuda:N or auto)"),
])
def test_a_device_this_machine_lacks_is_one_line(stored, tmp_path, device, message):
    out = tmp_path / "out"
    for extra in ([], ["--dry-run"]):
        result = run_cli("merge", "--method", "linear", "-m", stored / "float32" / "ft1", "-m",
                         stored / "float32" / "ft2", "-o", out, "--device", device, *extra)
        assert result.exit_code == 1 and result.stderr.startswith(f"error: {message}") and result.stderr.count("\n") == 1
        assert not out.exists()


def test_moe_checks_its_device_first(tmp_path):
    """`adaptkit moe --device` (where the hidden pass runs) is the same option, checked before the config."""
    result = run_cli("moe", tmp_path / "missing.yml", "-o", tmp_path / "out", "--device", "cuda:2", "--dry-run")
    assert result.exit_code == 1 and result.stderr.startswith("error: --device cuda:2: this machine has no CUDA GPU")
    assert not (tmp_path / "out").exists()


def test_a_gpu_index_past_the_last_is_refused(stored, tmp_path):
    with fake_cuda(), pytest.raises(AdaptkitError, match=r"--device cuda:1: this machine has 1 CUDA GPU\(s\)"):
        run_merge(recipe_for(stored / "float32", "linear", "float32"), tmp_path / "out", progress=False, device="cuda:1")
    assert not (tmp_path / "out").exists()


def test_an_adapter_output_is_refused_on_a_gpu(tmp_path):
    recipe = {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": 0.5}} for m in "ab"],
              "output": {"kind": "adapter"}}
    with fake_cuda(), pytest.raises(AdaptkitError, match="an adapter output is factored on the CPU"):
        run_merge(recipe, tmp_path / "out", progress=False, device="cuda")
