"""Training an adapter of any variant: one loop, the variant plugged in through the handle's hooks.

    adaptkit.train.train("minilm", variant, "train.jsonl", "out/", settings={"r": 8}, eval_data="dev.jsonl")

Each optimizer step: for each of `grad_accum` micro-batches, loss = (model loss +
`handle.extra_loss()`) / grad_accum, backward; clip the gradient norm; AdamW step over
`handle.param_groups(lr)`; LR schedule step (linear warm-up, then cosine decay to 0);
`handle.step_end(step)`; zero_grad. Settings go to `adaptkit.inject` unchanged, with three generic
defaults: `target_modules="all-linear"` when neither the user nor the variant's `prepare` chooses
targets; settings the variant's `train_settings(steps)` hook derives from the run's number of
steps, where left unset; and modules the checkpoint lacks (a new classification head) train
whole as `modules_to_save` (and stay out of the targets).

Under `torchrun --nproc_per_node N` (WORLD_SIZE > 1) the same function trains with the `strategy`
of distributed.py (DDP, or FSDP2 sharding the model; gloo on CPU, nccl on GPU): every global batch
of batch_size × grad_accum × N examples is split into N disjoint contiguous shards, so N processes
compute the same update as one process with N × grad_accum; only rank 0 writes files.
Outputs: OUT/adapter_config.json + adapter_model.safetensors, training.json (arguments, label
names, final metrics), metrics.jsonl (one line per step), checkpoints/step-N/ (see checkpoint.py).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from .. import registry, spec, validate
from . import checkpoint, distributed
from ..io import readers
from .data import Batches, Dataset, collate, load_dataset
from ..errors import AdaptkitError
from .evaluation import autocast, evaluate_model
from .models import build_model, load_tokenizer, resolve_base
from .reporting import Reporters


@dataclass
class Run:
    """Everything one training run holds between its steps."""

    args: dict
    out: Path
    world: int
    rank: int
    device: str
    model: Any = None
    handle: Any = None
    tokenizer: Any = None
    train_set: Dataset | None = None
    eval_set: Dataset | None = None
    batches: Batches | None = None
    total: int = 0
    optimizer: Any = None
    scheduler: Any = None
    scaler: Any = None
    cast: Callable = nullcontext
    forward: Any = None  # the model (sharded in place under FSDP), or its DistributedDataParallel wrapper
    work: Path | None = None
    start: int = 0
    elapsed: float = 0.0
    last: dict = field(default_factory=dict)
    allow_pickle: bool = False  # a permission, not a setting: not in `args`, which resume compares
    held: ExitStack = field(default_factory=ExitStack)  # the output's lock (main process), released at the end
    report: Any = None  # reporting.Reporters: TensorBoard / W&B, opened by the main process only

    @property
    def main(self) -> bool:
        return self.rank == 0


def train(base: str | Path, variant: str, data: str | Path, out: str | Path, *, settings: dict | None = None,
          eval_data: str | Path | None = None, task: str | None = None, lr: float = 1e-4, batch_size: int = 8,
          grad_accum: int = 1, max_steps: int | None = None, epochs: float | None = None, warmup: float = 0,
          max_length: int | None = None, precision: str = "fp32", seed: int = 0, eval_every: int | None = None,
          save_every: int | None = None, keep_checkpoints: int | None = None, weight_decay: float = 0.0,
          max_grad_norm: float = 1.0, base_dtype: str = "float32", quantize: str | None = None, qat: str | None = None,
          resume: bool = False, force: bool = False, progress: bool = True, device: str | None = None,
          callback: Callable | None = None, allow_pickle: bool = False, format: str | None = None,
          report_to: str | list[str] | None = None, run_name: str | None = None, strategy: str = "ddp",
          gradient_checkpointing: bool = False) -> dict:
    """Train adapter `variant` on `base` with `data` (JSON lines) into the folder `out`, the adapter in
    `format` (a format plugin; default the canonical one); returns the training report (also
    OUT/training.json). `callback(view)` runs before step 1 (step 0) and after every step, with
    `view.step`, `.record`, `.model`, `.handle`, `.optimizer`, `.scheduler`, `.rank`. `report_to`
    ("tensorboard", "wandb") logs each step's metrics there too, as `run_name` (reporting.py).
    `strategy` ("ddp", "fsdp": distributed.py) applies under torchrun only; `gradient_checkpointing`
    recomputes each block's activations in the backward pass instead of keeping them."""
    if strategy not in distributed.STRATEGIES:
        raise AdaptkitError(f"unknown strategy '{strategy}' (known: {', '.join(distributed.STRATEGIES)})")
    if grad_accum < 1 or batch_size < 1:
        raise AdaptkitError("batch_size and grad_accum must be at least 1")
    for method in (quantize, qat):
        if method is not None:
            registry.get("quantizer", method)  # an unknown name fails now, with the nearest known one
    if format is not None:
        registry.get("format", format)
    # settings of the wrong type (r=2.5, a bad regex) fail now, not after the model is loaded
    validate.adapter_config(settings or {}, registry.get("variant", variant), f"{variant} settings")
    args = {"base": str(base), "variant": variant, "settings": dict(settings or {}), "data": str(data),
            "eval_data": None if eval_data is None else str(eval_data), "task": task, "lr": lr,
            "batch_size": batch_size, "grad_accum": grad_accum, "max_steps": max_steps, "epochs": epochs,
            "warmup": warmup, "max_length": max_length, "precision": precision, "seed": seed, "eval_every": eval_every,
            "save_every": save_every, "keep_checkpoints": keep_checkpoints, "weight_decay": weight_decay,
            "max_grad_norm": max_grad_norm, "base_dtype": base_dtype, "quantize": quantize, "qat": qat,
            "resume": resume, "force": force, **({"format": format} if format is not None else {}),
            "progress": progress, "strategy": strategy, "gradient_checkpointing": gradient_checkpointing}
    try:
        args = json.loads(json.dumps(args))
    except TypeError as e:
        raise AdaptkitError(f"settings must be JSON values (numbers, strings, lists, dicts): {e}") from None
    reporters = Reporters(report_to, run_name, config=args)  # a missing library fails before the model loads
    world, rank, device, created = distributed.init(device)
    run = None
    try:
        run = Run(args, Path(out), world, rank, device, allow_pickle=allow_pickle, report=reporters)
        if run.main:  # before anything loads
            checkpoint.lock_output(run.out, run.held, inputs=[base, data, args["eval_data"]])
        _prepare(run)
        _loop(run, callback)
        return _finish(run)
    finally:
        reporters.close()
        if run is not None:
            run.held.close()
        if created:
            import torch.distributed as dist

            dist.destroy_process_group()


