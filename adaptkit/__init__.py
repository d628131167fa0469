"""adaptkit: parameter-efficient adapters and model merging through one plugin registry.

The Python API mirrors the CLI: `adaptkit.inspect(path)` returns the dict behind
`adaptkit inspect --json`; `adaptkit.open_store(path)` gives lazy, memory-mapped tensors.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import AdaptkitError
from .inspection import inspect
from .io import open_store

__all__ = ["AdaptkitError", "__version__", "inspect", "open_store"]
