"""INT8: symmetric absmax quantization per output row (or per block of N columns of a row).

For each row r of W (dim 0; the other dims flattened into columns; a 1-D tensor is one row):
s_r = max_j |W_rj| and q_rj = round(W_rj / s_r · 127) ∈ [−127, 127] (round half to even, as
torch.round); Ŵ_rj = q_rj · s_r / 127, so |W − Ŵ| ≤ s_r / 254 elementwise. A zero row stores
s = 0 and q = 0. The same absmax row statistics as LLM.int8() (Dettmers et al. 2022,
arXiv 2208.07339; bitsandbytes' SCB). With `block_size=N` each row is cut into blocks of N
columns (the last one shorter), one scale per block.

Keys: `weight` (int8, the tensor's shape), `weight.scale` (float32: rows, or rows × blocks).
Dequantizing gives float32.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from adaptkit.plugin import AdaptkitError

from ._common import bases_with, require_float, require_keys, rows_view

if TYPE_CHECKING:
    import torch

    from adaptkit.plugin import TensorStore


CHUNK = 1 << 20  # values quantized at a time: float32 temporaries stay a few MB


class Int8:
    """INT8 symmetric absmax quantization per output row (LLM.int8 row statistics)."""

    def __init__(self, name: str = "int8", *, block_size: int | None = None, about: str = ""):
        if block_size is not None and block_size < 1:
            raise AdaptkitError(f"int8 block_size must be positive, got {block_size}")
        self.name, self.block_size, self.about = name, block_size, about

    def _blocks(self, rows: torch.Tensor) -> torch.Tensor:
        """rows × blocks × N view (zero-padded; zeros change no absmax)."""
        import torch

        n = self.block_size or max(rows.shape[1], 1)
        pad = -rows.shape[1] % n
        return torch.nn.functional.pad(rows, (0, pad)).reshape(rows.shape[0], -1, n)

    def quantize(self, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        import torch

        require_float(self.name, tensor)
        rows = rows_view(tensor.detach().cpu())
        q = torch.empty(rows.shape, dtype=torch.int8)
        scales = []
        step = max(1, CHUNK // max(rows.shape[1], 1))  # rows are independent: a chunk of rows at a time
        for start in range(0, rows.shape[0], step):
            blocks = self._blocks(rows[start:start + step].float())
            s = blocks.abs().amax(dim=-1)
            safe = torch.where(s > 0, s, torch.ones_like(s))
            part = torch.round(blocks / safe.unsqueeze(-1) * 127).clamp(-127, 127).to(torch.int8)
            q[start:start + step] = part.reshape(blocks.shape[0], -1)[:, : rows.shape[1]]
            scales.append(s)
        s = torch.cat(scales)
        return {"weight": q.reshape(tensor.shape), "weight.scale": s if self.block_size else s.reshape(-1)}

    def packed_layout(self, tensor: torch.Tensor) -> dict[str, tuple[str, tuple[int, ...]]]:
        rows = rows_view(tensor)
        blocks = -(rows.shape[1] // -self.block_size) if self.block_size else 1
        scale = (rows.shape[0], blocks) if self.block_size else (rows.shape[0],)
        return {"weight": ("I8", tuple(tensor.shape)), "weight.scale": ("F32", scale)}

    def dequantize(self, packed: Mapping[str, torch.Tensor]) -> torch.Tensor:
        import torch

        require_keys(self.name, packed, ("weight", "weight.scale"))
        q, s = packed["weight"], packed["weight.scale"].float()
        if q.dtype != torch.int8:
            raise AdaptkitError(f"{self.name}: weight must be int8, got {q.dtype}")
        rows = rows_view(q)
        per_row = -(rows.shape[1] // -self.block_size) if self.block_size else 1
        if s.reshape(-1).numel() != rows.shape[0] * per_row:
            raise AdaptkitError(f"{self.name}: weight.scale has {s.numel()} values, expected "
                                f"{rows.shape[0] * per_row} (block_size {self.block_size})")
        scale = s.reshape(rows.shape[0], per_row, 1) / 127
        out = torch.empty(rows.shape, dtype=torch.float32, device=q.device)
        step = max(1, CHUNK // max(rows.shape[1], 1))
        for start in range(0, rows.shape[0], step):
            blocks = self._blocks(rows[start:start + step].float()) * scale[start:start + step]
            out[start:start + step] = blocks.reshape(blocks.shape[0], -1)[:, : rows.shape[1]]
        return out.reshape(q.shape)

    def unpacked_shape(self, shapes, read) -> tuple[int, ...]:
        return tuple(shapes["weight"])  # the int8 codes keep the tensor's shape

    def detect(self, store: TensorStore) -> bool:
        """int8 codes with float32 scales: one per row (1-D), or rows × blocks of this block size."""
        for k in bases_with(store, ".scale"):
            codes, scale = store.info(k), store.info(f"{k}.scale")
            if codes.dtype != "I8" or scale.dtype != "F32":
                continue
            if self.block_size is None:
                return len(scale.shape) == 1
            columns = codes.numel // max(codes.shape[0], 1) if codes.shape else 1
            return len(scale.shape) == 2 and scale.shape[1] == -(columns // -self.block_size)
        return False


INT8 = Int8()
INT8_BLOCK = Int8("int8_block", block_size=64, about="INT8 symmetric absmax per block of 64 columns of a row")
