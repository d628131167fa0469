"""LoRA on tensors a module reads itself, on a live model (not a plugin; used by `lora.py`): PEFT's
`lora.MultiheadAttention` and `ParamWrapper` (`target_parameters`). The math and the file layout are
in `_lora_params.py`; here the core's layer kind "tensors" runs the module with P + ΔP in place.

- An `nn.MultiheadAttention` (packed q/k/v, out_proj a Linear) is one layer with two parts: ΔW on
  `in_proj_weight` (roles `lora_A`, `lora_B`) and on `out_proj.weight` (roles `out_proj/lora_A`, …,
  saved as `<attention>.base_layer.out_proj.lora_A.weight`), both at the attention's rank and alpha.
  The out_proj part counts twice, as PEFT's forward and merge do (`_lora_params.out_proj_factor`).
- The parameters a config's `target_parameters` names are one layer per module that holds them, one
  part per parameter (roles `<name>/lora_A`, …) in the module's registration order, PEFT's nesting
  order: the k-th of n is saved under `<module>` + (n − 1 − k) × `.base_layer`. A 3-D parameter takes
  the module's `is_transposed` as PEFT does (kept in `Target.transposed`); which saved wrapper is
  whose is settled by the shapes, as for merges, and an ambiguous pairing is refused.
"""
from __future__ import annotations

import math
from typing import Any

from adaptkit.plugin import AdaptkitError

from ..formats._lowrank import pattern_value
from ._lora_params import MHA_OUT, _fits, on_parameter, out_proj_factor

OUT = "out_proj/"  # the role prefix of a MultiheadAttention's out_proj part
INITS = (True, False, "gaussian")


def attention_target(module) -> Any:
    """The tensors target of a MultiheadAttention PEFT can adapt (packed q/k/v, out_proj a Linear), else None."""
    from torch import nn

    from adaptkit.plugin import Target

    if not isinstance(module, nn.MultiheadAttention) or not module._qkv_same_embed_dim:
        return None
    if not isinstance(module.out_proj, nn.Linear):
        return None
    e = module.embed_dim
    return Target("tensors", e, e, False, tensors=(("in_proj_weight", (3 * e, e)), ("out_proj.weight", (e, e))))


def parameter_targets(model, config: dict[str, Any]) -> dict[str, Any]:
    """Owner module path -> tensors target for the parameters `target_parameters` names (PEFT's rule:
    `<module>.<name>` equals an entry or ends in `.<entry>`); an entry matching nothing is an error."""
    from adaptkit.plugin import Target

    wanted = config["target_parameters"]
    targets, used = {}, set()
    for path, module in model.named_modules():
        if "base_layer" in path.split("."):  # inside a layer adapters already wrap: taken at the wrapper
            continue
        inner = module._modules["base_layer"] if "branches" in module._modules else module
        names = [n for n, _ in inner.named_parameters(recurse=False)
                 if any(f"{path}.{n}" == t or f"{path}.{n}".endswith(f".{t}") for t in wanted)]
        used |= {t for n in names for t in wanted if f"{path}.{n}" == t or f"{path}.{n}".endswith(f".{t}")}
        if not names:
            continue
        shapes = tuple((n, tuple(getattr(inner, n).shape)) for n in names)
        for n, shape in shapes:
            if len(shape) not in (2, 3):
                raise AdaptkitError(f"{path}.{n}: LoRA on a {len(shape)}-D parameter; PEFT adapts 2-D and 3-D ones")
        targets[path] = Target("tensors", 0, 0, bool(getattr(inner, "is_transposed", False)), tensors=shapes)
        if inner is not module and module.target != targets[path]:
            raise AdaptkitError(f"{path}: already adapted on other tensors; an adapter here must target the same ones")
    missing = [t for t in config["target_parameters"] if t not in used]
    if missing:
        raise AdaptkitError(f"target_parameters {missing} match no parameter of this model")
    return targets


class OnTensors:
    """LoRA's hooks for the core's layer kind "tensors" (`capabilities.TensorTargets`, `Intervention`)."""

    def target_of(self, module) -> Any:
        """A layer's target as usual, or a MultiheadAttention's (its two parts)."""
        from adaptkit.plugin import Target

        return Target.of(module) or attention_target(module)

    def tensor_targets(self, model, config) -> dict[str, Any]:
        return parameter_targets(model, config) if config.get("target_parameters") else {}

    def tensor_deltas(self, branch, tensors) -> dict:
        return deltas(branch, tensors)

    def live_place(self, adapter, module: str, layers) -> tuple[str, str] | None:
        return live_place(adapter, module, layers)


