"""Truncated SVD for adapters: factor a weight change ΔW (out × in) as B·A of a chosen rank.

    ΔW ≈ U_k·S_k·V_kᵀ,  A = √S_k·V_kᵀ (k × in),  B = U_k·√S_k (out × k)

The optimal rank-k approximation (Eckart–Young) with relative error ‖ΔW − B·A‖_F / ‖ΔW‖_F =
√(Σ_{i>k} σᵢ²) / √(Σ σᵢ²). Two exact routes, both faster than a full SVD of a wide matrix:

- a product s·B·A of known factors (resizing a LoRA): QR of B and Aᵀ reduces it to the SVD of
  an r × r matrix;
- any matrix: the eigendecomposition of the smaller Gram matrix M·Mᵀ, whose eigenvectors are
  the singular vectors of the short side; the long side's are Mᵀ·u/σ for the kept ones only. It
  gives the whole spectrum, so choosing the rank by an energy fraction costs nothing extra.

and one approximate route, where the caller gives a seed and the rank is far below the dimensions
(4k < min(out, in), as when an adapter merge re-factors every module of a model to rank 16):
randomized SVD (Halko et al. 2011, `torch.svd_lowrank`, 4 power iterations, k + 8 vectors, the
generator seeded so reruns are identical). It finds only the top k + 8 singular values, so its
error is measured as ‖ΔW − B·A‖_F / ‖ΔW‖_F instead of read off the spectrum.

Ranks above a matrix's numerical rank are clamped (with a warning by the caller), unless the caller
keeps the rank asked for (`keep_rank`: an adapter output has the rank the user gave, k = min(rank,
out, in), its last factors near zero).

`module_delta` lays ΔW out as the base stores the weight; `settle_layout` says how, from the base model.
"""
from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

import torch

from .. import spec
from ..errors import AdaptkitError


@dataclass
class Factored:
    a: torch.Tensor  # k × in
    b: torch.Tensor  # out × k
    rank: int  # k as used
    requested: int | None  # the rank asked for (None with energy)
    numerical_rank: int
    error: float  # relative Frobenius error of B·A against the input

    @property
    def clamped(self) -> bool:
        return self.requested is not None and self.requested > self.rank


def _choose(s: torch.Tensor, rank: int | None, energy: float | None, numerical: int) -> int:
    if energy is not None:
        share = torch.cumsum(s.double() ** 2, 0) / max(float((s.double() ** 2).sum()), 1e-300)
        rank = int(torch.searchsorted(share, torch.tensor(energy, dtype=share.dtype))) + 1
    return max(1, min(int(rank), numerical)) if numerical else 1


def _numerical_rank(s: torch.Tensor, shape: tuple[int, int]) -> int:
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    # Float32 round-off leaves singular values near eps·σ₁·√n where a matrix has none; real
    # fine-tuning changes sit orders of magnitude above that.
    tol = float(s[0]) * 10 * torch.finfo(torch.float32).eps * max(shape) ** 0.5
    return int((s > tol).sum())


def _finish(u, s, vh, rank, energy, shape, keep_rank: bool = False) -> Factored:
    """Factors from a (partial) SVD: `u`/`vh` may be callables giving the first k vectors."""
    numerical = _numerical_rank(s, shape)
    k = min(rank, *shape) if keep_rank else _choose(s, rank, energy, numerical)
    u = u(k) if callable(u) else u[:, :k]
    vh = vh(k) if callable(vh) else vh[:k]
    root = s[:k].clamp_min(0).sqrt()
    total = float((s.double() ** 2).sum())
    tail = float((s[k:].double() ** 2).sum())
    error = (tail / total) ** 0.5 if total > 0 else 0.0
    return Factored((root[:, None] * vh).float().contiguous(), (u * root).float().contiguous(), k, rank, numerical, error)


