"""Passthrough: one model's tensor unchanged (or scaled), the building block of frankenmerges."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ._base import Operator, frozen


class Passthrough(Operator):
    """The single input's tensor, times `scale`: θ = s·θ₁ (s = 1 leaves it as it is).

    With `slices:` this stacks layers of several models into one (a "frankenmerge"): each output
    layer is a copy of one source layer. Exactly one input per tensor position, as mergekit's
    `passthrough`, which refuses more; a base model is not an input. Parameter `scale` (per model,
    default 1: mergekit's unset scale, which leaves the tensor untouched; 1·θ is θ exactly).
    Goddard et al. 2024, "Arcee's MergeKit", arXiv 2403.13257.
    """

    name = "passthrough"
    elementwise = True
    takes_base = False
    accelerated = False  # a copy (or one product): moving it to a GPU and back would cost more than it saves
    params = frozen({"scale": 1.0})
    per_model = frozenset({"scale"})

    def merge(self, tensors: Sequence[torch.Tensor], base: torch.Tensor | None = None, **params: Any) -> torch.Tensor:
        if len(tensors) != 1:
            raise self.error(f"takes exactly one model per tensor (one source per slice), got {len(tensors)}")
        scale = self.real("scale", self.bind(params, 1)["scale"][0])
        return tensors[0] if scale == 1 else tensors[0] * scale


PASSTHROUGH = Passthrough()