def prepare(config: dict[str, Any]) -> dict[str, Any]:
    """A saved adapter lists its parameters and out_proj parts as modules: those are no target_modules."""
    targets = config["target_modules"]
    if not isinstance(targets, (list, tuple)):
        return config
    kept = [t for t in targets if not on_parameter(config, t) and not t.endswith(MHA_OUT)]
    return {**config, "target_modules": kept} if len(kept) != len(targets) else config


def settings(config: dict[str, Any], path: str, target) -> dict[str, Any]:
    """Per part (tensor): its role prefix, rank, scaling, experts and layout; what PEFT lacks here refused by name."""
    for key in ("use_dora", "lora_bias", "alora_invocation_tokens"):
        if config.get(key):
            raise AdaptkitError(f"{path}: {key} on a LoRA of tensors the module reads itself is not supported "
                                "(nor in PEFT)")
    if config["init_lora_weights"] not in INITS:
        raise AdaptkitError(f"{path}: init_lora_weights={config['init_lora_weights']!r} on a LoRA of tensors the "
                            "module reads itself is not supported; use true, false or 'gaussian'")
    attention = target.in_features > 0  # attention_target gives the width; parameter_targets 0
    if not 0 <= config["lora_dropout"] < 1 or (config["lora_dropout"] and not attention):
        raise AdaptkitError(f"{path}: lora_dropout must be in [0, 1) (0 on parameters, as in PEFT), "
                            f"got {config['lora_dropout']}")
    # PEFT runs an attention's LoRA through merged weights, so its lora_dropout never applies; nor here
    base = {"init": config["init_lora_weights"], "dropout": 0.0, "use_dora": False, "bias": False, "alora": None}
    parts = []
    for name, shape in target.tensors:
        key = path if attention else f"{path}.{name}"  # PEFT looks a parameter up by its own path
        r = int(pattern_value(config["rank_pattern"], key, config["r"]))
        alpha = float(pattern_value(config["alpha_pattern"], key, config["lora_alpha"]))
        if r < 1:
            raise AdaptkitError(f"{key}: rank must be at least 1, got {r}")
        scaling = alpha / math.sqrt(r) if config["use_rslora"] else alpha / r
        experts = shape[0] if len(shape) == 3 else 1
        if len(shape) == 3:  # PEFT: in = d₂, out = d₁, unless the module says is_transposed
            n_in, n_out = (shape[1], shape[2]) if target.transposed else (shape[2], shape[1])
        else:
            n_in, n_out = shape[1], shape[0]
        factor = 2 if attention and name == "out_proj.weight" else 1  # PEFT adds out_proj's ΔW twice
        prefix = ("" if name == "in_proj_weight" else OUT) if attention else f"{name}/"
        parts.append({"tensor": name, "prefix": prefix,
                      "r": r, "alpha": alpha, "scaling": scaling * factor, "experts": experts, "in": n_in,
                      "out": n_out, "flipped": len(shape) == 3 and target.transposed})
    return {**base, "parts": parts, "r": parts[0]["r"], "alpha": parts[0]["alpha"], "scaling": parts[0]["scaling"]}


def create(target, settings: dict[str, Any], weight, trainable_a: bool = True):
    """A (experts·r × in) and B (out × experts·r) per part, initialized as PEFT's `init_lora_weights`."""
    import torch
    from torch import nn

    params = nn.ParameterDict()
    for part in settings["parts"]:
        rows = part["experts"] * part["r"]
        a, b = torch.empty(rows, part["in"]), torch.empty(part["out"], rows)
        if settings["init"] == "gaussian":
            nn.init.normal_(a, std=1 / part["r"])
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        if settings["init"] is False:  # both random: non-trivial, for tests
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        else:
            nn.init.zeros_(b)
        params[part["prefix"] + "lora_A"] = nn.Parameter(a, requires_grad=trainable_a)
        params[part["prefix"] + "lora_B"] = nn.Parameter(b)
    return params


