"""Training and evaluation data: JSON lines in, padded tensor batches out.

One record per line, by task:

    causal-lm        {"text": "..."}                       loss on every token
                     {"prompt": "...", "completion": "..."} loss on the completion only (+ EOS)
    classification   {"text": "...", "label": 2}           or "label": "positive"

A bad record is a one-line `AdaptkitError` naming the file and line. Integer labels are class ids;
string labels become ids in first-seen order, and that list (`Dataset.labels`) travels with the
trained adapter (training.json) so evaluation maps labels the same way. Batches are deterministic:
epoch e visits the examples in a permutation seeded by (seed, e), and each global batch is split
into disjoint contiguous shards, one per process, each cut into micro-batches.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..io import readers
from ..errors import AdaptkitError
from ..io.paths import regular_file
from ..validate import short

TASKS = ("causal-lm", "classification")
IGNORE = -100  # label of positions that carry no loss (prompt tokens, padding)
#: Most classes a classification label set may have (an integer label is a class id below it):
#: a label of 10**9 would otherwise ask for a billion-way head.
MAX_CLASSES = 10_000


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, record) for every non-blank line; bytes that are not UTF-8, invalid JSON, nesting
    deeper than `readers.MAX_DEPTH` or a non-object is an error naming file:line."""
    path = regular_file(path, "data file")
    rows = []
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            line = readers.decode(raw, path, line=n)
            if not line.strip():
                continue
            record = readers.parse_json(line.rstrip("\r\n"), path, line=n)  # an error at its end is on line n
            if not isinstance(record, dict):
                raise AdaptkitError(f"{path}:{n}: a record must be a JSON object, got {type(record).__name__}")
            rows.append((n, record))
    if not rows:
        raise AdaptkitError(f"{path}: no records")
    return rows


def detect_task(rows: list[tuple[int, dict]]) -> str:
    """classification when the first record has a `label`, else causal-lm."""
    return "classification" if "label" in rows[0][1] else "causal-lm"


def _text(path: Path, n: int, record: dict, key: str) -> str:
    if key not in record:
        raise AdaptkitError(f"{path}:{n}: missing field '{key}'")
    if not isinstance(record[key], str):
        raise AdaptkitError(f"{path}:{n}: field '{key}' must be a string, got {type(record[key]).__name__}")
    return record[key]


def _causal_fields(path: Path, n: int, record: dict) -> tuple[str | None, str]:
    """(prompt or None, text to learn)."""
    if "prompt" in record or "completion" in record:
        return _text(path, n, record, "prompt"), _text(path, n, record, "completion")
    if "text" not in record:
        raise AdaptkitError(f"{path}:{n}: missing field 'text' (causal-lm needs 'text', or 'prompt' and 'completion')")
    return None, _text(path, n, record, "text")


@dataclass
class Labels:
    """Class names by id: ints stand for themselves, strings get ids in first-seen order."""

    names: list = field(default_factory=list)
    fixed: bool = False  # a mapping from training: unknown labels are errors

    def id(self, value: Any, where: str) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise AdaptkitError(f"{where}: 'label' must be an integer or a string, got {type(value).__name__}")
        if isinstance(value, int):
            top = len(self.names) if self.fixed else MAX_CLASSES
            if not 0 <= value < top:
                raise AdaptkitError(f"{where}: label {short(value)} is not a class id (0 to {top - 1}"
                                    + (")" if self.fixed else f": at most {MAX_CLASSES} classes)"))
            if not self.fixed:
                self.names += list(range(len(self.names), value + 1))
            return value
        if value not in self.names:
            if self.fixed:
                more = f", … {len(self.names)} in all" if len(self.names) > 5 else ""
                raise AdaptkitError(f"{where}: label {short(value)} is not one of the trained labels "
                                    f"({', '.join(short(n) for n in self.names[:5])}{more})")
            if len(self.names) >= MAX_CLASSES:
                raise AdaptkitError(f"{where}: label {short(value)} would be class {MAX_CLASSES + 1}; "
                                    f"at most {MAX_CLASSES} classes")
            self.names.append(value)
        return self.names.index(value)


def _check_label_kinds(path: Path, rows: list[tuple[int, dict]]) -> None:
    kind = None
    for n, record in rows:
        if "label" not in record:
            raise AdaptkitError(f"{path}:{n}: missing field 'label' (classification needs 'text' and 'label')")
        here = "a string" if isinstance(record["label"], str) else "an integer"
        if kind and here != kind and not isinstance(record["label"], bool):
            raise AdaptkitError(f"{path}:{n}: label {short(record['label'])} is {here}, earlier labels are "
                                f"{kind[kind.index(' ') + 1:]}s")
        kind = kind or here


