"""Ternary weights of BitNet b1.58 (Ma et al. 2024, arXiv 2402.17764): absmean quantization.

γ = mean |W| over the whole tensor, W_q = clip(round(W / (γ + ε)), −1, 1) with ε = 1e-5 (round
half to even), Ŵ = W_q · γ.

Packing: 2 bits per value, code = W_q + 1 ∈ {0, 1, 2}, four values per byte over the flattened
tensor, the first in the two high bits; the last byte is padded with code 1 (zero).
Keys: `weight` (uint8, ceil(n/4)), `weight.gamma` (float32, 0-dim), `weight.shape` (int64 dims).
Dequantizing gives float32.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from adaptkit.plugin import AdaptkitError

from ._common import bases_with, pack_codes, require_float, unpacked_codes

if TYPE_CHECKING:
    import torch

    from adaptkit.plugin import TensorStore

EPS = 1e-5


class Ternary:
    """Ternary {−1, 0, 1}·γ weights with the absmean scale (BitNet b1.58), 2 bits per value."""

    name = "ternary"

    def codes(self, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_q as int8 in {−1, 0, 1}, γ)."""
        import torch

        w = tensor.detach().cpu().float()
        gamma = w.abs().mean()
        return torch.clamp(torch.round(w / (gamma + EPS)), -1, 1).to(torch.int8), gamma

    def quantize(self, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        import torch

        require_float(self.name, tensor)
        q, gamma = self.codes(tensor)
        packed = pack_codes(q + 1, bits=2, fill=1)
        return {"weight": packed, "weight.gamma": gamma, "weight.shape": torch.tensor(list(tensor.shape), dtype=torch.int64)}

    host_keys = ("weight.shape",)  # read on the host when unpacking

    def packed_layout(self, tensor: torch.Tensor) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {"weight": ("U8", (-(tensor.numel() // -4),)), "weight.gamma": ("F32", ()),
                "weight.shape": ("I64", (tensor.dim(),))}

    def dequantize(self, packed: Mapping[str, torch.Tensor]) -> torch.Tensor:
        shape, c = unpacked_codes(self.name, packed, "weight.gamma", bits=2)
        if (c > 2).any():
            raise AdaptkitError(f"{self.name}: invalid 2-bit code 3 in weight")
        return ((c.float() - 1) * packed["weight.gamma"].float()).reshape(shape)

    def unpacked_shape(self, shapes, read) -> tuple[int, ...]:
        return tuple(read("weight.shape").tolist())

    def detect(self, store: TensorStore) -> bool:
        return any(f"{k}.shape" in store and store.info(k).dtype == "U8" for k in bases_with(store, ".gamma"))


TERNARY = Ternary()
