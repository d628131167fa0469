"""Module names of Stable Diffusion models written with `_` for `.` (kohya's LoRA names), and back.

kohya names a LoRA module `lora_unet_<path with dots as underscores>` (text encoders `lora_te_`,
SDXL `lora_te1_` / `lora_te2_`). Module names contain underscores themselves (`down_blocks`,
`to_out.0`, `ff.net.0.proj`), so undoing the flattening needs to know the names: `unflatten`
splits on `_` and rebuilds the path from a vocabulary of the component names of diffusers'
`UNet2DConditionModel` and transformers' CLIP text encoders, longest name first, backtracking
when a choice leads nowhere. Numbers are always components of their own. The tests check
unflatten(flatten(n)) == n for every Linear/Conv module of SD 1.x/2.x/SDXL-shaped models.

kohya's SDXL trainer names the UNet's modules after Stability's `sgm` code (`input_blocks.4.1.…`,
`middle_block`, `output_blocks`, `in_layers.2`, …). Those map exactly onto diffusers' names for
UNets with two layers per block (SD 1.x, 2.x and SDXL all have two): `sgm_to_diffusers` and
`diffusers_to_sgm`. Writing `sgm` names puts every upsampler at index 2 of its output block
(SDXL's layout, where each up block that has an upsampler also has attention).
"""
from __future__ import annotations

from adaptkit.plugin import AdaptkitError

# Component names of diffusers' UNet2DConditionModel (SD 1.x, 2.x, SDXL and common options).
UNET_WORDS = frozenset({
    "add_embedding", "add_time_proj", "attentions", "attn1", "attn2", "conv", "conv1", "conv2", "conv_in",
    "conv_norm_out", "conv_out", "conv_shortcut", "down_blocks", "downsamplers", "ff", "linear_1", "linear_2",
    "mid_block", "net", "norm", "norm1", "norm2", "norm3", "proj", "proj_in", "proj_out", "resnets",
    "time_emb_proj", "time_embedding", "time_proj", "to_k", "to_out", "to_q", "to_v", "transformer_blocks",
    "up_blocks", "upsamplers", "encoder_hid_proj", "class_embedding", "cond_proj", "add_k_proj", "add_q_proj",
    "add_v_proj", "to_add_out", "norm_cross",
})
# Inside a transformer block sgm and diffusers agree; around it sgm has its own names.
ATTENTION_WORDS = frozenset({"proj_in", "proj_out", "norm", "transformer_blocks", "attn1", "attn2", "to_q", "to_k",
                             "to_v", "to_out", "ff", "net", "proj", "norm1", "norm2", "norm3"})
SGM_WORDS = ATTENTION_WORDS | {"input_blocks", "middle_block", "output_blocks", "in_layers", "out_layers",
                               "emb_layers", "skip_connection", "op", "time_embed", "label_emb", "out", "conv"}
SGM_HEADS = ("input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out")
# transformers' CLIPTextModel / CLIPTextModelWithProjection.
CLIP_WORDS = frozenset({
    "text_model", "embeddings", "token_embedding", "position_embedding", "encoder", "layers", "self_attn",
    "k_proj", "v_proj", "q_proj", "out_proj", "layer_norm1", "layer_norm2", "mlp", "fc1", "fc2", "activation_fn",
    "final_layer_norm", "text_projection",
})

# Canonical module paths of a Stable Diffusion pipeline's adapter: the component, a dot, its module path.
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
# transformers >= 5 flattens CLIPTextModel (`encoder.layers…`, no `text_model.`);
# CLIPTextModelWithProjection keeps `text_model.` and adds `text_projection`.
CLIP_FLAT_TOP = ("encoder", "embeddings", "final_layer_norm")
CLIP_TOP = frozenset({"text_model", "text_projection", *CLIP_FLAT_TOP})
UNET_TOP = frozenset({"down_blocks", "up_blocks", "mid_block", "conv_in", "conv_out", "conv_norm_out", "time_embedding",
                      "add_embedding", "encoder_hid_proj", "class_embedding"})

# sgm <-> diffusers outside the down/mid/up block structure, and inside a ResNet block.
SGM_TOP = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
           "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
           "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}
SGM_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "out_layers.0": "norm2", "out_layers.3": "conv2",
              "emb_layers.1": "time_emb_proj", "skip_connection": "conv_shortcut"}
TOP_SGM = {v: k for k, v in SGM_TOP.items()}
RESNET_SGM = {v: k for k, v in SGM_RESNET.items()}
LAYERS = 2  # layers per block in SD 1.x, 2.x and SDXL


def flatten(path: str) -> str:
    return path.replace(".", "_")


def unflatten(flat: str, words: frozenset[str]) -> str | None:
    """'down_blocks_0_attentions_0_proj_in' -> 'down_blocks.0.attentions.0.proj_in', or None."""
    tokens = flat.split("_")
    longest = max(w.count("_") for w in words) + 1

    def parse(i: int) -> list[str] | None:
        if i == len(tokens):
            return []
        for j in range(min(len(tokens), i + longest), i, -1):
            piece = "_".join(tokens[i:j])
            if piece in words or (j == i + 1 and piece.isdigit()):
                rest = parse(j)
                if rest is not None:
                    return [piece, *rest]
        return None

    parts = parse(0)
    return ".".join(parts) if parts else None


