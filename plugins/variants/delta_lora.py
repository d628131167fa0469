"""Delta-LoRA: LoRA whose frozen weight also moves with the factors (Zi et al. 2023, arXiv 2309.02411).

The branch is plain LoRA without dropout, y = W·x + s·B·A·x (A r × in, B out × r, s = α / r, or
α / √r with rsLoRA). After each optimizer step t past `start_step` K, the base weight takes the
change of the product as well, scaled by `update_ratio` λ (the paper's default 2):

    W ← W + λ·s·(B_t·A_t − B_{t−1}·A_{t−1}),   so after step T:   W_T = W_0 + λ·s·(B_T·A_T − B_K·A_K).

W gets no gradient and no optimizer state; the paper drops the branch's dropout so that the change
of B·A follows the gradient of W, so `lora_dropout` ≠ 0 is refused. Each layer keeps that change
of W in factored form, frozen: `delta_A` = [A_u; A_K] (2r × in), `delta_B` = [B_u, −B_K] (out × 2r),
R = λ·s·delta_B·delta_A, where (A_u, B_u) are the factors at the last `step_end` and (A_K, B_K) those
at step K (they follow the factors until then, so R = 0). R is the layer's `resident` change: the
core takes it out on disable()/remove() and puts it back on enable().

Files: a PEFT-like folder whose config says `adaptkit_variant: delta_lora` with `start_step` and
`update_ratio`; keys `base_model.model.<module>.lora_A.weight`, `.lora_B.weight`, `.delta_A`,
`.delta_B`. R is saved exactly, whenever the save happens; loading adds it to the fresh base's W.
`peft_type` is `DELTA_LORA`, so PEFT refuses the folder rather than load the branch without R.
The total change against the original base is ΔW = s·B·A + R; with (A_u, B_u) = (A, B), as after
every `step_end`, it is an exact LoRA of rank 2r with the same s: A' = [A; A_K],
B' = [(1+λ)·B, −λ·B_K] (rank r before step K). `delta` gives ΔW (merging into a base), the
`factors` hooks give A', B' (adapter merging), and `adaptkit convert --to lora` writes a PEFT LoRA folder.

Loading and hot-swapping (`load_adapter(..., swap=True)`) go through `resident`: the core takes
the old R out of W before the tensors change and puts the new R in after.
"""
from __future__ import annotations

from typing import Any

from adaptkit.plugin import AdapterFiles, AdaptkitError
from adaptkit.plugin import validate as v

from .lora import LORA_CONFIG_KEYS, LORA_TYPES, LoRA, _module


