"""Mode 3 of merging: adapters -> adapter (`output: {kind: adapter, rank: R}`, CLI `--rank R`).

Every input must be an adapter of one variant whose plugin offers the low-rank hooks
(`spec.Factors`, `spec.LowRankWriter`): `factors(adapter, module) -> (A, B, s)` (ΔW = s·B·A, A r × in,
B out × r), `factor_layout(adapter, module) -> {embedding, transposed}` and `write_lowrank(factors,
layouts, template, out_dir)`, which writes an adapter of that variant with ΔW = B·A (scale 1) per module.

- A method that acts on the factors themselves (its plugin offers `merge_factors(factors,
  **params) -> (A, B)`) is exact: per module it gets each input's (Aᵢ, Bᵢ, sᵢ) in the output's
  layout, None where an input lacks the module, with the recipe's parameters at that position,
  and returns the output's factors with ΔW = B·A (scale 1); the engine does no SVD and reports
  error 0, and each module's rank is the sum of the inputs' ranks there (the requested rank only
  asks for an adapter output).
- Any other merge operator runs on the updates themselves: τᵢ = ΔWᵢ (the variant's `delta`, zeros
  where an adapter lacks the module) with base 0, so θ = merge(ΔW₁, …; 0) is the merged update. It
  is re-factored to rank k = min(R, out, in) by truncated SVD (`lowrank.factor_matrix`, randomized
  for a rank far below the dimensions), the best rank-k approximation in the Frobenius norm
  (Eckart–Young): ΔW ≈ U_k S_k V_kᵀ, B = U_k·√S_k, A = √S_k·V_kᵀ; the report gives each module's
  relative error ‖ΔW − B·A‖_F / ‖ΔW‖_F.
- A convolution's factors come out as a conv LoRA holds them (A k × in × *kernel, B out × k × 1…). Where a
  variant stores a kernel flattened (A r × in·kh·kw), only the base weight gives its shape: with a
  `base_model` they are reshaped, without one a module named as a convolution is refused
  (`convert.check_kernels_known`).
"""
from __future__ import annotations

import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .. import registry, spec
from ..adapter import read_adapter
from ..io.dtypes import code_to_torch, parse_dtype
from ..errors import AdaptkitError
from ..files.convert import check_kernels_known, kernel_factors
from ..files.lowrank import factor_matrix, module_delta, settle_layout
from .card import write_card
from .positions import check_positions, layer_positions, operator_params, seeded_generators
from .recipe import Recipe, recipe_inputs
from ..hub.repos import resolve_path
from .sources import open_input, weight_key
from ..spec import AdapterFiles
from ..io.outputs import atomic_output, check_output

