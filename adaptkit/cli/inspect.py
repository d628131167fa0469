"""`adaptkit inspect` (added to the root group in adaptkit/cli/__init__.py)."""
from __future__ import annotations

import click

from .options import ALLOW_PICKLE, CONTEXT, emit_json


@click.command(name="inspect", context_settings=CONTEXT)
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
    trainable_parameters, modules_to_save, rank, ranks, alpha, scaling, modules, ...,
    adaptkit_format: true for a variant only adaptkit reads, unsupported: why load, merge
    and convert refuse it} or null,
    quantization {method} or null.

    \b
    Examples:
      adaptkit inspect ./llama-lora
      adaptkit inspect ./model/model.safetensors.index.json --json
    """
    from ..files.inspection import inspect
    from .report import format_inspect

    report = inspect(path, allow_pickle=allow_pickle)
    if as_json:
        return emit_json(report)
    click.echo(format_inspect(report))
