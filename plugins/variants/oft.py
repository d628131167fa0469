"""OFT: orthogonal fine-tuning (Qiu et al. 2023, "Controlling Text-to-Image Diffusion by Orthogonal
Finetuning", arXiv 2306.07280).

A layer's d input features (nn.Linear: in_features; nn.Conv2d: its filter, channels·kh·kw; nn.Embedding:
the embedding dimension, rotating its output) are turned by a block-diagonal orthogonal R = diag(R_1, …, R_r),
r blocks of size b (r·b = d), each the Cayley transform of a skew-symmetric Q_i built from b(b−1)/2 free
entries (PEFT's sign: R_i = (I − Q_i)(I + Q_i)⁻¹; `use_cayley_neumann`: the series I + 2Q + 2Q² + … + Q^(t−1),
t = `num_cayley_neumann_terms`). PEFT runs y = W·(x·R)ᵀ + b, so merged

    W' = W·Rᵀ,   ΔW = W·Rᵀ − W          (a Conv2d's W flattened to out × d; an embedding table E' = E·R)

which depends on the base weight. `coft` (constrained OFT) keeps each ‖Q_i‖_F ≤ eps/√(blocks stored),
projecting the stored entries in place at every forward as PEFT does; `block_share` stores one block used r
times; `module_dropout` turns ⌊p·r⌋ random blocks into I while training (PEFT 0.21 builds this dropout but
never calls it; adaptkit applies it, in training only). Exactly one of `r` and `oft_block_size` is given; one
that does not divide d becomes PEFT's nearest divisor, with a warning, so a PEFT config gives PEFT's shapes.
Files: PEFT's OFT layout, `<module>.oft_R.weight` (blocks stored × b(b−1)/2), `oft_embedding_R.weight` for
embeddings. Refused by name: `bias` other than "none" (PEFT's OFT files do not hold the biases it trains),
GPT-2 Conv1D layers, nn.Conv1d/Conv3d and grouped convolutions (PEFT's OFT has none of them), Cayley–Neumann
files of PEFT 0.16–0.17
(an older series: no `peft_version`, which PEFT writes since 0.18) and files of PEFT ≤ 0.15 (`oft_r`/`oft_s`).
The live Conv2d runs y + conv(x, W·Rᵀ − W), its merge, at the layer's own stride and padding (PEFT's live OFT
conv folds rotated patches back with overlaps summed, which equals its merge only where one patch is seen).
"""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

from adaptkit.plugin import AdapterFiles, AdaptkitError, registry
from adaptkit.plugin import validate as v

from . import _orthogonal as orth

if TYPE_CHECKING:
    import torch

KINDS = ("linear", "conv2d", "embedding")  # see _orthogonal.features
ROLES = ("oft_R", "oft_embedding_R")
# The first PEFT whose Cayley–Neumann series this is; written so that PEFT (and adaptkit) read the file so.
SERIES_VERSION = "0.18.0"


def peft_divisor(dim: int, value: int) -> int:
    """PEFT's `adjust_oft_parameters`: the divisor of `dim` nearest `value` (ties go down), `dim` if above."""
    if value >= dim:
        return dim
    higher = value
    while higher <= dim and dim % higher:
        higher += 1
    lower = value
    while lower > 1 and dim % lower:
        lower -= 1
    return lower if value - lower <= higher - value else higher


