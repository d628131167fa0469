"""RAM and RAM+: merging RL-trained agents, unique updates kept whole and shared ones averaged.

Reinforced Agent Merging sorts each position of the task vectors τᵢ = θᵢ − θ₀ by how many inputs
change it by more than ε: none (θ₀ kept), one (unique: that input's change, whole) or several
(shared: their mean). RAM+ (`ramplus_tl`, mergekit's tensor-local form) scales each input's
unique changes by λᵢ = 1 + r·clip(ρᵢ, 0, α), ρᵢ its shared-to-unique count ratio in the tensor.
"Behavior Knowledge Merge in Reinforced Agentic Models" (Reinforced Agent Merging), arXiv 2601.13572.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ._base import Operator, frozen, stacked_sum


def classify(tensors: Sequence[torch.Tensor], base: torch.Tensor, epsilon: float):
    """(τ as inputs × positions, changed = [|τ| > ε], count of inputs changing each position,
    shared = [count > 1], unique = [count = 1]), as mergekit forms them. The indicators are 0/1 and
    the count is a number, all in τ's dtype: the count rounded as mergekit's integer count is where
    it divides τ, and sums over the inputs as `stacked_sum` (torch's bytes). Products with bool
    tensors and half-precision stacked sums take torch's slow paths (RAM, bf16, 2²⁰ positions of 3
    inputs, one thread: 47 ms that way, 12 ms this way)."""
    tv = torch.stack([t - base for t in tensors], dim=0).view(len(tensors), -1)
    changed = torch.gt(tv.abs(), epsilon, out=torch.empty_like(tv))
    counts = stacked_sum(changed.unbind(0))
    shared = torch.gt(counts, 1, out=torch.empty_like(counts))
    return tv, changed, counts, shared, torch.eq(counts, 1, out=torch.empty_like(counts))


class RamOperator(Operator):
    """The RAM methods' threshold ε, checked: non-negative. A per-model `weight`, which mergekit
    accepts for them and ignores (its own RAM recipes give one), is ignored with a warning (the core's, for any other method's parameter)."""

    def threshold(self, bound: dict[str, Any]) -> float:
        epsilon = self.real("epsilon", bound["epsilon"])
        if epsilon < 0:
            raise self.error(f"epsilon (the |θᵢ − θ₀| above which an input changes a weight) must be ≥ 0, got {epsilon}")
        return epsilon


class Ram(RamOperator):
    """RAM: unique task-vector entries added whole, shared ones averaged over the inputs that share them.

    τᵢ = θᵢ − θ₀; cᵢ = [|τᵢ| > ε] per position; k = Σᵢ cᵢ;
    θ = θ₀ + Σᵢ cᵢ·τᵢ·([k = 1] + [k > 1]/k)   (θ₀ where k = 0).
    Parameter as mergekit's: `epsilon` (default 1e-5). Computed in the dtype the tensors come in,
    in mergekit's order of operations, so that a recipe gives mergekit's bytes.
    "Behavior Knowledge Merge in Reinforced Agentic Models" (Reinforced Agent Merging), arXiv 2601.13572.
    """

    name = "ram"
    elementwise = True
    params = frozen({"epsilon": 1e-5})

    def entry_bytes(self, inputs: int, compute_size: int, params: Mapping[str, Any]) -> int:
        """Bytes an entry held besides the inputs (capabilities.WorkingMemory): `classify`'s task vectors and
        change indicators (N entries each) and its three per-position ones, then the mix's unique, shared
        and summed products (N each) and a float32 sum. (The engine's default, float32 copies and two
        tensors besides, counted half of what RAM holds: the 168M job peaked 25-34% over its estimated peak, 7% with this.)"""
        return (5 * inputs + 4) * compute_size + 4

    def merge(self, tensors: Sequence[torch.Tensor], base: torch.Tensor | None = None, **params: Any) -> torch.Tensor:
        self.check_inputs(tensors)
        base = self.need_base(base, tensors)
        epsilon = self.threshold(self.bind(params, len(tensors)))
        tv, changed, counts, shared, unique = classify(tensors, base, epsilon)
        kept = tv.mul_(changed)
        merged = stacked_sum(((kept * unique) + (kept * shared / counts.clamp(min=1))).unbind(0))
        return base + merged.reshape_as(base)


class RamPlus(RamOperator):
    """RAM+ (tensor-local): RAM with each input's unique entries scaled up by its share of overlap.

    With cᵢ, k as in RAM: ρᵢ = #{k > 1, cᵢ} / max(#{k = 1, cᵢ}, ε) over the tensor's positions;
    λᵢ = 1 + r·clip(ρᵢ, 0, α); θ = θ₀ + Σᵢ cᵢ·τᵢ·(λᵢ·[k = 1] + [k > 1]/k).
    Parameters as mergekit's: `r` (default 0.1), `alpha` (0.2, ≥ 0), `epsilon` (1e-5). An input
    with no unique entry gets λᵢ = 1, which it multiplies by nothing (mergekit's ρᵢ is 0/0 there
    when ε = 0). Computed in mergekit's order of operations, so that a recipe gives mergekit's bytes:
    λᵢ is float32, so half-precision inputs give a float32 result, rounded once when written.
    "Behavior Knowledge Merge in Reinforced Agentic Models" (Reinforced Agent Merging), arXiv 2601.13572.
    """

    name = "ramplus_tl"
    params = frozen({"r": 0.1, "alpha": 0.2, "epsilon": 1e-5})

    def entry_bytes(self, inputs: int, compute_size: int, params: Mapping[str, Any]) -> int:
        """As RAM's, but the mix's three products are float32 (λᵢ is) and so is the result."""
        return (2 * inputs + 3) * compute_size + (3 * inputs + 2) * 4

    def merge(self, tensors: Sequence[torch.Tensor], base: torch.Tensor | None = None, **params: Any) -> torch.Tensor:
        self.check_inputs(tensors)
        base = self.need_base(base, tensors)
        bound = self.bind(params, len(tensors))
        epsilon, r, alpha = self.threshold(bound), self.real("r", bound["r"]), self.real("alpha", bound["alpha"])
        if alpha < 0:
            raise self.error(f"alpha (the bound on the overlap ratio) must be ≥ 0, got {alpha}")
        tv, changed, counts, shared, unique = classify(tensors, base, epsilon)
        shared_counts = torch.count_nonzero(changed * shared, dim=1)
        unique_counts = torch.count_nonzero(changed * unique, dim=1)
        rho = torch.where(unique_counts > 0, shared_counts / unique_counts.clamp(min=epsilon), 0.0)
        lam = 1 + r * rho.clamp(min=0, max=alpha)
        kept = tv.mul_(changed)
        merged = stacked_sum(((kept * unique * lam.unsqueeze(-1)) + (kept * shared / counts.clamp(min=1))).unbind(0))
        return base + merged.reshape_as(base)


RAM = Ram()
RAMPLUS_TL = RamPlus()