def deltas(branch, tensors) -> dict:
    """ΔP per part: s·B·A; 3-D, per expert e: s·B[:, e::E]·A[e·r:(e+1)·r], transposed if `flipped`."""
    import torch

    found = {}
    for part in branch.settings["parts"]:
        a, b = branch.params[part["prefix"] + "lora_A"].float(), branch.params[part["prefix"] + "lora_B"].float()
        if part["experts"] == 1:
            found[part["tensor"]] = part["scaling"] * (b @ a)
            continue
        n, r = part["experts"], part["r"]
        a_e = a.reshape(n, r, a.shape[1])
        b_e = b.reshape(b.shape[0], r, n).permute(2, 0, 1)
        update = part["scaling"] * torch.bmm(b_e, a_e)
        found[part["tensor"]] = update.transpose(1, 2) if part["flipped"] else update
    return found


def stored_key(role: str, target) -> str:
    """A part's file key below its layer: out_proj's under `base_layer.out_proj.`, the k-th of n parameters
    under (n − 1 − k) × `base_layer.` (PEFT nests the later ones outside)."""
    prefix, _, leaf = role.rpartition("/")
    if not prefix:
        return f"{leaf}.weight"
    if prefix == OUT.rstrip("/"):
        return f"base_layer.out_proj.{leaf}.weight"
    names = [n for n, _ in target.tensors]
    return "base_layer." * (len(names) - 1 - names.index(prefix)) + f"{leaf}.weight"


def by_module(settings: dict[str, dict]) -> dict[str, dict]:
    """Layer settings as the file names modules: each parameter under its own path (rank and alpha)."""
    found = {}
    for path, s in settings.items():
        parts = [p for p in s.get("parts", ()) if p["prefix"] not in ("", OUT)]
        if not parts:
            found[path] = s
        for p in parts:
            found[f"{path}.{p['tensor']}"] = {"r": p["r"], "scaling": p["scaling"], "parameter": True}
    return found


def file_config(settings: dict[str, dict]) -> dict[str, Any]:
    """target_parameters (and target_modules without them) where the adapter has parameters."""
    params = sorted(m for m, s in settings.items() if s.get("parameter"))
    if not params:
        return {}
    return {"target_parameters": params,
            "target_modules": sorted(m for m, s in settings.items() if not s.get("parameter") and not s.get("tokens"))}


def _owner(module: str, layers: dict[str, Any]) -> str:
    found = [p for p in layers
             if layers[p].tensors and (p == module or p.endswith("." + module) or module.endswith("." + p))]
    if len(found) != 1:
        raise AdaptkitError(f"adapter module '{module}' matches {len(found) or 'no'} modules of this model "
                            "whose tensors it can adapt")
    return found[0]


def live_place(adapter, module: str, layers: dict[str, Any]) -> tuple[str, str] | None:
    """(live layer, role prefix) of a saved out_proj part or parameter; None for every other module."""
    if module.endswith(MHA_OUT):
        out_proj_factor(adapter.config, module)  # a PEFT that may count it once: refused
        return _owner(module.removesuffix(MHA_OUT), layers), OUT
    if not on_parameter(adapter.config, module):
        return None
    owner = module.rpartition(".")[0]
    live = _owner(owner, layers)
    siblings = sorted(m for m in adapter.modules if on_parameter(adapter.config, m) and m.rpartition(".")[0] == owner)
    pairs = {}
    for m in siblings:  # which parameter each saved wrapper fits; a pairing that is not one-to-one is refused
        shapes = adapter.shape(m, "lora_A"), adapter.shape(m, "lora_B")
        pairs[m] = [n for n, shape in layers[live].tensors
                    if _fits(*shapes, int(pattern_value(adapter.config.get("rank_pattern"), f"{owner}.{n}",
                                                        adapter.config.get("r", 8))), shape)[
                        1 if len(shape) == 3 and layers[live].transposed else 0]]
    taken = [n for fits in pairs.values() for n in fits]
    if len(pairs[module]) != 1 or len(taken) != len(set(taken)):
        raise AdaptkitError(f"{module}: the LoRA(s) on parameters of '{owner}' do not pair one-to-one with its "
                            f"parameters {[n for n, _ in layers[live].tensors]} by shape")
    return live, f"{pairs[module][0]}/"
