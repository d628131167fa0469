"""(IA)³: learned vectors that rescale activations (Liu et al. 2022, arXiv 2205.05638).

Each targeted linear layer (W out × in, bias b) gets one vector l, initialized to ones:

    y = l ⊙ (W·x + b)          attention keys/values and other targets: the output is scaled
    y = W·(l ⊙ x) + b          `feedforward_modules`: the input is scaled

As in PEFT, the output scaling scales the bias too. Merged, the layer becomes W' = diag(l)·W,
b' = l ⊙ b, or W' = W·diag(l) (bias unchanged) for feed-forward layers, so

    ΔW = diag(l)·W − W   or   ΔW = W·diag(l) − W,      Δb = (l − 1) ⊙ b   or   0,

which depends on the base weight: merging into a model needs the base. Files are PEFT's IA3 layout:
`base_model.model.<module>.ia3_l`, shaped (out, 1), or (1, in) for feed-forward layers, whatever
the layer stores; GPT-2 `Conv1D` layers (`fan_in_fan_out`) store W as in × out, so l is transposed
against the stored weight. Config fields are PEFT's `IA3Config`: `target_modules` and
`feedforward_modules` (a list matched by path suffix — PEFT's `endswith`, no dot needed — or a
regex the whole path must match; both default to PEFT's table for the model type),
`fan_in_fan_out` (follows the layer), `init_ia3_weights` (ones; False draws l ~ N(0, 1)).

Convolutions (W out × in/g × *kernel, g groups) scale channels: l is 1 × C × 1… (C = out, or in
for feed-forward layers), and the merge scales each output's kernel by l_o, or each kernel's input
channel by the l of the channel it reads: W'[o, c] = W[o, c]·l[group(o)·in/g + c] (PEFT's).
"""
from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

from adaptkit.plugin import AdapterFiles, AdaptkitError
from adaptkit.plugin import validate as v

if TYPE_CHECKING:
    import torch

