"""Training in several processes (`torchrun --nproc_per_node N`): the process group and the strategy
that spreads the model over the processes.

- `ddp`: every process holds the whole model; DistributedDataParallel averages the gradients.
- `fsdp`: PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`) shards every parameter, the frozen
  base's and the adapter's alike, along its first axis across the processes: one unit per decoder
  block (the model's `_no_split_modules`), then the root. A block's parameters are gathered while it
  runs and freed after, so each process keeps about 1/N of the model between layers. Gradients are
  averaged over the processes (reduce-scatter), as DDP does, so both equal one process with N times
  the accumulation. bf16 runs gather the parameters in bf16 and reduce gradients in float32.

  Tensors several blocks share (VeRA's frozen projections, Tied-LoRA's trained pair) cannot be
  sharded block by block: they stay whole on every process, outside FSDP, and the trained ones have
  their gradients averaged over the processes after the step's last backward (`syncing`), as DDP's.

Either way every process reads a disjoint shard of each global batch (data.Batches), and only rank 0
writes files; what it writes is gathered whole first (`whole`), so the files are those of one process.
Training hooks that use an adapter's tensors between steps (AdaLoRA, Delta-LoRA) see them whole
(`unsharded`). FSDP refuses (`check`) what it would get wrong: prompt learning, whose tensors are used
before the sharded forward.
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

from ..errors import AdaptkitError
from .evaluation import default_device

STRATEGIES = ("ddp", "fsdp")


def init(device: str | None) -> tuple[int, int, str, bool]:
    """(world size, rank, device, created a process group?) — torchrun sets WORLD_SIZE and LOCAL_RANK."""
    import torch

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 1, 0, device or default_device(), False
    import torch.distributed as dist

    cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_world_size(), dist.get_rank(), device or "cpu", created


def barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def mean(world: int, value: float, device: str) -> float:
    """`value` averaged over the processes."""
    if world <= 1:
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / world


def gather(world: int, value) -> list:
    """Every process's `value` (a picklable object), in rank order, on every process."""
    if world <= 1:
        return [value]
    import torch.distributed as dist

    found = [None] * world
    dist.all_gather_object(found, value)
    return found


def blocks(model) -> list:
    """The model's repeated blocks (decoder or encoder layers): the outermost modules of the classes
    transformers names in `_no_split_modules`, the units that must stay whole on one device."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    found: dict[str, object] = {}
    for path, module in model.named_modules():
        if path and type(module).__name__ in names and not any(path.startswith(p + ".") for p in found):
            found[path] = module
    if not found:
        raise AdaptkitError(f"{type(model).__name__} names no repeated blocks (_no_split_modules) to shard one by one")
    return list(found.values())


def check(handle, strategy: str, world: int) -> None:
    """Refuse, before the run folder is opened, an adapter the strategy cannot train (FSDP: tensors
    several blocks share; hooks that use the tensors outside the sharded forward)."""
    if world > 1 and strategy == "fsdp":
        _outside_forward(handle)
        blocks(handle.model)


def wrap(handle, strategy: str, world: int, device: str, precision: str):
    """What the loop calls: the handle's model itself (one process; `fsdp`, sharded in place, the
    handle's training hooks then seeing whole tensors through `unsharded`) or its DDP wrapper."""
    model = handle.model
    if world <= 1:
        return model
    if strategy == "fsdp":
        shard(model, precision)
        handle.unsharded = unsharded
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device] if str(device).startswith("cuda") else None
    return DistributedDataParallel(model, device_ids=ids)  # every adapter tensor is on the forward path


def shard(model, precision: str) -> None:
    """FSDP2 over `model` in place: each block its own unit, the rest (embeddings, head) the root's.
    The mixed-precision policy follows `precision`: bf16 / fp16 parameters while they are gathered,
    gradients reduced in float32 (the trained tensors stay float32). A quantized base is sharded as
    stored (`_shard_packed`)."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)
    units = blocks(model)
    shared = _shared(units)
    _shard_packed(model)
    for block in units:
        fully_shard(block, mp_policy=policy, ignored_params=set(shared) or None)
    fully_shard(model, mp_policy=policy, ignored_params=set(shared) or None)
    model._adaptkit_replicated = [p for p in shared if p.requires_grad]  # averaged by `syncing`


def _outside_forward(handle) -> None:
    """FSDP gathers a unit's tensors only while the unit runs. Hooks between steps (an extra loss
    term, a step-end update of W or of the rank budget) get whole tensors through `unsharded`; a
    rewrite of the model's call (prompt learning) runs before the root unit gathers anything and
    would see only this process's shards: such variants are refused by name."""
    from .. import spec

    for name in handle.active:
        variant = handle.adapters[name].variant
        if isinstance(variant, spec.RewritesCall):
            raise AdaptkitError(f"--strategy fsdp: the {variant.name} adapter's rewrite_call uses its tensors "
                                "outside the sharded forward, where FSDP keeps them sharded; use --strategy ddp")


def _shared(units: list) -> list:
    """The parameters several blocks share (an adapter's tensors common to all layers), which FSDP2,
    sharding each block apart, cannot shard: they are left whole on every process (FSDP's ignored_params).
    In the blocks' order, the same on every process (their gradients are reduced in it)."""
    owner: dict[int, int] = {}
    shared = {}
    for i, block in enumerate(units):
        for _, p in block.named_parameters(remove_duplicate=False):
            if owner.setdefault(id(p), i) != i:
                shared[id(p)] = p
    return list(shared.values())


