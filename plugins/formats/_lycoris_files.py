"""LyCORIS's LoHa and LoKr modules in kohya single files (not a plugin; used by `kohya.py`; no torch at import).

LyCORIS (KohakuBlueleaf/LyCORIS, `lycoris/modules/loha.py`, `lokr.py`) saves each module under the kohya
name (`lora_unet_…`, `lora_te_…`) with its own roles, no `.weight` suffix:

    LoHa   hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b [, hada_t1, hada_t2 (Tucker)], alpha [, dora_scale]
    LoKr   lokr_w1 | lokr_w1_a + lokr_w1_b,  lokr_w2 | lokr_w2_a + lokr_w2_b [+ lokr_t2],  alpha [, dora_scale]

and applies ΔW = alpha / r · product (the loha / lokr variants' formulas), r being the rank the module
was built with: LoHa hada_w1_b.shape[0]; LoKr lokr_w1_b.shape[0] where W1 is low-rank, else
lokr_w2_b.shape[0] (r in every W2 layout; LyCORIS's state-dict loader reads w2_a.shape[1], which is r
only without Tucker), and scale 1 when both factors are full (LyCORIS then sets alpha = r; ComfyUI
does the same). A module without `alpha` gets alpha = r (scale 1) with one warning, as LoRA files do;
an `alpha` of 0 is alpha = r too (LyCORIS: `alpha = lora_dim if alpha is None or alpha == 0`), so a
module of scale 0 is refused on writing.
`dora_scale` is LyCORIS's weight decomposition (the variants apply it, given the base weight).

Read into the loha / lokr variant's config (PEFT's fields): each module's r and alpha stated exactly by
r / alpha and `rank_pattern` / `alpha_pattern` (exact paths), so alpha / r is LyCORIS's scale.
A file mixing LoRA, LoHa and LoKr modules is refused by name (one family per file).
"""
from __future__ import annotations

import warnings

from adaptkit.plugin import AdapterFiles, AdaptkitError

from ._lowrank import MissingAlphaWarning, most_common, number, patterns, scalar

LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
ROLES = (*LOHA, *LOKR, "dora_scale")  # besides `alpha`, which every kohya module has
FAMILIES = {"loha": LOHA, "lokr": LOKR}


def family(roles) -> str:
    """'lora', 'loha', 'lokr' or 'mixed' for one module's roles."""
    found = {name for name, own in FAMILIES.items() if set(roles) & set(own)}
    if {"lora_down.weight", "lora_up.weight"} & set(roles):
        found.add("lora")
    return found.pop() if len(found) == 1 else "mixed" if found else "lora"


def file_family(groups: dict, where) -> str:
    """The one family of all modules of a file, or a one-line refusal naming what is mixed."""
    kinds = {}
    for (prefix, flat), roles in groups.items():
        kinds.setdefault(family(roles), f"{prefix}_{flat}")
    if len(kinds) > 1 or "mixed" in kinds:
        named = ", ".join(f"{k} ({name})" for k, name in sorted(kinds.items()))
        raise AdaptkitError(f"{where}: modules of several LyCORIS families in one file: {named}; adaptkit reads one "
                            "family (LoRA, LoHa or LoKr) per file")
    return next(iter(kinds), "lora")


def rank(name: str, roles: dict[str, str], store) -> int | None:
    """The rank the module was built with (module docstring), None for a LoKr with both factors full."""
    def dim(role):
        return store.info(roles[role]).shape[0]

    if "hada_w1_b" in roles:
        return dim("hada_w1_b")
    if "lokr_w1_b" in roles:
        return dim("lokr_w1_b")
    if "lokr_w2_b" in roles:
        return dim("lokr_w2_b")
    return None


