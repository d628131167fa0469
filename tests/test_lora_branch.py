"""LoRA's branch on a linear layer costs no pass over the layer's whole output of its own: the scale
goes on the r-wide hidden and the sum into the GEMM (plugins/variants/_lora_module.py `_plain`)."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import adaptkit as ak

BATCH, IN, OUT, R = 32, 48, 256, 4


class FullSizeOps(TorchDispatchMode):
    """The aten ops (besides GEMMs) whose result has the layer output's size."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.numel() == BATCH * OUT and func.__name__.split(".")[0] in (
                "mul", "add", "add_", "mul_", "sub", "div"):
            self.seen.append(func.__name__)
        return out


def net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(IN, OUT, bias=False))


@pytest.mark.parametrize("alpha", [4, 12])  # scaling 1 and 3
def test_branch_adds_no_full_size_elementwise_op(alpha):
    model = net()
    ak.inject(model, "lora", r=R, lora_alpha=alpha, target_modules=["0"], init_lora_weights=False)
    x = torch.randn(BATCH, IN, requires_grad=True)
    with FullSizeOps() as ops:
        y = model(x)
        y.backward(torch.ones_like(y))
    assert ops.seen == []
    # and the result is y = W·x + (α/r)·B·A·x, written out
    layer = model[0]
    a, b = (p for n, p in layer.named_parameters() if "lora_A" in n or "lora_B" in n)
    base = [p for n, p in layer.named_parameters() if n.endswith("weight") and "lora" not in n][0]
    torch.testing.assert_close(y, x @ base.T + alpha / R * (x @ a.T @ b.T), rtol=1e-5, atol=1e-5)
