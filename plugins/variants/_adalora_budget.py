"""AdaLoRA's training side: the rank allocator and the orthogonality loss, as PEFT 0.21 computes them
(`peft.tuners.adalora.layer.RankAllocator`, `AdaLoraModel.update_and_allocate` and `.forward`).

Gradients: PEFT reads `p.grad` in `update_and_allocate`, so its loop must call it before
`zero_grad()`. Here every trained tensor carries a post-accumulate-grad hook that keeps a copy of its
accumulated gradient until the next `step_end`, so `step_end` may come before or after `zero_grad()`
(either kind) and gradient accumulation over micro-batches gives the summed gradient, as in PEFT.
The hooks and the importance EMAs live beside each layer's ParameterDict (a weak map); training
checkpoints save and restore them through the `train_state` hooks, so a resumed run is exact. A
deep copy of the model gets fresh hooks at its first `step_end` (until then `p.grad` is read).
"""
from __future__ import annotations

import weakref

import torch

from adaptkit.plugin import AdaptkitError

ROLES = ("lora_A", "lora_E", "lora_B")
_STATE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def state(params) -> dict:
    """One layer's allocator state {grad, ipt, unc} (role -> tensor); made, with the hooks, on first use."""
    found = _STATE.get(params)
    if found is None:
        found = _STATE[params] = {"grad": {}, "ipt": {}, "unc": {}}
        for role in ROLES:
            if params[role].requires_grad:
                params[role].register_post_accumulate_grad_hook(_catcher(found["grad"], role))
    return found


def train_state(layers) -> dict:
    """{"<layer path>.<grad|ipt|unc>.<role>": tensor} of every layer's allocator state."""
    found = {}
    for layer, branch in layers:
        for kind, tensors in state(branch.params).items():
            found.update({f"{layer.path}.{kind}.{role}": t.detach().clone() for role, t in tensors.items()})
    return found


def load_train_state(layers, tensors: dict) -> None:
    for layer, branch in layers:
        current = state(branch.params)  # registers the gradient hooks as a fresh run would
        for kind, held in current.items():
            held.clear()
            prefix = f"{layer.path}.{kind}."
            device = branch.params["lora_E"].device  # checkpoints are read onto the CPU
            held.update({k[len(prefix):]: t.to(device, copy=True) for k, t in tensors.items() if k.startswith(prefix)})


def _catcher(grads: dict, role: str):
    def catch(p):
        grads[role] = p.grad.detach().clone()
    return catch


def schedule(step: int, config, init_bgt: int, target_bgt: int) -> tuple[int, bool]:
    """(budget, mask now?): init_bgt up to tinit, then the cubic decrease
    b(t) = target + (init − target)·(1 − (t − tinit)/(T − tinit))³ (T = total_step − tfinal, truncated
    to an integer) with a mask every deltaT steps, then target_bgt."""
    tinit, tfinal, total = config["tinit"], config["tfinal"], config["total_step"]
    if step <= tinit:
        return init_bgt, False
    if step > total - tfinal:
        return target_bgt, True
    mul_coeff = 1 - (step - tinit) / (total - tfinal - tinit)
    return int((init_bgt - target_bgt) * (mul_coeff**3) + target_bgt), step % config["deltaT"] == 0


def _update_importance(branch, beta1: float, beta2: float) -> None:
    """I = |w·∂L/∂w| per entry; Ī ← β₁Ī + (1−β₁)I (sensitivity), Ū ← β₂Ū + (1−β₂)|I − Ī| (uncertainty)."""
    found = state(branch.params)
    for role in ROLES:
        p = branch.params[role]
        # The gradient the optimizer used (clipped; under DDP the all-reduced mean) while it is there.
        # After zero_grad() it is gone or all zeros: then the one a hook kept at backward time.
        grad = p.grad
        if grad is None or not grad.any():
            grad = found["grad"].get(role, grad)
        if grad is None:
            raise AdaptkitError(f"adalora: {role} has no gradient at step_end; call step_end after backward() "
                                "and optimizer.step() of every training step")
        if role not in found["ipt"]:
            found["ipt"][role], found["unc"][role] = torch.zeros_like(p), torch.zeros_like(p)
        ipt = (p * grad).abs().detach()
        found["ipt"][role] = beta1 * found["ipt"][role] + (1 - beta1) * ipt
        found["unc"][role] = beta2 * found["unc"][role] + (1 - beta2) * (ipt - found["ipt"][role]).abs()


