"""An ensemble scored beside its members and their weight merge (`adaptkit eval BASE --ensemble A …`).

    evaluate_ensemble("minilm", "test.jsonl", ["a1/", "a2/"], weights=[0.7, 0.3], combine="probs")

Rows, all on one base model and one pass per batch (`live.ensembles`, the batch repeated once per row):
- "adapter": each adapter alone; its numbers are what `adaptkit eval BASE --adapter A` gives;
- "merge": their linear weight merge, W + Σ wᵢ·ΔWᵢ: the adapters merged into one adapter by
  adaptkit's merge (registry.toml's `[default.merge] ensemble` method, mergekit's linear, with these
  weights, re-factored at the sum of their ranks, so the SVD loses nothing but rounding), with the
  modules they train whole (a classification head) averaged with the same weights; a merge the
  adapters' variant cannot make is a row without numbers and with a note saying why;
- "ensemble": their outputs combined as `combine` says, with the weights normalized to sum 1.
Loss is the mean cross-entropy (classification, per example) or token negative log-likelihood
(causal LM, perplexity its exponential): of the mean logits' softmax for "logits", of the mean
probabilities for "probs"; a vote has no probabilities, hence no loss (None), only accuracy.
"""
from __future__ import annotations

import math
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import registry
from ..errors import AdaptkitError
from .data import IGNORE, collate, detect_task, eval_batches, read_jsonl
from .evaluation import _split_ref, autocast, default_device, model_and_data
from .models import resolve_base, training_info

MERGE = "merge"  # the name the weight-merged adapter gets on the model


