"""LoRA (DoRA, lora_bias, rsLoRA), IA3 and AdaLoRA on nn.Conv1d / Conv2d (grouped too) / Conv3d.

The math is written out with torch's convolutions (LoRA: y = conv(x, W) + s·conv_g(conv(x, A), B), equal
to conv(x, W + s·B·A) for groups = 1; DoRA: m / ‖W + ΔW‖ per output kernel; IA3: channel scales, grouped
kernels taking their group's input scales; AdaLoRA: ΔW = B·(A ⊙ E)·c reshaped to the kernel). PEFT is the
oracle on the small conv models of its test matrix (tests/test_custom_models.py: the same layer shapes):
PEFT writes, we load with equal outputs; we merge (live and into a saved base) equal to merge_and_unload;
we write, PEFT loads with equal outputs. Grouped LoRA cannot be merged (PEFT refuses too) and the
unsupported combinations are one-line refusals naming them.
"""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from peft import AdaLoraConfig, IA3Config, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from torch import nn

import adaptkit as ak
from adaptkit import registry
from adaptkit.adapter import read_adapter
from adaptkit.errors import AdaptkitError
from builders import outputs

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest
REL = 1e-4


class Net(nn.Module):
    """conv → relu → flatten → lin0, as PEFT's ModelConv* models (their layer shapes, any input)."""

    def __init__(self, conv: nn.Module, shape: tuple[int, ...]):
        super().__init__()
        self.conv, self.shape = conv, shape
        self.lin0 = nn.Linear(math.prod(conv(torch.zeros(1, *shape[1:])).shape[1:]), 2)

    def forward(self, x):
        return self.lin0(torch.relu(self.conv(x)).flatten(1))


# name -> (conv layer, input shape), shapes from PEFT's ModelConv1D, ModelConv2D, ModelConv2D1x1,
# ModelConv2DGroups, ModelConv2DGroups2, ModelConv1DGroups and ModelConv3D (plus strides, dilation)
MODELS = {
    "Conv1d": (lambda: nn.Conv1d(1, 1, 2), (2, 1, 10)),
    "Conv1dBigger": (lambda: nn.Conv1d(6, 4, 2), (2, 6, 10)),
    "Conv1dGroups": (lambda: nn.Conv1d(8, 8, 3, groups=2), (2, 8, 10)),
    "Conv2d": (lambda: nn.Conv2d(5, 10, 3), (2, 5, 3, 3)),
    "Conv2dStrided": (lambda: nn.Conv2d(5, 6, 3, stride=2, padding=1), (2, 5, 7, 7)),
    "Conv2dDilated": (lambda: nn.Conv2d(5, 6, 3, padding=2, dilation=2), (2, 5, 7, 7)),  # PEFT's A ignores dilation
    "Conv2d1x1": (lambda: nn.Conv2d(1, 10, 1), (2, 1, 3, 3)),
    "Conv2dGroups": (lambda: nn.Conv2d(16, 16, 3, groups=8), (2, 16, 3, 3)),
    "Conv2dGroups2": (lambda: nn.Conv2d(16, 32, 3, padding=1, groups=2), (2, 16, 5, 5)),
    "Conv3d": (lambda: nn.Conv3d(5, 10, 3), (2, 5, 3, 3, 3)),
}