def _prepare(run: Run) -> None:
    """Seed, read the data, build the model with its adapter, the optimizer and schedule; resume."""
    a = run.args
    _seed(a["seed"])
    folder = resolve_base(a["base"])
    run.tokenizer = load_tokenizer(folder)
    length = a["max_length"] or _default_length(run.tokenizer, folder)
    run.train_set = load_dataset(a["data"], run.tokenizer, task=a["task"], max_length=length)
    if a["eval_data"]:
        run.eval_set = load_dataset(a["eval_data"], run.tokenizer, task=run.train_set.task, max_length=length,
                                    labels=run.train_set.labels)
    run.batches = Batches(len(run.train_set), a["batch_size"], a["grad_accum"], run.world, run.rank, a["seed"])
    per_epoch = run.batches.steps_per_epoch
    run.total = a["max_steps"] or max(1, round((a["epochs"] or 1) * per_epoch))
    labels = run.train_set.labels
    model, new = build_model(folder, run.train_set.task, num_labels=len(labels) if labels else None,
                             dtype=a["base_dtype"], progress=a["progress"] and run.main, quantize=a["quantize"],
                             allow_pickle=run.allow_pickle)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = run.tokenizer.pad_token_id
    run.model, run.handle = model, _inject(model, a["variant"], a["settings"], new, run.total)
    if a["qat"]:
        run.handle.quantization_aware(a["qat"])
    run.cast = autocast(a["precision"], run.device)
    if a["precision"] != "fp32":  # mixed precision: the trained tensors stay float32
        for p in model.parameters():
            if p.requires_grad and p.is_floating_point():
                p.data = p.data.float()
    if a["gradient_checkpointing"]:
        _checkpoint_activations(model)
    model.to(run.device).train()
    distributed.check(run.handle, a["strategy"], run.world)
    found = _open(run)  # the checkpoint's tensors go into the model before it is sharded
    run.forward = distributed.wrap(run.handle, a["strategy"], run.world, run.device, a["precision"])
    _optimizer(run)  # over the parameters as they will be trained (FSDP replaces them with shards)
    if found is not None:
        _resume(run, found)


def _seed(seed: int) -> None:
    """Python's, numpy's and torch's generators (every device's), as transformers' set_seed, whose
    module imports PEFT when it is installed (seconds of start-up, measured)."""
    import random

    import numpy
    import torch

    random.seed(seed)
    numpy.random.seed(seed)
    torch.manual_seed(seed)


def _default_length(tokenizer, folder: Path) -> int:
    path = folder / "config.json"
    config = validate.model_config(readers.read_json(path), path)
    limits = [512, tokenizer.model_max_length, config.get("max_position_embeddings") or 512]
    return int(min(x for x in limits if isinstance(x, int) and x > 0))


