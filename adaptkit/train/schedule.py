"""The learning-rate schedule of `adaptkit train`: linear warm-up, then half a cosine down to zero.

    lr(t) = lr₀ · t / w                                   for t < w (w warm-up steps)
    lr(t) = lr₀ · ½ · (1 + cos(π · (t − w) / (T − w)))     after, T the total steps

It is transformers' `get_cosine_schedule_with_warmup` (one half-cycle), written here because that
module imports PEFT when PEFT is installed: seconds of start-up for every run (measured with
`python -X importtime`). tests/test_train.py checks it against transformers' step by step.
"""
from __future__ import annotations

import math


def cosine_with_warmup(optimizer, warmup: int, total: int):
    """A LambdaLR over `optimizer` following the schedule above."""
    from torch.optim.lr_scheduler import LambdaLR

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return LambdaLR(optimizer, factor)
