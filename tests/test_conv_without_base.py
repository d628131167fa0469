"""Conv adapters whose files store a kernel flattened, converted or merged without the base model.

PEFT's LoHa (no Tucker cores), LoKr (a low-rank second factor: lokr_w2_b r × in·kh·kw) and AdaLoRA on
Conv2d keep a convolution's kernel flattened into the input side and record no kernel shape: only the base
weight tells such a module from a Linear layer and gives the kernel. A Linear-shaped LoRA written for a
convolution loads nowhere (PEFT: size mismatch; adaptkit used to blame "a different base model"), so
`convert --to peft|kohya` and adapter merges (`--rank`) without a base refuse a module named as a
convolution in one line (`pass --base`), and with the base write a conv LoRA (A r × in × kh × kw,
B out × r × 1 × 1) whose ΔW PEFT computes equal to the original's. Files that do record the kernel (LoHa's
Tucker cores, LoKr's full 4-d lokr_w2) convert without a base, as before. The oracle: PEFT's own
`get_delta_weight` on the adapters it wrote and on adaptkit's outputs it loads.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from torch import nn

from adaptkit.adapter import read_adapter
from adaptkit.cli import cli
from adaptkit.errors import AdaptkitError
from adaptkit.files.convert import convert
from adaptkit.files.lowrank import module_delta
from adaptkit.merge.engine import run_merge
from adaptkit import registry

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest

CONV = "unet.down_blocks.0.resnets.0.conv1"  # a Stable Diffusion path, so kohya names exist for it
LINEAR = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
RANK = 10  # min(out, in) of both layers' ΔW (8 × 36 and 12 × 10): the SVD keeps every ΔW whole
REL = 1e-4


class SDShaped(nn.Module):
    """A UNet 3×3 conv (4 → 8 channels) and a CLIP q_proj at Stable Diffusion paths."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        resnet = nn.ModuleDict({"conv1": nn.Conv2d(4, 8, 3, padding=1)})
        self.unet = nn.ModuleDict({"down_blocks": nn.ModuleList([nn.ModuleDict({"resnets": nn.ModuleList([resnet])})])})
        attn = nn.ModuleDict({"self_attn": nn.ModuleDict({"q_proj": nn.Linear(10, 12)})})
        encoder = nn.ModuleDict({"layers": nn.ModuleList([attn])})
        self.text_encoder = nn.ModuleDict({"text_model": nn.ModuleDict({"encoder": encoder})})


