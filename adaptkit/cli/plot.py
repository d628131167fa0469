"""`adaptkit plot` (added to the root group in adaptkit/cli/__init__.py)."""
from __future__ import annotations

import click

from .options import CONTEXT, JSON, emit_json


@click.command(name="plot", context_settings=CONTEXT)
@click.argument("metrics", type=click.Path(exists=True))
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), metavar="PATH",
              help="The picture to write (.png or .svg; needs pip install 'adaptkit[plot]').")
@JSON
def plot_cmd(metrics, out, as_json):
    """Draw a training run's loss and evaluation curves against the step.

    METRICS is the metrics.jsonl `adaptkit train` writes (one record per step), or the training's
    output folder holding it. The training loss is drawn faintly per step with its moving average over
    it; the evaluation loss, and the evaluation accuracy or perplexity in a second panel, where the
    run evaluated (--eval, --eval-every). `adaptkit train ... --plot PATH` draws the same at the end.

    \b
    Examples:
      adaptkit plot sentiment/metrics.jsonl -o curves.png
      adaptkit plot sentiment/ -o curves.svg --json
    """
    from ..plots import check_target, draw, read_metrics, training_figure

    check_target(out)
    records = read_metrics(metrics)
    draw(training_figure(records), out)
    if as_json:
        return emit_json({"metrics": metrics, "records": len(records), "steps": records[-1]["step"], "plot": out})
    click.echo(f"{len(records)} records up to step {records[-1]['step']}: picture {out}")
