"""Finding the adapter in a tensor store: each format plugin is asked whether it recognizes it."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from . import registry, spec
from .io.store import TensorStore, open_store
from .spec import AdapterFiles


def detect_format(store: TensorStore) -> str | None:
    """The name of the first format plugin that recognizes `store` as an adapter, or None."""
    return registry.detect("format", store)


def read_adapter(source: TensorStore | str | Path, *, allow_pickle: bool = False,
                 check: bool = True) -> AdapterFiles | None:
    """The adapter in `source` in canonical form, or None when it holds a full model. `check=False` leaves
    out the variant's `check_files` (`inspect` runs it itself, to describe an adapter it refuses)."""
    store = source if isinstance(source, TensorStore) else open_store(source, allow_pickle=allow_pickle)
    fmt = detect_format(store)
    if fmt is None:
        return None
    adapter = registry.get("format", fmt).read(store)
    if check:
        check_adapter(adapter)
    return adapter


def check_adapter(adapter: AdapterFiles) -> None:
    """The variant's `check_files`: a config that contradicts its tensors, or names a feature adaptkit does not
    implement, is refused before anything uses either."""
    variant = registry.get("variant", adapter.variant)
    if isinstance(variant, spec.FileCheck):
        variant.check_files(adapter)


def describe(adapter: AdapterFiles) -> dict[str, Any]:
    """The figures `adaptkit inspect` reports for an adapter (and a Hub card shows): the core's keys,
    then whatever the variant's `describe` adds (rank, alpha, ...)."""
    variant = registry.get("variant", adapter.variant)
    cfg = adapter.config
    figures = {
        "variant": adapter.variant,
        "format": adapter.format,
        "base_model": adapter.base_model,
        "target_modules": cfg.get("target_modules"),
        "targeted_modules": len(adapter.modules),
        "trainable_parameters": adapter.numel(),
        "modules_to_save": sorted(adapter.saved),
    }
    # The variant adds its own figures; the core's keys keep their meaning whatever a plugin returns.
    return {**variant.describe(adapter), **figures}