def _inject(model, name: str, settings: dict, new: list[str], total: int):
    """adaptkit.inject with the generic defaults (see the module docstring)."""
    from ..live.adapters import inject
    from ..live.targets import variant_config

    variant = registry.get("variant", name)
    if not isinstance(variant, spec.LiveModule):
        raise AdaptkitError(f"variant '{name}' has no module plane; it cannot be trained")
    config = dict(settings)
    if new:
        config.setdefault("modules_to_save", new)
        if isinstance(config.get("exclude_modules") or [], list):
            config["exclude_modules"] = list(config.get("exclude_modules") or []) + new
    for key, value in (variant.train_settings(total) if isinstance(variant, spec.TrainSettings) else {}).items():
        config.setdefault(key, value)
    if "target_modules" not in config:
        probe = (variant.prepare(model, variant_config(variant, {**config, "modules_to_save": None}))
                 if isinstance(variant, spec.ChoosesTargets) else {})
        if probe.get("target_modules") is None and not probe.get("modules_to_save"):
            config["target_modules"] = "all-linear"
    handle = inject(model, variant, **config)
    adapter = handle.adapters[handle.active[0]]
    missing = [m for m in new if m not in adapter.saved]
    if missing:  # the variant chose its own modules_to_save (e.g. the last layers): the new head joins them
        adapter.saved += handle._add_saved(adapter.name, missing)
        handle.set_active(handle.active)
    return handle


def _optimizer(run: Run) -> None:
    import torch

    from .schedule import cosine_with_warmup

    a = run.args
    groups = run.handle.param_groups(a["lr"])
    if not groups:
        raise AdaptkitError(f"the {a['variant']} adapter has no trainable tensors on this model")
    # torch's fused AdamW (what transformers' Trainer uses by default) takes one kernel per tensor
    # where the default loop takes a dozen; FSDP's sharded tensors keep the default.
    fused = not _sharded(run) and all(type(p.data) is torch.Tensor and p.device.type in ("cpu", "cuda")
                                      for g in groups for p in g["params"])
    run.optimizer = torch.optim.AdamW(groups, lr=a["lr"], weight_decay=a["weight_decay"], fused=fused or None)
    warmup = a["warmup"]
    steps = int(round(warmup * run.total)) if 0 < warmup < 1 else int(warmup)
    run.scheduler = cosine_with_warmup(run.optimizer, steps, run.total)
    if a["precision"] == "fp16":
        run.scaler = torch.amp.GradScaler("cuda")


def _open(run: Run) -> Path | None:
    """The run folder; with resume, the latest checkpoint's adapter tensors put on the model (returned)."""
    a = run.args
    if run.main:
        run.work = checkpoint.open_work(run.out, force=a["force"], resume=a["resume"])
    distributed.barrier(run.world)
    run.work = checkpoint.work_folder(run.out)
    found = checkpoint.latest(run.work) if a["resume"] else None
    if found is None:
        if run.main:
            checkpoint.trim_log(run.work / "metrics.jsonl", 0)
        return None
    state = checkpoint.load(found, handle=run.handle, args=_fixed_args(run))
    run.start, run.elapsed = state["step"], state["elapsed"]
    return found


def _resume(run: Run, found: Path) -> None:
    """The rest of the checkpoint (optimizer, schedule, RNGs: last) into the freshly built run."""
    checkpoint.load_trainer(found, model=run.model, optimizer=run.optimizer, scheduler=run.scheduler,
                            scaler=run.scaler, rank=run.rank, world=run.world)
    if run.main:
        run.last = checkpoint.trim_log(run.work / "metrics.jsonl", run.start)
        if run.args["progress"]:
            print(f"resuming from {found} (step {run.start} of {run.total})", file=sys.stderr)


def _fixed_args(run: Run) -> dict:
    return {**run.args, "world_size": run.world}


