"""Checkpoint tensors that transformers 5 fuses on load, and where mergekit 0.1.5's numbers differ for them.

mergekit 0.1.5 reads a checkpoint through transformers 5's conversion table (`transformers.conversion_mapping`;
its `architecture/conversion.py`) and merges the tensors as a transformers 5 model holds them: a Mixtral's
`block_sparse_moe.experts.{e}.w1.weight` and `w3` of every expert become one `mlp.experts.gate_up_proj`,
the `w2`s one `mlp.experts.down_proj`, and that is what it writes. adaptkit merges the tensors as the
checkpoint stores them and writes them so, a layout that transformers 4 and 5 both load.

An elementwise method without filters gives the same numbers either way. Any other method takes its
statistics per tensor (an angle, a top-k, a variance, a norm), so it sees one expert's matrix where
mergekit sees all experts' at once; and a `filter:` matches the names each tool sees (`mlp` matches
mergekit's `mlp.experts.down_proj`, not the checkpoint's `block_sparse_moe.experts.0.w2.weight`). For
such recipes the merge gets a warning that says so, rather than numbers that differ from mergekit's in
silence (measured: `benchmarks/arch_recipes.yml`, Mixtral's slerp and TIES).
"""
from __future__ import annotations

import re
import warnings
from typing import Any

from .. import spec

#: A per-expert tensor, the only kind transformers 5's tables fuse (its renames alone change no number, only
#: what a filter matches, and come with the fused experts in the MoE models that have them).
EXPERT = re.compile(r"\.experts\.\d+\.")


def warn_converted(names: list[str], config: dict[str, Any], method: Any, source: dict[str, Any]) -> None:
    """Warn where mergekit 0.1.5 would merge these tensors in transformers 5's fused layout and get other
    numbers: per-expert tensors merged by a method that is not elementwise or with filters. transformers'
    table is read only then (importing it takes about 2.5 s)."""
    filtered, config = _has_filter(source), config or {}
    if not any(EXPERT.search(n) for n in names) or (spec.option(method, "elementwise") and not filtered):
        return
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        transforms = get_checkpoint_conversion_mapping(config.get("model_type")) or []
    except (ImportError, KeyError, ValueError):  # (a transformers without the table, or no model_type)
        return
    for name in names:
        fused = name
        for transform in transforms:
            renamed, pattern = transform.rename_source_key(fused)
            fused = renamed if pattern is not None else fused
        if fused != name:
            why = " and ".join(([] if spec.option(method, "elementwise") else ["each statistic covers all experts at once"])
                               + (["its filters match the fused names"] if filtered else []))
            warnings.warn(f"{config.get('model_type')}: mergekit 0.1.5 merges these experts in transformers 5's fused "
                          f"layout ('{name}' as part of '{fused}'), where {why}: its numbers differ from these. "
                          "adaptkit merges and writes the checkpoint's tensors as stored")
            return


def _has_filter(node: Any) -> bool:
    if isinstance(node, dict):
        return "filter" in node or any(_has_filter(v) for v in node.values())
    return isinstance(node, list) and any(_has_filter(v) for v in node)
