"""`adaptkit inspect` (added to the root group in adaptkit/cli/__init__.py)."""
from __future__ import annotations

import click

from .options import ALLOW_PICKLE, CONTEXT, JSON, PLOT, base_option, emit_json


@click.command(name="inspect", context_settings=CONTEXT)
@click.argument("path")
@JSON
@ALLOW_PICKLE
@PLOT
@base_option()
@click.pass_context
def inspect_cmd(ctx, path, as_json, allow_pickle, plot, base):
    """Describe a model, adapter or quantized model without reading tensor data.

    PATH is a folder (model, shards with an index, PEFT adapter, Hub cache snapshot) or a
    .safetensors file.

    \b
    JSON keys: path, kind (model|adapter|quantized-model), format, tensors, parameters, bytes,
    dtypes {dtype: {tensors, parameters}}, shards [{file, tensors, bytes}], metadata,
    model {model_type, architectures, hidden_size, num_hidden_layers, vocab_size, ...} or null,
    adapter {variant, format, base_model, target_modules, targeted_modules,
    trainable_parameters, modules_to_save, rank, ranks, alpha, scaling, modules, ...,
    adaptkit_format: true for a variant only adaptkit reads, unsupported: why load, merge
    and convert refuse it} or null,
    quantization {method} or null; with --plot, plot (the picture's path).

    --plot draws an adapter's spectrum: per module the singular values of ΔW (normalized) and the
    energy kept at each rank, the all-module median in black and rank 32 (hosted LoRA services' cap)
    marked: the picture behind choosing `convert --rank` or `--energy`. It reads each module's tensors
    (one at a time); --base gives the base model for variants whose ΔW depends on the base weight.

    \b
    Examples:
      adaptkit inspect ./llama-lora
      adaptkit inspect ./model/model.safetensors.index.json --json
      adaptkit inspect ./llama-lora --plot spectrum.png
    """
    from ..errors import AdaptkitError
    from ..files.inspection import inspect
    from .report import format_inspect

    if base and not plot:
        raise AdaptkitError("--base is read only with --plot (a spectrum of ΔW that depends on the base weight)")
    if plot:
        from ..plots import adapter_spectra, check_target, draw, spectrum_figure

        check_target(plot)
    report = inspect(path, allow_pickle=allow_pickle)
    if plot:
        if report["kind"] != "adapter":
            raise AdaptkitError(f"--plot draws an adapter's spectrum of ΔW; {path} holds a {report['kind']}")
        spectra = adapter_spectra(path, base=base, allow_pickle=allow_pickle, progress=not (ctx.obj or {}).get("quiet"))
        draw(spectrum_figure(spectra), plot)
    if as_json:
        return emit_json({**report, "plot": plot} if plot else report)
    click.echo(format_inspect(report))
    if plot:
        click.echo(f"picture: {plot}")
