"""Weight averaging: weighted sums (model soups) and two-model interpolation (WiSE-FT)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ._base import Operator, frozen


class Linear(Operator):
    """Weighted sum of the input models, divided by the sum of the weights when `normalize`.

    θ = Σᵢ wᵢ·θᵢ / Σᵢ wᵢ   (without `normalize`: θ = Σᵢ wᵢ·θᵢ).
    As in mergekit, the base model is not an input of its own: list it among the models to
    include it. Parameters as mergekit's `linear`: `weight` (per model, required),
    `normalize` (default true). Weights summing to zero with `normalize` are an error
    (mergekit divides by zero).
    Wortsman et al. 2022, "Model soups", arXiv 2203.05482.

    Arithmetic as mergekit 0.1.5's `linear` kernel, so that inputs in any dtype give its bytes: the
    weights become a float32 tensor (float64 for float64 inputs), Σᵢ wᵢ·θᵢ accumulates in that
    dtype (`addcmul_`), is divided by the float32 sum of the weights, and is rounded once to the
    inputs' dtype.
    """

    name = "linear"
    elementwise = True
    takes_base = False
    params = frozen({"weight": None, "normalize": True})
    per_model = frozenset({"weight"})

    def merge(self, tensors: Sequence[torch.Tensor], base: torch.Tensor | None = None, **params: Any) -> torch.Tensor:
        self.check_inputs(tensors)
        bound = self.bind(params, len(tensors))
        weights = [self.real("weight", w) for w in bound["weight"]]
        normalize = self.flag("normalize", bound["normalize"])
        if normalize and abs(sum(weights)) < 1e-8:
            raise self.error(f"weights {weights} sum to zero; cannot normalize (set normalize: false)")
        first = tensors[0]
        dtype = _accumulator(first)
        ones = (1,) * first.dim()  # coefficients broadcast as 1-element tensors, as mergekit's
        coefficients = torch.tensor(weights, dtype=dtype, device=first.device)
        out = torch.zeros_like(first, dtype=dtype)
        for tensor, coefficient in zip(tensors, coefficients.unbind(0)):
            out.addcmul_(tensor, coefficient.reshape(ones))
        if normalize:
            out.div_(coefficients.sum().reshape(ones))
        return out.to(first.dtype)


class Average(Operator):
    """Uniform average of the input models (uniform model soup).

    θ = (1/N)·Σᵢ θᵢ. The base model is not an input of its own. Accumulated in float32 (float64
    for float64 inputs) and rounded once to the inputs' dtype, as `linear`.
    Wortsman et al. 2022, "Model soups", arXiv 2203.05482.
    """

    name = "average"
    elementwise = True
    takes_base = False

    def merge(self, tensors: Sequence[torch.Tensor], base: torch.Tensor | None = None, **params: Any) -> torch.Tensor:
        self.check_inputs(tensors)
        self.bind(params, len(tensors))
        out = torch.zeros_like(tensors[0], dtype=_accumulator(tensors[0]))
        for tensor in tensors:
            out.add_(tensor)
        return out.div_(len(tensors)).to(tensors[0].dtype)


class Interpolate(Operator):
    """Linear interpolation between two models (WiSE-FT): (1 − α)·A + α·B.

    θ = (1 − α)·A + α·B. A and B are the two input models in order; with a base model and a
    single input, A is the base (zero-shot) and B the input (fine-tuned), as in WiSE-FT.
    α = 0 gives A, α = 1 gives B; values outside [0, 1] extrapolate. Computed in float32 (float64
    for float64 inputs) and rounded once to the inputs' dtype.
    Wortsman et al. 2022, "Robust fine-tuning of zero-shot models", arXiv 2109.01903.
    """

    name = "interpolate"
    elementwise = True
    params = frozen({"alpha": None})

    def merge(self, tensors: Sequence[torch.Tensor], base: torch.Tensor | None = None, **params: Any) -> torch.Tensor:
        a, b = self.endpoints(tensors, base)
        alpha = self.real("alpha", self.bind(params, len(tensors))["alpha"])
        dtype = _accumulator(a)
        return (a.to(dtype) * (1 - alpha) + b.to(dtype) * alpha).to(a.dtype)


def _accumulator(tensor: torch.Tensor) -> torch.dtype:
    """The dtype sums are kept in: float64 for float64 inputs, else float32 (mergekit's `linear` rule)."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


LINEAR = Linear()
AVERAGE = Average()
INTERPOLATE = Interpolate()