def triplet_scores(branch) -> torch.Tensor:
    """S_i = s(E_i) + mean_j s(A_ij) + mean_k s(B_ki) with s = Ī·Ū, one score per rank (PEFT's _combine_ipt)."""
    found = state(branch.params)
    if not found["ipt"]:
        raise AdaptkitError("adalora: no importance scores yet; call step_end after every optimizer step from step 1")
    score = {role: found["ipt"][role] * found["unc"][role] for role in ROLES}
    ab = torch.cat([score["lora_A"].mean(dim=1, keepdim=True), score["lora_B"].mean(dim=0).view(-1, 1)], dim=1)
    return score["lora_E"].view(-1) + ab.sum(dim=1).view(-1)


def _mask_to_budget(layers, budget: int, init_bgt: int) -> dict[str, list[bool]]:
    """Zero E where S ≤ the (init_bgt − budget)-th smallest score over all layers; the kept masks."""
    scores = [triplet_scores(branch) for _, branch in layers]
    k = init_bgt - budget
    threshold = torch.kthvalue(torch.cat(scores), k=k)[0].item() if k > 0 else -float("inf")
    pattern = {}
    with torch.no_grad():
        for (layer, branch), score in zip(layers, scores):
            drop = score.view(-1, 1) <= threshold
            branch.params["lora_E"].masked_fill_(drop, 0.0)
            branch.settings["rank_mask"] = pattern[f"{layer.path}.lora_E"] = (~drop).view(-1).tolist()
    return pattern


def step_end(layers, config, step: int) -> None:
    """PEFT's update_and_allocate(step): before T = total_step − tfinal update the importance and mask
    to the scheduled budget every deltaT steps; at T mask to the final budget (the rank_pattern) and
    drop the EMAs; after T keep the masked E rows at zero. Masks go to `config["rank_pattern"]`."""
    last = config["total_step"] - config["tfinal"]
    for _, branch in layers:
        state(branch.params)
    try:
        if step > last:
            with torch.no_grad():
                for _, branch in layers:
                    mask, e = branch.settings.get("rank_mask"), branch.params["lora_E"]
                    if mask is not None and len(mask) == e.shape[0]:
                        e.masked_fill_(~torch.tensor(mask, dtype=torch.bool, device=e.device).view(-1, 1), 0.0)
            return
        resized = [layer.path for layer, branch in layers if branch.settings["r"] != branch.settings["init_r"]]
        if resized:
            raise AdaptkitError(f"adalora: {resized[0]} was loaded pruned to its rank_pattern; the rank allocator "
                                f"runs only on an adapter at init_r (step {step} ≤ total_step − tfinal = {last})")
        if step < last:
            for _, branch in layers:
                _update_importance(branch, config["beta1"], config["beta2"])
        init_bgt = sum(branch.params["lora_A"].shape[0] for _, branch in layers)
        budget, mask_now = schedule(step, config, init_bgt, config["target_r"] * len(layers))
        if mask_now or step == last:
            config["rank_pattern"] = _mask_to_budget(layers, budget, init_bgt)
        if step == last:
            for _, branch in layers:
                state(branch.params)["ipt"].clear()
                state(branch.params)["unc"].clear()
    finally:
        for _, branch in layers:
            state(branch.params)["grad"].clear()


def orth_loss(layers, config):
    """orth_reg_weight · mean over every P = A (A·Aᵀ) and Q = B (Bᵀ·B) of ‖cov − I‖_F (PEFT's forward)."""
    total, count = 0, 0
    for _, branch in layers:
        for role in ("lora_A", "lora_B"):
            p = branch.params[role]
            cov = p @ p.T if role == "lora_A" else p.T @ p
            eye = torch.eye(*cov.size(), out=torch.empty_like(cov))
            total = total + torch.norm(cov - eye, p="fro")
            count += 1
    return config["orth_reg_weight"] * (total / count if count else 0)
