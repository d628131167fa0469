"""Trainable tokens: new values for a few rows of the embedding table (PEFT's `TrainableTokensConfig`).

Instead of training the whole embedding matrix E (num_embeddings × d), only the rows of the given
`token_indices` are trained; the adapter stores them as `trainable_tokens_delta` (k × d). Despite
the name the tensor holds the rows' new values, not a difference: applying the adapter replaces

    E'[t] = T[j]   for t = token_indices[j],      E'[t] = E[t] otherwise,

so ΔE = E' − E is zero outside those rows and depends on the base (ΔE[t] = T[j] − E[t]). A layer
whose weight is the embedding's own tensor (an output head tied to it, `tie_word_embeddings`)
uses the same rows: its logits for those tokens come from T. `init_weights` true starts T at the
current rows (a no-op until trained), false at N(0, 1) as PEFT.

Files: PEFT's folder (`peft_type: TRAINABLE_TOKENS`), keys `<module>.trainable_tokens_delta`; PEFT
writes the tied head's copy too (`lm_head.trainable_tokens_delta`) although its `target_modules`
names only the embedding, so a stored module the config does not target is read as that tied copy.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from adaptkit.plugin import AdapterFiles, AdaptkitError
from adaptkit.plugin import validate as v

if TYPE_CHECKING:
    import torch

ROLE = "trainable_tokens_delta"


def replaced_rows(table: torch.Tensor, indices, rows: torch.Tensor) -> torch.Tensor:
    """`table` (rows are tokens) with the rows at `indices` replaced by `rows`, as a new tensor."""
    import torch

    index = torch.as_tensor(list(indices), dtype=torch.long, device=table.device)
    return table.index_copy(0, index, rows.to(table))


def check_indices(indices: Any, vocab: int, where: str) -> list[int]:
    """Distinct token indices within 0..vocab-1 (a repeated one would make the replaced row ambiguous)."""
    if not isinstance(indices, (list, tuple)) or not indices or any(isinstance(i, bool) or not isinstance(i, int)
                                                                     for i in indices):
        raise AdaptkitError(f"{where}: token_indices must be a non-empty list of token ids, got {indices!r}")
    if len(set(indices)) != len(indices) or not all(0 <= i < vocab for i in indices):
        raise AdaptkitError(f"{where}: token_indices must be distinct ids in 0..{vocab - 1}, got {list(indices)}")
    return list(indices)


def rows_delta(module: str, rows: torch.Tensor, indices, base: torch.Tensor | None) -> torch.Tensor:
    """ΔE = E' − E of a stored module: `rows` minus the base's at `indices`, zero elsewhere (rows are tokens)."""
    if base is None:
        raise AdaptkitError(f"{module}: trainable tokens replace rows of the base embedding; give the base model")
    base, rows = base.float(), rows.float()
    if base.dim() != 2 or base.shape[1] != rows.shape[1]:
        raise AdaptkitError(f"{module}: the adapter's rows have width {rows.shape[1]} but the base weight is "
                            f"{tuple(base.shape)}")
    return replaced_rows(base, check_indices(indices, base.shape[0], module), rows) - base


class TrainableTokens:
    """Trainable tokens: E'[t] = T[j] for t = token_indices[j] (PEFT's TrainableTokens)."""

    name = "trainable_tokens"
    param_names = (ROLE,)
    config_keys = frozenset({"token_indices", "init_weights"})
    config_types = {"token_indices": v.list_of(v.count), "init_weights": v.flag}
    defaults = {"token_indices": None, "init_weights": True}
    inspect_rows = ("tokens",)

    # -- tensor plane ------------------------------------------------------------------------------
    def check_files(self, adapter: AdapterFiles) -> None:
        """Each module stores one row per token index. PEFT's tied copies (modules its `target_modules`
        does not name: a head sharing the embedding's tensor) are dropped from the modules: a base
        folder holds that tensor once, and the embedding's rows change it for both."""
        indices = adapter.config.get("token_indices")
        where = f"{adapter.store.root}/adapter_config.json"
        check_indices(indices, 2**62, where)
        for module in adapter.modules:
            if ROLE not in adapter.modules[module]:
                raise AdaptkitError(f"{module}: a trainable-tokens module needs '{ROLE}'; it has "
                                    f"{sorted(adapter.modules[module])}")
            shape = adapter.shape(module, ROLE)
            if len(shape) != 2 or shape[0] != len(indices):
                raise AdaptkitError(f"{module}: {ROLE} has shape {shape} but token_indices lists {len(indices)} tokens")
        targets = adapter.config.get("target_modules")
        if isinstance(targets, (str, list)) and targets:
            named = [m for m in adapter.modules if _named(m, v.targets(targets, "target_modules"))]
            if named:
                for module in set(adapter.modules) - set(named):
                    del adapter.modules[module]

    def describe(self, adapter: AdapterFiles) -> dict[str, Any]:
        indices = adapter.config.get("token_indices") or []
        modules = {m: dict(zip(("tokens", "dim"), adapter.shape(m, ROLE))) for m in sorted(adapter.modules)}
        return {"tokens": len(indices), "token_indices": list(indices), "modules": modules}

    def delta(self, adapter: AdapterFiles, module: str, base: torch.Tensor | None = None) -> torch.Tensor:
        """ΔE = E' − E: the stored rows minus the base's at `token_indices`, zero elsewhere (`rows_delta`)."""
        return rows_delta(module, adapter.tensor(module, ROLE), adapter.config.get("token_indices"), base)

    def factors(self, adapter: AdapterFiles, module: str):
        """None exact: ΔE depends on the base (`convert --rank --base` factors it by SVD, as `factor_layout` says)."""
        raise AdaptkitError(f"{module}: trainable tokens replace rows of the base embedding: no exact low-rank form")

    def factor_layout(self, adapter: AdapterFiles, module: str) -> dict[str, bool]:
        """Rows are tokens, as an embedding stores them: a low-rank form of ΔE is an embedding LoRA."""
        return {"embedding": True, "transposed": True}

    # -- module plane ------------------------------------------------------------------------------
    def prepare(self, model, config: dict[str, Any]) -> dict[str, Any]:
        """No target_modules: the model's input embedding, as PEFT. Every layer whose weight is a
        target's own tensor (a tied output head) is added, and `create` gives them one row table."""
        from adaptkit.plugin import find_targets

        targets = config["target_modules"]
        if targets is None:
            embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
            found = [p for p, m in model.named_modules() if m is embedding and p]
            if not found:
                raise AdaptkitError("trainable tokens: the model has no input embedding (get_input_embeddings); "
                                    "give target_modules")
            targets = found
        chosen = find_targets(model, targets)
        weights = [_weight(model.get_submodule(p)) for p in chosen]
        storages = {w.data_ptr() for w in weights if w is not None}
        tied = [p for p, m in model.named_modules() if p and p not in chosen and _weight(m) is not None
                and _weight(m).data_ptr() in storages and ".base_layer" not in p]
        return {**config, "target_modules": sorted(set(chosen) | set(tied)), "tied": tied, "tables": {}}

    def settings(self, config: dict[str, Any], path: str, target) -> dict[str, Any]:
        if target.kind not in ("embedding", "linear") or (target.kind == "linear" and target.transposed):
            raise AdaptkitError(f"{path}: trainable tokens replace rows of an Embedding or of a Linear head tied "
                                f"to it, not of a {target.kind} layer")
        vocab = target.in_features if target.kind == "embedding" else target.out_features
        return {"token_indices": check_indices(config["token_indices"], vocab, path), "init": config["init_weights"],
                "tied": path in config.get("tied", ()), "tables": config.get("tables", {})}  # (a hot-swap: as loaded)

    def create(self, target, settings, weight, shared):
        """One row table per base tensor: layers sharing a weight (tied) share the Parameter."""
        import torch
        from torch import nn

        tables = settings["tables"]
        key = weight.data_ptr()
        if key not in tables:
            rows = _rows(weight, target)[settings["token_indices"]].detach().clone()
            if not settings["init"]:
                rows = torch.randn_like(rows)
            tables[key] = nn.Parameter(rows)
        return nn.ParameterDict({ROLE: tables[key]})

    def forward(self, branch, base_layer, x, result):
        """The outputs of the chosen tokens replaced: their embeddings, or a tied head's logits x·T[j]ᵀ (+ bias);
        every other output is `result` as it came (other adapters' changes kept)."""
        import torch
        import torch.nn.functional as F

        rows, index = branch.params[ROLE], torch.as_tensor(branch.settings["token_indices"], device=result.device)
        if branch.target.kind == "linear":
            bias = None if base_layer.bias is None else base_layer.bias[index]
            return result.index_copy(-1, index, F.linear(x, rows.to(x.dtype), bias).to(result.dtype))
        table = replaced_rows(base_layer.weight, branch.settings["token_indices"], rows)
        out = F.embedding(x, table, base_layer.padding_idx, base_layer.max_norm, base_layer.norm_type,
                          base_layer.scale_grad_by_freq, base_layer.sparse)
        scale = getattr(base_layer, "embed_scale", None)  # scaled embeddings (Gemma 3) scale in forward
        out = out if scale is None else out * scale.to(out.dtype)
        return torch.where(torch.isin(x, index)[..., None], out.to(result.dtype), result)

    def weight_delta(self, branch, weight: torch.Tensor) -> torch.Tensor:
        """ΔW in math layout (out × in): rows of a head's weight, columns of an embedding's (d × vocab)."""
        rows = _rows(weight, branch.target).float()
        change = replaced_rows(rows, branch.settings["token_indices"], branch.params[ROLE].float()) - rows
        return change.T if branch.target.kind == "embedding" else change

    def delta_needs_base(self, branch) -> bool:
        return True  # a replacement: the ΔW merged is the one taken out again

    def stored_key(self, role: str, target) -> str:
        return role

    def file_config(self, config: dict[str, Any], settings: dict[str, dict], transposed: bool) -> dict[str, Any]:
        """PEFT's config; `target_modules` names the layers chosen, not their tied copies (PEFT adds those)."""
        one = next(iter(settings.values()), {"token_indices": config["token_indices"], "init": config["init_weights"]})
        return {"peft_type": "TRAINABLE_TOKENS", "token_indices": one["token_indices"], "init_weights": one["init"],
                "target_modules": sorted(p for p, s in settings.items() if not s["tied"])}

    def config_from_file(self, adapter: AdapterFiles) -> dict[str, Any]:
        return {"token_indices": adapter.config.get("token_indices"),
                "init_weights": bool(adapter.config.get("init_weights", True))}


def _weight(module):
    import torch

    w = getattr(module, "weight", None)
    return w if isinstance(w, torch.Tensor) else None


def _rows(weight: torch.Tensor, target) -> torch.Tensor:
    """The table with one row per token from a math-layout weight (embeddings come as d × vocab)."""
    return weight.T if target.kind == "embedding" else weight


def _named(path: str, targets) -> bool:
    import re

    if isinstance(targets, str):
        return re.fullmatch(targets, path) is not None
    return any(path == t or path.endswith("." + t) for t in targets)


TRAINABLE_TOKENS = TrainableTokens()
