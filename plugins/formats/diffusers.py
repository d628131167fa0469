"""diffusers' own LoRA files: one .safetensors (diffusers calls it `pytorch_lora_weights.safetensors`)
with keys `<component>.<module path>.lora_A.weight` / `.lora_B.weight`, components `unet`,
`text_encoder`, `text_encoder_2` (`save_lora_weights` of the SD/SDXL pipelines).

Also read: diffusers' older spellings `<module>.lora.down.weight` / `.lora.up.weight` (and
`.lora_linear_layer.down/up`), attention-processor files (`<attn>.processor.to_q_lora.down.weight`
for `<attn>.to_q`, `to_out_lora` for `to_out.0`; text encoders' `self_attn.to_q_lora` for
`self_attn.q_proj`), `<module>.alpha` tensors, DoRA's `lora_magnitude_vector`, and a component's
file without the prefix (`save_lora_adapter`, recognized by its metadata; UNet and CLIP paths are
placed under `unet.` / `text_encoder.`). Alphas come from the `lora_adapter_metadata` JSON in the
safetensors header (LoraConfig fields packed as `<component>.<field>`: lora_alpha, alpha_pattern,
use_rslora); without it alpha = rank (scale 1, diffusers' own rule), with one warning.

Write: `<out>/pytorch_lora_weights.safetensors` (FILE_NAME; `load_lora_weights(folder)` finds it by
this name) with PEFT-style keys under the component prefixes and `lora_adapter_metadata` holding
each component's LoraConfig (r, lora_alpha, exact rank_pattern / alpha_pattern, target_modules,
use_rslora), so diffusers loads every module's alpha as it was. Keys keep the module paths as given;
a text encoder's config is written so that it fits CLIPTextModel with or without `text_model.`
(transformers 5 dropped it; diffusers strips it from keys then).
"""
from __future__ import annotations

import math
import re
import warnings

from adaptkit.plugin import AdapterFiles, AdaptkitError, dump_json, parse_json, validate

from ._lowrank import LORA_TYPES, MissingAlphaWarning, lora_config, pattern_value, plain_modules, sample, scalar
from ._sdcheckpoint import base_key as sd_base_key
from ._sdnames import COMPONENTS, UNET_TOP, split_component

FILE_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"
ROLES = {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B", "lora.down.weight": "lora_A", "lora.up.weight": "lora_B",
         "lora_linear_layer.down.weight": "lora_A", "lora_linear_layer.up.weight": "lora_B",
         "lora_magnitude_vector": "lora_magnitude_vector", "lora_magnitude_vector.weight": "lora_magnitude_vector",
         "alpha": "alpha"}
