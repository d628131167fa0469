"""Saving adapters from a live model and loading saved ones onto it, in any format plugin.

Saving gathers a `LiveAdapter` (tensors by module path and the variant's stored key, the variant's
file config) and hands it to the format: the default one (PEFT's folder) lays it out itself
(`capabilities.LiveWriter`); a format that only writes low-rank adapters (`Writable`) gets it as the
default format writes it, read back in low-rank form exactly as stored, so a variant the format
cannot hold as it is is refused by name rather than refactored.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .. import registry, spec
from ..adapter import read_adapter
from .inputs import watch_inputs
from .targets import variant_config
from ..errors import AdaptkitError
from ..hub.repos import is_reference, resolve_path
from ..io.outputs import atomic_output
from ..spec import AdapterFiles, LowRankAdapter

if TYPE_CHECKING:
    from .adapters import Adapters

@dataclass
class LiveAdapter:
    """A live adapter's tensors and config, as a format's `write_live` takes them (`capabilities.LiveWriter`):
    per adapted module path its tensors by the variant's stored key (`lora_A.weight`), tensors shared by
    all modules by role, per module trained whole its state dict, and the variant's `file_config`;
    `architecture` is the class name of a transformers model (`LlamaForCausalLM`), else None."""

    variant: str
    config: dict[str, Any]
    base_model: str | None
    modules: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    shared: dict[str, torch.Tensor] = field(default_factory=dict)
    saved: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    architecture: str | None = None


def save_adapter(handle: Adapters, name: str, out: str | Path, *, force: bool = False,
                 format: str | None = None) -> Path:
    """Write adapter `name` into the folder `out` in `format` (default: registry.default("format")): through
    the format's `write_live`, else as the canonical format read back: as stored for a format that holds the
    variant (`write_files`), else in low-rank form for its `write`."""
    if name not in handle.adapters:
        raise AdaptkitError("no adapter to save" if not name else f"no adapter named '{name}'")
    default = registry.default("format")
    plugin = registry.get("format", format or default)
    live = live_adapter(handle, name)
    if isinstance(plugin, spec.LiveWriter):
        with atomic_output(out, force=force) as tmp:
            plugin.write_live(live, tmp)
        return Path(out)
    canonical = registry.get("format", default)
    if not isinstance(plugin, spec.Writable) or not isinstance(canonical, spec.LiveWriter):
        raise AdaptkitError(f"format '{plugin.name}' cannot be written from a live model")
    with tempfile.TemporaryDirectory() as scratch:
        canonical.write_live(live, Path(scratch))
        stored = read_adapter(scratch)
        if stored.variant in spec.option(plugin, "writes_variants"):  # the format holds the variant as it is
            with atomic_output(out, force=force) as tmp:
                plugin.write_files(stored, tmp)
            return Path(out)
        lowrank = _stored_lowrank(stored, plugin.name)
        with atomic_output(out, force=force) as tmp:
            try:
                plugin.write(lowrank, tmp)
            except AdaptkitError as e:
                raise _cannot(live.variant, plugin.name, str(e)) from None
    return Path(out)


def live_adapter(handle: Adapters, name: str) -> LiveAdapter:
    """Adapter `name`'s tensors (detached, on the CPU, contiguous) and config, off the model."""
    adapter, model = handle.adapters[name], handle.model
    variant, settings, transposed = adapter.variant, {}, False
    live = LiveAdapter(variant.name, {}, _base_name(model), architecture=_architecture(model))
    for path in adapter.layers:
        branch = model.get_submodule(path).branches[name]
        stored = variant.save_tensors(branch) if isinstance(variant, spec.SavesTensors) else dict(branch.params)
        live.modules[path] = {variant.stored_key(role, branch.target): _cpu(t) for role, t in stored.items()}
        settings[path] = branch.settings
        transposed |= branch.target.transposed and branch.target.kind not in ("embedding", "tensors")
    live.shared = {role: _cpu(tensor) for role, tensor in adapter.shared.items()}
    for path in adapter.saved:
        live.saved[path] = {p: _cpu(t) for p, t in model.get_submodule(path).copies[name].state_dict().items()}
    live.config = variant.file_config(adapter.config, settings, transposed)
    return live


def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu").contiguous()


