"""Orthogonal matrices from free parameters, as OFT and BOFT build them (private to those two plugins).

A skew-symmetric Q (Qᵀ = −Q) gives an orthogonal R by the Cayley transform; both plugins use PEFT's
sign, R = (I − Q)(I + Q)⁻¹ (the paper's (I + Q)(I − Q)⁻¹ with Q ↦ −Q, orthogonal all the same). OFT's
Cayley–Neumann option replaces it by a truncated series of (I + Q)(I − Q)⁻¹ = I + 2Q + 2Q² + …, cut as
PEFT ≥ 0.18 cuts it (the last kept power has weight 1). Both plugins rotate the input features of a
layer with W (out × d, a convolution's filter flattened to d = channels·kh·kw) by a d × d orthogonal M:
PEFT turns the input row x into x·M, so y = W·(x·M)ᵀ = (W·Mᵀ)·xᵀ and, merged, W' = W·Mᵀ.

Torch is imported inside each function: plugin modules are imported to list and inspect them.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from adaptkit.plugin import AdaptkitError

if TYPE_CHECKING:
    import torch


ALLOWED = {"linear": "nn.Linear", "conv2d": "nn.Conv2d (groups=1)", "embedding": "nn.Embedding"}


def features(target, variant: str, kinds: tuple[str, ...], path: str) -> tuple[str, int]:
    """(kind, d) of a layer the variant rotates, d its rotated features: "linear" (in_features), "conv2d"
    (in_channels·kh·kw, the filter as PEFT flattens it) or "embedding" (the embedding dimension); any other
    layer is refused by name."""
    kind, dim = None, 0
    if target.kind == "conv" and len(target.kernel) == 2 and target.groups == 1:
        kind, dim = "conv2d", target.in_features * target.kernel[0] * target.kernel[1]
    elif target.kind == "linear" and not target.transposed:
        kind, dim = "linear", target.in_features
    elif target.kind == "embedding":
        kind, dim = "embedding", target.out_features
    if kind in kinds:
        return kind, dim
    what = ("a GPT-2 Conv1D" if target.kind == "linear" else "an nn.Embedding" if target.kind == "embedding"
            else f"a grouped convolution (groups={target.groups})" if target.kind == "conv" and target.groups > 1
            else f"an nn.Conv{len(target.kernel)}d" if target.kind == "conv" else f"a {target.kind} layer")
    names = [ALLOWED[k] for k in kinds]
    raise AdaptkitError(f"{path}: {variant} goes on {', '.join(names[:-1])} and {names[-1]} layers, not on {what} "
                        f"(PEFT's {variant} neither); leave it out of target_modules")


def block_size(elements: int) -> int:
    """b with b·(b − 1)/2 == elements (the free entries of a b × b skew-symmetric block), or 0."""
    b = (1 + math.isqrt(1 + 8 * elements)) // 2
    return b if b * (b - 1) // 2 == elements else 0


def skew(vec: torch.Tensor, size: int) -> torch.Tensor:
    """(n, size·(size−1)/2) free entries → n skew-symmetric blocks: the strict upper triangle filled
    row by row (torch.triu_indices' order, PEFT's layout), minus its transpose."""
    import torch

    rows, cols = torch.triu_indices(size, size, 1, device=vec.device)
    upper = vec.new_zeros(vec.shape[0], size, size)
    upper[:, rows, cols] = vec
    return upper - upper.transpose(-2, -1)


def cayley(q: torch.Tensor) -> torch.Tensor:
    """R = (I − Q)(I + Q)⁻¹ for a batch of skew-symmetric Q, solved (not inverted) in float32 or wider."""
    import torch

    work = q if q.dtype == torch.float64 else q.float()
    eye = torch.eye(q.shape[-1], dtype=work.dtype, device=q.device).expand_as(work)
    return torch.linalg.solve(eye + work, eye - work, left=False)


def neumann(q: torch.Tensor, terms: int) -> torch.Tensor:
    """PEFT's Cayley–Neumann series for (I + Q)(I − Q)⁻¹ with `terms` terms: I, then + 2Q, then
    + 2Q² + … + 2Q^(t−2) + Q^(t−1) for t > 2 (3 and 4 terms both end I + 2Q + 2Q² + Q³)."""
    import torch

    r = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device).repeat(q.shape[0], 1, 1)
    if terms > 1:
        r = r + 2 * q
    if terms > 2:
        power = q @ q
        r = r + 2 * power
        for _ in range(3, terms - 1):
            power = power @ q
            r = r + 2 * power
        r = r + power @ q
    return r


def coft_project(vec: torch.Tensor, size: int, eps: float) -> torch.Tensor:
    """Constrained OFT (COFT): each block's Q kept within ‖Q‖_F ≤ ε' = ε/√n of 0 (n blocks stored),
    scaled back onto that sphere where it lies outside: Q ↦ ε'·Q/‖Q‖_F. Returns the free entries."""
    import torch

    q = skew(vec, size)
    bound = eps / math.sqrt(q.shape[0])
    norm = torch.linalg.norm(q, dim=(1, 2), keepdim=True)
    projected = torch.where(norm <= bound, q, bound * (q / norm))
    rows, cols = torch.triu_indices(size, size, 1, device=vec.device)
    return projected[:, rows, cols]


