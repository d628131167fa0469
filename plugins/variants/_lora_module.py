"""LoRA's module plane (not a plugin; used by `lora.py`): initialization, the side branch, ΔW.

    y = W·x + s·B·A·dropout(x)                       LoRA
    y = m/‖W + s·B·A‖_row ⊙ (W·x + s·B·A·dropout(x))  DoRA (the norm is detached, as in the paper §4.3)

Initializations (PEFT's `init_lora_weights`): True — A Kaiming-uniform, B zero (embeddings: A
zero, B normal); "gaussian" — A ~ N(0, 1/r²); False — both random (non-trivial, for tests);
"pissa" — A = √S_r·V_rᵀ, B = U_r·√S_r from the top singular vectors of W/s, and W becomes the
residual W − s·B·A (Meng et al. 2024, arXiv 2404.02948).

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


def initial_factors(target, settings, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) as `settings["init"]` asks; PiSSA also turns `weight` (out × in) into the residual."""
    r, init = settings["r"], settings["init"]
    n_out, n_in = target.out_features, target.in_features
    a, b = torch.empty(r, n_in), torch.empty(n_out, r)
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
        merged = weight.float() + settings["scaling"] * (b @ a)
        params["lora_magnitude_vector"] = nn.Parameter(torch.linalg.norm(merged, dim=1))
    if initial is not None:  # PiSSA: the starting factors, to rebuild the original W (save, remove)
        params["initial_A"] = nn.Parameter(a.clone(), requires_grad=False)
        params["initial_B"] = nn.Parameter(b.clone(), requires_grad=False)
    return params


def factors(params: nn.ParameterDict) -> tuple[torch.Tensor, torch.Tensor]:
    if "lora_A" in params:
        return params["lora_A"], params["lora_B"]
    return params["lora_embedding_A"], params["lora_embedding_B"]


def forward(branch, base_layer, x, result):
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


def weight_delta(branch, weight: torch.Tensor) -> torch.Tensor:
    """ΔW (out × in) in float32; DoRA's depends on the base weight."""
    s, p = branch.settings, branch.params
    a, b = factors(p)
    update = s["scaling"] * (b.float() @ a.float())
    if "lora_magnitude_vector" not in p:
        return update
    return dora_change(p["lora_magnitude_vector"].float(), weight, update)


def dora_change(magnitude: torch.Tensor, weight: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """m ⊙ (W + ΔW) / ‖W + ΔW‖_row − W, all out × in."""
    merged = weight + update
    return (magnitude / torch.linalg.norm(merged, dim=1))[:, None] * merged - weight


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