# PEFT's defaults by model type: target modules; the feed-forward ones are the last entry (mt5: none).
DEFAULT_TARGETS = {
    "t5": ["k", "v", "wo"], "mt5": ["k", "v", "wi_1"], "gpt2": ["c_attn", "mlp.c_proj"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"], "roberta": ["key", "value", "output.dense"],
    "opt": ["q_proj", "k_proj", "fc2"], "gptj": ["q_proj", "v_proj", "fc_out"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"], "gpt_neo": ["q_proj", "v_proj", "c_proj"],
    "bart": ["q_proj", "v_proj", "fc2"], "gpt_bigcode": ["c_attn", "mlp.c_proj"],
    "llama": ["k_proj", "v_proj", "down_proj"], "llama4": ["q_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"], "mixtral": ["k_proj", "v_proj", "w2"],
    "bert": ["key", "value", "output.dense"], "deberta-v2": ["key_proj", "value_proj", "output.dense"],
    "deberta": ["in_proj", "output.dense"], "falcon": ["query_key_value", "dense_4h_to_h"],
    "phi": ["q_proj", "v_proj", "fc2"], "gemma": ["q_proj", "v_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "down_proj"], "gemma3_text": ["q_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"], "qwen3": ["q_proj", "v_proj", "down_proj"],
}


def is_feedforward(spec: Any, path: str) -> bool:
    """PEFT's rule: a regex must match the whole path; a list entry only has to end it."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return any(path.endswith(key) for key in spec)


class IA3Variant:
    """(IA)³: learned vectors rescaling a layer's output, or its input for feed-forward layers."""

    name = "ia3"
    param_names = ("ia3_l",)
    config_keys = frozenset({"feedforward_modules", "fan_in_fan_out", "init_ia3_weights"})
    config_types = {"feedforward_modules": v.optional(v.targets), "fan_in_fan_out": v.optional(v.flag),
                    "init_ia3_weights": v.flag}
    defaults = {"feedforward_modules": None, "fan_in_fan_out": False, "init_ia3_weights": True}
    inspect_rows = ("fan_in_fan_out",)

    # -- tensor plane --------------------------------------------------------------------------
    def _vector(self, adapter: AdapterFiles, module: str, base: torch.Tensor | None) -> torch.Tensor:
        """l shaped to broadcast over the weight as stored (out, 1) / (1, in), transposed for Conv1D."""
        if base is None:
            raise AdaptkitError(f"{module}: an IA3 adapter rescales the base weight (ΔW = diag(l)·W − W); "
                                "give the base model")
        vec = adapter.tensor(module, "ia3_l").float()
        if base.dim() > 2:
            return self._conv_vector(adapter, module, vec, base)
        vec = vec.T if adapter.transposed.get(module) else vec
        rows, cols = base.shape[0], base.shape[-1]
        if base.dim() != 2 or tuple(vec.shape) not in ((rows, 1), (1, cols)):
            raise AdaptkitError(f"{module}: ia3_l has shape {tuple(vec.shape)}, which does not scale a weight of shape "
                                f"{tuple(base.shape)}; is the adapter for a different base model?")
        return vec

    def _conv_vector(self, adapter: AdapterFiles, module: str, vec: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        out, per_group = base.shape[:2]
        ff = self.feedforward(adapter, module)
        ones = (1,) * (base.dim() - 2)
        fits = vec.shape[2:] == ones and vec.shape[0] == 1 and (
            vec.shape[1] % per_group == 0 and out % (vec.shape[1] // per_group) == 0 if ff else vec.shape[1] == out)
        if vec.dim() != base.dim() or not fits:
            raise AdaptkitError(f"{module}: ia3_l has shape {tuple(vec.shape)}, which does not scale a convolution "
                                f"kernel of shape {tuple(base.shape)}; is the adapter for a different base model?")
        return conv_scale(vec, tuple(base.shape), ff)

    def feedforward(self, adapter: AdapterFiles, module: str) -> bool:
        spec = adapter.config.get("feedforward_modules")
        if spec is None:  # no config entry: the stored shape says it, (1, in) for feed-forward
            shape = adapter.shape(module, "ia3_l")
            return shape[0] == 1 and shape[-1] != 1
        return is_feedforward(spec, module)

    def delta(self, adapter: AdapterFiles, module: str, base: torch.Tensor | None = None) -> torch.Tensor:
        """ΔW in the stored layout: W ⊙ l − W, l broadcast along the rows or columns (PEFT's merge)."""
        w = None if base is None else base.float()
        return w * self._vector(adapter, module, w) - w

    def delta_bias(self, adapter: AdapterFiles, module: str, base: torch.Tensor | None = None) -> torch.Tensor | None:
        """Δb = (l − 1) ⊙ b where the output is scaled; None for feed-forward layers."""
        if base is None or self.feedforward(adapter, module):
            return None
        vec = adapter.tensor(module, "ia3_l").float().flatten()
        if vec.shape != base.shape:
            raise AdaptkitError(f"{module}: ia3_l has {vec.numel()} entries but the bias has {base.numel()}")
        return base.float() * vec - base.float()

    def describe(self, adapter: AdapterFiles) -> dict[str, Any]:
        modules = {m: {"feedforward": self.feedforward(adapter, m), "size": math.prod(adapter.shape(m, "ia3_l"))}
                   for m in sorted(adapter.modules)}
        return {"feedforward_modules": sorted(m for m, v in modules.items() if v["feedforward"]),
                "fan_in_fan_out": bool(adapter.config.get("fan_in_fan_out")), "modules": modules}

    # -- module plane --------------------------------------------------------------------------
    def prepare(self, model, config: dict[str, Any]) -> dict[str, Any]:
        """PEFT's checks and defaults: `feedforward_modules` must be a subset of `target_modules` when
        both are lists; either one not given comes from PEFT's table for the model type."""
        targets, ff = config["target_modules"], config["feedforward_modules"]
        if isinstance(ff, (list, tuple, set)) and isinstance(targets, (list, tuple, set)) and not set(ff) <= set(targets):
            raise AdaptkitError(f"feedforward_modules {sorted(ff)} must be a subset of target_modules {sorted(targets)}")
        if targets is None and config["modules_to_save"]:  # only whole modules (a loaded file)
            return {**config, "feedforward_modules": ff or []}
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        defaults = DEFAULT_TARGETS.get(model_type)
        config = dict(config)
        for key in ("target_modules", "feedforward_modules"):
            if config[key] is None:
                if defaults is None:
                    raise AdaptkitError(f"IA3 has no default {key} for model type {model_type!r}; give {key}=[...]"
                                        + (" ([] for none)" if key == "feedforward_modules" else ""))
                config[key] = list(defaults) if key == "target_modules" else defaults[-1:] * (model_type != "mt5")
        return config

    def settings(self, config: dict[str, Any], path: str, target) -> dict[str, Any]:
        if target.kind not in ("linear", "conv"):
            raise AdaptkitError(f"{path}: IA3 scales Linear, Conv1D and Conv1d/2d/3d layers; leave {target.kind} layers out of "
                                "target_modules")
        init = config["init_ia3_weights"]
        if not isinstance(init, bool):
            raise AdaptkitError(f"init_ia3_weights must be true or false, got {init!r}")
        return {"feedforward": is_feedforward(config["feedforward_modules"], path), "init": init}

    def create(self, target, settings, weight, shared):
        import torch
        from torch import nn

        shape = (1, target.in_features) if settings["feedforward"] else (target.out_features, 1)
        if target.kind == "conv":  # PEFT's 1 × C × 1…, broadcast over (batch, C, *spatial)
            shape = (1, shape[0] * shape[1], *(1,) * len(target.kernel))
        vec = torch.ones(shape) if settings["init"] else torch.randn(shape)
        return nn.ParameterDict({"ia3_l": nn.Parameter(vec.to(weight.device))})

    def transform_input(self, branch, x: torch.Tensor) -> torch.Tensor:
        if not branch.settings["feedforward"]:
            return x
        vec = branch.params["ia3_l"]
        return (x.to(vec.dtype) * (vec if branch.target.kind == "conv" else vec.flatten())).to(x.dtype)

    def forward(self, branch, base_layer, x, result):
        if branch.settings["feedforward"]:
            return result  # its input was scaled already (`transform_input`)
        vec = branch.params["ia3_l"]
        return (result * (vec if branch.target.kind == "conv" else vec.flatten())).to(result.dtype)

    def weight_delta(self, branch, weight: torch.Tensor) -> torch.Tensor:
        """ΔW (out × in): W·diag(l) − W for feed-forward layers, diag(l)·W − W otherwise."""
        vec = branch.params["ia3_l"].float()
        if branch.target.kind == "conv":
            vec = conv_scale(vec, tuple(weight.shape), branch.settings["feedforward"])
        return weight * vec - weight

    def bias_delta(self, branch, bias: torch.Tensor | None) -> torch.Tensor | None:
        if branch.settings["feedforward"] or bias is None:
            return None
        return bias * branch.params["ia3_l"].float().flatten() - bias

    def delta_needs_base(self, branch) -> bool:
        return True

    def stored_key(self, role: str, target) -> str:
        return role

    def file_config(self, config: dict[str, Any], settings: dict[str, dict], transposed: bool) -> dict[str, Any]:
        return {"peft_type": "IA3", "feedforward_modules": sorted(p for p, s in settings.items() if s["feedforward"]),
                "fan_in_fan_out": transposed, "init_ia3_weights": config["init_ia3_weights"]}

    def config_from_file(self, adapter: AdapterFiles) -> dict[str, Any]:
        return {"feedforward_modules": sorted(m for m in adapter.modules if self.feedforward(adapter, m)),
                "init_ia3_weights": bool(adapter.config.get("init_ia3_weights", True))}


def conv_scale(vec: torch.Tensor, shape: tuple[int, ...], feedforward: bool) -> torch.Tensor:
    """l (1 × C × 1…) shaped to scale a kernel of `shape` (out × in/g × *kernel): its rows (out × 1 × 1…),
    or, feed-forward, each group's kernels by that group's input channels (PEFT's _get_ia3_scaling_for_weight)."""
    if not feedforward:
        return vec.transpose(0, 1)
    out, per_group, rest = shape[0], shape[1], vec.shape[2:]
    groups = vec.shape[1] // per_group
    grouped = vec.reshape(groups, 1, per_group, *rest).expand(groups, out // groups, per_group, *rest)
    return grouped.reshape(out, per_group, *rest)


IA3 = IA3Variant()