def _checkpoint_activations(model) -> None:
    """Activation checkpointing of every block, through transformers (non-reentrant: it works with
    frozen inputs and under FSDP)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise AdaptkitError(f"{type(model).__name__} does not support gradient checkpointing")
    # activation_checkpointing_enable from transformers 5 on; gradient_checkpointing_enable before
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})


def _step(run: Run, step: int) -> tuple[float, float]:
    """One optimizer step over this process's micro-batches; (mean loss over all processes, lr used)."""
    import torch

    epoch, index = divmod(step - 1, run.batches.steps_per_epoch)
    micro = run.batches.micro_batches(epoch, index)
    total = 0.0
    for i, indices in enumerate(micro):
        batch = collate([run.train_set.examples[j] for j in indices], run.tokenizer)
        batch = {k: v.to(run.device) for k, v in batch.items()}
        with distributed.syncing(run.forward, i == len(micro) - 1):
            with run.cast():
                loss = (run.forward(**batch).loss + run.handle.extra_loss()) / len(micro)
            (run.scaler.scale(loss) if run.scaler else loss).backward()
        total += loss.item()
    if run.scaler:
        run.scaler.unscale_(run.optimizer)
    if run.args["max_grad_norm"]:
        params = [p for g in run.optimizer.param_groups for p in g["params"]]
        clip = distributed.clip_grad_norm if _sharded(run) else torch.nn.utils.clip_grad_norm_
        clip(params, run.args["max_grad_norm"])
    lr = run.optimizer.param_groups[0]["lr"]
    if run.scaler:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.scheduler.step()
    run.handle.step_end(step)
    run.optimizer.zero_grad(set_to_none=True)
    return distributed.mean(run.world, total, run.device), lr


def _evaluate(run: Run) -> dict:
    result = evaluate_model(run.model, run.eval_set, run.tokenizer, batch_size=run.args["batch_size"],
                            device=run.device, precision=run.args["precision"], progress=False)
    return {f"eval_{k}": v for k, v in result.items() if k not in ("examples", "tokens")}


def _loop(run: Run, callback: Callable | None) -> None:
    from tqdm.auto import tqdm

    a, began = run.args, time.perf_counter() - run.elapsed
    bar = tqdm(total=run.total, initial=run.start, desc="train", file=sys.stderr, disable=not (a["progress"] and run.main))
    view = SimpleNamespace(model=run.model, handle=run.handle, optimizer=run.optimizer, scheduler=run.scheduler,
                           rank=run.rank, step=run.start, record={})
    if callback and run.start == 0:
        callback(view)
    for step in range(run.start + 1, run.total + 1):
        loss, lr = _step(run, step)
        record = {"step": step, "epoch": round(step / run.batches.steps_per_epoch, 4), "loss": loss, "lr": lr}
        every = a["eval_every"]
        evaluates = run.main or _sharded(run)  # a sharded model runs only with every process taking part
        if run.eval_set is not None and evaluates and (step == run.total or (every and step % every == 0)):
            record.update(_evaluate(run))
        run.elapsed = time.perf_counter() - began
        record["elapsed"] = round(run.elapsed, 3)
        run.last = record
        if run.main:
            with (run.work / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")
            run.report.log(record, run.work, run.out.name)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        if a["save_every"] and step % a["save_every"] == 0:
            _checkpoint(run, step)
        if callback:
            view.step, view.record = step, record
            callback(view)
    bar.close()
    run.report.close()  # before the run folder is renamed to OUT


def _sharded(run: Run) -> bool:
    return run.world > 1 and run.args["strategy"] == "fsdp"


def _checkpoint(run: Run, step: int) -> None:
    """Checkpoint `step`: the optimizer state as each process holds it (all processes), the rest by rank 0."""
    rngs = distributed.gather(run.world, checkpoint.rng_state())
    staged = checkpoint.stage_optimizer(run.work, step, model=run.model, optimizer=run.optimizer, world=run.world)
    with distributed.whole(run.model, checkpoint.saved_tensors(run.handle)):
        if run.main:
            epoch, index = divmod(step, run.batches.steps_per_epoch)
            info = {"epoch": epoch, "batch": index, "shuffle_seed": run.args["seed"], "elapsed": run.elapsed,
                    "args": _fixed_args(run)}
            checkpoint.save(run.work, step, handle=run.handle, optimizer=staged, scheduler=run.scheduler,
                            scaler=run.scaler, rngs=rngs, info=info, keep=run.args["keep_checkpoints"])
    distributed.barrier(run.world)


def _finish(run: Run) -> dict:
    """Save the adapter and training.json into the run folder and rename it to OUT (rank 0)."""
    from .. import __version__

    a = run.args
    report = {"base": a["base"], "variant": a["variant"], "settings": a["settings"], "task": run.train_set.task,
              "labels": run.train_set.labels, "steps": run.total, "examples": len(run.train_set),
              "world_size": run.world, "metrics": run.last, "seconds": round(run.elapsed, 3),
              "adaptkit_version": __version__, "args": a}
    with distributed.whole(run.model, checkpoint.saved_tensors(run.handle)):
        if run.main:
            staging = run.work / ".adapter"
            run.handle.save(staging, force=True, format=a.get("format"))
            for item in staging.iterdir():
                os.replace(item, run.work / item.name)
            shutil.rmtree(staging)
            (run.work / "training.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
            checkpoint.finish(run.work, run.out)
    distributed.barrier(run.world)
    return report
