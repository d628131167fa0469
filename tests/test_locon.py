"""LoCon: kohya / LyCORIS Stable Diffusion LoRA files whose modules include convolutions.

sd-scripts (`networks.lora` with conv_dim) and LyCORIS's LoCon save a convolution's LoRA under the
same keys as a linear one: `lora_down.weight` r × in × kh × kw, `lora_up.weight` out × r × 1 × 1,
`alpha`; ΔW = alpha / r · B ⊛ A, i.e. ΔW[o, i, h, w] = alpha / r · Σ_k up[o, k] · down[k, i, h, w]
(LyCORIS `functional.locon.diff_weight`). Written out here; against diffusers' own kohya loader on
tiny SD 1.x and SDXL UNets (SDXL's file with kohya's sgm names: `input_blocks_1_0_in_layers_2`,
`…_skip_connection`, `…_0_op`, `output_blocks_2_2_conv`, `input_blocks_0_0`, `out_2`), its output
with the file loaded being the reference: read (live), merged into a saved SD-like base (the
pipeline's modules under `unet.`), and written by adaptkit (kohya and diffusers files) for
diffusers to load.
"""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import adaptkit as ak
from adaptkit import registry
from adaptkit.adapter import read_adapter
from adaptkit.errors import AdaptkitError
from adaptkit.io.store import open_store
from adaptkit.merge.engine import run_merge
from adaptkit_plugins.formats._lowrank import lowrank_from_lora
from adaptkit_plugins.formats._sdnames import diffusers_to_sgm, flatten
from test_sd_formats import SD1_TINY, SDXL_TINY, unet_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest
KOHYA = registry.get("format", "kohya")
DIFFUSERS = registry.get("format", "diffusers")
LORA = registry.get("variant", "lora")
REL = 1e-4
# What sd-scripts' LoCon adapts beyond the attention: every ResNet convolution (3×3, the 1×1
# shortcut), the down/up samplers, conv_in / conv_out, and the 1×1 proj_in / proj_out of SD 1.x.
CONV_NAMES = ("conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "conv_in", "conv_out",
              "proj_in", "proj_out")


class Pipe(nn.Module):
    """An SD-like base as one set of modules: the UNet under `unet.` (the kohya file's component)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet


def save_base(unet, folder) -> None:
    """The SD-like base on disk: one model.safetensors of the pipeline's modules (`unet.…`)."""
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in Pipe(unet).state_dict().items()}, folder / "model.safetensors")


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm().clamp_min(1e-12))


def locon_entries(unet, sgm: bool):
    """(kohya name, module path, layer): the attention's linear layers and every convolution listed in
    CONV_NAMES, named as kohya's SD 1.x trainer (diffusers paths) or SDXL trainer (`sgm`) names them."""
    found = []
    for name, m in unet.named_modules():
        conv = isinstance(m, nn.Conv2d) and (name in CONV_NAMES or name.endswith(tuple(f".{c}" for c in CONV_NAMES)))
        if conv or (isinstance(m, nn.Linear) and ".attn" in name):
            found.append((f"lora_unet_{flatten(diffusers_to_sgm(name) if sgm else name)}", name, m))
    return found


def write_locon(path, entries):
    """A LoCon file as sd-scripts saves it (fp16, alphas too); the tensors and (alpha, r) per module."""
    g = torch.Generator().manual_seed(0)
    tensors, scales = {}, {}
    for i, (key, name, m) in enumerate(entries):
        # diffusers' kohya loader drops the alphas of attention layers (it keys them by processor
        # names its pattern lookup never meets) and gives them the most common alpha: they share one
        r, alpha = ((2, 1.0) if i % 3 == 0 else (4, 3.0)) if isinstance(m, nn.Conv2d) else (4, 4.0)
        if isinstance(m, nn.Conv2d):
            down = torch.randn(r, m.in_channels, *m.kernel_size, generator=g) / 4
            up = torch.randn(m.out_channels, r, 1, 1, generator=g) / 4
        else:
            down, up = torch.randn(r, m.in_features, generator=g) / 4, torch.randn(m.out_features, r, generator=g) / 4
        tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = down.half(), up.half()
        tensors[f"{key}.alpha"] = torch.tensor(alpha, dtype=torch.float16)
        scales[name] = (alpha, r)
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora", "ss_network_dim": "4",
                                            "ss_network_args": json.dumps({"conv_dim": "4", "conv_alpha": "3"})})
    return tensors, scales


