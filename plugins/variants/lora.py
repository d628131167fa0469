"""LoRA: a low-rank update ΔW = s·B·A beside a frozen weight (Hu et al. 2021, arXiv 2106.09685).

With A (r × in) and B (out × r) the update is ΔW = s · B·A, where s = α / r, or α / √r with
rsLoRA (`use_rslora`, Kalajdzievski 2023, arXiv 2312.03732). Per-module ranks and alphas come from
`rank_pattern` / `alpha_pattern` (PEFT's rule: a pattern matches a module path ending in
`.<pattern>`). GPT-2 `Conv1D` layers (`fan_in_fan_out`) store W as in × out, so ΔW is transposed.
Embeddings store A as r × num_embeddings and B as dim × r: ΔE = s · (B·A)ᵀ.

DoRA (`use_dora`, Liu et al. 2024, arXiv 2402.09353) rescales each output row of the updated weight
to a learned magnitude m: W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖_row, so its ΔW needs the base W.
"""
from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

from adaptkit.errors import AdaptkitError
from adaptkit.spec import AdapterFiles

if TYPE_CHECKING:
    import torch

# LoraConfig fields of PEFT 0.21 (unknown ones warn when loading, known ones are kept).
LORA_CONFIG_KEYS = frozenset({
    "r", "lora_alpha", "lora_dropout", "fan_in_fan_out", "bias", "use_rslora", "use_dora", "init_lora_weights",
    "rank_pattern", "alpha_pattern", "layer_replication", "loftq_config", "megatron_config", "megatron_core",
    "lora_bias", "runtime_config", "eva_config", "corda_config", "trainable_token_indices", "target_parameters",
    "ensure_weight_tying", "alora_invocation_tokens", "arrow_config", "qalora_group_size", "use_qalora",
    "lora_ga_config", "kasa_config", "monteclora_config", "velora_config", "use_bdlora",
})


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup: the first pattern matching the end of the path."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