def unet_path(flat: str) -> str | None:
    """A flattened UNet module name (diffusers or sgm naming) -> its diffusers path, or None."""
    if not flat.startswith(tuple(f"{head}_" for head in SGM_HEADS)):
        found = unflatten(flat, UNET_WORDS)
        if found:
            return found
    sgm = unflatten(flat, SGM_WORDS)
    return sgm_to_diffusers(sgm) if sgm else None


def text_path(flat: str) -> str | None:
    return unflatten(flat, CLIP_WORDS)


def kohya_text_path(path: str) -> str:
    """kohya names follow transformers 4's CLIP module names, with `text_model.`; paths of the
    flattened CLIPTextModel of transformers >= 5 get it back (every kohya loader expects it)."""
    return f"text_model.{path}" if path.split(".")[0] in CLIP_FLAT_TOP else path


def _resnet(prefix: str, rest: list[str]) -> str | None:
    inner = SGM_RESNET.get(".".join(rest))
    return f"{prefix}.{inner}" if inner else None


def _attention(prefix: str, rest: list[str]) -> str | None:
    return f"{prefix}.{'.'.join(rest)}" if rest else None


def sgm_to_diffusers(path: str, layers: int = LAYERS) -> str | None:
    """'input_blocks.4.1.proj_in' -> 'down_blocks.1.attentions.0.proj_in'; None if it is no SD module.
    `layers`: ResNet layers per down block (up blocks have one more), 2 in every released SD model."""
    if path in SGM_TOP:
        return SGM_TOP[path]
    parts = path.split(".")
    if len(parts) < 3 or not parts[1].isdigit():
        return None
    head, n, inner, rest = parts[0], int(parts[1]), parts[2], parts[3:]
    if head == "input_blocks" and n > 0:
        i, j = divmod(n - 1, layers + 1)
        if j == layers:
            return f"down_blocks.{i}.downsamplers.0.conv" if inner == "0" and rest == ["op"] else None
        if inner == "0":
            return _resnet(f"down_blocks.{i}.resnets.{j}", rest)
        return _attention(f"down_blocks.{i}.attentions.{j}", rest) if inner == "1" else None
    if head == "middle_block":
        if n in (0, 2) and inner in ("in_layers", "out_layers", "emb_layers", "skip_connection"):
            return _resnet(f"mid_block.resnets.{n // 2}", parts[2:])
        return _attention("mid_block.attentions.0", parts[2:]) if n == 1 else None
    if head == "output_blocks":
        i, j = divmod(n, layers + 1)
        if inner == "0":
            return _resnet(f"up_blocks.{i}.resnets.{j}", rest)
        if rest == ["conv"] and inner in ("1", "2") and j == layers:
            return f"up_blocks.{i}.upsamplers.0.conv"
        return _attention(f"up_blocks.{i}.attentions.{j}", rest) if inner == "1" else None
    return None


def diffusers_to_sgm(path: str, layers: int = LAYERS) -> str:
    """The inverse of `sgm_to_diffusers` (upsamplers at index 2, SDXL's layout)."""
    if path in TOP_SGM:
        return TOP_SGM[path]
    parts = path.split(".")
    found = None
    if len(parts) >= 5 and parts[1].isdigit() and parts[3].isdigit():
        block, i, kind, j, rest = parts[0], int(parts[1]), parts[2], int(parts[3]), parts[4:]
        tail = ".".join(rest)
        limit = layers + 1 if block == "up_blocks" else layers
        if kind in ("resnets", "attentions") and j < limit and block in ("down_blocks", "up_blocks"):
            n = i * (layers + 1) + j + (1 if block == "down_blocks" else 0)
            head = "input_blocks" if block == "down_blocks" else "output_blocks"
            found = (f"{head}.{n}.0.{RESNET_SGM[tail]}" if tail in RESNET_SGM else None) if kind == "resnets" \
                else f"{head}.{n}.1.{tail}"
        elif kind == "downsamplers" and block == "down_blocks" and j == 0 and tail == "conv":
            found = f"input_blocks.{(i + 1) * (layers + 1)}.0.op"
        elif kind == "upsamplers" and block == "up_blocks" and j == 0 and tail == "conv":
            found = f"output_blocks.{i * (layers + 1) + layers}.2.conv"
    elif len(parts) >= 4 and parts[0] == "mid_block" and parts[2].isdigit():
        kind, j, tail = parts[1], int(parts[2]), ".".join(parts[3:])
        if kind == "resnets" and j < 2 and tail in RESNET_SGM:
            found = f"middle_block.{2 * j}.{RESNET_SGM[tail]}"
        elif kind == "attentions" and j == 0:
            found = f"middle_block.1.{tail}"
    if found is None or sgm_to_diffusers(found, layers) != path:
        raise AdaptkitError(f"UNet module '{path}' has no name in sgm (SDXL) naming")
    return found


def split_component(path: str) -> tuple[str, str]:
    """'unet.down_blocks.0…' -> ('unet', 'down_blocks.0…'). A path without a component prefix (an
    adapter made on a bare UNet or text encoder) is placed by its first name."""
    head, _, inner = path.partition(".")
    if head in COMPONENTS and inner:
        return head, inner
    if head in UNET_TOP:
        return "unet", path
    if head in CLIP_TOP:
        return "text_encoder", path
    raise AdaptkitError(f"module '{path}' is not under unet., text_encoder. or text_encoder_2. "
                        "(Stable Diffusion LoRA files hold only these components)")
