"""kohya's Stable Diffusion LoRA files (sd-scripts' `networks.lora`; what A1111, ComfyUI and diffusers'
`convert_state_dict_to_kohya` write): one .safetensors file holding, per module,
`<name>.lora_down.weight` (A, r × in), `<name>.lora_up.weight` (B, out × r) and `<name>.alpha` (a
scalar); ΔW = alpha / r · up · down. `<name>` is `lora_unet_` (UNet), `lora_te_` (SD 1.x/2.x text
encoder) or `lora_te1_` / `lora_te2_` (SDXL's two) and the module's path with `_` for `.`.

Read: modules under `unet.`, `text_encoder.` and `text_encoder_2.` with diffusers' module paths
(kohya's sgm names for the SDXL UNet are mapped exactly; see `_sdnames`); every module's alpha is
stated exactly by `lora_alpha` / `alpha_pattern`. A module without `alpha` gets alpha = rank (scale
1, what kohya's loaders assume), with one warning; an `alpha` of 0 is alpha = rank too, silently, as
sd-scripts' and LyCORIS's modules read it (`alpha = lora_dim if alpha is None or alpha == 0`), so a
module whose alpha is 0 (scale 0 elsewhere, as in PEFT) cannot be written: refused by name. Any key
that is not such a tensor, or a name that is no module of an SD 1.x/2.x/SDXL UNet or CLIP text
encoder, is refused with an error naming it.
LyCORIS's Tucker LoCon (`.lora_mid.weight`, an r × r × kernel core between a 1×1 down and up)
reads as the lora variant, which folds the core into A (merges only, not live).
LyCORIS's LoHa and LoKr modules under the same names (`.hada_w1_a`, `.lokr_w1`, …, `.alpha`,
`.dora_scale`) read as the loha / lokr variant (`_lycoris_files`), one family per file.

Write: `<out>/lora.safetensors` (FILE_NAME) with diffusers-style names (`lora_unet_down_blocks_…`,
which sd-scripts, A1111, ComfyUI and diffusers all load) or, with `unet_names="sgm"`, kohya's SDXL
names; text encoders as `lora_te_`, or `lora_te1_` / `lora_te2_` when the adapter is SDXL's (a
`text_encoder_2` module, SDXL-only UNet structure, an "xl" base model, or `sdxl=True`), always with
transformers 4's `text_model_` (a path of transformers 5's flattened CLIPTextModel, `encoder.…`,
is written as `text_model_encoder_…`, which is what kohya's loaders expect; reading keeps a file's
own spelling, so only such files change names on a round trip). Each module's
`alpha` is written in its weights' dtype where that holds the value exactly (as sd-scripts saves it),
else float32/float64. Metadata: `ss_network_module`, `ss_network_dim`, `ss_network_alpha` (most
common values), `ss_network_args` (conv_dim/conv_alpha when convolutions are adapted),
`ss_base_model_version` for SDXL, `ss_sd_model_name` when the base model is known.
LoHa and LoKr adapters (`write_files`: `convert --to kohya`, `handle.save(format="kohya")`) are written
with their own tensors as LyCORIS saves them (`_lycoris_files.write`), exactly.
"""
from __future__ import annotations

import json
import re
import warnings

from adaptkit.plugin import AdapterFiles, AdaptkitError

from . import _lycoris_files as lycoris
from ._lowrank import MissingAlphaWarning, lora_config, most_common, number, plain_modules, sample, scalar
from ._sdcheckpoint import base_key as sd_base_key
from ._sdnames import diffusers_to_sgm, flatten, kohya_text_path, split_component, text_path, unet_path

FILE_NAME = "lora.safetensors"
KEY = re.compile(r"^(lora_unet|lora_te[12]?)_([^.]+)\.(lora_down\.weight|lora_up\.weight|lora_mid\.weight|alpha|"
                 + "|".join(lycoris.ROLES) + ")$")
COMPONENT = {"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder", "lora_te2": "text_encoder_2"}


