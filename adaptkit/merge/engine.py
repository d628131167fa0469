"""The merge engine: stream every tensor position through a merge operator into sharded output.

Inputs are opened lazily; for each tensor name the engine reads that tensor (or a block of its rows,
for elementwise operators) from every input — converted to the compute dtype (mergekit's meaning of
`dtype`, see `precision.py` here), or as read for operators that convert block by block — resolves
the recipe's parameters for it (gradients, filters), calls the operator, casts its result to the
output dtype and writes it at its place in the output. A working-memory budget
keeps a few tensors in flight (`schedule.py` here: a worker takes the first that fits), so peak memory
follows the largest tensor, not the model. Random operators get
one generator per input seeded from (seed, tensor name, input index): output bytes do not depend on
thread count or order. Adapters enter as `base+adapter` inputs (see `sources.py` here).
"""
from __future__ import annotations

import math
import shutil
import threading
import time
from collections import Counter
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .. import allocator, registry, spec
from ..devices import compute_device
from ..io.dtypes import code_to_torch, parse_dtype, torch_to_code
from ..errors import AdaptkitError
from ..io.store import open_store
from .card import drop_card, parameter_groups, write_card
from .modules import part_jobs
from .slices import Job, source_place
from .precision import all_finite, drop_quantization_config, nonfinite_output, recipe_dtypes, state_dtype, stored_dtype
from .positions import check_positions, layer_positions, operator_params, resolve_params
from .recipe import Recipe, apply_overrides, load_recipe, recipe_inputs
from .schedule import command_threads_held, default_workers, run_within
from .converted import fuse
from .sources import ModelSource, check_inputs, check_same_architecture, merge_names, open_input, warn_tied_config
from .tokenizer import build_vocabulary, write_tokenizer
from .to_adapter import merge_adapters
from ..io.readers import dump_json
from ..io.outputs import atomic_output
from ..io.writer import DEFAULT_SHARD_SIZE, MirrorWriter, ShardedWriter, copy_side_files, copy_tree, parse_size

#: Elementwise operators see big tensors in row blocks of about this many elements (4 MB in float32),
#: so a 1B-parameter model's embeddings never sit in memory several times over. (Measured on the
#: 168M benchmark: 1M-element blocks took 50–250 MB less peak memory than 4M and were no slower.)
BLOCK_ELEMENTS = 1024 * 1024
#: Tensors merged at once share this many bytes of working memory (a bigger one runs alone). 1 GiB, not
#: 768 MiB: the 168M benchmark's TIES and breadcrumbs embeddings (estimated 885 MB) merge beside smaller
#: tensors (median of 5: 0.85 and 0.81 of the wall, peak +150 MB); at 1B every method still peaks < 1.5 GB.
WORKING_MEMORY = 1024 * 1024 * 1024
#: What reading and writing hold besides the pieces' working memory (read buffers, the writer's, the
#: allocator's slack), counted in the estimate: the 168M benchmark's elementwise merges peaked up to 31 MB
#: above the pieces' working memory (2026-12-06), whole-tensor ones well under it (their inputs count as float32).
IO_BYTES = 32 * 1024 * 1024