def _stored_lowrank(adapter: AdapterFiles, fmt: str) -> LowRankAdapter:
    """`adapter` as low-rank modules exactly as stored (no refactoring: a format that cannot hold the
    variant as it is refuses it)."""
    variant = registry.get("variant", adapter.variant)
    if not isinstance(variant, spec.LowRankStored):
        raise _cannot(adapter.variant, fmt, "it has no plain low-rank form")
    if adapter.shared:
        raise _cannot(adapter.variant, fmt, f"tensors shared by all modules: {', '.join(sorted(adapter.shared))[:60]}")
    try:  # an adapter with no weight-space form has no low-rank one either
        if isinstance(variant, spec.MergeCheck):
            variant.check_mergeable(adapter)
    except AdaptkitError as e:
        raise _cannot(adapter.variant, fmt, str(e)) from None
    lowrank = LowRankAdapter.keeping(adapter.config)
    for module in sorted(adapter.modules):
        try:
            lowrank.modules[module] = variant.lowrank_module(adapter, module)
        except AdaptkitError as e:
            raise _cannot(adapter.variant, fmt, str(e)) from None
    lowrank.saved = {key: adapter.store.get(name) for key, name in adapter.saved.items()}
    return lowrank


def _cannot(variant: str, fmt: str, why: str) -> AdaptkitError:
    return AdaptkitError(f"{variant} adapters cannot be written as {fmt} ({why})")


def _base_name(model) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "_name_or_path", None) or None


def _architecture(model) -> str | None:
    """The model's class name when it is a transformers model (its config has a model_type)."""
    return type(model).__name__ if getattr(getattr(model, "config", None), "model_type", None) else None


def _source_folder(source: str | Path) -> Path:
    path = Path(source).expanduser()
    if path.exists():
        return path  # read_adapter finds its format, or says what it holds
    if is_reference(str(source)):
        return resolve_path(str(source))
    raise AdaptkitError(f"{source}: no such adapter folder")


def _live_paths(handle: Adapters, name: str, files: AdapterFiles) -> dict[str, tuple[str, str]]:
    """File module path -> (live module path, prefix of its roles there); a file saved from a wrapper
    (`model.`-prefixed or not) matches by suffix, as PEFT's target_modules do, unless the variant places
    the module itself (`live_place`: a module's tensors kept by a layer above it)."""
    adapter = handle.adapters[name]
    live, variant = adapter.layers, adapter.variant
    layers = {p: handle.model.get_submodule(p).target for p in live}
    mapping = {}
    for module in sorted(files.modules):
        place = variant.live_place(files, module, layers) if isinstance(variant, spec.TensorTargets) else None
        if place is not None:
            mapping[module] = place
            continue
        found = [p for p in live if p == module or p.endswith("." + module) or module.endswith("." + p)]
        if len(found) != 1:
            raise AdaptkitError(f"adapter module '{module}' matches {len(found) or 'no'} layers of this model"
                                + (f": {', '.join(found[:3])}" if found else "; is it for a different base model?"))
        mapping[module] = found[0], ""
    return mapping


def _copy(param: torch.nn.Parameter | torch.Tensor, tensor: torch.Tensor, what: str) -> None:
    if tuple(param.shape) != tuple(tensor.shape):
        # A convolution's factors stored flat (r × in·kh·kw, a Linear layer's shape): written without the base
        # model by a tool that could not tell the layer is a convolution, not made for another model.
        flat = param.dim() > 2 and tensor.dim() == 2 and tensor.numel() == param.numel()
        raise AdaptkitError(f"{what}: the adapter has shape {tuple(tensor.shape)} but this model needs "
                            + (f"{tuple(param.shape)}: the convolution's kernel is stored flattened, as a conversion "
                               "without the base model writes it; convert the original again with --base" if flat else
                               f"{tuple(param.shape)}; is the adapter for a different base model?"))
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
    for module, (live, prefix) in _live_paths(handle, name, files).items():
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
            for role, key in ((prefix + r, k) for r, k in files.modules[module].items()):
                if role not in branch.params:
                    raise AdaptkitError(f"{module}: the adapter has a '{role}' tensor this {variant.name} config does not use")
                _copy(branch.params[role], files.store.get(key), f"{module}.{role}")
        held = None if layer.disabled else layer.resident(name)
        if held is not None:
            layer.add_to_weight(held, +1)
    for role, key in files.shared.items():
        _copy(adapter.shared[role], files.store.get(key), role)
    _load_saved_modules(handle, name, files, sorted(files.modules))
    if swap:  # the adapter's own settings follow the new file too (what it reads of the model's inputs)
        adapter.config.update(variant.config_from_file(files))
        watch_inputs(handle)
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
