"""The `median` merge method: the element-wise median of the inputs (a robust model soup)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from adaptkit.plugin import AdaptkitError

if TYPE_CHECKING:
    import torch


class Median:
    """Element-wise median of the inputs: a soup robust to one outlying model.

    merged[i] = median(t_1[i], ..., t_n[i]). For an odd n that is the middle value; for an even n
    it is the mean of the two middle values (unlike `torch.median`, which returns the lower one),
    so the result is symmetric in the inputs and equals the mean when n = 2. NaN sorts last, as
    in `torch.sort`. The base model, if any, is ignored; there are no parameters.
    """

    name = "median"
    params: dict[str, Any] = {}
    per_model: frozenset[str] = frozenset()

    def merge(self, tensors: Sequence[torch.Tensor], base: torch.Tensor | None = None, **params: Any) -> torch.Tensor:
        if params:
            raise AdaptkitError(f"merge method 'median' takes no parameters (got {', '.join(sorted(params))})")
        if not tensors:
            raise AdaptkitError("merge method 'median' needs at least one input tensor")
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) > 1:
            raise AdaptkitError(f"merge method 'median': inputs differ in shape ({', '.join(map(str, sorted(shapes)))})")
        import torch  # here, not at the top: listing plugins must not import torch

        ordered = torch.sort(torch.stack([t.float() for t in tensors]), dim=0).values
        n = len(tensors)
        if n % 2:
            return ordered[n // 2].clone()
        return (ordered[n // 2 - 1] + ordered[n // 2]) / 2


MEDIAN = Median()
