"""PEFT's adapter folders: `adapter_config.json` + `adapter_model.safetensors` (the canonical format).

Keys are `base_model.model.<module path>.<role>[.weight]` where `<role>` is one of the variant's
`param_names` (`lora_A`, `lora_B`, ...); tensors shared by all modules sit directly under
`base_model.` (VeRA's `vera_A`); every other key is a full tensor of a `modules_to_save` module
(PEFT also saves resized embeddings as `<module>.base_layer.weight`). The variant is the lower-cased
`peft_type` (LORA -> lora), or `adaptkit_variant` for variants PEFT lacks. Unknown config keys
(a newer PEFT) load with a warning. This module imports no torch: it only reads names.
Written by `write_live` (a live model's adapter, any variant: what `handle.save` and `train` write by
default) and `write` (a low-rank adapter: `convert`, `extract`), both so that PEFT loads the folder as
its own (`_peft_interop.py`: task_type, a portable base, no key PEFT does not know; adaptkit's own
keys travel in the weights file's metadata).
"""
from __future__ import annotations

import warnings
from collections import Counter
from typing import Any

from adaptkit.plugin import AdapterFiles, AdaptkitError, UnsupportedError, dump_json, registry, validate

from . import _peft_interop as interop
from ._peft_targets import parameter_modules

CONFIG_FILE = "adapter_config.json"
WEIGHTS_STEM = "adapter_model"  # adapter_model.safetensors (or its shards; adapter_model.bin from older PEFT)
PREFIXES = ("base_model.model.", "base_model.")
DUMMY_TARGETS = "dummy-target-modules"  # PEFT's marker for "no adapted layers, only saved modules"
# Fields every PEFT config has, whatever the variant.
COMMON_KEYS = frozenset({
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
    "peft_version", "modules_to_save", "target_modules", "exclude_modules", "layers_to_transform",
    "layers_pattern", "adaptkit_variant", "adaptkit_version",
})


class AdapterConfigWarning(UserWarning):
    """An adapter config field this version does not know; it is ignored."""