def factor_matrix(m: torch.Tensor, rank: int | None = None, energy: float | None = None, *,
                  keep_rank: bool = False, seed: int | None = None) -> Factored:
    """B·A ≈ m (out × in) at `rank`, or the smallest rank keeping `energy` of Σσ².

    `keep_rank`: k = min(rank, out, in) even past m's numerical rank. `seed`: a rank far below the
    dimensions takes the randomized route (the module docstring), seeded with it."""
    m = m.float()
    out_f, in_f = m.shape
    if seed is not None and rank is not None and 4 * min(rank, out_f, in_f) < min(out_f, in_f):
        return _randomized(m, rank, seed, keep_rank)
    if keep_rank or min(out_f, in_f) <= 64 or min(out_f, in_f) * 4 > max(out_f, in_f) * 3:
        # Square-ish or small: a direct SVD costs about the same as the Gram route. A kept rank may
        # reach past the numerical rank, where the Gram route's Mᵀu/σ has no σ to divide by.
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        return _finish(u, s, vh, rank, energy, (out_f, in_f), keep_rank)
    wide = in_f > out_f
    small = m if wide else m.T  # k × n with k < n
    # A float32 Gram matrix loses nothing that matters here (measured: the truncation error agrees
    # with a float64 SVD's to 1e-7 relative); its eigendecomposition runs in float64.
    values, vectors = torch.linalg.eigh((small @ small.T).double())
    order = torch.argsort(values, descending=True)
    s = values[order].clamp_min(0).sqrt()
    near = vectors[:, order]

    def far(k: int) -> torch.Tensor:  # the other side's first k singular vectors: Mᵀu / σ
        keep = s[:k].clamp_min(torch.finfo(torch.float64).tiny)
        return (small.T.double() @ near[:, :k]) / keep

    if wide:
        return _finish(near, s, lambda k: far(k).T, rank, energy, (out_f, in_f))
    return _finish(far, s, lambda k: near[:, :k].T, rank, energy, (out_f, in_f))


def _randomized(m: torch.Tensor, rank: int, seed: int, keep_rank: bool) -> Factored:
    k = min(rank, *m.shape)
    with torch.random.fork_rng(devices=[]):  # the caller's random state stays as it was
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(m, q=min(k + 8, *m.shape), niter=4)
    f = _finish(u, s, v.T, rank, None, tuple(m.shape), keep_rank)
    norm = torch.linalg.norm(m)
    f.error = float(torch.linalg.norm(m - f.b @ f.a) / norm) if norm > 0 else 0.0
    return f


def factor_product(a: torch.Tensor, b: torch.Tensor, scale: float, rank: int | None = None,
                   energy: float | None = None) -> Factored:
    """B'·A' ≈ scale·B·A (A r × in, B out × r) through QR: only an r × r SVD."""
    a, b = a.double(), b.double()
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    uc, s, vch = torch.linalg.svd(scale * (rb @ ra.T))
    return _finish(qb @ uc, s, (qa @ vch.T).T, rank, energy, (b.shape[0], a.shape[1]))


#: transformers model types with GPT-2 `Conv1D` layers (weights stored in × out), and those layers' names
#: there (their heads, e.g. `lm_head` or `score`, are `nn.Linear`).
CONV1D_MODELS = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer", "clvp"})
CONV1D_LAYERS = frozenset({"c_attn", "q_attn", "c_proj", "c_fc"})
#: transformers model types whose MoE blocks stack their experts in × out (E × in × out: marked
#: `use_experts_implementation(is_transposed=True)`, the flag PEFT's `target_parameters` reads), and those
#: stacked parameters' names in the block's `experts` module. Other stacked experts are E × out × in.
TRANSPOSED_EXPERTS_MODELS = frozenset({"gpt_oss", "aria", "aria_text", "openai_privacy_filter"})
EXPERTS_PARAMETERS = frozenset({"gate_up_proj", "down_proj"})


def stored_transposed(model_config: dict[str, Any] | None, module: str) -> bool | None:
    """Whether the base model stores `module`'s weight in × out (a GPT-2 `Conv1D`, or a parameter of stacked
    experts marked `is_transposed`), from its config.json's model_type; None where the config names no
    model_type, so the layer types are unknown."""
    kind = (model_config or {}).get("model_type")
    if kind is None:
        return None
    owner, _, name = module.rpartition(".")
    if kind in TRANSPOSED_EXPERTS_MODELS:
        return owner.rpartition(".")[2] == "experts" and name in EXPERTS_PARAMETERS
    return kind in CONV1D_MODELS and name in CONV1D_LAYERS


