"""`adaptkit merge` (added to the root group in adaptkit/cli/__init__.py)."""
from __future__ import annotations

import click

from .. import registry
from ..errors import AdaptkitError
from .options import ALLOW_PICKLE, CONTEXT, POSITIVE, emit_json


def _quick_recipe(method, base, models, params, rank) -> dict:
    from ..io.readers import load_yaml

    method = method or registry.default("merge", "quick_with_base" if base else "quick")
    # The quick form's weight defaults to 1 where the method has one (recipes, like mergekit's, must give it).
    takes_weight = method in registry.names("merge") and "weight" in registry.get("merge", method).params
    entries = []
    for spec in models:
        path, sep, weight = spec.rpartition(":")
        try:
            value = float(weight) if sep else None
        except ValueError:
            value = None
        if value is None:
            path, value = spec, 1.0
        entries.append({"model": path, "parameters": {"weight": value}} if takes_weight else {"model": path})
    parameters = {}
    for item in params:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise AdaptkitError(f"--param expects key=value, got '{item}'")
        parameters[key.strip()] = load_yaml(value, f"--param {key.strip()}")
    recipe = {"merge_method": method, "models": entries, "parameters": parameters}
    if base:
        recipe["base_model"] = base
    from ..merge.to_adapter import factor_merge  # the merge command imports the engine next anyway

    factor_space = method in registry.names("merge") and factor_merge(registry.get("merge", method)) is not None
    if rank or (factor_space and not base):  # an operator on adapters' factors makes an adapter
        recipe["output"] = {"kind": "adapter", "rank": rank} if rank else {"kind": "adapter"}
    return recipe


def _multi_stage(recipe, out, force, dry_run, card, as_json, options) -> bool:
    """Run (with --dry-run: show) a multi-stage recipe; False when the file holds one plain recipe."""
    from ..merge import multi

    docs = multi.read_documents(recipe)
    if not multi.is_multi(docs):
        return False
    if dry_run:
        summary = multi.describe_stages(recipe, docs)
        if as_json:
            emit_json(summary)
            return True
        for i, stage in enumerate(summary["stages"], 1):
            base = f" (base {stage['base']})" if stage["base"] else ""
            inputs = ", ".join(stage["inputs"])
            click.echo(f"stage {i}, {stage['name'] or 'the output'}: {stage['method']} of {inputs}{base}")
        return True
    report = multi.run_stages(recipe, out, force=force, card=card, docs=docs, **options)
    if as_json:
        emit_json(report)
        return True
    seconds = sum(stage["seconds"] for stage in report["stages"])
    click.echo(f"merged {len(report['stages'])} stages into {report['output']} (the last: {report['tensors']} tensors "
               f"with {report['method']}; {seconds:.1f} s in all)")
    return True


