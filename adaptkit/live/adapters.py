"""The module plane: adapters on a live `torch.nn` model, by name.

    handle = adaptkit.inject(model, variant_name, r=16, lora_alpha=32, target_modules="all-linear")
    handle.save("out/")                                  # PEFT's layout where PEFT has the variant
    handle.save("out/", format=name)                     # any format plugin that can hold it (kohya, ...)
    handle = adaptkit.load_adapter(model, "out/", name="b")
    handle.set_active("b"); handle.merge(); handle.unmerge(); handle.remove()

One `Adapters` handle per model holds every adapter on it. A variant plugin supplies the
arithmetic (see `spec.LiveModule`); this module only wraps layers, keeps names, and moves
tensors between the model and files.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .. import registry, spec
from ..errors import AdaptkitError, unknown_name
from ..quant.quantized import QuantizedLinear
from .calls import watch_calls
from .files import load_adapter_into, save_adapter
from .inputs import watch_inputs
from .layer import AdaptedLayer, Branch, ReplacedModule
from .targets import _parent, adapted_layers, find_targets, matches_target, unwrap, variant_config, wrap

HANDLE_ATTR = "_adaptkit_adapters"


@dataclass
class Adapter:
    """One named adapter on the model: its variant, full config and where it sits."""

    name: str
    variant: Any
    config: dict[str, Any]
    layers: list[str] = field(default_factory=list)
    saved: list[str] = field(default_factory=list)  # paths of modules trained whole
    shared: nn.ParameterDict = field(default_factory=nn.ParameterDict)
    inputs: Any = None  # what the variant last read from the model's inputs (`spec.ReadsInputs`)


class Adapters:
    """Every adapter on one model: add, load, save, switch, merge, unmerge, remove."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.adapters: dict[str, Adapter] = {}
        self.active: list[str] = []
        # set by a sharded training run: (modules, autograd=) -> a context in which their tensors are
        # whole (train.distributed.unsharded), for the training hooks below
        self.unsharded = None

    @classmethod
    def of(cls, model: nn.Module) -> Adapters:
        handle = model.__dict__.get(HANDLE_ATTR)
        if handle is None:
            handle = cls(model)
            model.__dict__[HANDLE_ATTR] = handle  # not a submodule: kept out of state_dict and .to()
        return handle

    # -- adding -------------------------------------------------------------------------------
    def add(self, variant: str | Any, name: str = "default", **config: Any) -> Adapters:
        """Put a new adapter `name` of `variant` on the layers its `target_modules` select."""
        if name in self.adapters:
            raise AdaptkitError(f"an adapter named '{name}' is already on this model; pick another name or remove it")
        variant = registry.get("variant", variant) if isinstance(variant, str) else variant
        if not isinstance(variant, spec.LiveModule):
            raise AdaptkitError(f"variant '{variant.name}' has no module plane (it cannot be put on a model)")
        config = variant_config(variant, config)
        if isinstance(variant, spec.ChoosesTargets):
            config = variant.prepare(self.model, config)  # variants choose targets their own way (last k layers)
        adapter = Adapter(name, variant, config)
        tensors = variant.tensor_targets(self.model, config) if isinstance(variant, spec.TensorTargets) else {}
        targets = {} if not config["target_modules"] and (config["modules_to_save"] or tensors) else find_targets(
            self.model, config["target_modules"], exclude_modules=config["exclude_modules"],
            layers_to_transform=config["layers_to_transform"], layers_pattern=config["layers_pattern"],
            target_of=variant.target_of if isinstance(variant, spec.Intervention) else None)
        both = sorted(set(targets) & set(tensors))
        if both:
            raise AdaptkitError(f"'{both[0]}' is targeted both as a layer and through its tensors; "
                                "target one or the other")
        targets |= tensors
        if not isinstance(variant, spec.TensorTargets) and any(t.tensors for t in targets.values()):
            path = next(p for p, t in targets.items() if t.tensors)
            raise AdaptkitError(f"{path}: {variant.name} adapters cannot go on tensors the module reads itself")
        settings = {path: variant.settings(config, path, target) for path, target in targets.items()}
        for path, target in targets.items():  # all checks pass before any layer is touched
            layer = wrap(self.model, path, target)
            weight = layer.math_weight()
            params = variant.create(target, settings[path], None if weight is None else weight.detach(), adapter.shared)
            layer.branches[name] = Branch(variant, target, settings[path], params).train(layer.training)
            adapter.layers.append(path)
            if isinstance(layer.base_layer, QuantizedLinear) and (spec.option(variant, "moves_base_weight")
                                                                   or layer.resident(name) is not None):
                for done in adapter.layers:
                    wrapped = self.model.get_submodule(done)
                    del wrapped.branches[name]
                    if not wrapped.branches:
                        unwrap(self.model, done)
                raise AdaptkitError(f"{path}: a {variant.name} adapter with these settings changes the base weight "
                                    f"itself, which a quantized ({layer.base_layer.method}) base cannot hold; "
                                    "train it on a floating-point base")
        adapter.saved = self._add_saved(name, config["modules_to_save"])
        self.adapters[name] = adapter
        watch_inputs(self)
        watch_calls(self)
        self._freeze_base()
        self.set_active(name)
        return self

    def _add_saved(self, name: str, patterns: Any) -> list[str]:
        if not patterns:
            return []
        paths = [p for p, m in self.model.named_modules()
                 if p and matches_target(p, patterns) and not isinstance(m, (Branch, AdaptedLayer))
                 and ".original" not in p and ".copies." not in p]
        if not paths:
            raise AdaptkitError(f"modules_to_save {patterns!r} match no module")
        for path in paths:
            parent, leaf = _parent(self.model, path), path.rsplit(".", 1)[-1]
            module = getattr(parent, leaf)
            if not isinstance(module, ReplacedModule):
                module = ReplacedModule(module, path).train(module.training)
                setattr(parent, leaf, module)
            module.add(name)
        return paths

    def _freeze_base(self) -> None:
        """Only adapter tensors train: everything outside branches and saved copies is frozen."""
        for pname, p in self.model.named_parameters():
            if ".branches." not in pname and ".copies." not in pname:
                p.requires_grad_(False)

    # -- switching ------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.adapters)

    def set_active(self, names: str | Iterable[str]) -> None:
        """Run these adapters (one name or several, summed) and no others."""
        names = [names] if isinstance(names, str) else list(names)
        for n in names:
            if n not in self.adapters:
                raise unknown_name("adapter", n, self.adapters)
        for layer in adapted_layers(self.model).values():
            layer.active = [n for n in names if n in layer.branches]
        for module in self._replaced():
            module.active = next((n for n in names if n in module.copies), None)
        self.active = names

    def _replaced(self) -> list[ReplacedModule]:
        return [m for m in self.model.modules() if isinstance(m, ReplacedModule)]

    def _set_disabled(self, disabled: bool) -> None:
        layers = adapted_layers(self.model).values()
        if disabled:
            for layer in layers:
                layer.check_unmerged("disable adapters")
        for layer in layers:
            layer.set_disabled(disabled)
        for module in self._replaced():
            module.disabled = disabled

    def enable(self) -> None:
        self._set_disabled(False)

    def disable(self) -> None:
        self._set_disabled(True)

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """`with handle.disabled():` runs the base model alone."""
        self.disable()
        try:
            yield
        finally:
            self.enable()

    def quantization_aware(self, method: str | None) -> None:
        """Quantization-aware training (or None to stop): every adapted layer computes with
        Q(W + ΔW), quantized by the quantizer plugin `method`, gradients passing straight through."""
        if method is not None:
            registry.get("quantizer", method)
            for name in self.active:
                self._mergeable(name)  # only weight-space adapters have a W + ΔW to quantize
        layers = [self.model.get_submodule(p) for p in {p for n in self.adapters for p in self.adapters[n].layers}]
        for layer in layers if method is not None else ():
            if layer.target.tensors:
                raise AdaptkitError(f"{layer.path}: an adapter on tensors the module reads itself ("
                                    f"{', '.join(n for n, _ in layer.target.tensors)}) has no quantization-aware form")
        for layer in layers:
            layer.fake_quant = method

    # -- merging --------------------------------------------------------------------------------
    def merge(self, names: str | Iterable[str] | None = None) -> None:
        """Add the adapters' ΔW (default: the active ones) into the base weights. Modules trained
        whole keep running as the adapter's copy until `merge_and_unload()` puts them in place."""
        for name in self._pick(names):
            self._mergeable(name)
            for path in self.adapters[name].layers:
                self.model.get_submodule(path).merge(name)

    def unmerge(self, names: str | Iterable[str] | None = None) -> None:
        """Take merged adapters back out of the base weights (to float rounding)."""
        for name in reversed(self._pick(names, default=self.names)):
            for path in self.adapters[name].layers:
                self.model.get_submodule(path).unmerge(name)

    def _mergeable(self, name: str) -> None:
        variant = self.adapters[name].variant
        if self.adapters[name].layers and not isinstance(variant, spec.WeightSpace):
            raise AdaptkitError(f"adapter '{name}' ({variant.name}) changes activations, not weights; it cannot be merged")
        for path in self.adapters[name].layers[:1]:  # a variant whose settings leave no ΔW refuses here, before any change
            self.model.get_submodule(path).delta(name)

    def _pick(self, names, default=None) -> list[str]:
        names = (default if default is not None else self.active) if names is None else names
        names = [names] if isinstance(names, str) else list(names)
        for n in names:
            if n not in self.adapters:
                raise unknown_name("adapter", n, self.adapters)
        return names

    def merge_and_unload(self, names: str | Iterable[str] | None = None) -> nn.Module:
        """Merge the adapters into the base weights, put saved modules in place, remove every wrapper."""
        for name in self._pick(names):
            self._mergeable(name)
            for path in self.adapters[name].layers:
                self.model.get_submodule(path).merge(name)
        for module in self._replaced():
            if module.active is not None:
                module.original.load_state_dict(module.copies[module.active].state_dict())
        self._unwrap_all()
        return self.model

    def remove(self, name: str | None = None) -> nn.Module:
        """Delete one adapter (unmerged first), or all of them and every wrapper (None)."""
        if name is None:
            self.unmerge()
            self._unwrap_all()
            return self.model
        adapter = self.adapters[self._pick(name)[0]]
        for path in adapter.layers:
            layer = self.model.get_submodule(path)
            layer.drop(name)
            if not layer.branches:
                unwrap(self.model, path)
        for module in self._replaced():
            module.copies.pop(name, None)
        del self.adapters[name]
        watch_inputs(self)
        watch_calls(self)
        self.set_active([n for n in self.active if n != name])
        return self.model

    def _unwrap_all(self) -> None:
        for path, layer in adapted_layers(self.model).items():
            for name in [n for n in layer.branches if n not in layer.merged]:
                layer.drop(name)  # merged adapters stay in the weights; the rest leave no trace
            unwrap(self.model, path)
        for module in self._replaced():
            parent, leaf = _parent(self.model, module.path), module.path.rsplit(".", 1)[-1]
            setattr(parent, leaf, module.original)
        self.adapters.clear()
        self.active = []
        self.model.__dict__.pop(HANDLE_ATTR, None)
        watch_inputs(self)
        watch_calls(self)

    # -- counting -------------------------------------------------------------------------------
    def trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts; shared tensors counted once, a quantized layer's
        weight as the out × in values it packs."""
        seen, trainable, total = set(), 0, 0
        for p in self.model.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
                trainable += p.numel() if p.requires_grad else 0
        total += sum(m.in_features * m.out_features for m in self.model.modules() if isinstance(m, QuantizedLinear))
        return trainable, total

    def describe(self) -> str:
        trainable, total = self.trainable_parameters()
        return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / max(total, 1):.4f}"

    def parameters(self, name: str | None = None) -> Iterator[tuple[str, nn.Parameter]]:
        """(path.role, parameter) of one adapter (default: the active ones), shared tensors once."""
        seen = set()
        for n in self._pick(name):
            adapter = self.adapters[n]
            for path in adapter.layers:
                for role, p in self.model.get_submodule(path).branches[n].params.items():
                    if id(p) not in seen:
                        seen.add(id(p))
                        yield f"{path}.{role}", p
            for path in adapter.saved:
                for pname, p in self.model.get_submodule(path).copies[n].named_parameters():
                    yield f"{path}.{pname}", p

    # -- training hooks (the training loop calls these; variants fill them in) -------------------
    def _layers(self, name: str) -> list[tuple[AdaptedLayer, Branch]]:
        return [(layer, layer.branches[name]) for layer in
                (self.model.get_submodule(p) for p in self.adapters[name].layers)]

    def param_groups(self, lr: float) -> list[dict]:
        """Optimizer parameter groups for the active adapters: the variant's own grouping (LoRA+'s
        faster B) where it has one, else one group at `lr`."""
        groups = []
        for name in self.active:
            named = [(n, p) for n, p in self.parameters(name) if p.requires_grad]
            variant = self.adapters[name].variant
            groups += (variant.param_groups(named, lr, self.adapters[name].config) if isinstance(variant, spec.ParamGroups)
                       else [{"params": [p for _, p in named], "lr": lr}])
        return [g for g in groups if g["params"]]

    def step_end(self, step: int) -> None:
        """Call after each optimizer step (`step` counts from 1): variants that move base weights or
        rank budgets between steps do it here."""
        for name in self.active:
            variant = self.adapters[name].variant
            if isinstance(variant, spec.StepEnd):
                for layers, whole in self._hook_views(name, spec.option(variant, "moves_base_weight")):
                    with whole:
                        variant.on_step_end(layers, self.adapters[name].config, step)

    def extra_loss(self):
        """Regularization terms variants add to the training loss (0 when none)."""
        total = 0.0
        for name in self.active:
            variant = self.adapters[name].variant
            if isinstance(variant, spec.ExtraLoss):
                for layers, whole in self._hook_views(name, False, autograd=True):
                    with whole:
                        total = total + variant.extra_loss(layers, self.adapters[name].config)
        return total

    def _hook_views(self, name: str, per_layer: bool, autograd: bool = False) -> list:
        """[(layers, context)] for a training hook: all layers in one call, their adapter tensors whole
        when sharded; a variant that moves base weights (each layer's W from its own tensors), one layer
        at a time with the layer's W whole too, so no more than one W is ever gathered."""
        layers = self._layers(name)
        if self.unsharded is None:
            return [(layers, contextlib.nullcontext())]
        if per_layer:
            return [([pair], self.unsharded([pair[0]])) for pair in layers]
        return [(layers, self.unsharded([branch.params for _, branch in layers], autograd=autograd))]

    def train_state(self) -> dict:
        """Training state variants keep outside their tensors (e.g. importance averages), by
        "adapter/key", for checkpoints; empty when no variant keeps any."""
        found = {}
        for name in self.active:
            variant = self.adapters[name].variant
            if isinstance(variant, spec.TrainState):
                state = variant.train_state(self._layers(name), self.adapters[name].config)
                found.update({f"{name}/{k}": v for k, v in state.items()})
        return found

    def load_train_state(self, tensors: dict) -> None:
        for name in self.active:
            variant = self.adapters[name].variant
            mine = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(name + "/")}
            if isinstance(variant, spec.TrainState) and mine:
                variant.load_train_state(self._layers(name), self.adapters[name].config, mine)

    # -- files ----------------------------------------------------------------------------------
    def save(self, out: str | Path, name: str | None = None, *, force: bool = False, format: str | None = None) -> Path:
        """Write adapter `name` (default: the first active) into the folder `out` in `format` (a format
        plugin; default the canonical one, PEFT's folder)."""
        picked = self._pick(name, default=[self.active[0]] if self.active else [])[0]
        return save_adapter(self, picked, out, force=force, format=format)

    def load(self, source: str | Path, name: str = "default", *, swap: bool = False,
             allow_pickle: bool = False) -> Adapters:
        return load_adapter_into(self, source, name, swap=swap, allow_pickle=allow_pickle)


def inject(model: nn.Module, variant: str | Any, *, name: str = "default", **config: Any) -> Adapters:
    """Put a new adapter on `model` and return the model's handle (see `Adapters`)."""
    return Adapters.of(model).add(variant, name=name, **config)


def load_adapter(model: nn.Module, source: str | Path, *, name: str = "default", swap: bool = False,
                 allow_pickle: bool = False) -> Adapters:
    """Load a saved adapter (adaptkit's or PEFT's folder, or a Hub ref `org/name[@rev]`) onto `model`.
    `swap=True` replaces the weights of the existing adapter `name` in place (hot-swap);
    `allow_pickle=True` reads an adapter_model.bin (torch.load weights_only=True)."""
    return Adapters.of(model).load(source, name, swap=swap, allow_pickle=allow_pickle)


