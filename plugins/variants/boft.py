"""BOFT: orthogonal fine-tuning by butterfly factorization (Liu et al. 2024, "Parameter-Efficient
Orthogonal Finetuning via Butterfly Factorization", arXiv 2311.06243).

OFT (plugins/variants/oft.py) with a denser orthogonal matrix at the same cost: m = `boft_n_butterfly_factor`
factors, each block-diagonal with D = `boft_block_num` orthogonal b × b blocks (D·b = d, the layer's input
features; a Conv2d's channels·kh·kw), conjugated by a block butterfly permutation P_i, and a learned
per-output scale s:

    B_ij = (I − Q_ij)(I + Q_ij)⁻¹,  Q_ij = (R_ij − R_ijᵀ)/2      (R the stored boft_R, m × D × b × b)
    M    = P_{m−1}·diag(B_{m−1})·P_{m−1}ᵀ ⋯ P_0·diag(B_0)·P_0ᵀ   (P_0 = I; P_i regroups the indices so that
                                                                 factor i mixes what 2^i blocks of factor 0 held)
    y    = s ⊙ (W·(x·M)ᵀ) + b,   merged  W' = diag(s)·W·Mᵀ,  ΔW = diag(s)·W·Mᵀ − W   (the bias stays)

ΔW depends on the base weight. `boft_dropout` turns ⌊p·D⌋ blocks of one random factor into I while
training. Exactly one of `boft_block_size` and `boft_block_num` is given (PEFT's checks: the other follows
from d; with m > 1 both even and d divisible by b·2^(m−1)). Files: PEFT's BOFT layout, `<module>.boft_R`
(m × D × b × b) and `<module>.boft_s` (out × 1; a Conv2d's 1 × out). PEFT without its CUDA extension
builds one factor whatever the config asks (and saves that), so the stored boft_R, not the config, says m.
Refused by name: `bias` other than "none" (PEFT's BOFT files do not hold the biases it trains), GPT-2
Conv1D, embeddings, nn.Conv1d/Conv3d and grouped convolutions (PEFT's BOFT has none of them).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from adaptkit.plugin import AdapterFiles, AdaptkitError, registry
from adaptkit.plugin import validate as v

from . import _orthogonal as orth

if TYPE_CHECKING:
    import torch


def blocks_of(dim: int, size: int, num: int, factors: int, path: str) -> tuple[int, int]:
    """(D, b) with D·b = dim from exactly one of them, refused where PEFT refuses it."""
    if (size == 0) == (num == 0):
        raise AdaptkitError(f"BOFT needs exactly one of boft_block_size ({size}) and boft_block_num ({num}) non-zero")
    given, name = (num, "boft_block_num") if size == 0 else (size, "boft_block_size")
    span = 2 ** (factors - 1)
    if dim % given or (size and dim % (size * span)) or (num and num % span):
        raise AdaptkitError(f"{path}: {name} {given} with boft_n_butterfly_factor {factors} does not fit its {dim} "
                            f"features (they must split into blocks, {span} per butterfly group)")
    num, size = (num, dim // num) if size == 0 else (dim // size, size)
    if factors > 1 and (num % 2 or size % 2):
        raise AdaptkitError(f"{path}: with boft_n_butterfly_factor {factors}, BOFT needs an even block number and size "
                            f"(got {num} blocks of {size})")
    return num, size


def butterfly(stored: torch.Tensor, dropout: float = 0.0) -> torch.Tensor:
    """M (d × d, float32) from boft_R (m × D × b × b); `dropout` > 0 (training) drops blocks of one factor."""
    import torch

    m, count, size, _ = stored.shape
    raw = stored.float().reshape(m * count, size, size)
    blocks = orth.cayley(0.5 * (raw - raw.transpose(1, 2))).reshape(m, count, size, size)
    if dropout:
        pick = int(torch.randint(0, m, (1,)))
        blocks = torch.cat([blocks[:pick], orth.drop_blocks(blocks[pick], dropout)[None], blocks[pick + 1:]])
    dim = count * size
    total = torch.eye(dim, device=stored.device)
    for i in range(m):
        perm = torch.tensor(orth.butterfly_perm(dim, count // 2 ** i, size // 2, m), device=stored.device)
        total = orth.block_diagonal(blocks[i], count)[perm][:, perm] @ total
    return total


def scaled_rotation(weight: torch.Tensor, m: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """diag(s)·W·Mᵀ, W's trailing dims flattened to M's size."""
    turned = orth.rotated(weight, m)
    return turned * scale.reshape(-1, *[1] * (weight.dim() - 1)).to(turned.dtype)


class BOFTVariant:
    """BOFT: W' = diag(s)·W·Mᵀ, M a product of butterfly-permuted orthogonal blocks (Liu et al. 2024, arXiv 2311.06243)."""

    name = "boft"
    param_names = ("boft_R", "boft_s")
    config_keys = frozenset({"boft_block_size", "boft_block_num", "boft_n_butterfly_factor", "boft_dropout",
                             "fan_in_fan_out", "bias", "init_weights"})
    config_types = {"boft_block_size": v.count, "boft_block_num": v.count, "boft_n_butterfly_factor": v.positive_int,
                    "boft_dropout": v.fraction, "fan_in_fan_out": v.optional(v.flag),
                    "bias": v.choice("none", "all", "boft_only"), "init_weights": v.flag}
    defaults = {"boft_block_size": 4, "boft_block_num": 0, "boft_n_butterfly_factor": 1, "boft_dropout": 0.0,
                "bias": "none", "init_weights": True}
    inspect_rows = ("block_size", "butterfly_factors")

    # -- tensor plane --------------------------------------------------------------------------
    def check_files(self, adapter: AdapterFiles) -> None:
        for module, roles in adapter.modules.items():
            shape = adapter.shape(module, "boft_R") if "boft_R" in roles else ()
            # m > 1 butterfly factors pair up blocks m − 1 times and split each block in halves.
            butterfly = len(shape) == 4 and (shape[0] == 1 or not shape[1] % 2 ** (shape[0] - 1) and not shape[2] % 2)
            if set(roles) != {"boft_R", "boft_s"} or len(shape) != 4 or shape[2] != shape[3] or not butterfly:
                raise AdaptkitError(f"{adapter.store.root}: BOFT module {module} has tensors {sorted(roles)}"
                                    f"{' with boft_R ' + str(tuple(shape)) if shape else ''}, not boft_R (m factors × "
                                    "D blocks × b × b; for m > 1, D a multiple of 2^(m−1) and b even) and boft_s")

    def delta(self, adapter: AdapterFiles, module: str, base: torch.Tensor | None = None) -> torch.Tensor:
        """ΔW in the stored layout: diag(s)·W·Mᵀ − W (a Conv2d's filter flattened)."""
        if base is None:
            raise AdaptkitError(f"{module}: a BOFT adapter rotates and scales the base weight (ΔW = diag(s)·W·Mᵀ − W); "
                                "give the base model")
        stored, scale = adapter.tensor(module, "boft_R"), adapter.tensor(module, "boft_s").float()
        w = base.float()
        dim = w[0].numel()
        if stored.shape[1] * stored.shape[2] != dim or scale.numel() != w.shape[0]:
            raise AdaptkitError(f"{module}: BOFT boft_R {tuple(stored.shape)} and boft_s {tuple(scale.shape)} do not fit "
                                f"a weight of shape {tuple(w.shape)}; is the adapter for a different base model?")
        return scaled_rotation(w, butterfly(stored), scale) - w

    def factor_layout(self, adapter: AdapterFiles, module: str) -> dict[str, bool]:
        return {"embedding": False, "transposed": False}

    def write_lowrank(self, factors, layouts, template: dict[str, Any], out_dir) -> list:
        """Merged BOFT adapters (ΔW re-factored by SVD) are no rotation: a plain adapter of the canonical low-rank variant."""
        return registry.get("variant", registry.default("variant")).write_lowrank(factors, layouts, template, out_dir)

    def describe(self, adapter: AdapterFiles) -> dict[str, Any]:
        modules = {m: dict(zip(("butterfly_factors", "blocks", "block_size"), adapter.shape(m, "boft_R")[:3]))
                   for m in sorted(adapter.modules)}
        sizes = sorted({m["block_size"] for m in modules.values()})
        factors = sorted({m["butterfly_factors"] for m in modules.values()})
        ranks = sorted({m["blocks"] for m in modules.values()})
        return {"rank": ranks[0] if len(ranks) == 1 else None, "ranks": ranks,
                "block_size": sizes[0] if len(sizes) == 1 else sizes,
                "butterfly_factors": factors[0] if len(factors) == 1 else factors, "modules": modules}

    # -- module plane --------------------------------------------------------------------------
    def settings(self, config: dict[str, Any], path: str, target) -> dict[str, Any]:
        kind, dim = orth.features(target, "BOFT", ("linear", "conv2d"), path)
        if config["bias"] != "none":
            raise AdaptkitError(f"BOFT bias={config['bias']!r} trains the layers' biases, which PEFT's BOFT files do not "
                                "hold; use bias='none' (and modules_to_save for a trained layer)")
        factors = config["boft_n_butterfly_factor"]
        count, size = blocks_of(dim, config["boft_block_size"], config["boft_block_num"], factors, path)
        return {"kind": kind, "factors": factors, "count": count, "size": size,
                "dropout": float(config["boft_dropout"]), "init_weights": config["init_weights"]}

    def create(self, target, settings, weight, shared):
        import torch
        from torch import nn

        s = settings
        rot = torch.zeros(s["factors"], s["count"], s["size"], s["size"])
        scale = torch.ones((target.out_features, 1) if s["kind"] == "linear" else (1, target.out_features))
        if not s["init_weights"]:
            rot, scale = torch.randn_like(rot) * 0.1, 1 + torch.randn_like(scale) * 0.1
        return nn.ParameterDict({"boft_R": nn.Parameter(rot.to(weight.device)),
                                 "boft_s": nn.Parameter(scale.to(weight.device))})

    def _matrix(self, branch) -> torch.Tensor:
        return butterfly(branch.params["boft_R"], branch.settings["dropout"] if branch.training else 0.0)

    def transform_input(self, branch, x: torch.Tensor) -> torch.Tensor:
        """A linear layer's input x ↦ x·M (PEFT's order); a Conv2d's filter turns in `forward`."""
        if branch.settings["kind"] != "linear":
            return x
        m = self._matrix(branch)
        return (x.to(m.dtype) @ m).to(x.dtype)

    def forward(self, branch, base_layer, x, result):
        scale = branch.params["boft_s"].reshape(-1)
        if branch.settings["kind"] == "linear":  # (W·x·M) ⊙ s + b: the bias unscaled
            bias = base_layer.bias
            core = result if bias is None else result - bias
            out = core * scale.to(result.dtype)
            return out if bias is None else out + bias
        w = base_layer.weight.float()
        change = scaled_rotation(w, self._matrix(branch), scale) - w
        return result + base_layer._conv_forward(x, change.to(x.dtype), None)

    def weight_delta(self, branch, weight: torch.Tensor) -> torch.Tensor:
        """ΔW in math layout: diag(s)·W·Mᵀ − W (out × in, or a 4-d filter)."""
        return scaled_rotation(weight, butterfly(branch.params["boft_R"]), branch.params["boft_s"].float()) - weight

    def delta_needs_base(self, branch) -> bool:
        return True

    def stored_key(self, role: str, target) -> str:
        return role

    def file_config(self, config: dict[str, Any], settings: dict[str, dict], transposed: bool) -> dict[str, Any]:
        return {"peft_type": "BOFT", "fan_in_fan_out": False, **{k: config[k] for k in self.defaults}}

    def config_from_file(self, adapter: AdapterFiles) -> dict[str, Any]:
        """The config, with the butterfly factor count the stored boft_R holds (see the module docstring)."""
        found = {k: adapter.config.get(k, default) for k, default in self.defaults.items()}
        factors = {adapter.shape(m, "boft_R")[0] for m in adapter.modules}
        if len(factors) > 1:
            raise AdaptkitError(f"{adapter.store.root}: BOFT modules hold different butterfly factor counts "
                                f"{sorted(factors)}; one config cannot give them")
        return {**found, "boft_n_butterfly_factor": factors.pop()} if factors else found


BOFT = BOFTVariant()