PLAIN = re.compile(r"^(.+?)\.(" + "|".join(re.escape(k) for k in ROLES) + r")$")
PROCESSOR = re.compile(r"^(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
TEXT_ATTN = re.compile(r"^(.+\.self_attn)\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
BARE_HEADS = UNET_TOP | {"text_model"}  # a component's own file (no `unet.` prefix)
TEXT_NAMES = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def _parse(tail: str) -> tuple[str, str] | None:
    """'x.attn1.to_q.lora_A.weight' -> ('x.attn1.to_q', 'lora_A'), for every spelling above."""
    for pattern, name in ((PROCESSOR, lambda p: "to_out.0" if p == "to_out" else p), (TEXT_ATTN, TEXT_NAMES.get)):
        m = pattern.match(tail)
        if m:
            return f"{m.group(1)}.{name(m.group(2))}", "lora_A" if m.group(3) == "down" else "lora_B"
    m = PLAIN.match(tail)
    return (m.group(1), ROLES[m.group(2)]) if m else None


class DiffusersFormat:
    """diffusers LoRA files (pytorch_lora_weights.safetensors: unet./text_encoder.… lora_A/lora_B)."""

    name = "diffusers"
    hub_library = "diffusers"
    card_usage = 'diffusers loads it: `pipe.load_lora_weights("{repo}")`.'

    def detect(self, store) -> bool:
        keys = store.keys()
        if not keys or any(k.startswith("lora_") for k in keys):  # kohya's layout
            return False
        if METADATA_KEY in store.metadata:
            return True
        return any((k.partition(".")[0] in COMPONENTS and "lora" in k) or (".processor." in k and "_lora." in k)
                   or (k.partition(".")[0] in BARE_HEADS and ".lora" in k) for k in keys)

    def read(self, store) -> AdapterFiles:
        where = store.files[0] if store.files else store.root
        entries, scope, bad = {}, {}, []
        for key in store.keys():
            head, _, tail = key.partition(".")
            component = head if head in COMPONENTS and tail else None
            parsed = _parse(tail if component else key)
            if parsed is None:
                bad.append(key)
                continue
            inner, role = parsed
            path = f"{component}.{inner}" if component else _placed(inner)
            if role in entries.setdefault(path, {}):
                raise AdaptkitError(f"{where}: module '{path}' has its {role} twice ({entries[path][role]}, {key})")
            entries[path][role], scope[path] = key, (component, inner)
        if bad:
            raise AdaptkitError(f"{where}: {len(bad)} of {len(store)} tensors are not diffusers LoRA tensors "
                                f"(<component>.<module>.lora_A.weight / .lora_B.weight); e.g. {sample(bad)}")
        if len({c is None for c, _ in scope.values()}) > 1:
            raise AdaptkitError(f"{where}: keys mix component prefixes (unet., text_encoder.) and bare module paths")
        modules, ranks, alphas = {}, {}, {}
        for path, roles in sorted(entries.items()):
            alpha_key = roles.pop("alpha", None)
            if "lora_A" not in roles or "lora_B" not in roles:
                raise AdaptkitError(f"{where}: module '{path}' lacks {'lora_B' if 'lora_A' in roles else 'lora_A'}")
            modules[path], ranks[path] = roles, store.info(roles["lora_A"]).shape[0]
            if alpha_key:
                alphas[path] = scalar(store, alpha_key)
        use_rslora = _alphas_from_metadata(_metadata(store, where), scope, ranks, alphas, where)
        config = {**lora_config(ranks, alphas), "use_rslora": use_rslora,
                  "use_dora": any("lora_magnitude_vector" in r for r in modules.values())}
        return AdapterFiles("lora", config, store, self.name, modules)

    def base_key(self, module: str, store):
        """Where `module` lies in an SD base saved another way: a single-file checkpoint, a UNet folder."""
        return sd_base_key(module, store)

    def write(self, adapter, out_dir) -> list:
        """Write `<out_dir>/pytorch_lora_weights.safetensors`; see the module docstring."""
        from adaptkit.plugin import save_tensors

        modules = plain_modules(adapter, "diffusers", fold_rslora=False)
        if not modules:
            raise AdaptkitError("the adapter has no LoRA modules to write")
        groups: dict[str, dict] = {}
        for path, m in modules.items():
            component, inner = split_component(path)
            groups.setdefault(component, {})[inner] = m
        tensors, packed = {}, {}
        for component, mods in sorted(groups.items()):
            for inner, m in sorted(mods.items()):
                tensors[f"{component}.{inner}.lora_A.weight"] = m.a.contiguous()
                tensors[f"{component}.{inner}.lora_B.weight"] = m.b.contiguous()
            config = _component_config(component, mods, bool(adapter.config.get("use_rslora")))
            packed.update({f"{component}.{k}": v for k, v in config.items()})
        text = dump_json(packed, f"the '{METADATA_KEY}' metadata", end="")  # NaN refused by name
        metadata = {"format": "pt", METADATA_KEY: text}
        return save_tensors(out_dir, tensors, shard_size=2**62, metadata=metadata, stem=FILE_NAME.split(".")[0])


def _component_config(component: str, mods: dict, use_rslora: bool) -> dict:
    """The LoraConfig diffusers builds the component's adapter from. A text encoder's paths are
    given without `text_model.` and its patterns take it optionally: transformers 5 flattened
    CLIPTextModel (diffusers then drops `text_model.` from the keys), so the config fits both."""
    optional = "text_model." if component != "unet" else ""
    short = {p.removeprefix(optional) if optional else p: m for p, m in mods.items()}
    config = lora_config({p: m.rank for p, m in short.items()}, {p: m.alpha for p, m in short.items()}, optional)
    config = {k: v for k, v in config.items() if k not in ("peft_type", "base_model_name_or_path")}
    return {**config, "use_rslora": use_rslora, "use_dora": False, "lora_bias": False, "lora_dropout": 0.0,
            "bias": "none", "init_lora_weights": True}


def _placed(inner: str) -> str:
    """A bare module path (a component's own file) under its SD component, when it is one."""
    try:
        component, path = split_component(inner)
    except AdaptkitError:
        return inner
    return f"{component}.{path}"


def _metadata(store, where) -> dict | None:
    raw = store.metadata.get(METADATA_KEY)
    if not raw:
        return None
    found = parse_json(raw, f"{where}: the '{METADATA_KEY}' metadata")  # bounded nesting
    if not isinstance(found, dict):
        raise AdaptkitError(f"{where}: the '{METADATA_KEY}' metadata is not a JSON object")
    return found


def _alphas_from_metadata(meta, scope, ranks, alphas, where) -> bool:
    """Fill in `alphas` (per module) from the LoraConfig(s) in the metadata; returns use_rslora.
    Components that differ in use_rslora are made plain by folding √r into their alphas."""
    rslora, missing = {}, 0
    for path, (component, inner) in scope.items():
        if path in alphas:
            continue
        config = meta if component is None or meta is None else \
            {k[len(component) + 1:]: v for k, v in meta.items() if k.startswith(f"{component}.")}
        if not config:
            alphas[path], missing = float(ranks[path]), missing + 1
            continue
        validate.check_fields(config, LORA_TYPES, f"{where}: '{METADATA_KEY}' metadata")
        default = config.get("lora_alpha", config.get("r", ranks[path]))
        alphas[path] = float(pattern_value(config.get("alpha_pattern") or {}, inner, default))
        rslora[path] = bool(config.get("use_rslora"))
    if missing:
        warnings.warn(f"{where}: no alpha for {missing} of {len(ranks)} LoRA modules (no '{METADATA_KEY}'); "
                      "using alpha = rank (scale 1) for them", MissingAlphaWarning, stacklevel=3)
    if rslora and all(rslora.values()) and len(rslora) == len(ranks):
        return True
    for path, rs in rslora.items():
        if rs:
            alphas[path] *= math.sqrt(ranks[path])
    return False


DIFFUSERS = DiffusersFormat()
