"""Training checkpoints and the run folder, so that an interrupted run resumes exactly.

A run writes into `.OUT.training` beside OUT and renames it to OUT when it ends, so OUT appears
whole or not at all; an interrupted run leaves that folder for `resume`. Checkpoint step N is
`checkpoints/step-N/` (itself written to a temporary folder and renamed):

    adapter/                 the adapter as `handle.save` writes it (loadable, evaluable)
    state.safetensors        the live adapter tensors exactly as they are on the model (the branches'
                             and trained copies' parameters and buffers) plus the base weights of
                             layers whose adapter keeps a change inside W (the variant's `resident`)
    optimizer/               the optimizer state, by parameter name, as torch.distributed.checkpoint
                             writes it: each process its shard (FSDP) and a .metadata index, so a run
                             resumes with another number of processes (it is resharded as it loads)
    trainer_state.pt         LR scheduler and loss scaler state, and every process's RNG
                             states (python, numpy, torch, cuda): tensors, numbers, lists, dicts only,
                             read back with torch.load(weights_only=True)
    state.json               step, data position (epoch, batch, shuffle seed), elapsed seconds, arguments

Resuming rebuilds the model and optimizer exactly as a fresh run does, then overwrites their state
with the checkpoint's and sets the RNGs last, so the remaining steps repeat the uninterrupted run
bit for bit: same batches (the shuffle depends only on seed and epoch), same dropout, same updates.
The number of processes may change between the two if the global batch does not: grad_accum ×
world size stays the same (2 processes with grad_accum 1 resume as 1 with grad_accum 2).
"""
from __future__ import annotations

import json
import random
import shutil
import warnings
from collections.abc import Iterable
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from ..errors import AdaptkitError
from ..io.outputs import atomic_output, check_output, move_into_place, output_lock
from ..io.readers import read_json

FOLDER = "checkpoints"
# Arguments that may change between an interrupted run and its resumption; any other change is an error.
MAY_CHANGE = {"resume", "force", "progress", "eval_every", "save_every", "keep_checkpoints", "eval_data", "strategy",
              "gradient_checkpointing"}
SPLIT = ("grad_accum", "world_size")  # may change as long as their product (the global batch) does not


def work_folder(out: Path) -> Path:
    return out.parent / f".{out.name}.training"


def steps(work: Path) -> list[int]:
    """Steps of the complete checkpoints in a run folder, ascending."""
    found = [p.name.removeprefix("step-") for p in (work / FOLDER).glob("step-*") if (p / "state.json").is_file()]
    return sorted(int(s) for s in found if s.isdigit())


def latest(work: Path) -> Path | None:
    found = steps(work)
    return work / FOLDER / f"step-{found[-1]}" if found else None


def lock_output(out: Path, hold: ExitStack, *, inputs: Iterable[str | Path | None] = ()) -> None:
    """Before a run loads anything (main process only): OUT may not be inside an input, be one or
    hold one (`inputs`: the run's input paths), an OUT a killed run had set aside is put back, and
    OUT's lock is taken into `hold` for the rest of the run, so a second run on the same OUT fails
    in one line instead of sharing its run folder."""
    check_output(out, force=True, inputs=inputs)
    out.parent.mkdir(parents=True, exist_ok=True)
    hold.enter_context(output_lock(out))


def open_work(out: Path, *, force: bool, resume: bool) -> Path:
    """The run folder (main process only, under `lock_output`): fresh, or kept for `resume` (a
    finished OUT is copied back into it to continue). An existing OUT needs force or resume."""
    work = work_folder(out)
    if resume:
        if not work.exists() and out.exists():
            shutil.copytree(out, work)
    else:
        if out.exists() and not force:
            raise AdaptkitError(f"{out}: output already exists (pass --force to replace it, or --resume to continue "
                                "its training)")
        if work.exists() and steps(work) and not force:
            raise AdaptkitError(f"{out}: an interrupted run left checkpoints in {work} (last: step {steps(work)[-1]}); "
                                "pass --resume to continue it or --force to start over")
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    return work


def finish(work: Path, out: Path) -> None:
    """Rename the run folder to `out`, replacing an old one only now."""
    move_into_place(work, out)


TRAIN_STATE = "train_state/"  # prefix of variants' own state in state.safetensors


# -- live tensors ---------------------------------------------------------------------------------
def saved_tensors(handle):
    """A predicate on the model's parameter names: those checkpoints and saved adapters hold (the
    trainable ones, the branches', the trained copies' and the base weights `live_tensors` keeps)."""
    from ..live.targets import adapted_layers

    resident = {f"{path}.base_layer.weight" for path, layer in adapted_layers(handle.model).items()
                if any(layer.resident(name) is not None for name in layer.branches)}
    return lambda name, p: p.requires_grad or ".branches." in name or ".copies." in name or name in resident


def live_tensors(handle) -> dict:
    """The adapter's tensors as they live on the model (state_dict names), cloned to the CPU."""
    from ..live.targets import adapted_layers

    state = handle.model.state_dict()
    keys = [k for k in state if ".branches." in k or ".copies." in k]
    for path, layer in adapted_layers(handle.model).items():
        if any(layer.resident(name) is not None for name in layer.branches):
            keys.append(f"{path}.base_layer.weight")
    return {k: state[k].detach().to("cpu").clone().contiguous() for k in keys}