# (id, model, PEFT config class, config, mergeable): PEFT's TEST_CASES rows for these layers, plus rsLoRA,
# lora_bias on Conv1d, strided/dilated kernels and grouped IA3
CASES = [
    ("conv1d_lora", "Conv1d", LoraConfig, {"target_modules": ["conv"]}, True),
    ("conv1d_dora", "Conv1d", LoraConfig, {"target_modules": ["conv"], "use_dora": True}, True),
    ("conv1d_lora_bias", "Conv1dBigger", LoraConfig, {"target_modules": ["conv"], "lora_bias": True, "lora_alpha": 32}, True),
    ("conv2d_lora", "Conv2d", LoraConfig, {"target_modules": ["conv"]}, True),
    ("conv2d_lora_lin0", "Conv2d", LoraConfig, {"target_modules": ["conv", "lin0"]}, True),
    ("conv2d_dora", "Conv2d", LoraConfig, {"target_modules": ["conv"], "use_dora": True}, True),
    ("conv2d_dora_lin0", "Conv2d", LoraConfig, {"target_modules": ["conv", "lin0"], "use_dora": True}, True),
    ("conv2d_rslora", "Conv2d", LoraConfig, {"target_modules": ["conv"], "r": 4, "lora_alpha": 16, "use_rslora": True}, True),
    ("conv2d_lora_bias", "Conv2d", LoraConfig, {"target_modules": ["conv"], "lora_bias": True, "lora_alpha": 32}, True),
    ("conv2d_1x1_lora", "Conv2d1x1", LoraConfig, {"target_modules": ["conv"]}, True),
    ("conv2d_strided_dora", "Conv2dStrided", LoraConfig, {"target_modules": ["conv"], "use_dora": True}, True),
    ("conv2d_groups_lora", "Conv2dGroups", LoraConfig, {"target_modules": ["conv"]}, False),
    ("conv2d_groups2_lora", "Conv2dGroups2", LoraConfig, {"target_modules": ["conv"]}, False),
    ("conv3d_lora", "Conv3d", LoraConfig, {"target_modules": ["conv"]}, True),
    ("conv3d_lora_lin0", "Conv3d", LoraConfig, {"target_modules": ["conv", "lin0"]}, True),
    ("conv3d_dora", "Conv3d", LoraConfig, {"target_modules": ["conv"], "use_dora": True}, True),
    ("conv3d_dora_lin0", "Conv3d", LoraConfig, {"target_modules": ["conv", "lin0"], "use_dora": True}, True),
    ("conv3d_lora_bias", "Conv3d", LoraConfig, {"target_modules": ["conv"], "lora_bias": True, "lora_alpha": 32}, True),
    *[(f"{dim}_ia3_{i}", dim.capitalize(), IA3Config, {"target_modules": targets, "feedforward_modules": ff}, True)
      for dim in ("conv2d", "conv3d")
      for i, (targets, ff) in enumerate([(["conv"], []), (["conv"], ["conv"]), (["conv", "lin0"], []),
                                         (["conv", "lin0"], ["conv"]), (["conv", "lin0"], ["conv", "lin0"])], 1)],
    ("conv2d_groups_ia3", "Conv2dGroups2", IA3Config, {"target_modules": ["conv"], "feedforward_modules": []}, True),
    ("conv2d_groups2_ia3_ff", "Conv2dGroups2", IA3Config, {"target_modules": ["conv"], "feedforward_modules": ["conv"]}, True),
    ("conv2d_adalora_1", "Conv2d", AdaLoraConfig, {"target_modules": ["conv"], "total_step": 1}, True),
    ("conv2d_adalora_2", "Conv2d", AdaLoraConfig, {"target_modules": ["conv", "lin0"], "total_step": 1}, True),
]
IDS = [c[0] for c in CASES]
INIT = {LoraConfig: {"init_lora_weights": False}, IA3Config: {"init_ia3_weights": False},
        AdaLoraConfig: {"init_lora_weights": False}}
OURS = {LoraConfig: "lora", IA3Config: "ia3", AdaLoraConfig: "adalora"}


def build(model: str, seed: int = 0) -> tuple[Net, torch.Tensor]:
    torch.manual_seed(seed)
    make, shape = MODELS[model]
    return Net(make(), shape).eval(), torch.randn(shape)


def randomize(model: nn.Module, seed: int = 1) -> None:
    """Non-trivial adapter tensors: every adapter parameter drawn around its own scale (DoRA's magnitudes
    and IA3's scales near 1), so no term vanishes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("lora_", "ia3_l")) and "ranknum" not in name:
                noise = torch.randn(p.shape, generator=g)
                p.copy_(1 + 0.3 * noise if "magnitude" in name or "ia3_l" in name else 0.5 * noise)


def peft_model(base: Net, cls, config: dict) -> PeftModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "groups > 1 ... merging is not supported", lora_bias notes
        model = get_peft_model(copy.deepcopy(base), cls(**config, **INIT[cls]))
    randomize(model)
    return model.eval()


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Within REL of the reference's largest entry (the issue's ≤ 1e-4 relative)."""
    torch.testing.assert_close(got, want, rtol=REL, atol=REL * float(want.detach().abs().max()))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """case id -> (base, input, PEFT model, folder PEFT saved it in), built once per case."""
    cache = {}

    def get(case):
        name, model, cls, config, _ = case
        if name not in cache:
            base, x = build(model)
            peft = peft_model(base, cls, config)
            folder = tmp_path_factory.mktemp(name)
            peft.save_pretrained(folder)
            cache[name] = base, x, peft, folder
        return cache[name]

    return get


