"""The plugin API: everything a plugin (built-in or third-party) may import from adaptkit.

A plugin imports from `adaptkit.plugin` and nothing else of adaptkit; the names below are the
stable line between the core and its plugins. Anything not listed here is core-internal and may
move or change without notice (tests/test_plugin_api.py holds the built-in plugins and
examples/plugin-example to this). The groups:

- Contracts: `AdapterFiles` (a saved adapter in canonical form: config, module -> role -> key of
  its tensor store; what a format reads into and a variant describes), `LowRankModule` /
  `LowRankAdapter` (A, B and alpha per module: what a format writes and a low-rank variant gives).
- Errors: `AdaptkitError` (one line a user can act on: names the path and the fault) and
  `closest(name, known)` for "did you mean" hints.
- Other plugins: `registry`, a namespace; `registry.get(kind, name)` returns the plugin a config or
  a file names (e.g. the variant an adapter config declares).
- Config checking: `validate`, a namespace of field checkers (`validate.positive_int`,
  `validate.optional(check)`, `validate.list_of(check)`, ...) and `validate.check_fields(config,
  FIELDS, where)`; a variant's `config_types` is built from them.
- Files: `TensorStore` (lazy tensors by name, headers first; what `detect` is given),
  `parse_json` / `dump_json` (JSON read with bounded nesting and no repeated key; JSON written with
  NaN refused by name), `save_tensors` (a state dict written as safetensors files, sharded by size).
- Merging: `command_threads()`, torch's thread count in the merge command's own thread while its
  workers run with fewer (else None): the count whose split of a whole-tensor sum an operator reproduces.
- Dtypes: `dtypes`, a namespace; `dtypes.COMPUTE` (the float dtypes weights are computed in) and
  `dtypes.scalar(code, raw)` (one stored number decoded without torch).
- Module plane (these import torch, so they load on first use: import them inside the functions
  that use them): `Target` (a layer an adapter can wrap), `find_targets(model, target_modules,
  ...)`, `layer_index(path, pattern)` and `LAYER_LISTS` (the numbered layer lists), `Adapters`
  (the adapters on a model).

Three groups are namespaces rather than names because plugins use them qualified: a config table
reads `v.optional(v.list_of(v.positive_int))`, and bare `number`, `text`, `count`, `patterns`,
`scalar` or `get` would clash with a plugin's own helpers and locals or say nothing at the call.

Importing this module does not import torch: plugins are imported to list and detect them, which
`adaptkit inspect` does without torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from . import registry, validate
from .io import dtypes
from .errors import AdaptkitError, UnsupportedError, closest
from .io.store import TensorStore
from .io.readers import dump_json, parse_json
from .spec import AdapterFiles, LowRankAdapter, LowRankModule
from .io.writer import save_tensors
from .merge.schedule import command_threads

if TYPE_CHECKING:
    from .live.adapters import Adapters
    from .live.layer import Target
    from .live.targets import LAYER_LISTS, find_targets, layer_index, matches_target

# The module plane's names: their modules import torch, so they are imported when first asked for.
_NEEDS_TORCH = {"Adapters": ".live.adapters", "Target": ".live.layer", "LAYER_LISTS": ".live.targets",
                "find_targets": ".live.targets", "layer_index": ".live.targets", "matches_target": ".live.targets"}


def __getattr__(name: str):
    if name in _NEEDS_TORCH:
        return getattr(importlib.import_module(_NEEDS_TORCH[name], __package__), name)
    raise AttributeError(f"module 'adaptkit.plugin' has no attribute {name!r}")


__all__ = [
    # contracts
    "AdapterFiles", "LowRankAdapter", "LowRankModule",
    # errors
    "AdaptkitError", "UnsupportedError", "closest",
    # other plugins
    "registry",
    # config checking
    "validate",
    # files
    "TensorStore", "dump_json", "parse_json", "save_tensors",
    # merging
    "command_threads",
    # dtypes
    "dtypes",
    # module plane (imports torch on first use)
    "Adapters", "LAYER_LISTS", "Target", "find_targets", "layer_index", "matches_target",
]
