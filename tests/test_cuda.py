"""CUDA paths, run where a GPU is present (skipped elsewhere; CI has none): fp16 training with loss
scaling, QLoRA layers unpacked on the GPU, training resumed byte-identically with CUDA RNG state, and
`merge --device cuda` giving the CPU's bytes (issue 15; the cases are test_merge_device.py's, which runs
them on a stand-in device everywhere)."""
from __future__ import annotations

import json

import pytest
import torch

from adaptkit.merge.engine import run_merge
from adaptkit.quant.quantized import QuantizedLinear
from adaptkit.train.loop import train
from builders import state
from test_merge_device import CASES, recipe_for, write_models
from text_models import counting, llama_dir, write_jsonl

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda")
    return {"llama": llama_dir(root / "llama"), "counting": write_jsonl(root / "counting.jsonl", counting())}


def losses(out):
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_trains_on_the_gpu(env, tmp_path, precision):
    out = tmp_path / precision
    train(env["llama"], "lora", env["counting"], out, settings={"r": 4, "lora_alpha": 8}, lr=3e-2, max_steps=8,
          precision=precision, progress=False, device="cuda")
    seen = losses(out)
    assert all(x == x for x in seen) and seen[-1] < seen[0]


@pytest.mark.parametrize("method", ["nf4", "nf4_dq", "int8"])
def test_quantized_layer_on_the_gpu_equals_the_cpu(method):
    torch.manual_seed(0)
    layer = QuantizedLinear.from_weight(method, torch.randn(96, 128), torch.randn(96))
    x = torch.randn(4, 128)
    expected = layer(x)
    gpu = layer.cuda()
    host = set(getattr(gpu.quantizer, "host_keys", ()))
    assert all(t.is_cuda != (k in host) for k, t in gpu.packed().items())  # host-read keys stay on the CPU
    torch.testing.assert_close(gpu(x.cuda()).cpu(), expected, rtol=1e-5, atol=1e-5)


class Stop(Exception):
    pass


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_qlora_resumes_byte_identically_on_the_gpu(env, tmp_path, precision):
    """Dropout draws from the CUDA generator and fp16 keeps a loss scale: both must come back."""
    options = dict(settings={"r": 4, "lora_alpha": 8, "lora_dropout": 0.1}, lr=3e-2, quantize="nf4",
                   precision=precision, batch_size=3, max_steps=6, save_every=2, progress=False, device="cuda")
    train(env["llama"], "lora", env["counting"], tmp_path / "full", **options)

    def interrupt(view):
        if view.step == 3:
            raise Stop

    with pytest.raises(Stop):
        train(env["llama"], "lora", env["counting"], tmp_path / "cut", callback=interrupt, **options)
    train(env["llama"], "lora", env["counting"], tmp_path / "cut", resume=True, **options)
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert (full / "adapter_model.safetensors").read_bytes() == (cut / "adapter_model.safetensors").read_bytes()
    assert losses(full) and [round(x, 6) for x in losses(full)] == [round(x, 6) for x in losses(cut)]


@pytest.mark.parametrize("method", ["nf4", "fp4_dq"])
@pytest.mark.parametrize("shape", [(96, 128), (7, 65), (1001,)])
def test_4bit_unpacking_on_the_gpu_is_bit_identical(method, shape):
    from adaptkit import registry

    quantizer = registry.get("quantizer", method)
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        packed = quantizer.quantize(torch.randn(shape).to(dtype))
        on_gpu = {k: v.cuda() if "quant_state" not in k else v for k, v in packed.items()}
        assert torch.equal(quantizer.dequantize(on_gpu).cpu(), quantizer.dequantize(packed))


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    return write_models(tmp_path_factory.mktemp("device"))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("case", CASES)
def test_a_merge_on_the_gpu_gives_the_cpu_bytes(stored, tmp_path, case, dtype):
    """The issue's promise for deterministic methods; the random ones draw on the CPU, so theirs too."""
    recipe = recipe_for(stored / dtype, case, dtype)
    run_merge(recipe, tmp_path / "cpu", progress=False, card=False)
    assert run_merge(recipe, tmp_path / "gpu", progress=False, card=False, device="cuda")["device"] == "cuda:0"
    cpu, gpu = state(tmp_path / "cpu"), state(tmp_path / "gpu")
    differ = [n for n in cpu if not torch.equal(gpu[n].view(torch.uint8), cpu[n].view(torch.uint8))]
    assert not differ, f"{len(differ)} of {len(cpu)} tensors differ, e.g. {differ[:3]}"


def test_extract_on_the_gpu_matches_the_cpu(tmp_path):
    """A GPU's SVD picks its own signs and rounds otherwise: the adapters' products B·A agree, not the bytes."""
    import copy

    from safetensors.torch import load_file

    from adaptkit.files.convert import extract
    from builders import tiny_llama

    base = tiny_llama()
    ft = copy.deepcopy(base)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.02)
    base.save_pretrained(tmp_path / "base")
    ft.save_pretrained(tmp_path / "ft")
    for device in ("cpu", "cuda"):
        extract(tmp_path / "ft", tmp_path / "base", tmp_path / device, rank=8, progress=False, device=device)
    cpu, gpu = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("cpu", "cuda"))
    assert cpu.keys() == gpu.keys()
    for key in (k for k in cpu if k.endswith("lora_A.weight")):
        other = key.replace("lora_A", "lora_B")
        torch.testing.assert_close(gpu[other] @ gpu[key], cpu[other] @ cpu[key], rtol=1e-4, atol=1e-5)
