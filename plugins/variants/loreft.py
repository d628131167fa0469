"""LoReFT: low-rank linear subspace representation fine-tuning (Wu et al. 2024, arXiv 2404.03592).

LoReFT leaves every weight alone and edits hidden states instead. At chosen decoder layers
(`layers=[...]`, indices into the model's layer list `model.layers.N`, `h.N`, …; negative ones
count from the end) the block's output h ∈ ℝᵈ (the residual stream) becomes

    Φ(h) = h + Rᵀ(W·h + b − R·h),     R (r × d) with orthonormal rows, W (r × d), b ∈ ℝʳ,

i.e. within the r-dimensional subspace spanned by R's rows, h's coordinates R·h are replaced by
W·h + b. Only the first `first_n` and the last `last_n` positions of each sequence are edited (the
paper's prefix/suffix positions); the rest pass unchanged, and a sequence shorter than
first_n + last_n has each of its positions edited once. Positions count along the sequence as
given: pad batches on the left so that the last positions are real tokens. In cached generation
every forward call counts on its own, so each new token is also edited (first and last of a
one-token call).

R stays orthonormal through training by torch's `parametrizations.orthogonal` (`orthogonal_map`
"matrix_exp" by default, also "cayley"; "householder" is cheaper for large d but reads column signs
from the raw diagonal, which weight decay destroys: `handle.param_groups` keeps decay off R, and
an optimizer of your own must too). W and b start as `nn.Linear(d, r)` does, R as a random
orthonormal matrix (pyreft's initialization), so Φ is not the identity at the start.

Files: PEFT's folder layout under adaptkit's name (`adaptkit_variant: loreft`, no `peft_type`:
PEFT lacks LoReFT), keys `base_model.model.<block>.loreft_R` (R itself, orthonormal),
`.loreft_W`, `.loreft_b`; loading sets R exactly. There is no ΔW: merging into a model, merging
with other adapters and exporting to LoRA are refused with one line saying why.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from adaptkit.plugin import AdapterFiles, AdaptkitError
from adaptkit.plugin import validate as v

if TYPE_CHECKING:
    import torch

NOT_WEIGHTS = ("LoReFT edits activations (hidden states), not weights: it has no weight change to merge into a "
               "model or with other adapters, or to export to LoRA; load it onto the model with load_adapter instead")
MAPS = ("matrix_exp", "cayley", "householder")


def positions(length: int, first_n: int, last_n: int, device=None) -> torch.Tensor:
    """Indices of the first `first_n` and last `last_n` of `length` positions, each once, ascending."""
    import torch

    head = min(first_n, length)
    return torch.cat([torch.arange(head, device=device), torch.arange(max(length - last_n, head), length, device=device)])


def set_rotation(holder, rotation: torch.Tensor) -> None:
    """Make the parametrized `holder.weight` equal `rotation` (r × d, orthonormal rows) exactly: torch's
    trivialization computes (base·Q(raw))[:, :r]ᵀ; with the neutral raw (−1 on the diagonal, as torch's
    own right_inverse sets) Q(raw) = I, so base = [Rᵀ | an orthonormal complement] gives R bit for bit."""
    import torch

    r, d = rotation.shape
    complete, _ = torch.linalg.qr(rotation.double().T, mode="complete")
    with torch.no_grad():
        par = holder.parametrizations.weight
        par.original.zero_().diagonal().fill_(-1.0)
        par[0].base.copy_(torch.cat([rotation.double().T, complete[:, r:]], dim=1))


class LoReFT:
    """LoReFT: Φ(h) = h + Rᵀ(W·h + b − R·h) on chosen layers' hidden states (arXiv 2404.03592)."""

    name = "loreft"
    param_names = ("loreft_R", "loreft_W", "loreft_b")
    config_keys = frozenset({"r", "layers", "first_n", "last_n", "orthogonal_map"})
    config_types = {"r": v.positive_int, "first_n": v.count, "last_n": v.count, "orthogonal_map": v.text,
                    "layers": v.optional(v.either(v.integer, v.list_of(v.optional(v.integer)),
                                                  must="a layer index or a list of them"))}
    defaults = {"layers": None, "r": 4, "first_n": 1, "last_n": 1, "orthogonal_map": "matrix_exp"}

    # -- tensor plane: no ΔW ---------------------------------------------------------------------
    def describe(self, adapter: AdapterFiles) -> dict[str, Any]:
        cfg = adapter.config
        modules = {m: {"rank": adapter.shape(m, "loreft_R")[0], "hidden_size": adapter.shape(m, "loreft_R")[1]}
                   for m in sorted(adapter.modules)}
        ranks = sorted({v["rank"] for v in modules.values()})
        return {"rank": ranks[0] if len(ranks) == 1 else None, "ranks": ranks, "layers": cfg.get("layers"),
                "first_n": cfg.get("first_n"), "last_n": cfg.get("last_n"), "modules": modules}

    def delta(self, adapter: AdapterFiles, module: str, base: torch.Tensor | None = None) -> torch.Tensor:
        raise AdaptkitError(f"{module}: {NOT_WEIGHTS}")

    def check_mergeable(self, adapter: AdapterFiles) -> None:
        raise AdaptkitError(f"adapter {adapter.store.root}: {NOT_WEIGHTS}")

    def target_of(self, module):
        """A block of width d: its `hidden_size`, else the size of its first own norm layer (pre-norm
        decoders), else of the last norm inside it (post-norm encoders: BERT's output LayerNorm)."""
        import torch

        from adaptkit.plugin import Target

        def norms(modules):
            return [m.weight for m in modules if "norm" in type(m).__name__.lower()
                    and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 1]

        d = getattr(module, "hidden_size", None)
        if not isinstance(d, int):
            own, inside = norms(module.children()), norms(list(module.modules())[1:])
            d = int(own[0].shape[0]) if own else int(inside[-1].shape[0]) if inside else None
        return Target("block", d, d, False) if d else None

    def prepare(self, model, config: dict[str, Any]) -> dict[str, Any]:
        """`layers` (indices) -> the blocks' paths as target_modules; a saved adapter gives paths. The
        model's device is noted for `create` (a block hands over no weight to take it from)."""
        layers = config["layers"]
        config = {**config, "device": next((p.device for p in model.parameters()), None)}
        if layers is None:
            if config["target_modules"] is None:
                raise AdaptkitError("LoReFT needs layers=[...]: indices into the model's layer list, e.g. layers=[0, 2]")
            return config
        if config["target_modules"] is not None:
            raise AdaptkitError("LoReFT takes layers=[...] (indices of decoder layers), not target_modules")
        from .partial import last_blocks

        try:
            blocks = last_blocks(model, config["layers_pattern"])
        except AdaptkitError:
            raise AdaptkitError("LoReFT: the model has no numbered layer list (layers.N, h.N, blocks.N); give "
                                "layers_pattern") from None
        chosen = []
        for i in [layers] if isinstance(layers, int) else list(layers):
            if isinstance(i, bool) or not isinstance(i, int) or not -len(blocks) <= i < len(blocks):
                raise AdaptkitError(f"layers must be integers in {-len(blocks)}..{len(blocks) - 1} (the model has "
                                    f"{len(blocks)} layers), got {i!r}")
            chosen.append(blocks[i % len(blocks)])
        return {**config, "target_modules": sorted(set(chosen), key=blocks.index)}

    def settings(self, config: dict[str, Any], path: str, target) -> dict[str, Any]:
        if target.kind != "block":
            raise AdaptkitError(f"{path}: LoReFT edits the output of whole layers; choose them with layers=[...]")
        r, d = config["r"], target.out_features
        if isinstance(r, bool) or not isinstance(r, int) or not 0 < r <= d:
            raise AdaptkitError(f"{path}: rank r={r!r} does not fit hidden size {d} (1 to {d})")
        n = {k: config[k] for k in ("first_n", "last_n")}
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in n.values()) or not any(n.values()):
            raise AdaptkitError(f"first_n and last_n must be integers ≥ 0, not both 0; got {n}")
        if config["orthogonal_map"] not in MAPS:
            raise AdaptkitError(f"orthogonal_map must be one of {', '.join(MAPS)}, got {config['orthogonal_map']!r}")
        return {"r": r, "hidden_size": d, **n, "orthogonal_map": config["orthogonal_map"], "device": config.get("device")}

    def create(self, target, settings, weight, shared):
        """R's raw tensor (trained through the parametrization), W, b; the parametrized R lives in the
        `rotation` submodule (with torch's base buffer), its raw tensor also listed as `loreft_R_raw`."""
        import torch
        from torch import nn
        from torch.nn.utils.parametrizations import orthogonal

        r, d = settings["r"], settings["hidden_size"]
        holder = nn.Module()
        holder.weight = nn.Parameter(nn.init.orthogonal_(torch.empty(r, d)))
        orthogonal(holder, "weight", orthogonal_map=settings["orthogonal_map"])
        source = nn.Linear(d, r)
        if settings.get("device") is not None:
            holder.to(settings["device"])
            source.to(settings["device"])
        params = nn.ParameterDict({"loreft_R_raw": holder.parametrizations.weight.original,
                                   "loreft_W": source.weight, "loreft_b": source.bias})
        params.add_module("rotation", holder)
        return params

    def forward(self, branch, base_layer, x, result):
        """Rewrite the block's hidden-state output: the tensor, or the first element of its tuple."""
        hidden = result[0] if isinstance(result, (tuple, list)) else result
        edited = self.intervene(branch, hidden)
        if isinstance(result, (tuple, list)):
            return type(result)([edited, *result[1:]])
        return edited

    def intervene(self, branch, hidden: torch.Tensor) -> torch.Tensor:
        """Φ at the chosen positions of `hidden` (…, seq, d); other positions are returned untouched."""
        s, p = branch.settings, branch.params
        dim = hidden.dim() - 2
        index = positions(hidden.shape[dim], s["first_n"], s["last_n"], hidden.device)
        rot = p.rotation.weight
        h = hidden.index_select(dim, index).to(rot.dtype)
        edit = (h @ p["loreft_W"].T + p["loreft_b"] - h @ rot.T) @ rot
        return hidden.index_add(dim, index, edit.to(hidden.dtype))

    def param_groups(self, named: list[tuple[str, Any]], lr: float, config: dict[str, Any]) -> list[dict]:
        """R's raw tensor without weight decay (it would pull the rotation, or with Householder its signs)."""
        raw = [p for n, p in named if n.endswith("loreft_R_raw")]
        rest = [p for n, p in named if not n.endswith("loreft_R_raw")]
        return [g for g in ({"params": rest, "lr": lr}, {"params": raw, "lr": lr, "weight_decay": 0.0}) if g["params"]]

    def stored_key(self, role: str, target) -> str:
        return role

    def save_tensors(self, branch) -> dict[str, torch.Tensor]:
        p = branch.params
        return {"loreft_R": p.rotation.weight.detach(), "loreft_W": p["loreft_W"].detach(), "loreft_b": p["loreft_b"].detach()}

    def load_tensors(self, branch, tensors: dict[str, torch.Tensor]) -> None:
        import torch

        p = branch.params
        shapes = {"loreft_R": p.rotation.weight.shape, "loreft_W": p["loreft_W"].shape, "loreft_b": p["loreft_b"].shape}
        if set(tensors) != set(shapes):
            raise AdaptkitError(f"a LoReFT layer needs tensors {sorted(shapes)}; the adapter has {sorted(tensors)}")
        for role, t in tensors.items():
            if t.shape != shapes[role]:
                raise AdaptkitError(f"{role}: the adapter has shape {tuple(t.shape)} but this model needs "
                                    f"{tuple(shapes[role])}; is the adapter for a different base model?")
        rot = tensors["loreft_R"].float()
        error = float((rot @ rot.T - torch.eye(rot.shape[0], device=rot.device)).abs().max())
        if error > 1e-3:
            raise AdaptkitError(f"loreft_R does not have orthonormal rows (max |R·Rᵀ − I| = {error:.3g})")
        with torch.no_grad():
            p["loreft_W"].copy_(tensors["loreft_W"])
            p["loreft_b"].copy_(tensors["loreft_b"])
        set_rotation(p.rotation, rot.to(p["loreft_W"].device))

    def file_config(self, config: dict[str, Any], settings: dict[str, dict], transposed: bool) -> dict[str, Any]:
        from adaptkit.plugin import layer_index

        one = next(iter(settings.values()), {"r": config["r"], "first_n": config["first_n"], "last_n": config["last_n"]})
        return {"adaptkit_variant": self.name, "r": one["r"], "first_n": one["first_n"], "last_n": one["last_n"],
                "orthogonal_map": config["orthogonal_map"],
                "layers": [layer_index(path, config.get("layers_pattern")) for path in sorted(settings)]}

    def config_from_file(self, adapter: AdapterFiles) -> dict[str, Any]:
        cfg, ranks = adapter.config, {adapter.shape(m, "loreft_R")[0] for m in adapter.modules}
        if len(ranks) > 1:
            raise AdaptkitError(f"LoReFT adapter {adapter.store.root} mixes ranks {sorted(ranks)}; one rank per adapter")
        return {"r": ranks.pop() if ranks else cfg.get("r", 4), "first_n": cfg.get("first_n", 1),
                "last_n": cfg.get("last_n", 1), "orthogonal_map": cfg.get("orthogonal_map", "matrix_exp")}


LOREFT = LoReFT()