class PeftFormat:
    """PEFT adapter folders (adapter_config.json + adapter_model.safetensors)."""

    name = "peft"
    hub_library = "peft"  # the Hub's library_name: PEFT loads these folders
    card_usage = 'It is a PEFT folder too: `PeftModel.from_pretrained(model, "{repo}")`.'
    remote_hint = CONFIG_FILE

    def detect(self, store) -> bool:
        return (store.root / CONFIG_FILE).is_file()

    def remote_files(self, names) -> list[str] | None:
        """The config and the root-level weights (safetensors, else an older PEFT's pickle) of a Hub repo."""
        if CONFIG_FILE not in names:
            return None
        weights = [p for p in names if "/" not in p and p.startswith(WEIGHTS_STEM) and p.endswith(".safetensors")]
        weights = weights or [p for p in names if "/" not in p and p.startswith(WEIGHTS_STEM)
                              and p.endswith((".bin", ".pt"))]
        if not weights:
            raise AdaptkitError(f"has {CONFIG_FILE} but no adapter weights ({WEIGHTS_STEM}.safetensors)")
        return [CONFIG_FILE, *sorted(weights)]

    def read(self, store) -> AdapterFiles:
        config = store.json_file(CONFIG_FILE) or {}
        where = store.root / CONFIG_FILE
        # adaptkit's own keys of a variant PEFT reads as its peft_type (LoRA-FA as LORA) are in the metadata
        own = interop.own_keys(config, store.metadata, where)
        config |= {k: v for k, v in own.items() if k != "adaptkit_variant"}
        validate.check_fields(config, validate.ADAPTER_FIELDS, where)
        variant_name = (own.get("adaptkit_variant") or config.get("adaptkit_variant")
                        or str(config.get("peft_type", "")).lower())
        if not variant_name:
            raise AdaptkitError(f"{where}: no 'peft_type' or 'adaptkit_variant'")
        try:
            variant = registry.get("variant", variant_name)
        except AdaptkitError:  # a PEFT method adaptkit does not have: say so by PEFT's name
            if own.get("adaptkit_variant") or config.get("adaptkit_variant"):
                raise
            # (no "did you mean": a near name is another method, never this one)
            known = ", ".join(sorted(registry.names("variant")))
            raise UnsupportedError(f"{where}: PEFT type '{config['peft_type']}' is not supported (adaptkit's variants: "
                                   f"{known})") from None
        validate.check_fields(config, getattr(variant, "config_types", {}), where)
        unknown = sorted(set(config) - COMMON_KEYS - set(variant.config_keys))
        # A key from a newer PEFT left unset (null, false, empty) turns nothing on; set, it may change the math,
        # which adaptkit cannot know: refused by name rather than passed over.
        used = [k for k in unknown if config[k] not in (None, False, "", [], {})]
        if used:
            raise UnsupportedError(f"{where}: unknown config key {', '.join(f'{k}={config[k]!r}' for k in used)} "
                                   "(written by a newer PEFT?): adaptkit cannot tell how it changes the adapter")
        if unknown:
            warnings.warn(f"{where}: ignoring unknown config keys {', '.join(unknown)}, all unset (written by a newer PEFT?)",
                          AdapterConfigWarning, stacklevel=2)
        adapter = AdapterFiles(variant_name, config, store, self.name)
        roles = set(variant.param_names)
        for key in store.keys():
            module, role = split_key(strip_prefix(key), roles)
            if role is None:
                adapter.saved[module.replace(".base_layer.", ".")] = key
            elif module:
                adapter.modules.setdefault(module, {})[role] = key
            else:
                adapter.shared[role] = key
        if not adapter.modules and not adapter.shared and not adapter.saved:
            raise AdaptkitError(f"{store.root}: adapter has no tensors")
        if config.get("target_parameters"):
            adapter.modules = parameter_modules(adapter.modules, config["target_parameters"], where,
                                                config.get("target_modules"))
        # PEFT sets fan_in_fan_out per layer while injecting (True at a Conv1D, False at a Linear) and
        # saves the last value: a guess for every module until a base model settles each one.
        adapter.transposed = dict.fromkeys(adapter.modules, bool(config.get("fan_in_fan_out")))
        return adapter

    def write_live(self, live, out_dir) -> list:
        """A live adapter (`adaptkit.live.files.LiveAdapter`) as PEFT saves it: keys `base_model.model.<module
        path>.<stored key>`, shared tensors `base_model.<role>`, modules trained whole as their full
        tensors under their own path; `target_modules` lists the adapted paths exactly, so PEFT and
        adaptkit pick the same layers whatever the original pattern was. An adapter whose tensors are
        all shared (prompt learning: no layer holds one) is laid out as PEFT saves prompt learning:
        its tensors at the top level, no targeting fields."""
        import json
        from pathlib import Path

        from adaptkit.plugin import save_tensors

        config = {"task_type": None, "base_model_name_or_path": live.base_model, "inference_mode": True, **live.config}
        prompt = not any(live.modules.values()) and not live.saved and bool(live.shared)
        if not prompt:
            targets = live.config.get("target_modules") or ([] if live.config.get("target_parameters") else None)
            config |= {"target_modules": sorted(live.modules) or DUMMY_TARGETS if targets is None else targets,
                       "modules_to_save": sorted(live.saved) or None, "exclude_modules": None,
                       "layers_to_transform": None, "layers_pattern": None}
        config = interop.portable(config, getattr(live, "architecture", None))
        text = dump_json(interop.peft_view(config, COMMON_KEYS), CONFIG_FILE)  # NaN refused before a tensor is written
        tensors = {f"{PREFIXES[0]}{path}.{key}": t for path, stored in live.modules.items() for key, t in stored.items()}
        tensors |= {f"{'' if prompt else PREFIXES[1]}{role}": t for role, t in live.shared.items()}
        tensors |= {f"{PREFIXES[0]}{path}.{p}": t for path, state in live.saved.items() for p, t in state.items()}
        metadata = {"format": "pt"}
        if config.get("adaptkit_variant"):  # a variant PEFT lacks: the file says what it is on its own too
            metadata.update(adaptkit_variant=config["adaptkit_variant"])
        if config.get("adaptkit_variant") or interop.needs_metadata(config):  # and the keys PEFT is not shown
            metadata.update(adaptkit_config=json.dumps(config, sort_keys=True, allow_nan=False))
        out_dir = Path(out_dir)
        (out_dir / CONFIG_FILE).write_text(text)
        files = save_tensors(out_dir, tensors, shard_size=2**62, metadata=metadata, stem=WEIGHTS_STEM)
        return [out_dir / CONFIG_FILE, *files]

    def write(self, adapter, out_dir) -> list:
        """A PEFT LoRA folder: r and lora_alpha of the most common module, `rank_pattern` and
        `alpha_pattern` for the rest (exact module paths), whole tensors as `modules_to_save`."""
        from pathlib import Path

        from adaptkit.plugin import save_tensors

        modules = adapter.modules
        # PEFT takes each layer's layout from its type (Conv1D or Linear), whatever fan_in_fan_out says, so one
        # config holds both kinds; the flag, a guess for readers, is true when any layer is a Conv1D.
        flips = {m.transposed for m in modules.values() if not m.embedding}
        ranks = {p: m.rank for p, m in modules.items()}
        alphas = {p: float(m.alpha) for p, m in modules.items()}
        # A whole tensor of an adapted module (a changed bias) goes into its base layer, as PEFT
        # saves it; other whole tensors are modules_to_save.
        inside = {key: key.rsplit(".", 1)[0] in modules for key in adapter.saved}
        saved_modules = sorted({key.rsplit(".", 1)[0] for key in adapter.saved if not inside[key]})
        config = {"task_type": None, "base_model_name_or_path": None, **adapter.config, "peft_type": "LORA",
                  **rank_config(ranks, alphas), "use_rslora": bool(adapter.config.get("use_rslora")), "use_dora": False,
                  "target_modules": sorted(modules) or DUMMY_TARGETS, "fan_in_fan_out": True in flips,
                  "modules_to_save": saved_modules or None, "init_lora_weights": True, "bias": "none",
                  "lora_dropout": 0.0, "inference_mode": True, "layers_to_transform": None, "layers_pattern": None,
                  "exclude_modules": None}
        config.pop("adaptkit_variant", None)
        config = interop.portable(config, None)
        tensors = {}
        for path, m in modules.items():
            a_name, b_name = ("lora_embedding_A", "lora_embedding_B") if m.embedding else ("lora_A.weight", "lora_B.weight")
            tensors[f"base_model.model.{path}.{a_name}"] = m.a.contiguous()
            tensors[f"base_model.model.{path}.{b_name}"] = m.b.contiguous()
        for key, tensor in adapter.saved.items():
            module, leaf = key.rsplit(".", 1)
            tensors[f"base_model.model.{module}.base_layer.{leaf}" if inside[key] else f"base_model.model.{key}"] = tensor.contiguous()
        out_dir = Path(out_dir)
        (out_dir / CONFIG_FILE).write_text(dump_json(config, CONFIG_FILE))
        files = save_tensors(out_dir, tensors, shard_size=2**62, metadata={"format": "pt"}, stem=WEIGHTS_STEM)
        return [out_dir / CONFIG_FILE, *files]


def rank_config(ranks: dict[str, int], alphas: dict[str, float]) -> dict[str, Any]:
    """r and lora_alpha of the most common rank, `rank_pattern`/`alpha_pattern` for the other modules."""
    r = Counter(ranks.values()).most_common(1)[0][0] if ranks else 8
    alpha = Counter(alphas[m] for m in ranks if ranks[m] == r).most_common(1)[0][0] if ranks else r
    return {"r": r, "lora_alpha": alpha, "rank_pattern": {m: k for m, k in sorted(ranks.items()) if k != r},
            "alpha_pattern": {m: a for m, a in sorted(alphas.items()) if a != alpha}}


def strip_prefix(key: str) -> str:
    for prefix in PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def split_key(key: str, roles: set[str]) -> tuple[str, str | None]:
    """'a.b.lora_A.weight' -> ('a.b', 'lora_A'); 'a.b.lora_B.bias' -> ('a.b', 'lora_B_bias') (PEFT's
    `lora_bias`); a key with no role -> (key, None)."""
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part in roles:
            return ".".join(parts[:i]), f"{part}_bias" if parts[i + 1:] == ["bias"] else part
    return key, None


PEFT = PeftFormat()
