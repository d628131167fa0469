"""Where a Stable Diffusion adapter's modules (`unet.…`, `text_encoder.…`, `text_encoder_2.…`, diffusers'
and transformers' module paths) lie in a base saved another way: the formats' `base_key` hook.

- A single-file ("original", LDM/sgm) checkpoint, as A1111 and ComfyUI load it. The UNet is under
  `model.diffusion_model.` in Stability's names (`input_blocks.4.1.proj_in`, `middle_block.0.in_layers.2`,
  `output_blocks.2.1.conv`, …). Its name map is built from the checkpoint's own modules: each one's diffusers
  path (`_sdnames.sgm_to_diffusers`, with the ResNet layers per block read from the structure: levels =
  downsamplers + 1, input blocks = 1 + levels·layers + downsamplers), so both placements of an upsampler
  (`.1.conv` where the up block has no attention, `.2.conv` where it has) are the checkpoint's own.
  Text encoders: transformers' CLIP layout under `cond_stage_model.transformer.` (SD 1.x) or
  `conditioner.embedders.0.transformer.` (SDXL's first), `text_model.` included; OpenCLIP's layout under
  `cond_stage_model.model.` (SD 2.x) or `conditioner.embedders.1.model.` (SDXL's second):
  `transformer.resblocks.N.attn.in_proj_weight` holds q, k and v stacked (rows [0, d), [d, 2d), [2d, 3d)),
  `attn.out_proj`, `mlp.c_fc` (fc1), `mlp.c_proj` (fc2). Facts from diffusers' `single_file_utils`
  (convert_ldm_unet_checkpoint, convert_open_clip_checkpoint) and sd-scripts' `model_util` /
  `sdxl_model_util`; the tests check the map against diffusers' converters.
- A pipeline's text encoder saved by transformers 5 (`text_encoder.encoder.…`, no `text_model.`) for a module
  spelled as transformers 4 (and kohya files) spell it, or the other way round.
- A diffusers UNet folder saved on its own (`conv_in.weight`, `down_blocks.…`): `unet.X` is `X`; a
  text-encoder module has no place there and is refused by name.
"""
from __future__ import annotations

import re
import weakref

from adaptkit.plugin import AdaptkitError

from ._sdnames import kohya_text_path, sgm_to_diffusers, split_component

UNET = "model.diffusion_model."
CLIP = {"text_encoder": ("cond_stage_model.transformer.", "conditioner.embedders.0.transformer."),
        "text_encoder_2": ("conditioner.embedders.1.transformer.",)}
