"""LoRA's module plane (not a plugin; used by `lora.py`): initialization, the side branch, ΔW.

    y = W·x + s·B·A·dropout(x)                       LoRA
    y = m/‖W + s·B·A‖_row ⊙ (W·x + s·B·A·dropout(x))  DoRA (the norm is detached, as in the paper §4.3)

Initializations (PEFT's `init_lora_weights`): True — A Kaiming-uniform, B zero (embeddings: A
zero, B normal); "gaussian" — A ~ N(0, 1/r²); False — both random (non-trivial, for tests);
"pissa" — A = √S_r·V_rᵀ, B = U_r·√S_r from the top singular vectors of W/s, and W becomes the
residual W − s·B·A (Meng et al. 2024, arXiv 2404.02948).

Convolutions (W out × in/g × *kernel, g groups) run as PEFT's two convolutions: A (r × in × *kernel,
the layer's stride, padding and dilation, all input channels) then B (out × r/g × 1…, g groups):

    y = conv(x, W) + s·conv_g(conv(dropout(x), A), B)

With g = 1 that is conv(x, ΔW) with ΔW = s·(B·A) over the flattened kernels, reshaped to W's shape
(PEFT's get_delta_weight); with g > 1 the branch mixes channels across groups, which no grouped
kernel holds, so it cannot be merged (PEFT refuses too). DoRA's norm is over each output's
whole kernel; PEFT stores its magnitude as 1 × out × 1…. A takes the layer's dilation too (PEFT's
ignores it, so PEFT cannot run a dilated layer at all): the branch stays equal to its merge.

LoRA-FA (Zhang et al. 2023, arXiv 2308.03303) freezes A. Autograd then keeps only the
r-dimensional A·x for B's gradient, not the layer input x (A's gradient, which needs x, is never
formed); benchmarks/adapters.py measures the saved activations.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from adaptkit.plugin import AdaptkitError


def check_conv(path: str, target, config, r: int) -> None:
    """The convolution cases PEFT supports, the others refused by name."""
    groups = target.groups
    if r < 1:
        raise AdaptkitError(f"{path}: rank must be at least 1, got {r}")
    if groups > 1 and config["use_dora"]:  # PEFT builds it, but its norm is not DoRA's (tests/test_peft_gaps.py)
        raise AdaptkitError(f"{path}: conv LoRA with groups={groups} and use_dora is not supported: PEFT's DoRA norm there "
                            "is taken of B·A reshaped across groups, not of W + ΔW, and it cannot be merged")
    if r % groups:
        raise AdaptkitError(f"{path}: conv LoRA with groups={groups} needs a rank divisible by {groups}, got {r}")
    if config["init_lora_weights"] == "pissa":
        raise AdaptkitError(f"{path}: conv LoRA with init_lora_weights='pissa' is not supported")


def shapes(target, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(A, B) shapes: r × in and out × r; convolutions r × in × *kernel and out × r/groups × 1…"""
    if target.kind != "conv":
        return (r, target.in_features), (target.out_features, r)
    ones = (1,) * len(target.kernel)
    return (r, target.in_features, *target.kernel), (target.out_features, r // target.groups, *ones)


def product(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """B·A shaped as the weight: convolution kernels are multiplied flattened, then take W's shape."""
    if a.dim() == 2:
        return b @ a
    return (b.flatten(1) @ a.flatten(1)).view(b.shape[0], *a.shape[1:])


def initial_factors(target, settings, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) as `settings["init"]` asks; PiSSA also turns `weight` (out × in) into the residual."""
    r, init = settings["r"], settings["init"]
    a_shape, b_shape = shapes(target, r)
    a, b = torch.empty(a_shape), torch.empty(b_shape)
    if target.kind == "embedding" and init in (True, "gaussian"):
        return nn.init.zeros_(a), nn.init.normal_(b)
    if init is True:
        return nn.init.kaiming_uniform_(a, a=math.sqrt(5)), nn.init.zeros_(b)
    if init == "gaussian":
        return nn.init.normal_(a, std=1 / r), nn.init.zeros_(b)
    if init is False:
        return nn.init.kaiming_uniform_(a, a=math.sqrt(5)), nn.init.kaiming_uniform_(b, a=math.sqrt(5))
    if init == "pissa":
        u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
        root = (s[:r] / settings["scaling"]).sqrt()
        a, b = root[:, None] * vh[:r], u[:, :r] * root
        weight.sub_((settings["scaling"] * (b @ a)).to(weight.dtype))
        return a.contiguous(), b.contiguous()
    raise AdaptkitError(f"init_lora_weights must be true, false, 'gaussian' or 'pissa', got {init!r}")


def create(target, settings, weight, trainable_a: bool = True) -> nn.ParameterDict:
    initial = weight.clone() if settings["init"] == "pissa" else None
    a, b = initial_factors(target, settings, weight)
    embedding = target.kind == "embedding"
    names = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
    params = nn.ParameterDict({names[0]: nn.Parameter(a, requires_grad=trainable_a), names[1]: nn.Parameter(b)})
    if settings.get("bias"):  # PEFT's lora_bias: B's bias starts at zero
        params["lora_B_bias"] = nn.Parameter(torch.zeros(b.shape[0], dtype=b.dtype, device=b.device))
    if settings["use_dora"]:
        merged = weight.float() + settings["scaling"] * product(b, a)
        norm = torch.linalg.norm(merged.flatten(1), dim=1)
        params["lora_magnitude_vector"] = nn.Parameter(norm if a.dim() == 2 else norm.view(1, -1, *b.shape[2:]))
    if initial is not None:  # PiSSA: the starting factors, to rebuild the original W (save, remove)
        params["initial_A"] = nn.Parameter(a.clone(), requires_grad=False)
        params["initial_B"] = nn.Parameter(b.clone(), requires_grad=False)
    return params


def factors(params: nn.ParameterDict) -> tuple[torch.Tensor, torch.Tensor]:
    if "lora_A" in params:
        return params["lora_A"], params["lora_B"]
    return params["lora_embedding_A"], params["lora_embedding_B"]


def forward(branch, base_layer, x, result):
    if branch.target.kind == "conv":
        return conv_forward(branch, base_layer, x, result)
    s, p = branch.settings, branch.params
    a, b = factors(p)
    if branch.target.kind == "embedding":
        hidden = F.embedding(x, a.T, padding_idx=getattr(base_layer, "padding_idx", None))
        lora = hidden @ b.T * s["scaling"]
        if "lora_magnitude_vector" not in p:
            return result + lora.to(result.dtype)
        # DoRA: one magnitude per embedding dimension (a column of the table), as PEFT's embeddings
        norm = torch.linalg.norm(base_layer.weight.T.to(a.dtype) + s["scaling"] * (b @ a), dim=1).detach()
        scale = p["lora_magnitude_vector"] / norm
        return result + ((scale - 1) * result + scale * lora).to(result.dtype)
    dropped = F.dropout(x, s["dropout"], branch.training) if s["dropout"] else x
    dropped = dropped.to(a.dtype)
    if "lora_magnitude_vector" not in p and "lora_B_bias" not in p and (
            a.dtype == result.dtype or torch.is_autocast_enabled(result.device.type)):
        return _plain(result, F.linear(dropped, a) * s["scaling"], b)
    lora = F.linear(F.linear(dropped, a), b, p["lora_B_bias"] if "lora_B_bias" in p else None) * s["scaling"]
    if "lora_magnitude_vector" not in p:
        return result + lora.to(result.dtype)
    weight = base_layer.weight.T if branch.target.transposed else base_layer.weight
    norm = torch.linalg.norm(weight.to(a.dtype) + s["scaling"] * (b @ a), dim=1).detach()
    scale = p["lora_magnitude_vector"] / norm
    bias = getattr(base_layer, "bias", None)
    if s["dropout"]:
        base = F.linear(dropped, weight.to(a.dtype))
    else:
        base = result if bias is None else result - bias
    return result + ((scale - 1) * base + scale * lora).to(result.dtype)


def _plain(result: torch.Tensor, hidden: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """y + (s·A·x)·Bᵀ as one GEMM: the scale applied to the r-wide hidden, the sum as addmm's β = 1.
    The usual y + (B·A·x)·s makes three passes over the layer's whole output (a multiply and an add
    forward, the multiply's gradient backward), which this makes none (tests/test_lora_branch.py)."""
    out = torch.addmm(result.reshape(-1, result.shape[-1]), hidden.reshape(-1, hidden.shape[-1]), b.T)
    return out.view(result.shape)


_CONV = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}


def conv_forward(branch, base_layer, x, result):
    """The branch on a convolution (see the module docstring), DoRA as on linear layers with one
    magnitude per output channel."""
    s, p = branch.settings, branch.params
    a, b = p["lora_A"], p["lora_B"]
    conv, ones = _CONV[a.dim()], (1,) * (a.dim() - 2)
    dropped = (F.dropout(x, s["dropout"], branch.training) if s["dropout"] else x).to(a.dtype)
    hidden = conv(dropped, a, None, base_layer.stride, base_layer.padding, base_layer.dilation)
    lora = conv(hidden, b, p["lora_B_bias"] if "lora_B_bias" in p else None, groups=base_layer.groups) * s["scaling"]
    if "lora_magnitude_vector" not in p:
        return result + lora.to(result.dtype)
    weight = base_layer.weight.to(a.dtype)
    norm = torch.linalg.norm((weight + s["scaling"] * product(b, a)).flatten(1), dim=1).detach()
    scale = (p["lora_magnitude_vector"].flatten() / norm).view(1, -1, *ones)
    bias = getattr(base_layer, "bias", None)
    if s["dropout"]:
        base = base_layer._conv_forward(dropped, weight, None)  # conv(x, W) without the bias
    else:
        base = result if bias is None else result - bias.view(1, -1, *ones)
    return result + ((scale - 1) * base + scale * lora).to(result.dtype)


def weight_delta(branch, weight: torch.Tensor) -> torch.Tensor:
    """ΔW (out × in, or the kernel's shape) in float32; DoRA's depends on the base weight."""
    s, p = branch.settings, branch.params
    a, b = factors(p)
    if branch.target.kind == "conv" and branch.target.groups > 1:
        raise AdaptkitError(f"conv LoRA with groups={branch.target.groups} cannot be merged: B·A mixes channels "
                            "across groups, which the grouped kernel cannot hold (PEFT refuses too)")
    update = s["scaling"] * product(b.float(), a.float())
    if "lora_magnitude_vector" not in p:
        return update
    return dora_change(p["lora_magnitude_vector"].float(), weight, update)


def dora_change(magnitude: torch.Tensor, weight: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """m ⊙ (W + ΔW) / ‖W + ΔW‖_row − W, out × in (a convolution's row: one output's whole kernel)."""
    merged = weight + update
    scale = magnitude.flatten() / torch.linalg.norm(merged.flatten(1), dim=1)
    return scale.view(-1, *(1,) * (merged.dim() - 1)) * merged - weight


def save_tensors(branch) -> dict[str, torch.Tensor]:
    """The branch's tensors as PEFT stores them. PiSSA factors are saved as a LoRA of rank 2r on the
    original W: s·(B·A − B₀·A₀) = s·[B, −B₀]·[A; A₀], exact."""
    p = {k: v.detach() for k, v in branch.params.items()}
    if "initial_A" not in p:
        return p
    a_role, b_role = ("lora_A", "lora_B") if "lora_A" in p else ("lora_embedding_A", "lora_embedding_B")
    p[a_role] = torch.cat([p[a_role], p.pop("initial_A")])
    p[b_role] = torch.cat([p[b_role], -p.pop("initial_B")], dim=1)
    return p


def param_groups(named: list, lr: float, config: dict) -> list[dict]:
    """LoRA+: B (and embedding B) at `loraplus_lr_ratio` × lr, everything else at lr."""
    ratio = config.get("loraplus_lr_ratio") or 1.0
    fast = [p for n, p in named if n.endswith(("lora_B", "lora_embedding_B"))]
    slow = [p for n, p in named if not n.endswith(("lora_B", "lora_embedding_B"))]
    return [g for g in ({"params": slow, "lr": lr}, {"params": fast, "lr": lr * ratio}) if g["params"]]


def bias_delta(branch) -> torch.Tensor | None:
    """s·β when B has a bias (`lora_bias`)."""
    p = branch.params
    return branch.settings["scaling"] * p["lora_B_bias"].float() if "lora_B_bias" in p else None


def resident(branch) -> torch.Tensor | None:
    """PiSSA leaves W − s·B₀·A₀ in the base layer; that change is −s·B₀·A₀."""
    p = branch.params
    return -branch.settings["scaling"] * (p["initial_B"] @ p["initial_A"]) if "initial_A" in p else None
