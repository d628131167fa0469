"""The `adaptkit` command line. User errors print one line and exit 1 (a traceback with --debug).

This module makes the root group and adds every command to it, in one place below. Each command
(or family: `soup`, `hub`) lives in a module of its own that imports only from `options`
(what the commands share), `boundary` (one-line errors) and the library, never from here, so the
command line has no import cycle and a new command is one module plus one `add_command` line.
"""
from __future__ import annotations

import warnings

import click

from .. import __version__
from . import convert, generate, hub, inspect, layershuffle, merge, moe, plot, plugins, quantize, soup, tokensurgeon, train
from .boundary import Group, be_quiet, end_process, one_line_warning
from .options import CONTEXT


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


cli.add_command(plugins.plugins)
cli.add_command(inspect.inspect_cmd)
cli.add_command(merge.merge)
cli.add_command(moe.moe)
cli.add_command(tokensurgeon.tokensurgeon)
cli.add_command(layershuffle.layershuffle)
cli.add_command(soup.soup)
cli.add_command(convert.convert)
cli.add_command(convert.extract)
cli.add_command(quantize.quantize)
cli.add_command(train.train_cmd)
cli.add_command(train.eval_cmd)
cli.add_command(generate.generate_cmd)
cli.add_command(hub.hub)
cli.add_command(plot.plot_cmd)


def main() -> None:
    """The console script: run the command, then end the process (`boundary.end_process`)."""
    try:
        cli(prog_name="adaptkit")
    except SystemExit as e:
        end_process(e.code)
    end_process(0)


__all__ = ["cli", "main"]