def block_diagonal(blocks: torch.Tensor, count: int) -> torch.Tensor:
    """The block-diagonal matrix of `blocks` (k, b, b); one block (k = 1) repeated `count` times."""
    import torch

    if blocks.shape[0] == 1 and count > 1:
        blocks = blocks.expand(count, -1, -1)
    return torch.block_diag(*blocks.unbind(0))


def rotate_features(x: torch.Tensor, blocks: torch.Tensor, count: int) -> torch.Tensor:
    """x·diag(blocks) block by block (x's last dim as `count` runs of b; one stored block serves all), in float32."""
    import torch

    if blocks.shape[0] == 1 and count > 1:
        blocks = blocks.expand(count, -1, -1)
    runs = x.to(blocks.dtype).reshape(*x.shape[:-1], count, blocks.shape[-1])
    return torch.einsum("...rk,rkc->...rc", runs, blocks).reshape(x.shape).to(x.dtype)


def drop_blocks(blocks: torch.Tensor, p: float) -> torch.Tensor:
    """Multiplicative dropout (training only): ⌊p·k⌋ of the k blocks (b × b) drawn at random become I."""
    import torch

    count = int(p * blocks.shape[0])
    if count == 0:
        return blocks
    mask = torch.zeros(blocks.shape[0], 1, 1, dtype=blocks.dtype, device=blocks.device)
    mask[torch.randperm(blocks.shape[0], device=blocks.device)[:count]] = 1
    eye = torch.eye(blocks.shape[-1], dtype=blocks.dtype, device=blocks.device)
    return (1 - mask) * blocks + mask * eye


def butterfly_perm(n: int, blocks: int, half: int, factors: int) -> list[int]:
    """The block butterfly permutation of BOFT's factor with `blocks` blocks (Liu et al. 2024, Fig. 2):
    within each group of n/blocks indices, the runs of `half` indices are reordered evens first, then
    odds (runs 0, 2, 4, …, 1, 3, …). The identity where there is one factor only."""
    if factors == 1:
        return list(range(n))
    group = n // blocks
    runs = group // half
    order = [run * half + i for run in [*range(0, runs, 2), *range(1, runs, 2)] for i in range(half)]
    return [start + j for start in range(0, n, group) for j in order]


def rotated(weight: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """W·Mᵀ with W's trailing dims (a convolution's channels × kh × kw) flattened to M's size."""
    flat = weight.reshape(weight.shape[0], -1)
    return (flat @ m.T.to(flat.dtype)).reshape(weight.shape)