def peft_config(kind: str, seed: int):
    from peft import AdaLoraConfig, LoHaConfig, LoKrConfig

    targets = ["conv1", "q_proj"]
    return {
        "loha": lambda: LoHaConfig(target_modules=targets, r=2 + seed, alpha=3, init_weights=False),
        "lokr": lambda: LoKrConfig(target_modules=targets, r=1, alpha=2 + seed, init_weights=False),  # r=1: w2 low-rank
        "adalora": lambda: AdaLoraConfig(target_modules=targets, init_r=3 + seed, lora_alpha=5, total_step=1,
                                         init_lora_weights=False),
        "loha-tucker": lambda: LoHaConfig(target_modules=targets, r=2, alpha=3, use_effective_conv2d=True,
                                          init_weights=False),
        "lokr-full": lambda: LoKrConfig(target_modules=targets, r=8, alpha=3, init_weights=False),
    }[kind]()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(kind, seed) -> (PEFT model, its folder); the base model and its saved folder under "base"."""
    from peft import get_peft_model

    root, cache = tmp_path_factory.mktemp("conv"), {}
    base = SDShaped()
    (root / "base").mkdir()
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, root / "base" / "model.safetensors")

    def get(kind: str, seed: int = 0):
        if kind == "base":
            return base, root / "base"
        if (kind, seed) not in cache:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                peft = get_peft_model(copy.deepcopy(base), peft_config(kind, seed)).eval()
            generator = torch.Generator().manual_seed(seed + 1)
            with torch.no_grad():  # every tensor non-zero (AdaLoRA's E starts at 0)
                for name, p in peft.named_parameters():
                    if p.requires_grad:
                        p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
            folder = root / f"{kind}-{seed}"
            peft.save_pretrained(folder)
            cache[kind, seed] = peft, folder
        return cache[kind, seed]

    return get


def delta(peft, path: str) -> torch.Tensor:
    return peft.base_model.model.get_submodule(path).get_delta_weight("default").detach()


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    assert float(torch.linalg.norm(got - want) / torch.linalg.norm(want)) <= REL


def invoke(*args):
    return CliRunner().invoke(cli, list(map(str, args)))


FLAT = ["loha", "lokr", "adalora"]
# (id, command): {a}, {b} two adapters of one kind, {out} the output folder
COMMANDS = [
    ("convert-peft", ("convert", "{a}", "--to", "peft", "--rank", RANK, "-o", "{out}")),
    ("convert-kohya", ("convert", "{a}", "--to", "kohya", "--rank", RANK, "-o", "{out}")),
    ("merge-rank", ("merge", "-q", "--method", "linear", "-m", "{a}:0.5", "-m", "{b}:0.5", "--rank", RANK, "-o", "{out}")),
]


@pytest.mark.parametrize("kind", FLAT)
@pytest.mark.parametrize("command", [c for _, c in COMMANDS], ids=[i for i, _ in COMMANDS])
def test_flat_conv_kernels_without_base_are_refused_in_one_line(saved, kind, command, tmp_path):
    paths = {"a": saved(kind)[1], "b": saved(kind, 1)[1], "out": tmp_path / "out"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = invoke(*(str(part).format(**paths) for part in command))
    assert result.exit_code == 1, result.output
    message = result.output.strip()
    assert len(message.splitlines()) == 1
    assert f"module {CONV} is a convolution whose kernel shape the file does not record" in message
    assert "pass --base" in message and "different base" not in message
    assert not (tmp_path / "out").exists()


def test_adalora_without_rank_is_refused_too(saved, tmp_path):
    """AdaLoRA converts exactly (its factors P·diag(E)·Q), still flat: refused the same way without a base."""
    with pytest.raises(AdaptkitError, match=f"module {CONV} is a convolution whose kernel shape"):
        convert(saved("adalora")[1], "peft", tmp_path / "out")


def peft_loads(folder, base):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()


@pytest.mark.parametrize("kind", FLAT)
def test_with_base_convert_to_peft_writes_conv_loras_peft_loads_equal(saved, kind, tmp_path):
    base, base_folder = saved("base")
    peft, folder = saved(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rank 10 above conv1's 8: clamped, with a warning
        convert(folder, "peft", tmp_path / "out", rank=RANK, base=base_folder)
    lora = peft_loads(tmp_path / "out", base)
    assert lora.peft_config["default"].peft_type.value == "LORA"
    assert lora.base_model.model.get_submodule(CONV).lora_A["default"].weight.shape[1:] == (4, 3, 3)
    for path in (CONV, LINEAR):
        close(delta(lora, path), delta(peft, path))


@pytest.mark.parametrize("kind", FLAT)
def test_with_base_convert_to_kohya_holds_the_kernel(saved, kind, tmp_path):
    """Read back, the kohya file's conv module holds a conv LoRA whose ΔW (s·B·A over the flattened kernel,
    written out here) is PEFT's."""
    from safetensors.torch import load_file

    base, base_folder = saved("base")
    peft, folder = saved(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert(folder, "kohya", tmp_path / "out", rank=RANK, base=base_folder)
    tensors = load_file(next((tmp_path / "out").glob("*.safetensors")))
    name = "lora_unet_" + CONV.removeprefix("unet.").replace(".", "_")
    down, up, alpha = (tensors[f"{name}.{k}"].float() for k in ("lora_down.weight", "lora_up.weight", "alpha"))
    assert down.shape[1:] == (4, 3, 3) and up.shape[2:] == (1, 1)
    written_out = float(alpha) / down.shape[0] * (up.flatten(1) @ down.flatten(1)).reshape(8, 4, 3, 3)
    close(written_out, delta(peft, CONV))
    files = read_adapter(next((tmp_path / "out").glob("*.safetensors")))
    weight = base.get_submodule(CONV).weight.detach()
    close(module_delta(registry.get("variant", files.variant), files, CONV, weight), delta(peft, CONV))


@pytest.mark.parametrize("kind", FLAT)
def test_with_base_adapters_merge_into_a_conv_lora_peft_loads_equal(saved, kind, tmp_path):
    base, base_folder = saved("base")
    (peft0, a), (peft1, b) = saved(kind), saved(kind, 1)
    recipe = {"merge_method": "linear", "parameters": {"normalize": False}, "base_model": str(base_folder),
              "models": [{"model": str(a), "parameters": {"weight": 1.0}}, {"model": str(b), "parameters": {"weight": 1.0}}],
              "output": {"kind": "adapter", "rank": RANK}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_merge(recipe, tmp_path / "out", progress=False, card=False)
    lora = peft_loads(tmp_path / "out", base)
    for path in (CONV, LINEAR):
        close(delta(lora, path), delta(peft0, path) + delta(peft1, path))


def test_a_flat_kernel_merges_without_base_where_another_input_records_the_kernel(saved, tmp_path):
    """LoHa without and with Tucker cores on the same conv: the second file gives the kernel shape, so the merge
    needs no base (it used to blame "adapters for different bases")."""
    base, _ = saved("base")
    (flat, a), (full, b) = saved("loha"), saved("loha-tucker")
    recipe = {"merge_method": "linear", "parameters": {"normalize": False},
              "models": [{"model": str(a), "parameters": {"weight": 1.0}}, {"model": str(b), "parameters": {"weight": 1.0}}],
              "output": {"kind": "adapter", "rank": RANK}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_merge(recipe, tmp_path / "out", progress=False, card=False)
    lora = peft_loads(tmp_path / "out", base)
    for path in (CONV, LINEAR):
        close(delta(lora, path), delta(flat, path) + delta(full, path))


@pytest.mark.parametrize("kind", ["loha-tucker", "lokr-full"])
def test_files_that_record_the_kernel_convert_without_base(saved, kind, tmp_path):
    base, _ = saved("base")
    peft, folder = saved(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert(folder, "peft", tmp_path / "out", rank=RANK)
    lora = peft_loads(tmp_path / "out", base)
    for path in (CONV, LINEAR):
        close(delta(lora, path), delta(peft, path))


def test_a_flat_conv_lora_on_disk_is_named_as_such_when_loaded(saved, tmp_path):
    """A LoRA written with flat conv factors (as conversions without a base used to write them) is refused on
    load by what it is, not as "an adapter for a different base model"."""
    import adaptkit as ak
    from safetensors.torch import load_file

    base, base_folder = saved("base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert(saved("adalora")[1], "peft", tmp_path / "out", base=base_folder)
    weights = tmp_path / "out" / "adapter_model.safetensors"
    save_file({k: v.flatten(1) if ".conv1." in k else v for k, v in load_file(weights).items()}, weights)
    with pytest.raises(AdaptkitError, match="kernel is stored flattened.*again with --base") as err:
        ak.load_adapter(copy.deepcopy(base), tmp_path / "out")
    assert "different base" not in str(err.value)


def test_a_peft_lokr_conv_is_told_by_its_factors_whatever_its_name(tmp_path):
    """PEFT splits a Linear layer's inputs as factorization(in) = (c, d): lokr_w1 has c columns, lokr_w2_b d. A
    conv's lokr_w2_b has d·kh·kw (here 2·9 = 18, and factorization(2·18) = (6, 6), not (2, 18)), so a layer
    not named as a convolution is refused all the same; a Linear one converts."""
    from peft import LoKrConfig, get_peft_model
    from safetensors.torch import load_file

    torch.manual_seed(0)
    model = nn.ModuleDict({"layer": nn.Conv2d(4, 8, 3), "head": nn.Linear(10, 12)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = get_peft_model(model, LoKrConfig(target_modules=["layer", "head"], r=1, init_weights=False))
    peft.save_pretrained(tmp_path / "lokr")
    assert any(".layer.lokr_w2_b" in k for k in load_file(tmp_path / "lokr" / "adapter_model.safetensors"))
    with pytest.raises(AdaptkitError, match="module layer is a convolution whose kernel shape the file does not record"):
        convert(tmp_path / "lokr", "peft", tmp_path / "out", rank=RANK)
    files = read_adapter(tmp_path / "lokr")
    lokr = registry.get("variant", "lokr")
    assert lokr.flat_kernel(files, "layer") and not lokr.flat_kernel(files, "head")
