"""What a LoRA-family adapter file must agree with: its config against its stored tensors."""
from __future__ import annotations

import math

from adaptkit.plugin import AdapterFiles, AdaptkitError
from adaptkit.plugin import validate as v

from ..formats._lowrank import pattern_value


def check_files(variant, adapter: AdapterFiles) -> None:
    """A LoRA-family `variant`'s config agrees with the tensors, module by module: A (r × in) chains into B (out × r)
    with r ≥ 1, r is the rank `r` / `rank_pattern` give, DoRA magnitudes (out) are there exactly
    when `use_dora` says so, and alpha is finite. Shapes only: no tensor data is read."""
    cfg, where = adapter.config, v.adapter_source(adapter)
    dora = bool(cfg.get("use_dora"))
    stated = adapter.format == "peft"  # other formats derive use_dora from the tensors (mixed is fine there)
    for module in sorted(adapter.modules):
        roles = adapter.modules[module]
        a_role, b_role, _ = variant._factors(roles)
        a, b = adapter.shape(module, a_role), adapter.shape(module, b_role)
        if len(a) < 2 or len(b) < 2 or a[0] != b[1] or a[0] < 1:
            raise AdaptkitError(f"{where}: module '{module}': {a_role} {list(a)} and {b_role} {list(b)} do not "
                                "form a rank ≥ 1 product")
        said = pattern_value(cfg.get("rank_pattern"), module, cfg.get("r"))
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
