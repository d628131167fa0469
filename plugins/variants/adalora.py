"""AdaLoRA: an SVD-shaped update whose rank budget moves to the important layers (Zhang et al. 2023, arXiv 2303.10512).

Each layer gets ΔW = P·Λ·Q = B·(A ⊙ E)·c with A (r × in, rows of Q), E (r × 1, the diagonal Λ) and
B (out × r, columns of P), r = init_r, and c = scaling / (ranknum + 1e-5) exactly as PEFT 0.21:
scaling = lora_alpha (float(r) if lora_alpha ≤ 0), ranknum = init_r (kept when a layer is pruned), so

    y = W·x + (dropout(x) · (A ⊙ E)ᵀ · Bᵀ) · scaling / (init_r + 1e-5)

Init (PEFT's): E = 0, A, B ~ N(0, 0.02²); `init_lora_weights=False` leaves all three N(0, 1).
Budget (`step_end(step)` after each optimizer step, best before `zero_grad()`: it then uses the
gradient the optimizer used — under DDP the all-reduced one —, after it what gradient hooks kept;
`_adalora_budget.py`): importance of every entry I = |w·∇w|, smoothed
Ī ← β₁Ī + (1−β₁)I, uncertainty Ū ← β₂Ū + (1−β₂)|I − Ī|; triplet i scores
S_i = Ī·Ū(E_i) + mean_j Ī·Ū(A_ij) + mean_k Ī·Ū(B_ki). The budget is Σ init_r up to `tinit`, then
b(t) = target + (init − target)·(1 − (t − tinit)/(T − tinit))³ with T = total_step − tfinal, every
`deltaT` steps the E entries of the lowest Σ init_r − b(t) scores are zeroed; at T the final masks
(target_r per layer on average) become `rank_pattern` and hold to the end. Orthogonality
(`extra_loss()`, add it to the loss): orth_reg_weight · mean over all A, B of ‖A·Aᵀ − I‖_F, ‖BᵀB − I‖_F
(PEFT's form; the paper writes the sum of squared norms).

Files are PEFT's: `peft_type: ADALORA`, keys `base_model.model.<module>.lora_A|lora_E|lora_B` (no
`.weight`), config init_r/target_r/tinit/tfinal/deltaT/beta1/beta2/orth_reg_weight/total_step and
`rank_pattern` {"<module>.lora_E": [kept?] × init_r}. With a rank_pattern the tensors are saved with the
kept rows only and loaded at that rank (PEFT's resize), ranknum staying init_r; as in PEFT, a save
between two mask steps drops the rows the last mask zeroed even if the optimizer has moved them since.
`adaptkit convert --to lora` writes an exact plain LoRA of the rows whose E ≠ 0: A' = (A ⊙ E)[kept], B' = c·B[:, kept].
On `nn.Conv2d` (PEFT's SVDConv2d; groups 1 only) A is r × (in·kh·kw) and ΔW the same product reshaped
to the kernel, out × in × kh × kw; the branch is conv(dropout(x), ΔW) with the layer's stride, padding, dilation.
"""
from __future__ import annotations

import math
from typing import Any

from adaptkit.plugin import AdapterFiles, AdaptkitError
from adaptkit.plugin import validate as v

from ._lora_checks import check_adalora
from .lora import LORA, LORA_CONFIG_KEYS, LORA_TYPES

OWN = {"init_r": 12, "target_r": 8, "tinit": 0, "tfinal": 0, "deltaT": 1, "beta1": 0.85, "beta2": 0.85,
       "orth_reg_weight": 0.5, "total_step": None}
# rank_pattern is AdaLoRA's own: "<module>.lora_E" -> the kept-row mask (not LoRA's regex -> rank).
TYPES = {**LORA_TYPES, "init_r": v.count, "target_r": v.count, "tinit": v.count, "tfinal": v.count,
         "deltaT": v.positive_int, "beta1": v.number, "beta2": v.number, "orth_reg_weight": v.number,
         "total_step": v.optional(v.positive_int), "rank_pattern": v.optional(v.map_of(v.list_of(v.flag)))}
DEFAULTS = {"lora_alpha": 8, "lora_dropout": 0.0, "init_lora_weights": True, **OWN, "rank_pattern": None}