def _shard_packed(model) -> None:
    """Each quantized layer (QLoRA) its own FSDP unit, its packed tensors and their states (absmax,
    code) split across the processes as stored. They are buffers, which FSDP2 would keep whole on
    every process, so they become frozen parameters first. The unit gathers them as bytes, whatever
    their dtypes (FSDP2 all-gathers mixed dtypes through a uint8 view), and casts none of them: a
    float32 absmax rounded to bf16 would change Ŵ. The layer unpacks Ŵ while it runs, as in one
    process, and the shards are freed after it (so the packed weights are whole one layer at a time).
    This is what the FSDP + QLoRA recipe gets from bitsandbytes' quant_storage, without reinterpreting
    the packed bytes as floats."""
    from torch import nn
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from ..quant.quantized import QuantizedLinear

    for layer in [m for m in model.modules() if isinstance(m, QuantizedLinear)]:
        for name in [n for n, _ in layer.named_buffers(recurse=False)]:
            layer.register_parameter(name, nn.Parameter(layer._buffers.pop(name), requires_grad=False))
        fully_shard(layer, mp_policy=MixedPrecisionPolicy())


@contextmanager
def syncing(forward, last: bool) -> Iterator[None]:
    """The context of one micro-batch's backward: gradients are averaged over the processes only on
    the last micro-batch of a step (the earlier ones accumulate locally)."""
    if hasattr(forward, "set_requires_gradient_sync"):  # FSDP2: a switch on the root unit
        forward.set_requires_gradient_sync(last)
        yield
        if last:
            _average(getattr(forward, "_adaptkit_replicated", ()))
        return
    with forward.no_sync() if not last and hasattr(forward, "no_sync") else nullcontext():
        yield


def _average(params) -> None:
    """The gradients of the tensors FSDP leaves whole (`_shared`), averaged over the processes (a sum
    divided by the world size: gloo has no average)."""
    import torch.distributed as dist

    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(dist.get_world_size())


def clip_grad_norm(params: list, max_norm: float) -> None:
    """Scale the gradients so that their whole norm (over every process's shards, and the tensors left
    whole counted once) is at most `max_norm`, as torch's clip_grad_norm_ in one process. torch's
    own refuses a mix of sharded (DTensor) and whole tensors, which shared tensors under FSDP make."""
    import torch
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    squares = torch.zeros((), dtype=torch.float64)
    for g in grads:
        norm = torch.linalg.vector_norm(g, dtype=torch.float32)
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
        squares += norm.double().cpu() ** 2
    coefficient = max_norm / (float(squares.sqrt()) + 1e-6)
    if coefficient < 1:
        for g in grads:
            g.mul_(coefficient)


@contextmanager
def whole(model, names=None) -> Iterator[None]:
    """Inside, the sharded parameters of `model` named in `names` (a predicate on the parameter's
    name; default: the trainable ones) are whole, ordinary tensors on every process, so saving code
    reads them as in one process. Collective: every process enters. Nothing changes without FSDP."""
    from torch.distributed.tensor import DTensor

    pick = names or (lambda name, p: p.requires_grad)
    slots = []
    for name, p in model.named_parameters(remove_duplicate=False):  # one registered under several names: all
        if isinstance(p, DTensor) and pick(name, p):
            owner, _, leaf = name.rpartition(".")
            slots.append((model.get_submodule(owner) if owner else model, leaf, p))
    with _gathered(slots):
        yield


def unsharded(modules, *, autograd: bool = False):
    """Inside, the sharded parameters of `modules` (and their submodules) are whole on every process,
    for variant hooks that use tensors between steps (AdaLoRA's budget and orthogonality loss,
    Delta-LoRA's update of W): with their gradients, and what the hook changes in place goes back
    into this process's shards on the way out; `autograd`: the whole tensors are differentiable
    gathers, so a loss computed from them sends each process its shard's gradient (the same on every
    process: no averaging, as in one process). Collective: every process enters, in the same order."""
    from torch.distributed.tensor import DTensor

    slots = [(m, leaf, p) for module in modules for m in module.modules()
             for leaf, p in m._parameters.items() if isinstance(p, DTensor)]
    return _gathered(slots, keep=not autograd, autograd=autograd)


@contextmanager
def _gathered(slots: list, *, keep: bool = False, autograd: bool = False) -> Iterator[None]:
    """Each (module, leaf, sharded parameter) of `slots` whole in its module's place (one gather per
    parameter however often it is registered); `keep`: with its gradient, and its values written back
    into the shard after a body that did not raise."""
    import torch
    from torch import nn
    from torch.distributed.tensor import distribute_tensor

    found: dict[int, torch.Tensor] = {}
    for module, leaf, p in slots:
        if id(p) not in found:
            if autograd:
                found[id(p)] = p.full_tensor()
            else:
                found[id(p)] = nn.Parameter(p.full_tensor().detach(), requires_grad=p.requires_grad)
                if keep and p.grad is not None:
                    found[id(p)].grad = p.grad.full_tensor()
        module._parameters[leaf] = found[id(p)]
    try:
        yield
        if keep:
            with torch.no_grad():
                for p in {id(p): p for _, _, p in slots}.values():
                    # every process holds the same whole tensor: its own rows, without communication
                    mine = distribute_tensor(found[id(p)].detach(), p.device_mesh, p.placements, src_data_rank=None)
                    p.to_local().copy_(mine.to_local())
    finally:
        for module, leaf, p in slots:
            module._parameters[leaf] = p
