"""The merge engine: stream every tensor position through a merge operator into sharded output.

Inputs are opened lazily; for each tensor name the engine reads that tensor (or a block of its rows,
for elementwise operators) from every input — in float32, or as stored for operators that upcast
block by block — resolves the recipe's parameters for it (gradients, filters), calls the operator,
rounds once to the output dtype and writes it at its place in the output. A working-memory budget
keeps a few tensors in flight, so peak memory follows the largest tensor, not the model. Random operators get
one generator per input seeded from (seed, tensor name, input index): output bytes do not depend on
thread count or order. Adapters enter as `base+adapter` inputs (see `sources.py` here).
"""
from __future__ import annotations

import math
import os
import shutil
import threading
import time
from contextlib import contextmanager
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .. import allocator, registry, spec
from ..io.dtypes import code_to_torch, parse_dtype, torch_to_code
from ..errors import AdaptkitError
from ..io.store import open_store
from .recipe import Recipe, check_positions, layer_positions, load_recipe, operator_params, recipe_inputs
from .sources import ModelSource, check_same_architecture, open_input
from .to_adapter import merge_adapters
from ..io.readers import dump_json, read_json
from ..io.outputs import atomic_output
from ..io.writer import DEFAULT_SHARD_SIZE, ShardedWriter, copy_side_files

#: Elementwise operators see big tensors in row blocks of about this many elements (4 MB in float32),
#: so a 1B-parameter model's embeddings never sit in memory several times over. (Measured on the
#: 168M benchmark: 1M-element blocks took 50–250 MB less peak memory than 4M and were no slower.)
BLOCK_ELEMENTS = 1024 * 1024
#: Tensors merged at once share this many bytes of working memory (a bigger one runs alone).
WORKING_MEMORY = 768 * 1024 * 1024


class ByteBudget:
    """Lets worker threads start a tensor only while the working memory in use fits the budget."""

    def __init__(self, total: int):
        self.total = self.free = total
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, nbytes: int):
        nbytes = min(nbytes, self.total)
        with self._cond:
            self._cond.wait_for(lambda: self.free >= nbytes)
            self.free -= nbytes
        try:
            yield
        finally:
            with self._cond:
                self.free += nbytes
                self._cond.notify_all()


class Plan:
    """What a merge will do: inputs, tensor layout, output dtypes and a memory estimate."""

    def __init__(self, recipe: Recipe, *, allow_pickle: bool = False, dtype: str | None = None):
        self.recipe = recipe
        self.method = registry.get("merge", recipe.method)
        takes_base = spec.option(self.method, "takes_base")
        self.base = open_input(recipe.base, allow_pickle=allow_pickle) if recipe.base and takes_base else None
        self.inputs = [open_input(ref, allow_pickle=allow_pickle, base=recipe.base) for ref in recipe.models]
        check_same_architecture(self.sources)
        reference = self.base or self.inputs[0]
        self.names = reference.keys()
        for source in self.sources:
            source.check_matches(reference)
        # a quantized input has no one dtype to keep: the output is bfloat16 unless asked otherwise
        unpacked = "bfloat16" if any(s.store.method for s in self.sources) else None
        out = parse_dtype(dtype or recipe.out_dtype or recipe.dtype or unpacked)
        self.layout = []
        for name in self.names:
            info = reference.info(name)
            floating = code_to_torch(info.dtype).is_floating_point
            self.layout.append((name, torch_to_code(out) if out and floating else info.dtype, info.shape))
        self.positions = layer_positions(self.names, reference.config)
        check_positions(recipe, self.positions)

    @property
    def sources(self) -> list[ModelSource]:
        return ([self.base] if self.base else []) + self.inputs

    def working_bytes(self, numel: int) -> int:
        """Working memory of one tensor (or block): float32 copies of the inputs, the result, and
        for whole-tensor operators their task vectors and masks besides."""
        per_element = 4 * (len(self.sources) + 2)
        if not spec.option(self.method, "elementwise"):
            per_element += 4 * len(self.inputs) + 8
        return numel * per_element

    def peak_bytes(self, threads: int) -> int:
        largest = max((math.prod(shape) for _, _, shape in self.layout), default=0)
        if spec.option(self.method, "elementwise"):
            largest = min(largest, BLOCK_ELEMENTS)
        return max(self.working_bytes(largest), min(WORKING_MEMORY, self.working_bytes(largest) * threads))

    def summary(self, threads: int) -> dict[str, Any]:
        return {"method": self.recipe.method, "inputs": [str(s.ref) for s in self.inputs],
                "base": str(self.base.ref) if self.base else None, "tensors": len(self.layout),
                "parameters": sum(math.prod(s) for _, _, s in self.layout),
                "output_bytes": sum(math.prod(s) * code_to_torch(d).itemsize for _, d, s in self.layout),
                "estimated_peak_bytes": self.peak_bytes(threads), "threads": threads}


