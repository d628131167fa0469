"""Saving adapters from a live model and loading saved ones onto it (PEFT's folder layout).

Keys are `base_model.model.<module path>.<stored name>`, shared tensors `base_model.<role>`, and
modules trained whole are saved as their full tensors under their own path, as PEFT does. The
config's `target_modules` lists the adapted paths exactly, so PEFT and adaptkit pick the same
layers whatever the original pattern was.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import registry, spec
from .adapter import read_adapter
from .adapters import variant_config
from .errors import AdaptkitError
from .readers import dump_json
from .outputs import atomic_output
from .writer import save_tensors

if TYPE_CHECKING:
    from .adapters import Adapters

PREFIX, SHARED_PREFIX = "base_model.model.", "base_model."
CONFIG_FILE = "adapter_config.json"
DUMMY_TARGETS = "dummy-target-modules"  # PEFT's marker for "no adapted layers, only saved modules"


def save_adapter(handle: Adapters, name: str, out: str | Path, *, force: bool = False) -> Path:
    if name not in handle.adapters:
        raise AdaptkitError("no adapter to save" if not name else f"no adapter named '{name}'")
    adapter, model = handle.adapters[name], handle.model
    variant, tensors, settings, transposed = adapter.variant, {}, {}, False
    for path in adapter.layers:
        branch = model.get_submodule(path).branches[name]
        stored = variant.save_tensors(branch) if isinstance(variant, spec.SavesTensors) else dict(branch.params)
        for role, tensor in stored.items():
            tensors[f"{PREFIX}{path}.{variant.stored_key(role, branch.target)}"] = tensor.detach()
        settings[path] = branch.settings
        transposed |= branch.target.transposed and branch.target.kind != "embedding"
    for role, tensor in adapter.shared.items():
        tensors[f"{SHARED_PREFIX}{role}"] = tensor.detach()
    for path in adapter.saved:
        for pname, tensor in model.get_submodule(path).copies[name].state_dict().items():
            tensors[f"{PREFIX}{path}.{pname}"] = tensor.detach()
    config = {"task_type": None, "base_model_name_or_path": _base_name(model), "inference_mode": True,
              **variant.file_config(adapter.config, settings, transposed),
              "target_modules": sorted(adapter.layers) or DUMMY_TARGETS,
              "modules_to_save": sorted(adapter.saved) or None, "exclude_modules": None,
              "layers_to_transform": None, "layers_pattern": None}
    text = dump_json(config, Path(out) / CONFIG_FILE)  # NaN refused before anything is written
    with atomic_output(out, force=force) as tmp:
        (tmp / CONFIG_FILE).write_text(text)
        tensors = {k: v.to("cpu").contiguous() for k, v in tensors.items()}
        metadata = {"format": "pt"}
        if config.get("adaptkit_variant"):  # a variant PEFT lacks: the file says what it is on its own too
            metadata.update(adaptkit_variant=config["adaptkit_variant"],
                            adaptkit_config=json.dumps(config, sort_keys=True, allow_nan=False))
        save_tensors(tmp, tensors, shard_size=2**62, metadata=metadata, stem="adapter_model")
    return Path(out)


def _base_name(model) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_name_or_path", None) or None


def _source_folder(source: str | Path) -> Path:
    from .hub import is_reference
    from .sources import resolve_path

    path = Path(source).expanduser()
    if path.exists():
        if not (path / CONFIG_FILE).is_file():
            raise AdaptkitError(f"{path}: no {CONFIG_FILE} here; not an adapter folder")
        return path
    if is_reference(str(source)):
        return resolve_path(str(source))
    raise AdaptkitError(f"{source}: no such adapter folder")


def _live_paths(handle: Adapters, name: str, modules: list[str]) -> dict[str, str]:
    """File module path -> live module path; a file saved from a wrapper (`model.`-prefixed or not)
    matches by suffix, as PEFT's target_modules do."""
    live = handle.adapters[name].layers
    mapping = {}
    for module in modules:
        found = [p for p in live if p == module or p.endswith("." + module) or module.endswith("." + p)]
        if len(found) != 1:
            raise AdaptkitError(f"adapter module '{module}' matches {len(found) or 'no'} layers of this model"
                                + (f": {', '.join(found[:3])}" if found else "; is it for a different base model?"))
        mapping[module] = found[0]
    return mapping