class Plan:
    """What a merge will do: inputs, tensor layout, output dtypes and a memory estimate."""

    def __init__(self, recipe: Recipe, *, allow_pickle: bool = False):
        self.recipe, self.allow_pickle = recipe, allow_pickle
        self.method = registry.get("merge", recipe.method)
        takes_base = spec.option(self.method, "takes_base")
        # with slices, each slice's base is one of its sources (mergekit's rule), not an input of its own
        self.base = open_input(recipe.base, allow_pickle=allow_pickle) if recipe.base and takes_base \
            and not recipe.parts else None
        self.inputs = [_open(recipe, ref, allow_pickle) for ref in recipe.models]
        check_same_architecture(self.sources, allowed=recipe.mixed_architectures)
        reference = self.base or self.inputs[0]
        self.jobs, self.config = self._slices(takes_base, allow_pickle) if recipe.parts else (None, None)
        self.fused: dict[str, Job] = {}  # output tensors merged in transformers 5's layout (`fuse`, below)
        self.names = list(self.jobs) if self.jobs else merge_names(reference, self.sources, recipe.tensors, self.base)
        warn_tied_config(self.names, self.donor if self.jobs else reference)
        # the recipe's name of each source (an adapter opened as base+adapter keeps its own)
        self.refs = ([str(recipe.base)] if self.base else []) + [str(ref) for ref in recipe.models]
        self.vocabulary = build_vocabulary(recipe, self.refs, self.sources, self.names)
        aligned = self.vocabulary.tensors if self.vocabulary else frozenset()
        if not self.jobs:  # (slices: checked layer by layer, slices.py)
            check_inputs(self.names, reference, self.sources, aligned, recipe.tensors)
        # output and compute dtypes (None: the inputs' promoted stored dtype, per tensor; see precision.py)
        out, self.compute = recipe_dtypes(recipe, any(s.store.method for s in self.sources))
        self.positions = {n: job.t for n, job in self.jobs.items()} if self.jobs else \
            layer_positions(self.names, reference.config)  # before `job`, which reads them
        check_positions(recipe, self.positions)
        self.layout = []
        for name in self.names:
            source, stored = self.job(name).sources[0]
            info = source.info(stored)
            floating = code_to_torch(info.dtype).is_floating_point
            shape = (self.vocabulary.rows, *info.shape[1:]) if name in aligned else info.shape
            dtype = out or self.stored_dtype(name)
            self.layout.append((name, torch_to_code(dtype) if floating else info.dtype, shape))
        self.names, self.fused, self.groups = fuse(self)  # (the layout stays the checkpoint's: converted.py)

    def _slices(self, takes_base: bool, allow_pickle: bool) -> tuple[dict[str, Job], dict]:
        """The output tensors of a `slices:` or `modules:` recipe and its config.json (slices.py, modules.py):
        mergekit's, from the base model (read for that alone when it is none of the sources), else the
        first source."""
        recipe, opened = self.recipe, dict(zip(map(str, self.recipe.models), self.inputs))
        base = recipe.base
        self.donor = opened[str(base)] if str(base) in opened else _open(recipe, base, allow_pickle) if base \
            else opened[str(recipe.parts[0].slices[0].sources[0].ref)]
        return part_jobs(recipe, opened, self.donor, takes_base)

    def job(self, name: str) -> Job:
        """Where output tensor `name` comes from; without slices, the same name in every input (`tensors: union`:
        in every input that has it), each input with its own parameters."""
        if self.jobs or name in self.fused:
            return self.fused.get(name) or self.jobs[name]
        have = [i for i, s in enumerate(self.inputs) if self.recipe.tensors != "union" or s.stored(name)]
        return Job([(self.inputs[i], name) for i in have], (self.base, name) if self.base else None,
                   self.positions[name], [self.recipe.model_params[i] for i in have])

    def parameters(self, name: str) -> dict[str, Any]:
        """The operator's parameters for output tensor `name`, gradients and filters resolved (--dry-run)."""
        job = self.job(name)
        return resolve_params(self.recipe, self.method, name, job.t, job.shared, job.scopes)

    def stored_dtype(self, name: str) -> torch.dtype:
        """The dtype mergekit would load the inputs of `name` in without a `dtype` (promoted)."""
        return stored_dtype([source.info(n).dtype for source, n in self.job(name).sources])

    def side_files(self) -> Path | None:
        """The folder whose config and tokenizer files the output gets, as mergekit picks it: the base model
        (also for a method that takes none, such as linear), else the first model; with slices, the donor.
        None where that model is a lone weights file (mergekit-pytorch's inputs): the files beside it may
        belong to anything, so the output gets none."""
        if self.jobs:
            source = self.donor
        elif self.base is None and self.recipe.base is not None:
            source = _open(self.recipe, self.recipe.base, self.allow_pickle)  # headers only
        else:
            source = self.base or self.inputs[0]
        return None if source.store.lone else source.root

    @property
    def sources(self) -> list[ModelSource]:
        return ([self.base] if self.base else []) + self.inputs

    @cached_property
    def width(self) -> tuple[int, int]:
        """(tensors read, inputs among them) for one output tensor at most; with slices, its slice's sources."""
        if not self.jobs:
            return len(self.sources), len(self.inputs)
        return max(len(j.sources) for j in self.jobs.values()), max(len(j.inputs) for j in self.jobs.values())

    def working_bytes(self, numel: int) -> int:
        """Working memory of one tensor (or block): float32 copies of the inputs, the result, and for
        whole-tensor operators their task vectors and masks besides; or, for an operator that says what
        it holds (`entry_bytes`), its inputs counted as float32 and that."""
        read, inputs = self.width
        if isinstance(self.method, spec.WorkingMemory):
            return numel * (4 * read + self.method.entry_bytes(inputs, (self.compute or torch.float32).itemsize,
                                                                self.recipe.parameters))
        per_element = 4 * (read + 2)
        if not spec.option(self.method, "elementwise"):
            per_element += 4 * inputs + 8
        return numel * per_element

    def peak_bytes(self, threads: int) -> int:
        largest = max([math.prod(shape) for _, _, shape in self.layout] + [math.prod(j.reference.info(
            j.reference_name).shape) for j in self.fused.values()], default=0)  # (a group of experts: merged whole)
        if spec.option(self.method, "elementwise"):
            largest = min(largest, BLOCK_ELEMENTS)
        return IO_BYTES + max(self.working_bytes(largest), min(WORKING_MEMORY, self.working_bytes(largest) * threads))

    def summary(self, threads: int) -> dict[str, Any]:
        return {"method": self.recipe.method, "inputs": [str(s.ref) for s in self.inputs],
                "base": str(self.base.ref) if self.base else None, "tensors": len(self.layout),
                "parameters": sum(math.prod(s) for _, _, s in self.layout),
                "output_bytes": sum(math.prod(s) * code_to_torch(d).itemsize for _, d, s in self.layout),
                **estimate(self.peak_bytes(threads)), "threads": threads}

    def dry_run(self, threads: int | None = None) -> dict[str, Any]:
        """`--dry-run`'s plan: the summary at the workers the merge would use, with the parameter groups."""
        return {**self.summary(threads or default_workers(self.method)), "groups": parameter_groups(self)}


