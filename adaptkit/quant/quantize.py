"""Post-training quantization of a whole model with one quantizer plugin (`adaptkit quantize`).

Every floating-point 2-D `*.weight` tensor whose name contains no `skip` item is packed by the
quantizer; its packed tensors (keys relative to "weight", e.g. "weight", "weight.<stat>") are
stored under the tensor's own name (`a.b.weight` -> `a.b.weight`, `a.b.weight.<stat>`). All other
tensors are copied as they are. The writer needs the layout up front: a first pass asks the
quantizer's `packed_layout(tensor)` for the packed shapes and dtypes (cheap: 4-bit double
quantization needs the block absmax for its state's JSON), or quantizes to learn them when the
plugin has no such method; the second pass quantizes, measures the error and writes, one tensor at a
time. Memory stays at a few copies of the largest tensor. The output's temporary folder is made only
when the second pass starts (the output is checked before the first).
"""
from __future__ import annotations

import math
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .. import registry, spec
from ..io.dtypes import FLOAT_CODES, SIZES, compute_dtype
from ..errors import AdaptkitError
from ..io.store import open_store
from ..io.outputs import atomic_output, check_output
from ..io.writer import DEFAULT_SHARD_SIZE, ShardedWriter, copy_side_files

METADATA_KEY = "adaptkit_quantization"


def packed_names(name: str, packed: Iterable[str]) -> dict[str, str]:
    """Plugin key -> stored name: the leading "weight" of each key becomes the tensor's full name."""
    out = {}
    for key in packed:
        if key != "weight" and not key.startswith("weight."):
            raise AdaptkitError(f"quantizer key '{key}' does not start with 'weight'")
        out[key] = name + key[len("weight"):]
    return out


def select(store, skip: Iterable[str] = ()) -> list[str]:
    """The tensors to quantize: floating 2-D `*.weight` whose name contains no skip item."""
    skip = [s for s in skip if s]
    return [k for k in store.keys()
            if k.endswith(".weight") and store.info(k).dtype in FLOAT_CODES and len(store.info(k).shape) == 2
            and not any(s in k for s in skip)]


def relative_error(quantizer, packed: dict, original) -> float:
    """‖Ŵ − W‖ / ‖W‖ (‖Ŵ − W‖ when W = 0), summed in float64 over chunks of 1M values."""
    w, restored = original.reshape(-1), quantizer.dequantize(packed).reshape(-1)
    diff = norm = 0.0
    for chunk in zip(w.split(1 << 20), restored.split(1 << 20)):
        part = chunk[0].double()
        diff += (chunk[1].double() - part).square().sum().item()
        norm += part.square().sum().item()
    return math.sqrt(diff / norm) if norm else math.sqrt(diff)


def run_quantize(model: str | Path, method: str, out: str | Path, *, skip: Iterable[str] = (),
                 only: Iterable[str] | None = None, force: bool = False,
                 shard_size: int | str = DEFAULT_SHARD_SIZE, allow_pickle: bool = False,
                 progress: bool = True) -> dict[str, Any]:
    """Quantize `model` with quantizer plugin `method` into the folder `out`; returns the report.
    `only` names the tensors to quantize exactly (else every 2-D float weight not in `skip`)."""
    from .unpacked import detect_quantizer

    start = time.perf_counter()
    registry.get("quantizer", method)  # an unknown name fails before any reading
    store = open_store(model, allow_pickle=allow_pickle)
    found = detect_quantizer(store)
    if found is not None:
        raise AdaptkitError(f"{model}: already quantized ({found}); quantize a floating-point model")
    chosen = set(select(store, skip)) if only is None else set(only)
    check_output(out, force=force, inputs=[model])  # before the planning pass, not after it
    layout = plan_layout(store, method, chosen, progress=progress)
    with atomic_output(out, force=force, inputs=[model]) as tmp:  # the temporary folder appears as writing starts
        report = quantize_into(store, method, chosen, tmp, layout=layout, shard_size=shard_size, progress=progress)
        _describe_for_transformers(store, method, chosen, tmp)
    store.close()
    report.update(model=str(model), output=str(out), skip=[s for s in skip if s],
                  seconds=round(time.perf_counter() - start, 3))
    return report