class KohyaFormat:
    """kohya / A1111 Stable Diffusion LoRA files (lora_unet_… .lora_down/.lora_up/.alpha)."""

    name = "kohya"
    card_usage = "A kohya-ss LoRA file, as Stable Diffusion front ends (AUTOMATIC1111, ComfyUI) load it from their LoRA folder."

    def detect(self, store) -> bool:
        # Every kohya-style SD network file starts its keys with `lora_`; other layouts never do.
        return any(k.startswith("lora_") for k in store.keys())

    def read(self, store) -> AdapterFiles:
        where = store.files[0] if store.files else store.root
        groups, bad = {}, []
        for key in store.keys():
            m = KEY.match(key)
            if m is None:
                bad.append(key)
            else:
                groups.setdefault((m.group(1), m.group(2)), {})[m.group(3)] = key
        if bad:
            raise AdaptkitError(f"{where}: {len(bad)} of {len(store)} tensors are not kohya LoRA tensors of an SD 1.x/2.x/"
                                f"SDXL model (lora_unet_/lora_te*_<module>.lora_down.weight, .lora_up.weight, .lora_mid.weight, .alpha, "
                                f"or LyCORIS's .hada_*, .lokr_*, .dora_scale); "
                                f"e.g. {sample(bad)}")
        prefixes = {p for p, _ in groups}
        if {"lora_te", "lora_te1"} <= prefixes:
            raise AdaptkitError(f"{where}: both lora_te_ and lora_te1_ keys: which text encoder is meant is ambiguous")
        kind = lycoris.file_family(groups, where)
        if kind != "lora":  # LyCORIS's LoHa / LoKr modules (_lycoris_files)
            return lycoris.read(kind, groups, store, where, self.name, lambda p, f: _module_path(p, f, where))
        modules, ranks, alphas, missing = {}, {}, {}, 0
        for (prefix, flat), roles in sorted(groups.items()):
            name = f"{prefix}_{flat}"
            if "lora_down.weight" not in roles or "lora_up.weight" not in roles:
                raise AdaptkitError(f"{where}: '{name}' lacks its {'lora_up' if 'lora_down.weight' in roles else 'lora_down'}.weight")
            if "dora_scale" in roles:  # it rescales W + ΔW: read as a plain LoRA it would be silently wrong
                raise AdaptkitError(f"{where}: '{name}' is a LoRA with dora_scale (LyCORIS weight decomposition); "
                                    "not supported for LoRA / LoCon modules")
            path = _module_path(prefix, flat, where)
            if path in modules:
                raise AdaptkitError(f"{where}: two kohya names map to module '{path}' (one is '{name}')")
            modules[path] = {"lora_A": roles["lora_down.weight"], "lora_B": roles["lora_up.weight"]}
            if "lora_mid.weight" in roles:  # LyCORIS's Tucker LoCon (the lora variant folds the core in)
                modules[path]["lora_mid"] = roles["lora_mid.weight"]
            down, up = store.info(roles["lora_down.weight"]).shape, store.info(roles["lora_up.weight"]).shape
            if len(down) < 2 or len(up) < 2 or down[0] != up[1]:
                raise AdaptkitError(f"{where}: '{name}': lora_down {list(down)} and lora_up {list(up)} do not chain")
            ranks[path] = down[0]
            alpha = scalar(store, roles["alpha"]) if "alpha" in roles else None
            missing += alpha is None
            alphas[path] = alpha or float(down[0])  # sd-scripts, LyCORIS: alpha None or 0 is alpha = rank (scale 1)
        if missing:
            warnings.warn(f"{where}: {missing} of {len(modules)} LoRA modules have no alpha; using alpha = rank "
                          "(scale 1) for them", MissingAlphaWarning, stacklevel=2)
        return AdapterFiles("lora", lora_config(ranks, alphas), store, self.name, modules)

    def write(self, adapter, out_dir, *, unet_names: str = "diffusers", sdxl: bool | None = None) -> list:
        """Write `<out_dir>/lora.safetensors`; see the module docstring for names and metadata."""
        import torch

        from adaptkit.plugin import save_tensors

        if unet_names not in ("diffusers", "sgm"):
            raise AdaptkitError(f"unet_names must be 'diffusers' or 'sgm', not '{unet_names}'")
        modules = plain_modules(adapter, "kohya")
        if not modules:
            raise AdaptkitError("the adapter has no LoRA modules to write")
        parts = {path: split_component(path) for path in modules}
        if sdxl is None:
            sdxl = unet_names == "sgm" or _looks_sdxl(parts.values(), adapter.config.get("base_model_name_or_path"))
        if not sdxl and any(c == "text_encoder_2" for c, _ in parts.values()):
            raise AdaptkitError("a text_encoder_2 module needs SDXL's lora_te1_/lora_te2_ names (sdxl=True)")
        prefix = {"unet": "lora_unet", "text_encoder": "lora_te1" if sdxl else "lora_te", "text_encoder_2": "lora_te2"}
        tensors: dict[str, torch.Tensor] = {}
        for path, m in sorted(modules.items()):
            component, inner = parts[path]
            name = f"{prefix[component]}_{_flat_name(component, inner, unet_names)}"
            if f"{name}.alpha" in tensors:
                raise AdaptkitError(f"two modules get the kohya name '{name}' (one is '{path}')")
            tensors[f"{name}.lora_down.weight"] = m.a.contiguous()
            tensors[f"{name}.lora_up.weight"] = m.b.contiguous()
            tensors[f"{name}.alpha"] = _alpha_tensor(path, m.alpha, m.a.dtype)
        metadata = _metadata(modules, sdxl, adapter.config.get("base_model_name_or_path"))
        return save_tensors(out_dir, tensors, shard_size=2**62, metadata=metadata, stem=FILE_NAME.split(".")[0])

    def base_key(self, module: str, store):
        """Where `module` lies in an SD base saved another way: a single-file checkpoint, a UNet folder."""
        return sd_base_key(module, store)

    writes_variants = frozenset(lycoris.FAMILIES)  # LyCORIS's LoHa and LoKr: written with their own tensors

    def write_files(self, adapter, out_dir) -> list:
        """A LoHa / LoKr adapter as LyCORIS saves it, under kohya's (diffusers-style) names (`_lycoris_files.write`)."""
        parts = {path: split_component(path) for path in adapter.modules}
        sdxl = _looks_sdxl(parts.values(), adapter.config.get("base_model_name_or_path"))
        prefix = {"unet": "lora_unet", "text_encoder": "lora_te1" if sdxl else "lora_te", "text_encoder_2": "lora_te2"}
        names = {path: f"{prefix[c]}_{_flat_name(c, inner, 'diffusers')}" for path, (c, inner) in parts.items()}
        if len(set(names.values())) < len(names):
            raise AdaptkitError(f"two modules get the same kohya name among {sorted(names.values())[:3]}")
        return lycoris.write(adapter, names, out_dir, _alpha_tensor, sdxl)


