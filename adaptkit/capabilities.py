"""The optional capabilities of plugins, one small Protocol each (see `adaptkit.spec`).

A plugin offers a capability by defining its members; the core tests `isinstance(plugin, P)` where
it uses one (runtime_checkable: members present, signatures not checked) and otherwise does what
`spec.HOOKS` gives as the default. Members that only make sense together share one Protocol;
attributes with a default are grouped per kind (`…Options`) and read with `spec.option`.
"""
from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from .spec import AdapterFiles, LowRankAdapter, LowRankModule

# Variants, tensor plane (a saved adapter):

@runtime_checkable
class VariantOptions(Protocol):
    """Attributes a variant may set (read with `option`): `config_types` field -> checker (`adaptkit.validate`)
    for adapter_config.json and `inject`'s settings; `inspect_rows` the `describe` figures `adaptkit inspect`
    prints after the rank (a true flag as "yes"); `moves_base_weight` the variant trains W itself (so not on a
    quantized base layer)."""
    config_types: Mapping[str, Any]
    inspect_rows: Sequence[str]
    moves_base_weight: bool


@runtime_checkable
class FileCheck(Protocol):
    """Raises AdaptkitError where the config contradicts the stored tensors (ranks, magnitudes), from shapes."""
    def check_files(self, adapter: AdapterFiles) -> None: ...


@runtime_checkable
class MergeCheck(Protocol):
    """Raises AdaptkitError for an adapter with no weight-space form (it edits activations), before a merge."""
    def check_mergeable(self, adapter: AdapterFiles) -> None: ...


@runtime_checkable
class StoredDelta(Protocol):
    """ΔW of a stored module, shaped like the base weight (float32), where the variant computes it itself
    (`base` the base weight, for variants whose ΔW depends on it; others ignore it). Without it the core
    forms s·B·A from `Factors` (`adaptkit.files.lowrank.module_delta`); a variant with neither must refuse merges
    (`MergeCheck`: it edits activations)."""
    def delta(self, adapter: AdapterFiles, module: str, base: torch.Tensor | None = None) -> torch.Tensor: ...


@runtime_checkable
class ExpertDelta(Protocol):
    """ΔP of expert `expert` of a stored module on a parameter that stacks experts (E × d₁ × d₂, `shape`, the
    layer as transformers 5 holds it), shaped like one expert (d₁ × d₂): for a checkpoint that stores each
    expert's matrices on their own, one expert at a time."""
    def expert_delta(self, adapter: AdapterFiles, module: str, shape: tuple[int, ...], expert: int) -> torch.Tensor: ...


@runtime_checkable
class StoredBiasDelta(Protocol):
    """The change a stored module makes to its layer's bias (`base` the bias or None), or None."""
    def delta_bias(self, adapter: AdapterFiles, module: str, base: torch.Tensor | None) -> torch.Tensor | None: ...


@runtime_checkable
class Factors(Protocol):
    """An exact low-rank form of a stored module: (A, B, s) with ΔW = s·B·A (A r × in, B out × r; raises
    AdaptkitError for a module without one), and how it lies against the base ({embedding, transposed})."""
    def factors(self, adapter: AdapterFiles, module: str) -> tuple[torch.Tensor, torch.Tensor, float]: ...
    def factor_layout(self, adapter: AdapterFiles, module: str) -> dict[str, bool]: ...


@runtime_checkable
class LowRankStored(Protocol):
    """A stored module as a `LowRankModule` exactly as in the file (lossless), or AdaptkitError."""
    def lowrank_module(self, adapter: AdapterFiles, module: str) -> LowRankModule: ...


@runtime_checkable
class LowRankWriter(Protocol):
    """Writes an adapter of the variant from factors (module -> (A, B), ΔW = B·A) laid out as `factor_layout`
    says, keeping `template`'s config fields, into `out_dir`; returns the files (merging into an adapter)."""
    def factor_layout(self, adapter: AdapterFiles, module: str) -> dict[str, bool]: ...
    def write_lowrank(self, factors: Mapping, layouts: Mapping, template: dict[str, Any], out_dir: Any) -> list: ...