def settle_layout(variant: Any, adapter: spec.AdapterFiles, model_config: dict[str, Any] | None, where: Any,
                  weight: Callable[[str], torch.Tensor | None]) -> None:
    """Each module's layout (`adapter.transposed`) from the base model `where` it goes into (`weight(module)`:
    its weight, or None).

    A format's layout is a guess: PEFT saves one flag for all modules, the one it set at the last layer
    it adapted, so with Conv1D and Linear targets it is wrong for some (silently so on square layers).
    The base's model_type tells Conv1D layers (and stacked experts stored in × out) apart, square ones
    included (`adapter.settled`). Without one, a non-square weight tells by the shape
    ΔW fits, and a square one is refused where the adapter holds Conv1D layers (it cannot be told)."""
    if (model_config or {}).get("model_type") is not None:
        adapter.transposed.update({m: bool(stored_transposed(model_config, m)) for m in adapter.modules})
        adapter.settled = model_config["model_type"]
        return
    square = []
    for module in adapter.modules:
        w = weight(module)
        if w is not None and w.dim() == 2:
            if w.shape[0] == w.shape[1]:
                square.append(module)
            else:
                adapter.transposed[module] = _fitting(variant, adapter, module, w)
    if square and any(adapter.transposed.get(m) for m in adapter.modules):
        raise AdaptkitError(f"adapter {adapter.store.root} holds GPT-2 Conv1D layers (weight stored in × out), and "
                            f"'{square[0]}' is square: {where} has no model_type in its config.json to tell whether "
                            "it is one")


def _fitting(variant: Any, adapter: spec.AdapterFiles, module: str, w: torch.Tensor) -> bool:
    """The layout in which the module's ΔW has the base weight's shape (the format's guess first)."""
    guess = bool(adapter.transposed.get(module))
    for flip in (guess, not guess):
        adapter.transposed[module] = flip
        try:
            if tuple(module_delta(variant, adapter, module, w.float()).shape) == tuple(w.shape):
                return flip
        except AdaptkitError:  # e.g. IA3's vector that does not scale the weight laid out so
            continue
    return guess  # neither fits: the merge reports the shapes


def module_delta(variant: Any, adapter: spec.AdapterFiles, module: str, base: torch.Tensor | None = None) -> torch.Tensor:
    """ΔW of one stored module, shaped like the base weight (float32): the variant's own `delta` where it
    has one (`spec.StoredDelta`), else s·B·A from its `factors`, transposed where `factor_layout` says the
    base weight lies in × out (an embedding, or `fan_in_fan_out`), as LoRA's own ΔW is. So a variant whose
    ΔW is its low-rank product need not define `delta` at all."""
    if isinstance(variant, spec.StoredDelta):
        return variant.delta(adapter, module, base)
    if not isinstance(variant, spec.Factors):
        raise AdaptkitError(f"adapter {adapter.store.root}: module '{module}' of a {variant.name} adapter has no ΔW "
                            "(the variant defines neither delta nor factors)")
    a, b, s = variant.factors(adapter, module)
    layout = variant.factor_layout(adapter, module)
    update = s * (b.float() @ a.float())
    return update.T if layout.get("embedding") or layout.get("transposed") else update


def factor_kernel(delta: torch.Tensor, rank: int | None = None,
                  energy: float | None = None) -> tuple[Factored, torch.Tensor, torch.Tensor]:
    """A convolution's ΔW (out × in × *kernel) factored over its flattened kernels, and the factors as a
    conv LoRA (LoCon) holds them: A r × in × *kernel (a convolution like the layer's), B out × r × 1…"""
    f = factor_matrix(delta.flatten(1), rank, energy)
    ones = (1,) * (delta.dim() - 2)
    return f, f.a.reshape(f.rank, *delta.shape[1:]), f.b.reshape(delta.shape[0], f.rank, *ones)