class _Tally:
    """Running loss and accuracy of one row over the batches."""

    def __init__(self, task: str):
        self.task, self.loss, self.count, self.correct = task, 0.0, 0, 0

    def add(self, log_probs, predicted, labels) -> None:
        """`log_probs` (B, C) or (B, L, V), None for a vote; `predicted` the argmax classes / tokens."""
        import torch.nn.functional as F

        if self.task == "classification":
            if log_probs is not None:
                self.loss += F.nll_loss(log_probs, labels, reduction="sum").item()
            self.correct += int((predicted == labels).sum())
            self.count += len(labels)
            return
        labels = labels[:, 1:]  # a token's logits predict the next token
        if log_probs is not None:
            self.loss += F.nll_loss(log_probs[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=IGNORE,
                                    reduction="sum").item()
        self.count += int((labels != IGNORE).sum())

    def result(self, has_loss: bool = True) -> dict[str, float | None]:
        loss = self.loss / max(self.count, 1) if has_loss else None
        if self.task == "classification":
            return {"loss": loss, "accuracy": self.correct / max(self.count, 1)}
        return {"loss": loss, "perplexity": None if loss is None else math.exp(min(loss, 700.0))}


def _check_alike(adapters: Sequence[str], infos: list[dict | None]) -> dict | None:
    """The adapters' training info, once they agree on their base and labels; the first one found."""
    from ..adapter import read_adapter

    def base_of(adapter: str, info: dict | None) -> str | None:
        if info and info.get("base"):
            return str(info["base"])
        found = read_adapter(adapter) if Path(adapter).is_dir() else None
        return None if found is None else found.config.get("base_model_name_or_path")

    bases = {a: b for a, i in zip(adapters, infos) if (b := base_of(a, i))}
    distinct = list(dict.fromkeys(bases.values()))
    if len(distinct) > 1 and len({_resolved(b) for b in distinct}) > 1:
        (a1, b1), (a2, b2) = [next((a, b) for a, b in bases.items() if b == x) for x in distinct[:2]]
        raise AdaptkitError(f"the ensemble's adapters have different bases: {a1} ({b1}), {a2} ({b2}); an ensemble "
                            "shares one base")
    labels = {a: tuple(i["labels"]) for a, i in zip(adapters, infos) if i and i.get("labels") is not None}
    if len(set(labels.values())) > 1:
        (a1, l1), (a2, l2) = list({v: (a, v) for a, v in labels.items()}.values())[:2]
        raise AdaptkitError(f"the ensemble's adapters were trained with different labels: {a1} {list(l1)}, "
                            f"{a2} {list(l2)}; their outputs would mix classes")
    return next((i for i in infos if i), None)


def _resolved(base: str) -> str:
    try:
        return str(Path(resolve_base(base)).resolve())
    except AdaptkitError:
        return base


def _merge_into(model, adapters: Sequence[str], weights, allow_pickle: bool) -> str | None:
    """Load the adapters' linear weight merge onto `model` as adapter MERGE; None, or why it cannot be made."""
    from ..files.inspection import inspect
    from ..live.adapters import Adapters
    from ..live.ensembles import average_saved
    from ..merge.engine import run_merge

    handle = Adapters.of(model)
    with tempfile.TemporaryDirectory(prefix="adaptkit-ensemble-") as tmp:
        try:
            rank = sum(max((inspect(a)["adapter"] or {}).get("ranks") or [0]) for a in adapters)
            recipe = {"merge_method": registry.default("merge", "ensemble"), "dtype": "float32",
                      "models": [{"model": str(a), "parameters": {"weight": float(w)}} for a, w in zip(adapters, weights)],
                      "output": {"kind": "adapter", "rank": max(rank, 1)}}
            with warnings.catch_warnings():  # its modules trained whole are averaged below, not left out
                warnings.filterwarnings("ignore", message=r".*modules_to_save.*not merged")
                run_merge(recipe, Path(tmp) / "merged", progress=False, card=False, allow_pickle=allow_pickle)
        except AdaptkitError as e:
            return f"no linear weight merge of these adapters: {e}"
        handle.load(Path(tmp) / "merged", MERGE)
    average_saved(handle, [f"adapter{i}" for i in range(len(adapters))], weights, MERGE)
    return None


def evaluate_ensemble(model_ref: str | Path, data: str | Path, adapters: Sequence[str | Path], *,
                      weights: Sequence[float] | None = None, combine: str = "logits", task: str | None = None,
                      batch_size: int = 8, max_length: int = 512, precision: str = "fp32", device: str | None = None,
                      progress: bool = True, allow_pickle: bool = False) -> dict[str, Any]:
    """Score each adapter, their linear weight merge and their ensemble on `data` (module docstring)."""
    from ..live.ensembles import COMBINES, Ensemble, check_weights

    adapters = [str(a) for a in adapters]
    if len(adapters) < 2:
        raise AdaptkitError("an ensemble needs at least two adapters (--ensemble A1 --ensemble A2)")
    if combine not in COMBINES:
        raise AdaptkitError(f"unknown combine '{combine}' (known: {', '.join(COMBINES)})")
    norm = check_weights(weights, len(adapters))
    base, found, _ = _split_ref(model_ref, [], allow_pickle)
    if found:
        raise AdaptkitError(f"{model_ref}: is an adapter; with --ensemble, MODEL is the base model and each adapter "
                            "an --ensemble")
    info = _check_alike(adapters, [training_info(a) for a in adapters])
    task = task or (info or {}).get("task") or detect_task(read_jsonl(data))
    if combine == "vote" and task != "classification":
        raise AdaptkitError("--combine vote is a majority of predicted classes (classification); "
                            "use logits or probs for causal-lm")
    model, dataset, tokenizer = model_and_data(base, data, adapters, info, task, max_length, progress, allow_pickle)
    note = _merge_into(model, adapters, norm.tolist(), allow_pickle)
    members = [f"adapter{i}" for i in range(len(adapters))] + ([MERGE] if note is None else [])
    device = device or default_device()
    model.to(device).eval()
    tallies = _score(Ensemble(model, members, combine=combine), dataset, tokenizer, norm, batch_size=batch_size,
                     device=device, precision=precision, progress=progress)
    rows = [{"model": "adapter", "name": a, "weight": float(w), **t.result()}
            for a, w, t in zip(adapters, norm.tolist(), tallies)]
    merge = tallies[len(adapters)].result() if note is None else dict.fromkeys(tallies[0].result())
    rows.append({"model": "merge", "name": registry.default("merge", "ensemble"), "weight": None, **merge,
                 **({"note": note} if note else {})})
    rows.append({"model": "ensemble", "name": combine, "weight": None, **tallies[-1].result(combine != "vote")})
    return {"task": task, "combine": combine, "weights": norm.tolist(), "examples": len(dataset), "rows": rows}


def _score(runner, dataset, tokenizer, weights, *, batch_size: int, device: str, precision: str,
           progress: bool) -> list[_Tally]:
    """One tally per member of `runner` (the adapters first, weighted by `weights`), then the ensemble's."""
    import torch
    from tqdm.auto import tqdm

    from ..live.ensembles import combine_outputs

    cast, count = autocast(precision, device), len(weights)
    tallies = [_Tally(dataset.task) for _ in range(len(runner.names) + 1)]
    with torch.no_grad():
        for idx in tqdm(eval_batches(dataset, batch_size), desc="eval ensemble", disable=not progress,
                        file=sys.stderr, leave=False):
            batch = {k: v.to(device) for k, v in collate([dataset.examples[i] for i in idx], tokenizer).items()}
            labels = batch.pop("labels")
            with cast():
                logits = runner.members(**batch).float()
            for tally, z in zip(tallies, logits):
                tally.add(torch.log_softmax(z, -1), z.argmax(-1), labels)
            mixed = combine_outputs(logits[:count], weights, runner.combine)
            log_probs = (torch.log_softmax(mixed, -1) if runner.combine == "logits" else
                         mixed.log() if runner.combine == "probs" else None)  # a vote share is no probability
            tallies[-1].add(log_probs, mixed.argmax(-1), labels)
    return tallies
