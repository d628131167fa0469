"""`adaptkit merge` (added to the root group in adaptkit/cli/__init__.py)."""
from __future__ import annotations

import click

from .. import registry
from ..errors import AdaptkitError
from ..merge import TENSOR_SETS
from .boundary import heavy_imports
from .options import (ALLOW_MIXED, ALLOW_PICKLE, CONTEXT, DEVICE, DRY_RUN, FORCE, JSON, NO_CARD, OUT, PLOT, RANK, SEED,
                      SHARD_SIZE, THREADS, UNSAFE_TRUNCATE, DType, base_option, dtype_option, emit_json, settings_option,
                      split_weight)


def _quick_recipe(method, base, models, parameters, rank) -> dict:
    method = method or registry.default("merge", "quick_with_base" if base else "quick")
    # The quick form's weight defaults to 1 where the method has one (recipes, like mergekit's, must give it).
    takes_weight = method in registry.names("merge") and "weight" in registry.get("merge", method).params
    entries = []
    for spec in models:
        path, value = split_weight(spec)
        value = 1.0 if value is None else value
        entries.append({"model": path, "parameters": {"weight": value}} if takes_weight else {"model": path})
    recipe = {"merge_method": method, "models": entries, "parameters": parameters}
    if base:
        recipe["base_model"] = base
    from ..merge.to_adapter import factor_merge  # the merge command imports the engine next anyway

    factor_space = method in registry.names("merge") and factor_merge(registry.get("merge", method)) is not None
    if rank or (factor_space and not base):  # an operator on adapters' factors makes an adapter
        recipe["output"] = {"kind": "adapter", "rank": rank} if rank else {"kind": "adapter"}
    return recipe


def _multi_stage(recipe, out, force, dry_run, card, as_json, options, overrides) -> bool:
    """Run (with --dry-run: show) a multi-stage recipe; False when the file holds one plain recipe."""
    from ..merge import multi

    docs = multi.read_documents(recipe)
    if not multi.is_multi(docs):
        return False
    if dry_run:
        from ..merge.card import describe_group

        summary = multi.describe_stages(recipe, docs, threads=options["threads"], allow_pickle=options["allow_pickle"],
                                        overrides=overrides)
        if as_json:
            emit_json(summary)
            return True
        for i, stage in enumerate(summary["stages"], 1):
            base = f" (base {stage['base']})" if stage["base"] else ""
            inputs = ", ".join(stage["inputs"])
            click.echo(f"stage {i}, {stage['name'] or 'the output'}: {stage['method']} of {inputs}{base}")
            if stage["plan"]:  # (a stage using another's result is planned when that exists)
                click.echo(f"  {_plan_line(stage['plan'])}")
                for group in stage["plan"]["groups"]:
                    click.echo(f"  {describe_group(group)}")
        return True
    report = multi.run_stages(recipe, out, force=force, card=card, docs=docs, **options)
    if as_json:
        emit_json(report)
        return True
    seconds = sum(stage["seconds"] for stage in report["stages"])
    click.echo(f"merged {len(report['stages'])} stages into {report['output']} (the last: {report['tensors']} tensors "
               f"with {report['method']}; {seconds:.1f} s in all)")
    return True


def _plan_line(summary: dict) -> str:
    """A plan's size and estimated peak, as --dry-run prints them."""
    from .report import human_bytes

    return (f"{summary['tensors']} tensors, {summary['parameters']:,} parameters from {len(summary['inputs'])} "
            f"input(s); output {human_bytes(summary['output_bytes'])}, estimated peak "
            f"{human_bytes(summary['estimated_peak_bytes'])} ({human_bytes(summary['working_bytes'])} working memory "
            f"over this process's {human_bytes(summary['process_bytes'])})")


def _echo_inputs(parsed) -> None:
    """--dry-run's inputs, as the recipe resolved them: the base, then each model with its parameters."""
    if parsed.base is not None:
        click.echo(f"  base   {parsed.base}")
    for ref, params in zip(parsed.models, parsed.model_params):
        values = ", ".join(f"{k}={v}" for k, v in params.items())
        click.echo(f"  input  {ref}{f'  ({values})' if values else ''}")
    dtypes = [f"{k} {v}" for k, v in (("dtype", parsed.dtype), ("out_dtype", parsed.out_dtype),
                                       ("compute_dtype", parsed.compute_dtype), ("tensors", parsed.tensors)) if v]
    click.echo(f"  seed   {parsed.seed}{'; ' + ', '.join(dtypes) if dtypes else ''}")


