"""LoRA where PEFT puts it on more than a layer's `weight` (not a plugin; used by `lora.py`), and what
a live branch cannot hold (`refuse_live`); on a live model they run through `_lora_tensors.py`.

- `target_parameters` (PEFT's `ParamWrapper`): LoRA on an `nn.Parameter` itself, e.g. a MoE block's
  stacked expert weights. The PEFT reader names such a module by the parameter's path
  (`mlp.experts.gate_up_proj`), the base model's tensor. A 2-D parameter P (d₀ × d₁) gets
  ΔP = s·B·A with A r × d₁, B d₀ × r. A 3-D one (E experts, E × d₁ × d₂) stacks one rank-r pair
  per expert: A is (E·r) × in with expert e's rows at [e·r, (e+1)·r), B is out × (E·r) with
  expert e's columns at e, E+e, 2E+e, … (PEFT reshapes B to out × r × E). PEFT's default layout
  has in = d₂, out = d₁ and ΔP[e] = s·B_e·A_e; layers marked `is_transposed` have in = d₁,
  out = d₂ and ΔP[e] = (s·B_e·A_e)ᵀ. Which one a file holds shows in its shapes, except for square
  experts (d₁ = d₂): those take the layout of the base model's type (`AdapterFiles.settled`, e.g.
  gpt-oss's 2880 × 2880 `down_proj` is in × out) and are refused without one. A shape that fits only
  the layout the type does not have is refused too: the type's table would be wrong. The scaling uses r, the config's rank (`r` /
  `rank_pattern` on the parameter's path), not A's E·r rows. Several parameters of one module are
  nested wrappers whose order the file does not record (the reader files them provisionally): each
  parameter takes the one wrapper of its module whose factors fit its tensor, and a tensor that
  more than one would fit is refused, so a wrong pairing cannot pass.
- `nn.MultiheadAttention` (PEFT's `lora.MultiheadAttention`): one LoRA on the packed q/k/v
  projection `in_proj_weight` (3E × E), saved under the attention's own path, and one on
  `out_proj`, saved under `<attention>.base_layer.out_proj`; both take the attention's rank and
  alpha (PEFT looks them up by the attention's path). PEFT adds the out_proj ΔW twice, in its
  forward and in merge_and_unload alike (`merge` adds it, then calls out_proj's own `merge`, which
  adds it again; huggingface/peft PR #3774, open, would change that), so an adapter PEFT trained
  means W_out + 2·s·B·A, and merges so. A file from a PEFT newer than the last one known to do
  this may count it once: refused rather than guessed.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from adaptkit.plugin import AdaptkitError

from ..formats._lowrank import pattern_value

if TYPE_CHECKING:
    import torch

MHA_OUT = ".base_layer.out_proj"  # PEFT's path of a MultiheadAttention's out_proj LoRA
DOUBLED_OUT_PROJ = (0, 21, 2)  # the newest PEFT known to add that out_proj ΔW twice


def on_parameter(config: dict[str, Any], module: str) -> bool:
    """Whether `module` is a parameter PEFT's `target_parameters` adapts (the reader names it by its path)."""
    return any(module == t or module.endswith(f".{t}") for t in config.get("target_parameters") or ())


def lookup_path(module: str) -> str:
    """The path PEFT looks up a module's rank and alpha by: a MultiheadAttention's for its out_proj."""
    return module.removesuffix(MHA_OUT) if module.endswith(MHA_OUT) else module


def refuse_live(adapter) -> None:
    """What a live branch cannot hold, refused before loading: LyCORIS's Tucker LoCon (a third factor,
    `lora_mid`). (Parameters and MultiheadAttention load live through `_lora_tensors.py`.)"""
    tucker = sorted(m for m, roles in adapter.modules.items() if "lora_mid" in roles)
    if tucker:
        raise AdaptkitError(f"{tucker[0]}: a Tucker LoCon (lora_mid, {len(tucker)} module(s)) cannot be loaded onto a "
                            "live model; merge it into the base model instead (adaptkit merge)")


def check_lowrank_form(config: dict[str, Any], module: str) -> None:
    """A parameter's LoRA is no layer's LoRA: adapter outputs (which name layers) cannot hold it."""
    if on_parameter(config, module):
        raise AdaptkitError(f"{module}: a LoRA on a parameter (target_parameters) has no form in adaptkit's adapter "
                            "outputs; merge it into its base model instead")


def out_proj_factor(config: dict[str, Any], module: str) -> int:
    """2 for a MultiheadAttention's out_proj written by a PEFT that doubles it (see above), else 1."""
    if not module.endswith(MHA_OUT):
        return 1
    written = str(config.get("peft_version") or "")
    found = re.match(r"(\d+)\.(\d+)\.(\d+)", written)
    if written and (found is None or tuple(map(int, found.groups())) > DOUBLED_OUT_PROJ):
        raise AdaptkitError(f"{module}: a MultiheadAttention LoRA from PEFT {written}: PEFT up to "
                            f"{'.'.join(map(str, DOUBLED_OUT_PROJ))} adds out_proj's ΔW twice, later ones may not; "
                            "not supported")
    return 2


