"""LoRA's low-rank forms, for adapter-to-adapter merges and lossless conversion (a mixin of
`lora.LoRA`, kept apart so each file stays small): the factors (A, B, s) of a module, the module
as stored, its layout, and writing factors back as a PEFT LoRA folder."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from adaptkit.plugin import AdapterFiles, AdaptkitError

if TYPE_CHECKING:
    import torch


class LowRankForms:
    """Needs `_factors(roles)`, `scaling(adapter, module)` and `module_alpha(adapter, module)`."""

    def factors(self, adapter: AdapterFiles, module: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A, B, s) in float32 with ΔW = s·B·A (A r × in, B out × r), before the transpose that
        `factor_layout` reports. DoRA modules have no such form: W' = m ⊙ (W + s·B·A) / ‖·‖_row."""
        roles = adapter.modules[module]
        if "lora_magnitude_vector" in roles:
            raise AdaptkitError(f"{module}: a DoRA module rescales W + s·B·A by a learned magnitude, so its ΔW is not "
                                "low-rank and concatenation cannot be exact; use another merge method with a base model")
        a_role, b_role, _ = self._factors(roles)
        a = adapter.tensor(module, a_role).float()
        b = adapter.tensor(module, b_role).float()
        if a.dim() != 2 or b.dim() != 2:
            raise AdaptkitError(f"{module}: LoRA on convolution layers is not supported yet (A is {tuple(a.shape)})")
        return a, b, self.scaling(adapter, module)

    def lowrank_module(self, adapter: AdapterFiles, module: str):
        """The module as stored, for lossless conversion: A, B untouched (convolution kernels too) and
        its exact alpha (a bias on B is the converter's: see `delta_bias`). DoRA modules have no such form."""
        from adaptkit.plugin import LowRankModule

        roles = adapter.modules[module]
        extra = set(roles) - {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_B_bias"}
        if extra:  # DoRA's magnitude, a subclass's own tensors: not the plain product
            raise AdaptkitError(f"{module}: {', '.join(sorted(extra))} make it more than a plain low-rank product")
        a_role, b_role, _ = self._factors(roles)
        return LowRankModule(adapter.tensor(module, a_role), adapter.tensor(module, b_role),
                             float(self.module_alpha(adapter, module)), **self.factor_layout(adapter, module))

    def factor_layout(self, adapter: AdapterFiles, module: str) -> dict[str, bool]:
        """`embedding`: A is r × num_embeddings; `transposed`: the base weight is (s·B·A)ᵀ
        (embeddings, and `Conv1D` layers with `fan_in_fan_out`)."""
        embedding = self._factors(adapter.modules[module])[2]
        return {"embedding": embedding, "transposed": embedding or bool(adapter.config.get("fan_in_fan_out"))}

    def write_lowrank(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], layouts: dict[str, dict[str, bool]],
                      template: dict[str, Any], out_dir) -> list:
        """Write an adapter in the default format (a PEFT LoRA folder) with ΔW = B·A per module: scale 1, so
        lora_alpha = rank per module (`rank_pattern`/`alpha_pattern` where ranks differ), no rsLoRA, no DoRA.
        `template` is an input's config (base model, task type); `layouts` come from `factor_layout`."""
        from adaptkit.plugin import LowRankAdapter, LowRankModule, registry

        modules = {m: LowRankModule(a, b, float(a.shape[0]), **layouts[m]) for m, (a, b) in factors.items()}
        keep = {k: template[k] for k in ("base_model_name_or_path", "task_type", "revision") if k in template}
        return registry.get("format", registry.default("format")).write(LowRankAdapter(modules, {}, keep), out_dir)