def blocks_of(dim: int, r: int, block: int, path: str) -> tuple[int, int]:
    """(r, b) with r·b = dim from exactly one of them, adjusted as PEFT adjusts it."""
    if (r == 0) == (block == 0):
        raise AdaptkitError(f"OFT needs exactly one of r ({r}) and oft_block_size ({block}) non-zero")
    name, given = ("oft_block_size", block) if r == 0 else ("r", r)
    found = given if dim % given == 0 and given <= dim else peft_divisor(dim, given)
    if found != given:
        warnings.warn(f"{path}: {name} {given} does not divide {dim}; using {found}, as PEFT does", stacklevel=3)
    return (dim // found, found) if r == 0 else (found, dim // found)


def legacy_series(config: dict[str, Any]) -> bool:
    """A Cayley–Neumann file written before PEFT 0.18 (no or an older `peft_version`): another series."""
    if not config.get("use_cayley_neumann"):
        return False
    parts = str(config.get("peft_version") or "0").partition("@")[0].split(".")[:2]
    numbers = [int(p) if p.isdigit() else 0 for p in parts] + [0]
    return (numbers[0], numbers[1]) < (0, 18)


class OFTVariant:
    """OFT: W' = W·Rᵀ, R block-diagonal with Cayley-orthogonal blocks (Qiu et al. 2023, arXiv 2306.07280)."""

    name = "oft"
    param_names = ROLES
    config_keys = frozenset({"r", "oft_block_size", "module_dropout", "fan_in_fan_out", "bias", "init_weights", "coft",
                             "eps", "block_share", "use_cayley_neumann", "num_cayley_neumann_terms"})
    config_types = {"r": v.count, "oft_block_size": v.count, "module_dropout": v.fraction,
                    "fan_in_fan_out": v.optional(v.flag), "bias": v.choice("none", "all", "oft_only"),
                    "init_weights": v.flag, "coft": v.flag, "eps": v.number, "block_share": v.flag,
                    "use_cayley_neumann": v.flag, "num_cayley_neumann_terms": v.count}
    defaults = {"r": 0, "oft_block_size": 32, "module_dropout": 0.0, "bias": "none", "init_weights": True,
                "coft": False, "eps": 6e-5, "block_share": False, "use_cayley_neumann": True,
                "num_cayley_neumann_terms": 5}
    inspect_rows = ("block_size", "coft", "block_share", "use_cayley_neumann")

    # -- the math, shared by both planes ---------------------------------------------------------
    @staticmethod
    def blocks(vec: torch.Tensor, size: int, cfg: dict[str, Any]) -> torch.Tensor:
        """The stored blocks R_i (k × b × b, float32) from their free entries (COFT-projected first)."""
        vec = vec.float()
        if cfg["coft"]:
            vec = orth.coft_project(vec, size, float(cfg["eps"]))
        q = orth.skew(vec, size)
        return orth.neumann(q, int(cfg["num_cayley_neumann_terms"])) if cfg["use_cayley_neumann"] else orth.cayley(q)

    # -- tensor plane --------------------------------------------------------------------------
    def check_files(self, adapter: AdapterFiles) -> None:
        where = adapter.store.root
        if "oft_block_size" not in adapter.config:
            raise AdaptkitError(f"{where}: an OFT adapter of PEFT < 0.14 (no oft_block_size; its oft_r layout is gone "
                                "from PEFT too); retrain it with a newer PEFT")
        if any(key.rsplit(".", 1)[-1] in ("oft_r", "oft_s") for key in adapter.saved):
            raise AdaptkitError(f"{where}: an OFT adapter of PEFT 0.14–0.15 (oft_r/oft_s tensors, a layout PEFT dropped "
                                "too); retrain it with a newer PEFT")
        if legacy_series(adapter.config):
            raise AdaptkitError(f"{where}: an OFT adapter with the Cayley–Neumann series of PEFT 0.16–0.17 (peft_version "
                                f"{adapter.config.get('peft_version')}), which PEFT 0.18 changed; not supported")
        for module, roles in adapter.modules.items():
            shape = adapter.shape(module, next(iter(roles)))
            if len(roles) != 1 or len(shape) != 2 or not orth.block_size(shape[1]):
                raise AdaptkitError(f"{where}: OFT module {module} has tensors {sorted(roles)} of shape {tuple(shape)}, "
                                    "not one (blocks × b(b−1)/2) oft_R")

    def _rotation(self, adapter: AdapterFiles, module: str, dim: int) -> torch.Tensor:
        """The d × d block-diagonal R of a stored module."""
        role = next(iter(adapter.modules[module]))
        vec = adapter.tensor(module, role)
        size = orth.block_size(vec.shape[1])
        shared = bool(adapter.config.get("block_share"))
        if dim % size or vec.shape[0] != (1 if shared else dim // size):
            raise AdaptkitError(f"{module}: OFT blocks {tuple(vec.shape)} (size {size}{', shared' if shared else ''}) "
                                f"do not rotate {dim} features; is the adapter for a different base model?")
        cfg = {k: adapter.config.get(k, d) for k, d in self.defaults.items()}
        return orth.block_diagonal(self.blocks(vec, size, cfg), dim // size)

    def delta(self, adapter: AdapterFiles, module: str, base: torch.Tensor | None = None) -> torch.Tensor:
        """ΔW in the stored layout: W·Rᵀ − W (a Conv2d's filter flattened), an embedding table's E·R − E."""
        if base is None:
            raise AdaptkitError(f"{module}: an OFT adapter rotates the base weight (ΔW = W·Rᵀ − W); "
                                "give the base model")
        w = base.float()
        if "oft_embedding_R" in adapter.modules[module]:
            return w @ self._rotation(adapter, module, w.shape[1]) - w
        return orth.rotated(w, self._rotation(adapter, module, w[0].numel())) - w

    def factor_layout(self, adapter: AdapterFiles, module: str) -> dict[str, bool]:
        return {"embedding": "oft_embedding_R" in adapter.modules[module], "transposed": False}

    def write_lowrank(self, factors, layouts, template: dict[str, Any], out_dir) -> list:
        """Merged OFT adapters (ΔW re-factored by SVD) are no rotation: a plain adapter of the canonical low-rank variant."""
        return registry.get("variant", registry.default("variant")).write_lowrank(factors, layouts, template, out_dir)

    def describe(self, adapter: AdapterFiles) -> dict[str, Any]:
        cfg = adapter.config
        modules = {m: {"blocks_stored": adapter.shape(m, next(iter(roles)))[0],
                       "block_size": orth.block_size(adapter.shape(m, next(iter(roles)))[1])}
                   for m, roles in sorted(adapter.modules.items())}
        sizes = sorted({m["block_size"] for m in modules.values()})
        ranks = sorted({m["blocks_stored"] for m in modules.values()})
        return {"rank": ranks[0] if len(ranks) == 1 else None, "ranks": ranks,
                "block_size": sizes[0] if len(sizes) == 1 else sizes, "coft": bool(cfg.get("coft")),
                "block_share": bool(cfg.get("block_share")),
                "use_cayley_neumann": bool(cfg.get("use_cayley_neumann", True)), "modules": modules}

    # -- module plane --------------------------------------------------------------------------
    def settings(self, config: dict[str, Any], path: str, target) -> dict[str, Any]:
        kind, dim = orth.features(target, "OFT", KINDS, path)
        if config["bias"] != "none":
            raise AdaptkitError(f"OFT bias={config['bias']!r} trains the layers' biases, which PEFT's OFT files do not "
                                "hold; use bias='none' (and modules_to_save for a trained layer)")
        r, size = blocks_of(dim, config["r"], config["oft_block_size"], path)
        return {"kind": kind, "count": r, "size": size, "rows": 1 if config["block_share"] else r,
                "dropout": float(config["module_dropout"]),
                **{k: config[k] for k in ("coft", "eps", "use_cayley_neumann", "num_cayley_neumann_terms",
                                          "init_weights")}}

    def create(self, target, settings, weight, shared):
        import torch
        from torch import nn

        shape = (settings["rows"], settings["size"] * (settings["size"] - 1) // 2)
        vec = torch.zeros(shape) if settings["init_weights"] else torch.randn(shape) * 0.1
        role = ROLES[settings["kind"] == "embedding"]
        return nn.ParameterDict({role: nn.Parameter(vec.to(weight.device))})

    def _blocks(self, branch, training: bool) -> torch.Tensor:
        """The stored blocks R_i of a live branch; COFT projects the parameter in place first, as PEFT's forward does."""
        s = branch.settings
        param = branch.params[ROLES[s["kind"] == "embedding"]]
        if s["coft"]:
            import torch

            with torch.no_grad():
                param.copy_(orth.coft_project(param.float(), s["size"], float(s["eps"])).to(param.dtype))
        blocks = self.blocks(param, s["size"], {**s, "coft": False})
        return orth.drop_blocks(blocks, s["dropout"]) if training and s["dropout"] else blocks

    def transform_input(self, branch, x: torch.Tensor) -> torch.Tensor:
        """A linear layer's input x ↦ x·R (PEFT's order); other layers rotate in `forward`."""
        if branch.settings["kind"] != "linear":
            return x
        return orth.rotate_features(x, self._blocks(branch, branch.training), branch.settings["count"])

    def forward(self, branch, base_layer, x, result):
        kind = branch.settings["kind"]
        if kind == "embedding":  # each embedding row e ↦ e·R
            return orth.rotate_features(result, self._blocks(branch, branch.training), branch.settings["count"])
        if kind == "conv2d":  # y + conv(x, W·Rᵀ − W): the merged filter, at the layer's own stride and padding
            w = base_layer.weight.float()
            r = orth.block_diagonal(self._blocks(branch, branch.training), branch.settings["count"])
            return result + base_layer._conv_forward(x, (orth.rotated(w, r) - w).to(x.dtype), None)
        return result

    def weight_delta(self, branch, weight: torch.Tensor) -> torch.Tensor:
        """ΔW in math layout: W·Rᵀ − W (out × in, or a 4-d filter); an embedding's (dim × n) Rᵀ·W − W."""
        r = orth.block_diagonal(self._blocks(branch, False), branch.settings["count"])
        if branch.settings["kind"] == "embedding":
            return r.T @ weight - weight
        return orth.rotated(weight, r) - weight

    def delta_needs_base(self, branch) -> bool:
        return True

    def stored_key(self, role: str, target) -> str:
        return f"{role}.weight"

    def file_config(self, config: dict[str, Any], settings: dict[str, dict], transposed: bool) -> dict[str, Any]:
        return {"peft_type": "OFT", "peft_version": SERIES_VERSION, "fan_in_fan_out": False,
                **{k: config[k] for k in self.defaults}}

    def config_from_file(self, adapter: AdapterFiles) -> dict[str, Any]:
        return {k: adapter.config.get(k, default) for k, default in self.defaults.items()}


OFT = OFTVariant()
