"""Training metrics sent to TensorBoard or Weights & Biases, through their own libraries (`--report-to`).

    train("minilm", "lora", "train.jsonl", "out/", report_to=["tensorboard", "wandb"], run_name="r8")

Each record the loop writes to metrics.jsonl is logged at its step: "loss", "lr", "epoch" and
"elapsed" as train/<key>, the evaluation's "eval_<key>" as eval/<key>. TensorBoard writes event
files with `torch.utils.tensorboard.SummaryWriter` into OUT/runs/<run name>/; W&B runs
`wandb.init(project=$WANDB_PROJECT or "adaptkit", name=<run name>, dir=OUT)`, so WANDB_MODE,
WANDB_API_KEY and the rest of W&B's environment apply as W&B documents them. Files go into the run
folder that becomes OUT when training finishes, and every writer is closed before that rename.
Only the main process (rank 0) logs. The run name defaults to OUT's folder name.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import AdaptkitError

REPORTERS = ("tensorboard", "wandb")
EXTRA = "pip install 'adaptkit[report]'"


def parse_report_to(values: str | Iterable[str] | None) -> list[str]:
    """Reporter names from a list and/or comma lists ("tensorboard,wandb"), checked, in order, once each."""
    if values is None:
        return []
    values = [values] if isinstance(values, str) else list(values)
    names = []
    for value in values:
        for name in (n.strip().lower() for n in str(value).split(",")):
            if name and name not in REPORTERS:
                raise AdaptkitError(f"unknown --report-to '{name}' (known: {', '.join(REPORTERS)})")
            if name and name not in names:
                names.append(name)
    return names


def check_installed(names: Iterable[str]) -> None:
    """Fail in one line, before any model loads, when a reporter's library is missing."""
    for name in names:
        try:
            if name == "tensorboard":
                import tensorboard  # noqa: F401  (SummaryWriter needs the tensorboard package)
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401
            else:
                import wandb  # noqa: F401
        except ImportError:
            raise AdaptkitError(f"--report-to {name} needs the {name} library: {EXTRA}") from None


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record as named scalars: eval_<key> -> eval/<key>, the rest -> train/<key>."""
    found = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        found[f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"] = float(value)
    return found


class Reporters:
    """The reporters of one run: started by the first record logged, stopped by `close` (idempotent)."""

    def __init__(self, names: Iterable[str], run_name: str | None = None, config: dict | None = None):
        self.names = parse_report_to(names)
        check_installed(self.names)
        if run_name is not None and (not run_name.strip() or run_name in (".", "..") or set("/\\") & set(run_name)):
            raise AdaptkitError(f"--run-name names a folder under OUT/runs/: no '/', '\\', '.' or '..', got {run_name!r}")
        self.run_name, self.config = run_name, config or {}
        self.tensorboard: Any = None
        self.wandb: Any = None

    def log(self, record: dict[str, Any], folder: Path, default_name: str) -> None:
        """Log one metrics record at its step; the first call starts the writers, their files under
        `folder` (the run folder that becomes OUT), the run named `default_name` unless named."""
        self._open(folder, default_name)
        values, step = scalars(record), int(record["step"])
        if self.tensorboard is not None:
            for tag, value in values.items():
                self.tensorboard.add_scalar(tag, value, global_step=step)
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def _open(self, folder: Path, default_name: str) -> None:
        name = self.run_name or default_name
        if "tensorboard" in self.names and self.tensorboard is None:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(folder / "runs" / name))
        if "wandb" in self.names and self.wandb is None:
            import wandb

            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT") or "adaptkit", name=name, dir=str(folder),
                                    config=self.config)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
