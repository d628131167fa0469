"""Stable Diffusion LoRAs merged into real SD bases (mode 2): a diffusers pipeline folder, a UNet folder
saved on its own, and a single-file ("original", LDM/sgm) checkpoint, against diffusers.

The checkpoint's name map is checked against diffusers' own converters (`convert_ldm_unet_checkpoint`,
`convert_ldm_clip_checkpoint`, `convert_open_clip_checkpoint`): each tiny checkpoint here converts back to
the diffusers/transformers state dict it was made from, and the merged one converts back to W + ΔW with
ΔW = alpha / r · up · down written out (convolutions: Σ_k up[o, k] · down[k, i, h, w]), SDXL's second text
encoder's q, k and v landing in their row blocks of OpenCLIP's fused in_proj_weight. The pipeline folder
is compared with diffusers' own `load_lora_weights` + `fuse_lora`.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from adaptkit import registry
from adaptkit.adapter import read_adapter
from adaptkit.cli import cli
from adaptkit.errors import AdaptkitError
from adaptkit.merge.engine import run_merge
from adaptkit_plugins.formats._lowrank import lowrank_from_lora
from adaptkit_plugins.formats._sdcheckpoint import UNET, unet_map
from adaptkit_plugins.formats._sdnames import diffusers_to_sgm, flatten, kohya_text_path
from test_sd_formats import ALPHAS, SD1_TINY, SDXL_TINY, clip_model, layers, unet_model

SD1_TWO = dict(SD1_TINY, layers_per_block=2)  # the released models' two ResNet layers per block
TE1, TE2 = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."
SD1_TE, SD2_TE = "cond_stage_model.transformer.", "cond_stage_model.model."
VAE_KEY = "first_stage_model.decoder.conv_in.weight"  # stands for everything no LoRA touches


def merge_into(base, adapter, out, **options):
    """Mode 2, as the quick form `adaptkit merge --base BASE -m ADAPTER -o OUT` runs it."""
    return run_merge({"merge_method": "task_arithmetic", "base_model": str(base),
                      "models": [{"model": str(adapter), "parameters": {"weight": 1}}]}, out, progress=False, **options)


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12))


def ldm_unet(unet) -> dict:
    """The UNet's tensors under a single-file checkpoint's names: sgm names (`diffusers_to_sgm`), an up
    block without attention keeping its upsampler at index 1 (SD 1.x's `output_blocks.2.1.conv`)."""
    plain = {i for i, kind in enumerate(unet.config.up_block_types) if "CrossAttn" not in kind}
    found = {}
    for key, value in unet.state_dict().items():
        module, param = key.rsplit(".", 1)
        name = diffusers_to_sgm(module, unet.config.layers_per_block)
        if ".upsamplers." in module and int(module.split(".")[1]) in plain:
            name = name.replace(".2.conv", ".1.conv")
        found[f"{UNET}{name}.{param}"] = value
    return found


def hf_text(model) -> dict:
    """transformers' CLIP state dict with `text_model.` (transformers 5 drops it for CLIPTextModel)."""
    return {kohya_text_path(k): v for k, v in model.state_dict().items()}


def open_clip(model, prefix: str) -> dict:
    """A CLIPTextModelWithProjection in OpenCLIP's layout, from diffusers' own table read backwards; q, k, v
    stacked into `attn.in_proj_weight` / `in_proj_bias`."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    table = DIFFUSERS_TO_LDM_MAPPING["openclip"]
    state, found = hf_text(model), {}
    for hf, ldm in table["layers"].items():
        if hf in state:  # SD 2.x's CLIPTextModel has no text_projection
            found[prefix + ldm] = state[hf].T.contiguous() if ldm == "text_projection" else state[hf]
    renames = [(".self_attn.out_proj.", ".attn.out_proj."), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
               (".mlp.fc1.", ".mlp.c_fc."), (".mlp.fc2.", ".mlp.c_proj.")]
    for i in range(model.config.num_hidden_layers):
        hf = f"text_model.encoder.layers.{i}."
        block = f"{prefix}transformer.resblocks.{i}."
        for param in ("weight", "bias"):
            found[f"{block}attn.in_proj_{param}"] = torch.cat([state[f"{hf}self_attn.{p}_proj.{param}"] for p in "qkv"])
        for key in state:
            if key.startswith(hf) and not any(f"self_attn.{p}_proj." in key for p in "qkv"):
                name = key.replace(hf, block)
                for old, new in renames:
                    name = name.replace(old, new)
                found[name] = state[key]
    return found


def lora_file(path, entries, dtype=torch.float32) -> dict:
    """A kohya file for `entries` (kohya name, module path, layer); returns module path -> ΔW written out."""
    g = torch.Generator().manual_seed(0)
    tensors, deltas = {}, {}
    for i, (name, path_in_model, m) in enumerate(entries):
        r, alpha = (2 if i % 5 == 0 else 4), ALPHAS[i % 4]
        conv = isinstance(m, torch.nn.Conv2d)
        down = torch.randn(r, m.in_channels, *m.kernel_size, generator=g) if conv else torch.randn(r, m.in_features, generator=g)
        up = torch.randn(m.out_channels if conv else m.out_features, r, *((1, 1) if conv else ()), generator=g)
        down, up = (down / 8).to(dtype), (up / 8).to(dtype)
        tensors.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                        f"{name}.alpha": torch.tensor(alpha, dtype=dtype)})
        scale = alpha / r
        deltas[path_in_model] = scale * (torch.einsum("ok,kihw->oihw", up.float()[..., 0, 0], down.float()) if conv
                                         else up.float() @ down.float())
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora"})
    return deltas


def entries_for(unet, encoders, sgm: bool):
    """What sd-scripts adapts (attention, MLP, the 1×1 proj_in/out, and 3×3 ResNet and sampler convs), named
    as its SD 1.x trainer (diffusers paths) or SDXL trainer (sgm) writes them."""
    found = []
    for n, m in layers(unet):
        if ".attentions." in n or n.endswith(("resnets.0.conv1", "upsamplers.0.conv", "downsamplers.0.conv")):
            found.append(("lora_unet_" + flatten(diffusers_to_sgm(n) if sgm else n), f"unet.{n}", m))
    for prefix, component, model in encoders:
        for n, m in layers(model):
            if ".layers." in n:
                found.append((f"{prefix}_{flatten(kohya_text_path(n))}", f"{component}.{kohya_text_path(n)}", m))
    return found


# -- the name map ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", [SD1_TINY, SD1_TWO, SDXL_TINY], ids=["sd1-one-layer", "sd1", "sdxl"])
def test_unet_map_agrees_with_diffusers_converter(config):
    unet = unet_model(config)
    ldm = ldm_unet(unet)
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    back, state = convert_ldm_unet_checkpoint(ldm, dict(unet.config)), unet.state_dict()
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)  # a faithful checkpoint
    found = unet_map(ldm)
    modules = [n for n, _ in layers(unet)]
    assert len(modules) > 80
    assert [n for n in modules if n not in found or not torch.equal(ldm[f"{UNET}{found[n]}.weight"], state[f"{n}.weight"])] == []


# -- single-file checkpoints ---------------------------------------------------------------------------

def checkpoint(kind: str, dtype):
    """(state dict of a tiny single-file checkpoint, its models, and the kohya entries for them)."""
    if kind == "sd2":  # linear proj_in/out, OpenCLIP's layout for its one text encoder
        unet, te = unet_model(dict(SD1_TWO, use_linear_projection=True)), clip_model()
        state = {**ldm_unet(unet), **open_clip(te, SD2_TE)}
        entries = entries_for(unet, [("lora_te", "text_encoder", te)], sgm=False)
        models = {"unet": unet, "text_encoder": te}
    elif kind == "sdxl":
        unet, te, te2 = unet_model(SDXL_TINY), clip_model(), clip_model(projection=True, seed=1)
        state = {**ldm_unet(unet), **{TE1 + k: v for k, v in hf_text(te).items()}, **open_clip(te2, TE2)}
        entries = entries_for(unet, [("lora_te1", "text_encoder", te), ("lora_te2", "text_encoder_2", te2)], sgm=True)
        models = {"unet": unet, "text_encoder": te, "text_encoder_2": te2}
    else:
        unet, te = unet_model(SD1_TWO), clip_model()
        state = {**ldm_unet(unet), **{SD1_TE + k: v for k, v in hf_text(te).items()}}
        entries = entries_for(unet, [("lora_te", "text_encoder", te)], sgm=False)
        models = {"unet": unet, "text_encoder": te}
    state[VAE_KEY] = torch.randn(8, 4, 3, 3)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    return state, models, entries


def converted(state: dict, models: dict) -> dict:
    """A checkpoint's models back in diffusers' and transformers' names, by diffusers' converters."""
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_open_clip_checkpoint)

    found = {"unet": convert_ldm_unet_checkpoint(state, dict(models["unet"].config))}
    found["text_encoder"] = convert_open_clip_checkpoint(models["text_encoder"], state, prefix=SD2_TE) \
        if f"{SD2_TE}ln_final.weight" in state else convert_ldm_clip_checkpoint(state)
    if "text_encoder_2" in models:
        found["text_encoder_2"] = convert_open_clip_checkpoint(models["text_encoder_2"], state, prefix=TE2)
    return found


@pytest.mark.parametrize("kind, dtype", [("sd1", torch.float32), ("sd1", torch.float16), ("sd2", torch.float32),
                                         ("sdxl", torch.float32)], ids=["sd1", "sd1-fp16", "sd2", "sdxl"])
def test_lora_merged_into_a_single_file_checkpoint(kind, dtype, tmp_path):
    state, models, entries = checkpoint(kind, dtype)
    save_file(state, str(tmp_path / "model-v1.safetensors"), metadata={"modelspec.title": "tiny"})
    deltas = lora_file(tmp_path / "lora.safetensors", entries, dtype)
    result = CliRunner().invoke(cli, ["merge", "--base", str(tmp_path / "model-v1.safetensors"),
                                      "-m", str(tmp_path / "lora.safetensors"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    merged_file = tmp_path / "out" / "model-v1.safetensors"  # one file of the base's name, as front ends load it
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["README.md", "adaptkit_recipe.yml", merged_file.name]
    merged = load_file(str(merged_file))
    assert {k: (v.dtype, v.shape) for k, v in merged.items()} == {k: (v.dtype, v.shape) for k, v in state.items()}
    with safe_open(str(merged_file), "pt") as f:
        assert f.metadata()["modelspec.title"] == "tiny"
    # every module's ΔW landed where diffusers' converter reads that module from
    ours, base = converted(merged, models), converted(state, models)
    changed = {(c, k) for c in base for k in base[c] if not torch.equal(ours[c][k], base[c][k])}
    expected = {}
    for path, delta in deltas.items():
        component, module = path.split(".", 1)
        module = module if component == "unet" or f"{module}.weight" in base[component] else module.removeprefix("text_model.")
        expected[(component, f"{module}.weight")] = base[component][f"{module}.weight"].float() + delta
    assert changed == set(expected) and len(expected) == len(entries)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-3
    assert max(rel(ours[c][k], want) for (c, k), want in expected.items()) < tolerance
    untouched = [k for k in state if k.startswith(("first_stage_model.", "model.diffusion_model.out."))]
    assert untouched and all(torch.equal(merged[k].view(torch.uint8), state[k].view(torch.uint8)) for k in untouched)
    if kind != "sd1":  # q, k and v: their own row blocks of the fused projection, each changed
        width = models["text_encoder_2" if kind == "sdxl" else "text_encoder"].config.hidden_size
        fused = f"{TE2 if kind == 'sdxl' else SD2_TE}transformer.resblocks.0.attn.in_proj_weight"
        for i in range(3):
            assert not torch.equal(merged[fused][i * width:(i + 1) * width], state[fused][i * width:(i + 1) * width])


def test_pickle_checkpoint_becomes_a_safetensors_file(tmp_path):
    """A `.ckpt` (read with --allow-pickle, its `state_dict`) merges as its safetensors twin does."""
    state, _, entries = checkpoint("sd1", torch.float32)
    save_file(state, str(tmp_path / "sd1.safetensors"))
    torch.save({"state_dict": state, "global_step": 1}, tmp_path / "sd1.ckpt")
    lora_file(tmp_path / "lora.safetensors", entries)
    merge_into(tmp_path / "sd1.safetensors", tmp_path / "lora.safetensors", tmp_path / "a", card=False)
    merge_into(tmp_path / "sd1.ckpt", tmp_path / "lora.safetensors", tmp_path / "b", card=False, allow_pickle=True)
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["sd1.safetensors"]
    want, got = load_file(str(tmp_path / "a" / "sd1.safetensors")), load_file(str(tmp_path / "b" / "sd1.safetensors"))
    assert want.keys() == got.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_checkpoint_refusals_name_the_module(tmp_path):
    state, models, entries = checkpoint("sdxl", torch.float32)
    projection = [("lora_te2_text_projection", "text_encoder_2.text_projection",
                   models["text_encoder_2"].text_projection)]
    save_file(state, str(tmp_path / "xl.safetensors"))
    lora_file(tmp_path / "proj.safetensors", projection)
    with pytest.raises(AdaptkitError, match=r"'text_encoder_2\.text_projection' has no counterpart in .*OpenCLIP") as e:
        merge_into(tmp_path / "xl.safetensors", tmp_path / "proj.safetensors", tmp_path / "out")
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
    sd1_state, _, sd1_entries = checkpoint("sd1", torch.float32)  # an SD 1.x LoRA into SDXL: a module it lacks
    lora_file(tmp_path / "sd1.safetensors", sd1_entries)
    with pytest.raises(AdaptkitError, match=r"targets 'unet\..*', which .* does not have"):
        merge_into(tmp_path / "xl.safetensors", tmp_path / "sd1.safetensors", tmp_path / "out")


def test_loha_file_merged_into_a_checkpoint_is_lycoris_formula(tmp_path):
    """LyCORIS's LoHa under kohya names: ΔW = alpha / r · (w1a·w1b) ⊙ (w2a·w2b), r = w1b's rows."""
    state, models, entries = checkpoint("sd1", torch.float32)
    save_file(state, str(tmp_path / "sd1.safetensors"))
    g, tensors, deltas = torch.Generator().manual_seed(3), {}, {}
    for name, path, m in entries[::7]:
        if isinstance(m, torch.nn.Linear):
            w1a, w2a = (torch.randn(m.out_features, 2, generator=g) / 4 for _ in range(2))
            w1b, w2b = (torch.randn(2, m.in_features, generator=g) / 4 for _ in range(2))
            tensors.update({f"{name}.hada_w1_a": w1a, f"{name}.hada_w1_b": w1b, f"{name}.hada_w2_a": w2a,
                            f"{name}.hada_w2_b": w2b, f"{name}.alpha": torch.tensor(3.0)})
            deltas[path] = 3.0 / 2 * (w1a @ w1b) * (w2a @ w2b)
    save_file(tensors, str(tmp_path / "loha.safetensors"))
    merge_into(tmp_path / "sd1.safetensors", tmp_path / "loha.safetensors", tmp_path / "out")
    ours, base = converted(load_file(str(tmp_path / "out" / "sd1.safetensors")), models), converted(state, models)
    assert len(deltas) > 4 and any(p.startswith("text_encoder.") for p in deltas)
    for path, delta in deltas.items():
        component, module = path.split(".", 1)
        key = f"{module}.weight" if f"{module}.weight" in base[component] else f"{module.removeprefix('text_model.')}.weight"
        assert rel(ours[component][key], base[component][key] + delta) < 1e-5, path


def test_shard_size_is_refused_where_the_output_keeps_the_base_files(tmp_path):
    state, _, entries = checkpoint("sd1", torch.float32)
    save_file(state, str(tmp_path / "sd1.safetensors"))
    lora_file(tmp_path / "lora.safetensors", entries)
    with pytest.raises(AdaptkitError, match=r"--shard-size: the output keeps the files of"):
        merge_into(tmp_path / "sd1.safetensors", tmp_path / "lora.safetensors", tmp_path / "out", shard_size="1MB")
    assert not (tmp_path / "out").exists()


# -- pipeline folders ---------------------------------------------------------------------------------

def load_pipeline(folder):
    """diffusers' pipeline from `folder` (this one has no tokenizer, safety checker or feature extractor)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(folder, tokenizer=None, safety_checker=None, feature_extractor=None)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A tiny SD 1.x pipeline folder (UNet sharded), a diffusers LoRA file for its UNet and text
    encoder, and diffusers' own result: the pipeline with the file loaded and fused."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    root = tmp_path_factory.mktemp("pipeline")
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4, sample_size=16)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=clip_model(), tokenizer=None, unet=unet_model(SD1_TINY),
                                   scheduler=DDIMScheduler(clip_sample=False, steps_offset=1), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(root / "base")
    pipe.unet.save_pretrained(root / "base" / "unet", max_shard_size="200KB")  # shards beside an index
    (root / "base" / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    unet, te = copy.deepcopy(pipe.unet), copy.deepcopy(pipe.text_encoder)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"],
                                rank_pattern={"proj_in": 2}, alpha_pattern={"conv1": 3}, init_lora_weights=False))
    te.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "fc1"], init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(
        root / "lora", unet_lora_layers=get_peft_model_state_dict(unet), text_encoder_lora_layers=get_peft_model_state_dict(te),
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=te.peft_config["default"].to_dict())
    StableDiffusionPipeline.save_lora_weights(root / "unet-lora", unet_lora_layers=get_peft_model_state_dict(unet),
                                              unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = load_pipeline(root / "base")
        fused.load_lora_weights(root / "lora")
        fused.fuse_lora()
        fused.unload_lora_weights()
    return root, pipe, fused


def test_lora_merged_into_a_pipeline_folder_equals_diffusers_fuse(pipeline, tmp_path):
    root, pipe, fused = pipeline
    merge_into(root / "base", root / "lora" / "pytorch_lora_weights.safetensors", tmp_path / "out", card=False)
    files = lambda folder: sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert files(tmp_path / "out") == files(root / "base")  # the same layout: shards, index, every config
    assert any(name.startswith("unet/diffusion_pytorch_model-00002-of-") for name in files(root / "base"))
    for same in ("model_index.json", "scheduler/scheduler_config.json", "unet/config.json", "vae/config.json"):
        assert (tmp_path / "out" / same).read_bytes() == (root / "base" / same).read_bytes(), same
    merged = load_pipeline(tmp_path / "out")
    for component in ("unet", "text_encoder", "vae"):
        got, want = getattr(merged, component).state_dict(), getattr(fused, component).state_dict()
        before = getattr(pipe, component).state_dict()
        assert set(got) == set(want) and all(got[k].dtype == before[k].dtype for k in got)
        changed = [k for k in got if not torch.equal(got[k], before[k])]
        assert bool(changed) == (component != "vae"), component
        assert [k for k in got if rel(got[k], want[k]) > 1e-4] == [], component
    # the same LoRA as a kohya file (text encoder spelled `text_model.`, as transformers 4 saved it; this
    # pipeline's was saved flat by transformers 5): the same bytes
    adapter = read_adapter(root / "lora" / "pytorch_lora_weights.safetensors")
    (tmp_path / "kohya").mkdir()
    kohya = registry.get("format", "kohya").write(lowrank_from_lora(adapter), tmp_path / "kohya")[0]
    assert any(k.startswith("lora_te_text_model_") for k in load_file(str(kohya)))
    merge_into(root / "base", kohya, tmp_path / "again", card=False)
    for path in sorted((tmp_path / "out").rglob("*.safetensors")):
        want, got = load_file(str(path)), load_file(str(tmp_path / "again" / path.relative_to(tmp_path / "out")))
        assert want.keys() == got.keys() and all(torch.equal(got[k], want[k]) for k in want), path
    x = {"sample": torch.randn(1, 4, 16, 16), "timestep": 3, "encoder_hidden_states": torch.randn(1, 5, 32)}
    ids = torch.tensor([[0, 5, 7, 9, 1]])
    with torch.no_grad():
        assert rel(merged.unet(**x).sample, fused.unet(**x).sample) < 1e-4
        assert rel(merged.text_encoder(ids)[0], fused.text_encoder(ids)[0]) < 1e-4
    merge_into(root / "base", kohya, tmp_path / "carded")  # the card names the library that loads the folder
    assert "library_name: diffusers" in (tmp_path / "carded" / "README.md").read_text()


def test_unet_folder_merges_the_unet_and_refuses_text_encoder_parts(pipeline, tmp_path):
    from diffusers import UNet2DConditionModel

    root, pipe, fused = pipeline
    merge_into(root / "base" / "unet", root / "unet-lora" / "pytorch_lora_weights.safetensors", tmp_path / "out", card=False)
    merged = UNet2DConditionModel.from_pretrained(tmp_path / "out").state_dict()
    want = fused.unet.state_dict()
    assert [k for k in merged if rel(merged[k], want[k]) > 1e-4] == []
    with pytest.raises(AdaptkitError, match=r"'text_encoder\..*': .* is a UNet saved on its own") as e:
        merge_into(root / "base" / "unet", root / "lora" / "pytorch_lora_weights.safetensors", tmp_path / "out2")
    assert "\n" not in str(e.value) and not (tmp_path / "out2").exists()


@pytest.mark.parametrize("index, fragment", [
    ({"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]},
     r"model_index\.json lists the component 'vae', which has no folder there"),
    ({"unet": ["diffusers", "UNet2DConditionModel"], "../up": ["diffusers", "AutoencoderKL"]},
     r"the file name '\.\./up' is not a plain name inside"),
    ({"scheduler": ["diffusers", "DDIMScheduler"]}, r"a pipeline \(model_index\.json\) whose components hold no weights"),
], ids=["missing-component", "outside", "no-weights"])
def test_pipeline_folder_faults_are_one_line(tmp_path, index, fragment):
    import json

    from adaptkit.io.store import open_store

    for name in ("unet", "scheduler"):
        (tmp_path / "p" / name).mkdir(parents=True)
    save_file({"conv_in.weight": torch.zeros(2, 2)}, str(tmp_path / "p" / "unet" / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "p" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline", **index}))
    with pytest.raises(AdaptkitError, match=fragment) as e:
        open_store(tmp_path / "p")
    assert "\n" not in str(e.value)
