"""What a LoRA-family adapter file must agree with: its config against its stored tensors, and no config field
that changes the math unless adaptkit implements it (the others are refused by name)."""
from __future__ import annotations

import math

from adaptkit.plugin import AdapterFiles, AdaptkitError, UnsupportedError
from adaptkit.plugin import validate as v

from ..formats._lowrank import pattern_value
from ._lora_params import lookup_path, on_parameter
from ._lora_tokens import fold

# PEFT 0.21's LoraConfig fields that change what a saved adapter computes and that adaptkit does not
# implement: refused by name when set (not None, False or []). The fields not here are implemented or
# cannot change a saved adapter's outputs: r, lora_alpha, use_rslora, rank_pattern, alpha_pattern, use_dora,
# lora_bias, modules_to_save, bias (trained biases are saved whole), fan_in_fan_out (the base's layers
# decide), alora_invocation_tokens, target_parameters; the targeting keys (target_modules, exclude_modules,
# layers_to_transform, layers_pattern: the saved tensors name the layers); lora_dropout (training only);
# runtime_config (where PEFT keeps weights); megatron_core (read only with megatron_config);
# qalora_group_size (only with use_qalora); velora_config (VeLoRA compresses activations for the backward
# pass only; its buffer lora_velora_embed is dropped); trainable_token_indices (`_lora_tokens.py`); and the
# data-driven init configs loftq_config, eva_config, corda_config, lora_ga_config, read only when
# init_lora_weights names them (checked below).
REFUSED = {
    "kasa_config": "KaSA (singular-value LoRA on a truncated base)",
    "monteclora_config": "MonteCLoRA (sampled LoRA factors)",
    "use_bdlora": "BD-LoRA (block-diagonal factors)",
    "arrow_config": "Arrow (routing among LoRA experts)",
    "use_qalora": "QA-LoRA (group-pooled inputs of GPTQ layers)",
    "megatron_config": "Megatron tensor-parallel layers",
    "layer_replication": "layer replication (repeated decoder layers)",
    "ensure_weight_tying": "adapters tied between embeddings and the output head",
}
# init_lora_weights values PEFT runs again when it loads an adapter, rewriting the base weights (PiSSA,
# OLoRA, CorDA, LoftQ, LoRA-GA move the start of the update into W); the others leave W as it is.
KEEPS_BASE = (True, False, "gaussian", "orthogonal", "eva")


def refuse_unsupported(cfg: dict, where: str) -> None:
    """The `REFUSED` fields, by name, where set."""
    for key, what in REFUSED.items():
        if cfg.get(key) not in (None, False, []):  # a {} config is the feature with its defaults
            raise UnsupportedError(f"{where}: {key} ({what}) is not supported")


def check_config(cfg: dict, where: str) -> None:
    """Every LoraConfig field that changes the math is implemented (elsewhere) or refused here by name."""
    refuse_unsupported(cfg, where)
    init = cfg.get("init_lora_weights", True)
    if init not in KEEPS_BASE:
        raise UnsupportedError(f"{where}: init_lora_weights={init!r} is not supported in a saved adapter: PEFT rewrites "
                            "the base weights with it when loading (save it converted to a plain LoRA)")


def check_adalora(cfg: dict, where: str) -> None:
    """AdaLoRA's config: the `REFUSED` fields, and DoRA (PEFT refuses it with AdaLoRA). PEFT's AdaLoRA layers
    take init_lora_weights as a flag, so every value of it leaves the base weights as they are."""
    refuse_unsupported(cfg, where)
    if cfg.get("trainable_token_indices"):  # the lora variant's `_lora_tokens`; not wired into AdaLoRA's layers
        raise AdaptkitError(f"{where}: trainable_token_indices with AdaLoRA is not supported")
    if cfg.get("use_dora"):
        raise UnsupportedError(f"{where}: use_dora with AdaLoRA is not supported (PEFT refuses it)")


def check_files(variant, adapter: AdapterFiles) -> None:
    """A LoRA-family `variant`'s config agrees with the tensors, module by module: A (r × in) chains into B (out × r)
    with r ≥ 1, r is the rank `r` / `rank_pattern` give, DoRA magnitudes (out) are there exactly
    when `use_dora` says so, and alpha is finite. Shapes only: no tensor data is read. First the config's
    fields (`check_config`); VeLoRA's buffers are left out of the adapter's tensors."""
    cfg, where = adapter.config, v.adapter_source(adapter)
    check_config(cfg, where)
    tokens = fold(adapter, where)  # trainable tokens beside the LoRA: rows of embeddings, no factors
    if cfg.get("velora_config"):  # VeLoRA's projection for the backward pass: training state, no output changes
        adapter.saved = {k: key for k, key in adapter.saved.items() if not k.endswith(".lora_velora_embed")}
    dora = bool(cfg.get("use_dora"))
    stated = adapter.format == "peft"  # other formats derive use_dora from the tensors (mixed is fine there)
    for module in sorted(set(adapter.modules) - tokens):
        roles = adapter.modules[module]
        a_role, b_role, _ = variant._factors(roles)
        a, b = adapter.shape(module, a_role), adapter.shape(module, b_role)
        grouped = len(a) > 2 and len(b) > 2 and b[1] and a[0] % b[1] == 0  # conv B with groups: r / groups inputs
        if len(a) < 2 or len(b) < 2 or (a[0] != b[1] and not grouped) or a[0] < 1:
            raise AdaptkitError(f"{where}: module '{module}': {a_role} {list(a)} and {b_role} {list(b)} do not "
                                "form a rank ≥ 1 product")
        # A parameter's LoRA stacks a rank-r pair per expert, filed provisionally where PEFT nests several
        # (the variant pairs them with their tensors by shape when merging): its rank is checked there.
        said = None if on_parameter(cfg, module) else \
            pattern_value(cfg.get("rank_pattern"), lookup_path(module), cfg.get("r"))
        if said is not None and said != a[0]:
            raise AdaptkitError(f"{where}: module '{module}' stores rank {a[0]} but the config says "
                                f"{v.short(said)} (r / rank_pattern)")
        if stated and dora != ("lora_magnitude_vector" in roles):
            raise AdaptkitError(f"{where}: use_dora is {str(dora).lower()} but module '{module}' has "
                                f"{'no' if dora else 'a'} lora_magnitude_vector")
        m = adapter.shape(module, "lora_magnitude_vector") if "lora_magnitude_vector" in roles else None
        if m is not None and math.prod(m) != b[0]:  # one per output (PEFT keeps conv's as out × 1 × 1 × 1)
            raise AdaptkitError(f"{where}: module '{module}': lora_magnitude_vector {list(m)} should hold "
                                f"{b[0]} values, one per output")
        v.number(variant.module_alpha(adapter, module), f"{where}: module '{module}' alpha")
