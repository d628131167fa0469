"""Stable Diffusion LoRA files: kohya's (lora_unet_… lora_down/lora_up/alpha) and diffusers' own
(unet.… lora_A/lora_B + lora_adapter_metadata), against tiny diffusers/transformers models, PEFT,
diffusers' loaders and diffusers' `convert_state_dict_to_kohya`."""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from adaptkit import registry
from adaptkit.adapter import detect_format, read_adapter
from adaptkit.cli import cli
from adaptkit.errors import AdaptkitError
from adaptkit.io.store import open_store
from adaptkit.spec import LowRankAdapter, LowRankModule
from adaptkit_plugins.formats._lowrank import MissingAlphaWarning, lowrank_from_lora
from adaptkit_plugins.formats._sdnames import (diffusers_to_sgm, flatten, kohya_text_path, sgm_to_diffusers, text_path,
                                               unet_path)

KOHYA = registry.get("format", "kohya")
DIFFUSERS = registry.get("format", "diffusers")
PEFT = registry.get("format", "peft")
LORA = registry.get("variant", "lora")
ALPHAS = (1.0, 4.0, 0.5, 3.0)

SD1_TINY = dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=4,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                sample_size=16)
SDXL_TINY = dict(block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=32, attention_head_dim=4,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2), use_linear_projection=True, addition_embed_type="text_time",
                 addition_time_embed_dim=8, projection_class_embeddings_input_dim=80, sample_size=16)