def _adapter_errors(report: dict, worst: int = 3) -> str:
    """An adapter output's per-module relative error ‖ΔW − B·A‖/‖ΔW‖ in one line: the median and the worst."""
    import statistics

    errors = report["errors"]
    if "note" in report:  # a method on the factors themselves (merge/to_adapter.py rank_report): no SVD
        return (f"exact (relative error 0 in every module): each module's rank is the sum of the inputs' ranks "
                f"there (up to {report['rank']})")
    ranked = sorted(errors.items(), key=lambda kv: -kv[1])
    median = statistics.median(errors.values())
    shown = ", ".join(f"{module} {error:.3g}" for module, error in ranked[:worst])
    return (f"rank {report['rank']}: relative error ‖ΔW − B·A‖/‖ΔW‖ per module median {median:.3g}, "
            f"max {report['max_error']:.3g} (worst: {shown}; all {len(errors)} in --json)")


def _check_plot(plot: str, recipe: str | None, dry_run: bool, parsed=None) -> None:
    """--plot draws an adapter output's per-module refactoring error: refused, before any work, for a merge
    that has none (a model output, or an exact operator on the factors: error 0 everywhere)."""
    from ..merge import multi
    from ..merge.to_adapter import factor_merge
    from ..plots import check_target

    if parsed is None:
        check_target(plot)
        if dry_run:
            raise AdaptkitError("--plot draws a merge's errors; --dry-run merges nothing")
        if recipe and multi.is_multi(multi.read_documents(recipe)):
            raise AdaptkitError("--plot draws an adapter merge's per-module errors; give it a one-stage recipe")
    elif parsed.output_kind != "adapter":
        raise AdaptkitError("--plot draws the per-module refactoring error of a merge into an adapter (--rank, or "
                            "`output: {kind: adapter, rank: R}`); this merge writes a model, which has none")
    elif parsed.method in registry.names("merge") and factor_merge(registry.get("merge", parsed.method)) is not None:
        raise AdaptkitError(f"--plot: {parsed.method} merges the adapters' factors exactly (error 0 in every "
                            "module); there is no refactoring error to draw")


@click.command(context_settings=CONTEXT)
@click.argument("recipe", required=False, type=click.Path(dir_okay=False))
@OUT
@click.option("--method", help="Quick form: merge method (default: task_arithmetic with --base, else linear).")
@base_option()
@click.option("-m", "--model", "models", multiple=True, metavar="PATH[:WEIGHT]", help="Quick form: an input, repeatable.")
@settings_option("-p", "--param")
@RANK
@SEED
@dtype_option()
@click.option("--out-dtype", type=DType(), help="Output dtype for floating tensors, as a recipe's `out_dtype` (default: --dtype).")
@click.option("--compute-dtype", type=DType(), help="Compute in this dtype instead of --dtype, as a recipe's `compute_dtype`; "
              "float32 computes from the inputs as stored (a model+lora input's W + ΔW unrounded) and rounds once "
              "to the output dtype.")
@click.option("--tensors", type=click.Choice(TENSOR_SETS),
              help="Inputs holding different tensors: write every tensor any input has, each merged over the inputs "
                   "that have it, or only those all have (mergekit-pytorch's --tensor-union, --tensor-intersection; "
                   "a recipe's `tensors`).")
@SHARD_SIZE
@THREADS
@DEVICE
@FORCE
@DRY_RUN
@NO_CARD
@click.option("--allow-nonfinite", is_flag=True, help="Merge tensors holding NaN or Inf instead of stopping.")
@ALLOW_PICKLE
@ALLOW_MIXED
@UNSAFE_TRUNCATE
@click.option("--requantize", is_flag=True, help="With a quantized base: pack the result again with the base's "
              "quantizer (default: write it unpacked, bfloat16) and report the extra rounding error.")
