"""`adaptkit inspect`: what a path holds, from headers and config files alone (no tensor data).

The dict returned by `inspect(path)` is the `--json` output; its keys are stable:

  path, kind ("model" | "adapter" | "quantized-model"), format, tensors, parameters, bytes,
  dtypes {name: {tensors, parameters}}, shards [{file, tensors, bytes}], metadata,
  model (config.json summary or null), adapter (null, or: variant, format, base_model,
  target_modules, targeted_modules, trainable_parameters, modules_to_save, and the variant's
  figures such as rank, ranks, alpha, scaling, modules {path: {rank, alpha, scaling}}; and
  adaptkit_format: true when the config names an `adaptkit_variant`, a variant only adaptkit reads
  whatever folder layout it borrows; unsupported: the one-line reason load, merge and convert refuse
  the adapter, where they do),
  quantization (null, or {method}).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import registry, validate
from ..adapter import check_adapter, describe, read_adapter
from ..errors import UnsupportedError
from ..io.dtypes import NAMES as DTYPE_NAMES
from ..io.store import TensorStore, open_store
from ..hub.repos import is_reference, resolve
from ..io.outputs import recover_output

MODEL_FIELDS = ("model_type", "architectures", "hidden_size", "num_hidden_layers", "vocab_size",
                "torch_dtype", "dtype")
#: Older spellings of MODEL_FIELDS' keys, as transformers' `attribute_map`s read them (GPT-2's n_embd and
#: n_layer, T5's and BART's d_model): the figure is reported under the common name when that key is absent.
ALIASES = {"hidden_size": ("n_embd", "d_model"), "num_hidden_layers": ("n_layer",)}


def inspect(path: str | Path, *, allow_pickle: bool = False) -> dict[str, Any]:
    """Describe the model, adapter or quantized model at `path` (see the module docstring); a lock
    name or `org/name[@rev]` is resolved through `adaptkit.hub`."""
    local = Path(path).expanduser()
    recover_output(local)  # an output a killed run had set aside comes back first
    if not local.exists() and is_reference(str(path)):
        local = resolve(str(path))
    store = open_store(local, allow_pickle=allow_pickle)
    report = _tensor_figures(store)
    report["path"] = str(Path(path))
    adapter = read_adapter(store, check=False)
    refusal = _refusal(adapter)
    quantizer = None if adapter else registry.detect("quantizer", store)
    report["kind"] = "adapter" if adapter else "quantized-model" if quantizer else "model"
    report["format"] = adapter.format if adapter else _file_format(store)
    config = validate.model_config(store.json_file("config.json"), store.root / "config.json") if not adapter else None
    report["model"] = _model_figures(config) if config else None
    report["adapter"] = _described(adapter, refusal) if adapter else None
    if adapter is not None and adapter.config.get("adaptkit_variant"):
        report["adapter"]["adaptkit_format"] = True  # other tools would refuse it, or read it as something else
    report["quantization"] = {"method": quantizer} if quantizer else None
    return report


def _model_figures(config: dict) -> dict[str, Any]:
    """config.json's MODEL_FIELDS, each under its common name (ALIASES) where the config spells it otherwise."""
    figures = {k: config[k] for k in MODEL_FIELDS if k in config}
    for key, aliases in ALIASES.items():
        found = next((config[a] for a in aliases if a in config), None)
        if key not in figures and found is not None:
            figures[key] = found
    return figures


def _refusal(adapter) -> UnsupportedError | None:
    """Why the commands that use the adapter refuse it (its variant's file check names a feature adaptkit does
    not implement), or None. A config that contradicts its tensors stays an error here too."""
    try:
        if adapter is not None:
            check_adapter(adapter)
    except UnsupportedError as err:
        return err
    return None


def _described(adapter, refusal: UnsupportedError | None) -> dict[str, Any]:
    """The adapter's figures, with the refusal as a row; where the variant cannot describe the adapter it
    refuses, the refusal itself is the error."""
    if refusal is None:
        return describe(adapter)
    try:
        figures = describe(adapter)
    except Exception:
        raise refusal from None
    return {**figures, "unsupported": str(refusal)}


def _file_format(store: TensorStore) -> str:
    return "pickle" if any(f.suffix != ".safetensors" for f in store.files) else "safetensors"


def _tensor_figures(store: TensorStore) -> dict[str, Any]:
    dtypes: dict[str, dict[str, int]] = {}
    shards: dict[str, dict[str, Any]] = {}
    for info in store.infos.values():
        d = dtypes.setdefault(DTYPE_NAMES[info.dtype], {"tensors": 0, "parameters": 0})
        d["tensors"] += 1
        d["parameters"] += info.numel
        name = str(info.file.relative_to(store.root)) if store.components else info.file.name  # a pipeline: unet/…
        s = shards.setdefault(name, {"file": name, "tensors": 0, "bytes": info.file.stat().st_size})
        s["tensors"] += 1
    return {
        "tensors": len(store),
        "parameters": sum(i.numel for i in store.infos.values()),
        "bytes": sum(s["bytes"] for s in shards.values()),
        "dtypes": dtypes,
        "shards": list(shards.values()),
        "metadata": dict(store.metadata),
    }
