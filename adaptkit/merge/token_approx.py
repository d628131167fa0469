"""Rows for tokens a model's vocabulary lacks, from a donor model that has them (`adaptkit tokensurgeon`).

The model's embedding E (rows: its tokens) and the donor's F (rows: the donor's tokens, another width
allowed) share a set S of tokens. A token t only the donor has gets a row of E's space by one of:

- `omp` (default): orthogonal matching pursuit picks k shared tokens s₁..s_k and coefficients c that
  best give F[t] ≈ Σ cᵢ F[sᵢ] (greedy: each step adds the shared row most correlated with the residual,
  then re-fits all coefficients by least squares through a QR update); the new row is Σ cᵢ E[sᵢ]
  (Pati, Rezaiifar, Krishnaprasad 1993; for tokenizer transplants, Goddard & Fernandes Neto 2025,
  "Training-Free Tokenizer Transplantation via Orthogonal Matching Pursuit", arXiv 2506.06607).
- `common_interpolation`: the k nearest shared tokens to F[t] (euclidean, or cosine distance with
  cosine_similarity), weighted by 1/distance (1 − distance for cosine), normalized to sum 1
  (distance_proportional); by the affine least squares of F[t] on them, Σwᵢ = 1 (barycentric); or by
  plain least squares (least_squares); the new row is Σ wᵢ E[sᵢ].
- `landmark_pca`: both spaces' shared rows centred and reduced by PCA to min(widths) dimensions, an
  orthogonal Procrustes rotation R between the reductions, F[t] carried through it into E's space.
- `stb` (sparse token basis): the principal axes of the narrower model's shared rows, each written by
  OMP as a sparse mix of shared tokens; the same mixes of E's and of F's rows give paired bases;
  F[t] − mean(F) is fitted on F's basis by least squares and the coefficients applied to E's basis,
  plus mean(E) (means over the shared tokens).
- `subword`: the model's own tokenizer splits t's text; the row is the mean, sum, position-weighted mean
  or first/last of those tokens' rows.
- `mp_rope`: matching pursuit whose atoms may be rotated by RoPE (a position found per atom), re-fitted by
  least squares, the rows in E's space rotated by E's model's RoPE (`mp_rope`).
- `mean` (E's mean row), `zero`, `randn` (N(0, 1)) and `john_hewitt` (a draw from N(mean(E), cov(E)),
  https://nlp.stanford.edu/~johnhew/vocab-expansion.html).

Each function follows mergekit-tokensurgeon's (0.1.5) operations in its order and dtypes, so the same
inputs give its numbers; where mergekit's script fails (stb, john_hewitt's fallback) or does what its
own comment says it should not (weighted_mean), the differences are written at the function.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..errors import AdaptkitError



def check_k(k: int, shared: int) -> None:
    """k shared tokens must exist to pick them."""
    if k > shared:
        raise AdaptkitError(f"k {k} is more than the {shared} tokens the two vocabularies share: give a smaller -k")


def check_width(k: int, width: int) -> None:
    """OMP picks at most `width` independent atoms: past them the residual is 0 and Gram-Schmidt divides by
    eps (mergekit then writes rows of ~1e6)."""
    if k > width:
        raise AdaptkitError(f"k {k} is more than the width {width} of the space OMP picks in: at most {width} rows "
                            f"can be independent there; give -k {width} or less")


def working(t: torch.Tensor) -> torch.Tensor:
    """float32 for half precisions, else as given (mergekit's work dtype)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def omp(targets: torch.Tensor, points: torch.Tensor, k: int, eps: float = 1e-8,
        reorthogonalize: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched orthogonal matching pursuit: for each row y of `targets` (B, D), indices (B, k) into
    `points` (N, D) and coefficients c (B, k) with y ≈ Σ cᵢ points[indices[i]].

    Step t takes the atom a = argmax |⟨r, p⟩| over unused points (r the residual), extends the QR
    factors of the chosen atoms by Gram-Schmidt (qₜ = (a − QQᵀa)/‖·‖, R's column [Qᵀa, ‖·‖]),
    re-orthogonalizing Q by a QR every `reorthogonalize` steps, and sets r = y − QQᵀy. At the end
    R c = Qᵀ y is solved (upper triangular)."""
    batch, width = targets.shape
    count = points.shape[0]
    check_k(k, count)
    check_width(k, width)
    y, p = working(targets), points.to(working(targets).dtype)
    # Q as (B, D, k) views of a (B, k, D) buffer: each qₜ a contiguous row, so the products with Q's first
    # columns read contiguous rows (the same values as mergekit's (B, D, k) layout, 0.6 of the time of those
    # batched products; 0.87 of omp's time at B 512, D 384, 9000 points, k 64)
    q = torch.zeros((batch, k, width), dtype=y.dtype, device=y.device).transpose(1, 2)
    r = torch.zeros((batch, k, k), dtype=y.dtype, device=y.device)
    chosen = torch.zeros((batch, k), dtype=torch.long, device=y.device)
    used = torch.zeros((batch, count), dtype=torch.bool, device=y.device)
    residual = y.clone()
    for t in range(k):
        chosen[:, t] = new = _most_correlated(residual, p, used)
        atom = p[new]
        if t == 0:
            r[:, 0, 0] = atom.norm(dim=1)
            q[:, :, 0] = atom / r[:, 0, 0].clamp(min=eps).unsqueeze(1)
        else:
            projection = torch.bmm(q[:, :, :t].transpose(1, 2), atom.unsqueeze(-1)).squeeze(-1)
            rest = atom - torch.bmm(q[:, :, :t], projection.unsqueeze(-1)).squeeze(-1)
            norm = torch.clamp(torch.norm(rest, dim=1), min=eps)
            r[:, :t, t] = projection
            r[:, t, t] = norm
            q[:, :, t] = rest / norm.unsqueeze(-1)
        if t > 0 and t % reorthogonalize == 0:
            q_new, r_new = torch.linalg.qr(q[:, :, :t + 1], mode="reduced")
            r[:, :t + 1, :t + 1] = torch.bmm(r_new, r[:, :t + 1, :t + 1])
            q[:, :, :t + 1] = q_new
        fitted = torch.bmm(q[:, :, :t + 1], torch.bmm(q[:, :, :t + 1].transpose(1, 2), y.unsqueeze(-1))).squeeze(-1)
        residual = y - fitted
    coefficients = torch.linalg.solve_triangular(r[:, :k, :k], torch.bmm(q[:, :, :k].transpose(1, 2), y.unsqueeze(-1)),
                                                 upper=True).squeeze(-1)
    return chosen, coefficients


def rope(x: torch.Tensor, position: torch.Tensor, heads: int, base: float) -> torch.Tensor:
    """Rotary position embedding of `x` (..., heads·head_dim) at `position` (..., 1), as transformers' Llama
    rotates (the two halves of each head paired): θᵢ = position·base^(−2i/head_dim)."""
    width = x.shape[-1] // heads
    theta = position.unsqueeze(-1) * _inverse_frequencies(base, width).to(x.device)
    parts = x.view(*x.shape[:-1], heads, width)
    first, second = parts[..., :width // 2], parts[..., width // 2:]
    cos, sin = torch.cos(theta), torch.sin(theta)
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1).view(*x.shape)


def _inverse_frequencies(base: float, width: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, width, 2, dtype=torch.int64).float() / width))


def rope_position(x: torch.Tensor, y: torch.Tensor, heads: int, base: float) -> torch.Tensor:
    """The position p whose rotation of x best points at y: each pair's angle atan2(x×y, x·y), projected on
    the unit vector of the inverse frequencies (every head's), scaled by √heads·‖frequencies‖ (mergekit's
    estimate), as (..., 1)."""
    width = x.shape[-1] // heads
    frequencies = _inverse_frequencies(base, width).to(x.device)
    direction = frequencies.view(1, 1, width // 2).expand(x.shape[:-1] + (heads, width // 2)).reshape(*x.shape[:-1], -1)
    direction = direction / (torch.norm(direction, dim=-1, keepdim=True) + 1e-8)
    a, b = x.view(*x.shape[:-1], heads, width), y.view(*y.shape[:-1], heads, width)
    angle = torch.atan2(a[..., :width // 2] * b[..., width // 2:] - a[..., width // 2:] * b[..., :width // 2],
                        a[..., :width // 2] * b[..., :width // 2] + a[..., width // 2:] * b[..., width // 2:])
    projection = torch.sum(angle.reshape(*x.shape[:-1], -1) * direction, dim=-1)
    return (projection / (torch.sqrt(torch.tensor(heads)) * torch.norm(frequencies) + 1e-8)).unsqueeze(-1)


def mp_rope(targets: torch.Tensor, points_a: torch.Tensor, points_b: torch.Tensor, k: int, heads: tuple[int, int],
            bases: tuple[float, float], eps: float = 1e-8) -> torch.Tensor:
    """Matching pursuit over RoPE-rotated atoms (mergekit's mp_rope): each step takes the unused shared row a
    of space a most correlated with the residual, the position p (of ±residual, the smaller |p|) at which
    RoPE(a, p) best matches it, and the coefficient ⟨r, RoPE(a, p)⟩/‖RoPE(a, p)‖²; then all k coefficients
    are re-fitted by least squares on the rotated atoms, and the row in space b is Σ cᵢ RoPE(bᵢ, pᵢ) with
    space b's heads and base. `heads`, `bases`: (donor's, model's) attention heads and RoPE bases."""
    batch, count = targets.shape[0], points_a.shape[0]
    check_k(k, count)
    dtype = targets.dtype
    y, a, b = working(targets), points_a.to(working(targets).dtype), points_b.to(working(targets).dtype)
    chosen = torch.zeros((batch, k), dtype=torch.long, device=y.device)
    coefficients = torch.zeros((batch, k), dtype=y.dtype, device=y.device)
    positions = torch.zeros((batch, k), dtype=y.dtype, device=y.device)
    used = torch.zeros((batch, count), dtype=torch.bool, device=y.device)
    residual = y.clone()
    for t in range(k):
        chosen[:, t] = new = _most_correlated(residual, a, used)
        atom = a[new]
        ahead = rope_position(atom, residual, heads[0], bases[0]).squeeze(-1)
        behind = rope_position(atom, -residual, heads[0], bases[0]).squeeze(-1)
        position = torch.where(torch.abs(ahead) < torch.abs(behind), ahead, behind)
        positions[:, t] = position
        atom = rope(atom, position.unsqueeze(-1), heads[0], bases[0])
        coefficient = (residual * atom).sum(dim=1) / atom.pow(2).sum(dim=1).clamp(min=eps)
        coefficients[:, t] = coefficient
        residual = residual - coefficient.unsqueeze(1) * atom
    rotated = rope(a[chosen], positions.unsqueeze(-1), heads[0], bases[0])
    coefficients = torch.linalg.lstsq(rotated.transpose(1, 2), y.unsqueeze(-1)).solution.squeeze(-1)
    atoms = rope(b[chosen], positions.unsqueeze(-1), heads[1], bases[1])
    return (atoms * coefficients.unsqueeze(-1)).sum(dim=1).to(dtype)


def _most_correlated(residual: torch.Tensor, points: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
    """Each row's unused point of largest |⟨residual, point⟩| (the first of equals), marked used."""
    inner = (residual @ points.T).abs_()  # (in place: the same values, one (B, N) buffer less per step)
    inner.masked_fill_(used, -float("inf"))
    new = torch.max(inner, dim=1)[1]
    used[torch.arange(len(new), device=used.device), new] = True
    return new


def combine(coefficients: torch.Tensor, indices: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Σᵢ cᵢ rows[indices[i]] per target, in float32, rounded to `rows`' dtype (mergekit's bmm)."""
    return torch.bmm(coefficients.unsqueeze(1), rows[indices].to(torch.float)).squeeze(1).to(rows.dtype)


def common_interpolation(targets: torch.Tensor, points: torch.Tensor, k: int | None, *, cosine: bool = False,
                         scheme: str = "distance_proportional") -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest `points` to each target and their weights (module docstring)."""
    if k is not None:
        check_k(k, points.shape[0])
    if cosine:
        scale = (targets.norm(p=2, dim=1, keepdim=True) * points.norm(p=2, dim=1, keepdim=True).t()).clamp(min=1e-6)
        distances = 1 - torch.mm(targets, points.t()) / scale
    else:
        distances = torch.cdist(targets, points, p=2)
    if k is not None:
        indices = torch.topk(distances, k=k, dim=1, largest=False)[1]
        distances = distances.gather(1, indices)
    else:
        indices = torch.arange(points.shape[0], device=points.device).expand(targets.shape[0], -1)
    near = points[indices]
    if scheme == "distance_proportional":
        weights = 1 - distances if cosine else 1 / distances.clamp_min(1e-6)
        weights = weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-6)
    elif scheme == "barycentric":
        weights = _barycentric(targets, near)
    else:
        weights = torch.linalg.lstsq(near.transpose(1, 2).float(), targets.unsqueeze(-1).float()).solution.squeeze(-1)
    return indices, weights


def _barycentric(targets: torch.Tensor, near: torch.Tensor) -> torch.Tensor:
    """Weights w minimizing ‖Σ wᵢ nᵢ − y‖ with Σ wᵢ = 1: the KKT system [[NNᵀ, 1], [1ᵀ, 0]] [w; λ] = [Ny; 1]."""
    batch, count, _ = near.shape
    like = {"dtype": near.dtype, "device": near.device}
    gram = torch.bmm(near, near.transpose(1, 2))
    system = torch.cat([torch.cat([gram, torch.ones((batch, count, 1), **like)], dim=2),
                        torch.cat([torch.ones((batch, 1, count), **like), torch.zeros((batch, 1, 1), **like)], dim=2)],
                       dim=1)
    rhs = torch.cat([torch.bmm(targets.unsqueeze(1), near.transpose(1, 2)).squeeze(1), torch.ones((batch, 1), **like)],
                    dim=1)
    return torch.linalg.lstsq(system, rhs.unsqueeze(-1)).solution.squeeze(-1)[..., :count]


def landmark_pca(targets: torch.Tensor, points_a: torch.Tensor, points_b: torch.Tensor) -> torch.Tensor:
    """`targets` in space a carried into space b through PCA and a Procrustes rotation fitted on the
    paired landmarks `points_a` ↔ `points_b` (module docstring). torch.pca_lowrank draws a random
    projection from torch's global generator; with q = the full reduced width the subspace is exact."""
    dtype, a, b, y = targets.dtype, points_a.float(), points_b.float(), targets.float()
    mean_a, mean_b = a.mean(dim=0, keepdim=True), b.mean(dim=0, keepdim=True)
    width = min(a.shape[1], b.shape[1])
    basis_a = torch.pca_lowrank(a - mean_a, q=width)[2]
    basis_b = torch.pca_lowrank(b - mean_b, q=width)[2]
    u, _, v = torch.svd(torch.mm(torch.mm(b - mean_b, basis_b).t(), torch.mm(a - mean_a, basis_a)))
    rotation = torch.mm(u, v.t())
    return (torch.mm(torch.mm(torch.mm(y - mean_a, basis_a), rotation), basis_b.t()) + mean_b).to(dtype)


def token_basis(orig: torch.Tensor, donor: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """stb's paired bases (donor's, model's) from the shared rows `orig` ↔ `donor` (same order): the
    principal axes of the narrower side's centred rows, each as an OMP mix of k of those centred rows,
    the same mixes applied to each side's (uncentred) rows. mergekit 0.1.5's script hands its options
    object where k goes and fails; this is what its functions compute with k."""
    width = min(orig.shape[1], donor.shape[1])
    source = donor if donor.shape[1] < orig.shape[1] else orig
    check_k(k, source.shape[0])
    centred = (source - source.mean(dim=0)).to(torch.float32)
    axes = torch.linalg.svd((centred.T @ centred) / source.shape[0])[0][:, :width]
    indices, weights = omp(axes.t(), centred, k)
    return combine(weights, indices, donor), combine(weights, indices, orig)


def sparse_token_basis(targets: torch.Tensor, orig_shared: torch.Tensor, donor_shared: torch.Tensor,
                       basis: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """stb's rows: (F[t] − μ_F) fitted on the donor basis by least squares, the coefficients applied to the
    model's basis, plus μ_E, the means taken over the shared tokens on both sides. (mergekit's functions
    take μ_F over every donor row and μ_E over every model row, means of two different token sets: then
    even a donor whose rows are the model's rotated does not give the model's rows back.)"""
    donor_basis, orig_basis = (b.to(torch.float32) for b in basis)
    centred = targets.to(torch.float32) - donor_shared.float().mean(dim=0)
    coefficients = torch.linalg.lstsq(donor_basis.T, centred.T).solution.T
    return (coefficients @ orig_basis + orig_shared.float().mean(dim=0)).to(orig_shared.dtype)  # (computed in
    # float32, rounded once to the model's dtype, as the other methods)


def subword(embed: torch.Tensor, texts: list[str], split: Callable[[str], list[int]], method: str,
            lm_head: bool) -> torch.Tensor:
    """Rows from the model's tokens of each text (`split`). weighted_mean weighs the tokens 1..n toward
    the one that matters most, the last for an input embedding and the first for an LM head, as
    first_last picks them and mergekit's comment says; mergekit 0.1.5's code has the weights the
    other way round."""
    out = torch.zeros(len(texts), embed.shape[1], dtype=embed.dtype, device=embed.device)
    for row, text in enumerate(texts):
        ids = split(text)
        if method in ("mean", "sum"):
            for i in ids:
                out[row] += embed[i]
            if method == "mean" and ids:
                out[row] /= len(ids)
        elif method == "weighted_mean":
            weights = list(range(1, len(ids) + 1))
            if lm_head:
                weights = weights[::-1]
            for i, w in zip(ids, weights):
                out[row] += w * embed[i]
            if ids:
                out[row] /= sum(weights)
        elif ids:
            out[row] = embed[ids[0] if lm_head else ids[-1]]
    return out


def john_hewitt(embed: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` draws from N(μ, Σ) of the rows (float32: μ the mean row, Σ = (E − μ)ᵀ(E − μ)/rows), as
    torch's MultivariateNormal draws them (μ + L·z, L = cholesky(Σ), z ~ N(0, 1) from `generator`).
    Σ not positive definite (fewer rows than width, or collinear rows) is refused; mergekit then falls
    back to N(0, 0.02²) and fails on its own len() of a count."""
    rows = embed.to(torch.float32)
    mean = rows.mean(dim=0)
    centred = rows - mean
    covariance = centred.T @ centred / rows.shape[0]
    factor, info = torch.linalg.cholesky_ex(covariance)
    if not torch.distributions.constraints.positive_definite.check(covariance).all() or info.item():
        raise AdaptkitError("john_hewitt: the embedding's covariance is not positive definite (fewer rows than its "
                            "width, or collinear rows); use another --method")
    z = torch.empty((count, rows.shape[1]), dtype=mean.dtype).normal_(generator=generator).to(mean.device)  # (drawn
    # where the generator is: the CPU's draws on any device)
    return (mean + torch.matmul(factor, z.unsqueeze(-1)).squeeze(-1)).to(embed.dtype)


def well_trained(vocab: dict[Any, int], texts: dict[Any, str], embed: torch.Tensor, lm_head: torch.Tensor | None,
                 quantile: float = 0.01) -> set:
    """The tokens of `vocab` (key → row) a model can be trusted on, per "Fishing for Magikarp" (Land &
    Bartolo 2024, arXiv 2405.05417) as mergekit applies it: not unused (rows no token has, and tokens
    named *unused_token* / *reserved_special_token*); with an LM head, an input row's norm not under the
    `quantile`; not closer (cosine) to the unused rows' mean than the 1 − quantile quantile (at least 0.5),
    in the embedding and in the LM head."""
    unused = set(range(embed.shape[0])) - set(vocab.values())
    unused |= {i for key, i in vocab.items() if "unused_token" in texts[key] or "reserved_special_token" in texts[key]}
    bad = set(unused)
    if lm_head is not None:
        norms = embed.norm(dim=1).float()
        bad.update(torch.where(norms < torch.quantile(norms, quantile, dim=0))[0].tolist())
    for matrix in (embed, lm_head):
        if not unused or matrix is None:
            continue
        alike = torch.nn.functional.cosine_similarity(matrix, matrix[sorted(unused)].mean(dim=0).unsqueeze(0), dim=1)
        alike = alike.float()
        threshold = torch.quantile(alike, 1 - quantile, dim=0)
        bad.update(torch.where(alike > max(threshold, torch.tensor(0.5)))[0].tolist())
    return {key for key, i in vocab.items() if i not in bad}
