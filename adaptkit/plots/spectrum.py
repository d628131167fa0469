"""An adapter's spectrum: per module the singular values σ₁ ≥ σ₂ ≥ … of its ΔW, and the picture of them
behind choosing a rank (`convert --rank`) or an energy fraction (`--energy`).

The energy kept at rank k is E(k) = Σ_{i≤k} σᵢ² / Σ σᵢ²; truncating ΔW to rank k leaves the relative
error √(1 − E(k)) (Eckart–Young, as `files.lowrank` factors). ΔW comes from the variant, one module at a
time: where it has an exact low-rank form s·B·A, from the r × r core of the QR factors of B and Aᵀ
(ΔW = Q_B·(s·R_B·R_Aᵀ)·Q_Aᵀ has that core's singular values), else from its ΔW in full
(`files.lowrank.module_delta`), with the base model's weight where the variant's ΔW depends on it.
"""
from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

from .. import registry, spec, validate
from ..errors import AdaptkitError
from .figure import natural_key, new_figure, short_names

#: Hosted LoRA services (fine-tuning and serving APIs) cap a LoRA's rank at 32: the picture shows where it falls.
SERVICE_RANK_CAP = 32
#: Modules drawn in colour and named in the legend; the rest are thin grey lines behind the median.
LEGEND_CAP = 6


def adapter_spectra(path: str | Path, *, base: str | Path | None = None, allow_pickle: bool = False,
                    progress: bool = False) -> dict[str, list[float]]:
    """module -> the singular values of its ΔW, largest first (the module docstring says how)."""
    import torch
    from tqdm.auto import tqdm

    from ..adapter import read_adapter
    from ..files.lowrank import module_delta, settle_layout
    from ..hub.repos import resolve_path
    from ..io.store import open_store
    from ..merge.sources import weight_key

    adapter = read_adapter(path, allow_pickle=allow_pickle)
    if adapter is None:
        raise AdaptkitError(f"{path} holds a model, not an adapter: a spectrum is drawn of an adapter's ΔW")
    variant = registry.get("variant", adapter.variant)
    if isinstance(variant, spec.MergeCheck):
        variant.check_mergeable(adapter)  # activation-space variants have no ΔW: said by the variant
    store = open_store(resolve_path(str(base)), allow_pickle=allow_pickle) if base is not None else None

    def weight(module: str):
        key = weight_key(store, module) if store is not None else None
        if store is not None and key is None:
            raise AdaptkitError(f"the base model has no weight for '{module}'; is it the adapter's base?")
        return store.get(key) if key is not None else None

    if store is not None:
        config = validate.model_config(store.json_file("config.json"), store.root / "config.json")
        settle_layout(variant, adapter, config, base, weight)
    spectra = {}
    for module in tqdm(sorted(adapter.modules, key=natural_key), desc="spectrum", unit="module", disable=not progress,
                       leave=False):
        factors = _exact(variant, adapter, module)
        if factors is not None:
            a, b, s = (x.double().flatten(1) if torch.is_tensor(x) else x for x in factors)
            core = s * (torch.linalg.qr(b).R @ torch.linalg.qr(a.T).R.T)
        else:
            w = weight(module)
            core = module_delta(variant, adapter, module, None if w is None else w.float()).double().flatten(1)
        spectra[module] = torch.linalg.svdvals(core).tolist()
    if not spectra:
        raise AdaptkitError(f"{path}: the adapter has no modules with a ΔW")
    return spectra


def _exact(variant, adapter, module: str):
    """(A, B, s) where the variant holds the module as an exact low-rank product s·B·A, else None (the same
    precedence as `convert`'s resize: a module with no such form, DoRA's or a conv kernel's, is taken whole)."""
    if not isinstance(variant, spec.Factors):
        return None
    try:
        return variant.factors(adapter, module)
    except AdaptkitError:
        return None


def energy(values: Sequence[float]) -> list[float]:
    """E(k) for k = 1…len(values): the share of Σσ² the first k singular values keep."""
    total = sum(v * v for v in values)
    kept, out = 0.0, []
    for v in values:
        kept += v * v
        out.append(kept / total)
    return out


def spectrum_figure(spectra: Mapping[str, Sequence[float]], cap: int = SERVICE_RANK_CAP):
    """Left: σᵢ/σ₁ per module (log scale); right: the energy E(k) kept at each rank k. Each panel has the
    all-module median in black and a vertical line at rank `cap`; modules whose ΔW is zero are left out."""
    live = {m: list(v) for m, v in spectra.items() if v and v[0] > 0}
    if not live:
        raise AdaptkitError("every module's ΔW is zero (an untrained adapter?): there is no spectrum to draw")
    longest = max(map(len, live.values()))
    curves = {m: ([x / v[0] for x in v], energy(v)) for m, v in live.items()}
    # The modules that need the most rank for 99% of the energy are the ones a rank cap hurts first.
    need = {m: next(k for k, e in enumerate(curves[m][1], 1) if e >= 0.99 - 1e-12) for m in live}
    named = sorted(live, key=lambda m: (-need[m], natural_key(m)))[:LEGEND_CAP]
    short = short_names(sorted(live, key=natural_key))
    fig, (sigma, kept) = new_figure(2)
    for m in sorted(live, key=natural_key):
        style = dict(label=short[m], linewidth=1.4) if m in named else dict(color="0.75", linewidth=0.7)
        ranks = range(1, len(curves[m][0]) + 1)
        sigma.plot(ranks, curves[m][0], **style)
        kept.plot(ranks, curves[m][1], **style)
    ranks = range(1, longest + 1)
    pad = [(c[0] + [0.0] * (longest - len(c[0])), c[1] + [1.0] * (longest - len(c[1]))) for c in curves.values()]
    median_sigma = [statistics.median(p[0][i] for p in pad) for i in range(longest)]
    median_energy = [statistics.median(p[1][i] for p in pad) for i in range(longest)]
    sigma.plot(ranks, median_sigma, color="black", linewidth=2.2, label=f"median of {len(live)} modules", gid="median")
    kept.plot(ranks, median_energy, color="black", linewidth=2.2, label=f"median of {len(live)} modules", gid="median")
    for ax in (sigma, kept):
        ax.axvline(cap, color="tab:red", linestyle="--", linewidth=1.2, label=f"rank {cap} (services' cap)", gid="cap")
        ax.set_xlim(0.5, max(longest, cap + 1) + 0.5)
        ax.set_xlabel("rank k")
    at_cap = median_energy[min(cap, longest) - 1]
    kept.plot([cap], [at_cap], "o", color="tab:red")
    kept.text(0.97, 0.04, f"median energy kept at rank {cap}: {at_cap:.1%}", transform=kept.transAxes, ha="right",
              color="tab:red", fontsize=9, gid="at_cap")
    sigma.set_yscale("log")
    sigma.set(ylabel="σₖ / σ₁", title="singular values of ΔW, normalized")
    kept.set(ylabel="energy kept Σᵢ≤ₖ σᵢ² / Σ σᵢ²", title="energy kept at rank k", ylim=(0, 1.03))
    others = len(live) - len(named)
    sigma.legend(fontsize=7, loc="lower left", title=f"+{others} more modules (grey)" if others else None,
                 title_fontsize=7)
    if len(spectra) > len(live):
        fig.suptitle(f"{len(spectra) - len(live)} module(s) with ΔW = 0 left out", fontsize=9)
    return fig


__all__ = ["SERVICE_RANK_CAP", "adapter_spectra", "energy", "spectrum_figure"]
