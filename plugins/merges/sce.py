"""SCE: select by variance, calculate matrix-level weights, erase sign conflicts (FuseChat)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ._base import Operator, frozen


def select_mask(tvs: torch.Tensor, fraction: float) -> torch.Tensor:
    """1 at the ⌊fraction·k⌋ positions of largest variance across the inputs (k: positions whose
    variance is not 0), else 0; in the task vectors' dtype. Counted and picked as mergekit does."""
    var = torch.var(tvs, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * fraction)
    mask = torch.zeros_like(var)
    if k > 0:
        mask.view(-1)[torch.topk(var.abs().view(-1), k=k, largest=True).indices] = 1
    return mask


def matrix_weights(tvs: torch.Tensor) -> torch.Tensor:
    """ηᵢ = mean(τᵢ²) / Σⱼ mean(τⱼ²); uniform where that sum is below 1e-6 (mergekit's guard)."""
    weights = tvs.square().reshape(tvs.shape[0], -1).mean(dim=1)
    total = torch.sum(weights).item()
    if abs(total) < 1e-6:
        return torch.ones_like(weights) / weights.shape[0]
    return weights / total


class SelectCalculateErase(Operator):
    """SCE (FuseChat): select by variance, calculate matrix-level weights, erase sign conflicts.

    τᵢ = θᵢ − θ₀; select: keep the `select_topk` fraction of positions whose variance across the
    τᵢ is largest (counted among positions of non-zero variance), zero the rest in every τᵢ;
    calculate: ηᵢ = mean(τᵢ²) / Σⱼ mean(τⱼ²) per tensor; erase: s = sign Σᵢ τᵢ (a tie elects +),
    mᵢ = [sign τᵢ = s] (0 where τᵢ = 0); θ = θ₀ + Σᵢ ηᵢ·mᵢ·τᵢ / max(Σᵢ ηᵢ·mᵢ, 10⁻⁶).
    Parameters as mergekit's: `select_topk` (default 1: no selection; a fraction in (0, 1]),
    `int8_mask` (mergekit's mask storage: it changes no number); a per-model `weight`, which
    mergekit accepts and ignores, is ignored with a warning. Computed in the dtype the tensors
    come in, in mergekit's order of operations, so that a recipe gives mergekit's bytes. As in
    mergekit, the weights are uniform when Σⱼ mean(τⱼ²) < 10⁻⁶ (tensors barely changed).
    Wan et al. 2024, "FuseChat: Knowledge Fusion of Chat Models", arXiv 2408.07990.
    """

    name = "sce"
    params = frozen({"int8_mask": False, "select_topk": 1.0})
    ignored_params = frozenset({"weight"})  # mergekit's own sce recipes give weights it does not use

    def merge(self, tensors: Sequence[torch.Tensor], base: torch.Tensor | None = None, **params: Any) -> torch.Tensor:
        self.check_inputs(tensors)
        base = self.need_base(base, tensors)
        bound = self.bind(params, len(tensors))
        self.flag("int8_mask", bound["int8_mask"])
        fraction = self.real("select_topk", bound["select_topk"])
        if not 0 < fraction <= 1:
            raise self.error(f"select_topk must be a fraction in (0, 1], got {fraction}")
        tvs = torch.stack([t - base for t in tensors], dim=0)
        if fraction < 1:
            tvs = tvs * select_mask(tvs, fraction).unsqueeze(0)
        elected = (tvs.sum(dim=0) >= 0).to(tvs.dtype) * 2 - 1
        agree = tvs.sign() == elected
        weights = matrix_weights(tvs).view(-1, *[1] * (tvs.dim() - 1))
        erased = weights * agree
        return base + (tvs * erased).sum(dim=0) / torch.sum(erased, dim=0).clamp(min=1e-6)


SCE = SelectCalculateErase()