def _copy(param: torch.nn.Parameter | torch.Tensor, tensor: torch.Tensor, what: str) -> None:
    if tuple(param.shape) != tuple(tensor.shape):
        raise AdaptkitError(f"{what}: the adapter has shape {tuple(tensor.shape)} but this model needs "
                            f"{tuple(param.shape)}; is the adapter for a different base model?")
    with torch.no_grad():
        param.copy_(tensor.to(param.dtype))


def load_adapter_into(handle: Adapters, source: str | Path, name: str, *, swap: bool = False,
                      allow_pickle: bool = False) -> Adapters:
    folder = _source_folder(source)
    files = read_adapter(folder, allow_pickle=allow_pickle)
    if files is None:
        raise AdaptkitError(f"{folder}: holds a full model, not an adapter")
    variant = registry.get("variant", files.variant)
    if not isinstance(variant, spec.LiveModule):
        raise AdaptkitError(f"variant '{variant.name}' cannot be loaded onto a live model")
    model = handle.model
    saved = {k.rsplit(".", 1)[0] for k in files.saved}
    if swap:
        if name not in handle.adapters or handle.adapters[name].variant.name != variant.name:
            raise AdaptkitError(f"hot-swap needs an existing {variant.name} adapter named '{name}'")
    else:
        if name in handle.adapters:
            raise AdaptkitError(f"an adapter named '{name}' is already loaded; pass another name or swap=True")
        config = variant.config_from_file(files)
        adapted = sorted(files.modules)
        handle.add(variant, name=name, **config, target_modules=adapted or None,
                   modules_to_save=sorted(s for s in saved if not _under(s, adapted)) or None)
    adapter = handle.adapters[name]
    for module, live in _live_paths(handle, name, sorted(files.modules)).items():
        layer = model.get_submodule(live)
        branch = layer.branches[name]
        if swap:
            layer.check_unmerged("hot-swap an adapter")
            branch.settings.update(variant.settings(variant_config(variant, variant.config_from_file(files)), live, branch.target))
        # What a variant keeps inside W follows its tensors: out with the old ones, in with the new.
        held = None if layer.disabled else layer.resident(name)
        if held is not None:
            layer.add_to_weight(held, -1)
        if isinstance(variant, spec.LoadsTensors):  # the branch keeps them in another form than the file
            variant.load_tensors(branch, {role: files.store.get(key) for role, key in files.modules[module].items()})
        else:
            for role, key in files.modules[module].items():
                if role not in branch.params:
                    raise AdaptkitError(f"{module}: the adapter has a '{role}' tensor this {variant.name} config does not use")
                _copy(branch.params[role], files.store.get(key), f"{module}.{role}")
        held = None if layer.disabled else layer.resident(name)
        if held is not None:
            layer.add_to_weight(held, +1)
    for role, key in files.shared.items():
        _copy(adapter.shared[role], files.store.get(key), role)
    _load_saved_modules(handle, name, files, sorted(files.modules))
    return handle


def _under(path: str, modules: list[str]) -> bool:
    return any(path == m or path.startswith(m + ".") for m in modules)


def _load_saved_modules(handle: Adapters, name: str, files, adapted: list[str]) -> None:
    model = handle.model
    for param_path, key in files.saved.items():
        module_path, leaf = param_path.rsplit(".", 1)
        if _under(module_path, adapted):  # PEFT saves a resized embedding's base weight too
            target = _find(model, module_path)
            _copy(getattr(target.base_layer, leaf), files.store.get(key), param_path)
            continue
        state = _find(model, module_path).copies[name].state_dict()  # tensors sharing the copy's storage
        if leaf not in state:
            raise AdaptkitError(f"the adapter saves '{param_path}', which this model's {module_path} does not have")
        _copy(state[leaf], files.store.get(key), param_path)


def _find(model, path: str):
    for candidate, module in model.named_modules():
        if candidate == path or candidate.endswith("." + path):
            return module
    raise AdaptkitError(f"the adapter saves module '{path}', which this model does not have")
