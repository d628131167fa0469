"""Finding the adapter in a tensor store: each format plugin is asked whether it recognizes it."""
from __future__ import annotations

from pathlib import Path

from . import registry, spec
from .io import TensorStore, open_store
from .spec import AdapterFiles


def detect_format(store: TensorStore) -> str | None:
    """The name of the first format plugin that recognizes `store` as an adapter, or None."""
    return registry.detect("format", store)


def read_adapter(source: TensorStore | str | Path, *, allow_pickle: bool = False) -> AdapterFiles | None:
    """The adapter in `source` in canonical form, or None when it holds a full model."""
    store = source if isinstance(source, TensorStore) else open_store(source, allow_pickle=allow_pickle)
    fmt = detect_format(store)
    if fmt is None:
        return None
    adapter = registry.get("format", fmt).read(store)
    variant = registry.get("variant", adapter.variant)
    if isinstance(variant, spec.FileCheck):
        variant.check_files(adapter)  # a config that contradicts its tensors is refused before anything uses either
    return adapter