def mask_for(patterns: dict | None, module: str) -> list[bool] | None:
    """The rank_pattern entry of `module` (keys `<path>.lora_E[.<adapter>]`, matched by path suffix)."""
    for key, mask in (patterns or {}).items():
        path = key.split(".lora_E")[0]
        if path == module or path.endswith("." + module) or module.endswith("." + path):
            return [bool(m) for m in mask]
    return None


class AdaLoRA:
    """AdaLoRA: ΔW = B·(A ⊙ E)·c with the rank budget reallocated by importance during training."""

    name = "adalora"
    param_names = ("lora_A", "lora_B", "lora_E")
    config_keys = LORA_CONFIG_KEYS | set(OWN)
    config_types = TYPES
    defaults = DEFAULTS
    inspect_rows = ("alpha", "scaling", "fan_in_fan_out")

    # -- tensor plane --------------------------------------------------------------------------
    def kept_rank(self, adapter: AdapterFiles, module: str) -> int:
        mask = mask_for(adapter.config.get("rank_pattern"), module)
        return sum(mask) if mask is not None else adapter.shape(module, "lora_A")[0]

    def _scale(self, adapter: AdapterFiles, module: str) -> tuple[float, float]:
        """(scaling, ranknum): lora_alpha (or the stored rank if alpha ≤ 0) and init_r, as PEFT sets them."""
        cfg, rank = adapter.config, adapter.shape(module, "lora_A")[0]
        alpha = cfg.get("lora_alpha", 8)
        return (alpha if alpha > 0 else float(rank)), float(cfg.get("init_r", rank))

    @staticmethod
    def _ranknum(ranknum: float, like):
        """ranknum + 1e-5 as PEFT forms it (a float32 tensor), so results match bit for bit."""
        import torch

        return torch.full((1,), ranknum, dtype=like.dtype, device=like.device) + 1e-5

    def describe(self, adapter: AdapterFiles) -> dict[str, Any]:
        cfg = adapter.config
        modules = {}
        for m in sorted(adapter.modules):
            scaling, ranknum = self._scale(adapter, m)
            modules[m] = {"rank": self.kept_rank(adapter, m), "stored_rank": adapter.shape(m, "lora_A")[0],
                          "scaling": scaling / (ranknum + 1e-5)}
        ranks = sorted({v["rank"] for v in modules.values()})
        return {"rank": ranks[0] if len(ranks) == 1 else None, "ranks": ranks, "alpha": cfg.get("lora_alpha"),
                "scaling": sorted({v["scaling"] for v in modules.values()}), "pruned": bool(cfg.get("rank_pattern")),
                **{k: cfg.get(k) for k in OWN}, "fan_in_fan_out": bool(cfg.get("fan_in_fan_out")), "modules": modules}

    def check_files(self, adapter: AdapterFiles) -> None:
        """The config (`check_adalora`); each module's A (r × in), E (r × 1), B (out × r) agree on r (r may be 0)."""
        check_adalora(adapter.config, v.adapter_source(adapter))
        for module in sorted(adapter.modules):
            if set(adapter.modules[module]) != set(self.param_names):
                continue  # reported by `_tensors` where the module is used
            a, e, b = (adapter.shape(module, role) for role in ("lora_A", "lora_E", "lora_B"))
            if len(a) != 2 or len(b) != 2 or tuple(e) != (a[0], 1) or b[1] != a[0]:
                raise AdaptkitError(f"{v.adapter_source(adapter)}: module '{module}': lora_A {list(a)}, lora_E "
                                    f"{list(e)} and lora_B {list(b)} do not agree on one rank")

    def _tensors(self, adapter: AdapterFiles, module: str):
        roles = adapter.modules[module]
        if set(roles) != set(self.param_names):
            raise AdaptkitError(f"{module}: an AdaLoRA module needs lora_A, lora_E and lora_B, found {sorted(roles)}")
        return (adapter.tensor(module, r).float() for r in ("lora_A", "lora_E", "lora_B"))

    def delta(self, adapter: AdapterFiles, module: str, base=None):
        """ΔW = B·(A ⊙ E)·scaling / (ranknum + 1e-5), transposed for fan_in_fan_out (PEFT's get_delta_weight)."""
        a, e, b = self._tensors(adapter, module)
        scaling, ranknum = self._scale(adapter, module)
        update = (b @ (a * e)) * scaling / self._ranknum(ranknum, a)
        if base is not None and base.dim() > 2 and update.numel() == base.numel():  # a Conv2d kernel
            return update.reshape(base.shape)
        return update.T if adapter.transposed.get(module) else update

    def factors(self, adapter: AdapterFiles, module: str):
        """(A', B', c) with ΔW = c·B'·A': A' = (A ⊙ E) and B' = B on the rows with E ≠ 0."""
        a, e, b = self._tensors(adapter, module)
        scaling, ranknum = self._scale(adapter, module)
        keep = e.view(-1) != 0
        return (a * e)[keep].contiguous(), b[:, keep].contiguous(), float(scaling / self._ranknum(ranknum, a))

    def factor_layout(self, adapter: AdapterFiles, module: str) -> dict[str, bool]:
        return {"embedding": False, "transposed": adapter.transposed.get(module, False)}

    def write_lowrank(self, factors, layouts, template: dict[str, Any], out_dir) -> list:
        """A plain PEFT LoRA folder (LoRA's writer, the AdaLoRA config fields dropped)."""
        template = {k: v for k, v in template.items() if k not in OWN and k not in ("r", "rank_pattern")}
        return LORA.write_lowrank(factors, layouts, template, out_dir)

    # -- module plane ----------------------------------------------------------------------------
    def settings(self, config: dict[str, Any], path: str, target) -> dict[str, Any]:
        conv2d = target.kind == "conv" and len(target.kernel) == 2 and target.groups == 1
        if target.kind != "linear" and not conv2d:
            what = f"{len(target.kernel)}-d conv (groups={target.groups})" if target.kind == "conv" else target.kind
            raise AdaptkitError(f"{path}: adalora adapts Linear, Conv1D and Conv2d (groups=1) layers only (as PEFT); "
                                f"leave this {what} layer out of target_modules")
        total, tinit, tfinal = config["total_step"], config["tinit"], config["tfinal"]
        if isinstance(total, bool) or not isinstance(total, int) or total <= 0:
            raise AdaptkitError(f"adalora needs total_step, the number of training steps (an integer > 0), got {total!r}")
        if tinit >= total - tfinal:
            raise AdaptkitError(f"adalora: tinit={tinit}, tfinal={tfinal} and total_step={total} leave no budgeting "
                                "phase; decrease tinit/tfinal or increase total_step")
        for key in ("init_r", "target_r", "deltaT"):
            if isinstance(config[key], bool) or not isinstance(config[key], int) or config[key] < (key == "deltaT"):
                raise AdaptkitError(f"adalora: {key} must be an integer ≥ {int(key == 'deltaT')}, got {config[key]!r}")
        if not (0 < config["beta1"] < 1 and 0 < config["beta2"] < 1) or config["orth_reg_weight"] < 0:
            raise AdaptkitError("adalora: beta1 and beta2 must lie in (0, 1) and orth_reg_weight be ≥ 0")
        if not 0 <= config["lora_dropout"] < 1:
            raise AdaptkitError(f"lora_dropout must be in [0, 1), got {config['lora_dropout']}")
        mask = mask_for(config["rank_pattern"], path)  # a pruned adapter: PEFT resizes the layer to its kept rows
        r, alpha = (sum(mask) if mask is not None else config["init_r"]), config["lora_alpha"]
        return {"r": r, "init_r": config["init_r"], "scaling": alpha if alpha > 0 else float(r), "rank_mask": mask,
                "dropout": float(config["lora_dropout"]), "init": config["init_lora_weights"]}

    def create(self, target, settings, weight, shared):
        import torch
        from torch import nn

        r, n_in = settings["r"], target.in_features * math.prod(target.kernel)  # Conv2d: A r × (in·kh·kw)
        a, e, b = torch.randn(r, n_in), torch.randn(r, 1), torch.randn(target.out_features, r)
        torch.randn(1)  # PEFT draws its ranknum here: the same draws, so a seeded run starts where PEFT's does
        if settings["init"]:
            nn.init.zeros_(e)
            nn.init.normal_(a, mean=0.0, std=0.02)
            nn.init.normal_(b, mean=0.0, std=0.02)
        params = nn.ParameterDict({"lora_A": nn.Parameter(a), "lora_E": nn.Parameter(e), "lora_B": nn.Parameter(b)})
        _budget().state(params)  # gradient hooks for the allocator
        return params

    def forward(self, branch, base_layer, x, result):
        import torch.nn.functional as F

        s, p = branch.settings, branch.params
        a, e, b = p["lora_A"], p["lora_E"], p["lora_B"]
        x = x.to(a.dtype)
        dropped = F.dropout(x, s["dropout"], branch.training) if s["dropout"] else x
        if branch.target.kind == "conv":  # conv(dropout(x), ΔW) with the layer's stride, padding, dilation
            kernel = self.weight_delta(branch, base_layer.weight).to(a.dtype)
            return result + base_layer._conv_forward(dropped, kernel, None).to(result.dtype)
        return result + ((dropped @ (a * e).T @ b.T) * s["scaling"] / self._ranknum(s["init_r"], a)).to(result.dtype)

    def weight_delta(self, branch, weight):
        p = branch.params
        a, e, b = (p[r].float() for r in ("lora_A", "lora_E", "lora_B"))
        update = (b @ (a * e)) * branch.settings["scaling"] / self._ranknum(branch.settings["init_r"], a)
        return update.reshape(weight.shape) if branch.target.kind == "conv" else update

    def on_step_end(self, layers, config: dict[str, Any], step: int) -> None:
        """PEFT's update_and_allocate(step); unlike PEFT it may run before or after zero_grad()."""
        _budget().step_end(layers, config, step)

    def extra_loss(self, layers, config: dict[str, Any]):
        return _budget().orth_loss(layers, config)

    def train_settings(self, steps: int) -> dict[str, Any]:
        """The budget schedule spans the run: `total_step`, where left unset, is its number of steps."""
        return {"total_step": steps}

    def train_state(self, layers, config: dict[str, Any]) -> dict:
        """The importance averages and caught gradients, for checkpoints (resume stays exact)."""
        return _budget().train_state(layers)

    def load_train_state(self, layers, config: dict[str, Any], tensors: dict) -> None:
        _budget().load_train_state(layers, tensors)

    # -- files -----------------------------------------------------------------------------------
    def stored_key(self, role: str, target) -> str:
        return role

    def save_tensors(self, branch) -> dict:
        """The kept rows only once a rank_pattern exists (PEFT's resize_state_dict_by_rank_pattern)."""
        import torch

        p = {k: v.detach() for k, v in branch.params.items()}
        mask = branch.settings.get("rank_mask")
        if mask is None or p["lora_A"].shape[0] != len(mask):
            return p
        keep = torch.tensor(mask, dtype=torch.bool, device=p["lora_A"].device)
        return {"lora_A": p["lora_A"][keep], "lora_E": p["lora_E"][keep], "lora_B": p["lora_B"][:, keep]}

    def file_config(self, config: dict[str, Any], settings: dict[str, dict], transposed: bool) -> dict[str, Any]:
        pattern = {f"{m}.lora_E": s["rank_mask"] for m, s in sorted(settings.items()) if s["rank_mask"] is not None}
        return {"peft_type": "ADALORA", "lora_alpha": config["lora_alpha"], "lora_dropout": config["lora_dropout"],
                "fan_in_fan_out": transposed, "init_lora_weights": config["init_lora_weights"], "bias": "none",
                "use_rslora": False, "use_dora": False, **{k: config[k] for k in OWN}, "rank_pattern": pattern or None}

    def config_from_file(self, adapter: AdapterFiles) -> dict[str, Any]:
        for module in adapter.modules:
            if set(adapter.modules[module]) != set(self.param_names):
                raise AdaptkitError(f"{module}: an AdaLoRA module needs lora_A, lora_E and lora_B")
        return {k: adapter.config.get(k, v) for k, v in DEFAULTS.items()}


def _budget():
    from . import _adalora_budget  # torch-heavy: imported on first use, so `inspect` stays torch-free

    return _adalora_budget


ADALORA = AdaLoRA()
