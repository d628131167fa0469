"""VeRA: vector-based random matrix adaptation (Kopiczko et al. 2024, arXiv 2310.11454).

One pair of frozen random matrices A (r × max_in) and B (max_out × r), sized by the largest input
and output of the targeted layers, is shared by every adapted layer; layer l (in_l → out_l) trains
two vectors only, b_l (out_l, starts at 0) and d_l (r, starts at `d_initial`, 0.1):

    ΔW_l = diag(b_l) · B[:out_l, :] · diag(d_l) · A[:, :in_l]
    y    = W·x + b_l ⊙ (B[:out_l] · (d_l ⊙ (A[:, :in_l] · dropout(x))))

A and B come from `projection_prng_key` bit for bit as PEFT draws them: a CPU torch.Generator seeded
with the key fills A, then B, Kaiming-uniform (bound √6/√fan_in). `init_weights=False` starts b at 1
and d ~ N(0, 1) (torch's global RNG), as PEFT does. Linear and Conv1D layers only.

Files: PEFT's VERA folder: per layer `<module>.vera_lambda_b` / `.vera_lambda_d`, once
`base_model.vera_A` / `base_model.vera_B` when `save_projection` (else regenerated from the key).
ΔW needs each layer's input size, which PEFT's files do not hold: adaptkit records
`adaptkit_in_features` (PEFT ignores it with a warning) when a layer is narrower than A or A is not
saved; without it (PEFT's own files) `delta` takes the size from the base weight given, else A's width.
Export: ΔW_l = B_l·A_l, A_l = diag(d_l)·A[:, :in_l], B_l = diag(b_l)·B[:out_l], an exact LoRA of rank r
at scale 1: `factors` feeds adapter merges (`concat`, SVD), `adaptkit convert --to lora` writes a PEFT LoRA folder.

One projection per model (PEFT's rule): all VeRA adapters on one live model share one
`projection_prng_key`, so combining them there (active together, merged together, hot-swapped) never
needs two projections: a second key is refused when an adapter is injected or loaded, and a
hot-swapped adapter with another key refuses to run, merge or save. Adapter → adapter merges
(`concat`, SVD) form each input's factors from its own A and B and write a plain LoRA, so inputs
with different keys merge there exactly.
"""
from __future__ import annotations

import math
from typing import Any

from adaptkit.plugin import AdapterFiles, AdaptkitError, registry
from adaptkit.plugin import validate as v

VERA_CONFIG_KEYS = frozenset({"r", "projection_prng_key", "save_projection", "vera_dropout", "d_initial",
                              "fan_in_fan_out", "bias", "init_weights", "adaptkit_in_features"})
OWN_KEYS = VERA_CONFIG_KEYS - {"r", "fan_in_fan_out", "bias"}  # dropped when written as plain LoRA


def projections(key: int, r: int, max_in: int, max_out: int):
    """(A, B) as PEFT's VeraModel draws them from `projection_prng_key` (bit for bit)."""
    import torch

    generator = torch.Generator(device="cpu").manual_seed(key)
    a_bound, b_bound = (math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(fan_in)) for fan_in in (max_in, r))  # PEFT's order
    a = torch.empty(r, max_in).uniform_(-a_bound, a_bound, generator=generator)
    return a, torch.empty(max_out, r).uniform_(-b_bound, b_bound, generator=generator)


