"""The plugin contracts. The core talks to plugins only through these; it never names a variant.

Each kind is a Protocol checked when a plugin is first loaded (`registry.get`). Members listed in
a Protocol are required; optional hooks are looked up with `getattr` where they are used, with
the default behaviour in the core.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from .io import TensorStore


@dataclass
class AdapterFiles:
    """A saved adapter in canonical form, its tensors still on disk.

    `modules` maps each adapted module's path (e.g. `model.layers.0.self_attn.q_proj`) to its
    tensors by role (`lora_A`, `lora_B`, ...: the variant's `param_names`) as keys of `store`.
    `shared` holds tensors used by every module (a role -> key); `saved` holds full replacement
    tensors (PEFT's `modules_to_save`) by parameter path.
    """

    variant: str
    config: dict[str, Any]
    store: TensorStore
    format: str
    modules: dict[str, dict[str, str]] = field(default_factory=dict)
    shared: dict[str, str] = field(default_factory=dict)
    saved: dict[str, str] = field(default_factory=dict)

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def shape(self, module: str, role: str) -> tuple[int, ...]:
        return self.store.info(self.modules[module][role]).shape

    def tensor(self, module: str, role: str) -> torch.Tensor:
        return self.store.get(self.modules[module][role])

    def shared_tensor(self, role: str) -> torch.Tensor:
        return self.store.get(self.shared[role])

    def numel(self) -> int:
        keys = [k for roles in self.modules.values() for k in roles.values()]
        keys += list(self.shared.values()) + list(self.saved.values())
        return sum(self.store.info(k).numel for k in keys)


@dataclass
class LowRankModule:
    """One module of a plain low-rank adapter: ΔW = alpha / r · B·A (√r with rsLoRA), r = A.shape[0].
    A is r × in (embeddings: r × num_embeddings), B out × r; convolutions keep their kernel dims
    (A r × in × kh × kw, B out × r × 1 × 1). `transposed`: the base weight is stored in × out
    (GPT-2 Conv1D, `fan_in_fan_out`)."""

    a: torch.Tensor
    b: torch.Tensor
    alpha: float
    embedding: bool = False
    transposed: bool = False

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass
class LowRankAdapter:
    """The canonical form every adapter converts through: plain LoRA modules by module path, whole
    tensors of modules trained in full (`saved`, by parameter path), and config fields worth
    keeping (base model, task type, use_rslora)."""

    modules: dict[str, LowRankModule] = field(default_factory=dict)
    saved: dict[str, torch.Tensor] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    #: The config fields a conversion keeps from its input; `use_rslora` is the rule its alphas
    #: follow (scale alpha / √r instead of alpha / r), read by every format's writer.
    KEPT: ClassVar[tuple[str, ...]] = ("base_model_name_or_path", "task_type", "revision", "use_rslora")

    @classmethod
    def keeping(cls, config: Mapping[str, Any]) -> LowRankAdapter:
        """An empty adapter with the fields of `config` that a conversion keeps."""
        return cls(config={k: config[k] for k in cls.KEPT if k in config})

    def alpha_for(self, scale: float, rank: int) -> float:
        """The alpha that gives a module of `rank` the scale `scale` under this adapter's rule."""
        return scale * (rank ** 0.5 if self.config.get("use_rslora") else rank)

    def plain_scaling(self) -> None:
        """Read every alpha as alpha / r from now on (modules refactored at a new rank are written so)."""
        self.config["use_rslora"] = False


@runtime_checkable
class Variant(Protocol):
    """An adapter variant. Tensor plane: describe a saved adapter and form each module's ΔW.

    `param_names` are the roles of its tensors as they appear in PEFT-style keys
    (`<module>.<role>[.weight]`); `config_keys` are the config fields it understands (others warn).
    Optional: `config_types` — field -> checker (`adaptkit.validate`), applied to adapter_config.json
    and to `inject`'s settings; `check_files(adapter)` — raises AdaptkitError where the config
    contradicts the stored tensors (ranks, magnitude vectors), from shapes alone, as each adapter is read;
    `inspect_rows` — the `describe` figures `adaptkit inspect` prints as rows after the rank, in order
    (a true/false figure as "yes" when true), default none (the LoRA family, adalora, tied_lora: alpha,
    scaling and their flags; ia3, vera: fan_in_fan_out).
    """

    name: str
    param_names: Sequence[str]
    config_keys: frozenset[str]

    def describe(self, adapter: AdapterFiles) -> dict[str, Any]:
        """Figures for `inspect`: ranks, alpha, scaling, per-module details. Shapes only, no data."""

    def delta(self, adapter: AdapterFiles, module: str, base: torch.Tensor | None = None) -> torch.Tensor:
        """ΔW for one module, shaped like the base weight (float32). `base` is the base weight, for
        variants whose delta depends on it; others ignore it.

        Optional: `delta_bias(adapter, module, base)` — the change to the module's bias (`base` the
        bias), or None; `check_mergeable(adapter)` — raises AdaptkitError for an adapter with no
        weight-space form (it edits activations), before any merge reads it."""


class ModuleVariant(Protocol):
    """The module plane of a variant (optional: a variant without it cannot go on a live model).

    `defaults` are the config keys `inject` accepts (besides the targeting keys) with defaults.
    Per layer: `settings(config, path, target)` resolves that layer's settings (rank, scaling, …)
    and rejects impossible ones; `create(target, settings, weight, shared)` returns the layer's
    tensors by role as an `nn.ParameterDict` (requires_grad set as the variant trains them;
    `weight` is the base weight out × in, `shared` a ParameterDict for tensors every layer of
    the adapter uses); `forward(branch, base_layer, x, result)` returns the layer output with the
    branch applied; `weight_delta(branch, weight)` gives ΔW (out × in, float32) for merging.
    Files: `stored_key(role, target)` names a tensor in PEFT's layout, `file_config(config,
    settings_by_path, transposed)` and `config_from_file(adapter_files)` translate configs.

    Optional hooks: `save_tensors(branch)` (what to write, if not the tensors themselves) and
    `load_tensors(branch, tensors)` (set the branch from the file's tensors by role, if not by copying),
    `delta_needs_base(branch)`, `bias_delta(branch, bias)` (the change merging makes to the layer's
    bias, or None; `bias` is None where the layer has none; kept to be taken out exactly on unmerge),
    `resident(branch)` (a change the variant keeps inside the base weight, taken out on
    disable/remove), `moves_base_weight = True` (the variant trains W itself, so it cannot go on a
    quantized base layer), `prepare(model, config)`
    (choose targets its own way), `param_groups(named_params, lr, config)`, `on_step_end(layers,
    config, step)` and `extra_loss(layers, config)` with `layers` a list of (AdaptedLayer, Branch);
    `train_state(layers, config)` / `load_train_state(layers, config, tensors)` (state kept outside
    the tensors, e.g. importance averages, saved in training checkpoints);
    `train_settings(steps)` (settings `train` fills in where left unset, from the run's number of
    optimizer steps; default none; adalora's budget schedule length);
    `transform_input(branch, x)` (changes the base layer's input, e.g. scaling features);
    `target_of(module)` (what the variant can wrap, default `layer.Target.of`: activation-space
    variants wrap whole blocks; `weight` is then None and there is no `weight_delta`).
    """

    defaults: Mapping[str, Any]

    def settings(self, config: Mapping[str, Any], path: str, target: Any) -> dict[str, Any]: ...

    def create(self, target: Any, settings: Mapping[str, Any], weight: torch.Tensor, shared: Any) -> Any: ...

    def forward(self, branch: Any, base_layer: Any, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class MergeMethod(Protocol):
    """A merge operator over one tensor position, never seeing files.

    `params` maps each parameter name to its default (`None` = required); recipes are checked
    against it. Operators drawing random numbers set `random = True` and take `generators`, one
    seeded torch.Generator per input. Operators with no separate use for a base set
    `takes_base = False`: a recipe's base model is then one more input (as in mergekit).
    `elementwise = True` lets the engine hand big tensors over in row blocks; `block_upcast = True`
    takes floating inputs in their stored dtype (it computes in float32 block by block). `merge(tensors, base, **params)` gets the inputs' tensors in float32 and returns
    the merged tensor; `base` is None when the recipe has no base model.
    Optional: `merge_factors(factors, **params) -> (A, B)` — the method merges adapters' low-rank
    factors exactly, not their ΔW: per module each input's (A, B, s) (None where an input lacks the
    module) in, the output's factors with ΔW = B·A out (`adaptkit.adapter_merge`; the quick form of
    `adaptkit merge` then makes an adapter); default none: merged as ΔW, refactored by SVD (concat).
    """

    name: str
    params: Mapping[str, Any]
    per_model: frozenset[str]  # parameters given per input model (passed as one value per input)

    def merge(self, tensors: Sequence[torch.Tensor], base: torch.Tensor | None, **params: Any) -> torch.Tensor: ...


@runtime_checkable
class Quantizer(Protocol):
    """Packs a float tensor into storage tensors and back. `detect` must need headers only.

    Keys of the packed dict start with "weight" ("weight", "weight.<stat>"); stored models put them
    under the tensor's name. Optional: `unpacked_shape(shapes, read)` — the original shape from the
    packed tensors' shapes (key -> shape) and `read(key)` for small ones, without unpacking;
    `packed_layout(tensor)` — {key: (safetensors dtype code, shape)} that `quantize` will return,
    computed without quantizing (saves the writer's planning pass); `host_keys` — packed keys that
    `dequantize` reads on the host (a layer on a GPU keeps them on the CPU);
    `transformers_config(skipped_modules, compute_dtype)` — the `quantization_config` under which
    transformers loads the files (written into config.json by `adaptkit quantize`);
    `double_quant_form` — the name of the quantizer that is this one with its block scales quantized
    too (what `adaptkit quantize --double-quant` picks), default none (nf4, fp4).
    """

    name: str

    def quantize(self, tensor: torch.Tensor) -> dict[str, torch.Tensor]: ...

    def dequantize(self, packed: Mapping[str, torch.Tensor]) -> torch.Tensor: ...

    def detect(self, store: TensorStore) -> bool: ...


@runtime_checkable
class Format(Protocol):
    """A file layout for adapters. `detect` runs on every `inspect`, so the module must import
    cheaply (no torch at module level) and look at keys, metadata and JSON files only.

    A format that can be written (a target of `adaptkit convert --to NAME`) also has
    `write(adapter: LowRankAdapter, out_dir: Path) -> list[Path]`, writing into an existing
    (temporary) folder; the caller renames it into place.
    """

    name: str

    def detect(self, store: TensorStore) -> bool: ...

    def read(self, store: TensorStore) -> AdapterFiles: ...


PROTOCOLS = {"variant": Variant, "merge": MergeMethod, "quantizer": Quantizer, "format": Format}


def required_members(protocol: type) -> list[str]:
    """The members a Protocol requires: annotated attributes and methods it declares."""
    names = set(getattr(protocol, "__annotations__", {}))
    names |= {k for k, v in vars(protocol).items() if callable(v) and not k.startswith("_")}
    return sorted(names)
