"""`adaptkit quantize` (added to the root group in adaptkit/cli/__init__.py)."""
from __future__ import annotations

import click

from .boundary import heavy_imports
from .options import ALLOW_PICKLE, CONTEXT, FORCE, JSON, OUT, PLOT, emit_json, option


@click.command(context_settings=CONTEXT)
@click.argument("model")
@option("--method", old=("-m",), required=True, help="Quantizer plugin (see `adaptkit plugins --kind quantizer`).")
@click.option("--double-quant", is_flag=True, help="Quantize the block scales too (QLoRA's double quantization; the 4-bit methods).")
@click.option("--skip", default="", help="Comma-separated name parts to keep unquantized (e.g. lm_head,embed).")
@OUT
@FORCE
@ALLOW_PICKLE
@JSON
@PLOT
@click.pass_context
def quantize(ctx, model, method, double_quant, skip, out, force, allow_pickle, as_json, plot):
    """Quantize every floating 2-D weight matrix of a model with a quantizer plugin.

    Other tensors (norms, biases, skipped or non-float ones) are copied unchanged; config and
    tokenizer files come along. Reports the relative error ‖Ŵ − W‖/‖W‖ of each tensor (--json: per
    tensor, and the sizes before and after; --plot: their histogram and the worst tensors by name).

    \b
    Examples:
      adaptkit quantize ./model --method METHOD -o model-q/    # METHOD: `adaptkit plugins --kind quantizer`
      adaptkit quantize ./model --method METHOD --double-quant --skip lm_head -o model-4bit/
      adaptkit quantize ./model --method METHOD --skip lm_head,embed -o out/ --json
      adaptkit quantize ./model --method METHOD -o model-q/ --plot error.png
    """
    with heavy_imports():
        from .. import registry, spec
        from ..errors import AdaptkitError
        from ..plots import check_target, draw, quantize_figure
        from ..quant.quantize import run_quantize

    if plot:
        check_target(plot)
    if double_quant:
        form = spec.option(registry.get("quantizer", method), "double_quant_form")
        if form is None:
            raise AdaptkitError(f"--double-quant: the {method} quantizer has no double-quantized form")
        method = form
    report = run_quantize(model, method, out, skip=[s.strip() for s in skip.split(",")], force=force,
                          allow_pickle=allow_pickle, progress=not (ctx.obj or {}).get("quiet"))
    if plot:
        draw(quantize_figure({name: row["error"] for name, row in report["tensors"].items()}, method), plot)
    if as_json:
        return emit_json({**report, "plot": plot} if plot else report)
    worst = sorted(report["tensors"].items(), key=lambda kv: -kv[1]["error"])[:5]
    if worst:
        click.echo(f"{'tensor':<50} relative error")
        for name, row in worst:
            click.echo(f"{name:<50} {row['error']:.4g}")
    mb = 1000**2
    click.echo(f"{report['quantized']} tensor(s) quantized with {method}, {report['copied']} copied; "
               f"{report['bytes_before'] / mb:.2f} MB -> {report['bytes_after'] / mb:.2f} MB; "
               f"relative error mean {report['mean_error']:.4g}, max {report['max_error']:.4g}; into {out}")
    if plot:
        click.echo(f"picture: {plot}")
