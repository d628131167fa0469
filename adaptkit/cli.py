"""The `adaptkit` command line. User errors print one line and exit 1 (a traceback with --debug)."""
from __future__ import annotations

import json
import warnings

import click

from . import __version__, registry
from .cli_boundary import Group, be_quiet, one_line_warning
from .cli_types import ALLOW_PICKLE, POSITIVE
from .errors import AdaptkitError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(cls=Group, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="adaptkit")
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or warnings.")
@click.pass_context
def cli(ctx, debug, quiet):
    """adaptkit: parameter-efficient adapters and model merging.

    \b
    Examples:
      adaptkit plugins
      adaptkit inspect ./my-adapter
      adaptkit inspect ./model --json | jq .parameters
    """
    ctx.obj = {"debug": debug, "quiet": quiet}
    warnings.showwarning = one_line_warning
    if quiet:
        be_quiet(ctx)


def emit_json(data) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


@cli.command(context_settings=CONTEXT)
@click.option("--kind", type=click.Choice(registry.KINDS), help="Only plugins of this kind.")
@click.option("--check", is_flag=True, help="Import every plugin and report those that fail to load.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list (keys: name, kind, source, description, status).")
def plugins(kind, check, as_json):
    """List the registered plugins: built-ins and those installed by other packages.

    Listing imports no plugin; --check imports each one and marks the broken ones.

    \b
    Examples:
      adaptkit plugins
      adaptkit plugins --kind merge
      adaptkit plugins --check --json
    """
    rows = []
    for e in registry.entries(kind):
        description, problem = registry.describe(e)
        if check and problem is None:
            try:
                registry.get(e.kind, e.name)
            except AdaptkitError as exc:
                problem = str(exc)
        rows.append({"name": e.name, "kind": e.kind, "source": e.source, "description": description,
                     "status": f"broken: {problem}" if problem else ("ok" if check else "listed")})
    if as_json:
        return emit_json(rows)
    width = max((len(r["name"]) for r in rows), default=4)
    for r in rows:
        mark = f"  [{r['status']}]" if r["status"].startswith("broken") else ""
        source = "" if r["source"] == registry.BUILTIN else f"  ({r['source']})"
        click.echo(f"{r['kind']:<9} {r['name']:<{width}}  {r['description']}{source}{mark}")


@cli.command(name="inspect", context_settings=CONTEXT)
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON (stable keys, below).")
@ALLOW_PICKLE
def inspect_cmd(path, as_json, allow_pickle):
    """Describe a model, adapter or quantized model without reading tensor data.

    PATH is a folder (model, shards with an index, PEFT adapter, Hub cache snapshot) or a
    .safetensors file.

    \b
    JSON keys: path, kind (model|adapter|quantized-model), format, tensors, parameters, bytes,
    dtypes {dtype: {tensors, parameters}}, shards [{file, tensors, bytes}], metadata,
    model {model_type, architectures, hidden_size, num_hidden_layers, vocab_size, ...} or null,
    adapter {variant, format, base_model, target_modules, targeted_modules,
    trainable_parameters, modules_to_save, rank, ranks, alpha, scaling, modules, ...} or null,
    quantization {method} or null.

    \b
    Examples:
      adaptkit inspect ./llama-lora
      adaptkit inspect ./model/model.safetensors.index.json --json
    """
    from .inspection import inspect
    from .report import format_inspect

    report = inspect(path, allow_pickle=allow_pickle)
    if as_json:
        return emit_json(report)
    click.echo(format_inspect(report))


def main() -> None:
    cli(prog_name="adaptkit")


def _quick_recipe(method, base, models, params, rank) -> dict:
    from .readers import load_yaml

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
    from .adapter_merge import factor_merge  # the merge command imports the engine next anyway

    factor_space = method in registry.names("merge") and factor_merge(registry.get("merge", method)) is not None
    if rank or (factor_space and not base):  # an operator on adapters' factors makes an adapter
        recipe["output"] = {"kind": "adapter", "rank": rank} if rank else {"kind": "adapter"}
    return recipe


