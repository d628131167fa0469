"""Token-indexed tensors (embeddings, LM heads) re-indexed to a merge's output vocabulary.

For input m with tensor E_m and row map p_m (p_m[i] = m's id of output token i, or -1), the aligned
tensor is A_m[i] = E_m[p_m[i]] where m has token i and no `force` applies, else the token's default
row d_i (mergekit's rules, see `tokenizer.py`): its `tokens:` source; the only input that has it;
zeros when none has it; the base's row; else (Σ_{m has i} E_m[p_m[i]]) / #{m has i}, summed in the
order mergekit sums (the models as listed, then the base). Rows past the vocabulary are
mean_i A_m[i]. Arithmetic is in the merge's compute dtype.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import AdaptkitError, short
from ..io.readers import update_json

if TYPE_CHECKING:
    from .tokenizer import Vocabulary


def align_rows(vocab: Vocabulary, name: str, refs: list[str], tensors: list[torch.Tensor],
               dtype: torch.dtype) -> list[torch.Tensor]:
    """`tensors` (one per entry of `refs`, an input possibly twice) replaced in place by aligned ones,
    computed in `dtype` (the merge's compute dtype, in which mergekit gathers its inputs)."""
    first = {}
    for i, ref in enumerate(refs):
        first.setdefault(ref, i)
    models = [ref for ref in vocab.order if ref in first]
    raw = {ref: tensors[first[ref]] for ref in models}
    for ref, tensor in raw.items():
        if tensor.shape[1:] != raw[models[0]].shape[1:]:
            raise AdaptkitError(f"tensor '{name}': {ref} has shape {tuple(tensor.shape)} but {models[0]} has "
                                f"{tuple(raw[models[0]].shape)}; only the number of rows (tokens) may differ")
        top = int(vocab.rows_of[ref].max())
        if top >= tensor.shape[0]:
            raise AdaptkitError(f"tensor '{name}' of {ref} has {tensor.shape[0]} rows, but its tokenizer uses id {top}")
    forced = torch.zeros(vocab.size, dtype=torch.bool)
    for tok, setting in vocab.settings.tokens.items():
        forced[vocab.ids[tok]] = setting.force
    ids, rows = _default_rows(vocab, name, models, raw, forced, dtype)
    for ref in models:
        aligned = _aligned(vocab, raw.pop(ref), vocab.rows_of[ref], forced, ids, rows, dtype)
        for i, other in enumerate(refs):
            if other == ref:
                tensors[i] = aligned
    return tensors


def _default_rows(vocab: Vocabulary, name: str, models: list[str], raw: dict[str, torch.Tensor],
                  forced: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids, their default rows) for the tokens some input lacks or that are forced."""
    present = {ref: vocab.rows_of[ref] >= 0 for ref in models}
    count = torch.stack([present[ref] for ref in models]).sum(0)
    needed = ((count < len(models)) | forced).nonzero().squeeze(1).tolist()
    shape = raw[models[0]].shape[1:]
    rows, nowhere = [], 0
    for i in needed:
        setting = vocab.settings.tokens.get(vocab.tokens[i])
        has = [ref for ref in models if present[ref][i]]
        if setting is not None:
            row = _configured_row(vocab, name, setting, i, raw, shape, dtype)
        elif len(has) == 1 or (len(has) > 1 and vocab.base in has):
            donor = has[0] if len(has) == 1 else vocab.base
            row = raw[donor][vocab.rows_of[donor][i]].to(dtype)
        elif not has:
            nowhere += 1
            row = torch.zeros(shape, dtype=dtype)
        else:
            row = torch.zeros(shape, dtype=dtype)
            for ref in has:
                row = row + raw[ref][vocab.rows_of[ref][i]].to(dtype)
            row /= len(has)
        rows.append(row.to(dtype))
    if nowhere:
        warnings.warn(f"{nowhere} token(s) of the output tokenizer are in no input model: their '{name}' rows are zero")
    stacked = torch.stack(rows) if rows else torch.zeros((0, *shape), dtype=dtype)
    return torch.tensor(needed, dtype=torch.long), stacked


def _configured_row(vocab: Vocabulary, name: str, setting, i: int, raw: dict[str, torch.Tensor], shape,
                    dtype: torch.dtype) -> torch.Tensor:
    """The row a `tokens:` entry names for output token i."""
    if setting.kind == "zero":
        return torch.zeros(shape, dtype=dtype)
    if setting.model not in raw:
        raise AdaptkitError(f"tokenizer.tokens.{short(vocab.tokens[i])}: {setting.model} has no tensor '{name}' here")
    tensor = raw[setting.model]
    if setting.kind == "model":
        return tensor[vocab.rows_of[setting.model][i]]
    source = setting.token_id if setting.token is None else vocab.vocabs[setting.model][setting.token]
    if source >= tensor.shape[0]:
        raise AdaptkitError(f"tokenizer.tokens.{short(vocab.tokens[i])}: token id {source} is past the "
                            f"{tensor.shape[0]} rows of '{name}' in {setting.model}")
    return tensor[source]


def _aligned(vocab: Vocabulary, old: torch.Tensor, perm: torch.Tensor, forced: torch.Tensor, ids: torch.Tensor,
             rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # gathered straight into the output's rows (no full-size temporary), then the rows it lacks cleared
    new = torch.empty((vocab.rows, *old.shape[1:]), dtype=dtype)
    keep = (perm >= 0) & ~forced
    torch.index_select(old.to(dtype), 0, perm.clamp(min=0), out=new[:vocab.size])
    new[:vocab.size][~keep] = 0
    fill = ~keep[ids]
    new[ids[fill]] = rows[fill]
    if vocab.rows > vocab.size:  # padding rows: the mean row (see the module docstring)
        new[vocab.size:] = torch.mean(new[:vocab.size], dim=0)
    return new


class Truncation:
    """mergekit's --unsafe-truncate-embeddings, the row plan of a merge without tokenizer settings whose
    token-indexed tensors differ in rows: every input's first `rows` rows (the fewest any input has), on
    the assumption that token ids below that mean the same in every input (nothing checks it). The
    interface of `tokenizer.Vocabulary` the engine uses; unlike mergekit, config.json's vocab_size then
    says `rows` (mergekit's keeps the donor's, and the output does not load where that is more)."""

    def __init__(self, tensors: frozenset[str], rows: int, sizes: list[int]):
        self.tensors, self.rows = tensors, rows
        warnings.warn(f"token rows cut to the first {rows} (the inputs have {', '.join(map(str, sizes))}; "
                      f"--unsafe-truncate-embeddings) and config.json's vocab_size with them: ids from {rows} on "
                      "of the output's tokenizer have no row")

    def align(self, name: str, refs: list[str], tensors: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
        return [t[:self.rows] for t in tensors]

    def write(self, folder: Path) -> None:
        set_vocab_size(folder, self.rows)


def truncation(sources: list, names: list[str]) -> Truncation | None:
    """The cut of `names` (token-indexed tensors) to the fewest rows any source has, where sources differ."""
    counts = {n: sorted({s.info(n).shape[0] for s in sources if s.stored(n)}) for n in names}
    cut = {n: c for n, c in counts.items() if len(c) > 1}
    if not cut:
        return None
    if len({c[0] for c in cut.values()}) > 1:
        raise AdaptkitError(f"--unsafe-truncate-embeddings: the token-indexed tensors would be cut to different "
                            f"row counts ({', '.join(f'{n}: {c[0]}' for n, c in cut.items())})")
    return Truncation(frozenset(cut), next(iter(cut.values()))[0], sorted({r for c in cut.values() for r in c}))


def set_vocab_size(folder: Path, rows: int) -> None:
    """config.json's vocab_size (a multimodal model's in `text_config`) set to `rows`, the output's token rows."""
    def change(config: dict) -> None:
        holder = config if "vocab_size" in config or "text_config" not in config else config["text_config"]
        holder["vocab_size"] = rows

    update_json(folder / "config.json", change)
