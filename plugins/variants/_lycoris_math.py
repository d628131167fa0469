"""The LyCORIS weight algebra LoHa and LoKr share (not a plugin; used by `loha.py`, `lokr.py` and the
kohya format). It imports torch, so its users import it on first use.

Written out as PEFT's `peft.tuners.loha` / `peft.tuners.lokr` and LyCORIS's `lycoris.functional`
compute it (both give the same numbers on the same tensors):

    Tucker core   T ×₁ aᵀ ×₂ bᵀ = einsum("i j k l, i p, j r -> p r k l", T, a, b)   (r × r × kh × kw core,
                  a r × out, b r × in: a conv weight out × in × kh × kw of rank r in its channels)
    LoHa          ΔW = s · (W1a·W1b) ⊙ (W2a·W2b),  each product a Tucker core instead for conv layers
                  with `use_effective_conv2d`; otherwise a conv's Wxb is r × (in·kh·kw)
    LoKr          ΔW = s · W1 ⊗ W2,  W1 = lokr_w1 or lokr_w1_a·lokr_w1_b (a × c),
                  W2 = lokr_w2, lokr_w2_a·lokr_w2_b or a Tucker core (b × d [× kh × kw]);
                  W1 gets trailing unit dims to match W2, so the product is (a·b) × (c·d) [× kh × kw]
    s             alpha / r (PEFT: r and alpha of the config, per module by rank/alpha_pattern)

The products come out 2-D for non-Tucker conv layers (out × in·kh·kw) and are reshaped to the base
weight, as both libraries do. LyCORIS's weight decomposition (`dora_scale`, its DoRA) rescales the
merged weight along the axis `dora_scale` lies on: W' = m ⊙ (W + ΔW) / (‖W + ΔW‖ + eps).
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from adaptkit.plugin import AdaptkitError

def tucker(core: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """einsum("i j k l, i p, j r -> p r k l"): the r × r × kernel core taken to out × in × kernel."""
    return torch.einsum("i j ..., i p, j r -> p r ...", core, a, b)


def hadamard(p: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """(W1a·W1b) ⊙ (W2a·W2b), with Tucker cores where `hada_t1` is present; unscaled."""
    if "hada_t1" in p:
        return tucker(p["hada_t1"], p["hada_w1_a"], p["hada_w1_b"]) * tucker(p["hada_t2"], p["hada_w2_a"], p["hada_w2_b"])
    # LyCORIS may store conv factors with unit kernel dims (out × r × 1 × 1, r × in × kh × kw): flattened
    return (p["hada_w1_a"].flatten(1) @ p["hada_w1_b"].flatten(1)) * (p["hada_w2_a"].flatten(1) @ p["hada_w2_b"].flatten(1))


def kronecker(p: Mapping[str, torch.Tensor], peft: bool = True) -> torch.Tensor:
    """W1 ⊗ W2 from whichever factors are stored (full, low-rank, Tucker); unscaled.

    One layout differs: a full 3-d W2 (nn.Conv1d, b × d × k). LyCORIS gives W1 a trailing unit dim, so
    W1 ⊗ W2 is (a·b) × (c·d) × k; PEFT (`peft`) passes W1 as it is, and torch.kron then puts the unit
    dim in front, which after PEFT's reshape to out × in × k is another ΔW. A PEFT file was trained
    with PEFT's, so it means PEFT's."""
    w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
    if "lokr_w2" in p:
        w2 = p["lokr_w2"]
    elif "lokr_t2" in p:
        w2 = tucker(p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"])
    else:
        w2 = p["lokr_w2_a"].flatten(1) @ p["lokr_w2_b"].flatten(1)
    if not (peft and w2.dim() == 3):
        w1 = w1.reshape(*w1.shape, *[1] * (w2.dim() - w1.dim()))
    return torch.kron(w1, w2.contiguous())


def fit(delta: torch.Tensor, shape, module: str) -> torch.Tensor:
    """ΔW reshaped to the base weight's shape, as PEFT and LyCORIS reshape it (the products of conv layers
    come out 2-D, or 3-d with PEFT's Conv1d layout: see `kronecker`)."""
    if math.prod(delta.shape) != math.prod(shape):
        raise AdaptkitError(f"{module}: the adapter's ΔW is {tuple(delta.shape)}, which does not fit a base weight of "
                            f"shape {tuple(shape)}; is it for a different base model?")
    return delta.reshape(shape)


