"""Quantized frozen base layers, for training adapters on a quantized model (QLoRA, arXiv 2305.14314)
and for quantization-aware training.

`QuantizedLinear` holds a linear layer's weight packed by any quantizer plugin and computes
y = x·Ŵᵀ + b with Ŵ = dequantize(packed), made when the layer runs and dropped right after: only
the layer running has a full-precision weight, never the whole model. Its backward recomputes Ŵ
for ∂L/∂x = ∂L/∂y · Ŵ rather than keeping it, and gives the frozen weight no gradient.

`load_quantized` builds a transformers model whose linear layers never exist in full precision:
they are created on the meta device and filled straight from the checkpoint, one tensor at a time,
so the peak memory is the packed model plus one tensor.

`fake_quantize` is the straight-through estimator of QAT: forward Q(W) = dequantize(quantize(W)),
backward the identity (Bengio et al. 2013, arXiv 1308.3432).
"""
from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import allocator, registry, spec
from ..errors import AdaptkitError


class QuantizedLinear(nn.Module):
    """A frozen linear layer whose weight (out × in) a quantizer plugin keeps packed."""

    def __init__(self, method: str, packed: Mapping[str, torch.Tensor], in_features: int, out_features: int,
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.method, self.in_features, self.out_features = method, in_features, out_features
        self.quantizer = registry.get("quantizer", method)
        self._keys: dict[str, str] = {}  # buffer name -> the plugin's key ("weight", "weight.absmax", ...)
        self._pack(packed)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def _pack(self, packed: Mapping[str, torch.Tensor]) -> None:
        for name in self._keys:
            delattr(self, name)
        self._keys = {}
        # small tensors the plugin reads on the host (a JSON state, a shape) stay on the CPU, so
        # unpacking on a GPU never waits for a device-to-host copy
        host = set(spec.option(self.quantizer, "host_keys"))
        self._host = {key: tensor.cpu() for key, tensor in packed.items() if key in host}
        for key, tensor in packed.items():
            if key not in host:
                name = "packed_" + key.replace(".", "_")
                self.register_buffer(name, tensor)
                self._keys[name] = key

    @classmethod
    def from_weight(cls, method: str, weight: torch.Tensor, bias: torch.Tensor | None = None) -> QuantizedLinear:
        """Quantize `weight` (out × in) with the quantizer plugin `method`."""
        out_features, in_features = weight.shape
        packed = registry.get("quantizer", method).quantize(weight.detach().cpu())
        return cls(method, packed, in_features, out_features, bias).to(weight.device)

    def packed(self) -> dict[str, torch.Tensor]:
        """The packed tensors under the plugin's keys (on the layer's device; `host_keys` on the CPU)."""
        return {**{key: getattr(self, name) for name, key in self._keys.items()}, **self._host}

    def dequantized(self, dtype: torch.dtype | None = None, *, scratch: bool = False) -> torch.Tensor:
        """Ŵ (out × in), made on the layer's device: a fresh tensor, or (`scratch`, where the quantizer
        `unpacks_into` a buffer) one in this thread's scratch buffer, valid until the next scratch
        unpacking: for a layer's own matmul, which drops Ŵ at once."""
        buffer = _SCRATCH.get if scratch and spec.option(self.quantizer, "unpacks_into") else None
        packed = self.packed()
        w = (self.quantizer.dequantize(packed, buffer=buffer) if buffer else self.quantizer.dequantize(packed))
        w = w.reshape(self.out_features, self.in_features)
        return w if dtype is None else w.to(dtype)

    @property
    def weight(self) -> torch.Tensor:
        """Ŵ, for code that reads a layer's weight (merging, weight-norm variants). Writing to it changes
        nothing: change the packed weight with `add_to_weight`."""
        return self.dequantized()

    def add_to_weight(self, delta: torch.Tensor, sign: int = 1) -> None:
        """W ← Q(Ŵ + sign·ΔW): a merge into a quantized layer rounds again (not undone exactly)."""
        with torch.no_grad():
            current = self.dequantized()
            w = current.float() + sign * delta.float().to(current.device)
            packed = self.quantizer.quantize(w.to(current.dtype).cpu())
            self._pack({k: v.to(current.device) for k, v in packed.items()})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _DequantizedMatmul.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, method={self.method}, bias={self.bias is not None}"


class _Scratch(threading.local):
    """One buffer per (dtype, device) and thread, as large as the largest Ŵ unpacked into it (kept for
    the thread's life; the unpacking's integer temporaries get their own, by dtype): a layer's Ŵ lives
    only for its matmul, so the layers take turns in it. Why: a
    fresh Ŵ on every call either fragmented glibc's heap around the saved activations (peak RSS up by
    half) or, mapped fresh, was faulted in page by page each time (allocator.py); reused, a QLoRA step
    on the CPU runs as fast as PEFT + bitsandbytes' (benchmarks/train.py --qlora)."""

    def __init__(self):
        self.buffers: dict = {}

    def get(self, shape, dtype: torch.dtype, device) -> torch.Tensor:
        n = math.prod(shape)
        held = self.buffers.get((dtype, str(device)))
        if held is None or held.numel() < n:
            self.buffers[(dtype, str(device))] = held = None  # the old one freed before the new is made
            held = self.buffers[(dtype, str(device))] = torch.empty(n, dtype=dtype, device=device)
        return held[:n].view(shape)


_SCRATCH = _Scratch()


class _DequantizedMatmul(torch.autograd.Function):
    """x·Ŵᵀ where Ŵ is unpacked in the forward and again in the backward, never saved."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
        ctx.layer, ctx.dtype = layer, x.dtype
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        ctx.compute = dtype
        return F.linear(x.to(dtype), layer.dequantized(dtype, scratch=True))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        w = ctx.layer.dequantized(ctx.compute, scratch=True)
        return (grad.to(ctx.compute) @ w).to(ctx.dtype), None


class _FakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: torch.Tensor, method: str) -> torch.Tensor:
        quantizer = registry.get("quantizer", method)
        return quantizer.dequantize(quantizer.quantize(w.detach().cpu())).to(device=w.device, dtype=w.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def fake_quantize(weight: torch.Tensor, method: str) -> torch.Tensor:
    """Q(W) in the forward, the identity in the backward (straight-through estimator)."""
    return _FakeQuantize.apply(weight, method)


# -- whole models --------------------------------------------------------------------------------
def _linear_weight(module: nn.Module) -> tuple[torch.Tensor, bool] | None:
    """(weight, stored in × out?) of a layer `QuantizedLinear` can replace: nn.Linear, GPT-2's Conv1D."""
    if isinstance(module, nn.Linear):
        return module.weight, False
    if type(module).__name__ == "Conv1D" and isinstance(getattr(module, "weight", None), torch.Tensor) \
            and module.weight.dim() == 2:
        return module.weight, True
    return None


def default_skip(model: nn.Module) -> list[str]:
    """Module paths kept in full precision by default: the output embedding (LM head), as QLoRA does."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if getter else None
    return [path for path, module in model.named_modules() if head is not None and module is head]


def _skipped(path: str, skip: Iterable[str]) -> bool:
    return any(path == s or path.startswith(s + ".") or (s and s in path.rsplit(".", 1)[-1]) for s in skip)


def quantize_model(model: nn.Module, method: str, *, skip: Iterable[str] | None = None) -> int:
    """Replace every floating linear layer (nn.Linear, Conv1D) of `model` by a `QuantizedLinear`,
    in place, except the modules in `skip` (paths, or names of the last path part; default: the
    LM head). Returns how many were replaced."""
    registry.get("quantizer", method)  # unknown names fail before any work
    allocator.tune("quantized")  # transient weights mapped, not heaped (the command only: allocator.py)
    skip = default_skip(model) if skip is None else list(skip)
    count = 0
    for path, module in list(model.named_modules()):
        found = _linear_weight(module)
        if not path or found is None or _skipped(path, skip) or not found[0].is_floating_point():
            continue
        weight, transposed = found
        if weight.is_meta:
            raise AdaptkitError(f"{path}: its weight was never loaded (meta device)")
        w = weight.detach().T if transposed else weight.detach()
        bias = getattr(module, "bias", None)
        _replace(model, path, QuantizedLinear.from_weight(method, w.contiguous(), bias))
        count += 1
    return count


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, new)


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantizedLinear) for m in model.modules())


@contextlib.contextmanager
def _linears_on_meta():
    """nn.Linear layers made in this block get their weight and bias on the meta device (no memory)."""
    original = nn.Linear.__init__

    def init(self, in_features, out_features, bias=True, device=None, dtype=None):
        original(self, in_features, out_features, bias, device="meta", dtype=dtype)

    nn.Linear.__init__ = init
    try:
        yield
    finally:
        nn.Linear.__init__ = original


def _checkpoint_names(stored: Iterable[str], wanted: set[str], prefix: str) -> dict[str, str]:
    """model key -> checkpoint key, allowing the base-model prefix on either side (as transformers does)."""
    found: dict[str, str] = {}
    for key in stored:
        for candidate in (key, f"{prefix}.{key}", key.removeprefix(f"{prefix}.")):
            if candidate in wanted and candidate not in found:
                found[candidate] = key
                break
    return found


def load_quantized(folder: Path, auto: Any, config: Any, *, method: str, dtype: torch.dtype,
                   skip: Iterable[str] = ()) -> tuple[nn.Module, list[str]]:
    """(model, new modules): a transformers model built from `config` whose linear layers are
    quantized with `method` straight from the checkpoint in `folder`. Modules in `skip` (and the
    LM head) stay in `dtype`; layers the checkpoint lacks (a new head) are initialized and listed."""
    from ..io.store import open_store
    from .unpacked import UnpackedStore, detect_quantizer

    registry.get("quantizer", method)
    allocator.tune("quantized")
    raw = open_store(folder)
    stored = detect_quantizer(raw)  # a quantized checkpoint: its packed layers are taken as they are
    if stored is not None and stored != method:
        raw.close()
        raise AdaptkitError(f"{folder} is quantized with {stored}; load it with that method, not {method}")
    store = UnpackedStore(raw, stored) if stored else raw
    with _linears_on_meta():
        model = auto.from_config(config, dtype=dtype, trust_remote_code=False)
    skip = list(skip) + default_skip(model)
    try:
        state = model.state_dict(keep_vars=True)
        names = _checkpoint_names(store.keys(), set(state), getattr(model, "base_model_prefix", ""))
        loaded: set[str] = set()
        for path, module in list(model.named_modules()):
            if not isinstance(module, nn.Linear) or not module.weight.is_meta:
                continue
            key = names.get(f"{path}.weight")
            shape_ok = key is not None and tuple(store.info(key).shape) == (module.out_features, module.in_features)
            bias_key = names.get(f"{path}.bias")
            if shape_ok and not _skipped(path, skip):
                bias = store.get(bias_key).to(dtype) if module.bias is not None and bias_key else None
                if module.bias is not None and bias is None:
                    continue  # no stored bias: made whole below like any new layer
                if store.packed(key):
                    packed = {k: raw.get(name) for k, name in store.groups[key].items()}
                    layer = QuantizedLinear(method, packed, module.in_features, module.out_features, bias)
                else:
                    layer = QuantizedLinear.from_weight(method, store.get(key).to(dtype), bias)
                _replace(model, path, layer)
                loaded.update({f"{path}.weight", f"{path}.bias"})
            elif shape_ok:  # kept in full precision (skipped); layers the checkpoint lacks are made below
                module.to_empty(device="cpu", recurse=False)
                with torch.no_grad():
                    module.weight.copy_(store.get(key))
                    if module.bias is not None and bias_key:
                        module.bias.copy_(store.get(bias_key))
                    loaded.update({f"{path}.weight", f"{path}.bias"} if bias_key or module.bias is None else {f"{path}.weight"})
        state = model.state_dict(keep_vars=True)
        with torch.no_grad():
            for name, tensor in state.items():
                key = names.get(name)
                if key is None or name in loaded or tensor.is_meta or tuple(store.info(key).shape) != tuple(tensor.shape):
                    continue
                tensor.copy_(store.get(key))
                loaded.add(name)
    finally:
        store.close()
    for path, module in model.named_modules():  # layers the checkpoint did not fill: fresh initialization
        if any(p.is_meta for p in module.parameters(recurse=False)):
            module.to_empty(device="cpu", recurse=False)
            init = getattr(model, "_init_weights", None)
            init(module) if init else module.reset_parameters()
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    missing = [n for n, _ in model.named_parameters() if n not in loaded]  # tied copies are listed once
    new = sorted({n.rsplit(".", 1)[0] for n in missing if "." in n})
    # linear layers that are not nn.Linear (GPT-2's Conv1D) were made and loaded whole: pack them now
    quantize_model(model, method, skip=skip + new)
    quantized = sum(isinstance(m, QuantizedLinear) for m in model.modules())
    if quantized == 0:
        raise AdaptkitError(f"{folder}: no linear layer of the checkpoint could be quantized (names did not match the model)")
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()  # as from_pretrained leaves it
    return model, [m for m in new if not any(m.startswith(o + ".") for o in new)]

