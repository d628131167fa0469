"""NF4 and FP4: 4-bit blockwise quantization of QLoRA (Dettmers et al. 2023, arXiv 2305.14314),
bit-for-bit as bitsandbytes' `quantize_4bit` stores it.

The tensor is flattened and cut into blocks of B = 64 values (`blocksize`); the last block holds
the remainder when the size is not a multiple of B (bitsandbytes' padding rule: no padding of the
data, the short block gets its own absmax). Per block, absmax = max |x| and each value becomes
the index of the nearest of 16 code values c_k of x / absmax:

    q_i = argmin_k |x_i / absmax_b − c_k|,    x̂_i = c_{q_i} · absmax_b

NF4 ("4-bit NormalFloat") takes c from quantiles of N(0, 1), normalized to [−1, 1] with an exact
0; FP4 is a 1-sign, 2-exponent, 1-mantissa float (±{0, 0.0625, 2, 3, 4, 6, 8, 12} / 12). Rounding
is bitsandbytes': x·(1/absmax) (full blocks; the short block divides), clamped to [−1, 1], is
compared with the midpoints of the sorted code (a value on a midpoint goes to the lower code).
Codes are packed two per byte, the first element in the high nibble; an odd count is padded with
one 0 value (its code, NF4 7 / FP4 0, fills the last low nibble).

Double quantization (`double_quant=True`, the paper's §3 "DQ", bitsandbytes' `compress_statistics`):
the float32 absmax vector minus its mean is quantized again with the 8-bit dynamic map in blocks
of 256 (see `_common.quantize_blockwise_8bit`); the mean is kept as `nested_offset`, and
absmax = code8[q] · nested_absmax + offset on the way back.

Stored keys, exactly `QuantState.as_dict(packed=True)` under the prefix `weight.`:
`weight` (uint8, ceil(n/2) × 1), `weight.absmax` (float32 per block; uint8 with DQ),
`weight.quant_map` (the 16 code values), with DQ `weight.nested_absmax` (float32 per 256 blocks)
and `weight.nested_quant_map` (256 values), and `weight.quant_state.bitsandbytes__nf4|fp4`
(uint8 bytes of the JSON of quant_type, blocksize, dtype, shape and the nested fields).
Dequantizing gives the original dtype, as bitsandbytes does.
"""
from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

from adaptkit.plugin import AdaptkitError, dtypes, parse_json

from ._common import dequantize_blockwise_8bit, dynamic_map, quantize_blockwise_8bit, require_float, require_keys

if TYPE_CHECKING:
    import torch

    from adaptkit.plugin import TensorStore