# Variants, module plane (a live `layer.Branch`; `layers` is a list of (AdaptedLayer, Branch)):

@runtime_checkable
class WeightSpace(Protocol):
    """ΔW (out × in, float32) of a branch given the base weight, for merging; without it a variant edits
    activations and cannot be merged."""
    def weight_delta(self, branch: Any, weight: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class BaseDependent(Protocol):
    """Whether the branch's ΔW depends on W (DoRA): the ΔW merged is kept, to take out exactly on unmerge."""
    def delta_needs_base(self, branch: Any) -> bool: ...


@runtime_checkable
class LiveBiasDelta(Protocol):
    """The change merging makes to the layer's bias (None where it has none), or None."""
    def bias_delta(self, branch: Any, bias: torch.Tensor | None) -> torch.Tensor | None: ...


@runtime_checkable
class Resident(Protocol):
    """A change kept inside the base weight (PiSSA's residual, updates of W), out on disable/remove, or None."""
    def resident(self, branch: Any) -> torch.Tensor | None: ...


@runtime_checkable
class TransformsInput(Protocol):
    """Changes the base layer's input (e.g. scaling features)."""
    def transform_input(self, branch: Any, x: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class ReadsInputs(Protocol):
    """Reads the whole model's inputs before each call (aLoRA: from which token on each row's branch acts):
    `reads_inputs(config)` whether an adapter with this config needs them; `read_inputs(config, args, kwargs,
    previous)` what each of its branches holds as `Branch.inputs` during that call (`previous`: what the last call
    gave, for a call that continues it, as decoding with a KV cache does). Outside a call branches hold None.
    `check_generate(config, num_beams)` refuses, in one line, a `model.generate` it cannot follow (aLoRA: beams)."""
    def reads_inputs(self, config: Mapping[str, Any]) -> bool: ...
    def read_inputs(self, config: Mapping[str, Any], args: tuple, kwargs: Mapping[str, Any], previous: Any) -> Any: ...
    def check_generate(self, config: Mapping[str, Any], num_beams: int) -> None: ...


@runtime_checkable
class RewritesCall(Protocol):
    """Changes the model's call itself (prompt learning: virtual tokens before the inputs, a prefix cache for
    attention): the keyword arguments the model runs with, from those given (positional ones bound by name),
    the adapter's shared tensors and its config. Applied for an active adapter whose layers are enabled."""
    def rewrite_call(self, model: Any, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                     kwargs: dict[str, Any]) -> dict[str, Any]: ...


@runtime_checkable
class Intervention(Protocol):
    """What the variant wraps, for an activation-space variant (whole blocks; `create` gets weight None)."""
    def target_of(self, module: Any) -> Any: ...


@runtime_checkable
class TensorTargets(Protocol):
    """Adapters on tensors a module reads itself, not through a layer call (Target kind "tensors":
    MultiheadAttention's packed projection, a bare parameter): the targets the variant finds beside
    target_modules (path -> Target), each branch's ΔP by tensor name (the layer runs its module with
    P + ΔP in place), and where a saved module's tensors go: (live layer path, role prefix) or None."""
    def tensor_targets(self, model: Any, config: Mapping[str, Any]) -> dict[str, Any]: ...
    def tensor_deltas(self, branch: Any, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...
    def live_place(self, adapter: AdapterFiles, module: str, layers: Mapping[str, Any]) -> tuple[str, str] | None: ...


@runtime_checkable
class ChoosesTargets(Protocol):
    """The config with the variant's own targets chosen (last k layers, modules to save)."""
    def prepare(self, model: Any, config: dict[str, Any]) -> dict[str, Any]: ...


@runtime_checkable
class SavesTensors(Protocol):
    """What to write for a branch, by role, where not its tensors themselves."""
    def save_tensors(self, branch: Any) -> dict[str, torch.Tensor]: ...


@runtime_checkable
class LoadsTensors(Protocol):
    """Sets a branch from the file's tensors by role, where not by copying them."""
    def load_tensors(self, branch: Any, tensors: Mapping[str, torch.Tensor]) -> None: ...


@runtime_checkable
class ParamGroups(Protocol):
    """The variant's optimizer parameter groups (LoRA+'s faster B)."""
    def param_groups(self, named_params: list, lr: float, config: Mapping[str, Any]) -> list[dict]: ...


@runtime_checkable
class StepEnd(Protocol):
    """Runs after each optimizer step (from 1): moving base weights or rank budgets. A variant whose
    `moves_base_weight` option is true moves each layer's W from that layer's own tensors: on a
    sharded model it is called one layer at a time (only that layer's W gathered whole)."""
    def on_step_end(self, layers: list, config: Mapping[str, Any], step: int) -> None: ...


@runtime_checkable
class ExtraLoss(Protocol):
    """A regularization term added to the training loss."""
    def extra_loss(self, layers: list, config: Mapping[str, Any]) -> Any: ...


@runtime_checkable
class TrainState(Protocol):
    """State kept outside the tensors (importance averages) by key, saved in and restored from checkpoints."""
    def train_state(self, layers: list, config: Mapping[str, Any]) -> dict[str, torch.Tensor]: ...
    def load_train_state(self, layers: list, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None: ...


@runtime_checkable
class TrainSettings(Protocol):
    """Settings `train` fills in where left unset, from the run's number of optimizer steps."""
    def train_settings(self, steps: int) -> dict[str, Any]: ...


# Merge methods, quantizers, formats:

@runtime_checkable
class MergeOptions(Protocol):
    """Attributes a merge method may set (read with `option`): `random` it draws random numbers and takes
    `generators`, one seeded torch.Generator per input; `takes_base` False: a recipe's base is one more input
    (as in mergekit); `elementwise` big tensors may come in row blocks; `serial_kernels` its tensors merge faster
    side by side on the cores, one torch thread each, than one at a time on all of them (single-threaded kernels:
    whole-tensor sorts, numpy's, torch.dot; or many steps over cache-sized blocks); `block_upcast` floating inputs come
    as read (stored dtype; float32 where an adapter delta was added) with the keyword `dtype`, the compute
    dtype, which the method converts them to block by block; `accelerated` False: it computes on the CPU whatever
    `--device` says (a copy, say, where moving the inputs would cost more than it saves)."""
    random: bool
    takes_base: bool
    elementwise: bool
    serial_kernels: bool
    block_upcast: bool
    accelerated: bool


@runtime_checkable
class WorkingMemory(Protocol):
    """What a merge method holds for one tensor besides its inputs (as read for a `block_upcast` method,
    converted otherwise), in bytes an entry, from the number of inputs, the compute dtype's size and the
    recipe's global parameters. The engine's estimate of a tensor's working memory (its inputs counted as
    float32, plus this) decides which tensors merge side by side within its budget; without it, the
    engine counts float32 copies of the inputs and tensor-sized temporaries besides."""
    def entry_bytes(self, inputs: int, compute_size: int, params: Mapping[str, Any]) -> int: ...


@runtime_checkable
class FactorMerge(Protocol):
    """Merges adapters' low-rank factors exactly, not their ΔW: per module each input's (A, B, s) (None where
    it lacks the module) in, the output's (A, B) with ΔW = B·A out (`adaptkit.merge.to_adapter`)."""
    def merge_factors(self, factors: Sequence, **params: Any) -> tuple[torch.Tensor, torch.Tensor]: ...


@runtime_checkable
class QuantizerOptions(Protocol):
    """Attributes a quantizer may set (read with `option`): `host_keys` packed keys `dequantize` reads on the
    host (a layer on a GPU keeps them on the CPU); `double_quant_form` the quantizer that is this one with its
    block scales quantized too (what `adaptkit quantize --double-quant` picks); `unpacks_into` true when
    `dequantize(packed, buffer=get)` may write Ŵ into `get(shape, dtype, device)`, a tensor the caller
    reuses (the result is still what `dequantize` returns)."""
    host_keys: Sequence[str]
    double_quant_form: str | None
    unpacks_into: bool


@runtime_checkable
class UnpackedShape(Protocol):
    """The original shape from the packed tensors' shapes (key -> shape) and `read(key)`, without unpacking."""
    def unpacked_shape(self, shapes: Mapping[str, tuple[int, ...]], read: Any) -> tuple[int, ...]: ...


@runtime_checkable
class PackedLayout(Protocol):
    """{key: (safetensors dtype code, shape)} that `quantize` will return, computed without quantizing."""
    def packed_layout(self, tensor: torch.Tensor) -> dict[str, tuple[str, tuple[int, ...]]]: ...


@runtime_checkable
class TransformersConfig(Protocol):
    """The `quantization_config` under which transformers loads the files (written into config.json)."""
    def transformers_config(self, skipped_modules: list[str], compute_dtype: str) -> dict[str, Any]: ...


@runtime_checkable
class Writable(Protocol):
    """A format that can be written (`convert --to NAME`): into an existing (temporary) folder."""
    def write(self, adapter: LowRankAdapter, out_dir: Any) -> list: ...


@runtime_checkable
class LiveWriter(Protocol):
    """A format that lays out a live model's adapter itself (`handle.save`, `train`): `live` is an
    `adaptkit.live.files.LiveAdapter` (tensors by module path and the variant's stored key, tensors shared by all
    modules, modules trained whole, the variant's file config); writes into an existing (temporary) folder.
    Without it the adapter reaches the format's `write` in low-rank form, where the variant has one as stored."""
    def write_live(self, live: Any, out_dir: Any) -> list: ...


@runtime_checkable
class WritesVariants(Protocol):
    """A format that holds some variants' own tensors, not only low-rank ones (LyCORIS's LoHa and LoKr in kohya
    files): `writes_variants` names them; `write_files(adapter, out_dir)` writes such an `AdapterFiles` as it is
    stored (`convert` without --rank/--energy, `handle.save`) into an existing (temporary) folder."""
    writes_variants: frozenset[str]
    def write_files(self, adapter: AdapterFiles, out_dir: Any) -> list: ...


@runtime_checkable
class RemoteLayout(Protocol):
    """A format whose adapters are a set of named files in a Hub repository (`hub pull` downloads just those):
    `remote_files(names)` picks them from the repository's file names (None: not this format's layout; an
    AdaptkitError: its layout, incomplete); `remote_hint` names what marks the layout, for a message about a
    repository that holds no adapter. Without it a format's adapters are found as one root-level .safetensors
    file its `detect` accepts from the header."""
    remote_hint: str
    def remote_files(self, names: Collection[str]) -> list[str] | None: ...


@runtime_checkable
class BaseNames(Protocol):
    """A format whose adapters name modules as one layout of a model family does, which other files of that
    family name differently (a Stable Diffusion pipeline's `unet.…` modules in a single-file checkpoint's
    `model.diffusion_model.…` keys): `base_key(module, store)` says where a module that the base model's `store`
    lacks under its own name lies there: (its weight's key, its bias's key or None, the rows [start, stop) of
    that weight its ΔW covers or None for all of it, as in a fused q/k/v projection), None where the format
    knows no place for it, or an AdaptkitError where it knows the base's layout and that it cannot hold the
    module. Without it a module is looked up under its own name only."""
    def base_key(self, module: str, store: Any) -> tuple[str, str | None, tuple[int, int] | None] | None: ...


@runtime_checkable
class FormatOptions(Protocol):
    """Attributes a format may set (read with `option`): `hub_library` the Hub's `library_name` for its
    adapters (the library that loads them), `card_usage` a Markdown line for the model card `hub push`
    writes, with `{repo}` standing for the repository."""
    hub_library: str | None
    card_usage: str
