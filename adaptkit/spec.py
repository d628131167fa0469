"""The plugin contracts. The core talks to plugins only through these; it never names a variant.

Each kind is a Protocol checked when a plugin is first loaded (`registry.get`). Members listed in
a kind's Protocol are required. Everything else a plugin may offer is an optional capability: a
small `runtime_checkable` Protocol (in `adaptkit.capabilities`, re-exported here; members that only
make sense together share one), which the core tests with `isinstance(plugin, spec.Capability)`
(member presence only) where it uses it, or an attribute read with `option(plugin, name)`. `HOOKS` lists every optional hook with its Protocol,
what the core does when it is absent, and the built-ins that define it (tests/test_spec_hooks.py
keeps it in step with the registry and the core).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from .capabilities import (BaseDependent, BaseNames, ChoosesTargets, ExpertDelta, ExtraLoss, FactorMerge, Factors,
                           FileCheck, FormatOptions, Intervention, LiveBiasDelta, LiveWriter, LoadsTensors,
                           LowRankStored, LowRankWriter, MergeCheck, MergeOptions, PackedLayout, ParamGroups,
                           QuantizerOptions, ReadsInputs, RemoteLayout, Resident, RewritesCall, SavesTensors, StepEnd,
                           StoredBiasDelta, StoredDelta, TensorTargets, TrainSettings, TrainState, TransformersConfig,
                           TransformsInput, UnpackedShape, VariantOptions, WeightSpace, WorkingMemory, Writable,
                           WritesVariants)

if TYPE_CHECKING:
    import torch

    from .io.store import TensorStore


@dataclass
class AdapterFiles:
    """A saved adapter in canonical form, its tensors still on disk.

    `modules` maps each adapted module's path (e.g. `model.layers.0.self_attn.q_proj`) to its
    tensors by role (`lora_A`, `lora_B`, ...: the variant's `param_names`) as keys of `store`.
    `shared` holds tensors used by every module (a role -> key); `saved` holds full replacement
    tensors (PEFT's `modules_to_save`) by parameter path. `transposed` says which modules' base
    weights are stored in × out (GPT-2 Conv1D, stacked experts marked `is_transposed`): the format's
    guess, settled from the base model (`files.lowrank.settle_layout`) wherever one is at hand;
    `settled` names the base's model_type it came from, so it holds for square weights too.
    """

    variant: str
    config: dict[str, Any]
    store: TensorStore
    format: str
    modules: dict[str, dict[str, str]] = field(default_factory=dict)
    shared: dict[str, str] = field(default_factory=dict)
    saved: dict[str, str] = field(default_factory=dict)
    transposed: dict[str, bool] = field(default_factory=dict)
    settled: str | None = None

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
    """An adapter variant. Tensor plane: describe a saved adapter and give each module's ΔW.

    `param_names` are the roles of its tensors as they appear in PEFT-style keys
    (`<module>.<role>[.weight]`); `config_keys` are the config fields it understands (others warn).
    ΔW comes from `StoredDelta` or, failing that, from `Factors` (`adaptkit.files.lowrank.module_delta`); a
    variant with neither edits activations and says so in `MergeCheck` (`registry.get` checks one of
    the three). Optional capabilities: `VariantOptions`, `FileCheck`, `MergeCheck`, `StoredDelta`,
    `ExpertDelta`, `StoredBiasDelta`, `Factors`, `LowRankStored`, `LowRankWriter`; the module plane: `LiveModule`.
    """

    name: str
    param_names: Sequence[str]
    config_keys: frozenset[str]

    def describe(self, adapter: AdapterFiles) -> dict[str, Any]:
        """Figures for `inspect`: ranks, alpha, scaling, per-module details. Shapes only, no data."""


@runtime_checkable
class LiveModule(Protocol):
    """The module plane of a variant: it can go on a live model (`inject`, `train`, `load`).

    `defaults` are the config keys `inject` accepts (besides the targeting keys) with defaults;
    `file_config(config, settings_by_path, transposed)` and `config_from_file(adapter_files)`
    translate configs to and from adapter_config.json. A variant that adapts layers (not only
    whole modules to save, as partial) is also a `LayerVariant`."""

    defaults: Mapping[str, Any]

    def file_config(self, config: Mapping[str, Any], settings: Mapping[str, Any], transposed: bool) -> dict[str, Any]: ...

    def config_from_file(self, adapter: AdapterFiles) -> dict[str, Any]: ...


class LayerVariant(Protocol):
    """Per adapted layer: `settings(config, path, target)` resolves that layer's settings (rank,
    scaling, …) and rejects impossible ones; `create(target, settings, weight, shared)` returns the
    layer's tensors by role as an `nn.ParameterDict` (requires_grad set as the variant trains them;
    `weight` is the base weight out × in, None for a whole block; `shared` a ParameterDict for
    tensors every layer of the adapter uses); `forward(branch, base_layer, x, result)` returns the
    layer output with the branch applied; `stored_key(role, target)` names a tensor in PEFT's layout."""

    def settings(self, config: Mapping[str, Any], path: str, target: Any) -> dict[str, Any]: ...

    def create(self, target: Any, settings: Mapping[str, Any], weight: torch.Tensor, shared: Any) -> Any: ...

    def forward(self, branch: Any, base_layer: Any, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor: ...

    def stored_key(self, role: str, target: Any) -> str: ...


@runtime_checkable
class MergeMethod(Protocol):
    """A merge operator over one tensor position, never seeing files.

    `params` maps each parameter name to its default (`None` = required); recipes are checked
    against it. `merge(tensors, base, **params)` gets the inputs' tensors in float32 and returns
    the merged tensor; `base` is None when the recipe has no base model.
    Optional: `MergeOptions`, `FactorMerge`, `WorkingMemory`.
    """

    name: str
    params: Mapping[str, Any]
    per_model: frozenset[str]  # parameters given per input model (passed as one value per input)

    def merge(self, tensors: Sequence[torch.Tensor], base: torch.Tensor | None, **params: Any) -> torch.Tensor: ...


@runtime_checkable
class Quantizer(Protocol):
    """Packs a float tensor into storage tensors and back. `detect` must need headers only.

    Keys of the packed dict start with "weight" ("weight", "weight.<stat>"); stored models put them
    under the tensor's name. Optional: `QuantizerOptions`, `UnpackedShape`, `PackedLayout`,
    `TransformersConfig`.
    """

    name: str

    def quantize(self, tensor: torch.Tensor) -> dict[str, torch.Tensor]: ...

    def dequantize(self, packed: Mapping[str, torch.Tensor]) -> torch.Tensor: ...

    def detect(self, store: TensorStore) -> bool: ...


@runtime_checkable
class Format(Protocol):
    """A file layout for adapters. `detect` runs on every `inspect`, so the module must import
    cheaply (no torch at module level) and look at keys, metadata and JSON files only.
    Optional: `Writable`, `LiveWriter`, `WritesVariants`, `RemoteLayout`, `FormatOptions`.
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


@dataclass(frozen=True)
class Hook:
    """An optional hook: the Protocol that declares it, and what the core does without it (for an
    attribute, the value `option` gives)."""

    protocol: type
    default: Any


# Every optional hook. The comment on each row lists the built-ins (registry names) defining it, `all`
# where every built-in of its kind does; factor_layout is also a member of LowRankWriter.
# tests/test_spec_hooks.py derives them from the registry and fails when a row is out of date.
HOOKS: dict[str, Hook] = {
    "config_types": Hook(VariantOptions, {}),  # all
    "inspect_rows": Hook(VariantOptions, ()),  # adalora boft delta_lora ia3 loha lokr lora lora_fa lora_plus oft p_tuning prefix_tuning prompt_tuning tied_lora trainable_tokens vera
    "moves_base_weight": Hook(VariantOptions, False),  # delta_lora
    "check_files": Hook(FileCheck, "no check"),  # adalora boft delta_lora lora lora_fa lora_plus oft p_tuning prefix_tuning prompt_tuning trainable_tokens
    "check_mergeable": Hook(MergeCheck, "every adapter has a ΔW"),  # delta_lora lora lora_fa lora_plus loreft p_tuning prefix_tuning prompt_tuning
    "delta": Hook(StoredDelta, "s·B·A from factors"),  # all
    "expert_delta": Hook(ExpertDelta, "refused"),  # delta_lora lora lora_fa lora_plus
    "delta_bias": Hook(StoredBiasDelta, "the bias stays"),  # delta_lora ia3 lora lora_fa lora_plus
    "factors": Hook(Factors, "ΔW by SVD"),  # adalora delta_lora lora lora_fa lora_plus tied_lora trainable_tokens vera
    "factor_layout": Hook(Factors, "no adapter output"),  # adalora boft delta_lora loha lokr lora lora_fa lora_plus oft tied_lora trainable_tokens vera
    "lowrank_module": Hook(LowRankStored, "from factors or by SVD"),  # delta_lora lora lora_fa lora_plus
    "write_lowrank": Hook(LowRankWriter, "no adapter output"),  # adalora boft delta_lora loha lokr lora lora_fa lora_plus oft tied_lora vera
    "weight_delta": Hook(WeightSpace, "cannot be merged"),  # adalora boft delta_lora ia3 loha lokr lora lora_fa lora_plus oft tied_lora trainable_tokens vera
    "delta_needs_base": Hook(BaseDependent, "ΔW recomputed on unmerge"),  # boft delta_lora ia3 lora lora_fa lora_plus oft trainable_tokens
    "bias_delta": Hook(LiveBiasDelta, "the bias stays"),  # delta_lora ia3 lora lora_fa lora_plus
    "resident": Hook(Resident, "nothing inside W"),  # delta_lora lora lora_fa lora_plus
    "transform_input": Hook(TransformsInput, "the input as it is"),  # boft ia3 oft
    "reads_inputs": Hook(ReadsInputs, False),  # delta_lora lora lora_fa lora_plus
    "read_inputs": Hook(ReadsInputs, "nothing read"),  # delta_lora lora lora_fa lora_plus
    "check_generate": Hook(ReadsInputs, "any generation settings"),  # delta_lora lora lora_fa lora_plus
    "rewrite_call": Hook(RewritesCall, "the call as given"),  # p_tuning prefix_tuning prompt_tuning
    "target_of": Hook(Intervention, "layer.Target.of"),  # delta_lora lora lora_fa lora_plus loreft
    "tensor_targets": Hook(TensorTargets, "none"),  # delta_lora lora lora_fa lora_plus
    "tensor_deltas": Hook(TensorTargets, "no ΔP"),  # delta_lora lora lora_fa lora_plus
    "live_place": Hook(TensorTargets, "matched by path"),  # delta_lora lora lora_fa lora_plus
    "prepare": Hook(ChoosesTargets, "config as given"),  # delta_lora ia3 lora lora_fa lora_plus loreft p_tuning partial prefix_tuning prompt_tuning trainable_tokens vera
    "save_tensors": Hook(SavesTensors, "its tensors"),  # adalora delta_lora lora lora_fa lora_plus loreft p_tuning prefix_tuning prompt_tuning tied_lora vera
    "load_tensors": Hook(LoadsTensors, "copied by role"),  # loreft
    "param_groups": Hook(ParamGroups, "one group at lr"),  # delta_lora lora lora_fa lora_plus loreft
    "on_step_end": Hook(StepEnd, "nothing"),  # adalora delta_lora
    "extra_loss": Hook(ExtraLoss, "0"),  # adalora
    "train_state": Hook(TrainState, "none kept"),  # adalora
    "load_train_state": Hook(TrainState, "nothing restored"),  # adalora
    "train_settings": Hook(TrainSettings, "none"),  # adalora
    "random": Hook(MergeOptions, False),  # all
    "takes_base": Hook(MergeOptions, True),  # average karcher linear passthrough
    "elementwise": Hook(MergeOptions, False),  # all
    "serial_kernels": Hook(MergeOptions, False),  # all
    "block_upcast": Hook(MergeOptions, False),  # breadcrumbs breadcrumbs_ties dare_linear dare_ties della della_linear magnitude_prune task_arithmetic ties
    "accelerated": Hook(MergeOptions, True),  # passthrough
    "entry_bytes": Hook(WorkingMemory, "float32 copies and temporaries counted"),  # breadcrumbs breadcrumbs_ties dare_linear dare_ties della della_linear magnitude_prune ram ramplus_tl sce task_arithmetic ties
    "merge_factors": Hook(FactorMerge, "merged as ΔW, refactored by SVD"),  # concat
    "host_keys": Hook(QuantizerOptions, ()),  # binary fp4 fp4_dq nf4 nf4_dq ternary
    "double_quant_form": Hook(QuantizerOptions, None),  # fp4 nf4
    "unpacks_into": Hook(QuantizerOptions, False),  # fp4 fp4_dq nf4 nf4_dq
    "unpacked_shape": Hook(UnpackedShape, "unpacks to see"),  # all
    "packed_layout": Hook(PackedLayout, "quantizes to see"),  # all
    "transformers_config": Hook(TransformersConfig, "config.json unchanged"),  # fp4 fp4_dq nf4 nf4_dq
    "write": Hook(Writable, "read-only format"),  # all
    "write_live": Hook(LiveWriter, "written as the default format, read back in low-rank form"),  # peft
    "writes_variants": Hook(WritesVariants, frozenset()),  # kohya
    "write_files": Hook(WritesVariants, "low-rank form only"),  # kohya
    "remote_files": Hook(RemoteLayout, "one root-level .safetensors file it detects"),  # peft
    "remote_hint": Hook(RemoteLayout, None),  # peft
    "base_key": Hook(BaseNames, "the module's own name"),  # diffusers kohya
    "hub_library": Hook(FormatOptions, None),  # diffusers peft
    "card_usage": Hook(FormatOptions, ""),  # all
}


def option(plugin: Any, name: str) -> Any:
    """The plugin's optional attribute `name` (an attribute member of a Protocol in HOOKS), or its default."""
    return getattr(plugin, name, HOOKS[name].default)
