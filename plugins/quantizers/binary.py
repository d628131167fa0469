"""Binary weights: sign with a per-row mean-absolute scale (XNOR-Net, Rastegari et al. 2016,
arXiv 1603.05279; BitNet's 1-bit weights, arXiv 2310.11453).

W_q = sign(W) with sign(0) = +1, α_r = mean_j |W_rj| per output row r (dim 0; other dims
flattened; a 1-D tensor is one row), Ŵ_rj = α_r · W_q,rj — the α minimizing ‖W_r − α·sign(W_r)‖².

Packing: 1 bit per value over the flattened tensor (1 = +1, 0 = −1), eight per byte, the first in
the high bit; the last byte is padded with zero bits. Keys: `weight` (uint8, ceil(n/8)),
`weight.alpha` (float32, rows), `weight.shape` (int64 dims). Dequantizing gives float32.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from adaptkit.plugin import AdaptkitError

from ._common import bases_with, pack_codes, require_float, rows_view, unpacked_codes

if TYPE_CHECKING:
    import torch

    from adaptkit.plugin import TensorStore


class Binary:
    """Binary ±α weights, α the mean |W| per output row, 1 bit per value."""

    name = "binary"

    def quantize(self, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        import torch

        require_float(self.name, tensor)
        w = tensor.detach().cpu().float()
        alpha = rows_view(w).abs().mean(dim=1)
        packed = pack_codes(w >= 0, bits=1)
        return {"weight": packed, "weight.alpha": alpha, "weight.shape": torch.tensor(list(tensor.shape), dtype=torch.int64)}

    host_keys = ("weight.shape",)  # read on the host when unpacking

    def packed_layout(self, tensor: torch.Tensor) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {"weight": ("U8", (-(tensor.numel() // -8),)), "weight.alpha": ("F32", (rows_view(tensor).shape[0],)),
                "weight.shape": ("I64", (tensor.dim(),))}

    def dequantize(self, packed: Mapping[str, torch.Tensor]) -> torch.Tensor:
        shape, bits = unpacked_codes(self.name, packed, "weight.alpha", bits=1)
        signs = bits.float() * 2 - 1
        rows = signs.reshape(1, -1) if len(shape) < 2 else signs.reshape(shape[0], -1)
        alpha = packed["weight.alpha"].float().reshape(-1, 1)
        if alpha.shape[0] != rows.shape[0]:
            raise AdaptkitError(f"{self.name}: weight.alpha has {alpha.shape[0]} rows, shape {shape} has {rows.shape[0]}")
        return (rows * alpha).reshape(shape)

    def unpacked_shape(self, shapes, read) -> tuple[int, ...]:
        return tuple(read("weight.shape").tolist())

    def detect(self, store: TensorStore) -> bool:
        return any(f"{k}.shape" in store and store.info(k).dtype == "U8" for k in bases_with(store, ".alpha"))


BINARY = Binary()
