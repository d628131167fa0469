"""Karcher mean: the Riemannian centre of mass of the models' directions, scaled by their mean norm."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ._base import Operator, frozen


class Karcher(Operator):
    """Uniform Karcher (Fréchet) mean on the unit hypersphere, by fixed-point iteration, per tensor.

    With the N inputs flattened, uᵢ = θᵢ/‖θᵢ‖ and αᵢ = 1/N, over the inputs with ‖θᵢ‖ > tol (their
    αᵢ renormalized to sum 1):
    m₀ = Σᵢ αᵢ·uᵢ / ‖Σᵢ αᵢ·uᵢ‖ (the first uᵢ if that norm is < tol); then up to `max_iter` times
    Ωᵢ = arccos clamp(⟨m, uᵢ⟩, −1, 1),  g = Σ_{Ωᵢ ≥ tol} αᵢ·Ωᵢ/sin Ωᵢ·(uᵢ − cos Ωᵢ·m),
    stop when ‖g‖ < tol, else m ← cos‖g‖·m + sin‖g‖·g/‖g‖, renormalized;
    θ = (Σᵢ ‖θᵢ‖/N)·m (every input's norm, also those ≤ tol). All norms ≤ tol give zeros.
    As in mergekit's `karcher`, the base model is no input of its own (list it among the models, or
    it is appended as one more input). Parameters: `max_iter` (default 10, an integer ≥ 0) and
    `tol` (default 1e-5, ≥ 0). Norms are taken in float32 (float64 inputs: float64) and every step
    runs in mergekit's order in the inputs' dtype, so bf16 inputs give its bytes.
    Karcher 1977, "Riemannian center of mass and mollifier smoothing", Comm. Pure Appl. Math. 30(5);
    for merging: "Functionality-Oriented LLM Merging on the Fisher-Rao Manifold", arXiv 2603.04972.
    """

    name = "karcher"
    takes_base = False
    params = frozen({"max_iter": 10, "tol": 1e-5})
    # mergekit's recipes (and its tests) give every model a `weight`; the Karcher mean weighs every input alike.
    ignored_params = frozenset({"weight"})

    def merge(self, tensors: Sequence[torch.Tensor], base: torch.Tensor | None = None, **params: Any) -> torch.Tensor:
        self.check_inputs(tensors)
        bound = self.bind(params, len(tensors))
        max_iter = self.count("max_iter", bound["max_iter"])
        tol = self.real("tol", bound["tol"])
        if tol < 0:
            raise self.error(f"tol must be ≥ 0, got {tol}")
        if len(tensors) == 1:
            return tensors[0].clone()
        return karcher_mean(list(tensors), max_iter, tol)

    def count(self, key: str, value: Any) -> int:
        # mergekit reads an integer (10.0 too, as pydantic does); 2.5 iterations means nothing.
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self.error(f"'{key}' must be a whole number ≥ 0, got {value!r}")
        return value


def karcher_mean(tensors: list[torch.Tensor], max_iter: int, tol: float) -> torch.Tensor:
    """The uniform Karcher mean of `tensors` (see `Karcher`), in mergekit's order of operations."""
    exact = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    norms = [torch.linalg.vector_norm(x.to(exact)) for x in tensors]
    units = [torch.zeros_like(x) if n.item() == 0.0 else (x / n).to(x.dtype) for x, n in zip(tensors, norms)]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    uniform = 1.0 / len(tensors)
    alphas = [uniform / sum([uniform] * len(valid))] * len(valid)  # renormalized as mergekit does, to the bit
    units = [units[i] for i in valid]
    mean = torch.zeros_like(units[0])
    for alpha, unit in zip(alphas, units):
        mean += alpha * unit  # (not add_(alpha=): the product is rounded first, as in mergekit)
    mean_norm = torch.linalg.vector_norm(mean.to(exact))
    dtype = mean.dtype
    mean = units[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for alpha, unit in zip(alphas, units):
            cos = torch.clamp(torch.dot(mean.flatten(), unit.flatten()), -1.0, 1.0)
            omega = torch.arccos(cos)
            if omega.item() < tol:
                continue
            tangent += alpha * (omega / torch.sin(omega)) * (unit - cos * mean)
        length = torch.linalg.vector_norm(tangent.to(exact))
        if length.item() < tol:
            break
        mean = (torch.cos(length) * mean + torch.sin(length) * (tangent / length)).to(dtype)
        norm = torch.linalg.vector_norm(mean.to(exact))
        if norm.item() > tol:
            mean = (mean / norm).to(dtype)
    scale = sum(uniform * n for n in norms)
    return scale * mean


KARCHER = Karcher()
