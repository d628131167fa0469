"""Training's log, metrics.jsonl (written by `adaptkit train`: one JSON object a line, per optimizer step
{step, epoch, loss, lr, elapsed} and, where it evaluated, eval_loss and eval_accuracy or eval_perplexity),
read back for `training_figure`."""
from __future__ import annotations

import numbers
from pathlib import Path
from typing import Any

from ..errors import AdaptkitError
from ..io.paths import regular_file
from ..io.readers import decode, parse_json

LOG = "metrics.jsonl"
#: The figures `training_figure` draws; each must be a number where a record has it.
DRAWN = ("loss", "eval_loss", "eval_accuracy", "eval_perplexity")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file, or of the one in a training output folder, in step order."""
    path = Path(path)
    if path.is_dir():
        path = path / LOG
    path = regular_file(path, "training log")
    records = []
    for number, line in enumerate(decode(path.read_bytes(), path).splitlines(), 1):
        if not line.strip():
            continue
        record = parse_json(line, path, line=number)
        if not isinstance(record, dict) or not _whole(record.get("step")):
            raise AdaptkitError(f"{path}:{number}: a record is an object with an integer 'step' "
                                "(training's metrics.jsonl)")
        for key in DRAWN:
            if key in record and not _number(record[key]):
                raise AdaptkitError(f"{path}:{number}: '{key}' is {record[key]!r}, not a number")
        records.append(record)
    if not records:
        raise AdaptkitError(f"{path}: no records (has the training run a step yet?)")
    return sorted(records, key=lambda r: r["step"])


def _whole(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


__all__ = ["LOG", "read_metrics"]
