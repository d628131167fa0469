"""PEFT's `target_parameters` (its ParamWrapper: LoRA on an nn.Parameter) read from a saved adapter: which
stored LoRA is whose parameter (`parameter_modules`, used by peft.py)."""
from __future__ import annotations

from adaptkit.plugin import AdaptkitError


def parameter_modules(modules: dict[str, dict[str, str]], targets: list[str], where,
                      layers: list[str] | str | None = None) -> dict[str, dict[str, str]]:
    """`target_parameters` (PEFT's ParamWrapper: LoRA on an nn.Parameter) saves a parameter's factors under
    its module's path; the adapter names the module by the parameter's own path, the base model's
    tensor (`lin0` -> `lin0.weight`). A parameter matches a target as in PEFT: `<module>.<name>` equals it
    or ends in `.<target>`. PEFT nests one wrapper per parameter of a module (`experts`,
    `experts.base_layer`, …) in the order the module registered them, which the file does not record:
    those are filed under the parameters' paths in name order, provisionally; the lora variant takes,
    for each parameter, the one wrapper whose factors fit its tensor (`_lora_params.parameter_delta`).
    A module `target_modules` (`layers`) names, with one LoRA, is a layer's LoRA, as PEFT matches them: the
    list's names (the path or its end) or the pattern (the whole path)."""
    from adaptkit.plugin import matches_target  # (the module plane's matcher: it imports torch)

    owners: dict[str, list[str]] = {}
    for module in modules:
        owner = module
        while owner.endswith(".base_layer"):
            owner = owner.removesuffix(".base_layer")
        owners.setdefault(owner, []).append(module)
    found = {}
    for owner, wrappers in owners.items():
        if len(wrappers) == 1 and matches_target(owner, layers or ()):
            found[owner] = modules[owner]
            continue
        keys = {t: f"{owner}.{t.rpartition('.')[2]}" for t in targets}  # <module>.<parameter name>
        hits = {t: key.rpartition(".")[2] for t, key in keys.items() if key == t or key.endswith(f".{t}")}
        names = sorted(set(hits.values()))
        named = sorted({name for t, name in hits.items() if "." in t})
        if len(names) != len(wrappers) and len(named) == len(wrappers):
            # A bare target (`gate_up_proj`) matches a parameter of that name in any module, a dotted one
            # (`gate.weight`) only in a module of that name: where the module's wrappers are as many as its
            # dotted matches, those are its parameters (PEFT's all-linear on a transformers 5 MoE targets
            # `gate.weight`, `gate_up_proj`, `down_proj`: the router `mlp.gate` holds one wrapper, `weight`).
            names = named
        if not names:
            found.update({m: modules[m] for m in wrappers})
        elif len(names) != len(wrappers):
            raise AdaptkitError(f"{where}: target_parameters names {len(names)} parameters of '{owner}' "
                                f"({', '.join(names)}) but it holds {len(wrappers)} LoRA(s); which is whose is unknown")
        else:
            found.update({f"{owner}.{name}": modules[m] for name, m in zip(names, sorted(wrappers))})
    return found
