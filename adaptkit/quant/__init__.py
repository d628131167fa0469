"""Quantized models through the quantizer plugins: whole-model post-training quantization (`quantize`),
quantized frozen layers for QLoRA and quantization-aware training (`quantized`), and a quantized model
read back as floating point for merging (`unpacked`)."""

__all__ = ["quantize", "quantized", "unpacked"]