# -- the math, written out -------------------------------------------------------------------------
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@pytest.mark.parametrize("model", ["Conv1d", "Conv2d", "Conv2dStrided", "Conv2dDilated", "Conv2dGroups2", "Conv3d"])
def test_lora_branch_is_two_convolutions_and_merges_as_the_kernel_product(model):
    base, x = build(model)
    net = copy.deepcopy(base)
    handle = ak.inject(net, "lora", target_modules=["conv"], r=4, lora_alpha=6, init_lora_weights=False)
    randomize(net)
    layer, conv = net.conv, base.conv
    p = layer.branches["default"].params
    a, b, s, fn = p["lora_A"].detach(), p["lora_B"].detach(), 6 / 4, CONV[conv.weight.dim() - 2]
    assert a.shape == (4, conv.in_channels, *conv.kernel_size)  # PEFT's: A sees all input channels
    assert b.shape == (conv.out_channels, 4 // conv.groups, *(1,) * (a.dim() - 2))
    hidden = fn(x, a, None, conv.stride, conv.padding, conv.dilation)
    want = conv(x) + s * fn(hidden, b, groups=conv.groups)
    close(outputs(layer, x), want)
    if conv.groups > 1:
        with pytest.raises(AdaptkitError, match=f"conv LoRA with groups={conv.groups} cannot be merged"):
            handle.merge()
        return
    delta = s * torch.einsum("or,ri...->oi...", b[(...,) + (0,) * (b.dim() - 2)], a)  # ΔW[o,i,k] = s·Σ_r B[o,r]·A[r,i,k]
    close(outputs(layer, x), fn(x, conv.weight + delta, conv.bias, conv.stride, conv.padding, conv.dilation))
    handle.merge()
    close(net.conv.base_layer.weight.detach(), (conv.weight + delta).detach())


def test_dora_conv_rescales_each_output_kernel():
    base, x = build("Conv2d")
    net = copy.deepcopy(base)
    handle = ak.inject(net, "lora", target_modules=["conv"], r=4, lora_alpha=8, use_dora=True, init_lora_weights=False)
    randomize(net)
    p, w = net.conv.branches["default"].params, base.conv.weight.detach()
    a, b, m = p["lora_A"].detach(), p["lora_B"].detach(), p["lora_magnitude_vector"].detach()
    assert m.shape == (1, 10, 1, 1)  # PEFT's layout of the magnitudes
    merged = w + 2 * (b.flatten(1) @ a.flatten(1)).view(w.shape)
    rescaled = m.view(-1, 1, 1, 1) * merged / merged.flatten(1).norm(dim=1).view(-1, 1, 1, 1)  # W' = m ⊙ V / ‖V‖_c
    close(outputs(net.conv, x), F.conv2d(x, rescaled, base.conv.bias))
    handle.merge()
    close(net.conv.base_layer.weight.detach(), rescaled)


@pytest.mark.parametrize("model, ff", [("Conv2d", False), ("Conv2d", True), ("Conv1dGroups", True), ("Conv3d", True),
                                       ("Conv2dGroups2", True), ("Conv2dGroups2", False)])
def test_ia3_conv_scales_channels(model, ff):
    base, x = build(model)
    net = copy.deepcopy(base)
    handle = ak.inject(net, "ia3", target_modules=["conv"], feedforward_modules=["conv"] if ff else [],
                       init_ia3_weights=False)
    conv, vec = base.conv, net.conv.branches["default"].params["ia3_l"].detach()
    channels = conv.in_channels if ff else conv.out_channels
    assert vec.shape == (1, channels, *(1,) * (x.dim() - 2))
    fn = CONV[x.dim() - 2]
    if ff:  # y = conv(l ⊙ x); merged: each kernel scaled by the input channels its group reads
        want = conv(x * vec)
        per = conv.in_channels // conv.groups
        scale = torch.stack([vec.flatten()[(o // (conv.out_channels // conv.groups)) * per + torch.arange(per)]
                             for o in range(conv.out_channels)])
        weight, bias = conv.weight * scale.view(*scale.shape, *(1,) * (x.dim() - 2)), conv.bias
    else:  # y = l ⊙ conv(x), bias included
        want = conv(x) * vec
        weight, bias = conv.weight * vec.flatten().view(-1, *(1,) * (x.dim() - 1)), conv.bias * vec.flatten()
    close(outputs(net.conv, x), want)
    close(want, fn(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups))
    handle.merge()
    close(net.conv.base_layer.weight.detach(), weight.detach())
    close(net.conv.base_layer.bias.detach(), bias.detach())


def test_adalora_conv_is_the_svd_product_reshaped():
    base, x = build("Conv2d")
    net = copy.deepcopy(base)
    ak.inject(net, "adalora", target_modules=["conv"], init_r=4, lora_alpha=3, total_step=10, init_lora_weights=False)
    p = net.conv.branches["default"].params
    a, e, b = (p[k].detach() for k in ("lora_A", "lora_E", "lora_B"))
    assert a.shape == (4, 5 * 3 * 3)
    delta = (b @ (a * e) * 3 / (4 + 1e-5)).view(base.conv.weight.shape)
    close(outputs(net.conv, x), F.conv2d(x, base.conv.weight + delta, base.conv.bias))


# -- PEFT is the oracle ----------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_peft_writes_we_load(case, saved):
    base, x, peft, folder = saved(case)
    ours = copy.deepcopy(base)
    ak.load_adapter(ours, folder)
    want = outputs(peft, x)
    assert not torch.allclose(want, outputs(base, x))  # the adapter does something
    close(outputs(ours, x), want)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_merge_equals_peft_merge_and_unload(case, saved, tmp_path):
    from adaptkit.merge.engine import run_merge

    base, x, peft, folder = saved(case)
    ours = copy.deepcopy(base)
    handle = ak.load_adapter(ours, folder)
    (tmp_path / "base").mkdir()
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, tmp_path / "base" / "model.safetensors")
    recipe = {"base_model": str(tmp_path / "base"), "merge_method": "task_arithmetic",
              "models": [{"model": str(folder), "parameters": {"weight": 1.0}}]}
    if not case[4]:  # grouped conv LoRA: B·A crosses groups; PEFT refuses too
        with pytest.raises(NotImplementedError):
            copy.deepcopy(peft).merge_and_unload()
        with pytest.raises(AdaptkitError, match=r"conv LoRA with groups=\d+ cannot be merged"):
            handle.merge()
        with pytest.raises(AdaptkitError, match=r"conv LoRA with groups=\d+ cannot be merged"):
            run_merge(recipe, tmp_path / "m", progress=False, card=False)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = copy.deepcopy(peft).merge_and_unload()
    want = merged.state_dict()
    handle.merge()
    close(outputs(ours, x), outputs(merged, x))
    live = {k.replace(".base_layer", ""): v for k, v in ours.state_dict().items() if ".branches." not in k}
    run_merge(recipe, tmp_path / "m", progress=False, card=False)
    from adaptkit.io import open_store

    files = open_store(tmp_path / "m")
    for key, value in want.items():
        close(live[key], value)
        close(files.get(key).float(), value)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_we_write_peft_loads(case, tmp_path):
    name, model, cls, config, _ = case
    base, x = build(model)
    ours = copy.deepcopy(base)
    own = {k: v for k, v in config.items() if k != "target_modules"}
    handle = ak.inject(ours, OURS[cls], target_modules=config["target_modules"], **own, **INIT[cls])
    randomize(ours)
    handle.save(tmp_path / "a")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a").eval()
    close(outputs(peft, x), outputs(ours, x))


# -- refusals, by name -----------------------------------------------------------------------------
REFUSED = [
    ("groups_dora", "Conv2dGroups", "lora", {"use_dora": True}, r"conv LoRA with groups=8 and use_dora"),
    ("groups_rank", "Conv2dGroups2", "lora", {"r": 3}, r"conv LoRA with groups=2 needs a rank divisible by 2"),
    ("pissa", "Conv2d", "lora", {"init_lora_weights": "pissa"}, r"conv LoRA with init_lora_weights='pissa'"),
    ("adalora_conv1d", "Conv1d", "adalora", {"total_step": 5}, r"adalora adapts .*layers only .*leave this 1-d conv"),
    ("adalora_conv3d", "Conv3d", "adalora", {"total_step": 5}, r"adalora adapts .*leave this 3-d conv"),
    ("adalora_groups", "Conv2dGroups", "adalora", {"total_step": 5}, r"adalora adapts .*leave this 2-d conv \(groups=8\)"),
    ("delta_lora", "Conv2d", "delta_lora", {}, r"delta_lora adapts linear layers only; leave conv layers out"),
    ("vera", "Conv2d", "vera", {}, r"VeRA adapts linear layers .* not a conv"),
]


@pytest.mark.parametrize("model, variant, config, error", [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_unsupported_combinations_are_refused_by_name(model, variant, config, error):
    base, _ = build(model)
    with pytest.raises(AdaptkitError, match=error):
        ak.inject(copy.deepcopy(base), variant, target_modules=["conv"], **config)


def test_padding_modes_other_than_zeros_are_refused():
    net = Net(nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"), (1, 3, 4, 4))
    with pytest.raises(AdaptkitError, match="is a Conv2d; .*zero-padded Conv1d/2d/3d"):
        ak.inject(net, "lora", target_modules=["conv"])


def test_tensor_plane_delta_needs_no_model(saved):
    """The stored conv LoRA's ΔW, from the files alone, is PEFT's get_delta_weight."""
    base, _, peft, folder = saved(CASES[IDS.index("conv3d_lora")])
    files = read_adapter(folder)
    want = peft.base_model.model.conv.get_delta_weight("default")
    close(registry.get("variant", "lora").delta(files, "conv"), want.detach())


# -- converted and extracted -----------------------------------------------------------------------
def _save_model(model: nn.Module, folder) -> None:
    folder.mkdir()
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")


@pytest.mark.parametrize("model", ["Conv1dBigger", "Conv2d", "Conv3d"])
def test_extract_a_conv_finetune_as_a_locon_peft_loads(model, tmp_path):
    """ΔW of rank 2 over the flattened kernels: extract at rank 2 is exact, A r × in × *kernel, B out × r × 1…"""
    from adaptkit.files.convert import extract

    base, x = build(model)
    tuned = copy.deepcopy(base)
    w = tuned.conv.weight
    g = torch.Generator().manual_seed(5)
    change = (torch.randn(w.shape[0], 2, generator=g) @ torch.randn(2, w[0].numel(), generator=g)).view(w.shape)
    with torch.no_grad():
        w.add_(0.1 * change)
    _save_model(base, tmp_path / "base")
    _save_model(tuned, tmp_path / "tuned")
    report = extract(tmp_path / "tuned", tmp_path / "base", tmp_path / "lora", rank=2, progress=False)
    assert report["modules"]["conv"]["error"] < 1e-5
    files = read_adapter(tmp_path / "lora")
    assert files.shape("conv", "lora_A") == (2, *w.shape[1:])
    assert files.shape("conv", "lora_B") == (w.shape[0], 2, *(1,) * (w.dim() - 2))
    close(registry.get("variant", "lora").delta(files, "conv", base.conv.weight.detach()), 0.1 * change)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora").eval()
    close(outputs(peft, x), outputs(tuned, x))


def test_convert_conv_lora_lossless_and_resized(saved, tmp_path):
    from adaptkit.files.convert import convert

    base, x, peft, folder = saved(CASES[IDS.index("conv2d_lora")])
    convert(folder, "peft", tmp_path / "same")
    ours = copy.deepcopy(base)
    ak.load_adapter(ours, tmp_path / "same")
    close(outputs(ours, x), outputs(peft, x))
    delta = peft.base_model.model.conv.get_delta_weight("default").detach()
    report = convert(folder, "peft", tmp_path / "r4", rank=4)
    s = torch.linalg.svdvals(delta.flatten(1))
    assert report["modules"]["conv"]["error"] == pytest.approx(float(s[4:].norm() / s.norm()), rel=1e-4)
    files = read_adapter(tmp_path / "r4")
    assert files.shape("conv", "lora_A") == (4, 5, 3, 3)
    approx = registry.get("variant", "lora").delta(files, "conv")
    assert float((approx - delta).norm() / delta.norm()) == pytest.approx(float(s[4:].norm() / s.norm()), rel=1e-3)


def test_grouped_conv_lora_has_no_lowrank_form(saved, tmp_path):
    """Its B is grouped (out × r/g × 1…): no ΔW = B·A, so conversions refuse it by name; live saves keep it."""
    from adaptkit.files.convert import convert

    base, x, peft, folder = saved(CASES[IDS.index("conv2d_groups2_lora")])
    with pytest.raises(AdaptkitError, match="conv LoRA with groups=2 has no plain low-rank form"):
        convert(folder, "peft", tmp_path / "same")
    with pytest.raises(AdaptkitError, match="conv LoRA with groups=2 cannot be merged"):
        convert(folder, "peft", tmp_path / "r4", rank=4)
    ours = copy.deepcopy(base)
    handle = ak.load_adapter(ours, folder)
    handle.save(tmp_path / "saved")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "saved").eval()
    close(outputs(again, x), outputs(peft, x))


def test_quantization_aware_conv_runs_the_quantized_merged_kernel():
    """QAT: y = conv(x, Q(W + ΔW)) + b with the layer's stride and padding; unmerge restores W exactly."""
    base, x = build("Conv2dStrided")
    net = copy.deepcopy(base)
    handle = ak.inject(net, "lora", target_modules=["conv"], r=2, init_lora_weights=False)
    randomize(net)
    quantizer, conv = registry.get("quantizer", "int8"), base.conv
    kernel = conv.weight.detach() + net.conv.delta("default")
    handle.quantization_aware("int8")
    want = F.conv2d(x, quantizer.dequantize(quantizer.quantize(kernel)).view(kernel.shape), conv.bias, conv.stride,
                    conv.padding)
    close(outputs(net.conv, x), want)
    handle.quantization_aware(None)
    handle.merge()
    handle.unmerge()
    close(net.conv.base_layer.weight.detach(), conv.weight.detach())


@pytest.mark.parametrize("rank", [None, 2], ids=["exact", "resized"])
def test_adalora_conv_converts_to_a_conv_lora_given_the_base(saved, tmp_path, rank):
    """AdaLoRA's Conv2d factors are flattened kernels; with the base the LoRA gets conv shapes PEFT loads."""
    from adaptkit.files.convert import convert

    base, x, peft, folder = saved(CASES[IDS.index("conv2d_adalora_2")])
    _save_model(base, tmp_path / "base")
    convert(folder, "peft", tmp_path / "lora", base=tmp_path / "base", rank=rank)
    files = read_adapter(tmp_path / "lora")
    assert files.shape("conv", "lora_A") == (rank or 12, 5, 3, 3)
    assert files.shape("lin0", "lora_A") == (rank or 12, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora").eval()
    if rank is None:
        close(outputs(converted, x), outputs(peft, x))
    want = peft.base_model.model.conv.get_delta_weight("default").detach()
    s = torch.linalg.svdvals(want.flatten(1))
    got = converted.base_model.model.conv.get_delta_weight("default").detach()
    assert float((got - want).norm() / want.norm()) <= float(s[rank or 12:].norm() / s.norm()) + 1e-5


def test_conv_loras_merge_into_a_conv_lora_adapter(tmp_path):
    """Adapter output: ΔW = Σ wᵢ·ΔWᵢ over the kernels, refactored to a conv LoRA (exact at rank 4 from two
    rank-2 inputs); concatenating kernels is refused by name."""
    from adaptkit.merge.engine import run_merge

    base, x = build("Conv2d")
    folders, deltas = [], []
    for seed in (1, 2):
        peft = peft_model(base, LoraConfig, {"target_modules": ["conv"], "r": 2})
        randomize(peft, seed)
        peft.save_pretrained(tmp_path / f"in{seed}")
        folders.append(tmp_path / f"in{seed}")
        deltas.append(peft.base_model.model.conv.get_delta_weight("default").detach())
    models = [{"model": str(f), "parameters": {"weight": w}} for f, w in zip(folders, (1.0, -0.5))]
    run_merge({"merge_method": "linear", "parameters": {"normalize": False}, "models": models,
               "output": {"kind": "adapter", "rank": 4}}, tmp_path / "out", progress=False)
    files = read_adapter(tmp_path / "out")
    assert files.shape("conv", "lora_A") == (4, 5, 3, 3)
    close(registry.get("variant", "lora").delta(files, "conv"), deltas[0] - 0.5 * deltas[1])
    with pytest.raises(AdaptkitError, match="conv LoRA's factors are kernels"):
        run_merge({"merge_method": "concat", "models": models, "output": {"kind": "adapter"}}, tmp_path / "cat",
                  progress=False)


@pytest.mark.parametrize("case, sizes", [("conv2d_lora", {"rank": 8}), ("conv3d_dora", {"rank": 8}),
                                         ("conv2d_ia3_3", {"size": 10}), ("conv2d_ia3_2", {"size": 5})])
def test_inspect_reads_conv_adapters_from_headers(case, sizes, saved):
    _, _, _, folder = saved(CASES[IDS.index(case)])
    found = ak.inspect(folder)["adapter"]["modules"]["conv"]
    assert {k: found[k] for k in sizes} == sizes


@pytest.mark.parametrize("case", ["conv2d_dora", "conv2d_ia3_1", "conv2d_ia3_2", "conv3d_ia3_5"])
def test_base_dependent_conv_adapters_convert_to_a_conv_lora_by_svd(case, saved, tmp_path):
    """DoRA's and IA3's ΔW need W: with the base, at full rank (min(out, in·k) = 10) the conv LoRA is exact,
    an output-scaled bias travelling whole; PEFT loads it with the original's outputs."""
    from adaptkit.files.convert import convert

    base, x, peft, folder = saved(CASES[IDS.index(case)])
    _save_model(base, tmp_path / "base")
    report = convert(folder, "peft", tmp_path / "lora", base=tmp_path / "base", rank=10)
    assert report["modules"]["conv"]["error"] < 1e-5
    assert read_adapter(tmp_path / "lora").shape("conv", "lora_A")[0] == 10
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora").eval()
    close(outputs(converted, x), outputs(peft, x))


@pytest.mark.parametrize("case", ["conv2d_dora", "conv3d_lora_bias", "conv2d_groups2_lora", "conv2d_ia3_4",
                                  "conv2d_adalora_1"])
def test_gradients_equal_peft(case, saved):
    """Training sees PEFT's gradients (DoRA's norm detached, as the paper's §4.3 and PEFT)."""
    base, x, peft, folder = saved(CASES[IDS.index(case)])
    ours = copy.deepcopy(base)
    ak.load_adapter(ours, folder)
    theirs = copy.deepcopy(peft)
    for model in (ours, theirs):
        model.train()
        model(x).square().sum().backward()
    mine = {n.split(".")[-1]: p.grad for n, p in ours.named_parameters() if p.grad is not None and "conv" in n}
    roles = {"lora_B.bias": "lora_B_bias", "lora_magnitude_vector.weight": "lora_magnitude_vector"}
    found = {}
    for name, p in theirs.named_parameters():  # conv.<role>.default[.weight|.bias] -> our role
        if p.grad is not None and name.startswith("base_model.model.conv.") and "base_layer" not in name:
            stored = name.removeprefix("base_model.model.conv.").replace(".default", "")
            found[roles.get(stored, stored.removesuffix(".weight"))] = p.grad
    assert mine and set(mine) == set(found)
    for role, grad in mine.items():
        close(grad, found[role])


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_dropout_in_training_equals_peft(dora, tmp_path):
    """With lora_dropout, DoRA's base term is conv(dropout(x), W), as PEFT's; the same mask from the same seed."""
    base, x = build("Conv2dStrided")
    peft = peft_model(base, LoraConfig, {"target_modules": ["conv"], "lora_dropout": 0.5, "use_dora": dora})
    peft.save_pretrained(tmp_path)
    ours = copy.deepcopy(base)
    ak.load_adapter(ours, tmp_path)
    for mode in ("eval", "train"):
        results = []
        for model in (peft, ours):
            getattr(model, mode)()
            torch.manual_seed(7)
            results.append(outputs(model, x))
        close(results[1], results[0])
    assert not torch.allclose(results[0], outputs(peft.eval(), x))  # the mask did something
