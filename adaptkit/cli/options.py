"""What the commands share: option types for numbers a user types (ranges checked, NaN and infinity
refused, so a bad value is a usage error in one line instead of a traceback or a silent default),
the one --allow-pickle, the context settings every command is made with, and JSON output."""
from __future__ import annotations

import json
import math

import click

#: Context settings of every command: -h as well as --help, and help text up to 100 columns wide.
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class Finite(click.FloatRange):
    """A finite float within [min, max] (either open with min_open/max_open); NaN and ±inf refused.
    click's FloatRange alone lets NaN through, since every comparison with NaN is false."""

    name = "number"

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return super().convert(number, param, ctx)


#: Counts that must be at least one (ranks, batch sizes, steps, threads).
POSITIVE = click.IntRange(min=1)
#: Counts where zero means "none" (warm-up steps, gradient clipping off).
NON_NEGATIVE = click.IntRange(min=0)

#: The one --allow-pickle, on every command that reads a checkpoint (one option, one meaning).
ALLOW_PICKLE = click.option("--allow-pickle", is_flag=True,
                            help="Read .bin/.pt/.ckpt pickle checkpoints (torch.load weights_only=True, no code run).")


def emit_json(data) -> None:
    """Print a command's result as JSON (what --json prints): indented, keys sorted, anything else as str."""
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


__all__ = ["ALLOW_PICKLE", "CONTEXT", "Finite", "NON_NEGATIVE", "POSITIVE", "emit_json"]
