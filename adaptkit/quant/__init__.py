"""Quantized models through the quantizer plugins: whole-model post-training quantization (`quantize`),
quantized frozen layers for QLoRA and quantization-aware training (`quantized`), and a quantized model
read back as floating point for merging (`unpacked`)."""

import importlib

# The public functions, imported on first use (they need torch; the submodules stay importable alone).
_EXPORTS = {'run_quantize': '.quantize', 'quantize_model': '.quantized', 'load_quantized': '.quantized'}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ['load_quantized', 'quantize', 'quantize_model', 'quantized', 'run_quantize', 'unpacked']