def merge_adapters(recipe: Recipe, out: str | Path, *, force: bool = False, seed: int | None = None,
                   progress: bool = True, allow_pickle: bool = False, card: bool = True) -> dict[str, Any]:
    """Merge the recipe's adapters into one adapter in the folder `out`; returns a report (the CLI's
    --json) with each module's rank and relative error ‖ΔW − B·A‖_F / ‖ΔW‖_F (0 in factor space).
    With `card`, the folder also gets a card and the recipe (`card.py` here)."""
    if seed is not None:
        recipe.seed = seed
    start = time.perf_counter()
    adapters = read_inputs(recipe, allow_pickle)
    check_output(out, force=force, inputs=recipe_inputs(recipe))  # before the work, not after it
    method = registry.get("merge", recipe.method)
    exact = factor_merge(method) is not None  # an operator on the factors themselves: no SVD
    variant = check_variant(adapters, exact=exact)
    rank = None if exact else requested_rank(recipe)
    modules = sorted({m for a in adapters for m in a.modules})
    if not modules:
        raise AdaptkitError("the input adapters have no low-rank modules to merge")
    base = open_input(recipe.base, allow_pickle=allow_pickle) if recipe.base else None
    for adapter in adapters if base is not None else ():  # Conv1D or Linear: the base's layers say
        settle_layout(variant, adapter, base.config, recipe.base.model,
                      lambda module: base.get(key) if (key := weight_key(base.store, module)) else None)
    positions = layer_positions([f"{m}.weight" for m in modules], base.config if base else None)
    check_positions(recipe, positions)
    bar = tqdm(modules, unit="module", desc=f"merge {recipe.method}", disable=not progress, leave=False)
    if rank is None:
        factors, layouts = merged_factors(recipe, method, variant, adapters, bar, positions)
        errors = {m: 0.0 for m in modules}
    else:
        factors, layouts, errors = svd_factors(recipe, method, variant, adapters, bar, positions, base, rank)
    bar.close()
    factors = kernel_shaped(factors, base)
    dropped = warn_dropped(adapters)
    dtype = parse_dtype(recipe.out_dtype or recipe.dtype) or input_dtype(adapters[0])
    factors = {m: (a.to(dtype), b.to(dtype)) for m, (a, b) in factors.items()}
    with atomic_output(out, force=force, inputs=recipe_inputs(recipe)) as tmp:
        files = variant.write_lowrank(factors, layouts, dict(adapters[0].config), tmp)
        if card:
            write_card(tmp, [(None, recipe)], model=False)
    report = {"method": recipe.method, "output_kind": "adapter", "variant": variant.name,
              "inputs": [str(r) for r in recipe.models], "base": str(recipe.base) if recipe.base else None,
              "output": str(out), "files": [Path(f).name for f in files], "dropped": dropped, "seed": recipe.seed}
    report.update(rank_report(recipe, factors, errors, rank))
    report["seconds"] = round(time.perf_counter() - start, 3)
    return report


def plan_adapters(recipe: Recipe, *, allow_pickle: bool = False) -> dict[str, Any]:
    """What an adapter output would be, without computing it (`merge --dry-run`)."""
    adapters = read_inputs(recipe, allow_pickle)
    method = registry.get("merge", recipe.method)
    exact = factor_merge(method) is not None
    variant = check_variant(adapters, exact=exact)
    modules = sorted({m for a in adapters for m in a.modules})
    return {"method": recipe.method, "output_kind": "adapter", "variant": variant.name,
            "inputs": [str(r) for r in recipe.models], "modules": len(modules),
            "rank": "sum of the inputs' ranks" if exact else requested_rank(recipe)}


def factor_merge(method):
    """The merge method's `merge_factors` when it acts on the inputs' low-rank factors, else None."""
    return method.merge_factors if isinstance(method, spec.FactorMerge) else None


def rank_report(recipe: Recipe, factors: dict, errors: dict[str, float], rank: int | None) -> dict[str, Any]:
    ranks = {m: int(a.shape[0]) for m, (a, _) in factors.items()}
    report = {"modules": len(factors), "tensors": 2 * len(factors), "rank": rank or max(ranks.values()),
              "ranks": ranks, "errors": errors, "max_error": max(errors.values())}
    if rank is None:
        report["note"] = (f"{recipe.method} is exact: each module's rank is the sum of the inputs' ranks there "
                          f"(up to {report['rank']}); the requested rank only asks for an adapter output")
        if recipe.output_rank and recipe.output_rank != report["rank"]:
            warnings.warn(f"{recipe.method}: the output rank is the sum of the inputs' ranks (up to {report['rank']}), "
                          f"not the requested {recipe.output_rank}", stacklevel=3)
    return report


def read_inputs(recipe: Recipe, allow_pickle: bool = False) -> list[AdapterFiles]:
    """Each recipe input as an adapter; a full model or a `model+adapter` input is an error."""
    adapters = []
    for ref in recipe.models:
        adapter = None if ref.adapters else read_adapter(resolve_path(ref.model), allow_pickle=allow_pickle)
        if adapter is None:
            raise AdaptkitError(f"{ref} is not an adapter: an adapter output (output kind adapter, --rank) merges "
                                "adapters only; drop the rank to merge into a model")
        adapters.append(adapter)
    return adapters


