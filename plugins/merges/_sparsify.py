"""Sparsifying task vectors block by block (not a plugin; used by the task-arithmetic family).

DARE drops entries at random (Yu et al. 2023, arXiv 2311.03099); TIES and magnitude pruning keep
the largest magnitudes (Yadav et al. 2023, arXiv 2306.01708); breadcrumbs drops the largest γ
outliers and the smallest (Davari & Belilovsky 2023, arXiv 2312.06795).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ._select import top_cut


def keep_count(fraction: float, n: int) -> int:
    """⌊fraction·n⌋, tolerant of float noise in the product."""
    return int(math.floor(fraction * n + 1e-6))


class Keep:
    """Which entries of one task vector survive sparsification, block by block.

    Magnitude cuts are found up front in passes over blocks (see `_select`); random masks are
    drawn from the input's generator in block order, and `restart` rewinds it so that every pass
    over the blocks sees the same masks.
    """

    def __init__(self, tau: Callable[[int, int], torch.Tensor], n: int, method: str, density: float,
                 gamma: float, generator: torch.Generator | None):
        self.method, self.density, self.generator = method, density, generator
        self.state = generator.get_state() if method == "random" else None
        magnitudes = lambda s, e: tau(s, e).abs_()  # noqa: E731
        keep = max(1, keep_count(density, n))
        if method == "magnitude":
            self.cuts = [(top_cut(magnitudes, n, keep), 1)]
        elif method == "magnitude_outliers":
            # Drop the γ·n largest, then the smallest; the outlier cut shrinks when needed to keep
            # the requested density (as mergekit does).
            drop_top = min(keep_count(gamma, n), n - keep)
            self.cuts = [(top_cut(magnitudes, n, keep + drop_top), 1), (top_cut(magnitudes, n, drop_top), -1)]

    def restart(self) -> None:
        if self.state is not None:
            self.generator.set_state(self.state)

    def mask(self, start: int, block: torch.Tensor) -> torch.Tensor:
        """0/1 float mask of the kept entries of a block of τ starting at flat index `start`."""
        if self.method == "random":
            # keep = [u < density] from the caller's generator only: no dependence on thread order.
            u = torch.rand(block.shape, generator=self.generator, dtype=torch.float32)
            return torch.lt(u, self.density, out=u)  # a float result: see `Cut.mask`
        magnitude = block.abs()
        (first, _), *rest = self.cuts
        mask = first.mask(magnitude, start)
        for cut, _ in rest:
            mask.sub_(cut.mask(magnitude, start))
        return mask


def sparsifier(tau, n: int, method: str | None, density: float, gamma: float, generator) -> Keep | None:
    """A `Keep` for one task vector, or None when every entry is kept."""
    if method is None or density >= 1:
        return None
    if method == "magnitude_outliers" and gamma > 0 and keep_count(gamma, n) == 0:
        return None  # too small to hold one outlier: kept whole
    return Keep(tau, n, method, density, gamma, generator)


def l1_factor(tau, ranges, keep: Keep) -> float:
    """mergekit's rescale: the kept entries scaled so their L1 norm equals the unpruned one."""
    before = after = 0.0
    keep.restart()
    for s, e in ranges:
        block = tau(s, e)
        before += float(block.abs().sum())
        after += float(block.mul_(keep.mask(s, block)).abs_().sum())
    keep.restart()
    return before / after if before >= 1e-7 and after >= 1e-7 else 1.0