# The real models' layouts (built on the meta device: names only, no memory).
SD15 = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768, attention_head_dim=8)
SD21 = dict(SD15, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
SDXL = dict(block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(5, 10, 20),
            transformer_layers_per_block=(1, 2, 10), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)


def unet_model(config, meta=False, seed=0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    if meta:
        with torch.device("meta"):
            return UNet2DConditionModel(**config)
    return UNet2DConditionModel(**config).eval()


def clip_model(projection=False, seed=0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                            vocab_size=100, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=16)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


@pytest.fixture(scope="module")
def sd1():
    return unet_model(SD1_TINY), clip_model()


@pytest.fixture(scope="module")
def sdxl():
    return unet_model(SDXL_TINY), clip_model(), clip_model(projection=True, seed=1)


# -- names -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("config, meta", [(SD1_TINY, False), (SDXL_TINY, False), (SD15, True), (SD21, True), (SDXL, True)],
                         ids=["sd1-tiny", "sdxl-tiny", "sd15", "sd21", "sdxl"])
def test_every_unet_layer_name_unflattens(config, meta):
    names = [n for n, _ in layers(unet_model(config, meta))]
    assert len(names) > 20
    assert [n for n in names if unet_path(flatten(n)) != n] == []
    if config["layers_per_block"] == 2:  # sgm (kohya's SDXL) names exist for these layouts, both ways
        assert [n for n in names if unet_path(flatten(diffusers_to_sgm(n))) != n] == []


@pytest.mark.parametrize("projection", [False, True])
def test_every_clip_layer_name_unflattens(projection):
    names = [n for n, m in clip_model(projection).named_modules() if n and not list(m.children())]
    assert any(n.endswith("mlp.fc1") for n in names)
    assert [n for n in names if text_path(flatten(n)) != n] == []
    assert text_path("text_model_encoder_layers_0_mlp_fc1") == "text_model.encoder.layers.0.mlp.fc1"


def test_sgm_names_match_kohyas_table():
    # From sd-scripts' SDXL conversion map: input_blocks.{3i+j+1}.0/1 = down_blocks.i.resnets/attentions.j,
    # input_blocks.{3(i+1)}.0.op = downsamplers, output_blocks.{3i+j}, middle_block.0/1/2, upsamplers at .2.
    expected = {
        "input_blocks_4_1_transformer_blocks_0_attn1_to_q": "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        "input_blocks_8_1_transformer_blocks_1_ff_net_0_proj": "down_blocks.2.attentions.1.transformer_blocks.1.ff.net.0.proj",
        "input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
        "input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",
        "input_blocks_5_0_skip_connection": "down_blocks.1.resnets.1.conv_shortcut",
        "middle_block_1_proj_in": "mid_block.attentions.0.proj_in",
        "middle_block_2_emb_layers_1": "mid_block.resnets.1.time_emb_proj",
        "output_blocks_5_1_transformer_blocks_3_attn2_to_out_0": "up_blocks.1.attentions.2.transformer_blocks.3.attn2.to_out.0",
        "output_blocks_2_2_conv": "up_blocks.0.upsamplers.0.conv",
        "output_blocks_2_1_conv": "up_blocks.0.upsamplers.0.conv",  # SD 1.x layout (no attention there)
        "output_blocks_7_0_out_layers_3": "up_blocks.2.resnets.1.conv2",
        "time_embed_2": "time_embedding.linear_2", "label_emb_0_0": "add_embedding.linear_1",
        "input_blocks_0_0": "conv_in", "out_2": "conv_out",
    }
    assert {k: unet_path(k) for k in expected} == expected
    assert diffusers_to_sgm("up_blocks.0.upsamplers.0.conv") == "output_blocks.2.2.conv"
    assert sgm_to_diffusers("input_blocks.3.1.proj_in") is None and unet_path("double_blocks_0_img_attn_qkv") is None


# -- kohya -----------------------------------------------------------------------------------------

def kohya_entries(unet, encoders, *, sgm=False):
    """(kohya name, layer) for what sd-scripts' networks.lora adapts: every Linear/Conv inside the
    UNet's transformer blocks and the text encoders' attention/MLP, plus one 3×3 conv (conv_dim)."""
    found = []
    for n, m in layers(unet):
        if ".attentions." in n or n == "down_blocks.0.resnets.0.conv1":
            found.append(("lora_unet_" + flatten(diffusers_to_sgm(n) if sgm else n), m))
    for prefix, model in encoders:
        for n, m in layers(model):
            if ".layers." in n:
                found.append((f"{prefix}_{flatten(kohya_text_path(n))}", m))
    return found


def write_kohya(path, entries, dtype=torch.float16, without_alpha=0):
    """A file laid out as sd-scripts saves it: every tensor (alphas too) in the save dtype."""
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i, (name, m) in enumerate(entries):
        r = 2 if i % 5 == 0 else 4
        if isinstance(m, torch.nn.Conv2d):
            down = torch.randn(r, m.in_channels, *m.kernel_size, generator=g)
            up = torch.randn(m.out_channels, r, 1, 1, generator=g)
        else:
            down, up = torch.randn(r, m.in_features, generator=g), torch.randn(m.out_features, r, generator=g)
        tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = down.to(dtype), up.to(dtype)
        if i >= without_alpha:
            tensors[f"{name}.alpha"] = torch.tensor(ALPHAS[i % 4], dtype=dtype)
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora", "ss_network_dim": "4"})
    return tensors


def assert_same_tensors(expected: dict, path):
    got = load_file(str(path))
    assert sorted(got) == sorted(expected)
    for k, t in expected.items():
        assert got[k].dtype == t.dtype and got[k].shape == t.shape, k
        assert torch.equal(got[k].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), k


def write(fmt, adapter, folder, **kw):
    folder.mkdir()
    return fmt.write(lowrank_from_lora(adapter), folder, **kw)


def test_kohya_round_trip_is_byte_identical(sd1, tmp_path):
    unet, te = sd1
    entries = kohya_entries(unet, [("lora_te", te)])
    tensors = write_kohya(tmp_path / "in.safetensors", entries)
    adapter = read_adapter(tmp_path / "in.safetensors")
    assert adapter.format == "kohya" and adapter.variant == "lora" and len(adapter.modules) == len(entries)
    q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert adapter.modules[q] == {"lora_A": f"lora_unet_{flatten(q[5:])}.lora_down.weight",
                                  "lora_B": f"lora_unet_{flatten(q[5:])}.lora_up.weight"}
    assert "text_encoder.text_model.encoder.layers.1.mlp.fc2" in adapter.modules
    assert len(adapter.config["alpha_pattern"]) == len(ALPHAS) - 1  # one exact pattern per value off the default
    for i, (name, _) in enumerate(entries):  # each module's alpha, exactly, through the config's patterns
        path = next(p for p, roles in adapter.modules.items() if roles["lora_A"].startswith(name + "."))
        assert LORA.module_alpha(adapter, path) == ALPHAS[i % 4]
    files = write(KOHYA, adapter, tmp_path / "out")
    assert [f.name for f in files] == ["lora.safetensors"]
    assert_same_tensors(tensors, files[0])
    meta = open_store(files[0]).metadata
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert meta["ss_network_alpha"] in {str(a) for a in ALPHAS}
    conv_rank = tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape[0]
    assert json.loads(meta["ss_network_args"])["conv_dim"] == str(conv_rank)  # the one 3×3 conv


def test_kohya_sdxl_sgm_names_and_two_text_encoders(sdxl, tmp_path):
    unet, te1, te2 = sdxl
    entries = kohya_entries(unet, [("lora_te1", te1), ("lora_te2", te2)], sgm=True)
    assert any(n.startswith("lora_unet_input_blocks_4_1_transformer_blocks_1_") for n, _ in entries)
    tensors = write_kohya(tmp_path / "xl.safetensors", entries, dtype=torch.bfloat16)
    adapter = read_adapter(tmp_path / "xl.safetensors")
    paths = set(adapter.modules)
    assert "unet.down_blocks.1.attentions.1.transformer_blocks.1.attn2.to_k" in paths
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj" in paths
    assert "text_encoder_2.text_model.encoder.layers.1.mlp.fc1" in paths
    assert_same_tensors(tensors, write(KOHYA, adapter, tmp_path / "sgm", unet_names="sgm")[0])
    # By default the UNet gets diffusers-style names (every loader reads them); te1/te2 stay.
    plain = write(KOHYA, adapter, tmp_path / "plain")[0]
    keys = open_store(plain).keys()
    assert "lora_unet_down_blocks_1_attentions_1_transformer_blocks_1_attn2_to_k.alpha" in keys
    assert any(k.startswith("lora_te2_text_model_") for k in keys) and not any(k.startswith("lora_te_") for k in keys)
    again = read_adapter(plain)
    assert again.modules.keys() == adapter.modules.keys()
    for path in adapter.modules:
        assert torch.equal(again.tensor(path, "lora_B"), adapter.tensor(path, "lora_B"))
        assert LORA.module_alpha(again, path) == LORA.module_alpha(adapter, path)
    assert open_store(plain).metadata["ss_base_model_version"] == "sdxl_base_v1-0"


def test_missing_alpha_defaults_to_rank_and_warns(sd1, tmp_path):
    unet, te = sd1
    entries = kohya_entries(unet, [("lora_te", te)])[:6]
    write_kohya(tmp_path / "old.safetensors", entries, dtype=torch.float32, without_alpha=3)
    with pytest.warns(MissingAlphaWarning, match=r"3 of 6 LoRA modules have no alpha; using alpha = rank") as record:
        adapter = read_adapter(tmp_path / "old.safetensors")
    assert len(record) == 1
    ranks = {p: LORA.module_rank(adapter, p) for p in adapter.modules}
    alphas = sorted(LORA.module_alpha(adapter, p) / ranks[p] for p in adapter.modules)
    assert alphas.count(1.0) >= 3  # the three without alpha have scale 1


# -- PEFT and diffusers ------------------------------------------------------------------------------

class Pipe(torch.nn.Module):
    def __init__(self, unet, te, te2):
        super().__init__()
        self.unet, self.text_encoder, self.text_encoder_2 = unet, te, te2


def peft_scalings(model):
    """{module path: (rank, alpha)} as PEFT's live layers have them."""
    return {n.removeprefix("base_model.model."): (m.r["default"], m.scaling["default"] * m.r["default"])
            for n, m in model.named_modules() if isinstance(getattr(m, "scaling", None), dict) and "default" in m.scaling}


def test_peft_to_kohya_to_peft_is_lossless(tmp_path):
    from peft import LoraConfig, get_peft_model

    pipe = Pipe(unet_model(SD1_TINY), clip_model(), clip_model(projection=True))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "q_proj", "fc1", "conv1"],
                        rank_pattern={"proj_in": 2}, alpha_pattern={"attn2.to_k": 3, "fc1": 5, "conv1": 0.5},
                        init_lora_weights=False)
    model = get_peft_model(pipe, config)
    model.save_pretrained(tmp_path / "peft")
    expected = peft_scalings(model)
    source = read_adapter(tmp_path / "peft")
    assert source.format == "peft"
    kohya = read_adapter(write(KOHYA, source, tmp_path / "kohya")[0])
    assert kohya.format == "kohya"
    write(PEFT, kohya, tmp_path / "peft2")
    back = read_adapter(tmp_path / "peft2")
    # transformers >= 5 flattens CLIPTextModel (text_encoder.encoder.…); kohya names spell it with
    # text_model_ as every kohya loader expects, so those paths come back with `text_model.`.
    renamed = {p: p if not p.startswith("text_encoder.") else "text_encoder." + kohya_text_path(p[13:]) for p in expected}
    assert set(back.modules) == set(renamed.values()) and len(back.modules) == len(expected) > 40
    for path, (rank, alpha) in expected.items():
        new = renamed[path]
        assert (LORA.module_rank(back, new), LORA.module_alpha(back, new)) == (rank, alpha), path
        for role in ("lora_A", "lora_B"):
            assert torch.equal(back.tensor(new, role), source.tensor(path, role))