def parameter_rank(config: dict[str, Any], module: str) -> int:
    return int(pattern_value(config.get("rank_pattern"), module, config.get("r", 8)))


def _fits(a_shape, b_shape, rank: int, base_shape) -> tuple[bool, bool]:
    """(plain, flipped): whether factors A, B fit a parameter of `base_shape` at `rank` in PEFT's
    default layout (2-D parameters: theirs) and in the `is_transposed` one (3-D only)."""
    if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
        return False, False
    experts = base_shape[0] if len(base_shape) == 3 else 1
    if a_shape[0] != rank * experts or len(base_shape) not in (2, 3):
        return False, False
    d1, d2 = base_shape[-2:]
    return (a_shape[1], b_shape[0]) == (d2, d1), len(base_shape) == 3 and (a_shape[1], b_shape[0]) == (d1, d2)


def parameter_delta(adapter, module: str, scaling: float, rank: int, base: torch.Tensor | None) -> torch.Tensor:
    """ΔP of a parameter adapted through `target_parameters`, shaped like P, from the one LoRA of its
    module whose factors fit P (see the module docstring)."""
    import torch

    if base is None:
        raise AdaptkitError(f"{module}: a LoRA on a parameter (target_parameters) has a ΔW only against its base "
                            "tensor (it may stack experts); merge it into its base model instead (adaptkit merge)")
    a, b, plain = _fitting(adapter, module, rank, tuple(base.shape))
    a, b = a.float(), b.float()
    if base.dim() == 2:
        return scaling * (b @ a)
    a_e, b_e = _per_expert(a, b, rank, base.shape[0])
    update = scaling * torch.bmm(b_e, a_e)  # E × out × in
    return update if plain else update.transpose(1, 2)


def expert_delta(adapter, module: str, scaling: float, rank: int, shape: tuple[int, ...], expert: int) -> torch.Tensor:
    """ΔP[e] alone of a parameter of `shape` (E × d₁ × d₂) that stacks experts: s·B_e·A_e (`_per_expert`;
    transposed for `is_transposed`), as `parameter_delta` gives it (one expert's worth of memory, not the layer's)."""
    a, b, plain = _fitting(adapter, module, rank, shape)
    a_e, b_e = _per_expert(a, b, rank, shape[0])
    update = scaling * (b_e[expert].float() @ a_e[expert].float())  # (only this expert's factors converted)
    return update if plain else update.T


def _per_expert(a: torch.Tensor, b: torch.Tensor, rank: int, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of the experts' pairs, E × r × in and E × out × r: expert e's A rows e·r … (e+1)·r − 1, its B
    columns e, E+e, … (PEFT reshapes B to out × r × E)."""
    return a.reshape(experts, rank, a.shape[1]), b.reshape(b.shape[0], rank, experts).permute(2, 0, 1)


def _fitting(adapter, module: str, rank: int, shape: tuple[int, ...]):
    """(A, B, plain) of the one LoRA on parameters of the module's owner whose factors fit `shape`, as stored."""
    owner = module.rpartition(".")[0]
    siblings = [m for m in adapter.modules if on_parameter(adapter.config, m) and m.rpartition(".")[0] == owner]
    fitting = [m for m in siblings if any(_fits(adapter.shape(m, "lora_A"), adapter.shape(m, "lora_B"), rank, shape))]
    if len(fitting) != 1:
        raise AdaptkitError(f"{module}: {len(fitting) or 'none'} of the {len(siblings)} LoRA(s) on parameters of "
                            f"'{owner}' fit its tensor {list(shape)} at rank {rank}"
                            f"{'; which is its own is unknown' if fitting else ''}")
    a, b = adapter.tensor(fitting[0], "lora_A"), adapter.tensor(fitting[0], "lora_B")
    plain, flipped = _fits(a.shape, b.shape, rank, shape)
    if len(shape) == 3 and adapter.settled:  # the base model's type says how it stores its experts
        flip = bool(adapter.transposed.get(module))
        if not (flipped if flip else plain):
            raise AdaptkitError(f"{module}: its LoRA factors do not fit experts stored "
                                f"{'in × out (is_transposed)' if flip else 'out × in'}, as {adapter.settled} models "
                                "store them; not supported")
        return a, b, not flip
    if plain and flipped:
        raise AdaptkitError(f"{module}: square experts ({shape[1]} × {shape[2]}): the file does not say "
                            "whether PEFT saw them transposed (is_transposed), and the base model's config.json "
                            "names no model_type that would; not supported")
    return a, b, plain


class ParameterExperts:
    """`spec.ExpertDelta` of the LoRA variant: one expert's ΔP of a LoRA on parameters, at its module's scaling
    and rank (`expert_delta` above)."""

    def expert_delta(self, adapter, module: str, shape: tuple[int, ...], expert: int) -> torch.Tensor:
        if not on_parameter(adapter.config, module):
            raise AdaptkitError(f"{module}: not a LoRA on a parameter (target_parameters): it has no experts' ΔP")
        return expert_delta(adapter, module, self.scaling(adapter, module), self.module_rank(adapter, module),
                            shape, expert)
