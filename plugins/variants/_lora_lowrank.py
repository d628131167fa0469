"""LoRA's low-rank forms, for adapter-to-adapter merges and lossless conversion (a mixin of
`lora.LoRA`, kept apart so each file stays small): the factors (A, B, s) of a module, the module
as stored, its layout, and writing factors back as a PEFT LoRA folder."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from adaptkit.plugin import AdapterFiles, AdaptkitError

from ._lora_params import check_lowrank_form

if TYPE_CHECKING:
    import torch


def conv_product(module: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """B·A of a convolution module (A r × in × *kernel, B out × r × 1…) shaped as its kernel,
    out × in × *kernel: the flattened kernels multiplied (PEFT's get_delta_weight)."""
    if b.dim() != a.dim() or any(k != 1 for k in b.shape[2:]):
        raise AdaptkitError(f"{module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not a conv LoRA "
                            "(B is a 1×… kernel)")
    if b.shape[1] != a.shape[0]:  # PEFT's B then has groups = r / B's inputs
        raise AdaptkitError(f"{module}: conv LoRA with groups={a.shape[0] // b.shape[1]} cannot be merged: B·A mixes "
                            "channels across groups, which the grouped kernel cannot hold (PEFT refuses too)")
    return (b.flatten(1) @ a.flatten(1)).view(b.shape[0], *a.shape[1:])


def tucker_down(module: str, mid: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """LyCORIS's Tucker LoCon (`use_tucker`): a core `lora_mid` (r × r × *kernel) between a 1×1 down
    (r × in × 1…) and up (out × r × 1…); ΔW = s · einsum("i j …, i p, j c -> p c …", mid, up, down)
    (`functional.general.rebuild_tucker`) = s · up ⊛ A' with A'[i, c, …] = Σ_j mid[i, j, …]·down[j, c]:
    the plain conv LoRA A' (r × in × *kernel) this returns."""
    import torch

    if mid.dim() < 3 or mid.shape[:2] != (down.shape[0], down.shape[0]) or any(k != 1 for k in down.shape[2:]):
        raise AdaptkitError(f"{module}: lora_mid {tuple(mid.shape)} and lora_down {tuple(down.shape)} are not a "
                            "Tucker LoCon (an r × r × kernel core after a 1×1 down)")
    return torch.einsum("ij...,jc->ic...", mid, down.flatten(1))


class LowRankForms:
    """Needs `_factors(roles)`, `scaling(adapter, module)` and `module_alpha(adapter, module)`."""

    def factors(self, adapter: AdapterFiles, module: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A, B, s) in float32 with ΔW = s·B·A (A r × in, B out × r), before the transpose that
        `factor_layout` reports. DoRA modules have no such form: W' = m ⊙ (W + s·B·A) / ‖·‖_row."""
        roles = adapter.modules[module]
        check_lowrank_form(adapter.config, module)
        if "lora_magnitude_vector" in roles:
            raise AdaptkitError(f"{module}: a DoRA module rescales W + s·B·A by a learned magnitude, so its ΔW is not "
                                "low-rank and concatenation cannot be exact; use another merge method with a base model")
        a_role, b_role, _ = self._factors(roles)
        a = adapter.tensor(module, a_role).float()
        b = adapter.tensor(module, b_role).float()
        if a.dim() != 2 or b.dim() != 2:  # conversions take the kernel's ΔW (`delta`) instead
            raise AdaptkitError(f"{module}: a conv LoRA's factors are kernels (A {tuple(a.shape)}), not r × in "
                                "matrices; concatenating them is not supported")
        return a, b, self.scaling(adapter, module)

    def lowrank_module(self, adapter: AdapterFiles, module: str):
        """The module as stored, for lossless conversion: A, B untouched (convolution kernels too) and
        its exact alpha (a bias on B is the converter's: see `delta_bias`). DoRA modules have no such form."""
        from adaptkit.plugin import LowRankModule

        roles = adapter.modules[module]
        check_lowrank_form(adapter.config, module)
        extra = set(roles) - {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_B_bias"}
        if extra:  # DoRA's magnitude, a subclass's own tensors: not the plain product
            raise AdaptkitError(f"{module}: {', '.join(sorted(extra))} make it more than a plain low-rank product")
        a_role, b_role, _ = self._factors(roles)
        a_shape, b_shape = adapter.shape(module, a_role), adapter.shape(module, b_role)
        if len(a_shape) > 2 and b_shape[1] != a_shape[0]:  # B grouped: no ΔW = B·A (see `conv_product`)
            raise AdaptkitError(f"{module}: conv LoRA with groups={a_shape[0] // b_shape[1]} has no plain low-rank form "
                                "(B·A mixes channels across groups); it runs live only")
        return LowRankModule(adapter.tensor(module, a_role), adapter.tensor(module, b_role),
                             float(self.module_alpha(adapter, module)), **self.factor_layout(adapter, module))

    def factor_layout(self, adapter: AdapterFiles, module: str) -> dict[str, bool]:
        """`embedding`: A is r × num_embeddings; `transposed`: the base weight is (s·B·A)ᵀ
        (embeddings, and `Conv1D` layers with `fan_in_fan_out`)."""
        roles = adapter.modules[module]  # trainable tokens (`_lora_tokens`) are rows of an embedding too
        embedding = "trainable_tokens_delta" in roles or self._factors(roles)[2]
        return {"embedding": embedding, "transposed": embedding or adapter.transposed.get(module, False)}

    def write_lowrank(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], layouts: dict[str, dict[str, bool]],
                      template: dict[str, Any], out_dir) -> list:
        """Write an adapter in the default format (a PEFT LoRA folder) with ΔW = B·A per module: scale 1, so
        lora_alpha = rank per module (`rank_pattern`/`alpha_pattern` where ranks differ), no rsLoRA, no DoRA.
        `template` is an input's config (base model, task type); `layouts` come from `factor_layout`."""
        from adaptkit.plugin import LowRankAdapter, LowRankModule, registry

        modules = {m: LowRankModule(a, b, float(a.shape[0]), **layouts[m]) for m, (a, b) in factors.items()}
        keep = {k: template[k] for k in ("base_model_name_or_path", "task_type", "revision") if k in template}
        return registry.get("format", registry.default("format")).write(LowRankAdapter(modules, {}, keep), out_dir)