def decompose(delta: torch.Tensor, base: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """LyCORIS's weight decomposition as a change: m ⊙ (W + ΔW) / (‖W + ΔW‖ + eps) − W, the norm taken
    per output channel when m is out × 1 × …, else per input channel (m 1 × in × …)."""
    merged = base + delta
    if magnitude.shape[0] == merged.shape[0] and magnitude.numel() == merged.shape[0]:
        norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (merged.dim() - 1))
    else:
        inward = merged.transpose(0, 1)
        norm = inward.reshape(inward.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (merged.dim() - 1)).transpose(0, 1)
    if math.prod(norm.shape) != magnitude.numel():
        raise AdaptkitError(f"dora_scale of shape {tuple(magnitude.shape)} matches neither axis of a weight of shape "
                            f"{tuple(merged.shape)}")
    return merged * (magnitude.reshape(norm.shape) / (norm + torch.finfo(merged.dtype).eps)) - base


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """PEFT's and LyCORIS's split of a dimension into m ≤ n with m·n = dimension: m = `factor` where it
    divides, else the divisor pair nearest √dimension with m ≤ factor (-1: no bound)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    factor = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def kaiming(*shape: int) -> torch.Tensor:
    return nn.init.kaiming_uniform_(torch.empty(*shape), a=math.sqrt(5))


def rank_dropped(delta: torch.Tensor, rate: float, rescale: bool) -> torch.Tensor:
    """PEFT's rank dropout: whole output rows of ΔW dropped with probability `rate`, the rest scaled by
    1 / (the kept share) where `rescale`."""
    keep = (torch.rand(delta.shape[0], device=delta.device) > rate).to(delta.dtype)
    if rescale:
        keep = keep / keep.mean()
    return delta * keep.view(-1, *[1] * (delta.dim() - 1))


def run(branch, base_layer, x: torch.Tensor, result: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The layer output plus its branch: ΔW applied to x the way the base layer applies its weight."""
    s = branch.settings
    if branch.training and s["module_dropout"] and float(torch.rand(1)) <= s["module_dropout"]:
        return result  # PEFT's module dropout: the whole branch skipped for this step
    if branch.training and s["rank_dropout"]:
        delta = rank_dropped(delta, s["rank_dropout"], s["rank_dropout_scale"])
    x = x.to(delta.dtype)
    if delta.dim() == 2:
        return result + F.linear(x, delta).to(result.dtype)
    conv = F.conv1d if delta.dim() == 3 else F.conv2d
    out = conv(x, delta, stride=base_layer.stride, padding=base_layer.padding, dilation=base_layer.dilation,
               groups=base_layer.groups)
    return result + out.to(result.dtype)


def layer_shape(path: str, target, family: str) -> tuple[int, ...]:
    """The base weight's shape, out × in [× kernel] (in per group), of a layer LoHa/LoKr can adapt, or a
    one-line refusal naming the layer (PEFT adapts nn.Linear, nn.Conv1d and nn.Conv2d only)."""
    if target.kind == "linear" and not target.transposed:
        return target.out_features, target.in_features
    if target.kind == "conv" and len(target.kernel) in (1, 2):
        return target.out_features, target.in_features // target.groups, *target.kernel
    what = "transformers Conv1D" if target.transposed and target.kind == "linear" else \
        f"{len(target.kernel)}-d convolution" if target.kind == "conv" else f"{target.kind} layer"
    raise AdaptkitError(f"{path}: {family} adapts nn.Linear, nn.Conv1d and nn.Conv2d layers (as PEFT), not a {what}; "
                        "leave it out of target_modules")
