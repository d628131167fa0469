"""LoHa: a Hadamard product of two low-rank products (FedPara, Hyeon-Woo et al. 2022, arXiv 2108.06098;
as LyCORIS and PEFT's LoHa apply it to fine-tuning).

For a layer with weight W (out × in) and rank r:

    ΔW = alpha / r · (W1a·W1b) ⊙ (W2a·W2b),     W1a, W2a out × r,  W1b, W2b r × in

so the rank of ΔW reaches r² with the parameters of two rank-r LoRAs. Conv layers (weight out × in ×
kh × kw) flatten the kernel into the input side (W1b, W2b r × in·kh·kw), or, with
`use_effective_conv2d` and a kernel above 1×1, use Tucker cores T1, T2 (r × r × kh × kw) with W1a, W2a
r × out and W1b, W2b r × in: ΔW = alpha / r · (T1 ×₁ W1aᵀ ×₂ W1bᵀ) ⊙ (T2 ×₁ W2aᵀ ×₂ W2bᵀ)
(`_lycoris_math.tucker`). Files: PEFT's LOHA folders (`<module>.hada_w1_a` …, `hada_t1`, `hada_t2`) and
LyCORIS/kohya single files (`lora_unet_…​.hada_w1_a` …, `alpha`, `dora_scale`; the kohya format).
`init_weights` true starts W2b at 0 (ΔW = 0), false draws every factor (Kaiming-uniform), as PEFT.
On nn.Linear, nn.Conv1d and nn.Conv2d; not an exact low-rank product, so converting to LoRA, and merging
adapters into one, goes by SVD. A conv module without Tucker cores stores its kernel flattened, which only
the base weight can unflatten: give the base model there (`--base`, a recipe's `base_model`); without it
ΔW is out × in·kh·kw, a Linear layer's shape.
"""
from __future__ import annotations

from typing import Any

from adaptkit.plugin import AdaptkitError
from adaptkit.plugin import validate as v

from ._lycoris import LycorisVariant, math


class LoHa(LycorisVariant):
    """LoHa: ΔW = alpha/r · (W1a·W1b) ⊙ (W2a·W2b) (FedPara, arXiv 2108.06098)."""

    name = "loha"
    peft_type = "LOHA"
    roles = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
    tucker_role = "hada_t1"
    extra_types = {"init_weights": v.flag}

    def check_roles(self, roles, module: str) -> None:
        missing = sorted({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} - set(roles))
        if missing or ("hada_t1" in roles) != ("hada_t2" in roles):
            raise AdaptkitError(f"{module}: LoHa module has tensors {sorted(roles)}; it needs hada_w1_a, hada_w1_b, "
                                "hada_w2_a, hada_w2_b and either both Tucker cores hada_t1, hada_t2 or neither")

    def product(self, p, lycoris: bool = False) -> Any:
        """(W1a·W1b) ⊙ (W2a·W2b), unscaled (`_lycoris_math.hadamard`); PEFT and LyCORIS agree."""
        return math().hadamard(p)

    def initial(self, settings: dict[str, Any]) -> dict[str, Any]:
        """PEFT's shapes and initialization for the layer (`LoHaLayer.create_adapter_parameters`)."""
        kaiming, r, (n_out, n_in, *kernel) = math().kaiming, settings["r"], settings["shape"]
        if settings["tucker"]:
            core = (r, r, *kernel, *[1] * (2 - len(kernel)))  # PEFT's Conv1d cores are r × r × k × 1
            found = {"hada_w1_a": kaiming(r, n_out), "hada_w1_b": kaiming(r, n_in), "hada_t1": kaiming(*core),
                     "hada_w2_a": kaiming(r, n_out), "hada_w2_b": kaiming(r, n_in), "hada_t2": kaiming(*core)}
        else:
            width = n_in
            for k in kernel:
                width *= k
            found = {"hada_w1_a": kaiming(n_out, r), "hada_w1_b": kaiming(r, width),
                     "hada_w2_a": kaiming(n_out, r), "hada_w2_b": kaiming(r, width)}
        if settings["init"]:
            found["hada_w2_b"].zero_()  # ΔW = 0 at the start
        return found


LOHA = LoHa()
