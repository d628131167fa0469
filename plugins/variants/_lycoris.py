"""What the LyCORIS variants (LoHa, LoKr) share (not a plugin; used by `loha.py` and `lokr.py`): PEFT's
`LycorisConfig` fields, the scaling s = alpha / r per module, ΔW from stored tensors, and the module
plane around a variant's `product` (its unscaled ΔW from a layer's tensors) and `initial` (its tensors
at the start). The algebra itself is `_lycoris_math.py` (torch, imported on first use).

Config (PEFT's LoHaConfig / LoKrConfig): `r`, `alpha` (defaults 8, 8), `rank_pattern` / `alpha_pattern`
(PEFT's rule: a pattern matches a path ending in `.<pattern>`), `rank_dropout` (whole rows of ΔW dropped
while training), `module_dropout` (the whole branch skipped while training), `use_effective_conv2d`
(Tucker cores for conv layers with a kernel above 1), `init_weights`. Files read from LyCORIS/kohya
single files carry `dora_scale` (LyCORIS's weight decomposition) as a role; merging those needs the base.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from adaptkit.plugin import AdapterFiles, AdaptkitError, registry
from adaptkit.plugin import validate as v

from ..formats._lowrank import pattern_value, patterns

if TYPE_CHECKING:
    import torch

COMMON_TYPES = {"r": v.positive_int, "alpha": v.number, "rank_dropout": v.fraction, "module_dropout": v.fraction,
                "use_effective_conv2d": v.flag, "rank_pattern": v.optional(v.patterns(v.positive_int)),
                "alpha_pattern": v.optional(v.patterns(v.number))}
COMMON_DEFAULTS = {"r": 8, "alpha": 8, "rank_dropout": 0.0, "module_dropout": 0.0, "use_effective_conv2d": False,
                   "init_weights": True, "rank_pattern": {}, "alpha_pattern": {}}


def math():
    from . import _lycoris_math  # torch-heavy: imported on first use, so `inspect` stays torch-free

    return _lycoris_math


class LycorisVariant:
    """The shared part of LoHa and LoKr; subclasses give `name`, `peft_type`, `roles`, `tucker_role` (the
    tensor only Tucker layouts have), `product` and `initial`."""

    name: str
    peft_type: str
    roles: tuple[str, ...]
    tucker_role: str
    extra_types: dict[str, Any] = {}
    extra_defaults: dict[str, Any] = {}
    inspect_rows = ("alpha", "scaling")

    @property
    def param_names(self) -> tuple[str, ...]:
        return (*self.roles, "dora_scale")

    @property
    def config_types(self) -> dict[str, Any]:
        return {**COMMON_TYPES, **self.extra_types}

    @property
    def config_keys(self) -> frozenset[str]:
        return frozenset(self.defaults)

    @property
    def defaults(self) -> dict[str, Any]:
        return {**COMMON_DEFAULTS, **self.extra_defaults}

    # -- tensor plane --------------------------------------------------------------------------
    def module_rank(self, adapter: AdapterFiles, module: str) -> int:
        return int(pattern_value(adapter.config.get("rank_pattern"), module, adapter.config.get("r", 8)))

    def module_alpha(self, adapter: AdapterFiles, module: str) -> float:
        return float(pattern_value(adapter.config.get("alpha_pattern"), module, adapter.config.get("alpha", 8)))

    def scaling(self, adapter: AdapterFiles, module: str) -> float:
        """s = alpha / r, both from the config (PEFT's rule; not from the tensors' shapes)."""
        return self.module_alpha(adapter, module) / self.module_rank(adapter, module)

    def check_roles(self, roles, module: str) -> None:
        """Raises for a module whose tensors do not make one ΔW (see `product`)."""

    def delta(self, adapter: AdapterFiles, module: str, base: torch.Tensor | None = None) -> torch.Tensor:
        """s · product, reshaped to the base weight when it is given (else as it comes: out × in, conv layers
        without Tucker cores out × in·kh·kw); with `dora_scale`, LyCORIS's weight decomposition on top."""
        roles = adapter.modules[module]
        self.check_roles(roles, module)
        tensors = {role: adapter.tensor(module, role).float() for role in roles}
        # LyCORIS's single files (the kohya format) follow LyCORIS's algebra where it differs from PEFT's
        update = self.product(tensors, lycoris=adapter.format == "kohya") * self.scaling(adapter, module)
        if base is not None:
            update = math().fit(update, base.shape, module)
        elif update.dim() == 2 and self.flat_kernel(adapter, module):
            raise AdaptkitError(f"module {module} is a convolution whose kernel shape the file does not record "
                                "(stored flattened): pass --base (a recipe's base_model)")
        if "dora_scale" not in tensors:
            return update
        if base is None:
            raise AdaptkitError(f"{module}: a {self.name} module with dora_scale (weight decomposition) rescales the "
                                "merged weight; give the base model")
        return math().decompose(update, base.float(), tensors["dora_scale"])

    def flat_kernel(self, adapter: AdapterFiles, module: str) -> bool:
        """Whether the module's tensors show it is a convolution whose kernel they hold flattened (the core refuses
        a module named as one without a base either way)."""
        return False

    def factor_layout(self, adapter: AdapterFiles, module: str) -> dict[str, bool]:
        """ΔW lies as the base weight (PEFT's LoHa and LoKr adapt nn.Linear and convolutions, never Conv1D)."""
        return {"embedding": False, "transposed": False}

    def write_lowrank(self, factors, layouts, template: dict[str, Any], out_dir) -> list:
        """Adapters merged into one are re-factored by SVD (no exact LoHa/LoKr form of a sum): the output is a
        plain adapter of the canonical low-rank variant."""
        return registry.get("variant", registry.default("variant")).write_lowrank(factors, layouts, template, out_dir)

    def describe(self, adapter: AdapterFiles) -> dict[str, Any]:
        per_module = {m: {"rank": self.module_rank(adapter, m), "alpha": self.module_alpha(adapter, m),
                          "scaling": self.scaling(adapter, m), "tensors": sorted(adapter.modules[m]),
                          "dora": "dora_scale" in adapter.modules[m]} for m in sorted(adapter.modules)}
        ranks = sorted({m["rank"] for m in per_module.values()})
        return {"rank": ranks[0] if len(ranks) == 1 else None, "ranks": ranks, "alpha": adapter.config.get("alpha"),
                "scaling": sorted({m["scaling"] for m in per_module.values()}), "modules": per_module}

    # -- module plane --------------------------------------------------------------------------
    def settings(self, config: dict[str, Any], path: str, target) -> dict[str, Any]:
        shape = math().layer_shape(path, target, self.name)
        r = pattern_value(config["rank_pattern"], path, config["r"])
        alpha = pattern_value(config["alpha_pattern"], path, config["alpha"])
        kernel = shape[2:]
        return {"r": r, "alpha": float(alpha), "scaling": float(alpha) / r, "shape": shape,
                "tucker": bool(config["use_effective_conv2d"]) and any(k != 1 for k in kernel),
                "rank_dropout": float(config["rank_dropout"]), "module_dropout": float(config["module_dropout"]),
                "rank_dropout_scale": self.rescales(config), "init": config["init_weights"], **self.layer_settings(config)}

    def rescales(self, config: dict[str, Any]) -> bool:
        """Whether rank dropout rescales the kept rows by 1 / their share (LoHa always)."""
        return True

    def layer_settings(self, config: dict[str, Any]) -> dict[str, Any]:
        return {}

    def create(self, target, settings, weight, shared):
        from torch import nn

        tensors = self.initial(settings)
        return nn.ParameterDict({role: nn.Parameter(t.to(weight.device)) for role, t in tensors.items()})

    def weight_delta(self, branch, weight: torch.Tensor) -> torch.Tensor:
        """ΔW shaped like the base weight, float32."""
        p = {k: t.float() for k, t in branch.params.items()}
        return math().fit(self.product(p) * branch.settings["scaling"], weight.shape, self.name)

    def forward(self, branch, base_layer, x, result):
        update = self.product(branch.params) * branch.settings["scaling"]
        return math().run(branch, base_layer, x, result, update.reshape(base_layer.weight.shape))

    def stored_key(self, role: str, target) -> str:
        return role

    def file_config(self, config: dict[str, Any], settings: dict[str, dict], transposed: bool) -> dict[str, Any]:
        ranks = {m: s["r"] for m, s in settings.items()}
        alphas = {m: s["alpha"] for m, s in settings.items()}
        found = {key: config[key] for key in self.defaults if key not in ("rank_pattern", "alpha_pattern")}
        return {**found, "peft_type": self.peft_type, "rank_pattern": patterns(ranks, config["r"]),
                "alpha_pattern": patterns(alphas, config["alpha"])}

    def config_from_file(self, adapter: AdapterFiles) -> dict[str, Any]:
        cfg = adapter.config
        if any("dora_scale" in roles for roles in adapter.modules.values()):
            raise AdaptkitError(f"{adapter.store.root}: {self.name} modules with dora_scale (LyCORIS weight "
                                "decomposition) can be merged but not loaded onto a live model")
        found = {key: cfg.get(key, default) if cfg.get(key) is not None else default
                 for key, default in self.defaults.items()}
        # A LyCORIS file's config (the kohya format) states ranks and alphas only: its layout comes from its tensors
        return {**found, **{k: v for k, v in self.layout_of(adapter).items() if cfg.get(k) is None}}

    def layout_of(self, adapter: AdapterFiles) -> dict[str, Any]:
        """Config flags the stored tensors imply (Tucker cores: `use_effective_conv2d`)."""
        return {"use_effective_conv2d": any(self.tucker_role in roles for roles in adapter.modules.values())}