def all_finite(tensor: torch.Tensor) -> bool:
    """NaN and ±Inf propagate into a sum, so one fast reduction settles the usual all-finite case;
    only a non-finite sum (which large finite values can also give) needs the exact check."""
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def row_blocks(plan: Plan, name: str) -> list[tuple[int, int] | None]:
    """[None] (the whole tensor), or row ranges when the operator is elementwise and the tensor big."""
    shape = (plan.base or plan.inputs[0]).info(name).shape
    numel = math.prod(shape)
    if (not spec.option(plan.method, "elementwise") or numel <= BLOCK_ELEMENTS or len(shape) < 2
            or any(source.has_deltas(name) or source.store.packed(name) for source in plan.sources)):
        return [None]
    step = max(1, BLOCK_ELEMENTS // (numel // shape[0]))
    return [(r, min(r + step, shape[0])) for r in range(0, shape[0], step)]


def merge_tensor(plan: Plan, name: str, *, allow_nonfinite: bool = False,
                 rows: tuple[int, int] | None = None) -> torch.Tensor:
    """The merged tensor `name` (or its rows) in float32; non-float tensors come from the reference."""
    reference = plan.base or plan.inputs[0]
    if not code_to_torch(reference.info(name).dtype).is_floating_point:
        return reference.get(name, float32=False, rows=rows)
    # Operators that upcast block by block get inputs as stored (half the memory for bf16 models);
    # inputs with adapter deltas come in float32 either way.
    lazy = spec.option(plan.method, "block_upcast")
    tensors = [source.get(name, rows=rows, float32=not lazy or source.has_deltas(name)) for source in plan.inputs]
    base = plan.base.get(name, rows=rows, float32=not lazy or plan.base.has_deltas(name)) if plan.base else None
    if not allow_nonfinite:
        for source, t in zip(plan.sources, ([base] if base is not None else []) + tensors):
            if not all_finite(t):
                raise AdaptkitError(f"tensor '{name}' of {source.ref} has NaN or Inf values (--allow-nonfinite to merge anyway)")
    params = operator_params(plan.recipe, plan.method, name, plan.positions[name], len(tensors))
    return plan.method.merge(tensors, base, **params)


def run_merge(recipe: Recipe | dict | str | Path, out: str | Path, *, force: bool = False,
              shard_size: int | str = DEFAULT_SHARD_SIZE, threads: int | None = None, seed: int | None = None,
              dtype: str | None = None, allow_nonfinite: bool = False, allow_pickle: bool = False,
              requantize: bool = False, progress: bool = True) -> dict[str, Any]:
    """Merge per `recipe` into the folder `out`; returns a report (the CLI's --json).

    Quantized inputs are read unpacked (`adaptkit.quant.unpacked`), and the output is floating point; with
    `requantize` the tensors the quantized base had packed are packed again with its quantizer,
    and the report's `requantized` gives that extra rounding error (relative, per tensor)."""
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    if seed is not None:
        recipe.seed = seed
    if recipe.output_kind == "adapter":
        if requantize:
            raise AdaptkitError("--requantize applies to model outputs; this recipe makes an adapter")
        return merge_adapters(recipe, out, force=force, progress=progress, allow_pickle=allow_pickle)
    start = time.perf_counter()
    plan = Plan(recipe, allow_pickle=allow_pickle, dtype=dtype)
    threads = threads or default_threads(plan)
    packed = _quantized_base(plan) if requantize else None
    report = plan.summary(threads)
    with atomic_output(out, force=force, inputs=recipe_inputs(recipe)) as tmp:
        folder = tmp / ".unquantized" if packed else tmp
        folder.mkdir(exist_ok=True)
        files = _write(plan, folder, threads, shard_size, allow_nonfinite, progress)
        if not packed and any(s.store.method for s in plan.sources):
            _drop_quantization_config(folder)
        if packed:
            from ..quant.quantize import quantize_into

            method, names = packed
            with open_store(folder) as merged:
                again = quantize_into(merged, method, names, tmp, shard_size=shard_size, progress=progress)
            shutil.rmtree(folder)
            files = again.pop("files")
            report["requantized"] = again
    report.update(output=str(out), files=[Path(f).name for f in files], seconds=round(time.perf_counter() - start, 3),
                  seed=recipe.seed)
    return report


def _write(plan: Plan, folder: Path, threads: int, shard_size, allow_nonfinite: bool, progress: bool) -> list[Path]:
    metadata = {"format": "pt", "adaptkit.merge_method": plan.recipe.method, "adaptkit.seed": str(plan.recipe.seed)}
    writer = ShardedWriter(folder, plan.layout, shard_size=shard_size, metadata=metadata)
    try:
        _stream(plan, writer, threads, allow_nonfinite, progress)
    except BaseException:
        writer.abort()
        raise
    files = writer.close()
    copy_side_files((plan.base or plan.inputs[0]).root, folder)
    return files


def _drop_quantization_config(folder: Path) -> None:
    """An unpacked output keeps the base's config.json minus `quantization_config` (which transformers
    would otherwise act on when loading the floating-point weights)."""
    path = folder / "config.json"
    if path.is_file():
        config = read_json(path)
        if config.pop("quantization_config", None) is not None:
            path.write_text(dump_json(config, "config.json"))


def _quantized_base(plan: Plan) -> tuple[str, set[str]]:
    """(quantizer, names it packed) of the quantized model the merge starts from."""
    for source in plan.sources:
        if source.store.method is not None:
            return source.store.method, {n for n in plan.names if source.store.packed(n)}
    raise AdaptkitError("--requantize: no input is a quantized model (to quantize the result, run adaptkit quantize)")


def default_threads(plan: Plan) -> int:
    """Row blocks of elementwise operators overlap reading and arithmetic well on two workers; a
    whole-tensor operator runs fastest on one worker using all of torch's own threads (measured:
    trim-and-elect merges on two workers took twice as long, the workers fighting over memory bandwidth)."""
    return min(2, os.cpu_count() or 1) if spec.option(plan.method, "elementwise") else 1


def _stream(plan: Plan, writer: ShardedWriter, threads: int, allow_nonfinite: bool, progress: bool) -> None:
    dtypes = {name: code_to_torch(code) for name, code, _ in plan.layout}
    shapes = {name: shape for name, _, shape in plan.layout}
    budget = ByteBudget(WORKING_MEMORY)
    allocator.tune("merge")  # freed tensors' memory kept for the next one (the command only: allocator.py)

    def one(name: str) -> None:
        for rows in row_blocks(plan, name):
            numel = math.prod(shapes[name]) if rows is None else math.prod(shapes[name]) // shapes[name][0] * (rows[1] - rows[0])
            with budget.hold(plan.working_bytes(numel)):
                merged = merge_tensor(plan, name, allow_nonfinite=allow_nonfinite, rows=rows)
                writer.write(name, merged.to(dtypes[name]), row=rows[0] if rows else 0)

    bar = tqdm(total=len(plan.names), unit="tensor", desc=f"merge {plan.recipe.method}", disable=not progress,
               leave=False)
    intra_op = torch.get_num_threads()
    # Worker threads times torch's own threads must not oversubscribe the cores.
    torch.set_num_threads(max(1, intra_op // threads))
    try:
        _run_all(plan, one, threads, bar)
    finally:
        torch.set_num_threads(intra_op)
    bar.close()


def _run_all(plan: Plan, one, threads: int, bar) -> None:
    pending: set = set()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for name in plan.names:
            if len(pending) >= threads * 2:  # bounded prefetch: memory stays a few tensors deep
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    f.result()
                    bar.update()
            pending.add(pool.submit(one, name))
        for f in pending:
            f.result()
            bar.update()