def check_variant(adapters: list[AdapterFiles], *, exact: bool):
    """The inputs' one variant plugin, which must offer the low-rank hooks."""
    names = {}
    for adapter in adapters:
        names.setdefault(adapter.variant, adapter.store.root)
    if len(names) > 1:
        listing = ", ".join(f"{v} ({root})" for v, root in names.items())
        raise AdaptkitError(f"the input adapters mix variants: {listing}; an adapter output needs one variant")
    variant = registry.get("variant", adapters[0].variant)
    for adapter in adapters if isinstance(variant, spec.MergeCheck) else ():
        variant.check_mergeable(adapter)  # raises for adapters with no weight-space form
    for adapter in adapters if isinstance(variant, spec.StoredBiasDelta) else ():
        for module in adapter.modules:
            if variant.delta_bias(adapter, module, None) is not None:
                raise AdaptkitError(f"{adapter.store.root}: '{module}' changes the layer's bias too, which an "
                                    "adapter-to-adapter merge cannot carry; merge it into a base model")
    needed = (spec.Factors, spec.LowRankWriter) if exact else (spec.LowRankWriter,)
    if not all(isinstance(variant, p) for p in needed):
        members = dict.fromkeys(k for p in needed for k, v in vars(p).items() if callable(v) and not k.startswith("_"))
        missing = [h for h in members if not callable(getattr(variant, h, None))]  # in declaration order
        raise AdaptkitError(f"variant '{variant.name}' cannot be merged into an adapter: its plugin lacks the "
                            f"{', '.join(missing)} hook(s)")
    return variant


def requested_rank(recipe: Recipe) -> int:
    rank = recipe.output_rank
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise AdaptkitError(f"'{recipe.method}' into an adapter re-factors by SVD and needs output.rank "
                            f"(--rank) as a positive integer, got {rank!r}")
    return rank


def merged_factors(recipe, method, variant, adapters, bar, positions):
    """Per module, the method's `merge_factors` over each input's (Aᵢ, Bᵢ, sᵢ) (None where an input
    lacks the module), with the recipe's parameters at that position.

    The factors are out × in whatever the base's layout; inputs must agree on that layout."""
    factors, layouts = {}, {}
    for module in bar:
        name = f"{module}.weight"
        inputs = []
        for adapter in adapters:
            if module not in adapter.modules:
                inputs.append(None)
                continue
            a, b, s = variant.factors(adapter, module)
            layout = variant.factor_layout(adapter, module)
            check_layout(module, layouts.setdefault(module, layout), layout)
            inputs.append((a, b, s))
        present = [f for f in inputs if f is not None]
        if len({a.shape[1] for a, _, _ in present}) > 1 or len({b.shape[0] for _, b, _ in present}) > 1:
            raise AdaptkitError(f"{module}: the adapters' factors have different shapes (adapters for different bases?)")
        params = operator_params(recipe, method, name, positions[name], len(inputs))
        factors[module] = method.merge_factors(inputs, **params)
    return factors, layouts


def module_deltas(variant, adapters, module: str, base) -> tuple[list[torch.Tensor], dict[str, bool]]:
    """ΔWᵢ of one module for every input (zeros where an adapter lacks it) and the output layout."""
    weight = None
    if base is not None:
        key = weight_key(base.store, module)
        if key is None:
            raise AdaptkitError(f"the adapters target '{module}', which {base.ref} does not have")
        weight = base.get(key)
    deltas, layout = [], None
    for adapter in adapters:
        if module not in adapter.modules:
            deltas.append(None)
            continue
        deltas.append(module_delta(variant, adapter, module, weight))
        found = variant.factor_layout(adapter, module)
        layout = check_layout(module, layout or found, found)
    deltas = unflattened(deltas)
    shapes = {tuple(d.shape) for d in deltas if d is not None} | ({tuple(weight.shape)} if weight is not None else set())
    if len(shapes) > 1:
        raise AdaptkitError(f"{module}: the inputs give ΔW of shapes {sorted(shapes)} (adapters for different bases?)")
    shape = shapes.pop()
    return [d if d is not None else torch.zeros(shape) for d in deltas], layout