def estimate(working: int) -> dict[str, int]:
    """The estimated peak: the merge's working memory on top of this process as it is (Python, torch)."""
    process = allocator.resident_peak()
    return {"estimated_peak_bytes": process + working, "working_bytes": working, "process_bytes": process}


def _open(recipe: Recipe, ref, allow_pickle: bool) -> ModelSource:
    try:
        return open_input(ref, allow_pickle=allow_pickle, base=recipe.base)
    except AdaptkitError as error:
        if recipe.parts:  # say which slice names it
            raise AdaptkitError(f"{source_place(recipe.parts, ref)}: {error}") from None
        raise


def row_blocks(plan: Plan, name: str) -> list[tuple[int, int] | None]:
    """[None] (the whole tensor), or row ranges when the operator is elementwise and the tensor big."""
    job = plan.job(name)
    shape = job.reference.info(job.reference_name).shape
    numel = math.prod(shape)
    if (not spec.option(plan.method, "elementwise") or numel <= BLOCK_ELEMENTS or len(shape) < 2 or name in plan.fused
            or (plan.vocabulary is not None and name in plan.vocabulary.tensors)
            or any(source.has_deltas(n) or source.store.packed(n) for source, n in job.sources)):
        return [None]
    # each block starts at a multiple of 256 entries and the last has at least 256: torch sums a stack
    # of whole tensors differently in its last entries, and so do the operators (`stacked_sum`)
    width = numel // shape[0]
    align = 256 // math.gcd(width, 256)
    step = max(align, BLOCK_ELEMENTS // width // align * align)
    blocks = [(r, min(r + step, shape[0])) for r in range(0, shape[0], step)]
    if len(blocks) > 1 and (blocks[-1][1] - blocks[-1][0]) * width < 256:
        blocks[-2:] = [(blocks[-2][0], shape[0])]
    return blocks


def merge_tensor(plan: Plan, name: str, *, allow_nonfinite: bool = False, rows: tuple[int, int] | None = None,
                 device: torch.device | None = None) -> torch.Tensor:
    """The merged tensor `name` (or its rows) as the operator returns it from inputs converted to the compute
    dtype, read, checked and aligned on the CPU, then on `device` for an `accelerated` one; non-float: the reference's."""
    job = plan.job(name)
    if not code_to_torch(job.reference.info(job.reference_name).dtype).is_floating_point:
        return job.reference.get(job.reference_name, float32=False, rows=rows)
    # Operators that convert block by block get inputs as read (half the memory for bf16 models
    # computed in float32). An input with adapter deltas is the model with them merged in, as stored (as
    # mergekit merges `model+lora`); with compute_dtype, in float32, rounded only to the compute dtype.
    lazy = spec.option(plan.method, "block_upcast")
    compute = plan.compute or plan.stored_dtype(name)
    exact = plan.recipe.compute_dtype is not None
    read = [source.get(n, rows=rows, float32=exact and source.has_deltas(n)) for source, n in job.sources]
    for i in range(0 if lazy else len(read)):  # one by one: each stored copy freed as its conversion is made
        read[i] = read[i].to(compute)
    base, tensors = (read[0], read[1:]) if job.base else (None, read)
    if not allow_nonfinite:
        for (source, _), t in zip(job.sources, read):
            if not all_finite(t):
                raise AdaptkitError(f"tensor '{name}' of {source.ref} has NaN or Inf values (--allow-nonfinite to merge anyway)")
    if plan.vocabulary is not None and name in plan.vocabulary.tensors:  # rows re-indexed to the output tokenizer
        refs = [plan.refs[plan.sources.index(source)] for source, _ in job.sources]  # (the recipe's names)
        aligned = plan.vocabulary.align(name, refs, ([base] if base is not None else []) + tensors, compute)
        base, tensors = (aligned[0], aligned[1:]) if base is not None else (None, aligned)
    if not tensors:  # (`tensors: union`, a tensor only the base has: the base's, see sources.py `merge_names`)
        return base.to(compute)
    if device is not None and device.type != "cpu" and spec.option(plan.method, "accelerated"):
        base, tensors = None if base is None else base.to(device), [t.to(device) for t in tensors]
    params = operator_params(plan.recipe, plan.method, name, job.t, len(tensors), job.shared, job.scopes)
    try:
        return plan.method.merge(tensors, base, **params, **({"dtype": compute} if lazy else {}))
    except AdaptkitError as error:  # (`tensors: union`: say that the inputs lacking it are why)
        if len(tensors) < len(plan.inputs) and not plan.jobs:
            raise AdaptkitError(f"tensor '{name}' is in {len(tensors)} of {len(plan.inputs)} inputs: {error}") from None
        raise


def run_merge(recipe: Recipe | dict | str | Path, out: str | Path, *, force: bool = False,
              shard_size: int | str = DEFAULT_SHARD_SIZE, threads: int | None = None, seed: int | None = None,
              dtype: str | None = None, out_dtype: str | None = None, compute_dtype: str | None = None,
              tensors: str | None = None, allow_nonfinite: bool = False, allow_pickle: bool = False,
              allow_mixed_architectures: bool = False, unsafe_truncate_embeddings: bool = False,
              requantize: bool = False, progress: bool = True, card: bool = True, device: str | None = None) -> dict[str, Any]:
    """Merge per `recipe` into the folder `out`; returns a report (the CLI's --json). With `card`, the
    output also gets a model card and the recipe (`card.py` here).

    Quantized inputs are read unpacked (`adaptkit.quant.unpacked`), and the output is floating point; with
    `requantize` the tensors the quantized base had packed are packed again with its quantizer,
    and the report's `requantized` gives that extra rounding error (relative, per tensor).
    `dtype`, `out_dtype`, `compute_dtype` (`precision.py` here) and `tensors` replace the recipe's;
    `allow_mixed_architectures` merges models of different architectures (`sources.check_same_architecture`),
    `unsafe_truncate_embeddings` token rows that differ in number (`embeddings.Truncation`); operators
    compute on `device` (`adaptkit.devices`: cpu, cuda, cuda:N, auto), files are read and written on the CPU."""
    where = compute_device(device)
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    apply_overrides(recipe, dict(seed=seed, dtype=dtype, out_dtype=out_dtype, compute_dtype=compute_dtype, tensors=tensors,
                                 mixed_architectures=allow_mixed_architectures, truncate_embeddings=unsafe_truncate_embeddings))
    if recipe.output_kind == "adapter":
        if where.type != "cpu":
            raise AdaptkitError(f"--device {device}: an adapter output is factored on the CPU; drop the option")
        if requantize:
            raise AdaptkitError("--requantize applies to model outputs; this recipe makes an adapter")
        if recipe.compute_dtype and parse_dtype(recipe.compute_dtype) != torch.float32:
            raise AdaptkitError("an adapter output is computed in float32 (`dtype` is its output dtype): "
                                f"compute_dtype {recipe.compute_dtype} does not apply")
        return merge_adapters(recipe, out, force=force, progress=progress, allow_pickle=allow_pickle, card=card)
    start = time.perf_counter()
    plan = Plan(recipe, allow_pickle=allow_pickle)
    threads = threads or default_workers(plan.method)
    packed = _quantized_base(plan) if requantize else None
    report = plan.summary(threads)
    with atomic_output(out, force=force, inputs=recipe_inputs(recipe)) as tmp:
        folder = tmp / ".unquantized" if packed else tmp
        folder.mkdir(exist_ok=True)
        files = _write(plan, folder, threads, shard_size, allow_nonfinite, progress, where)
        if not packed and any(s.store.method for s in plan.sources):
            drop_quantization_config(folder)
        if packed:
            from ..quant.quantize import quantize_into

            method, names = packed
            with open_store(folder) as merged:
                again = quantize_into(merged, method, names, tmp, shard_size=shard_size, progress=progress)
            shutil.rmtree(folder)
            files = again.pop("files")
            report["requantized"] = again
        write_tokenizer(plan.vocabulary, recipe, plan.refs, plan.sources, tmp)
        if card:  # last: over a README.md copied from the base, which describes another model
            write_card(tmp, [(None, recipe)])
        else:
            drop_card(tmp)
    report.update(output=str(out), files=[Path(f).name for f in files], seconds=round(time.perf_counter() - start, 3),
                  seed=recipe.seed, device=str(where))
    return report


def _write(plan: Plan, folder: Path, threads: int, shard_size, allow_nonfinite: bool, progress: bool, device) -> list[Path]:
    metadata = {"format": "pt", "adaptkit.merge_method": plan.recipe.method, "adaptkit.seed": str(plan.recipe.seed)}
    reference = (plan.base or plan.inputs[0]).store
    mirrored = not plan.jobs and any(s.mirrored for s in plan.sources)
    if mirrored and parse_size(shard_size) != DEFAULT_SHARD_SIZE:
        raise AdaptkitError(f"--shard-size: the output keeps the files of {reference.root} (a pipeline folder, "
                            "a single-file checkpoint or a component folder), which tools load by name")
    if mirrored and (extra := next((n for n, _, _ in plan.layout if n not in reference), None)):  # (tensors: union)
        raise AdaptkitError(f"'{extra}' is not in {reference.root}, whose files and names the output keeps (a pipeline or a "
                            "single-file checkpoint): list first an input that has every tensor, or `tensors: intersection`")
    writer = MirrorWriter(folder, plan.layout, reference, metadata=metadata) if mirrored else \
        ShardedWriter(folder, plan.layout, shard_size=shard_size, metadata=metadata)
    try:
        _stream(plan, writer, threads, allow_nonfinite, progress, device)
    except BaseException:
        writer.abort()
        raise
    files = writer.close()
    if reference.components:  # a pipeline: its other files as they are (configs, tokenizer, scheduler)
        copy_tree(reference.root, folder, [Path("."), *(f.parent for f in writer.writers)])
        return files
    if (side := plan.side_files()) is not None:
        copy_side_files(side, folder)
    if plan.config is not None:  # slices: the output's own layer count
        (folder / "config.json").write_text(dump_json(plan.config, "config.json"))
    floating = {code for _, code, _ in plan.layout if code_to_torch(code).is_floating_point}
    if len(floating) == 1 and not mirrored:  # the dtype transformers loads the model in (mergekit sets it too)
        state_dtype(folder, code_to_torch(floating.pop()))
    return files


def _quantized_base(plan: Plan) -> tuple[str, set[str]]:
    """(quantizer, names it packed) of the quantized model the merge starts from."""
    for source in plan.sources:
        if source.store.method is not None:
            # (with slices, an output tensor is packed again when the layer it comes from was)
            return source.store.method, {n for n, _, _ in plan.layout  # (the checkpoint's names: `fuse`)
                                         if any(s is source and s.store.packed(m) for s, m in plan.job(n).sources)}
    raise AdaptkitError("--requantize: no input is a quantized model (to quantize the result, run adaptkit quantize)")


def _stream(plan: Plan, writer: ShardedWriter, threads: int, allow_nonfinite: bool, progress: bool, device) -> None:
    dtypes = {name: code_to_torch(code) for name, code, _ in plan.layout}
    shapes = {name: shape for name, _, shape in plan.layout} | {n: j.reference.info(j.reference_name).shape
                                                                for n, j in plan.fused.items()}
    # freed blocks' or tensors' memory kept for the next (the command only: allocator.py)
    allocator.tune("blocks" if spec.option(plan.method, "elementwise") else "tensors")
    intra_op = torch.get_num_threads()
    shared = max(1, intra_op // threads)  # worker threads times torch's own must not oversubscribe the cores
    pieces = [(name, rows) for name in plan.names for rows in row_blocks(plan, name)]
    left, lock = Counter(name for name, _ in pieces), threading.Lock()

    def need(piece) -> int:
        shape, rows = shapes[piece[0]], piece[1]
        return plan.working_bytes(math.prod(shape) if rows is None else math.prod(shape[1:]) * (rows[1] - rows[0]))

    def work(piece, alone: bool) -> None:
        name, rows = piece
        if alone:  # the other workers wait: all of torch's threads, and their freed heap given back
            # (SCE with tie_break: index, 1B, two workers: peak 1391-1483 MiB without, 1271 with)
            allocator.release()
            torch.set_num_threads(intra_op)
        try:
            merged = merge_tensor(plan, name, allow_nonfinite=allow_nonfinite, rows=rows, device=device)
            for out, part, row in plan.groups[name].split(merged) if name in plan.groups else [(name, merged, 0)]:
                part = part.to(dtypes[out]).cpu()
                if not (allow_nonfinite or all_finite(part)):  # (the dtypes it names looked up only then)
                    raise nonfinite_output(out, plan.recipe.method, plan.compute or plan.stored_dtype(name), part.dtype)
                writer.write(out, part, row=row + (rows[0] if rows else 0))
        finally:
            torch.set_num_threads(shared)
        with lock:
            left[name] -= 1
            if not left[name]:
                bar.update()

    bar = tqdm(total=len(plan.names), unit="tensor", desc=f"merge {plan.recipe.method}", disable=not progress,
               leave=False)
    torch.set_num_threads(shared)
    try:
        with command_threads_held(intra_op):
            run_within(pieces, need, work, threads, WORKING_MEMORY)
    finally:  # (the bar cleared before an error's line too)
        torch.set_num_threads(intra_op)
        bar.close()