def load_live(model, path: Path) -> dict:
    """Put the checkpoint's tensors back on the model; returns the variants' own training state."""
    from safetensors.torch import load_file

    tensors = load_file(path)
    extra = {k[len(TRAIN_STATE):]: tensors.pop(k) for k in list(tensors) if k.startswith(TRAIN_STATE)}
    result = model.load_state_dict(tensors, strict=False)
    if result.unexpected_keys:
        raise AdaptkitError(f"{path}: checkpoint tensor '{result.unexpected_keys[0]}' is not on this model; was it made "
                            "with other settings?")
    return extra


# -- random number generators ---------------------------------------------------------------------
def rng_state() -> dict:
    """This process's RNG states as tensors and numbers (safe for torch.load(weights_only=True))."""
    import numpy as np
    import torch

    version, inner, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "state": torch.tensor(inner, dtype=torch.int64), "gauss": gauss},
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                       "cached": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- save and load --------------------------------------------------------------------------------
def stage_optimizer(work: Path, step: int, *, model, optimizer, world: int) -> Path:
    """Every process writes its optimizer state (torch.distributed.checkpoint, by parameter name) into
    one folder beside the checkpoints, which `save` then moves into checkpoint `step`."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from .distributed import barrier

    staged = work / FOLDER / f".step-{step}.optimizer"
    if world <= 1 or dist.get_rank() == 0:
        shutil.rmtree(staged, ignore_errors=True)  # left by a killed run
    barrier(world)
    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    with _one_process_is_meant():
        dcp.save(state, checkpoint_id=staged, no_dist=world <= 1)
    return staged


@contextmanager
def _one_process_is_meant():
    """torch.distributed.checkpoint warns that it assumes one process when there is no process group,
    even when told so (no_dist): that is the intent here, not news for the user."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save(work: Path, step: int, *, handle, optimizer: Path, scheduler, scaler, rngs: list[dict], info: dict[str, Any],
         keep: int | None = None) -> Path:
    """Write checkpoint `step` (main process), its optimizer state from `stage_optimizer`'s folder; keep
    only the last `keep` checkpoints if given."""
    import torch
    from safetensors.torch import save_file

    target = work / FOLDER / f"step-{step}"
    with atomic_output(target, force=True) as tmp:
        extra = {f"{TRAIN_STATE}{k}": v.detach().to("cpu").contiguous() for k, v in handle.train_state().items()}
        save_file({**live_tensors(handle), **extra}, str(tmp / "state.safetensors"))
        shutil.move(optimizer, tmp / "optimizer")
        torch.save({"scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None,
                    "rng": rngs}, tmp / "trainer_state.pt")
        handle.save(tmp / "adapter")
        (tmp / "state.json").write_text(json.dumps({"step": step, **info}, indent=2, sort_keys=True) + "\n")
    if keep:
        for old in steps(work)[:-keep]:
            shutil.rmtree(work / FOLDER / f"step-{old}", ignore_errors=True)
    return target


def load(folder: Path, *, handle, args: dict) -> dict:
    """Put a checkpoint's adapter tensors on a freshly built model (before it is sharded); returns its
    state.json. `load_trainer` restores the rest once the optimizer exists."""
    state = read_json(folder / "state.json")
    check_args(state.get("args", {}), args, folder)
    handle.load_train_state(load_live(handle.model, folder / "state.safetensors"))
    return state


def load_trainer(folder: Path, *, model, optimizer, scheduler, scaler, rank: int, world: int) -> None:
    """Restore optimizer (resharded to this run's processes), schedule, loss scaler and, last, the RNGs."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    if not (folder / "optimizer" / ".metadata").is_file():
        raise AdaptkitError(f"{folder}: no optimizer state (optimizer/.metadata); start over with --force")
    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    with _one_process_is_meant():
        dcp.load(state, checkpoint_id=folder / "optimizer", no_dist=world <= 1)
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
    trainer = torch.load(folder / "trainer_state.pt", map_location="cpu", weights_only=True)
    scheduler.load_state_dict(trainer["scheduler"])
    if scaler is not None and trainer["scaler"] is not None:
        scaler.load_state_dict(trainer["scaler"])
    rngs = trainer["rng"]
    set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])


def check_args(saved: dict, current: dict, folder: Path) -> None:
    before, now = [saved.get(k, 1) for k in SPLIT], [current.get(k, 1) for k in SPLIT]
    if before[0] * before[1] != now[0] * now[1]:
        raise AdaptkitError(f"{folder} was made with grad_accum × processes = {before[0]} × {before[1]}, this run has "
                            f"{now[0]} × {now[1]}; resume with the same global batch (or start over with --force)")
    for key in sorted(set(saved) | set(current)):
        if key not in MAY_CHANGE and key not in SPLIT and saved.get(key) != current.get(key):
            raise AdaptkitError(f"{folder} was made with {key}={saved.get(key)!r}, this run has {current.get(key)!r}; "
                                "resume with the same settings (or start over with --force)")


def trim_log(path: Path, step: int) -> dict:
    """Drop metrics logged after `step` (an interrupted run got further than its last checkpoint);
    returns the last record kept ({} if none)."""
    if not path.is_file():
        return {}
    records = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    records = [r for r in records if r["step"] <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records[-1] if records else {}
