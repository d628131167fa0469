"""Tied-LoRA: one low-rank pair shared across layers, scaled per layer (Renduchintala et al. 2023, arXiv 2311.09578).

Every targeted layer of one shape (d_in → d_out) shares A (r × d_in) and B (d_out × r); layer l
has its own vectors u_l (r) and v_l (d_out):

    ΔW_l = s · diag(v_l) · B · diag(u_l) · A,    s = lora_alpha / r
    y    = W·x + s · v_l ⊙ (B · (u_l ⊙ (A · dropout(x))))

`train` says what trains, in the paper's notation: four letters in the order v, B, u, A, uppercase
trained and lowercase frozen ("VBUA" everything, "vBuA" the tied A and B only, "vbuA", "VbUa", …;
any of the 15 with at least one trained factor). ΔW starts at 0 and can move: the first trained
factor in the order B, v, u, A starts at zero; A and B are otherwise Kaiming-uniform (a = √5),
u and v ones (torch's global RNG, as LoRA).

Files: PEFT's layout under adaptkit's name (`adaptkit_variant: tied_lora`, no `peft_type`: PEFT
lacks the variant). Per layer `<module>.tied_u` and `<module>.tied_v`; each shape group g once, as
`base_model.tied_A_<g>` and `base_model.tied_B_<g>` (numbered, since the reader splits keys by a
fixed list of roles), with `tied_groups` in the config giving each group's shape and modules.
Export to plain LoRA is exact, A_l = diag(u_l)·A and B_l = diag(v_l)·B: `adaptkit convert --to lora` keeps r and
lora_alpha; the `factors` hooks let adapter → adapter merges (`concat`) take Tied-LoRA inputs.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import TYPE_CHECKING, Any

from adaptkit.plugin import AdapterFiles, AdaptkitError, registry
from adaptkit.plugin import validate as v

if TYPE_CHECKING:
    import torch

MAX_GROUPS = 64  # layer shapes per adapter (roles tied_A_0 … tied_A_63)
EXAMPLES = '"VBUA" (all trained), "vBuA" (tied A and B), "vbuA", "VbUa"'
OWN_KEYS = ("adaptkit_variant", "train", "tied_groups")


def parse_train(train: Any) -> dict[str, bool]:
    """'vBuA' -> {'v': False, 'B': True, 'u': False, 'A': True}: uppercase trains."""
    if not isinstance(train, str) or len(train) != 4 or train.lower() != "vbua":
        raise AdaptkitError(f"train must be 4 letters in the order v, B, u, A (uppercase trained, lowercase frozen), "
                            f"e.g. {EXAMPLES}; got {train!r}")
    flags = {k: c.isupper() for k, c in zip("vBuA", train)}
    if not any(flags.values()):
        raise AdaptkitError(f"train {train!r} trains nothing; make at least one letter uppercase, e.g. {EXAMPLES}")
    return flags


def plain_config(config: dict[str, Any]) -> dict[str, Any]:
    """A Tied-LoRA config without its own keys, as the start of a plain LoRA config."""
    return {k: v for k, v in config.items() if k not in OWN_KEYS}


class TiedLoRA:
    """Tied-LoRA: A and B shared by layers of one shape, per-layer vectors u and v (arXiv 2311.09578)."""

    name = "tied_lora"
    param_names = ("tied_u", "tied_v", *(f"tied_{f}_{g}" for f in "AB" for g in range(MAX_GROUPS)))
    config_keys = frozenset({"r", "lora_alpha", "lora_dropout", "train", "fan_in_fan_out", "tied_groups"})
    inspect_rows = ("alpha", "scaling", "fan_in_fan_out")
    config_types = {"r": v.optional(v.positive_int), "lora_alpha": v.number, "lora_dropout": v.fraction,
                    "fan_in_fan_out": v.optional(v.flag),
                    "tied_groups": v.optional(v.list_of(v.record({
                        "modules": v.list_of(v.text), "in_features": v.positive_int, "out_features": v.positive_int})))}
    defaults = {"r": 8, "lora_alpha": 8, "lora_dropout": 0.0, "train": "VBUA", "tied_groups": None}

    # -- tensor plane --------------------------------------------------------------------------
    def groups(self, adapter: AdapterFiles) -> dict[int, tuple[int, int]]:
        """Shape group -> (d_in, d_out), from the shared tensors' shapes (headers only)."""
        found = {}
        for role in adapter.shared:
            if role.startswith("tied_A_"):
                g = int(role[len("tied_A_"):])
                found[g] = (adapter.store.info(adapter.shared[role]).shape[1],
                            adapter.store.info(self._key(adapter, f"tied_B_{g}")).shape[0])
        return dict(sorted(found.items()))

    @staticmethod
    def _key(adapter: AdapterFiles, role: str) -> str:
        if role not in adapter.shared:
            raise AdaptkitError(f"Tied-LoRA adapter lacks its shared tensor base_model.{role}")
        return adapter.shared[role]

    def group_of(self, adapter: AdapterFiles, module: str) -> int:
        for g, entry in enumerate(adapter.config.get("tied_groups") or []):
            if module in entry.get("modules", ()):
                return g
        d_out = adapter.shape(module, "tied_v")[0]  # not listed: the one group of its output size
        found = [g for g, (_, out) in self.groups(adapter).items() if out == d_out]
        if len(found) != 1:
            raise AdaptkitError(f"{module}: cannot tell which tied A/B it uses (tied_groups does not list it)")
        return found[0]

    def rank(self, adapter: AdapterFiles) -> int:
        return int(adapter.config.get("r") or adapter.store.info(self._key(adapter, "tied_A_0")).shape[0])

    def scaling(self, adapter: AdapterFiles) -> float:
        return float(adapter.config.get("lora_alpha", self.rank(adapter))) / self.rank(adapter)

    def describe(self, adapter: AdapterFiles) -> dict[str, Any]:
        cfg, r, s = adapter.config, self.rank(adapter), self.scaling(adapter)
        member = {m: self.group_of(adapter, m) for m in sorted(adapter.modules)}
        count = Counter(member.values())
        return {"rank": r, "ranks": [r], "alpha": cfg.get("lora_alpha"), "scaling": s, "train": cfg.get("train", "VBUA"),
                "fan_in_fan_out": bool(cfg.get("fan_in_fan_out")), "layers": len(adapter.modules),
                "shape_groups": [{"group": g, "in_features": i, "out_features": o, "layers": count[g]}
                                 for g, (i, o) in self.groups(adapter).items()],
                "modules": {m: {"rank": r, "alpha": cfg.get("lora_alpha"), "scaling": s, "group": g}
                            for m, g in member.items()}}

    def factors(self, adapter: AdapterFiles, module: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A_l, B_l, s) in float32 with ΔW = s·B_l·A_l: A_l = diag(u)·A, B_l = diag(v)·B."""
        g = self.group_of(adapter, module)
        a = adapter.store.get(self._key(adapter, f"tied_A_{g}")).float()
        b = adapter.store.get(self._key(adapter, f"tied_B_{g}")).float()
        u, v = adapter.tensor(module, "tied_u").float(), adapter.tensor(module, "tied_v").float()
        return u[:, None] * a, v[:, None] * b, self.scaling(adapter)

    def factor_layout(self, adapter: AdapterFiles, module: str) -> dict[str, bool]:
        return {"embedding": False, "transposed": adapter.transposed.get(module, False)}

    def delta(self, adapter: AdapterFiles, module: str, base: torch.Tensor | None = None) -> torch.Tensor:
        a, b, s = self.factors(adapter, module)
        update = s * (b @ a)
        return update.T if adapter.transposed.get(module) else update

    def write_lowrank(self, factors, layouts, template: dict[str, Any], out_dir) -> list:
        """Merged factors are no longer tied: the output is a plain adapter of the canonical low-rank variant."""
        lowrank = registry.get("variant", registry.default("variant"))
        return lowrank.write_lowrank(factors, layouts, plain_config(template), out_dir)

    def settings(self, config: dict[str, Any], path: str, target) -> dict[str, Any]:
        if target.kind != "linear":
            raise AdaptkitError(f"{path}: Tied-LoRA adapts linear layers only; leave embeddings out of target_modules")
        r, alpha, shape = int(config["r"]), float(config["lora_alpha"]), (target.in_features, target.out_features)
        if not 0 < r <= min(shape):
            raise AdaptkitError(f"{path}: rank {r} does not fit a {shape[1]} × {shape[0]} layer (1 to {min(shape)})")
        if not 0 <= config["lora_dropout"] < 1:
            raise AdaptkitError(f"lora_dropout must be in [0, 1), got {config['lora_dropout']}")
        group = None  # chosen by `create` (first free or same-shape group) unless the config fixes it
        if config["tied_groups"]:
            listed = [(e["in_features"], e["out_features"]) for e in config["tied_groups"]]
            if shape not in listed:
                raise AdaptkitError(f"{path}: tied_groups has no group for a {shape[0]} → {shape[1]} layer")
            group = listed.index(shape)
        return {"r": r, "alpha": alpha, "scaling": alpha / r, "dropout": float(config["lora_dropout"]),
                "train": config["train"], "flags": parse_train(config["train"]), "shape": shape, "group": group}

    def create(self, target, settings, weight, shared):
        """u, v of this layer, plus its group's shared A and B (the same Parameters in every layer of the
        group, created by the group's first layer). Records the group in `settings` for saving."""
        import torch
        from torch import nn

        r, flags, (n_in, n_out), g = settings["r"], settings["flags"], settings["shape"], settings["group"]
        if g is None:
            g = 0
            while f"tied_A_{g}" in shared and (shared[f"tied_A_{g}"].shape[1], shared[f"tied_B_{g}"].shape[0]) != (n_in, n_out):
                g += 1
        if g >= MAX_GROUPS:
            raise AdaptkitError(f"Tied-LoRA supports up to {MAX_GROUPS} layer shapes per adapter; target fewer modules")
        settings["group"] = g
        zero = next(k for k in "BvuA" if flags[k])  # the first trained factor starts at 0, so ΔW = 0

        def param(t: torch.Tensor, trained: bool) -> nn.Parameter:
            return nn.Parameter(t.to(weight.device), requires_grad=trained)

        if f"tied_A_{g}" not in shared:
            a, b = torch.empty(r, n_in), torch.empty(n_out, r)
            for t, k in ((a, "A"), (b, "B")):
                if zero == k:
                    nn.init.zeros_(t)
                else:
                    nn.init.kaiming_uniform_(t, a=math.sqrt(5))
            shared[f"tied_A_{g}"], shared[f"tied_B_{g}"] = param(a, flags["A"]), param(b, flags["B"])
        u = torch.zeros(r) if zero == "u" else torch.ones(r)
        v = torch.zeros(n_out) if zero == "v" else torch.ones(n_out)
        return nn.ParameterDict({"tied_u": param(u, flags["u"]), "tied_v": param(v, flags["v"]),
                                 "tied_A": shared[f"tied_A_{g}"], "tied_B": shared[f"tied_B_{g}"]})

    def forward(self, branch, base_layer, x, result):
        import torch.nn.functional as F

        s, p = branch.settings, branch.params
        dropped = F.dropout(x, s["dropout"], branch.training) if s["dropout"] else x
        hidden = F.linear(dropped.to(p["tied_A"].dtype), p["tied_A"]) * p["tied_u"]
        return result + (F.linear(hidden, p["tied_B"]) * (p["tied_v"] * s["scaling"])).to(result.dtype)

    def weight_delta(self, branch, weight):
        p = {k: t.float() for k, t in branch.params.items()}
        return branch.settings["scaling"] * (p["tied_v"][:, None] * p["tied_B"]) @ (p["tied_u"][:, None] * p["tied_A"])

    def stored_key(self, role: str, target) -> str:
        return role

    def save_tensors(self, branch) -> dict[str, torch.Tensor]:
        """Only u and v: the shared A and B are saved once, from the adapter's shared tensors."""
        return {k: branch.params[k].detach() for k in ("tied_u", "tied_v")}

    def file_config(self, config: dict[str, Any], settings: dict[str, dict], transposed: bool) -> dict[str, Any]:
        groups: dict[int, dict[str, Any]] = {}
        for path, st in settings.items():
            entry = groups.setdefault(st["group"], {"in_features": st["shape"][0], "out_features": st["shape"][1], "modules": []})
            entry["modules"].append(path)
        if sorted(groups) != list(range(len(groups))):
            raise AdaptkitError(f"Tied-LoRA shape groups {sorted(groups)} are not numbered 0, 1, …; cannot save")
        return {"adaptkit_variant": self.name, "r": config["r"], "lora_alpha": config["lora_alpha"],
                "lora_dropout": config["lora_dropout"], "train": config["train"], "fan_in_fan_out": transposed,
                "tied_groups": [{**groups[g], "modules": sorted(groups[g]["modules"])} for g in sorted(groups)]}

    def config_from_file(self, adapter: AdapterFiles) -> dict[str, Any]:
        cfg, groups = adapter.config, self.groups(adapter)
        if list(groups) != list(range(len(groups))):
            raise AdaptkitError(f"Tied-LoRA shared tensors are numbered {list(groups)}, not 0, 1, …")
        return {"r": self.rank(adapter), "lora_alpha": cfg.get("lora_alpha", self.rank(adapter)),
                "lora_dropout": cfg.get("lora_dropout", 0.0), "train": cfg.get("train", "VBUA"),
                "tied_groups": [{"in_features": i, "out_features": o} for i, o in groups.values()]}


TIED_LORA = TiedLoRA()