@JSON
@PLOT
@click.pass_context
def merge(ctx, recipe, out, method, base, models, settings, rank, seed, dtype, out_dtype, compute_dtype, tensors, shard_size,
          threads, device, force, dry_run, no_card, allow_nonfinite, allow_pickle, allow_mixed_architectures,
          unsafe_truncate_embeddings, requantize, as_json, plot):
    """Merge models or adapters by a recipe (mergekit's YAML format; bakllama configs too) or the quick form.

    Modes: models -> model; base + adapters -> model (each adapter's ΔW added into the streamed
    base); adapters -> adapter (`output: {kind: adapter, rank: R}` or --rank). A recipe file of several
    YAML documents is a multi-stage recipe (mergekit-multi's): the final stage is written to --out.
    The output gets a model card (README.md) and the recipe as it ran (adaptkit_recipe.yml).

    Quick form: --set gives the method's parameters (mergekit's names). --seed and --dtype override a
    recipe's `seed` and `dtype` (mergekit's meaning of dtype: also the output's, unless --out-dtype).

    --device cuda computes on a GPU (every method but passthrough, which only copies): inputs are read
    and the output written on the CPU side, each tensor moved to the GPU and its result back.

    --dry-run prints the inputs as resolved, and per group of tensors the parameters after gradients
    and filters, and the estimated peak memory. An adapter output reports each module's relative error ‖ΔW − B·A‖/‖ΔW‖ (the worst and the median;
    --plot draws them all, one bar per module).

    \b
    Examples:
      adaptkit merge soup.yaml -o merged/
      adaptkit merge --method task_arithmetic --base B -m A:0.5 -m C:0.5 --set lambda=0.9 -o merged/
      adaptkit merge --base llama -m my-lora -o llama-merged/        # merge-and-unload
      adaptkit merge --method linear -m lora1:0.5 -m lora2:0.5 --rank 16 -o lora-mix/
      adaptkit merge --method ties -m lora1 -m lora2 --rank 8 -o lora-ties/ --plot errors.png
      adaptkit merge soup.yaml -o merged/ --dry-run
      adaptkit merge ties.yaml -o merged/ --device cuda
      adaptkit merge soup.yaml -o merged/ --compute-dtype float32     # bf16 recipe, rounded once
      adaptkit merge --method linear -m a.safetensors -m b.safetensors --tensors union -o ab/
      adaptkit merge --base llama-4bit/ -m my-qlora -o merged/ --requantize   # into a quantized base
    """
    with heavy_imports():
        from ..merge.card import describe_group
        from ..merge.engine import Plan, run_merge
        from ..merge.recipe import apply_overrides, load_recipe
    from ..devices import compute_device

    compute_device(device)  # (a device this machine lacks: refused before any work, --dry-run too)
    if bool(recipe) == bool(models):
        raise AdaptkitError("give a recipe file or the quick form (-m PATH[:WEIGHT] ...), not both or neither")
    quick = [flag for flag, given in (("--method", method), ("--base", base), ("--set", settings), ("--rank", rank))
             if given]
    if recipe and quick:  # the recipe says these itself: not silently ignored
        raise AdaptkitError(f"{', '.join(quick)}: only with the quick form (-m ...); a recipe file gives them itself")
    if plot:
        _check_plot(plot, recipe, dry_run)
    dtypes = dict(dtype=dtype, out_dtype=out_dtype, compute_dtype=compute_dtype, tensors=tensors)  # (the recipe's replaced)
    options = dict(shard_size=shard_size, threads=threads, device=device, seed=seed, **dtypes, allow_nonfinite=allow_nonfinite,
                   allow_pickle=allow_pickle, allow_mixed_architectures=allow_mixed_architectures,
                   unsafe_truncate_embeddings=unsafe_truncate_embeddings, requantize=requantize,
                   progress=not ctx.obj["quiet"])
    overrides = {**dtypes, "mixed_architectures": allow_mixed_architectures, "seed": seed,  # (what --dry-run shows)
                 "truncate_embeddings": unsafe_truncate_embeddings}
    if recipe and _multi_stage(recipe, out, force, dry_run, not no_card, as_json, options, overrides):
        return
    spec = recipe if recipe else _quick_recipe(method, base, models, settings, rank)
    parsed = load_recipe(spec)
    apply_overrides(parsed, overrides)
    if plot:
        _check_plot(plot, recipe, dry_run, parsed)
    if dry_run and parsed.output_kind == "adapter":
        from ..merge.to_adapter import plan_adapters

        summary = plan_adapters(parsed, allow_pickle=allow_pickle)
        if as_json:
            return emit_json(summary)
        click.echo(f"{summary['method']}: {summary['modules']} modules of {len(summary['inputs'])} "
                   f"{summary['variant']} adapter(s) -> one adapter, rank {summary['rank']}")
        _echo_inputs(parsed)
        return
    if dry_run:
        summary = Plan(parsed, allow_pickle=allow_pickle).dry_run(threads)
        if as_json:
            return emit_json(summary)
        click.echo(f"{summary['method']}: {_plan_line(summary)}")
        _echo_inputs(parsed)
        click.echo(f"parameters by tensor ({len(summary['groups'])} group(s); per-model values in input order):")
        for group in summary["groups"]:
            click.echo(f"  {describe_group(group)}")
        return
    report = run_merge(parsed, out, force=force, card=not no_card, **options)
    if plot:
        from ..plots import draw, merge_figure

        draw(merge_figure(report["errors"], report["rank"]), plot)
    if as_json:
        return emit_json({**report, "plot": plot} if plot else report)
    click.echo(f"merged {report['tensors']} tensors with {report['method']} into {report['output']} "
               f"({len(report['files'])} file(s), {report['seconds']:.1f} s)")
    if report.get("output_kind") == "adapter":
        click.echo(_adapter_errors(report))
    again = report.get("requantized")
    if again:
        click.echo(f"re-quantized {again['quantized']} tensor(s) with {again['method']}: extra rounding error "
                   f"(relative) mean {again['mean_error']:.4g}, max {again['max_error']:.4g}")
    if plot:
        click.echo(f"picture: {plot}")
