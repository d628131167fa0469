"""`adaptkit extract` and `adaptkit convert`: full fine-tune → LoRA, rank resize, variant → LoRA."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from click.testing import CliRunner
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

import adaptkit as ak
from adaptkit.adapter import read_adapter
from adaptkit.cli import cli
from adaptkit.files.convert import convert, extract, to_lowrank
from adaptkit.errors import AdaptkitError
from adaptkit.files.lowrank import factor_matrix, factor_product
from builders import tiny_gpt2, tiny_llama
from fake_gpu import fake_cuda

IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def fine_tune(base, seed=1, scale=0.02, skip=("embed", "wte", "wpe")):
    ft = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ft.named_parameters():
            if not any(s in name for s in skip):
                p.add_(scale * torch.randn(p.shape, generator=g))
    return ft


def optimal_error(delta: torch.Tensor, rank: int) -> float:
    s = torch.linalg.svdvals(delta.double())
    return float((s[rank:] ** 2).sum().sqrt() / (s ** 2).sum().sqrt())


# ---- the SVD itself ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(48, 160), (160, 48), (40, 40), (8, 3)])
def test_factor_matrix_is_the_optimal_truncation(shape):
    m = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    for rank in (1, 3):
        f = factor_matrix(m, rank)
        actual = float((m.double() - f.b.double() @ f.a.double()).norm() / m.double().norm())
        assert actual == pytest.approx(optimal_error(m, rank), rel=1e-5, abs=1e-6)
        assert f.error == pytest.approx(actual, rel=1e-4, abs=1e-6)
        # A = √S·Vᵀ and B = U·√S: the two factors carry the same singular values
        torch.testing.assert_close(f.a.norm(dim=1), f.b.norm(dim=0), rtol=1e-4, atol=1e-6)


def test_energy_and_clamping():
    a, b = torch.randn(4, 50), torch.randn(30, 4)
    f = factor_matrix(b @ a, rank=10)
    assert (f.rank, f.clamped, f.numerical_rank) == (4, True, 4)
    assert f.error < 1e-5
    s = torch.linalg.svdvals(b @ a).double()
    share = torch.cumsum(s ** 2, 0) / (s ** 2).sum()
    expected = int((share < 0.8).sum()) + 1
    assert factor_matrix(b @ a, energy=0.8).rank == expected
    g = factor_product(a, b, 2.0, rank=2)
    assert g.error == pytest.approx(optimal_error(2 * b @ a, 2), rel=1e-6)


# ---- extract ------------------------------------------------------------------------------------


def test_extract_at_full_rank_reproduces_the_fine_tune(tmp_path):
    base = tiny_llama()
    ft = fine_tune(base)
    base.save_pretrained(tmp_path / "base")
    ft.save_pretrained(tmp_path / "ft")
    report = extract(tmp_path / "ft", tmp_path / "base", tmp_path / "lora", rank=32, progress=False)
    assert report["max_error"] < 1e-5
    assert "model.norm.weight" in report["saved"]  # vectors are kept whole
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora").eval()
    torch.testing.assert_close(logits(peft_model), logits(ft), atol=1e-4, rtol=1e-4)
    ours = copy.deepcopy(base)
    ak.load_adapter(ours, tmp_path / "lora")
    torch.testing.assert_close(logits(ours), logits(ft), atol=1e-4, rtol=1e-4)


def test_extract_at_low_rank_reports_the_optimal_error(tmp_path):
    base = tiny_llama()
    ft = fine_tune(base)
    base.save_pretrained(tmp_path / "base")
    ft.save_pretrained(tmp_path / "ft")
    report = extract(tmp_path / "ft", tmp_path / "base", tmp_path / "lora", rank=4, progress=False)
    module = "model.layers.1.mlp.down_proj"
    delta = dict(ft.named_parameters())[f"{module}.weight"] - dict(base.named_parameters())[f"{module}.weight"]
    assert report["modules"][module]["error"] == pytest.approx(optimal_error(delta.detach(), 4), rel=1e-4)
    files = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    a, b = files[f"base_model.model.{module}.lora_A.weight"], files[f"base_model.model.{module}.lora_B.weight"]
    actual = float((delta.detach().double() - b.double() @ a.double()).norm() / delta.detach().double().norm())
    assert actual == pytest.approx(optimal_error(delta.detach(), 4), rel=1e-4)
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (4, 4, "LORA")


def test_extract_embeddings_as_lora_and_energy(tmp_path):
    base = tiny_llama()
    ft = fine_tune(base, skip=())
    base.save_pretrained(tmp_path / "base")
    ft.save_pretrained(tmp_path / "ft")
    report = extract(tmp_path / "ft", tmp_path / "base", tmp_path / "lora", rank=32, embed_lora=True, progress=False)
    assert "model.embed_tokens" in report["modules"] and "lm_head" in report["modules"]
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora").eval()
    torch.testing.assert_close(logits(peft_model), logits(ft), atol=1e-4, rtol=1e-4)
    report = extract(tmp_path / "ft", tmp_path / "base", tmp_path / "e", energy=0.5, progress=False)
    ranks = {m["rank"] for m in report["modules"].values()}
    assert len(ranks) > 1 or ranks < {32}
    config = json.loads((tmp_path / "e" / "adapter_config.json").read_text())
    assert config["rank_pattern"] or len(ranks) == 1


def test_extract_gpt2_conv1d_in_bf16(tmp_path):
    """GPT-2's Conv1D layers store W as in × out (mergekit's extractor crashes on them); bf16 inputs."""
    base = tiny_gpt2().to(torch.bfloat16)
    ft = fine_tune(base.float(), scale=0.05).to(torch.bfloat16)
    base.save_pretrained(tmp_path / "base")
    ft.save_pretrained(tmp_path / "ft")
    report = extract(tmp_path / "ft", tmp_path / "base", tmp_path / "lora", rank=32, progress=False)
    assert any("c_attn" in m for m in report["modules"])
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base).float(), tmp_path / "lora").eval()
    torch.testing.assert_close(logits(peft_model), logits(ft.float()), atol=0.05, rtol=0.05)


@pytest.mark.parametrize("model", ["llama", "gpt2-bf16"])
def test_extract_on_a_device_gives_the_cpu_factors(tmp_path, model):
    """`--device`: each ΔW factored on a stand-in GPU (tests/fake_gpu.py: CPU numbers, CUDA's placement
    rules) gives the CPU run's files byte for byte; on a real GPU the SVD is the GPU library's."""
    base = tiny_llama() if model == "llama" else tiny_gpt2().to(torch.bfloat16)
    ft = fine_tune(base.float(), skip=()).to(base.dtype)
    base.save_pretrained(tmp_path / "base")
    ft.save_pretrained(tmp_path / "ft")
    options = dict(rank=8, embed_lora=True, progress=False)
    extract(tmp_path / "ft", tmp_path / "base", tmp_path / "cpu", **options)
    with fake_cuda():
        report = extract(tmp_path / "ft", tmp_path / "base", tmp_path / "gpu", device="cuda", **options)
    assert report["device"] == "cuda:0" and report["modules"]
    cpu, gpu = load_file(tmp_path / "cpu" / "adapter_model.safetensors"), load_file(tmp_path / "gpu" / "adapter_model.safetensors")
    assert cpu.keys() == gpu.keys() and all(torch.equal(cpu[k], gpu[k]) for k in cpu)
    result = CliRunner().invoke(cli, ["extract", "-m", str(tmp_path / "ft"), "--base", str(tmp_path / "base"), "--rank",
                                      "4", "-o", str(tmp_path / "x"), "--device", "cuda"])
    assert result.exit_code == 1 and "--device cuda: this machine has no CUDA GPU" in result.output
    assert not (tmp_path / "x").exists()


def test_extract_bad_input(tmp_path):
    base, other = tiny_llama(), tiny_llama(hidden_size=48)
    base.save_pretrained(tmp_path / "base")
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(AdaptkitError, match="fine-tune .* vs base"):
        extract(tmp_path / "other", tmp_path / "base", tmp_path / "x", rank=4, progress=False)
    with pytest.raises(AdaptkitError, match="not both"):
        extract(tmp_path / "base", tmp_path / "base", tmp_path / "x", rank=4, energy=0.5, progress=False)
    with pytest.raises(AdaptkitError, match="energy must be in"):
        extract(tmp_path / "base", tmp_path / "base", tmp_path / "x", energy=1.5, progress=False)


# ---- convert: resize and variant -> LoRA ------------------------------------------------------


def peft_lora(base, tmp_path, **config):
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **config)).eval()
    pm.save_pretrained(tmp_path)
    return pm


def test_convert_plain_lora_is_exact_and_keeps_alpha_and_rslora(tmp_path):
    base = tiny_llama()
    pm = peft_lora(base, tmp_path / "a", r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"],
                   rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 5})
    report = convert(tmp_path / "a", "peft", tmp_path / "b")
    assert report["max_error"] == 0 and all(m["exact"] for m in report["modules"].values())
    before, after = load_file(tmp_path / "a" / "adapter_model.safetensors"), load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    again = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "b").eval()
    torch.testing.assert_close(logits(again), logits(pm), atol=1e-5, rtol=1e-5)


def test_resize_lora_reports_the_tail_and_clamps_with_a_warning(tmp_path):
    base = tiny_llama()
    peft_lora(base, tmp_path / "a", r=8, lora_alpha=16, target_modules=["q_proj"])
    files = read_adapter(tmp_path / "a")
    module = "model.layers.0.self_attn.q_proj"
    delta = 2.0 * files.tensor(module, "lora_B") @ files.tensor(module, "lora_A")
    report = convert(tmp_path / "a", "peft", tmp_path / "r3", rank=3)
    assert report["modules"][module]["error"] == pytest.approx(optimal_error(delta, 3), rel=1e-5)
    with pytest.warns(UserWarning, match="clamped to the matrix rank"):
        report = convert(tmp_path / "a", "peft", tmp_path / "r16", rank=16)
    assert report["modules"][module]["rank"] == 8 and report["modules"][module]["error"] < 1e-5


def test_tied_and_delta_variants_convert_exactly(tmp_path):
    from adaptkit import registry

    for name, config in (("tied_lora", {"r": 4, "target_modules": ["q_proj", "o_proj"]}),
                         ("delta_lora", {"r": 4, "target_modules": ["q_proj"], "start_step": 0})):
        base = tiny_llama()
        model = copy.deepcopy(base)
        handle = ak.inject(model, name, **config)
        opt = torch.optim.AdamW(handle.param_groups(1e-2))
        for step in (1, 2):
            model(IDS, labels=IDS).loss.backward()
            opt.step()
            opt.zero_grad()
            handle.step_end(step)
        handle.save(tmp_path / name)
        report = convert(tmp_path / name, "peft", tmp_path / f"{name}-lora")
        assert all(m["exact"] for m in report["modules"].values())
        src, dst = read_adapter(tmp_path / name), read_adapter(tmp_path / f"{name}-lora")
        for module in src.modules:
            weight = dict(base.named_parameters())[f"{module}.weight"].detach()
            before = registry.get("variant", src.variant).delta(src, module, weight)
            after = registry.get("variant", dst.variant).delta(dst, module, weight)
            torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-5)


def test_dora_needs_a_rank_and_the_base_then_factors_by_svd(tmp_path):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    pm = peft_lora(base, tmp_path / "d", r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj"])
    with pytest.raises(AdaptkitError, match="give --rank or --energy"):
        convert(tmp_path / "d", "peft", tmp_path / "x")
    with pytest.raises(AdaptkitError, match="depends on the base weight"):
        convert(tmp_path / "d", "peft", tmp_path / "x", rank=32)
    report = convert(tmp_path / "d", "peft", tmp_path / "x", rank=32, base=tmp_path / "base")
    assert report["max_error"] < 1e-5  # full rank of a 32 × 32 layer: exact
    again = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "x").eval()
    torch.testing.assert_close(logits(again), logits(pm), atol=1e-4, rtol=1e-4)
    report = convert(tmp_path / "d", "peft", tmp_path / "y", rank=2, base=tmp_path / "base")
    assert 0 < report["max_error"] < 1


def test_convert_partial_fine_tune_by_svd(tmp_path):
    base = tiny_llama()
    model = copy.deepcopy(base)
    handle = ak.inject(model, "partial", modules=["model.layers.1.mlp.down_proj"])
    torch.manual_seed(5)
    with torch.no_grad():
        for _, p in handle.parameters():
            p.add_(0.01 * torch.randn_like(p))
    handle.save(tmp_path / "p")
    lowrank, report = to_lowrank(read_adapter(tmp_path / "p"))
    assert lowrank.saved and not lowrank.modules  # without a rank, whole modules stay whole
    base.save_pretrained(tmp_path / "base")
    report = convert(tmp_path / "p", "peft", tmp_path / "l", rank=2, base=tmp_path / "base")
    module = "model.layers.1.mlp.down_proj"
    delta = dict(model.named_parameters())[f"{module}.copies.default.weight"].detach() - \
        dict(base.named_parameters())[f"{module}.weight"].detach()
    assert 0.1 < report["modules"][module]["error"] == pytest.approx(optimal_error(delta, 2), rel=1e-4)
    full = convert(tmp_path / "p", "peft", tmp_path / "f", rank=32, base=tmp_path / "base")
    assert full["max_error"] < 1e-5
    again = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "f").eval()
    torch.testing.assert_close(logits(again), logits(model), atol=1e-4, rtol=1e-4)


# ---- CLI -------------------------------------------------------------------------------------


def run(*args):
    return CliRunner().invoke(cli, list(args))


def test_cli_convert_and_extract(tmp_path):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    fine_tune(base).save_pretrained(tmp_path / "ft")
    result = run("--quiet", "extract", "--model", str(tmp_path / "ft"), "--base", str(tmp_path / "base"), "--rank", "8",
                 "-o", str(tmp_path / "lora"), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["modules"]
    result = run("convert", str(tmp_path / "lora"), "--to", "lora", "--rank", "4", "-o", str(tmp_path / "r4"))
    assert result.exit_code == 0 and "rank 4" in result.output
    result = run("convert", str(tmp_path / "lora"), "--to", "lora", "-o", str(tmp_path / "r4"))
    assert result.exit_code == 1 and "already exists" in result.output
    result = run("convert", str(tmp_path / "lora"), "--to", "pfet", "-o", str(tmp_path / "q"))
    assert result.exit_code == 1 and "did you mean 'peft'" in result.output
    result = run("convert", str(tmp_path / "base"), "--to", "peft", "-o", str(tmp_path / "q"))
    assert result.exit_code == 1 and "full model, not an adapter" in result.output


def test_kohya_with_conv_layers_converts_to_peft_and_back_losslessly(tmp_path):
    """SD 1.x kohya files hold 1×1 convolution factors (proj_in/proj_out): they pass through as stored."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    half = lambda *shape: torch.randn(*shape, generator=g).half()  # noqa: E731
    prefix = "lora_unet_down_blocks_0_attentions_0_"
    original = {
        f"{prefix}proj_in.lora_down.weight": half(4, 32, 1, 1), f"{prefix}proj_in.lora_up.weight": half(32, 4, 1, 1),
        f"{prefix}proj_in.alpha": torch.tensor(2.0).half(),
        f"{prefix}transformer_blocks_0_attn1_to_q.lora_down.weight": half(8, 32),
        f"{prefix}transformer_blocks_0_attn1_to_q.lora_up.weight": half(32, 8),
        f"{prefix}transformer_blocks_0_attn1_to_q.alpha": torch.tensor(3.0).half(),
    }
    save_file(original, tmp_path / "sd.safetensors")
    result = run("convert", str(tmp_path / "sd.safetensors"), "--to", "peft", "-o", str(tmp_path / "peft"))
    assert result.exit_code == 0, result.output
    result = run("convert", str(tmp_path / "peft"), "--to", "kohya", "-o", str(tmp_path / "back"))
    assert result.exit_code == 0, result.output
    (back_file,) = (tmp_path / "back").glob("*.safetensors")
    back = load_file(back_file)
    assert back.keys() == original.keys()
    for key, tensor in original.items():
        assert torch.equal(back[key].to(tensor.dtype), tensor), key