def _module_path(prefix: str, flat: str, where) -> str:
    component = COMPONENT[prefix]
    inner = unet_path(flat) if component == "unet" else text_path(flat)
    if inner is None:
        what = "UNet" if component == "unet" else "CLIP text encoder"
        raise AdaptkitError(f"{where}: '{prefix}_{flat}' names no module of a Stable Diffusion 1.x/2.x/SDXL {what} "
                            f"(key pattern '{prefix}_{flat}.lora_down.weight'; other model families are not supported)")
    return f"{component}.{inner}"


def _flat_name(component: str, inner: str, unet_names: str) -> str:
    if component == "unet":
        name = diffusers_to_sgm(inner) if unet_names == "sgm" else inner
    else:
        name = inner = kohya_text_path(inner)
    flat = flatten(name)
    back = unet_path(flat) if component == "unet" else text_path(flat)
    if back != inner:
        raise AdaptkitError(f"{component}.{inner}: its kohya name '{flat}' would read back as '{back}'; "
                            "not a module of a Stable Diffusion 1.x/2.x/SDXL model")
    return flat


def _looks_sdxl(parts, base_model: str | None) -> bool:
    for component, inner in parts:
        if component == "text_encoder_2" or inner.startswith("add_embedding.") \
                or re.search(r"\.transformer_blocks\.[1-9]", inner):
            return True
    return bool(base_model) and "xl" in base_model.lower()


def _alpha_tensor(path: str, alpha: float, dtype):
    """`alpha` as a scalar tensor in `dtype` where that holds it exactly; 0 (scale 0) is refused: kohya's
    loaders would read it as alpha = rank, scale 1."""
    import torch

    if alpha == 0:
        raise AdaptkitError(f"{path}: alpha 0 (scale 0) cannot be written to a kohya file: sd-scripts and LyCORIS "
                            "read alpha 0 as alpha = rank (scale 1)")
    for candidate in (dtype, torch.float32, torch.float64):
        if candidate.is_floating_point and float(torch.tensor(alpha, dtype=candidate)) == alpha:
            return torch.tensor(alpha, dtype=candidate)
    return torch.tensor(alpha, dtype=torch.float64)


def _metadata(modules, sdxl: bool, base_model: str | None) -> dict[str, str]:
    # sd-scripts counts 1×1 convolutions (SD 1.x's proj_in/proj_out) with the linear layers.
    conv = {p: m for p, m in modules.items() if m.a.dim() > 2 and tuple(m.a.shape[2:]) != (1, 1)}
    linear = {p: m for p, m in modules.items() if p not in conv} or conv

    def dim_alpha(group):
        dim = most_common(m.rank for m in group.values())
        return dim, most_common(m.alpha for m in group.values() if m.rank == dim)

    dim, alpha = dim_alpha(linear)
    found = {"ss_network_module": "networks.lora", "ss_network_dim": str(dim), "ss_network_alpha": str(float(alpha)),
             "ss_training_comment": "written by adaptkit"}
    if conv:
        conv_dim, conv_alpha = dim_alpha(conv)
        found["ss_network_args"] = json.dumps({"conv_dim": str(conv_dim), "conv_alpha": str(number(conv_alpha))})
    if sdxl:
        found["ss_base_model_version"] = "sdxl_base_v1-0"
    if base_model:
        found["ss_sd_model_name"] = base_model
    return found


KOHYA = KohyaFormat()
