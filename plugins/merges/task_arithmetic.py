"""The task-arithmetic family: task arithmetic, TIES, DARE, magnitude pruning and breadcrumbs.

All of them are one function, `TaskArithmetic.merge`, configured by a sparsifier, a sign
consensus and defaults:

    τᵢ = θᵢ − θ₀                                  task vector of input i
    τᵢ' = sparsify(τᵢ; densityᵢ[, gammaᵢ])         keep a `density` fraction, optionally rescaled
    δᵢ = wᵢ·τᵢ'                                    weight
    mᵢ = [sign δᵢ = s],  s = sign Σⱼ δⱼ             sign consensus (TIES), else mᵢ = 1
    δ = Σᵢ mᵢ·δᵢ / Σᵢ mᵢ·wᵢ                         divided only with `normalize`
    θ = θ₀ + λ·δ

Parameter names and defaults are mergekit's (`weight`, `density`, `gamma`, `lambda`,
`normalize`, `rescale`, `int8_mask`), and so is what they mean: `rescale: true` (also written
`l1`) scales the kept values so that their L1 norm equals the unpruned one, as mergekit does.
Additions and differences, on purpose:

- `rescale: inverse` divides the kept values by `density` instead, as the DARE paper does (unbiased: E[τ'] = τ).
- Magnitude selection keeps the entries mergekit's sort of |τ| keeps (`torch.argsort`, descending for TIES,
  ascending for breadcrumbs) without sorting: torch's CPU sort is not stable, so where entries of equal magnitude
  straddle the cut (in bf16 the rule: thousands of entries share each magnitude) no position rule reproduces its
  choice, and its own partitions are followed down to the cut instead (`_introsort`: linear time, a fourteenth of
  the sort's, 3 bytes an entry against its 18). `tie_break: index` (an addition) keeps the tied entries lowest
  flat index first instead: an exact radix select over blocks (bounded memory), the same result on every device
  (mergekit's own choice differs between its CPU and CUDA sorts), and a merge that differs from mergekit's only in
  which of equally large entries it keeps.
- Everything runs over blocks of the flattened tensor (2¹⁷ entries: a block's temporaries stay in a core's
  cache), however big the tensor. Two passes at most: the first finds the cut (or draws the masks, or sums the L1
  norms), the second applies it and mixes, in one C loop over the models where the install built it (`_mixing`,
  same bytes); the entries tied at an `index` cut that are kept are found before it (`_select.cut_bounds`).
- Bad values are errors: density outside (0, 1], gamma outside [0, 1). With `normalize`, a divisor under 1e-8
  (Σᵢ wᵢ; with sign consensus an entry's Σᵢ mᵢ·wᵢ, 0 there) counts as 1, as mergekit's: weights summing to zero
  leave the sum undivided, with a warning. `int8_mask` changes no number (mergekit's int8 sign mask gives the
  same comparisons) and is accepted. task_arithmetic has no `density` or `rescale` (mergekit's takes them and
  reads neither: a recipe giving them gets a warning, and every entry kept).

Arithmetic and rounding are mergekit 0.1.5's (`generalized_task_arithmetic.py`, `sparsify.py`), so inputs in any
compute dtype give its bytes: everything is computed in the compute dtype (the keyword `dtype`, default the
inputs' promoted dtype; the engine passes the recipe's), in its order: τᵢ rounded, masked, rescaled (the L1 norms
of the whole tensor rounded to the dtype, summed so that any thread count gives the same: `_sparsify.l1_factor`),
multiplied by wᵢ rounded to the dtype; the elected sign is that of the rounded Σⱼ δⱼ (≥ 0 elects +), Σᵢ mᵢ·δᵢ and
Σᵢ mᵢ·wᵢ are sums over the stacked inputs, then ÷, ·λ (skipped for λ = 1) and θ₀ + δ each round. Kept counts are
mergekit's: max(1, int(density·n)) for magnitude, int(density·n) between the int(γ·n) largest dropped and the
smallest for breadcrumbs (0.29·100 keeps 28, as mergekit).
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import reduce
from typing import Any

import torch

from ._base import Operator, frozen
from ._mixing import TaskVector, l1_sums, mix_block, mix_models
from ._select import block_ranges
from ._sparsify import held_bytes, l1_factor, sparsifiers

# entries a block: its temporaries stay in a core's cache (2 MiB here) from one operation to the next (TIES with
# tie_break: index, one thread, profiled: 2¹⁸ took 0.82 of the time of 2²⁰, 2¹⁷ 0.92 of 2¹⁸'s, 2¹⁶ as 2¹⁷)
BLOCK = 1 << 17

SPARSIFIERS = (None, "magnitude", "random", "magnitude_outliers")
CONSENSUS = (None, "sum", "count")


@dataclass
class Settings:
    weight: list[float]
    density: list[float]
    gamma: list[float]
    scale: float
    normalize: bool
    rescale: bool | str
    tie_break: str = "mergekit"


class TaskArithmetic(Operator):
    """Generalized task arithmetic: θ₀ + λ·Σᵢ mᵢ·wᵢ·sparsify(θᵢ − θ₀), normalized on request.

    One function behind task_arithmetic, ties, dare_*, magnitude_prune and breadcrumbs*; the
    module docstring gives the formula and where it differs from mergekit.
    Ilharco et al. 2023, "Editing models with task arithmetic", arXiv 2212.04089.
    """

    def __init__(self, name: str, *, sparsify: str | None = None, consensus: str | None = None,
                 normalize: bool = False, rescale: bool = False, about: str = ""):
        if sparsify not in SPARSIFIERS or consensus not in CONSENSUS:
            raise ValueError(f"unknown sparsify={sparsify!r} or consensus={consensus!r}")
        self.name, self.sparsify, self.consensus, self.about = name, sparsify, consensus, about
        self.random, self.elementwise = sparsify == "random", sparsify is None
        self.serial_kernels = sparsify is not None  # torch.bincount cuts, numpy partitions and draws: one thread
        self.block_upcast = True  # takes inputs as read and converts block by block to `dtype`
        params = {"weight": None, "lambda": 1.0, "normalize": normalize, "int8_mask": False}
        per_model = {"weight"}
        if sparsify is not None:  # (mergekit's task_arithmetic takes density and rescale and reads neither: a
            params.update(density=1.0, rescale=rescale)  # recipe giving them gets the core's warning)
            per_model.add("density")
        if sparsify == "magnitude_outliers":
            params["gamma"] = 0.01
            per_model.add("gamma")
        if sparsify in ("magnitude", "magnitude_outliers"):
            params["tie_break"] = "mergekit"  # an addition: see the module docstring
        self.params = frozen(params)
        self.per_model = frozenset(per_model)

    def merge(self, tensors: Sequence[torch.Tensor], base: torch.Tensor | None = None, *,
              generators: Sequence[torch.Generator] | None = None, dtype: torch.dtype | None = None,
              **params: Any) -> torch.Tensor:
        """The merged tensor in `dtype` (default: the inputs' promoted dtype), computed in it."""
        self.check_inputs(tensors)
        base = self.need_base(base, tensors)
        s = self.settings(self.bind(params, len(tensors)))
        generators = self.check_generators(generators, len(tensors))
        dtype = dtype or reduce(torch.promote_types, [t.dtype for t in tensors], base.dtype)
        base_flat, n, flat = base.reshape(-1), base.numel(), [t.reshape(-1) for t in tensors]
        ranges = block_ranges(n, BLOCK)

        def task_vector(i: int) -> TaskVector:
            return TaskVector(flat[i], base_flat, dtype)

        keeps = sparsifiers([task_vector(i) for i in range(len(tensors))], n, self.sparsify, s.density, s.gamma,
                            generators, s.tie_break)

        def rescale(i: int, keep) -> float | None:  # (a Python float of the dtype-rounded value: mergekit's
            if keep is None or s.rescale is False:  # products, half the time of a 0-d tensor's)
                return None
            if s.rescale == "inverse":
                return float(torch.tensor(1 / s.density[i], dtype=dtype))
            return l1_factor(task_vector(i), ranges, keep.apply, dtype, None if keep.method != "random" else (
                lambda a, b: l1_sums(flat[i][a:b], base_flat[a:b], keep.drops(a, b - a, dtype), dtype)))
        factors = [rescale(i, k) for i, k in enumerate(keeps)]

        def deltas_at(start: int, stop: int, base_block: torch.Tensor) -> list[torch.Tensor]:
            deltas = [torch.sub(f[start:stop].to(dtype), base_block) for f in flat]
            deltas = [d if keep is None else keep.apply(start, d) for d, keep in zip(deltas, keeps)]
            return [d if factor is None else d.mul_(factor) for d, factor in zip(deltas, factors)]

        def models_at(start: int, stop: int):  # (for `mix_models`; None where a drop is no mask or a dtype differs)
            masks = [None if keep is None else keep.drops(start, stop - start, dtype) for keep in keeps]
            ok = all(m is not None or k is None for m, k in zip(masks, keeps)) and all(f.dtype == dtype for f in flat)
            return ([f[start:stop] for f in flat], masks, factors) if ok else None

        out, weights = torch.empty_like(base_flat, dtype=dtype), torch.tensor(s.weight, dtype=dtype, device=base.device)
        whole = base_flat.dtype == dtype and all(keep is None or keep.drawn() for keep in keeps)
        self.mix(ranges, lambda a, b: base_flat[a:b].to(dtype), deltas_at, s, weights, out, models_at, whole)
        return out.view(base.shape)

    def mix(self, blocks, base_at, deltas_at, s: Settings, weights: torch.Tensor, out: torch.Tensor,
            models_at=None, whole: bool = False) -> None:
        """out[a:b] = base + λ·combine(wᵢ·τᵢ) block by block (mergekit's order): `deltas_at(a, b, base block)` gives
        the τᵢ there, sparsified and rescaled; `models_at(a, b)` the models, drops, factors (or None). `whole` (no drop
        left to draw, the base in the dtype): all blocks in one `mix_models` call where it can (one a block: a sixth
        of a TIES merge in Python steps)."""
        first, last = blocks[0][0], blocks[-1][1]
        if whole and models_at and (found := models_at(first, last)) is not None and mix_models(
                base_at(first, last), *found, weights, self.consensus, s.normalize, s.scale, out[first:last]):
            return
        for start, stop in blocks:
            base_block, found = base_at(start, stop), models_at(start, stop) if models_at else None
            if found is None or not mix_models(base_block, *found, weights, self.consensus, s.normalize, s.scale,
                                               out[start:stop]):
                mix_block(base_block, deltas_at(start, stop, base_block), weights, self.consensus, s.normalize,
                          s.scale, out[start:stop])

    def entry_bytes(self, inputs: int, compute_size: int, params: Mapping[str, Any]) -> int:
        return held_bytes(self.sparsify, inputs, compute_size, params.get("tie_break", "mergekit"))

    def settings(self, bound: dict[str, Any]) -> Settings:
        weight = [self.real("weight", w) for w in bound["weight"]]
        density = [self.real("density", d) for d in bound.get("density", [1.0] * len(weight))]
        gamma = [self.real("gamma", g) for g in bound.get("gamma", [0.0] * len(weight))]
        for d in density:
            if not 0 < d <= 1:
                raise self.error(f"density must be in (0, 1], got {d}")
        if (bad := next((g for g in gamma if not 0 <= g < 1), None)) is not None:
            raise self.error(f"gamma must be in [0, 1), got {bad}")
        rescale = bound.get("rescale", False)
        rescale = "l1" if rescale is True else rescale  # mergekit's meaning of true
        if rescale not in (False, "l1", "inverse"):
            raise self.error(f"rescale must be true (mergekit's L1 match, also written 'l1'), 'inverse' (÷ the keep "
                             f"probability, as the DARE paper) or false, got {bound['rescale']!r}")
        normalize = self.flag("normalize", bound["normalize"])
        self.flag("int8_mask", bound["int8_mask"])
        if normalize and self.consensus is None and abs(sum(weight)) < 1e-8:  # (with consensus: each entry's own)
            warnings.warn(f"{self.name}: weights summing to zero with normalize: the sum is not divided, as mergekit "
                          f"takes a divisor under 1e-8 as 1 (in float16, where 1e-8 is 0, it divides by 0)")
        tie_break = bound.get("tie_break", "mergekit")
        if tie_break not in ("mergekit", "index"):
            raise self.error(f"tie_break must be 'mergekit' (keep the tied entries mergekit's sort keeps) or 'index' "
                             f"(lowest index first), got {tie_break!r}")
        return Settings(weight, density, gamma, self.real("lambda", bound["lambda"]), normalize, rescale, tie_break)

    def check_generators(self, generators: Sequence[torch.Generator] | None, count: int) -> list:
        if not self.random:
            return [None] * count
        if generators is None or len(generators) != count:
            raise self.error(f"draws random masks and needs one torch.Generator per input ({count}), got "
                             f"{'none' if generators is None else len(generators)}")
        return list(generators)


TASK_ARITHMETIC = TaskArithmetic(
    "task_arithmetic",
    about="Task arithmetic: add the weighted sum of task vectors to the base model.\n\n"
    "θ = θ₀ + λ·Σᵢ wᵢ·(θᵢ − θ₀), divided by Σᵢ wᵢ with `normalize` (default false).\n"
    "Ilharco et al. 2023, \"Editing models with task arithmetic\", arXiv 2212.04089.",
)
TIES = TaskArithmetic(
    "ties", sparsify="magnitude", consensus="sum", normalize=True,
    about="TIES: trim task vectors by magnitude to `density`, elect a sign, take the disjoint mean.\n\n"
    "τᵢ' = top-density |τᵢ| entries of τᵢ = θᵢ − θ₀; s = sign Σᵢ wᵢ·τᵢ'; mᵢ = [sign wᵢ·τᵢ' = s];\n"
    "θ = θ₀ + λ·Σᵢ mᵢ·wᵢ·τᵢ' / Σᵢ mᵢ·wᵢ (normalize, default true).\n"
    "Yadav et al. 2023, \"TIES-Merging\", arXiv 2306.01708.",
)
DARE_LINEAR = TaskArithmetic(
    "dare_linear", sparsify="random", rescale=True,
    about="DARE: drop task-vector entries with probability 1 − density, rescale, add up linearly.\n\n"
    "τᵢ' = mᵢ ⊙ τᵢ · ‖τᵢ‖₁ / ‖mᵢ ⊙ τᵢ‖₁, mᵢ ~ Bernoulli(density) (`rescale: inverse`: τᵢ' = mᵢ ⊙ τᵢ / density);\n"
    "θ = θ₀ + λ·Σᵢ wᵢ·τᵢ' (÷ Σᵢ wᵢ with `normalize`, default false).\n"
    "Yu et al. 2024, \"Language models are Super Mario\", arXiv 2311.03099.",
)
DARE_TIES = TaskArithmetic(
    "dare_ties", sparsify="random", consensus="sum", rescale=True,
    about="DARE with TIES sign consensus: random drop and rescale, then elect a sign and merge.\n\n"
    "τᵢ' = mᵢ ⊙ τᵢ · ‖τᵢ‖₁ / ‖mᵢ ⊙ τᵢ‖₁, mᵢ ~ Bernoulli(density) (`rescale: inverse`: τᵢ' = mᵢ ⊙ τᵢ / density);\n"
    "s = sign Σᵢ wᵢ·τᵢ'; θ = θ₀ + λ·Σᵢ [sign wᵢ·τᵢ' = s]·wᵢ·τᵢ' (normalize default false).\n"
    "Yu et al. 2024, arXiv 2311.03099; Yadav et al. 2023, arXiv 2306.01708.",
)
MAGNITUDE_PRUNE = TaskArithmetic(
    "magnitude_prune", sparsify="magnitude",
    about="Task arithmetic on task vectors pruned by magnitude to `density` (no sign consensus).\n\n"
    "τᵢ' = top-density |τᵢ| entries of τᵢ = θᵢ − θ₀; θ = θ₀ + λ·Σᵢ wᵢ·τᵢ' (÷ Σᵢ wᵢ with `normalize`).\n"
    "The trim step of TIES, Yadav et al. 2023, arXiv 2306.01708.",
)
BREADCRUMBS = TaskArithmetic(
    "breadcrumbs", sparsify="magnitude_outliers",
    about="Model Breadcrumbs: drop the largest `gamma` and the smallest entries of task vectors, keep `density`.\n\n"
    "τᵢ' = τᵢ without its γ·n largest-magnitude entries and its smallest, density·n kept;\n"
    "θ = θ₀ + λ·Σᵢ wᵢ·τᵢ'. A tensor with γ·n < 1 is kept whole.\n"
    "Davari & Belilovsky 2023, \"Model Breadcrumbs\", arXiv 2312.06795.",
)
BREADCRUMBS_TIES = TaskArithmetic(
    "breadcrumbs_ties", sparsify="magnitude_outliers", consensus="sum",
    about="Model Breadcrumbs with TIES sign consensus.\n\n"
    "τᵢ' as in breadcrumbs; s = sign Σᵢ wᵢ·τᵢ'; θ = θ₀ + λ·Σᵢ [sign wᵢ·τᵢ' = s]·wᵢ·τᵢ'.\n"
    "Davari & Belilovsky 2023, arXiv 2312.06795; Yadav et al. 2023, arXiv 2306.01708.",
)