def _describe_for_transformers(store, method: str, chosen: set[str], folder: Path) -> None:
    """Where the quantizer has a transformers loading config (`transformers_config`), put it in
    config.json as `quantization_config`, the weights left unpacked as its skipped modules, so
    `from_pretrained` loads the folder quantized (transformers packs linear layers only: embeddings
    must be skipped for it)."""
    from ..io.readers import update_json

    quantizer = registry.get("quantizer", method)
    path = folder / "config.json"
    if not isinstance(quantizer, spec.TransformersConfig) or not path.is_file() or not chosen:
        return
    skipped = sorted({k.rsplit(".", 1)[0] for k in select(store) if k not in chosen})
    dtypes = sorted({store.info(k).dtype for k in chosen})
    dtype = compute_dtype(dtypes[0]) if len(dtypes) == 1 else "float32"
    update_json(path, lambda config: config.update(quantization_config=quantizer.transformers_config(skipped, dtype)))


def plan_layout(store, method: str, chosen: set[str], *,
                progress: bool = True) -> list[tuple[str, str, tuple[int, ...]]]:
    """Pass 1: the output's (name, dtype code, shape) in order, the tensors in `chosen` as `method`
    packs them (the writer places every tensor up front)."""
    from tqdm import tqdm

    from ..io.dtypes import torch_to_code

    quantizer = registry.get("quantizer", method)
    names = list(store.keys())
    layout: list[tuple[str, str, tuple[int, ...]]] = []
    bar = tqdm(total=len(names), unit="tensor", desc=f"plan {method}", disable=not progress, leave=False)
    planned = quantizer.packed_layout if isinstance(quantizer, spec.PackedLayout) else None
    for name in names:
        info = store.info(name)
        if name in chosen:
            w = store.get(name)
            shapes = planned(w) if planned else {k: (torch_to_code(t.dtype), tuple(t.shape))
                                                 for k, t in quantizer.quantize(w).items()}
            stored = packed_names(name, shapes)
            layout += [(stored[k], code, shape) for k, (code, shape) in shapes.items()]
            del w
        else:
            layout.append((name, info.dtype, tuple(info.shape)))
        bar.update()
    bar.close()
    taken = [n for n, _, _ in layout]
    if len(set(taken)) != len(taken):
        clash = next(n for n in taken if taken.count(n) > 1)
        raise AdaptkitError(f"packed tensor '{clash}' collides with another tensor of the model")
    return layout


def quantize_into(store, method: str, chosen: set[str], folder: Path, *, layout: list | None = None,
                  shard_size: int | str = DEFAULT_SHARD_SIZE, progress: bool = True) -> dict[str, Any]:
    """Write `store` into the existing `folder` with the tensors in `chosen` packed by `method`
    (pass 2; `layout` from `plan_layout`, made here if not given); returns the report's figures
    (files, per-tensor error, counts, bytes)."""
    from tqdm import tqdm

    from ..io.dtypes import torch_to_code

    quantizer = registry.get("quantizer", method)
    names = list(store.keys())
    layout = plan_layout(store, method, chosen, progress=progress) if layout is None else layout
    errors: dict[str, float] = {}
    bar = tqdm(total=len(names), unit="tensor", desc=f"quantize {method}", disable=not progress, leave=False)
    expected = {n: (code, shape) for n, code, shape in layout}
    metadata = {"format": "pt", METADATA_KEY: method}
    writer = ShardedWriter(folder, layout, shard_size=shard_size, metadata=metadata)
    try:
        for name in names:
            t = store.get(name)
            if name in chosen:
                packed = quantizer.quantize(t)
                errors[name] = relative_error(quantizer, packed, t)
                for key, stored in packed_names(name, packed).items():
                    if expected.get(stored) != (torch_to_code(packed[key].dtype), tuple(packed[key].shape)):
                        raise AdaptkitError(f"quantizer {method}: '{stored}' came out {tuple(packed[key].shape)} "
                                            f"{packed[key].dtype}, not as its packed_layout said {expected.get(stored)}")
                    writer.write(stored, packed[key])
                del packed
            else:
                writer.write(name, t)
            del t
            bar.update()
    except BaseException:
        writer.abort()
        raise
    files = writer.close()
    if not store.lone:  # (a lone file's neighbours may belong to anything)
        copy_side_files(store.root, folder)
    bar.close()
    before = sum(store.info(n).nbytes for n in names)
    after = sum(math.prod(shape) * SIZES[code] for _, code, shape in layout)
    values = list(errors.values())
    return {
        "method": method, "files": [f.name for f in files], "tensors": {n: {"error": e} for n, e in errors.items()},
        "quantized": len(errors), "copied": len(names) - len(errors),
        "bytes_before": before, "bytes_after": after,
        "mean_error": sum(values) / len(values) if values else 0.0, "max_error": max(values, default=0.0),
    }
