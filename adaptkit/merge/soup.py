"""Model soups for scripts: uniform, interpolation (WiSE-FT), greedy, and an α sweep.

Wortsman et al. 2022, "Model soups" (arXiv 2203.05482): a uniform soup averages the fine-tunes,
θ = (1/k)·Σ θᵢ; a greedy soup sorts the candidates by their own score and adds each one only if
the soup of the ingredients so far plus it scores no worse. WiSE-FT (arXiv 2109.01903)
interpolates θ(α) = (1 − α)·θ₀ + α·θ₁. Every function streams through the merge engine: give `out`
to get a folder, or leave it out to get the state dict back (fine for small models).

`evaluate` is any callable taking a model folder and returning a score where higher is better.
The merge methods are the registry's defaults for the roles "soup" (a uniform average) and
"interpolation" (two models and one parameter, the mix), so no method is named here.
"""
from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import registry
from ..errors import AdaptkitError
from .engine import run_merge
from ..validate import short

Evaluate = Callable[[Path], float]


def _finite(value: Any, what: str) -> float:
    """`value` as a finite float, else an error naming `what`: NaN has no order, so a soup chosen by
    comparing it would be chosen by accident (and ±inf wins or loses whatever the models are)."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise AdaptkitError(f"{what} must be a number, got {short(value)}") from None
    if not math.isfinite(number):
        raise AdaptkitError(f"{what} is {number}; a soup needs finite numbers")
    return number


def _merge(recipe: dict, out: str | Path | None, **options: Any):
    """Merge into `out`, or into a temporary folder whose tensors are returned as a state dict."""
    options.setdefault("progress", False)
    if out is not None:
        run_merge(recipe, out, **options)
        return Path(out)
    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory(prefix="adaptkit-soup-") as tmp:
        folder = Path(tmp) / "soup"
        run_merge(recipe, folder, **options)
        state: dict = {}
        for f in sorted(folder.glob("*.safetensors")):
            state.update(load_file(f))
        return state


def uniform(models: Sequence[str | Path], out: str | Path | None = None, **options: Any):
    """θ = (1/k)·Σ θᵢ over `models`; a folder if `out` is given, else a state dict."""
    recipe = {"merge_method": registry.default("merge", "soup"), "models": [{"model": str(m)} for m in models]}
    return _merge(recipe, out, **options)


def interpolate(a: str | Path, b: str | Path, alpha: float, out: str | Path | None = None, **options: Any):
    """θ(α) = (1 − α)·θ_a + α·θ_b (WiSE-FT with a = zero-shot, b = fine-tuned)."""
    method = registry.default("merge", "interpolation")
    (mix,) = registry.get("merge", method).params  # the role's method has one parameter, the mix
    recipe = {"merge_method": method, "models": [{"model": str(a)}, {"model": str(b)}], "parameters": {mix: alpha}}
    return _merge(recipe, out, **options)


@dataclass
class SoupResult:
    """What a greedy soup or a sweep found: the chosen ingredients or α, and every score seen."""

    ingredients: list[str]
    score: float
    scores: dict[str, float] = field(default_factory=dict)
    steps: list[dict[str, Any]] = field(default_factory=list)
    output: Any = None


def greedy(candidates: Sequence[str | Path], evaluate: Evaluate, out: str | Path | None = None,
           **options: Any) -> SoupResult:
    """Greedy soup: rank candidates by score, add each only if the soup does not get worse."""
    if not candidates:
        raise AdaptkitError("greedy soup needs at least one candidate")
    scores = {str(c): _finite(evaluate(Path(c)), f"candidate {c}: the score") for c in candidates}
    ranked = sorted(scores, key=scores.get, reverse=True)
    chosen, best = [ranked[0]], scores[ranked[0]]
    steps = [{"added": ranked[0], "score": best, "kept": True}]
    with tempfile.TemporaryDirectory(prefix="adaptkit-greedy-") as tmp:
        for i, candidate in enumerate(ranked[1:]):
            trial = Path(tmp) / f"trial{i}"
            uniform(chosen + [candidate], out=trial, **options)
            score = _finite(evaluate(trial), f"the soup with candidate {candidate} added: the score")
            kept = score >= best
            steps.append({"added": candidate, "score": score, "kept": kept})
            if kept:
                chosen, best = chosen + [candidate], score
    result = SoupResult(chosen, best, scores, steps)
    result.output = uniform(chosen, out=out, **options)  # one ingredient: its exact copy
    return result


def sweep(a: str | Path, b: str | Path, alphas: Sequence[float], evaluate: Evaluate,
          out: str | Path | None = None, **options: Any) -> SoupResult:
    """Score θ(α) for each α; the best one is written to `out` (or returned as a state dict)."""
    if not alphas:
        raise AdaptkitError("sweep needs at least one alpha")
    for alpha in alphas:
        _finite(alpha, "sweep alpha")
    steps = []
    with tempfile.TemporaryDirectory(prefix="adaptkit-sweep-") as tmp:
        for i, alpha in enumerate(alphas):
            folder = Path(tmp) / f"alpha{i}"
            interpolate(a, b, alpha, out=folder, **options)
            steps.append({"alpha": float(alpha), "score": _finite(evaluate(folder), f"alpha {alpha}: the score")})
    best = max(steps, key=lambda s: s["score"])
    result = SoupResult([str(a), str(b)], best["score"], {str(s["alpha"]): s["score"] for s in steps}, steps)
    result.output = interpolate(a, b, best["alpha"], out=out, **options)
    return result