@cli.command(context_settings=CONTEXT)
@click.argument("recipe", required=False, type=click.Path(dir_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Output folder (must not exist, or --force).")
@click.option("--method", help="Quick form: merge method (default: task_arithmetic with --base, else linear).")
@click.option("--base", help="Quick form: base model (folder or org/name[@rev]).")
@click.option("-m", "--model", "models", multiple=True, metavar="PATH[:WEIGHT]", help="Quick form: an input, repeatable.")
@click.option("-p", "--param", "params", multiple=True, metavar="KEY=VALUE", help="Quick form: a method parameter, repeatable.")
@click.option("--rank", type=POSITIVE, help="Quick form: merge adapters into an adapter of this rank.")
@click.option("--seed", type=int, help="Seed for random merge methods; overrides the recipe's.")
@click.option("--dtype", help="Output dtype for floating tensors (float32, bfloat16, float16).")
@click.option("--shard-size", default="2GB", show_default=True, help="Largest output shard.")
@click.option("--threads", type=POSITIVE, help="Tensors merged in parallel (default: 2 for elementwise methods, else 1 using all cores).")
@click.option("--force", is_flag=True, help="Replace an existing output folder (only once the merge succeeds).")
@click.option("--dry-run", is_flag=True, help="Check inputs and print the plan; write nothing.")
@click.option("--allow-nonfinite", is_flag=True, help="Merge tensors holding NaN or Inf instead of stopping.")
@ALLOW_PICKLE
@click.option("--requantize", is_flag=True, help="With a quantized base: pack the result again with the base's "
              "quantizer (default: write it unpacked, bfloat16) and report the extra rounding error.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def merge(ctx, recipe, out, method, base, models, params, rank, seed, dtype, shard_size, threads, force, dry_run,
          allow_nonfinite, allow_pickle, requantize, as_json):
    """Merge models or adapters by a recipe (mergekit's YAML format) or the quick form.

    Modes: models -> model; base + adapters -> model (each adapter's ΔW added into the streamed
    base); adapters -> adapter (`output: {kind: adapter, rank: R}` or --rank).

    \b
    Examples:
      adaptkit merge soup.yaml -o merged/
      adaptkit merge --method task_arithmetic --base B -m A:0.5 -m C:0.5 -p lambda=0.9 -o merged/
      adaptkit merge --base llama -m my-lora -o llama-merged/        # merge-and-unload
      adaptkit merge --method linear -m lora1:0.5 -m lora2:0.5 --rank 16 -o lora-mix/
      adaptkit merge soup.yaml -o merged/ --dry-run
      adaptkit merge --base llama-4bit/ -m my-qlora -o merged/ --requantize   # into a quantized base
    """
    from .merge import Plan, run_merge
    from .recipe import load_recipe
    from .report import human_bytes

    if bool(recipe) == bool(models):
        raise AdaptkitError("give a recipe file or the quick form (-m PATH[:WEIGHT] ...), not both or neither")
    spec = recipe if recipe else _quick_recipe(method, base, models, params, rank)
    parsed = load_recipe(spec)
    if dtype:
        parsed.out_dtype = dtype
    if dry_run and parsed.output_kind == "adapter":
        from .adapter_merge import plan_adapters

        summary = plan_adapters(parsed, allow_pickle=allow_pickle)
        if as_json:
            return emit_json(summary)
        click.echo(f"{summary['method']}: {summary['modules']} modules of {len(summary['inputs'])} "
                   f"{summary['variant']} adapter(s) -> one adapter, rank {summary['rank']}")
        return
    if dry_run:
        plan = Plan(parsed, allow_pickle=allow_pickle, dtype=dtype)
        summary = plan.summary(threads or 1)
        if as_json:
            return emit_json(summary)
        click.echo(f"{summary['method']}: {summary['tensors']} tensors, {summary['parameters']:,} parameters from "
                   f"{len(summary['inputs'])} input(s); output {human_bytes(summary['output_bytes'])}, "
                   f"estimated peak {human_bytes(summary['estimated_peak_bytes'])}")
        return
    report = run_merge(parsed, out, force=force, shard_size=shard_size, threads=threads, seed=seed, dtype=dtype,
                       allow_nonfinite=allow_nonfinite, allow_pickle=allow_pickle, requantize=requantize,
                       progress=not ctx.obj["quiet"])
    if as_json:
        return emit_json(report)
    click.echo(f"merged {report['tensors']} tensors with {report['method']} into {report['output']} "
               f"({len(report['files'])} file(s), {report['seconds']:.1f} s)")
    again = report.get("requantized")
    if again:
        click.echo(f"re-quantized {again['quantized']} tensor(s) with {again['method']}: extra rounding error "
                   f"(relative) mean {again['mean_error']:.4g}, max {again['max_error']:.4g}")


def _evaluator(eval_cmd: str | None, eval_py: str | None, eval_data: str | None = None, task: str | None = None):
    """A score function from a shell command template ({model} -> folder), a module:function, or
    evaluation data (JSON lines: −loss for causal LM, accuracy for classification)."""
    import importlib
    import shlex
    import subprocess

    if sum(map(bool, (eval_cmd, eval_py, eval_data))) != 1:
        raise AdaptkitError("give exactly one of --eval DATA.jsonl, --eval-cmd 'CMD {model}' or --eval-py module:function")
    if eval_data:
        from .evaluate import scorer

        return scorer(eval_data, task=task)
    if eval_py:
        module, _, attr = eval_py.partition(":")
        try:
            function = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError, ValueError) as e:
            raise AdaptkitError(f"--eval-py {eval_py}: {e}") from None

        def run_function(model) -> float:
            try:
                return float(function(model))
            except Exception as e:  # noqa: BLE001 (the user's code: its failure is said in one line)
                raise AdaptkitError(f"--eval-py {eval_py} failed on {model}: {type(e).__name__}: {e}") from e

        return run_function

    def run_command(model) -> float:
        cmd = eval_cmd.replace("{model}", shlex.quote(str(model)))
        proc = subprocess.run(cmd, shell=True, capture_output=True, text=True)
        lines = proc.stdout.strip().splitlines()
        try:
            if proc.returncode != 0:
                raise ValueError(f"exit status {proc.returncode}")
            return float(lines[-1])
        except (ValueError, IndexError) as e:
            raise AdaptkitError(f"--eval-cmd must print a score as its last line ({e}): {cmd}") from None

    return run_command


@cli.group(cls=Group, context_settings=CONTEXT)
def soup():
    """Model soups: uniform average, greedy soup, and an interpolation sweep.

    \b
    Examples:
      adaptkit soup uniform -m ft1 -m ft2 -m ft3 -o soup/
      adaptkit soup greedy -m ft1 -m ft2 -m ft3 --eval-cmd "python score.py {model}" -o soup/
      adaptkit soup greedy -m ft1 -m ft2 -m ft3 --eval dev.jsonl -o soup/
      adaptkit soup sweep zero-shot fine-tuned --alphas 0,0.25,0.5,0.75,1 --eval-py my_eval:score -o best/
    """


def _eval_options(f):
    f = click.option("--task", type=click.Choice(["causal-lm", "classification"]),
                     help="With --eval: the task (default: from the records).")(f)
    f = click.option("--eval-py", help="module:function taking the model folder and returning a score.")(f)
    f = click.option("--eval-cmd", help="Shell command scoring {model} (a folder); its last output line is the score.")(f)
    return click.option("--eval", "eval_data", type=click.Path(dir_okay=False),
                        help="JSON lines to score on: −loss (causal LM) or accuracy (classification).")(f)


def _soup_options(f):
    f = ALLOW_PICKLE(f)
    f = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")(f)
    f = click.option("--force", is_flag=True, help="Replace an existing output folder.")(f)
    return click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Output folder.")(f)


@soup.command(context_settings=CONTEXT)
@click.option("-m", "--model", "models", multiple=True, required=True, help="An ingredient, repeatable.")
@_soup_options
def uniform(models, out, force, as_json, allow_pickle):
    """Average the models: θ = (1/k)·Σ θᵢ.

    \b
    Example:
      adaptkit soup uniform -m ft1 -m ft2 -m ft3 -o soup/
    """
    from . import soup as soups

    soups.uniform(models, out=out, force=force, allow_pickle=allow_pickle)
    if as_json:
        return emit_json({"ingredients": list(models), "output": out})
    click.echo(f"uniform soup of {len(models)} models in {out}")


@soup.command(context_settings=CONTEXT)
@click.option("-m", "--model", "models", multiple=True, required=True, help="A candidate, repeatable.")
@_eval_options
@_soup_options
def greedy(models, eval_data, eval_cmd, eval_py, task, out, force, as_json, allow_pickle):
    """Greedy soup: rank candidates by score; add each only if the soup does not get worse.

    Higher scores are better (negate a loss); --eval DATA scores each soup on JSON lines.

    \b
    Examples:
      adaptkit soup greedy -m ft1 -m ft2 -m ft3 --eval-cmd "python score.py {model}" -o soup/
      adaptkit soup greedy -m ft1 -m ft2 -m ft3 --eval dev.jsonl -o soup/
    """
    from . import soup as soups

    result = soups.greedy(models, _evaluator(eval_cmd, eval_py, eval_data, task), out=out, force=force,
                          allow_pickle=allow_pickle)
    if as_json:
        return emit_json({"ingredients": result.ingredients, "score": result.score, "scores": result.scores,
                          "steps": result.steps, "output": out})
    for step in result.steps:
        click.echo(f"  {'kept ' if step['kept'] else 'skip '} {step['added']}  score {step['score']:.6g}")
    click.echo(f"greedy soup of {len(result.ingredients)} models, score {result.score:.6g}, in {out}")


@soup.command(context_settings=CONTEXT)
@click.argument("a")
@click.argument("b")
@click.option("--alphas", default="0,0.25,0.5,0.75,1", show_default=True, help="Comma-separated α values.")
@_eval_options
@_soup_options
def sweep(a, b, alphas, eval_data, eval_cmd, eval_py, task, out, force, as_json, allow_pickle):
    """Score θ(α) = (1 − α)·A + α·B for each α and keep the best (WiSE-FT).

    \b
    Examples:
      adaptkit soup sweep zero-shot fine-tuned --alphas 0,0.5,1 --eval-cmd "python score.py {model}" -o best/
      adaptkit soup sweep zero-shot fine-tuned --eval dev.jsonl -o best/
    """
    from . import soup as soups

    try:
        values = [float(x) for x in alphas.split(",") if x.strip()]
    except ValueError:
        raise AdaptkitError(f"--alphas must be numbers separated by commas, got '{alphas}'") from None
    result = soups.sweep(a, b, values, _evaluator(eval_cmd, eval_py, eval_data, task), out=out, force=force,
                         allow_pickle=allow_pickle)
    if as_json:
        return emit_json({"scores": result.scores, "score": result.score, "steps": result.steps, "output": out})
    for step in result.steps:
        click.echo(f"  alpha {step['alpha']:<6g} score {step['score']:.6g}")
    best = max(result.steps, key=lambda s: s["score"])
    click.echo(f"best alpha {best['alpha']:g} (score {result.score:.6g}) in {out}")


from . import cli_convert  # noqa: E402,F401  (registers `convert` and `extract` on `cli`)
from . import cli_quantize  # noqa: E402,F401  (registers `quantize` on `cli`)
from . import cli_train  # noqa: E402,F401  (registers `train` and `eval` on `cli`)
from . import cli_hub  # noqa: E402,F401  (registers `hub search|pull|sync|push` on `cli`)