class LoRA:
    """LoRA: low-rank update s·B·A (rsLoRA and DoRA through its config)."""

    name = "lora"
    param_names = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
    config_keys = LORA_CONFIG_KEYS

    # -- shapes --------------------------------------------------------------------------------
    @staticmethod
    def _factors(roles: dict[str, str]) -> tuple[str, str, bool]:
        if "lora_A" in roles and "lora_B" in roles:
            return "lora_A", "lora_B", False
        if "lora_embedding_A" in roles and "lora_embedding_B" in roles:
            return "lora_embedding_A", "lora_embedding_B", True
        raise AdaptkitError(f"LoRA module has tensors {sorted(roles)} but not a complete A/B pair")

    def module_rank(self, adapter: AdapterFiles, module: str) -> int:
        a, _, _ = self._factors(adapter.modules[module])
        return adapter.shape(module, a)[0]

    def module_alpha(self, adapter: AdapterFiles, module: str) -> float:
        cfg = adapter.config
        return pattern_value(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", cfg.get("r", 8)))

    def scaling(self, adapter: AdapterFiles, module: str) -> float:
        r, alpha = self.module_rank(adapter, module), self.module_alpha(adapter, module)
        return alpha / math.sqrt(r) if adapter.config.get("use_rslora") else alpha / r

    def describe(self, adapter: AdapterFiles) -> dict[str, Any]:
        cfg = adapter.config
        per_module = {}
        for module in sorted(adapter.modules):
            per_module[module] = {
                "rank": self.module_rank(adapter, module),
                "alpha": self.module_alpha(adapter, module),
                "scaling": self.scaling(adapter, module),
            }
        ranks = sorted({m["rank"] for m in per_module.values()})
        return {
            "rank": ranks[0] if len(ranks) == 1 else None,
            "ranks": ranks,
            "alpha": cfg.get("lora_alpha"),
            "scaling": sorted({m["scaling"] for m in per_module.values()}),
            "use_rslora": bool(cfg.get("use_rslora")),
            "use_dora": bool(cfg.get("use_dora")),
            "fan_in_fan_out": bool(cfg.get("fan_in_fan_out")),
            "modules": per_module,
        }

    # -- ΔW ------------------------------------------------------------------------------------
    def delta(self, adapter: AdapterFiles, module: str, base: torch.Tensor | None = None) -> torch.Tensor:
        roles = adapter.modules[module]
        a_role, b_role, embedding = self._factors(roles)
        a = adapter.tensor(module, a_role).float()
        b = adapter.tensor(module, b_role).float()
        if a.dim() != 2 or b.dim() != 2:
            raise AdaptkitError(f"{module}: LoRA on convolution layers is not supported yet (A is {tuple(a.shape)})")
        s = self.scaling(adapter, module)
        update = (b @ a) * s
        if embedding or adapter.config.get("fan_in_fan_out"):
            update = update.T
        if "lora_magnitude_vector" not in roles:
            return update
        return self._dora_delta(adapter, module, update, base)

    def _dora_delta(self, adapter, module, update, base):
        if base is None:
            raise AdaptkitError(f"{module}: a DoRA adapter's ΔW depends on the base weight; give the base model")
        transposed = bool(adapter.config.get("fan_in_fan_out"))
        w = base.float().T if transposed else base.float()
        upd = update.T if transposed else update
        merged = w + upd
        import torch  # here, not at the top: `inspect` loads this plugin and must stay torch-free

        m = adapter.tensor(module, "lora_magnitude_vector").float()
        new = (m / torch.linalg.norm(merged, dim=1)).unsqueeze(1) * merged
        out = new - w
        return out.T if transposed else out


    # -- factors (adapters -> adapter merging) ---------------------------------------------------
    def factors(self, adapter: AdapterFiles, module: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A, B, s) in float32 with ΔW = s·B·A (A r × in, B out × r), before the transpose that
        `factor_layout` reports. DoRA modules have no such form: W' = m ⊙ (W + s·B·A) / ‖·‖_row."""
        roles = adapter.modules[module]
        if "lora_magnitude_vector" in roles:
            raise AdaptkitError(f"{module}: a DoRA module rescales W + s·B·A by a learned magnitude, so its ΔW is not "
                                "low-rank and concatenation cannot be exact; use another merge method with a base model")
        a_role, b_role, _ = self._factors(roles)
        a = adapter.tensor(module, a_role).float()
        b = adapter.tensor(module, b_role).float()
        if a.dim() != 2 or b.dim() != 2:
            raise AdaptkitError(f"{module}: LoRA on convolution layers is not supported yet (A is {tuple(a.shape)})")
        return a, b, self.scaling(adapter, module)

    def factor_layout(self, adapter: AdapterFiles, module: str) -> dict[str, bool]:
        """`embedding`: A is r × num_embeddings; `transposed`: the base weight is (s·B·A)ᵀ
        (embeddings, and `Conv1D` layers with `fan_in_fan_out`)."""
        embedding = self._factors(adapter.modules[module])[2]
        return {"embedding": embedding, "transposed": embedding or bool(adapter.config.get("fan_in_fan_out"))}

    def write_lowrank(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], layouts: dict[str, dict[str, bool]],
                      template: dict[str, Any], out_dir) -> list:
        """Write a PEFT LoRA folder with ΔW = B·A per module: scale 1, so lora_alpha = rank per module
        (`rank_pattern`/`alpha_pattern` where ranks differ), no rsLoRA, no DoRA. `template` is an input's
        config (base model, task type); `layouts` come from `factor_layout` (embedding, transposed)."""
        import json
        from collections import Counter
        from pathlib import Path

        from adaptkit.writer import save_tensors

        ranks = {m: int(a.shape[0]) for m, (a, _) in factors.items()}
        r = Counter(ranks.values()).most_common(1)[0][0] if ranks else 8
        flips = {layouts[m]["transposed"] for m in factors if not layouts[m]["embedding"]}
        if len(flips) > 1:
            raise AdaptkitError("the merged modules mix fan_in_fan_out and plain layers; one LoRA config cannot hold both")
        other = {m: k for m, k in sorted(ranks.items()) if k != r}
        config = dict(template, peft_type="LORA", r=r, lora_alpha=r, rank_pattern=other, alpha_pattern=dict(other),
                      use_rslora=False, use_dora=False, target_modules=sorted(factors), fan_in_fan_out=flips == {True},
                      modules_to_save=None, layers_to_transform=None, layers_pattern=None, exclude_modules=None,
                      lora_bias=False, trainable_token_indices=None, target_parameters=None)
        tensors = {}
        for module, (a, b) in factors.items():
            a_name, b_name = (("lora_embedding_A", "lora_embedding_B") if layouts[module]["embedding"]
                              else ("lora_A.weight", "lora_B.weight"))
            tensors[f"base_model.model.{module}.{a_name}"] = a.contiguous()
            tensors[f"base_model.model.{module}.{b_name}"] = b.contiguous()
        out_dir = Path(out_dir)
        (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        files = save_tensors(out_dir, tensors, shard_size=2**62, metadata={"format": "pt"}, stem="adapter_model")
        return [out_dir / "adapter_config.json", *files]


LORA = LoRA()
