"""adaptkit: parameter-efficient adapters and model merging through one plugin registry.

The Python API mirrors the CLI: `adaptkit.inspect(path)` returns the dict behind
`adaptkit inspect --json`; `adaptkit.open_store(path)` gives lazy, memory-mapped tensors.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import AdaptkitError
from .files.inspection import inspect
from .io import open_store


def __getattr__(name):
    # The module plane needs torch; `import adaptkit` (and `adaptkit inspect`) must not.
    if name in ("inject", "load_adapter", "Adapters"):
        from .live import adapters

        return getattr(adapters, name)
    if name in ("ensemble", "Ensemble"):  # outputs of several adapters combined (live/ensembles.py)
        from .live import ensembles

        return getattr(ensembles, name)
    if name == "generate":  # ak.generate(model, prompts, adapters=...): text from a causal LM (train/generation.py)
        from .train.generation import generate

        return generate
    if name == "hub":  # ak.hub.search(...), ak.hub.pull(...): imported on first use
        import importlib

        return importlib.import_module(".hub", __name__)
    raise AttributeError(f"module 'adaptkit' has no attribute {name!r}")


__all__ = ["AdaptkitError", "Adapters", "Ensemble", "__version__", "ensemble", "generate", "hub", "inject", "inspect",
           "load_adapter", "open_store"]
