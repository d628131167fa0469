"""Option types for numbers a user types: ranges checked, NaN and infinity refused, so a bad value is
a usage error in one line instead of a traceback or a silent default."""
from __future__ import annotations

import math

import click


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

__all__ = ["ALLOW_PICKLE", "Finite", "NON_NEGATIVE", "POSITIVE"]