OPEN_CLIP = {"text_encoder": ("cond_stage_model.model.",), "text_encoder_2": ("conditioner.embedders.1.model.",)}
CLIP_LAYER = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(self_attn\.(q|k|v|out)_proj|mlp\.fc1|mlp\.fc2)$")
OPEN_CLIP_NAMES = {"self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
Place = tuple[str, "str | None", "tuple[int, int] | None"]
_LAYOUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # store -> its layout, found once


def base_key(module: str, store) -> Place | None:
    """The `base_key` hook (see `adaptkit.capabilities.BaseNames`)."""
    try:
        component, inner = split_component(module)
    except AdaptkitError:
        return None  # no SD module: the core reports it as missing
    if component != "unet":  # a CLIP text encoder saved by transformers 4 (`text_model.…`) or 5 (flat)
        other = inner.removeprefix("text_model.") if inner.startswith("text_model.") else kohya_text_path(inner)
        found = _place(store, f"{component}.{other}.weight") if other != inner else None
        if found is not None:
            return found
    try:
        layout = _LAYOUTS[store]
    except KeyError:
        layout = _LAYOUTS[store] = _layout(store)
    return None if layout is None else layout(store, component, inner, module)


def _layout(store):
    keys = store.keys()
    if any(k.startswith(UNET) for k in keys):
        unet = unet_map(keys)
        return lambda store, component, inner, module: _in_checkpoint(store, unet, component, inner, module)
    if "conv_in.weight" in store and "time_embedding.linear_1.weight" in store:
        return _in_unet_folder
    return None


def _place(store, key: str) -> Place | None:
    if key not in store:
        return None
    bias = key.removesuffix("weight") + "bias"
    return key, bias if bias in store else None, None


def _in_unet_folder(store, component: str, inner: str, module: str) -> Place | None:
    if component != "unet":
        raise AdaptkitError(f"'{module}': {store.root} is a UNet saved on its own, with no text encoder; merge into "
                            "the whole pipeline folder (model_index.json) or a single-file checkpoint")
    return _place(store, f"{inner}.weight")


def _in_checkpoint(store, unet: dict[str, str], component: str, inner: str, module: str) -> Place | None:
    if component == "unet":
        return _place(store, f"{UNET}{unet[inner]}.weight") if inner in unet else None
    path = kohya_text_path(inner)  # checkpoints keep transformers 4's `text_model.`
    for prefix in CLIP[component]:
        for key in (f"{prefix}{path}.weight", f"{prefix}{path.removeprefix('text_model.')}.weight"):
            if key in store:
                return _place(store, key)
    for prefix in OPEN_CLIP[component]:
        if any(k.startswith(prefix) for k in store.keys()):
            return _open_clip(store, prefix, path, module)
    return None


def _open_clip(store, prefix: str, path: str, module: str) -> Place:
    """A CLIP text encoder module in OpenCLIP's layout; q/k/v are row blocks of the fused in_proj_weight."""
    m = CLIP_LAYER.match(path)
    if m is None:
        raise AdaptkitError(f"'{module}' has no counterpart in {store.root}'s OpenCLIP text encoder ({prefix}…): "
                            "only the layers' attention and MLP projections are placed there")
    block = f"{prefix}transformer.resblocks.{m.group(1)}."
    if m.group(3) in (None, "out"):
        found = _place(store, f"{block}{OPEN_CLIP_NAMES[m.group(2)]}.weight")
        if found is None:
            raise AdaptkitError(f"'{module}': {store.root} has no '{block}{OPEN_CLIP_NAMES[m.group(2)]}.weight'")
        return found
    key = f"{block}attn.in_proj_weight"
    if key not in store:
        raise AdaptkitError(f"'{module}': {store.root} has no '{key}' (OpenCLIP's fused q/k/v projection)")
    rows, width = store.info(key).shape
    if rows != 3 * width:
        raise AdaptkitError(f"'{key}' in {store.root} is {rows} × {width}, not q, k and v stacked (3d × d)")
    start = "qkv".index(m.group(3)) * width
    bias = f"{block}attn.in_proj_bias"
    return key, bias if bias in store else None, (start, start + width)


def unet_map(keys) -> dict[str, str]:
    """diffusers UNet module path -> the checkpoint's module path (without `model.diffusion_model.`), for
    every module of the checkpoint's UNet that has a diffusers counterpart."""
    modules = {k[len(UNET):].rsplit(".", 1)[0] for k in keys if k.startswith(UNET)}
    downsamplers = sum(1 for m in modules if re.fullmatch(r"input_blocks\.\d+\.0\.op", m))
    inputs, outputs = (1 + max((int(n) for m in modules if (n := _block(head, m)) is not None), default=-1)
                       for head in ("input_blocks", "output_blocks"))
    levels = downsamplers + 1
    layers, extra = divmod(inputs - 1 - downsamplers, levels)
    if extra or layers < 1 or outputs != levels * (layers + 1):
        raise AdaptkitError(f"the checkpoint's UNet ({UNET}…) has {inputs} input and {outputs} output blocks for "
                            f"{levels} levels: not a Stable Diffusion UNet layout")
    found: dict[str, str] = {}
    for module in sorted(modules):
        path = sgm_to_diffusers(module, layers)
        if path is None:
            continue
        if path in found:
            raise AdaptkitError(f"the checkpoint's UNet has both '{found[path]}' and '{module}' for '{path}'")
        found[path] = module
    return found


def _block(head: str, module: str) -> str | None:
    m = re.match(rf"{head}\.(\d+)\.", module)
    return m.group(1) if m else None