class VeRA:
    """VeRA: shared frozen random A, B; trained per-layer scaling vectors b and d (arXiv 2310.11454)."""

    name = "vera"
    param_names = ("vera_lambda_b", "vera_lambda_d", "vera_A", "vera_B")
    config_keys = VERA_CONFIG_KEYS
    inspect_rows = ("fan_in_fan_out",)
    config_types = {"r": v.optional(v.positive_int), "projection_prng_key": v.integer, "save_projection": v.flag,
                    "vera_dropout": v.fraction, "d_initial": v.number, "init_weights": v.flag,
                    "fan_in_fan_out": v.optional(v.flag), "adaptkit_in_features": v.optional(v.map_of(v.positive_int))}
    defaults = {"r": 256, "projection_prng_key": 0, "save_projection": True, "vera_dropout": 0.0, "d_initial": 0.1,
                "init_weights": True}

    # -- tensor plane --------------------------------------------------------------------------
    def rank(self, adapter: AdapterFiles) -> int:
        return int(adapter.config.get("r") or adapter.shape(next(iter(adapter.modules)), "vera_lambda_d")[0])

    def matrices(self, adapter: AdapterFiles):
        """(A, B) in float32: the saved ones, or regenerated from the key at the recorded sizes."""
        if "vera_A" in adapter.shared and "vera_B" in adapter.shared:
            return adapter.shared_tensor("vera_A").float(), adapter.shared_tensor("vera_B").float()
        ins = adapter.config.get("adaptkit_in_features")
        if not ins:
            raise AdaptkitError(f"{adapter.store.root}: VeRA adapter saved without its projections (save_projection: "
                                "false) and without the layers' input sizes; load it onto its base model with adaptkit "
                                "and save it again")
        n_out = max(adapter.shape(m, "vera_lambda_b")[0] for m in adapter.modules)
        return projections(int(adapter.config.get("projection_prng_key", 0)), self.rank(adapter), max(ins.values()), n_out)

    def describe(self, adapter: AdapterFiles) -> dict[str, Any]:
        cfg, r, ins = adapter.config, self.rank(adapter), adapter.config.get("adaptkit_in_features") or {}
        saved = {"vera_A", "vera_B"} <= set(adapter.shared)
        n_in, n_out = (adapter.store.info(adapter.shared[k]).shape[i] for k, i in (("vera_A", 1), ("vera_B", 0))) \
            if saved else (None, None)
        return {"rank": r, "ranks": [r], "projection_prng_key": cfg.get("projection_prng_key"), "projection_saved": saved,
                "projection_shape": {"A": [r, n_in], "B": [n_out, r]} if saved else None, "d_initial": cfg.get("d_initial"),
                "fan_in_fan_out": bool(cfg.get("fan_in_fan_out")), "layers": len(adapter.modules),
                "modules": {m: {"rank": r, "out_features": adapter.shape(m, "vera_lambda_b")[0],
                                "in_features": ins.get(m, n_in)} for m in sorted(adapter.modules)}}

    def factors(self, adapter: AdapterFiles, module: str, base=None):
        """(A_l, B_l, 1.0) in float32 with ΔW = B_l·A_l (before the `fan_in_fan_out` transpose):
        A_l = diag(d)·A[:, :in], B_l = diag(b)·B[:out], exactly rank r."""
        a, b = self.matrices(adapter)
        lam_b, lam_d = adapter.tensor(module, "vera_lambda_b").float(), adapter.tensor(module, "vera_lambda_d").float()
        n_in = base.shape[0 if adapter.transposed.get(module) else 1] if base is not None else \
            (adapter.config.get("adaptkit_in_features") or {}).get(module, a.shape[1])
        if n_in > a.shape[1] or lam_b.shape[0] > b.shape[0] or lam_d.shape[0] != a.shape[0]:
            raise AdaptkitError(f"{module}: VeRA vectors (b {lam_b.shape[0]}, d {lam_d.shape[0]}) and input size {n_in} do "
                                f"not fit the shared A {tuple(a.shape)} and B {tuple(b.shape)}")
        return lam_d[:, None] * a[:, :n_in], lam_b[:, None] * b[:lam_b.shape[0]], 1.0

    def factor_layout(self, adapter: AdapterFiles, module: str) -> dict[str, bool]:
        return {"embedding": False, "transposed": adapter.transposed.get(module, False)}

    def delta(self, adapter: AdapterFiles, module: str, base=None):
        a, b, _ = self.factors(adapter, module, base)
        return (b @ a).T if adapter.transposed.get(module) else b @ a

    def write_lowrank(self, factors, layouts, template: dict[str, Any], out_dir) -> list:
        """Merged factors share no projection: the output is a plain adapter of the canonical low-rank variant."""
        plain = {k: v for k, v in template.items() if k not in OWN_KEYS}
        return registry.get("variant", registry.default("variant")).write_lowrank(factors, layouts, plain, out_dir)

    def prepare(self, model, config: dict[str, Any]) -> dict[str, Any]:
        """Refuse a second projection key on the model; size A and B over all targeted layers."""
        from adaptkit.plugin import Adapters, find_targets

        for other in Adapters.of(model).adapters.values():
            if other.variant.name == self.name and other.config["projection_prng_key"] != config["projection_prng_key"]:
                raise AdaptkitError(f"VeRA adapter '{other.name}' on this model uses projection_prng_key "
                                    f"{other.config['projection_prng_key']}; all VeRA adapters on one model share its "
                                    f"projections, so key {config['projection_prng_key']!r} cannot join (remove it first)")
        if config["target_modules"] is None:
            return config
        targets = find_targets(model, config["target_modules"], exclude_modules=config["exclude_modules"],
                               layers_to_transform=config["layers_to_transform"], layers_pattern=config["layers_pattern"])
        linear = [t for t in targets.values() if t.kind == "linear"]
        shape = (max(t.in_features for t in linear), max(t.out_features for t in linear)) if linear else None
        return {**config, "projection_shape": shape}

    def settings(self, config: dict[str, Any], path: str, target) -> dict[str, Any]:
        if target.kind != "linear":
            raise AdaptkitError(f"{path}: VeRA adapts linear layers (nn.Linear, Conv1D) only, not a {target.kind}; "
                                "leave it out of target_modules")
        r, key = config["r"], config["projection_prng_key"]
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise AdaptkitError(f"VeRA r must be a positive integer, got {r!r}")
        if isinstance(key, bool) or not isinstance(key, int):
            raise AdaptkitError(f"projection_prng_key must be an integer, got {key!r}")
        if not 0 <= config["vera_dropout"] < 1:
            raise AdaptkitError(f"vera_dropout must be in [0, 1), got {config['vera_dropout']}")
        found = {"r": r, "key": key, "dropout": float(config["vera_dropout"]), "d_initial": float(config["d_initial"]),
                 "init": bool(config["init_weights"]), "save_projection": bool(config["save_projection"]),
                 "in_features": target.in_features}
        if config.get("projection_shape"):
            found["projection_shape"] = tuple(config["projection_shape"])
        return found

    def create(self, target, settings, weight, shared):
        """b and d of this layer, plus the adapter's A and B (created by its first layer, frozen). Unsaved
        projections are attributes of `shared`, not entries: the entries are what gets saved."""
        import torch
        from torch import nn

        if getattr(shared, "vera_A", None) is None:
            a, b = projections(settings["key"], settings["r"], *settings["projection_shape"])
            for role, t in (("vera_A", a), ("vera_B", b)):
                param = nn.Parameter(t.to(weight.device), requires_grad=False)
                if settings["save_projection"]:
                    shared[role] = param
                else:
                    setattr(shared, role, param)  # a parameter of `shared`, but not one of its (saved) entries
        settings["projection_key"] = settings["key"]  # what A and B were drawn with (a hot-swap must match)
        r, n_out = settings["r"], target.out_features
        lam_b = torch.zeros(n_out) if settings["init"] else torch.ones(n_out)
        lam_d = torch.full((r,), settings["d_initial"]) if settings["init"] else torch.randn(r)
        return nn.ParameterDict({"vera_lambda_b": nn.Parameter(lam_b.to(weight.device)),
                                 "vera_lambda_d": nn.Parameter(lam_d.to(weight.device)),
                                 "vera_A": getattr(shared, "vera_A"), "vera_B": getattr(shared, "vera_B")})

    @staticmethod
    def _parts(branch):
        s, p = branch.settings, branch.params
        if s["key"] != s["projection_key"]:
            raise AdaptkitError(f"this VeRA adapter's projections come from projection_prng_key {s['projection_key']}, "
                                f"not {s['key']}: a hot-swap must keep the key (remove the adapter and load it instead)")
        return p["vera_A"][:, :branch.target.in_features], p["vera_B"][:branch.target.out_features], p

    def forward(self, branch, base_layer, x, result):
        import torch.nn.functional as F

        a, b, p = self._parts(branch)
        dropout = branch.settings["dropout"]
        dropped = F.dropout(x, dropout, branch.training) if dropout else x
        hidden = p["vera_lambda_d"] * F.linear(dropped.to(p["vera_lambda_d"].dtype), a)
        return result + (p["vera_lambda_b"] * F.linear(hidden, b)).to(result.dtype)

    def weight_delta(self, branch, weight):
        a, b, p = self._parts(branch)
        return (p["vera_lambda_b"].float()[:, None] * b.float()) @ (p["vera_lambda_d"].float()[:, None] * a.float())

    def stored_key(self, role: str, target) -> str:
        return role

    def save_tensors(self, branch):
        """Only b and d: A and B are saved once, from the adapter's shared tensors."""
        self._parts(branch)
        return {k: branch.params[k].detach() for k in ("vera_lambda_b", "vera_lambda_d")}

    def file_config(self, config: dict[str, Any], settings: dict[str, dict], transposed: bool) -> dict[str, Any]:
        found = {"peft_type": "VERA", **{k: config[k] for k in self.defaults}, "fan_in_fan_out": transposed, "bias": "none"}
        ins = {m: s["in_features"] for m, s in sorted(settings.items())}
        widest = max((s["projection_shape"][0] for s in settings.values()), default=0)
        if not config["save_projection"] or any(n != widest for n in ins.values()):
            found["adaptkit_in_features"] = ins
        return found

    def config_from_file(self, adapter: AdapterFiles) -> dict[str, Any]:
        cfg = adapter.config
        if cfg.get("save_projection", True) and not {"vera_A", "vera_B"} <= set(adapter.shared):
            raise AdaptkitError(f"{adapter.store.root}: the config says save_projection but base_model.vera_A / "
                                "base_model.vera_B are missing from the file")
        return {"r": self.rank(adapter), "projection_prng_key": cfg.get("projection_prng_key", 0),
                "save_projection": cfg.get("save_projection", True), "vera_dropout": cfg.get("vera_dropout", 0.0),
                "d_initial": cfg.get("d_initial", 0.1), "init_weights": cfg.get("init_weights", True)}


VERA = VeRA()