@pytest.fixture(scope="module", params=["sd1", "sdxl-sgm"])
def sd(request, tmp_path_factory):
    """A tiny SD 1.x or SDXL UNet, a LoCon file for it, and diffusers' output with that file loaded."""
    xl = request.param == "sdxl-sgm"
    folder = tmp_path_factory.mktemp("locon")
    unet = unet_model(SDXL_TINY if xl else SD1_TINY)
    entries = locon_entries(unet, sgm=xl)
    tensors, scales = write_locon(folder / "locon.safetensors", entries)
    g = torch.Generator().manual_seed(2)
    inputs = {"sample": torch.randn(1, 4, 16, 16, generator=g), "timestep": 3,
              "encoder_hidden_states": torch.randn(1, 5, 32, generator=g)}
    if xl:  # SDXL's pooled text embedding and size/crop ids (80 = 32 + 6 × 8)
        inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 32, generator=g), "time_ids": torch.rand(1, 6)}
    return unet, entries, tensors, scales, folder, inputs, diffusers_output(unet, folder / "locon.safetensors", inputs)


def diffusers_output(unet, path, inputs):
    """The UNet's output with the file at `path` loaded by diffusers (its kohya converter included)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline if "added_cond_kwargs" in inputs else StableDiffusionPipeline
    fresh = copy.deepcopy(unet)
    # unet_config: what a pipeline passes, so that kohya's sgm names get mapped (SDXL)
    sd, alphas, meta = pipeline.lora_state_dict(str(path), return_lora_metadata=True, unet_config=unet.config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipeline.load_lora_into_unet(sd, alphas, unet=fresh, metadata=meta)
    return run_unet(fresh, inputs)


def run_unet(unet, inputs):
    with torch.no_grad():
        return unet(**inputs).sample


def test_conv_delta_is_the_formula_written_out(sd):
    unet, entries, tensors, scales, folder, _, _ = sd
    adapter = read_adapter(folder / "locon.safetensors")
    assert adapter.format == "kohya" and len(adapter.modules) == len(entries)
    kernels = set()
    for key, name, m in entries:
        if not isinstance(m, nn.Conv2d):
            continue
        assert adapter.modules[f"unet.{name}"]["lora_A"] == f"{key}.lora_down.weight"  # sgm names mapped
        down, up = tensors[f"{key}.lora_down.weight"].float(), tensors[f"{key}.lora_up.weight"].float()
        alpha, r = scales[name]
        expected = alpha / r * torch.einsum("ok,kihw->oihw", up[:, :, 0, 0], down)
        got = LORA.delta(adapter, f"unet.{name}", m.weight.detach())
        assert got.shape == m.weight.shape and rel(got, expected) < 1e-6, name
        kernels.add(tuple(m.kernel_size))
    assert kernels == {(1, 1), (3, 3)}  # 3×3 and 1×1 convolutions, strided samplers among them


def test_locon_loads_live_like_diffusers(sd):
    unet, _, _, _, folder, inputs, reference = sd
    pipe = Pipe(copy.deepcopy(unet))
    ak.load_adapter(pipe, folder / "locon.safetensors")
    assert rel(run_unet(pipe.unet, inputs), reference) < REL
    assert rel(run_unet(unet, inputs), reference) > 1e-3  # the adapter changes the output


def test_locon_merged_into_an_sd_base_equals_diffusers(sd, tmp_path):
    unet, entries, _, _, folder, inputs, reference = sd
    save_base(unet, tmp_path / "base")
    run_merge({"base_model": str(tmp_path / "base"), "merge_method": "task_arithmetic",
               "models": [{"model": str(folder / "locon.safetensors"), "parameters": {"weight": 1.0}}]},
              tmp_path / "m", progress=False)
    merged = load_file(tmp_path / "m" / "model.safetensors")
    fresh = copy.deepcopy(unet)
    fresh.load_state_dict({k.removeprefix("unet."): v for k, v in merged.items()})
    assert rel(run_unet(fresh, inputs), reference) < REL
    changed = {k for k, v in unet.state_dict().items() if not torch.equal(merged[f"unet.{k}"], v)}
    assert changed == {f"{name}.weight" for _, name, _ in entries}  # each module's weight, nothing else


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_adaptkit_writes_locon_that_diffusers_loads(sd, fmt, tmp_path):
    unet, entries, _, scales, folder, inputs, reference = sd
    options = {"unet_names": "sgm"} if fmt == "kohya" and "added_cond_kwargs" in inputs else {}
    out = registry.get("format", fmt).write(lowrank_from_lora(read_adapter(folder / "locon.safetensors")), tmp_path,
                                            **options)
    assert rel(diffusers_output(unet, out[0], inputs), reference) < REL
    again = read_adapter(out[0])
    conv = [name for _, name, m in entries if isinstance(m, nn.Conv2d)]
    for name in conv:  # kernels and alphas come back exactly
        assert again.shape(f"unet.{name}", "lora_A")[2:] == tuple(unet.get_submodule(name).kernel_size)
        assert LORA.module_alpha(again, f"unet.{name}") == scales[name][0]
    if fmt == "kohya":
        meta = open_store(out[0]).metadata
        assert json.loads(meta["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "3"}
        if options:  # kohya's own sgm names, byte for byte
            assert sorted(load_file(out[0])) == sorted(load_file(folder / "locon.safetensors"))


def test_tucker_locon_is_lycoris_formula_and_merges(tmp_path):
    """LyCORIS's Tucker LoCon (`use_tucker`): down 1×1, a core lora_mid r × r × kh × kw, up 1×1;
    ΔW = alpha / r · einsum("i j k l, i p, j r -> p r k l", mid, up, down) (`rebuild_tucker`)."""
    unet = unet_model(SD1_TINY)
    g = torch.Generator().manual_seed(3)
    tensors, expected = {}, {}
    for name, r, alpha in (("down_blocks.0.resnets.0.conv1", 2, 1.0), ("up_blocks.1.resnets.0.conv2", 3, 6.0)):
        m = unet.get_submodule(name)
        down = torch.randn(r, m.in_channels, 1, 1, generator=g)
        mid = torch.randn(r, r, *m.kernel_size, generator=g)
        up = torch.randn(m.out_channels, r, 1, 1, generator=g)
        key = f"lora_unet_{flatten(name)}"
        tensors |= {f"{key}.lora_down.weight": down, f"{key}.lora_mid.weight": mid, f"{key}.lora_up.weight": up,
                    f"{key}.alpha": torch.tensor(alpha)}
        expected[name] = alpha / r * torch.einsum("ijkl,ip,jr->prkl", mid, up.flatten(1).T, down.flatten(1))
    save_file(tensors, str(tmp_path / "tucker.safetensors"))
    adapter = read_adapter(tmp_path / "tucker.safetensors")
    for name, delta in expected.items():
        assert rel(LORA.delta(adapter, f"unet.{name}"), delta) < 1e-6
    save_base(unet, tmp_path / "base")
    run_merge({"base_model": str(tmp_path / "base"), "merge_method": "task_arithmetic",
               "models": [{"model": str(tmp_path / "tucker.safetensors"), "parameters": {"weight": 1.0}}]},
              tmp_path / "m", progress=False)
    merged = load_file(tmp_path / "m" / "model.safetensors")
    for name, delta in expected.items():
        assert rel(merged[f"unet.{name}.weight"] - unet.get_submodule(name).weight.detach(), delta) < REL
    with pytest.raises(AdaptkitError, match=r"a Tucker LoCon \(lora_mid, 2 module\(s\)\) cannot be loaded onto a live"):
        ak.load_adapter(Pipe(copy.deepcopy(unet)), tmp_path / "tucker.safetensors")


def test_locon_with_dora_scale_is_refused_by_name(tmp_path):
    """LyCORIS's weight decomposition rescales W + ΔW: never read as a plain LoCon."""
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    save_file({f"{name}.lora_down.weight": torch.zeros(2, 32, 3, 3), f"{name}.lora_up.weight": torch.zeros(32, 2, 1, 1),
               f"{name}.alpha": torch.tensor(2.0), f"{name}.dora_scale": torch.ones(1, 32, 1, 1)},
              str(tmp_path / "locon.safetensors"))
    with pytest.raises(AdaptkitError, match=r"is a LoRA with dora_scale \(LyCORIS weight decomposition\)"):
        read_adapter(tmp_path / "locon.safetensors")
