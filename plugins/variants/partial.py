"""Partial fine-tuning: train chosen modules whole, or the last k layers, and save them in full.

θ' = θ with the chosen modules replaced by trained copies; ΔW of a module = W' − W. The modules
are PEFT's `modules_to_save`: the folder is a PEFT LoRA config with no adapted layers
(`target_modules: "dummy-target-modules"`), so `peft.PeftModel.from_pretrained` loads it, and
merging it into a base model puts the saved tensors in place. "Last k layers" are those nearest
the output: the k highest indices of the model's layer list (`layers.N`, `h.N`, `blocks.N`, …).
Training only the top layers is the classic transfer-learning baseline (e.g. Lee et al. 2019,
"What would Elsa do? Freezing layers during transformer fine-tuning", arXiv 1911.03090).
"""
from __future__ import annotations

import re
from typing import Any

from adaptkit.plugin import AdapterFiles, AdaptkitError
from adaptkit.plugin import validate as v


class Partial:
    """Partial fine-tuning: chosen modules (or the last k layers) trained whole."""

    name = "partial"
    param_names: tuple[str, ...] = ()  # every tensor in the file is a whole module's
    config_keys = frozenset({"r", "lora_alpha", "last_layers", "modules", "layers_pattern"})
    config_types = {"modules": v.optional(v.targets), "last_layers": v.optional(v.positive_int)}
    defaults = {"modules": None, "last_layers": None}  # plus layers_pattern, a targeting key

    def describe(self, adapter: AdapterFiles) -> dict[str, Any]:
        modules = sorted({key.rsplit(".", 1)[0] for key in adapter.saved})
        return {"modules": modules, "tensors": len(adapter.saved), "last_layers": adapter.config.get("last_layers")}

    def delta(self, adapter: AdapterFiles, module: str, base=None):
        raise AdaptkitError(f"{module}: a partial fine-tune stores whole tensors, not weight changes")

    def prepare(self, model, config: dict[str, Any]) -> dict[str, Any]:
        """Turn `modules` (names or a regex, as target_modules) or `last_layers` into modules_to_save."""
        if config["target_modules"] is not None:
            raise AdaptkitError("partial fine-tuning trains whole modules; give modules=, not target_modules=")
        if config["modules"] is None and config["last_layers"] is None and config["modules_to_save"]:
            return config  # loading a saved one: its modules come as modules_to_save
        if (config["modules"] is None) == (config["last_layers"] is None):
            raise AdaptkitError("partial fine-tuning needs exactly one of modules=[...] or last_layers=k")
        if config["modules"] is not None:
            return {**config, "modules_to_save": config["modules"]}
        blocks = last_blocks(model, config["layers_pattern"])
        k = config["last_layers"]
        if not isinstance(k, int) or not 0 < k <= len(blocks):
            raise AdaptkitError(f"last_layers must be an integer in 1..{len(blocks)} (the model's layer count), got {k!r}")
        return {**config, "modules_to_save": blocks[-k:]}

    def file_config(self, config: dict[str, Any], settings: dict, transposed: bool) -> dict[str, Any]:
        return {"peft_type": "LORA", "adaptkit_variant": self.name, "r": 8, "lora_alpha": 8,
                "last_layers": config["last_layers"]}

    def config_from_file(self, adapter: AdapterFiles) -> dict[str, Any]:
        return {}  # the loader passes the saved modules as modules_to_save


def last_blocks(model, layers_pattern=None) -> list[str]:
    """Paths of the numbered layers (`….layers.N`), in index order."""
    from adaptkit.plugin import LAYER_LISTS

    names = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern or LAYER_LISTS)
    pattern = re.compile(rf"(?:.*\.)?(?:{'|'.join(map(re.escape, names))})\.(\d+)")
    blocks = {}
    for path, _ in model.named_modules():
        found = pattern.fullmatch(path)
        if found:
            blocks.setdefault(int(found.group(1)), path)
    if not blocks:
        raise AdaptkitError("last_layers: the model has no numbered layer list (layers.N, h.N, blocks.N); pass modules=")
    return [blocks[i] for i in sorted(blocks)]


PARTIAL = Partial()
