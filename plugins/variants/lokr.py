"""LoKr: a Kronecker product of two small factors (LyCORIS, Yeh et al. 2024, arXiv 2309.14859; as PEFT's LoKr).

A layer's dimensions are split, out = a·b and in = c·d (`decompose_factor`: PEFT's and LyCORIS's
`factorization`, a ≤ b, c ≤ d, the pair nearest √dim or with a = factor), and

    ΔW = alpha / r · W1 ⊗ W2,      W1 a × c,   W2 b × d (× kh × kw for conv layers)

W2 is low-rank, lokr_w2_a (b × r) · lokr_w2_b (r × d·kh·kw), when r < max(b, d) / 2, else stored full
(lokr_w2); with `use_effective_conv2d` and a kernel above 1, a low-rank W2 is a Tucker core instead
(lokr_t2 r × r × kh × kw, lokr_w2_a r × b, lokr_w2_b r × d). W1 is full (lokr_w1) unless `decompose_both`
and r < max(a, c) / 2 (lokr_w1_a · lokr_w1_b). For conv layers W1 gets unit kernel dims, so the product
is (a·b) × (c·d) × kh × kw, except in PEFT's own layout for nn.Conv1d with a full 3-d W2 (torch.kron puts the
unit dim in front: `_lycoris_math.kronecker`), which PEFT files and live adapters follow and LyCORIS files
do not. `rank_dropout_scale` rescales the rows kept by rank dropout.
`init_weights`: true starts W1 at 0 (ΔW = 0), "lycoris" starts W2 (or lokr_w2_b) at 0 instead, false
draws every factor (Kaiming-uniform), as PEFT. Files: PEFT's LOKR folders and LyCORIS/kohya single files
(`lokr_w1` …, `alpha`, `dora_scale`; the kohya format). Converting to LoRA, and merging adapters into one,
goes by SVD; a conv module with a low-rank W2 and no Tucker core stores its kernel flattened, so give the
base model there (as for LoHa).
"""
from __future__ import annotations

from typing import Any

from adaptkit.plugin import AdaptkitError
from adaptkit.plugin import validate as v

from ._lycoris import LycorisVariant, math


class LoKr(LycorisVariant):
    """LoKr: ΔW = alpha/r · W1 ⊗ W2, each factor full or low-rank (LyCORIS, arXiv 2309.14859)."""

    name = "lokr"
    peft_type = "LOKR"
    roles = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    tucker_role = "lokr_t2"
    extra_types = {"decompose_both": v.flag, "decompose_factor": v.integer, "rank_dropout_scale": v.flag,
                   "init_weights": v.either(v.flag, v.choice("lycoris"), must="true, false or 'lycoris'")}
    extra_defaults = {"decompose_both": False, "decompose_factor": -1, "rank_dropout_scale": False}

    def check_roles(self, roles, module: str) -> None:
        w1 = ("lokr_w1" in roles) + ({"lokr_w1_a", "lokr_w1_b"} <= set(roles))
        w2 = ("lokr_w2" in roles) + ({"lokr_w2_a", "lokr_w2_b"} <= set(roles))
        if w1 != 1 or w2 != 1 or ("lokr_t2" in roles and "lokr_w2" in roles):
            raise AdaptkitError(f"{module}: LoKr module has tensors {sorted(roles)}; it needs W1 (lokr_w1, or lokr_w1_a "
                                "and lokr_w1_b) and W2 (lokr_w2, or lokr_w2_a and lokr_w2_b, with lokr_t2 for Tucker)")

    def product(self, p, lycoris: bool = False) -> Any:
        """W1 ⊗ W2, unscaled (`_lycoris_math.kronecker`): PEFT's layout, LyCORIS's for its own files."""
        return math().kronecker(p, peft=not lycoris)

    def flat_kernel(self, adapter, module: str) -> bool:
        """PEFT splits a Linear layer's `in` as (c, d) = factorization(in, decompose_factor), so W1's c columns and
        W2's d make a pair it gives back; a conv's flattened W2 (d·kh·kw columns) breaks the pair."""
        roles = adapter.modules[module]
        if adapter.format != "peft" or "lokr_t2" in roles:
            return False
        w1 = adapter.shape(module, "lokr_w1" if "lokr_w1" in roles else "lokr_w1_b")
        w2 = adapter.shape(module, "lokr_w2" if "lokr_w2" in roles else "lokr_w2_b")
        factor = int(adapter.config.get("decompose_factor") or -1)
        return len(w2) == 2 and math().factorization(w1[1] * w2[1], factor) != (w1[1], w2[1])

    def layout_of(self, adapter) -> dict[str, Any]:
        """Tucker cores and a low-rank W1 (`decompose_both`) as stored; LyCORIS's full 3-d W2 (nn.Conv1d) is
        refused on a live model, which runs PEFT's layout (`_lycoris_math.kronecker`)."""
        for module, roles in adapter.modules.items():
            if adapter.format == "kohya" and "lokr_w2" in roles and len(adapter.shape(module, "lokr_w2")) == 3:
                raise AdaptkitError(f"{module}: a LyCORIS LoKr on a Conv1d with a full lokr_w2 is merged by LyCORIS's "
                                    "formula but cannot run on a live model (which follows PEFT's layout); merge it")
        return {**super().layout_of(adapter),
                "decompose_both": any("lokr_w1_a" in roles for roles in adapter.modules.values())}

    def rescales(self, config: dict[str, Any]) -> bool:
        return bool(config["rank_dropout_scale"])

    def layer_settings(self, config: dict[str, Any]) -> dict[str, Any]:
        factor = config["decompose_factor"]
        if isinstance(factor, bool) or not isinstance(factor, int) or (factor < 1 and factor != -1):
            raise AdaptkitError(f"lokr decompose_factor must be a positive integer or -1, got {factor!r}")
        return {"decompose_both": bool(config["decompose_both"]), "factor": factor}

    def initial(self, settings: dict[str, Any]) -> dict[str, Any]:
        """PEFT's choice of full / low-rank / Tucker factors and its initialization (`LoKrLayer.update_layer`)."""
        m = math()
        kaiming, r, (n_out, n_in, *kernel) = m.kaiming, settings["r"], settings["shape"]
        (a, b), (c, d) = m.factorization(n_out, settings["factor"]), m.factorization(n_in, settings["factor"])
        found = {"lokr_w1": kaiming(a, c)} if not (settings["decompose_both"] and r < max(a, c) / 2) else \
            {"lokr_w1_a": kaiming(a, r), "lokr_w1_b": kaiming(r, c)}
        if r >= max(b, d) / 2:
            found["lokr_w2"] = kaiming(b, d, *kernel)
        elif settings["tucker"]:
            core = (r, r, *kernel, *[1] * (2 - len(kernel)))  # PEFT's Conv1d cores are r × r × k × 1
            found |= {"lokr_t2": kaiming(*core), "lokr_w2_a": kaiming(r, b), "lokr_w2_b": kaiming(r, d)}
        else:
            width = d
            for k in kernel:
                width *= k
            found |= {"lokr_w2_a": kaiming(b, r), "lokr_w2_b": kaiming(r, width)}
        init = settings["init"]
        if init is True:  # ΔW = 0 at the start: W1 (or its first factor) zero
            found["lokr_w1" if "lokr_w1" in found else "lokr_w1_a"].zero_()
        elif init == "lycoris":  # LyCORIS's way: W2 (or its second factor) zero
            found["lokr_w2" if "lokr_w2" in found else "lokr_w2_b"].zero_()
        return found


LOKR = LoKr()