def read(kind: str, groups: dict, store, where, fmt: str, module_path) -> AdapterFiles:
    """AdapterFiles of variant `kind` from the kohya groups {(prefix, flat): {role: key}}."""
    from adaptkit.plugin import registry

    variant = registry.get("variant", kind)
    modules, ranks, alphas, missing = {}, {}, {}, 0
    for (prefix, flat), roles in sorted(groups.items()):
        name = f"{prefix}_{flat}"
        path = module_path(prefix, flat)
        if path in modules:
            raise AdaptkitError(f"{where}: two kohya names map to module '{path}' (one is '{name}')")
        tensors = {role: key for role, key in roles.items() if role != "alpha"}
        try:
            variant.check_roles(tensors, name)
        except AdaptkitError as e:
            raise AdaptkitError(f"{where}: {e}") from None
        modules[path] = tensors
        r = rank(name, tensors, store)
        if r is None:  # both LoKr factors full: LyCORIS's scale is 1 whatever alpha says; r = max(b, d) is a
            w2 = store.info(tensors["lokr_w2"]).shape  # rank PEFT's rule also builds both factors full for
            ranks[path] = alphas[path] = max(w2[0], w2[1])
        else:  # LyCORIS's modules: alpha None or 0 is alpha = r (scale 1)
            alpha = scalar(store, roles["alpha"]) if "alpha" in roles else None
            ranks[path], alphas[path], missing = r, alpha or float(r), missing + (alpha is None)
    if missing:
        warnings.warn(f"{where}: {missing} of {len(modules)} {kind} modules have no alpha; using alpha = rank "
                      "(scale 1) for them", MissingAlphaWarning, stacklevel=3)
    r = most_common(ranks.values())
    alpha = most_common(alphas[m] for m in ranks if ranks[m] == r)
    config = {"peft_type": kind.upper(), "r": r, "alpha": number(alpha), "rank_pattern": patterns(ranks, r),
              "alpha_pattern": patterns(alphas, alpha), "target_modules": sorted(modules),
              "base_model_name_or_path": None}
    return AdapterFiles(kind, config, store, fmt, modules)


def write(adapter: AdapterFiles, names: dict[str, str], out_dir, alpha_tensor, sdxl: bool) -> list:
    """`<out_dir>/lora.safetensors` with every module's tensors as stored, under its kohya name (`names`), and
    the `alpha` that gives LyCORIS's scale alpha / r the adapter's own (the variant's `scaling`). A LoKr module
    with both factors full has LyCORIS scale 1: its scale is folded into lokr_w1 instead. PEFT's LoKr on an
    nn.Conv1d with a full W2 means another ΔW than LyCORIS's formula (`_lycoris_math.kronecker`): refused."""
    import json

    from adaptkit.plugin import registry, save_tensors

    variant = registry.get("variant", adapter.variant)
    tensors, dims, alphas = {}, {}, {}
    for path, roles in sorted(adapter.modules.items()):
        name = names[path]
        own = {role: adapter.store.get(key).contiguous() for role, key in roles.items()}
        if adapter.format != "kohya" and own.get("lokr_w2") is not None and own["lokr_w2"].dim() == 3:
            raise AdaptkitError(f"{path}: PEFT's LoKr on a Conv1d with a full lokr_w2 computes W1 ⊗ W2 in a layout "
                                "LyCORIS files do not have; convert it to LoRA (--rank) instead")
        scale, r = variant.scaling(adapter, path), rank(name, roles, adapter.store)
        if r is None:
            own["lokr_w1"] = (own["lokr_w1"].float() * scale).to(own["lokr_w1"].dtype)
            r, scale = 1, 1.0
        tensors |= {f"{name}.{role}": t for role, t in own.items()}
        tensors[f"{name}.alpha"] = alpha_tensor(path, scale * r, next(iter(own.values())).dtype)
        dims[path], alphas[path] = r, scale * r
    dim = most_common(dims.values())
    metadata = {"ss_network_module": "lycoris.kohya", "ss_network_dim": str(dim),
                "ss_network_alpha": str(float(most_common(alphas[m] for m in dims if dims[m] == dim))),
                "ss_network_args": json.dumps({"algo": adapter.variant}), "ss_training_comment": "written by adaptkit"}
    if sdxl:
        metadata["ss_base_model_version"] = "sdxl_base_v1-0"
    if adapter.config.get("base_model_name_or_path"):
        metadata["ss_sd_model_name"] = adapter.config["base_model_name_or_path"]
    return save_tensors(out_dir, tensors, shard_size=2**62, metadata=metadata, stem="lora")
