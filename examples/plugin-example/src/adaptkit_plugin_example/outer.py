"""The `outer` variant: a rank-1 adapter ΔW = s·u·vᵀ (one vector per side of each weight).

Stored in PEFT's folder layout: `adapter_config.json` with `{"adaptkit_variant": "outer",
"scale": s, "target_modules": [...]}` and `adapter_model.safetensors` with, per adapted module,
`base_model.model.<module>.outer_u` (shape out) and `base_model.model.<module>.outer_v` (shape in).
For a weight W (out × in) the update is ΔW = s · u vᵀ, i.e. ΔW[i, j] = s · u[i] · v[j], so the
adapted layer computes W x + s · u (vᵀ x). It is LoRA with r = 1 and A = vᵀ, B = u.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from adaptkit.plugin import AdapterFiles, AdaptkitError

if TYPE_CHECKING:
    import torch

DEFAULT_SCALE = 1.0


class Outer:
    """Rank-1 outer-product adapter: ΔW = s·u·vᵀ.

    u (out) and v (in) are stored per module as `outer_u` / `outer_v`; s is the config's `scale`
    (default 1.0). Equivalent to a LoRA of rank 1 with B = u, A = vᵀ and scaling s.
    """

    name = "outer"
    param_names = ("outer_u", "outer_v")
    config_keys = frozenset({"scale"})

    @staticmethod
    def scale(adapter: AdapterFiles) -> float:
        return float(adapter.config.get("scale", DEFAULT_SCALE))

    @staticmethod
    def _check(adapter: AdapterFiles, module: str) -> tuple[int, int]:
        roles = adapter.modules[module]
        missing = [r for r in ("outer_u", "outer_v") if r not in roles]
        if missing:
            raise AdaptkitError(f"{module}: outer adapter lacks {', '.join(missing)} (has {', '.join(sorted(roles))})")
        u, v = adapter.shape(module, "outer_u"), adapter.shape(module, "outer_v")
        if len(u) != 1 or len(v) != 1:
            raise AdaptkitError(f"{module}: outer_u and outer_v must be vectors (got shapes {list(u)} and {list(v)})")
        return u[0], v[0]

    def describe(self, adapter: AdapterFiles) -> dict[str, Any]:
        """Rank (always 1), scale and each module's ΔW shape, from the headers alone."""
        s = self.scale(adapter)
        modules = {}
        for module in sorted(adapter.modules):
            out_features, in_features = self._check(adapter, module)
            modules[module] = {"rank": 1, "scaling": s, "shape": [out_features, in_features]}
        return {"rank": 1, "ranks": [1], "scale": s, "scaling": [s], "modules": modules}

    def delta(self, adapter: AdapterFiles, module: str, base: torch.Tensor | None = None) -> torch.Tensor:
        """ΔW = s · u vᵀ (out × in, float32); `base` is not needed and ignored."""
        self._check(adapter, module)
        u = adapter.tensor(module, "outer_u").float()
        v = adapter.tensor(module, "outer_v").float()
        return (u.unsqueeze(1) * v.unsqueeze(0)) * self.scale(adapter)


OUTER = Outer()
