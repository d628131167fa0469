"""LoRA: a low-rank update ΔW = s·B·A beside a frozen weight (Hu et al. 2021, arXiv 2106.09685).

With A (r × in) and B (out × r) the update is ΔW = s · B·A, where s = α / r, or α / √r with
rsLoRA (`use_rslora`, Kalajdzievski 2023, arXiv 2312.03732). Per-module ranks and alphas come from
`rank_pattern` / `alpha_pattern` (PEFT's rule: a pattern matches a module path ending in
`.<pattern>`). GPT-2 `Conv1D` layers (`fan_in_fan_out`) store W as in × out, so ΔW is transposed.
Embeddings store A as r × num_embeddings and B as dim × r: ΔE = s · (B·A)ᵀ. Convolutions keep their
kernels (A r × in × *kernel, B out × r/groups × 1…): ΔW = s·B·A over the flattened kernels, grouped
ones live only (`_lora_module.py`).

DoRA (`use_dora`, Liu et al. 2024, arXiv 2402.09353) rescales each output row of the updated weight
to a learned magnitude m: W' = m ⊙ (W + s·B·A) / ‖W + s·B·A‖_row, so its ΔW needs the base W.
On an embedding table (math layout dim × num_embeddings) that is one magnitude per embedding
dimension, as PEFT's DoRA embeddings. `lora_bias` (PEFT's) gives B a bias β, so the layer's bias
changes too: Δb = s·β (not with DoRA nor on embeddings, as in PEFT).

On a live model (the module plane, `_lora_module.py`) the same class runs the side branch;
configured instances add LoRA-FA (A frozen; Zhang et al. 2023, arXiv 2308.03303) and LoRA+ (B's
learning rate `loraplus_lr_ratio` × A's; Hayou et al. 2024, arXiv 2402.12354). Both save as PEFT
LoRA folders (with `adaptkit_variant` so adaptkit restores the training setting; PEFT ignores it).
aLoRA (`alora_invocation_tokens`, `_alora.py`) acts only from an invocation sequence on: live only, no ΔW.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from adaptkit.plugin import AdapterFiles, AdaptkitError

from ..formats._lowrank import LORA_TYPES, pattern_value
from ..formats.peft import rank_config
from . import _alora, _lora_tensors as _tensors, _lora_tokens as _tokens
from ._lora_checks import check_files
from ._lora_lowrank import LowRankForms, conv_product, tucker_down
from ._lora_params import (ParameterExperts, lookup_path, on_parameter, out_proj_factor, parameter_delta, parameter_rank,
                           refuse_live)

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


class LoRA(LowRankForms, _alora.Activated, _tensors.OnTensors, ParameterExperts):
    """LoRA: low-rank update s·B·A (rsLoRA, DoRA, trainable tokens beside it `_lora_tokens`: by its config)."""

    def __init__(self, name: str = "lora", *, freeze_a: bool = False, lr_ratio: float | None = None, about: str = ""):
        self.name, self.freeze_a, self.lr_ratio, self.about = name, freeze_a, lr_ratio, about

    param_names = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector", "lora_mid")
    @property
    def config_keys(self) -> frozenset[str]:  # LoRA+'s ratio is its own key: PEFT's LoraConfig lacks it
        return LORA_CONFIG_KEYS | {"loraplus_lr_ratio"} if self.lr_ratio else LORA_CONFIG_KEYS
    config_types = LORA_TYPES
    inspect_rows = ("alpha", "scaling", "use_rslora", "use_dora", "fan_in_fan_out", _alora.KEY, _tokens.KEY)

    # -- shapes --------------------------------------------------------------------------------
    @staticmethod
    def _factors(roles: dict[str, str]) -> tuple[str, str, bool]:
        if "lora_A" in roles and "lora_B" in roles:
            return "lora_A", "lora_B", False
        if "lora_embedding_A" in roles and "lora_embedding_B" in roles:
            return "lora_embedding_A", "lora_embedding_B", True
        raise AdaptkitError(f"LoRA module has tensors {sorted(roles)} but not a complete A/B pair")

    def module_rank(self, adapter: AdapterFiles, module: str) -> int:
        if on_parameter(adapter.config, module):  # A stacks one rank-r pair per expert (_lora_params)
            return parameter_rank(adapter.config, module)
        a, _, _ = self._factors(adapter.modules[module])
        return adapter.shape(module, a)[0]

    def module_alpha(self, adapter: AdapterFiles, module: str) -> float:
        cfg = adapter.config
        return pattern_value(cfg.get("alpha_pattern"), lookup_path(module), cfg.get("lora_alpha", cfg.get("r", 8)))

    def scaling(self, adapter: AdapterFiles, module: str) -> float:
        r, alpha = self.module_rank(adapter, module), self.module_alpha(adapter, module)
        return alpha / math.sqrt(r) if adapter.config.get("use_rslora") else alpha / r

    def check_files(self, adapter: AdapterFiles) -> None:
        """The config agrees with the tensors (`_lora_checks.check_files`)."""
        check_files(self, adapter)

    def describe(self, adapter: AdapterFiles) -> dict[str, Any]:
        cfg, held = adapter.config, _tokens.held(adapter)
        per_module = {m: {"rank": self.module_rank(adapter, m), "alpha": self.module_alpha(adapter, m),
                          "scaling": self.scaling(adapter, m)} for m in sorted(set(adapter.modules) - held)}
        ranks = sorted({m["rank"] for m in per_module.values()})
        flags = {key: bool(cfg.get(key)) for key in ("use_rslora", "use_dora", "fan_in_fan_out")}
        flags |= {_alora.KEY: list(_alora.invocation(cfg))} if _alora.invocation(cfg) else {}
        flags |= _tokens.describe(adapter, held)
        return {"rank": ranks[0] if len(ranks) == 1 else None, "ranks": ranks, "alpha": cfg.get("lora_alpha"),
                "scaling": sorted({m["scaling"] for m in per_module.values()}), **flags, "modules": per_module}

    # -- ΔW ------------------------------------------------------------------------------------
    def delta(self, adapter: AdapterFiles, module: str, base: torch.Tensor | None = None) -> torch.Tensor:
        roles = adapter.modules[module]
        if _tokens.ROLE in roles:  # trainable tokens beside the LoRA (`trainable_token_indices`)
            return _tokens.delta(adapter, module, base)
        a_role, b_role, embedding = self._factors(roles)
        a = adapter.tensor(module, a_role).float()
        b = adapter.tensor(module, b_role).float()
        if "lora_mid" in roles:  # LyCORIS's Tucker LoCon: its core folded into A
            a = tucker_down(module, adapter.tensor(module, "lora_mid").float(), a)
        s = self.scaling(adapter, module)
        if on_parameter(adapter.config, module):
            return parameter_delta(adapter, module, s, self.module_rank(adapter, module), base)
        s *= out_proj_factor(adapter.config, module)  # PEFT adds a MultiheadAttention's out_proj ΔW twice
        update = (conv_product(module, a, b) if a.dim() > 2 else b @ a) * s
        if embedding or adapter.transposed.get(module):
            update = update.T
        if "lora_magnitude_vector" not in roles:
            return update
        return self._dora_delta(adapter, module, update, base, embedding)

    def delta_bias(self, adapter: AdapterFiles, module: str, base: torch.Tensor | None = None) -> torch.Tensor | None:
        """Δb = s·β of a module with a bias on B (`lora_bias`), else None."""
        if "lora_B_bias" not in adapter.modules[module]:
            return None
        return self.scaling(adapter, module) * adapter.tensor(module, "lora_B_bias").float()

    def _dora_delta(self, adapter, module, update, base, embedding: bool = False):
        if base is None:
            raise AdaptkitError(f"{module}: a DoRA adapter's ΔW depends on the base weight; give the base model")
        flip = embedding or adapter.transposed.get(module, False)  # row norms in math layout (out × in)
        w, upd = (base.float().T, update.T) if flip else (base.float(), update)
        change = _module().dora_change(adapter.tensor(module, "lora_magnitude_vector").float(), w, upd)
        return change.T if flip else change

    # -- module plane (see _lora_module.py) -----------------------------------------------------
    @property
    def defaults(self) -> dict[str, Any]:
        found = {"r": 8, "lora_alpha": 8, "lora_dropout": 0.0, "use_rslora": False, "use_dora": False,
                 "init_lora_weights": True, "rank_pattern": {}, "alpha_pattern": {}, "lora_bias": False,
                 _alora.KEY: None, _tokens.KEY: None, "target_parameters": None}
        return {**found, "loraplus_lr_ratio": self.lr_ratio} if self.lr_ratio else found

    def prepare(self, model, config: dict[str, Any]) -> dict[str, Any]:  # trainable tokens' layers, tied heads
        return _tokens.prepare(model, _tensors.prepare(config))  # and no tensors' paths among target_modules

    def settings(self, config: dict[str, Any], path: str, target) -> dict[str, Any]:
        if _tokens.on(config, path):
            return _tokens.settings(config, path, target)
        if target.kind == "tensors":  # MultiheadAttention, target_parameters
            return _tensors.settings(config, path, target)
        r = int(pattern_value(config["rank_pattern"], path, config["r"]))
        alpha = float(pattern_value(config["alpha_pattern"], path, config["lora_alpha"]))
        limit = min(target.in_features, target.out_features)
        if target.kind == "conv":  # any rank, as PEFT: A is r × in × *kernel
            _module().check_conv(path, target, config, r)
        elif r < 1:
            raise AdaptkitError(f"{path}: rank must be at least 1, got {r}")
        elif r > limit and config["init_lora_weights"] == "pissa":  # any other rank is valid, as in PEFT
            raise AdaptkitError(f"{path}: PiSSA rank {r} does not fit a {target.out_features} × {target.in_features} "
                                f"layer (1 to {limit}: the top singular vectors of W)")
        if not 0 <= config["lora_dropout"] < 1:
            raise AdaptkitError(f"lora_dropout must be in [0, 1), got {config['lora_dropout']}")
        if config["lora_bias"] and (config["use_dora"] or target.kind == "embedding"):
            raise AdaptkitError(f"{path}: lora_bias works on linear layers without DoRA (as in PEFT)")
        scaling = alpha / math.sqrt(r) if config["use_rslora"] else alpha / r
        return {"r": r, "alpha": alpha, "scaling": scaling, "dropout": float(config["lora_dropout"]),
                "use_dora": bool(config["use_dora"]), "init": config["init_lora_weights"],
                "bias": bool(config["lora_bias"]), "alora": _alora.check_settings(config, path, target, self)}

    def create(self, target, settings, weight, shared):
        plane = _tokens if settings.get("tokens") else _tensors if settings.get("parts") else _module()
        return plane.create(target, settings, weight, trainable_a=not self.freeze_a)

    def forward(self, branch, base_layer, x, result):
        if branch.settings.get("alora"):
            return _alora.forward(branch, x, result)
        return (_tokens if branch.settings.get("tokens") else _module()).forward(branch, base_layer, x, result)

    def weight_delta(self, branch, weight):
        _alora.refuse_merge({_alora.KEY: branch.settings.get("alora")})
        return (_tokens if branch.settings.get("tokens") else _module()).weight_delta(branch, weight)

    def delta_needs_base(self, branch) -> bool:  # DoRA, and trainable tokens (rows replaced)
        return "lora_magnitude_vector" in branch.params or _tokens.ROLE in branch.params

    def bias_delta(self, branch, bias):  # s·β when B has a bias (`lora_bias`)
        return _module().bias_delta(branch)

    def resident(self, branch):  # PiSSA's −s·B₀·A₀ inside W
        return _module().resident(branch)

    def stored_key(self, role: str, target) -> str:
        named = {"lora_B_bias": "lora_B.bias", _tokens.ROLE: _tokens.STORED}
        found = named.get(role) or (f"{role}.weight" if role in ("lora_A", "lora_B") else role)
        return _tensors.stored_key(role, target) if target.kind == "tensors" else found

    def save_tensors(self, branch) -> dict[str, torch.Tensor]:  # PiSSA: see _lora_module.save_tensors
        return (_tokens if branch.settings.get("tokens") else _module()).save_tensors(branch)

    def file_config(self, config: dict[str, Any], settings: dict[str, dict], transposed: bool) -> dict[str, Any]:
        pissa = config["init_lora_weights"] == "pissa"
        settings = _tensors.by_module(settings)  # a parameter's rank and alpha under its own path, as PEFT's
        ranks = {m: s["r"] * (2 if pissa else 1) for m, s in settings.items() if not s.get("tokens")}
        root = math.sqrt if config["use_rslora"] else float
        alphas = {m: settings[m]["scaling"] * root(ranks[m]) for m in ranks}  # same scaling at the saved rank
        found = {"peft_type": "LORA", **rank_config(ranks, alphas), "lora_dropout": config["lora_dropout"],
                 "use_rslora": bool(config["use_rslora"]), "use_dora": bool(config["use_dora"]),
                 "fan_in_fan_out": transposed, "init_lora_weights": True, "bias": "none",
                 "lora_bias": bool(config["lora_bias"])}
        if config[_alora.KEY]:  # PEFT runs it in its causal-LM model only: the format writes the task type
            found[_alora.KEY] = list(config[_alora.KEY])
        if config[_tokens.KEY]:  # {embedding: ids}, and target_modules without the tokens layers
            found |= _tokens.file_config(settings)
        found |= _tensors.file_config(settings)
        if self.name != "lora":
            found["adaptkit_variant"] = self.name
        if self.lr_ratio:
            found["loraplus_lr_ratio"] = config["loraplus_lr_ratio"]
        return found

    def config_from_file(self, adapter: AdapterFiles) -> dict[str, Any]:
        cfg = adapter.config
        refuse_live(adapter)  # Tucker LoCon: merged (tensor plane) only
        found = {"r": cfg.get("r", 8), "lora_alpha": cfg.get("lora_alpha", cfg.get("r", 8)),
                 "lora_dropout": cfg.get("lora_dropout", 0.0), "use_rslora": bool(cfg.get("use_rslora")),
                 "use_dora": bool(cfg.get("use_dora")), "rank_pattern": cfg.get("rank_pattern") or {},
                 "alpha_pattern": cfg.get("alpha_pattern") or {}, "lora_bias": bool(cfg.get("lora_bias")),
                 _alora.KEY: cfg.get(_alora.KEY), **_tokens.from_file(adapter),
                 "target_parameters": cfg.get("target_parameters")}
        if self.lr_ratio:
            found["loraplus_lr_ratio"] = cfg.get("loraplus_lr_ratio", self.lr_ratio)
        return found

    def param_groups(self, named: list[tuple[str, Any]], lr: float, config: dict[str, Any]) -> list[dict]:
        return _module().param_groups(named, lr, config)  # LoRA+: B faster


def _module():
    from . import _lora_module  # torch-heavy: imported on first use, so `inspect` stays torch-free

    return _lora_module


LORA = LoRA()
LORA_FA = LoRA("lora_fa", freeze_a=True,
               about="LoRA-FA: LoRA with A random and frozen; only B trains, and less activation memory is kept.")
LORA_PLUS = LoRA("lora_plus", lr_ratio=16.0,
                 about="LoRA+: LoRA with B's learning rate loraplus_lr_ratio × A's (default 16).")