def unflattened(deltas: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """Flat ΔW (out × in·kh·kw, as some variants store a kernel) in the kernel shape another input records, where
    exactly one such shape fits them: then the file that records it settles the layer, without a base."""
    kernels = {tuple(d.shape) for d in deltas if d is not None and d.dim() > 2}
    kernel = kernels.pop() if len(kernels) == 1 else None
    if kernel is None:
        return deltas
    flat = (kernel[0], math.prod(kernel[1:]))
    return [d.reshape(kernel) if d is not None and tuple(d.shape) == flat else d for d in deltas]


def check_layout(module: str, first: dict[str, bool], other: dict[str, bool]) -> dict[str, bool]:
    """`first`, the layout of the module's first input, if `other` agrees: both lie on the same base layer, so
    only a format's guess (PEFT saves the flag of the last layer it adapted) can make them differ."""
    if first["transposed"] != other["transposed"]:
        raise AdaptkitError(f"{module}: the adapters disagree on whether its base weight is stored in × out (GPT-2 "
                            "Conv1D); give the base model (base_model, --base) to settle it")
    return first


def svd_factors(recipe, method, variant, adapters, bar, positions, base, rank):
    """Merge each module's ΔWᵢ with the operator (base 0), then truncated SVD to `rank`."""
    factors, layouts, errors, clamped = {}, {}, {}, []
    for module in bar:
        name = f"{module}.weight"
        deltas, layout = module_deltas(variant, adapters, module, base)
        params = operator_params(recipe, method, name, positions[name], len(deltas))
        merged = method.merge(deltas, torch.zeros_like(deltas[0]), **params)
        target = merged.T if layout["transposed"] else merged
        kernel = tuple(target.shape) if target.dim() > 2 else None  # a convolution: over its flattened kernels
        target = target.flatten(1) if kernel else target
        if rank > min(target.shape):
            clamped.append(f"{module} ({target.shape[0]}×{target.shape[1]})")
        seed = seeded_generators(recipe.seed, name, 1)[0].initial_seed()
        f = factor_matrix(target, rank, keep_rank=True, seed=seed)
        a, b = f.a, f.b
        if kernel:  # as a conv LoRA holds them: A k × in × *kernel, B out × k × 1…
            a, b = a.reshape(f.rank, *kernel[1:]), b.reshape(kernel[0], f.rank, *(1,) * (len(kernel) - 2))
        factors[module], layouts[module], errors[module] = (a, b), layout, f.error
    if clamped:
        warnings.warn(f"rank {rank} exceeds min(out, in) of {len(clamped)} module(s), e.g. {clamped[0]}: "
                      "using min(out, in) there (exact)", stacklevel=3)
    return factors, layouts, errors


def kernel_shaped(factors: dict, base) -> dict:
    """Flat factors of a convolution (a kernel some variants store flattened) as a conv LoRA's, where the base
    says the module is one; without a base, refused where the module is named as a convolution."""
    if base is None:
        check_kernels_known((m, a) for m, (a, _) in factors.items())
        return factors
    shapes = {m: tuple(base.store.info(key).shape) if (key := weight_key(base.store, m)) else () for m in factors}
    return {m: kernel_factors(a, b, shapes[m]) for m, (a, b) in factors.items()}


def warn_dropped(adapters: list[AdapterFiles]) -> list[str]:
    """Full tensors saved beside the low-rank ones (modules_to_save) do not go into the output."""
    dropped = sorted({name for a in adapters for name in a.saved})
    if dropped:
        warnings.warn(f"{len(dropped)} full tensor(s) saved with the input adapters (modules_to_save, e.g. "
                      f"'{dropped[0]}') are not merged into the adapter output and are left out", stacklevel=3)
    return dropped


def input_dtype(adapter: AdapterFiles) -> torch.dtype:
    """The dtype of the adapter's first low-rank tensor (the output keeps it unless told otherwise)."""
    roles = next(iter(adapter.modules.values()))
    return code_to_torch(adapter.store.info(next(iter(roles.values()))).dtype)