class DeltaLoRA(LoRA):
    """Delta-LoRA: LoRA that also moves the frozen W by λ·s·Δ(B·A) after each step."""

    param_names = ("lora_A", "lora_B", "delta_A", "delta_B")
    config_keys = LORA_CONFIG_KEYS | {"start_step", "update_ratio"}
    config_types = {**LORA_TYPES, "start_step": v.count, "update_ratio": v.number}
    moves_base_weight = True  # W itself trains (on_step_end): a quantized base cannot hold that

    def __init__(self, name: str = "delta_lora"):
        super().__init__(name)

    # -- tensor plane ----------------------------------------------------------------------------
    def describe(self, adapter: AdapterFiles) -> dict[str, Any]:
        cfg = adapter.config
        return {**super().describe(adapter), "start_step": cfg.get("start_step"), "update_ratio": cfg.get("update_ratio")}

    def factors(self, adapter: AdapterFiles, module: str):
        """(A', B', s) with s·B'·A' the total change vs the original base: s·B·A + λ·s·delta_B·delta_A."""
        a, b, s = super().factors(adapter, module)
        roles = adapter.modules[module]
        if "delta_A" not in roles or "delta_B" not in roles:
            raise AdaptkitError(f"{module}: a Delta-LoRA module needs delta_A and delta_B (the change of W) beside A, B")
        da, db = adapter.tensor(module, "delta_A").float(), adapter.tensor(module, "delta_B").float()
        return (*total_factors(a, b, da, db, float(adapter.config.get("update_ratio", 2.0))), s)

    def delta(self, adapter: AdapterFiles, module: str, base=None):
        a, b, s = self.factors(adapter, module)
        update = s * (b @ a)
        return update.T if adapter.transposed.get(module) else update

    def write_lowrank(self, factors, layouts, template: dict[str, Any], out_dir) -> list:
        """A plain PEFT LoRA folder (the Delta-LoRA config fields dropped)."""
        template = {k: v for k, v in template.items() if k not in ("adaptkit_variant", "start_step", "update_ratio")}
        return super().write_lowrank(factors, layouts, template, out_dir)

    # -- module plane ----------------------------------------------------------------------------
    @property
    def defaults(self) -> dict[str, Any]:
        return {**super().defaults, "start_step": 500, "update_ratio": 2.0}

    def settings(self, config: dict[str, Any], path: str, target) -> dict[str, Any]:
        if config.get("trainable_token_indices"):  # the lora variant's (`_lora_tokens`), not wired into W's updates
            raise AdaptkitError("delta_lora: trainable_token_indices is not supported (use a lora adapter)")
        if config["lora_dropout"]:
            raise AdaptkitError(f"delta_lora: lora_dropout must be 0, got {config['lora_dropout']}; Delta-LoRA removes "
                                "the dropout from the branch so that the change of B·A follows the gradient of W")
        if target.kind != "linear":
            raise AdaptkitError(f"{path}: delta_lora adapts linear layers only; leave {target.kind} layers out of "
                                "target_modules")
        if config["use_dora"] or config["init_lora_weights"] == "pissa":
            raise AdaptkitError("delta_lora: use_dora and PiSSA init are not supported (W already moves with B·A)")
        step, ratio = config["start_step"], config["update_ratio"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise AdaptkitError(f"delta_lora: start_step must be an integer ≥ 0, got {step!r}")
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
            raise AdaptkitError(f"delta_lora: update_ratio must be a number, got {ratio!r}")
        return {**super().settings(config, path, target), "update_ratio": float(ratio)}

    def create(self, target, settings, weight, shared):
        import torch
        from torch import nn

        params = _module().create(target, settings, weight)
        a, b = params["lora_A"].detach(), params["lora_B"].detach()
        da, db = torch.cat([a, a]), torch.cat([b, -b], dim=1)  # not started: R = 0 (a loaded R comes via `resident`)
        params["delta_A"] = nn.Parameter(da.contiguous(), requires_grad=False)
        params["delta_B"] = nn.Parameter(db.contiguous(), requires_grad=False)
        return params

    def resident(self, branch):
        """R = λ·s·delta_B·delta_A, the change of W since the adapter came (None before step K)."""
        p, r = branch.params, branch.params["lora_A"].shape[0]
        if not started(p["delta_A"], p["delta_B"], r):
            return None
        s = branch.settings
        return s["update_ratio"] * s["scaling"] * (p["delta_B"].float() @ p["delta_A"].float())

    def on_step_end(self, layers, config: dict[str, Any], step: int) -> None:
        """After optimizer step `step` (from 1): up to `start_step` the snapshot follows the factors;
        past it W ← W + λ·s·(B·A − B_u·A_u) and (A_u, B_u) ← (A, B). A disabled layer's W holds no R,
        so only the factors move there (enable() puts the new R in)."""
        import torch

        with torch.no_grad():
            for layer, branch in layers:
                p = branch.params
                a, b, da, db = p["lora_A"], p["lora_B"], p["delta_A"], p["delta_B"]
                r = a.shape[0]
                if step <= config["start_step"]:
                    da.copy_(torch.cat([a, a]))
                    db.copy_(torch.cat([b, -b], dim=1))
                    continue
                if not layer.disabled:
                    change = torch.cat([b, -db[:, :r]], dim=1).float() @ torch.cat([a, da[:r]]).float()
                    weight = layer.math_weight()
                    weight.add_((branch.settings["update_ratio"] * branch.settings["scaling"] * change).to(weight.dtype))
                da[:r].copy_(a)
                db[:, :r].copy_(b)

    def file_config(self, config: dict[str, Any], settings: dict[str, dict], transposed: bool) -> dict[str, Any]:
        return {**super().file_config(config, settings, transposed), "peft_type": "DELTA_LORA",
                "adaptkit_variant": self.name, "start_step": config["start_step"], "update_ratio": config["update_ratio"]}

    def config_from_file(self, adapter: AdapterFiles) -> dict[str, Any]:
        for module, roles in adapter.modules.items():
            if "delta_A" not in roles or "delta_B" not in roles:
                raise AdaptkitError(f"{module}: a Delta-LoRA module needs delta_A and delta_B (the change of W) beside A, B")
        cfg = adapter.config
        return {**super().config_from_file(adapter), "start_step": cfg.get("start_step", 500),
                "update_ratio": cfg.get("update_ratio", 2.0)}


def started(da, db, r: int) -> bool:
    """Whether W has moved: the applied factors differ from the start-step ones."""
    import torch

    return not (torch.equal(da[:r], da[r:]) and torch.equal(db[:, :r], -db[:, r:]))


def total_factors(a, b, da, db, ratio: float):
    """(A', B') with B'·A' = B·A + λ·delta_B·delta_A: rank r before step K, 2r when the applied factors
    are the current ones ([A; A_K], [(1+λ)·B, −λ·B_K]), else 3r ([A; delta_A], [B, λ·delta_B])."""
    import torch

    r = a.shape[0]
    if not started(da, db, r):
        return a, b
    if torch.equal(da[:r], a) and torch.equal(db[:, :r], b):
        return torch.cat([a, da[r:]]), torch.cat([(1 + ratio) * b, ratio * db[:, r:]], dim=1)
    return torch.cat([a, da]), torch.cat([b, ratio * db], dim=1)


DELTA_LORA = DeltaLoRA()
