"""Evaluation: loss and perplexity (causal LM) or loss and accuracy (classification) on JSON lines.

    adaptkit.train.evaluate("minilm", "test.jsonl", adapters=["out/"])      # -> {"loss": ..., "accuracy": ...}
    soup.greedy(candidates, scorer("dev.jsonl"), out="soup/")                 # −loss or accuracy as the score

Causal LM loss is the mean over every predicted token of the whole set (padding and prompt tokens
excluded), perplexity its exponential; classification loss is the mean cross-entropy over examples.
Class labels map to ids as the adapter was trained (its training.json), else through the model's
own label names, else as `adaptkit.train.data` maps them (ints as ids, strings in first-seen order).
"""
from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .. import validate
from ..io import readers
from .data import IGNORE, Dataset, collate, detect_task, eval_batches, load_dataset, read_jsonl
from ..errors import AdaptkitError
from .models import build_model, load_adapters, load_tokenizer, resolve_base, training_info

PRECISIONS = ("fp32", "bf16", "fp16")


def autocast(precision: str, device: str) -> Callable[[], contextlib.AbstractContextManager]:
    """A context factory: torch.autocast for bf16/fp16, nothing for fp32."""
    import torch

    if precision not in PRECISIONS:
        raise AdaptkitError(f"unknown precision '{precision}' (known: {', '.join(PRECISIONS)})")
    if precision == "fp32":
        return contextlib.nullcontext
    kind = "cuda" if str(device).startswith("cuda") else "cpu"
    if precision == "fp16" and kind != "cuda":
        raise AdaptkitError("--precision fp16 needs a CUDA GPU (float16 with loss scaling); use bf16 on the CPU")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(kind, dtype=dtype)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def evaluate_model(model, dataset: Dataset, tokenizer, *, batch_size: int = 8, device: str = "cpu",
                   precision: str = "fp32", progress: bool = False) -> dict[str, Any]:
    """Batch-wise, without gradients: {loss, perplexity | accuracy, examples, tokens?}."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    cast, was_training = autocast(precision, device), model.training
    loss_sum, count, correct = 0.0, 0, 0
    model.eval()
    try:
        with torch.no_grad():
            for idx in tqdm(eval_batches(dataset, batch_size), desc="eval", disable=not progress, file=sys.stderr,
                            leave=False):
                batch = {k: v.to(device) for k, v in collate([dataset.examples[i] for i in idx], tokenizer).items()}
                labels = batch.pop("labels")
                with cast():
                    logits = model(**batch).logits.float()
                if dataset.task == "classification":
                    loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
                    correct += int((logits.argmax(-1) == labels).sum())
                    count += len(idx)
                    continue
                logits, labels = logits[:, :-1], labels[:, 1:]
                loss_sum += F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE,
                                            reduction="sum").item()
                count += int((labels != IGNORE).sum())
    finally:
        model.train(was_training)
    loss = loss_sum / max(count, 1)
    if dataset.task == "classification":
        return {"loss": loss, "accuracy": correct / max(count, 1), "examples": len(dataset)}
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "examples": len(dataset), "tokens": count}


def _split_ref(model_ref: str | Path, adapters: Sequence[str | Path],
               allow_pickle: bool = False) -> tuple[str, list[str], dict | None]:
    """(base ref, adapters, training info): MODEL may itself be an adapter folder trained here (any format)."""
    from ..adapter import read_adapter

    adapters = [str(a) for a in adapters]
    adapter = read_adapter(model_ref, allow_pickle=allow_pickle) if Path(model_ref).is_dir() else None
    if adapter is not None:
        adapters = [str(model_ref), *adapters]
        info = training_info(model_ref)
        base = (info or {}).get("base") or adapter.config.get("base_model_name_or_path")
        if not base:
            raise AdaptkitError(f"{model_ref}: an adapter that does not name its base model; give the base as MODEL "
                                "and the adapter with --adapter")
        return str(base), adapters, info
    info = next((i for i in map(training_info, adapters) if i), None) or training_info(model_ref)
    return str(model_ref), adapters, info


def _label_names(info: dict | None, folder: Path) -> list | None:
    """Class names by id: the adapter's training.json, else the model's own non-generic id2label."""
    if info and info.get("labels") is not None:
        return info["labels"]
    names = _model_config(folder).get("id2label") or {}
    if names and any(v != f"LABEL_{k}" for k, v in names.items()):
        if sorted(names) != sorted(map(str, range(len(names)))):
            raise AdaptkitError(f"{folder / 'config.json'}: id2label must map the class ids 0 to {len(names) - 1}, "
                                f"got keys such as {validate.short(next(iter(names)))}")
        return [names[str(i)] for i in range(len(names))]
    return None


def _model_config(folder: Path) -> dict:
    """The model's config.json, the fields adaptkit reads checked."""
    path = folder / "config.json"
    return validate.model_config(readers.read_json(path), path)


def _num_labels(folder: Path, names: list | None, dataset: Dataset) -> int:
    if names is not None:
        return len(names)
    config = _model_config(folder)
    trained = any(str(a).endswith("ForSequenceClassification") for a in config.get("architectures") or ())
    return max(len(dataset.labels or ()), config.get("num_labels", 0) if trained else 0)


def model_and_data(base: str | Path, data, adapters: Sequence[str | Path], info: dict | None, task: str,
                   max_length: int, progress: bool, allow_pickle: bool):
    """The base model with `adapters` loaded (active together), the dataset and the tokenizer."""
    folder = resolve_base(base)
    tokenizer = load_tokenizer(folder)
    names = _label_names(info, folder) if task == "classification" else None
    dataset = load_dataset(data, tokenizer, task=task, max_length=max_length, labels=names)
    num_labels = _num_labels(folder, names, dataset) if task == "classification" else None
    model, new = build_model(folder, task, num_labels=num_labels, progress=progress, allow_pickle=allow_pickle)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    load_adapters(model, adapters, new, allow_pickle=allow_pickle)
    return model, dataset, tokenizer


def evaluate(model_ref: str | Path, data: str | Path, adapters: Sequence[str | Path] = (), *, task: str | None = None,
             batch_size: int = 8, max_length: int = 512, precision: str = "fp32", device: str | None = None,
             progress: bool = True, allow_pickle: bool = False) -> dict[str, Any]:
    """Evaluate a model (a folder, `org/name[@rev]` or `minilm`) with `adapters` on it, active together."""
    base, adapters, info = _split_ref(model_ref, adapters, allow_pickle)
    task = task or (info or {}).get("task") or detect_task(read_jsonl(data))
    model, dataset, tokenizer = model_and_data(base, data, adapters, info, task, max_length, progress, allow_pickle)
    device = device or default_device()
    model.to(device)
    result = evaluate_model(model, dataset, tokenizer, batch_size=batch_size, device=device, precision=precision,
                            progress=progress)
    return {"task": task, **result}


def scorer(data: str | Path, *, task: str | None = None, **options: Any) -> Callable[[Path], float]:
    """A soup score function for a model folder: −loss for causal LM, accuracy for classification."""
    options.setdefault("progress", False)

    def score(folder: Path) -> float:
        result = evaluate(folder, data, task=task, **options)
        return result["accuracy"] if result["task"] == "classification" else -result["loss"]

    return score
