"""The `adaptkit` command line. User errors print one line and exit 1 (a traceback with --debug)."""
from __future__ import annotations

import json
import sys
import warnings

import click

from . import __version__, registry
from .errors import AdaptkitError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class Group(click.Group):
    """Turns AdaptkitError into one line on stderr unless --debug is given."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except AdaptkitError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(1)


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    click.echo(f"warning: {message}", err=True)


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
    warnings.showwarning = _one_line_warning
    if quiet:
        warnings.simplefilter("ignore")


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
@click.option("--allow-pickle", is_flag=True, help="Read .bin/.pt pickle checkpoints (torch.load weights_only=True).")
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