def test_diffusers_file_to_kohya_and_back_loads_in_diffusers(tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = unet_model(SD1_TINY)
    base = copy.deepcopy(unet.state_dict())
    # alpha_pattern only off the attention layers: diffusers' own kohya loader builds wrong
    # alpha_pattern keys for attention modules (…processor.to_k_lora.down.weight) and ignores them.
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, rank_pattern={"proj_in": 2}, alpha_pattern={"proj_in": 3, "conv1": 6},
                                target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1"],
                                init_lora_weights=False))
    x, enc = torch.randn(1, 4, 16, 16), torch.randn(1, 5, 32)
    with torch.no_grad():
        reference = unet(x, 3, enc).sample
    StableDiffusionPipeline.save_lora_weights(tmp_path / "diff", unet_lora_layers=get_peft_model_state_dict(unet),
                                              unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
    source = read_adapter(tmp_path / "diff")
    assert source.format == "diffusers"
    assert {p: (LORA.module_rank(source, p), LORA.module_alpha(source, p)) for p in source.modules} == \
        {f"unet.{p}": ra for p, ra in peft_scalings(unet).items()}
    kohya_file = write(KOHYA, source, tmp_path / "kohya")[0]
    out = write(DIFFUSERS, read_adapter(kohya_file), tmp_path / "out")
    assert [f.name for f in out] == ["pytorch_lora_weights.safetensors"]

    def run(path, metadata=True):
        fresh = unet_model(SD1_TINY)
        fresh.load_state_dict(base)
        sd, alphas, meta = StableDiffusionPipeline.lora_state_dict(str(path), return_lora_metadata=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            StableDiffusionPipeline.load_lora_into_unet(sd, alphas, unet=fresh, metadata=meta if metadata else None)
        with torch.no_grad():
            return fresh(x, 3, enc).sample

    assert torch.equal(run(out[0]), reference)  # our diffusers file, with its lora_adapter_metadata
    assert torch.allclose(run(kohya_file), reference, atol=1e-5)  # our kohya file, through diffusers' converter
    again = read_adapter(out[0])
    assert {p: LORA.module_alpha(again, p) for p in again.modules} == {p: LORA.module_alpha(source, p) for p in source.modules}


def test_text_encoder_lora_survives_both_clip_spellings(tmp_path):
    """transformers 5's CLIPTextModel has no `text_model.` (diffusers saves `text_encoder.encoder.…`);
    kohya names spell it with `text_model_`; the diffusers file we write from them loads back into the
    flattened model with every alpha (its config fits both spellings)."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    te = clip_model()
    base = copy.deepcopy(te.state_dict())
    te.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1"], rank_pattern={"q_proj": 2},
                              alpha_pattern={"fc1": 5}, init_lora_weights=False))
    ids = torch.tensor([[0, 5, 7, 9, 1]])
    with torch.no_grad():
        reference = te(ids).last_hidden_state
    StableDiffusionPipeline.save_lora_weights(tmp_path / "diff", text_encoder_lora_layers=get_peft_model_state_dict(te),
                                              text_encoder_lora_adapter_metadata=te.peft_config["default"].to_dict())
    source = read_adapter(tmp_path / "diff")
    assert "text_encoder.encoder.layers.1.mlp.fc1" in source.modules
    kohya_file = write(KOHYA, source, tmp_path / "kohya")[0]
    assert "lora_te_text_model_encoder_layers_1_mlp_fc1.alpha" in open_store(kohya_file).keys()
    out = write(DIFFUSERS, read_adapter(kohya_file), tmp_path / "out")[0]
    assert "text_encoder.text_model.encoder.layers.1.mlp.fc1.lora_A.weight" in open_store(out).keys()
    fresh = clip_model()
    fresh.load_state_dict(base)
    sd, alphas, meta = StableDiffusionPipeline.lora_state_dict(str(out), return_lora_metadata=True)
    StableDiffusionPipeline.load_lora_into_text_encoder(sd, alphas, text_encoder=fresh, metadata=meta)
    with torch.no_grad():
        assert torch.equal(fresh(ids).last_hidden_state, reference)


def test_file_from_diffusers_convert_state_dict_to_kohya(sd1, tmp_path):
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    unet, te = sd1
    g = torch.Generator().manual_seed(1)
    peft_sd = {}
    for prefix, model, targets in (("unet", unet, ("attn1.to_q", "attn2.to_v", "proj_out")), ("text_encoder", te, ("q_proj", "fc2"))):
        for n, m in layers(model):
            if n.endswith(targets):
                peft_sd[f"{prefix}.{n}.lora_A.weight"] = torch.randn(4, m.weight.shape[1], *m.weight.shape[2:], generator=g)
                peft_sd[f"{prefix}.{n}.lora_B.weight"] = torch.randn(m.weight.shape[0], 4, *([1, 1] if m.weight.dim() == 4 else []), generator=g)
    kohya_sd = convert_state_dict_to_kohya(peft_sd)
    assert any(k.startswith("lora_te1_") for k in kohya_sd) and kohya_sd[next(k for k in kohya_sd if k.endswith(".alpha"))].dtype == torch.int64
    save_file(kohya_sd, str(tmp_path / "from_diffusers.safetensors"))
    adapter = read_adapter(tmp_path / "from_diffusers.safetensors")
    assert adapter.format == "kohya" and sorted(adapter.modules) == sorted({k.rsplit(".", 2)[0] for k in peft_sd})
    for path in adapter.modules:  # tensors as they were; alpha = rank: the loss convert_state_dict_to_kohya makes
        assert torch.equal(adapter.tensor(path, "lora_A"), peft_sd[f"{path}.lora_A.weight"])
        assert LORA.module_alpha(adapter, path) == 4
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path / "from_diffusers.safetensors"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["kind"] == "adapter" and report["format"] == "kohya"
    assert report["adapter"]["targeted_modules"] == len(adapter.modules) and report["adapter"]["rank"] == 4


def test_diffusers_older_spellings_without_metadata(tmp_path):
    g = torch.Generator().manual_seed(2)
    t = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    attn = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    tensors = {
        f"unet.{attn}.processor.to_q_lora.down.weight": t(2, 32), f"unet.{attn}.processor.to_q_lora.up.weight": t(32, 2),
        f"unet.{attn}.processor.to_out_lora.down.weight": t(2, 32), f"unet.{attn}.processor.to_out_lora.up.weight": t(32, 2),
        "unet.mid_block.attentions.0.proj_in.lora.down.weight": t(4, 64), "unet.mid_block.attentions.0.proj_in.lora.up.weight": t(64, 4),
        "text_encoder.text_model.encoder.layers.0.self_attn.to_k_lora.down.weight": t(2, 32),
        "text_encoder.text_model.encoder.layers.0.self_attn.to_k_lora.up.weight": t(32, 2),
        "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.down.weight": t(2, 32),
        "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.up.weight": t(37, 2),
    }
    save_file(tensors, str(tmp_path / "pytorch_lora_weights.safetensors"))
    with pytest.warns(MissingAlphaWarning, match="no alpha for 5 of 5"):
        adapter = read_adapter(tmp_path)
    assert adapter.format == "diffusers"
    assert sorted(adapter.modules) == sorted([f"unet.{attn}.to_q", f"unet.{attn}.to_out.0", "unet.mid_block.attentions.0.proj_in",
                                              "text_encoder.text_model.encoder.layers.0.self_attn.k_proj",
                                              "text_encoder.text_model.encoder.layers.0.mlp.fc1"])
    assert all(LORA.scaling(adapter, p) == 1.0 for p in adapter.modules)
    # A UNet's own attention-processor file (save_attn_procs): no component prefix.
    bare = {k.removeprefix("unet."): v for k, v in tensors.items() if k.startswith("unet.")}
    save_file(bare, str(tmp_path / "procs.safetensors"))
    with pytest.warns(MissingAlphaWarning):
        procs = read_adapter(tmp_path / "procs.safetensors")
    assert procs.format == "diffusers" and sorted(procs.modules) == sorted(p for p in adapter.modules if p.startswith("unet."))


# -- detection and errors ---------------------------------------------------------------------------

def test_detection_is_automatic_and_exclusive(sd1, tmp_path):
    unet, te = sd1
    (tmp_path / "k").mkdir()
    write_kohya(tmp_path / "k" / "a.safetensors", kohya_entries(unet, [("lora_te", te)])[:4])
    adapter = read_adapter(tmp_path / "k" / "a.safetensors")
    d = write(DIFFUSERS, adapter, tmp_path / "d")[0]
    write(PEFT, adapter, tmp_path / "p")
    for path, name in ((tmp_path / "k" / "a.safetensors", "kohya"), (d, "diffusers"), (tmp_path / "p", "peft")):
        store = open_store(path)
        assert detect_format(store) == name
        assert [f for f in registry.names("format") if registry.get("format", f).detect(store)] == [name]
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(tmp_path / "unet.safetensors"))
    assert detect_format(open_store(tmp_path / "unet.safetensors")) is None  # a full model is no adapter


@pytest.mark.parametrize("keys, fragment", [
    (["lora_unet_down_blocks_0_attentions_0_proj_in.diff", "lora_unet_down_blocks_0_attentions_0_proj_in.diff_b",
      "lora_unet_down_blocks_0_attentions_0_proj_out.diff", "lora_unet_down_blocks_0_attentions_0_proj_out.diff_b"],
     "4 of 4 tensors are not kohya LoRA tensors"),
    (["lora_transformer_single_blocks_0_attn_to_q.lora_down.weight", "lora_transformer_single_blocks_0_attn_to_q.lora_up.weight",
      "lora_transformer_single_blocks_1_attn_to_q.lora_down.weight", "lora_transformer_single_blocks_1_attn_to_q.lora_up.weight"],
     "are not kohya LoRA tensors"),
    (["unet.down_blocks.0.attentions.0.proj_in.lora_X.weight", "unet.down_blocks.0.attentions.0.proj_in.lora_Y.weight",
      "unet.down_blocks.0.attentions.0.proj_out.lora_X.weight", "unet.down_blocks.0.attentions.0.proj_out.lora_Y.weight"],
     "are not diffusers LoRA tensors"),
], ids=["lycoris-full", "flux-kohya", "unknown-diffusers"])
def test_keys_of_no_known_layout_fail_with_samples(tmp_path, keys, fragment):
    save_file({k: torch.zeros(2, 2) for k in keys}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(AdaptkitError) as err:
        read_adapter(tmp_path / "bad.safetensors")
    message = str(err.value)
    assert fragment in message and "\n" not in message
    assert sum(k in message for k in keys) == 3 and "(and 1 more)" in message
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path / "bad.safetensors")])
    assert result.exit_code == 1 and fragment in result.output


def test_unknown_module_name_is_named(tmp_path):
    keys = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(2, 4),
            "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(4, 2)}
    save_file(keys, str(tmp_path / "flux.safetensors"))
    with pytest.raises(AdaptkitError, match=r"'lora_unet_double_blocks_0_img_attn_qkv' names no module of a Stable "
                                            r"Diffusion 1.x/2.x/SDXL UNet \(key pattern 'lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight'"):
        read_adapter(tmp_path / "flux.safetensors")


def test_writers_refuse_what_they_cannot_hold(tmp_path):
    m = LowRankModule(torch.zeros(2, 8), torch.zeros(8, 2), 2.0)
    with pytest.raises(AdaptkitError, match="not under unet., text_encoder."):
        KOHYA.write(LowRankAdapter({"model.layers.0.q_proj": m}), tmp_path)
    with pytest.raises(AdaptkitError, match="would read back as"):
        KOHYA.write(LowRankAdapter({"unet.down_blocks.0.attentions.0.frob": m}), tmp_path)
    with pytest.raises(AdaptkitError, match="not whole tensors"):
        DIFFUSERS.write(LowRankAdapter({"unet.conv_in": m}, {"unet.conv_out.weight": torch.zeros(2)}), tmp_path)
    with pytest.raises(AdaptkitError, match="embedding"):
        KOHYA.write(LowRankAdapter({"text_encoder.text_model.embeddings.token_embedding":
                                    LowRankModule(m.a, m.b, 2.0, embedding=True, transposed=True)}), tmp_path)


def test_rslora_and_exact_alphas_survive_the_diffusers_file(tmp_path):
    g = torch.Generator().manual_seed(3)
    mods = {f"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_{n}":
            LowRankModule(torch.randn(r, 32, generator=g), torch.randn(32, r, generator=g), a)
            for n, r, a in (("q", 4, 7.3), ("k", 2, 7.3), ("v", 4, 1 / 3))}
    adapter = LowRankAdapter(mods, {}, {"use_rslora": True})
    back = read_adapter(DIFFUSERS.write(adapter, tmp_path)[0])
    assert back.config["use_rslora"] is True
    assert {p: LORA.module_alpha(back, p) for p in back.modules} == {p: m.alpha for p, m in mods.items()}
    (tmp_path / "k").mkdir()
    kohya = read_adapter(KOHYA.write(adapter, tmp_path / "k")[0])  # kohya has no rsLoRA: √r folds into alpha
    for p, m in mods.items():
        assert LORA.scaling(kohya, p) == pytest.approx(m.alpha / m.rank ** 0.5, rel=1e-12)
    with safe_open(str(tmp_path / "k" / "lora.safetensors"), "pt") as f:
        assert f.get_tensor(next(k for k in f.keys() if k.endswith("to_q.alpha"))).dtype == torch.float64