@click.command(context_settings=CONTEXT)
@click.argument("recipe", required=False, type=click.Path(dir_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Output folder (must not exist, or --force).")
@click.option("--method", help="Quick form: merge method (default: task_arithmetic with --base, else linear).")
@click.option("--base", help="Quick form: base model (folder or org/name[@rev]).")
@click.option("-m", "--model", "models", multiple=True, metavar="PATH[:WEIGHT]", help="Quick form: an input, repeatable.")
@click.option("-p", "--param", "params", multiple=True, metavar="KEY=VALUE", help="Quick form: a method parameter, repeatable.")
@click.option("--rank", type=POSITIVE, help="Quick form: merge adapters into an adapter of this rank.")
@click.option("--seed", type=int, help="Seed for random merge methods; overrides the recipe's.")
@click.option("--dtype", help="As a recipe's `dtype` (mergekit's meaning): the dtype tensors are loaded and computed in, "
              "and the output dtype unless --out-dtype (float32, bfloat16, float16; default: as stored).")
@click.option("--out-dtype", help="Output dtype for floating tensors, as a recipe's `out_dtype` (default: --dtype).")
@click.option("--compute-dtype", help="Compute in this dtype instead of --dtype, as a recipe's `compute_dtype`; "
              "float32 computes from the inputs as stored and rounds once to the output dtype.")
@click.option("--shard-size", default="2GB", show_default=True, help="Largest output shard.")
@click.option("--threads", type=POSITIVE, help="Tensors merged in parallel (default: 2 for elementwise methods, else 1 using all cores).")
@click.option("--force", is_flag=True, help="Replace an existing output folder (only once the merge succeeds).")
@click.option("--dry-run", is_flag=True, help="Check inputs and print the plan (per group of tensors the parameters "
              "after gradients and filters, and the estimated peak memory); write nothing.")
@click.option("--no-card", is_flag=True, help="Write no model card (README.md) or recipe copy (adaptkit_recipe.yml).")
@click.option("--allow-nonfinite", is_flag=True, help="Merge tensors holding NaN or Inf instead of stopping.")
@ALLOW_PICKLE
@click.option("--requantize", is_flag=True, help="With a quantized base: pack the result again with the base's "
              "quantizer (default: write it unpacked, bfloat16) and report the extra rounding error.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def merge(ctx, recipe, out, method, base, models, params, rank, seed, dtype, out_dtype, compute_dtype, shard_size,
          threads, force, dry_run, no_card, allow_nonfinite, allow_pickle, requantize, as_json):
    """Merge models or adapters by a recipe (mergekit's YAML format) or the quick form.

    Modes: models -> model; base + adapters -> model (each adapter's ΔW added into the streamed
    base); adapters -> adapter (`output: {kind: adapter, rank: R}` or --rank). A recipe file of several
    YAML documents is a multi-stage recipe (mergekit-multi's): the final stage is written to --out.
    The output gets a model card (README.md) and the recipe as it ran (adaptkit_recipe.yml).

    \b
    Examples:
      adaptkit merge soup.yaml -o merged/
      adaptkit merge --method task_arithmetic --base B -m A:0.5 -m C:0.5 -p lambda=0.9 -o merged/
      adaptkit merge --base llama -m my-lora -o llama-merged/        # merge-and-unload
      adaptkit merge --method linear -m lora1:0.5 -m lora2:0.5 --rank 16 -o lora-mix/
      adaptkit merge soup.yaml -o merged/ --dry-run
      adaptkit merge soup.yaml -o merged/ --compute-dtype float32     # bf16 recipe, rounded once
      adaptkit merge --base llama-4bit/ -m my-qlora -o merged/ --requantize   # into a quantized base
    """
    from ..merge.card import describe_group, parameter_groups
    from ..merge.engine import Plan, run_merge
    from ..merge.recipe import load_recipe
    from .report import human_bytes

    if bool(recipe) == bool(models):
        raise AdaptkitError("give a recipe file or the quick form (-m PATH[:WEIGHT] ...), not both or neither")
    dtypes = dict(dtype=dtype, out_dtype=out_dtype, compute_dtype=compute_dtype)
    options = dict(shard_size=shard_size, threads=threads, seed=seed, **dtypes, allow_nonfinite=allow_nonfinite,
                   allow_pickle=allow_pickle, requantize=requantize, progress=not ctx.obj["quiet"])
    if recipe and _multi_stage(recipe, out, force, dry_run, not no_card, as_json, options):
        return
    spec = recipe if recipe else _quick_recipe(method, base, models, params, rank)
    parsed = load_recipe(spec)
    for key, value in dtypes.items():
        setattr(parsed, key, value or getattr(parsed, key))
    if dry_run and parsed.output_kind == "adapter":
        from ..merge.to_adapter import plan_adapters

        summary = plan_adapters(parsed, allow_pickle=allow_pickle)
        if as_json:
            return emit_json(summary)
        click.echo(f"{summary['method']}: {summary['modules']} modules of {len(summary['inputs'])} "
                   f"{summary['variant']} adapter(s) -> one adapter, rank {summary['rank']}")
        return
    if dry_run:
        plan = Plan(parsed, allow_pickle=allow_pickle)
        summary = plan.summary(threads or 1)
        summary["groups"] = parameter_groups(plan)
        if as_json:
            return emit_json(summary)
        click.echo(f"{summary['method']}: {summary['tensors']} tensors, {summary['parameters']:,} parameters from "
                   f"{len(summary['inputs'])} input(s); output {human_bytes(summary['output_bytes'])}, "
                   f"estimated peak {human_bytes(summary['estimated_peak_bytes'])}")
        for group in summary["groups"]:
            click.echo(f"  {describe_group(group)}")
        return
    report = run_merge(parsed, out, force=force, card=not no_card, **options)
    if as_json:
        return emit_json(report)
    click.echo(f"merged {report['tensors']} tensors with {report['method']} into {report['output']} "
               f"({len(report['files'])} file(s), {report['seconds']:.1f} s)")
    again = report.get("requantized")
    if again:
        click.echo(f"re-quantized {again['quantized']} tensor(s) with {again['method']}: extra rounding error "
                   f"(relative) mean {again['mean_error']:.4g}, max {again['max_error']:.4g}")
