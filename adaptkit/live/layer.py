"""The one adapted-layer wrapper: a frozen base layer with named adapter branches beside it.

Every variant runs through `AdaptedLayer`; a variant only says how its branch changes the base
layer's output (`forward`) and what weight change it amounts to (`weight_delta`). The core keeps
the bookkeeping common to all of them: which adapters are active, merged or disabled.

Weights are handled in "math" layout, out × in, whatever the base layer stores: `nn.Linear`
stores that already; GPT-2's `Conv1D` and `nn.Embedding` store in × out (`Target.transposed`);
convolutions keep their kernel: out × in/groups × *kernel. A module that reads some of its tensors
itself, with no layer call to wrap (Target kind "tensors": MultiheadAttention's packed projection,
a bare parameter), runs with P + ΔP in their place (`torch.func.functional_call`), each ΔP from
its variant's `tensor_deltas`; merges add them to those tensors.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import spec
from ..errors import AdaptkitError
from ..quant.quantized import QuantizedLinear, fake_quantize


@dataclass(frozen=True)
class Target:
    """What an adapter needs to know about the layer it sits on."""

    kind: str  # "linear" (nn.Linear, Conv1D), "embedding", "conv", or what a variant's `target_of` says ("block")
    in_features: int  # for embeddings: the number of embeddings; for convolutions: in_channels
    out_features: int  # for embeddings: the embedding dimension; for convolutions: out_channels
    transposed: bool  # the weight is stored in × out (kind "tensors": a layout flag its variant reads)
    kernel: tuple[int, ...] = ()  # convolutions: the kernel size (weight out × in/groups × *kernel)
    groups: int = 1  # convolutions: channel groups
    tensors: tuple[tuple[str, tuple[int, ...]], ...] = ()  # kind "tensors": (dotted name, shape) of each one adapted

    @classmethod
    def of(cls, layer: nn.Module) -> Target | None:
        """The target description of a layer adapters can wrap, or None."""
        if isinstance(layer, (nn.Linear, QuantizedLinear)):
            return cls("linear", layer.in_features, layer.out_features, False)
        if isinstance(layer, nn.Embedding):
            return cls("embedding", layer.num_embeddings, layer.embedding_dim, True)
        if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and layer.padding_mode == "zeros":
            return cls("conv", layer.in_channels, layer.out_channels, False, tuple(layer.kernel_size), layer.groups)
        if type(layer).__name__ == "Conv1D" and getattr(layer, "weight", None) is not None and layer.weight.dim() == 2:
            n_in, n_out = layer.weight.shape  # transformers' Conv1D: y = x·W + b with W in × out
            return cls("linear", n_in, n_out, True)
        return None


class Branch(nn.Module):
    """One named adapter on one layer: the variant, its per-layer settings and its tensors."""

    def __init__(self, variant: Any, target: Target, settings: dict[str, Any], params: nn.ParameterDict):
        super().__init__()
        self.variant, self.target, self.settings = variant, target, settings
        self.params = params
        self.transforms_input = isinstance(variant, spec.TransformsInput)  # e.g. scaling the input features
        self.inputs: Any = None  # what the variant read from the model's inputs for this call (`spec.ReadsInputs`)

    def forward(self, *args, **kwargs):  # pragma: no cover - branches are called through AdaptedLayer
        raise TypeError("a Branch is run by its AdaptedLayer")


class Forwarding(nn.Module):
    """A wrapper that answers for the module it wraps: attributes it lacks (`.weight`, `.bias`, a
    decoder layer's own fields) come from `_current()`, so code reading them keeps working."""

    _parts: tuple[str, ...] = ()  # the submodules `_current` reads (absent while __init__ runs)

    def _current(self) -> nn.Module:
        raise NotImplementedError

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if not all(part in self._modules for part in self._parts):
                raise
            return getattr(self._current(), name)


class AdaptedLayer(Forwarding):
    """A base layer plus adapters: y = base(x), then each active, unmerged adapter's branch."""

    _parts = ("base_layer",)

    def __init__(self, base_layer: nn.Module, path: str, target: Target):
        super().__init__()
        self.base_layer, self.path, self.target = base_layer, path, target
        self.branches = nn.ModuleDict()
        self.active: list[str] = []
        self.merged: dict[str, torch.Tensor | None] = {}  # name -> the ΔW added, kept when it depends on W
        self.merged_bias: dict[str, torch.Tensor] = {}  # name -> the change a merge made to the bias
        self.disabled = False
        self.fake_quant: str | None = None  # quantization-aware training: the quantizer of W + ΔW
        self.routes: Routes | None = None  # ensembles: one adapter per block of rows (`routing.by_rows`)

    def _current(self) -> nn.Module:
        return self._modules["base_layer"]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disabled:
            return self.base_layer(x, *args, **kwargs)
        if self.routes is not None:
            return self._routed_forward(x, args, kwargs)
        running = [self.branches[n] for n in self.active if n not in self.merged]
        if self.target.tensors and running:
            return self._tensors_forward(running, (x, *args), kwargs)
        if self.fake_quant is not None and running:
            return self._fake_quantized_forward(x, running)
        inner = x
        for branch in running:
            if branch.transforms_input:
                inner = branch.variant.transform_input(branch, inner)
        result = self.base_layer(inner, *args, **kwargs)
        for branch in running:
            result = branch.variant.forward(branch, self.base_layer, x, result)
        return result

    def _routed_forward(self, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        """Rows block by block, each with its one adapter's branch (or none: the base alone). The base
        layer runs once on all rows, unless a routed branch changes its input: then once per block."""
        blocks = self.routes.blocks(self.path, x)
        branches = [self.branches[name] if name in self.branches else None for name, _ in blocks]
        own_input = [b is not None and b.transforms_input for b in branches]
        whole = None if any(own_input) else self.base_layer(x, *args, **kwargs)
        parts = []
        for (_, rows), branch, own in zip(blocks, branches, own_input):
            if whole is not None:
                result = whole[rows]
            else:
                result = self.base_layer(branch.variant.transform_input(branch, x[rows]) if own else x[rows], *args, **kwargs)
            parts.append(result if branch is None else branch.variant.forward(branch, self.base_layer, x[rows], result))
        return torch.cat(parts)

    def _fake_quantized_forward(self, x: torch.Tensor, running: list[Branch]) -> torch.Tensor:
        """y = x·Q(W + ΣΔW)ᵀ + b + Σ Δb: the merged layer as it will be once quantized, with the
        straight-through estimator carrying the gradient to each ΔW (QAT)."""
        weight = self.math_weight()
        w = effective = weight.float()
        bias = getattr(self.base_layer, "bias", None)
        bias = None if bias is None else bias.float()
        for branch in running:
            effective = effective + branch.variant.weight_delta(branch, w)
            variant = branch.variant  # a trained bias needs no base bias:
            change = variant.bias_delta(branch, bias) if isinstance(variant, spec.LiveBiasDelta) else None
            bias = change if bias is None else bias if change is None else bias + change
        q = fake_quantize(effective, self.fake_quant)
        if self.target.kind == "embedding":
            return F.embedding(x, q.T.to(weight.dtype), self.base_layer.padding_idx)
        if self.target.kind == "conv":  # the layer's own stride, padding, dilation and groups
            return self.base_layer._conv_forward(x, q.to(weight.dtype), None if bias is None else bias.to(weight.dtype))
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        return F.linear(x.to(dtype), q.to(dtype), None if bias is None else bias.to(dtype))

    def _tensors_forward(self, running: list[Branch], args: tuple, kwargs: dict) -> torch.Tensor:
        """The module run with each adapted tensor P replaced by P + Σ ΔP (kind "tensors")."""
        found = dict(self.base_layer.named_parameters())
        tensors = {name: found[name] for name, _ in self.target.tensors}
        for branch in running:
            for name, change in branch.variant.tensor_deltas(branch, tensors).items():
                tensors[name] = tensors[name] + change.to(tensors[name].dtype)
        return torch.func.functional_call(self.base_layer, tensors, args, kwargs)

    # -- weights in math layout ----------------------------------------------------------------
    def math_weight(self) -> torch.Tensor | None:
        """The base weight out × in (a view), or None for a layer without one (a whole block)."""
        w = getattr(self.base_layer, "weight", None)
        if not isinstance(w, torch.Tensor):
            return None
        return w.T if self.target.transposed else w

    def delta(self, name: str) -> torch.Tensor | dict[str, torch.Tensor]:
        """ΔW (out × in) that adapter `name` adds to the current base weight; ΔP by name for kind "tensors"."""
        branch = self.branches[name]
        with torch.no_grad():
            if self.target.tensors:
                found = dict(self.base_layer.named_parameters())
                tensors = {n: found[n] for n, _ in self.target.tensors}
                return {n: d.to(tensors[n].dtype) for n, d in branch.variant.tensor_deltas(branch, tensors).items()}
            w = self.math_weight()  # read once: a quantized layer unpacks its weight on every read
            return branch.variant.weight_delta(branch, w.float()).to(w.dtype)

    def add_to_weight(self, delta: torch.Tensor | dict[str, torch.Tensor], sign: int) -> None:
        if isinstance(delta, dict):  # kind "tensors": ΔP by name
            found = dict(self.base_layer.named_parameters())
            with torch.no_grad():
                for n, change in delta.items():
                    found[n].add_(change, alpha=sign)
            return
        if isinstance(self.base_layer, QuantizedLinear):  # packed: unpack, add, pack again
            return self.base_layer.add_to_weight(delta, sign)
        with torch.no_grad():
            w = self.base_layer.weight
            w.add_(delta.T if self.target.transposed else delta, alpha=sign)

    def merge(self, name: str) -> None:
        if name in self.merged:
            return
        delta = self.delta(name)
        self.add_to_weight(delta, +1)
        branch = self.branches[name]
        variant = branch.variant
        depends_on_w = isinstance(variant, spec.BaseDependent) and variant.delta_needs_base(branch)
        self.merged[name] = delta if depends_on_w else None
        bias = getattr(self.base_layer, "bias", None)
        if isinstance(variant, spec.LiveBiasDelta):  # it also changes the bias (output scaling, a trained bias)
            bias = bias if isinstance(bias, torch.Tensor) else None
            with torch.no_grad():
                change = variant.bias_delta(branch, None if bias is None else bias.float())
            if change is not None and bias is None:
                self.unmerge(name)
                raise AdaptkitError(f"{self.path}: adapter '{name}' changes the bias, but this layer has none to merge it into")
            if change is not None:
                with torch.no_grad():
                    self.merged_bias[name] = change.to(bias.dtype)
                    bias.add_(self.merged_bias[name])

    def unmerge(self, name: str) -> None:
        if name not in self.merged:
            return
        delta = self.merged.pop(name)
        self.add_to_weight(self.delta(name) if delta is None else delta, -1)
        change = self.merged_bias.pop(name, None)
        if change is not None:
            with torch.no_grad():
                self.base_layer.bias.sub_(change)

    def resident(self, name: str) -> torch.Tensor | None:
        """The part of adapter `name` that lives inside the base weight itself (math layout): PiSSA's
        residual, Delta-LoRA's updates of W. Taken out when adapters are disabled or removed."""
        branch = self.branches[name]
        if not isinstance(branch.variant, spec.Resident):
            return None
        with torch.no_grad():
            found = branch.variant.resident(branch)
        return None if found is None else found.to(self.base_layer.weight.dtype)

    def set_disabled(self, disabled: bool) -> None:
        if disabled == self.disabled:
            return
        if disabled:
            self.check_unmerged("disable adapters")
        for name in self.branches:
            found = self.resident(name)
            if found is not None:
                self.add_to_weight(found, -1 if disabled else +1)
        self.disabled = disabled

    def drop(self, name: str) -> None:
        """Remove adapter `name`, leaving the base weight as it was before the adapter came."""
        self.unmerge(name)
        found = None if self.disabled else self.resident(name)
        if found is not None:
            self.add_to_weight(found, -1)
        del self.branches[name]
        self.active = [n for n in self.active if n != name]

    def check_unmerged(self, action: str) -> None:
        if self.merged:
            raise AdaptkitError(f"{self.path}: cannot {action} while adapters {sorted(self.merged)} are merged; unmerge() first")


class ReplacedModule(Forwarding):
    """A module trained whole (PEFT's `modules_to_save`): the original plus one copy per adapter;
    the active adapter's copy runs, the original when adapters are disabled."""

    _parts = ("original", "copies")

    def __init__(self, original: nn.Module, path: str):
        super().__init__()
        self.original, self.path = original, path
        self.copies = nn.ModuleDict()
        self.active: str | None = None
        self.disabled = False
        self.routes: Routes | None = None  # ensembles: one adapter's copy per block of rows (`routing.by_rows`)

    def _current(self) -> nn.Module:
        return self.original if self.disabled or self.active not in self.copies else self.copies[self.active]

    def add(self, name: str) -> nn.Module:
        import copy

        replacement = copy.deepcopy(self.original)
        for p in replacement.parameters():
            p.requires_grad_(True)
        self.copies[name] = replacement
        return replacement

    def forward(self, *args, **kwargs):
        if self.routes is None or self.disabled:
            return self._current()(*args, **kwargs)
        if not args or any(isinstance(a, torch.Tensor) for a in (*args[1:], *kwargs.values())):
            raise AdaptkitError(f"{self.path}: a module trained whole is routed by rows only when its one tensor "
                                "input is the first argument")
        parts = [(self.copies[name] if name in self.copies else self.original)(args[0][rows], *args[1:], **kwargs)
                 for name, rows in self.routes.blocks(self.path, args[0])]
        if not all(isinstance(p, torch.Tensor) for p in parts):
            raise AdaptkitError(f"{self.path}: a module trained whole is routed by rows only when it returns one tensor")
        return torch.cat(parts)


ROUTED_KINDS = ("linear", "embedding", "conv")  # Target kinds whose input has the batch's rows first


@dataclass(frozen=True)
class Routes:
    """Adapter `names[i]` runs on rows i·rows … (i+1)·rows − 1 of a call (ensembles: a batch repeated
    once per adapter, one pass). A layer whose input has any other number of rows (tokens flattened
    into rows, a sequence-first layout) cannot tell which rows are whose and is refused by name."""

    names: tuple[str, ...]
    rows: int

    def blocks(self, path: str, x: torch.Tensor) -> list[tuple[str, slice]]:
        if x.dim() == 0 or x.shape[0] != self.rows * len(self.names):
            raise AdaptkitError(f"{path}: its input has {x.shape[0] if x.dim() else 0} rows, not the "
                                f"{len(self.names)} × {self.rows} of the routed batch; this layer cannot be "
                                "routed by rows (tokens flattened, a sequence-first layout)")
        return [(name, slice(i * self.rows, (i + 1) * self.rows)) for i, name in enumerate(self.names)]