@dataclass
class Dataset:
    """Tokenized examples: each a dict of lists (`input_ids`, …) plus `labels` (list or int)."""

    task: str
    examples: list[dict]
    labels: list | None = None  # class names by id (classification)
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.examples)


def load_dataset(path: str | Path, tokenizer, *, task: str | None = None, max_length: int = 512,
                 labels: list | None = None) -> Dataset:
    """Read, check and tokenize `path` for `task` (detected from the first record when None)."""
    path = Path(path)
    rows = read_jsonl(path)
    task = task or detect_task(rows)
    if task not in TASKS:
        raise AdaptkitError(f"unknown task '{task}' (known: {', '.join(TASKS)})")
    if task == "classification":
        return _classification(path, rows, tokenizer, max_length, labels)
    return _causal(path, rows, tokenizer, max_length)


def _classification(path, rows, tokenizer, max_length, labels) -> Dataset:
    _check_label_kinds(path, rows)
    mapping = Labels(list(labels), fixed=True) if labels is not None else Labels()
    texts = [_text(path, n, r, "text") for n, r in rows]
    ids = [mapping.id(r["label"], f"{path}:{n}") for n, r in rows]
    enc = tokenizer(texts, truncation=True, max_length=max_length)
    examples = [{**{k: v[i] for k, v in enc.items()}, "labels": ids[i]} for i in range(len(rows))]
    return Dataset("classification", examples, mapping.names)


def _causal(path, rows, tokenizer, max_length) -> Dataset:
    fields = [_causal_fields(path, n, r) for n, r in rows]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    examples, skipped = [], []
    for (n, _), (prompt, text) in zip(rows, fields):
        if prompt is None:
            ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
            labels = list(ids)
        else:
            head = tokenizer(prompt)["input_ids"]
            tail = tokenizer(text, add_special_tokens=False)["input_ids"] + eos
            ids, labels = (head + tail)[:max_length], ([IGNORE] * len(head) + tail)[:max_length]
        if all(label == IGNORE for label in labels[1:]):  # nothing to predict after the first token
            skipped.append(n)
            continue
        examples.append({"input_ids": ids, "labels": labels})
    if not examples:
        raise AdaptkitError(f"{path}: no record has tokens to learn within max_length={max_length}")
    if skipped:
        import warnings

        warnings.warn(f"{path}: skipped {len(skipped)} record(s) with nothing to learn within max_length={max_length} "
                      f"(first: line {skipped[0]})", stacklevel=2)
    return Dataset("causal-lm", examples, None, len(skipped))


def collate(examples: list[dict], tokenizer) -> dict:
    """Pad a list of examples into tensors (the tokenizer's padding side); labels padded with -100."""
    import torch

    inputs = [{k: v for k, v in e.items() if k != "labels"} for e in examples]
    batch = dict(tokenizer.pad(inputs, return_tensors="pt"))
    labels = [e["labels"] for e in examples]
    if isinstance(labels[0], int):
        batch["labels"] = torch.tensor(labels)
        return batch
    width = batch["input_ids"].shape[1]
    left = tokenizer.padding_side == "left"
    padded = [([IGNORE] * (width - len(x)) + x) if left else (x + [IGNORE] * (width - len(x))) for x in labels]
    batch["labels"] = torch.tensor(padded)
    return batch


@dataclass
class Batches:
    """Deterministic batching: global batch = micro_batch × grad_accum × world examples; epoch e
    shuffles with seed (seed, e) and repeats its start to fill the last global batch; process
    `rank` takes its contiguous shard of each global batch, in grad_accum micro-batches."""

    size: int  # examples in the dataset
    micro_batch: int
    grad_accum: int = 1
    world: int = 1
    rank: int = 0
    seed: int = 0
    shuffle: bool = True

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.size / self.global_batch)

    def order(self, epoch: int) -> list[int]:
        import numpy as np

        perm = np.random.default_rng([self.seed, epoch]).permutation(self.size) if self.shuffle else np.arange(self.size)
        return np.resize(perm, self.steps_per_epoch * self.global_batch).tolist()

    def micro_batches(self, epoch: int, index: int) -> list[list[int]]:
        """Example indices of this process's micro-batches for batch `index` of `epoch`."""
        shard = self.micro_batch * self.grad_accum
        start = index * self.global_batch + self.rank * shard
        mine = self.order(epoch)[start:start + shard]
        return [mine[i:i + self.micro_batch] for i in range(0, shard, self.micro_batch)]


def eval_batches(dataset: Dataset, batch_size: int):
    """Example indices in order, `batch_size` at a time (the last batch may be short)."""
    return [list(range(i, min(i + batch_size, len(dataset)))) for i in range(0, len(dataset), batch_size)]