# bitsandbytes' get_4bit_type: NF4 as listed; FP4 as indexed (sign bit, 2 exponent, 1 mantissa), / 12.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
FP4_RAW = (0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256


def code_values(quant_type: str) -> torch.Tensor:
    """The 16 code values (float32) indexed by 4-bit code, as bitsandbytes' get_4bit_type."""
    import torch

    data = torch.tensor(NF4_CODE if quant_type == "nf4" else FP4_RAW, dtype=torch.float32)
    return data / data.abs().max()


CHUNK_BLOCKS = 16384


class FourBit:
    """4-bit blockwise quantizer (NF4 or FP4, QLoRA), optionally with double quantization."""

    def __init__(self, name: str, quant_type: str, *, blocksize: int = 64, double_quant: bool = False, about: str = ""):
        if quant_type not in ("nf4", "fp4"):
            raise AdaptkitError(f"4-bit quant_type must be nf4 or fp4, got '{quant_type}'")
        if blocksize not in BLOCKSIZES:
            raise AdaptkitError(f"4-bit blocksize must be one of {BLOCKSIZES}, got {blocksize}")
        self.name, self.quant_type, self.blocksize, self.double_quant, self.about = name, quant_type, blocksize, double_quant, about

    @property
    def state_key(self) -> str:
        return f"weight.quant_state.bitsandbytes__{self.quant_type}"

    @property
    def host_keys(self) -> tuple[str, ...]:
        """Read on the host when unpacking: a layer on a GPU keeps these on the CPU."""
        return (self.state_key,)

    # -- quantize ----------------------------------------------------------------------------
    def quantize(self, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        import torch

        require_float(self.name, tensor)
        if tensor.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise AdaptkitError(f"{self.name}: takes float32, float16 or bfloat16 tensors (as bitsandbytes), got {tensor.dtype}")
        tensor = tensor.detach().cpu()
        code = code_values(self.quant_type)
        flat = tensor.reshape(-1)  # in its own dtype: float32 only chunk by chunk (exact either way)
        absmax = self._absmax(flat)
        packed = self._codes(flat, code, absmax)
        out = {"weight": packed, "weight.absmax": absmax, "weight.quant_map": code}
        if self.double_quant:
            offset = absmax.mean()
            qabsmax, nested_absmax = quantize_blockwise_8bit(absmax - offset, dynamic_map(), NESTED_BLOCKSIZE)
            out["weight.absmax"] = qabsmax
            out["weight.nested_absmax"] = nested_absmax
            out["weight.nested_quant_map"] = dynamic_map()
        out[self.state_key] = self._state_bytes(tensor, absmax)
        return out

    def _state_bytes(self, tensor: torch.Tensor, absmax: torch.Tensor | None) -> torch.Tensor:
        import torch

        state = {"quant_type": self.quant_type, "blocksize": self.blocksize,
                 "dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape)}
        if self.double_quant:
            state.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=absmax.mean().item())
        return torch.tensor(list(json.dumps(state).encode("utf-8")), dtype=torch.uint8)

    def packed_layout(self, tensor: torch.Tensor) -> dict[str, tuple[str, tuple[int, ...]]]:
        """{key: (dtype, shape)} of `quantize(tensor)` without quantizing: only the block absmax is
        computed (the double-quantized state's JSON holds their mean)."""
        n, blocks = tensor.numel(), -(tensor.numel() // -self.blocksize)
        absmax = self._absmax(tensor.detach().cpu().reshape(-1)) if self.double_quant else None
        layout = {"weight": ("U8", (-(n // -2), 1)), "weight.absmax": ("U8" if self.double_quant else "F32", (blocks,)),
                  "weight.quant_map": ("F32", (16,))}
        if self.double_quant:
            layout["weight.nested_absmax"] = ("F32", (-(blocks // -NESTED_BLOCKSIZE),))
            layout["weight.nested_quant_map"] = ("F32", (256,))
        layout[self.state_key] = ("U8", (self._state_bytes(tensor, absmax).numel(),))
        return layout

    def _absmax(self, flat: torch.Tensor) -> torch.Tensor:
        """max |x| per block; a short last block's is kept ≥ 1e-38, as bitsandbytes stores it."""
        import torch

        n, b = flat.numel(), self.blocksize
        full = n - n % b
        absmax = flat[:full].reshape(-1, b).abs().max(dim=-1)[0].float()  # a max is exact in any dtype
        if full < n:
            absmax = torch.cat([absmax, flat[full:].abs().max().float().clamp(min=1e-38).unsqueeze(0)])
        return absmax

    def _codes(self, flat: torch.Tensor, code: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
        """bitsandbytes' quantize_4bit kernel (backends/default/ops.py), step for step."""
        import torch

        order = torch.argsort(code)
        bounds = (code[order[:-1]] + code[order[1:]]) / 2
        remap = None if torch.equal(order, torch.arange(order.numel())) else order.to(torch.uint8)
        n, b = flat.numel(), self.blocksize
        full = n - n % b
        blocks = flat[:full].reshape(-1, b)
        inverse = 1.0 / absmax[: full // b].clamp(min=1e-38)
        codes = []
        # Chunks of 16384 blocks (1M values) keep the temporaries in cache.
        for start in range(0, blocks.shape[0], CHUNK_BLOCKS):
            part = blocks[start:start + CHUNK_BLOCKS].float()
            scaled = torch.clamp(part * inverse[start:start + CHUNK_BLOCKS, None], -1, 1).reshape(-1)
            codes.append(torch.bucketize(scaled, bounds, out_int32=True).to(torch.uint8))
        if full < n:
            am = absmax[-1]
            codes.append(torch.bucketize(torch.clamp(flat[full:].float() / am, -1, 1), bounds, out_int32=True).to(torch.uint8))
        q = torch.cat(codes) if len(codes) != 1 else codes[0]
        if remap is not None:
            q = remap[q.long()]
        if q.numel() % 2:  # an odd count: the last low nibble holds the code of 0.0, as bitsandbytes packs it
            zero = torch.bucketize(torch.zeros(1), bounds).to(torch.uint8)
            q = torch.cat([q, zero if remap is None else remap[zero.long()]])
        return ((q[::2] << 4) | q[1::2]).unsqueeze(1)

    # -- dequantize --------------------------------------------------------------------------
    def state(self, packed: Mapping[str, torch.Tensor]) -> dict:
        keys = [k for k in packed if k.startswith("weight.quant_state.bitsandbytes__")]
        if len(keys) != 1:
            raise AdaptkitError(f"{self.name}: expected one weight.quant_state.bitsandbytes__nf4|fp4 tensor, found {len(keys)}")
        where = f"{self.name}: {keys[0]}"
        try:  # JSON we did not write: nesting and duplicate keys bounded
            state = parse_json(bytes(packed[keys[0]].to("cpu").reshape(-1).tolist()).decode("utf-8"), where)
        except UnicodeDecodeError:
            raise AdaptkitError(f"{where} is not UTF-8 JSON") from None
        shape = state.get("shape") if isinstance(state, dict) else None
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape) \
                or state.get("quant_type") not in ("nf4", "fp4") or state.get("blocksize") not in BLOCKSIZES \
                or state.get("dtype") not in dtypes.COMPUTE:
            raise AdaptkitError(f"{where} is not a 4-bit quant state (quant_type nf4|fp4, blocksize, dtype, shape)")
        return state

    unpacks_into = True  # `buffer`: Ŵ written into a tensor the caller reuses (on the CPU without Triton)

    def dequantize(self, packed: Mapping[str, torch.Tensor], buffer=None) -> torch.Tensor:
        import torch

        require_keys(self.name, packed, ("weight", "weight.absmax"))
        state = self.state(packed)
        absmax = packed["weight.absmax"]
        if "weight.nested_absmax" in packed:
            require_keys(self.name, packed, ("weight.nested_quant_map",))
            absmax = dequantize_blockwise_8bit(absmax, packed["weight.nested_absmax"].float(),
                                               packed["weight.nested_quant_map"].float(), state["nested_blocksize"])
            absmax = absmax + torch.tensor(float(state["nested_offset"]))
        elif absmax.dtype == torch.uint8:
            raise AdaptkitError(f"{self.name}: absmax is 8-bit but weight.nested_absmax is missing")
        code = packed["weight.quant_map"].float() if "weight.quant_map" in packed else code_values(state["quant_type"])
        if code.numel() != 16:
            raise AdaptkitError(f"{self.name}: weight.quant_map has {code.numel()} values, a 4-bit code has 16")
        shape, b, n = state["shape"], state["blocksize"], math.prod(state["shape"])
        data = packed["weight"].reshape(-1).view(torch.uint8)  # codes in any storage dtype: its bytes
        if data.numel() * 2 < n or absmax.numel() != -(n // -b):
            raise AdaptkitError(f"{self.name}: packed sizes do not fit shape {shape} with blocksize {b}")
        dtype = getattr(torch, state["dtype"])
        if data.is_cuda and importlib.util.find_spec("triton"):  # one fused kernel, same arithmetic
            from ._fourbit_triton import unpack
            return unpack(data, code, absmax, n, b, dtype).reshape(shape)
        from ._fourbit_unpack import unpack
        standard = torch.equal(code, code_values(state["quant_type"]))
        return unpack(data[:(n + 1) // 2], code, standard, absmax, shape, b, state["quant_type"], dtype, buffer=buffer)

    def unpacked_shape(self, shapes, read) -> tuple[int, ...]:  # from the quant-state JSON alone
        return tuple(self.state({self.state_key: read(self.state_key)})["shape"])

    def transformers_config(self, skipped: list[str], compute_dtype: str) -> dict:
        """The `quantization_config` transformers reads to load these files with bitsandbytes."""
        return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
                "bnb_4bit_quant_type": self.quant_type, "bnb_4bit_use_double_quant": self.double_quant,
                "bnb_4bit_compute_dtype": compute_dtype, "bnb_4bit_quant_storage": "uint8",
                "llm_int8_skip_modules": skipped}

    # -- detect (headers only) -----------------------------------------------------------------
    def detect(self, store: TensorStore) -> bool:
        suffix, keys = f".quant_state.bitsandbytes__{self.quant_type}", set(store.keys())
        for base in (k[: -len(suffix)] for k in keys if k.endswith(suffix)):
            if base in keys and f"{base}.absmax" in keys:
                return (f"{base}.nested_absmax" in keys) == self.double_quant
        return False


NF4 = FourBit("nf4", "nf4", about="NF4 4-bit NormalFloat, blocks of 64 absmax (QLoRA; bitsandbytes layout)")
FP4 = FourBit("fp4", "fp4", about="FP4 4-bit float (e2m1), blocks of 64 absmax (bitsandbytes layout)")
NF4.double_quant_form, FP4.double_quant_form = "nf4_dq", "fp4_dq"  # what `--double-quant` picks
NF4_DQ = FourBit("nf4_dq", "nf4", double_quant=True, about="NF4 with double quantization of the absmax (QLoRA DQ)")
FP4_DQ = FourBit("fp4_dq", "fp4", double_quant=True, about="FP4 with double quantization of the absmax")
