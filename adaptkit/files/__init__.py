"""Adapters on disk, in any format plugin: `inspection` (what a path holds, from headers alone), `convert`
(between formats and variants, resizing, extracting a LoRA from a fine-tune) and `lowrank` (the truncated
SVD and ΔW = s·B·A every low-rank path shares). Which format holds a store is `adaptkit.adapter`."""

__all__ = ["convert", "inspection", "lowrank"]
