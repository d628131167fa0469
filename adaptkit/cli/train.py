"""`adaptkit train` and `adaptkit eval` (added to the root group in adaptkit/cli/__init__.py)."""
from __future__ import annotations

import json
import os

import click

from ..errors import AdaptkitError
from .options import ALLOW_PICKLE, CONTEXT, Finite, POSITIVE, emit_json

TASK = click.Choice(["causal-lm", "classification"])


def parse_settings(items: tuple[str, ...]) -> dict:
    """`key=value` pairs; values read as JSON (numbers, true/false, lists), then YAML, else text."""
    import yaml

    settings = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise AdaptkitError(f"--set expects key=value, got '{item}'")
        try:
            value = json.loads(text)
        except ValueError:
            try:
                value = yaml.safe_load(text)
            except yaml.YAMLError:
                value = text
        settings[key.strip()] = text if value is None and text.strip() not in ("null", "~") else value
    return settings


def _metrics(result: dict) -> str:
    keys = [k for k in ("loss", "perplexity", "accuracy", "eval_loss", "eval_perplexity", "eval_accuracy") if k in result]
    return "  ".join(f"{k} {result[k]:.4f}" for k in keys)


@click.command(name="train", context_settings=CONTEXT)
@click.option("--base", required=True, help="Base model: a folder, org/name[@rev], or 'minilm' (packaged all-MiniLM-L6-v2).")
@click.option("--variant", required=True, help="Adapter variant (see `adaptkit plugins --kind variant`).")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE", help="A variant setting, repeatable "
              "(r=16, lora_alpha=32, target_modules='[\"q_proj\",\"v_proj\"]'); default targets: all-linear.")
@click.option("--data", required=True, type=click.Path(dir_okay=False), help="Training data (JSON lines).")
@click.option("--eval", "eval_data", type=click.Path(dir_okay=False), help="Evaluation data (JSON lines).")
@click.option("--task", type=TASK, help="Task (default: classification if records have 'label', else causal-lm).")
@click.option("--lr", type=Finite(0, min_open=True), default=1e-4, show_default=True, help="Peak learning rate (AdamW).")
@click.option("--batch-size", type=POSITIVE, default=8, show_default=True, help="Examples per micro-batch and process.")
@click.option("--grad-accum", type=POSITIVE, default=1, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--max-steps", type=POSITIVE, help="Optimizer steps (overrides --epochs).")
@click.option("--epochs", type=Finite(0, min_open=True), help="Passes over the data (default 1).")
@click.option("--warmup", type=Finite(0), default=0, show_default=True, help="Warm-up steps, or a fraction of all steps if < 1.")
@click.option("--weight-decay", type=Finite(0), default=0.0, show_default=True, help="AdamW weight decay.")
@click.option("--max-grad-norm", type=Finite(0), default=1.0, show_default=True, help="Gradient clipping (0: none).")
@click.option("--max-length", type=POSITIVE, help="Truncate examples to this many tokens (default: min(512, the model's)).")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True,
              help="bf16: autocast (CPU or GPU); fp16: autocast with loss scaling (GPU only).")
@click.option("--base-dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32",
              show_default=True, help="dtype the frozen base is loaded in.")
@click.option("--quantize", metavar="METHOD", help="Keep the frozen base quantized with this quantizer (QLoRA: a 4-bit method; see `adaptkit plugins --kind quantizer`); "
              "the linear layers are unpacked one at a time as they run.")
@click.option("--qat", metavar="METHOD", help="Quantization-aware training: compute with the quantized W + ΔW "
              "(any quantizer plugin), so the merged model quantizes with less loss.")
@click.option("--format", "fmt", metavar="FORMAT", help="Write the adapter in this format (see `adaptkit plugins "
              "--kind format`; default: PEFT's folder) where it can hold the variant.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for initialization, dropout and shuffling.")
@click.option("--eval-every", type=POSITIVE, help="Evaluate every N steps (and at the end).")
@click.option("--save-every", type=POSITIVE, help="Checkpoint every N steps into OUT/checkpoints/step-N/.")
@click.option("--keep-checkpoints", type=POSITIVE, help="Keep only the last N checkpoints.")
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint (an interrupted run, or OUT).")
@click.option("--force", is_flag=True, help="Replace an existing output folder (only once training finishes).")
@ALLOW_PICKLE
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--json", "as_json", is_flag=True, help="Print the training report (training.json) as JSON.")
@click.pass_context
def train_cmd(ctx, base, variant, settings, data, eval_data, task, lr, batch_size, grad_accum, max_steps, epochs, warmup,
              weight_decay, max_grad_norm, max_length, precision, base_dtype, quantize, qat, fmt, seed, eval_every, save_every,
              keep_checkpoints, resume, force, allow_pickle, out, as_json):
    """Train an adapter on JSON lines: {"text"}, {"prompt","completion"} or {"text","label"}.

    Several processes: run it under `torchrun --nproc_per_node N -m adaptkit train ...` (DDP; each
    process takes a shard of every global batch).

    \b
    Examples:
      adaptkit train --base minilm --variant lora --set r=8 --data train.jsonl --eval dev.jsonl -o sentiment/
      adaptkit train --base ./llama --variant lora --set r=16 --set lora_alpha=32 \\
          --data chat.jsonl --max-steps 1000 --precision bf16 --save-every 100 -o out/
      adaptkit train --base ./llama --variant lora --quantize METHOD --base-dtype bfloat16 \
          --precision bf16 --data chat.jsonl -o qlora/      # QLoRA; the adapter loads on the bf16 base
      adaptkit train --base ./llama --variant lora --qat METHOD --data chat.jsonl -o qat/
      adaptkit train ... -o out/ --resume          # continue an interrupted run
    """
    from ..train.loop import train

    report = train(base, variant, data, out, settings=parse_settings(settings), eval_data=eval_data, task=task, lr=lr,
                   batch_size=batch_size, grad_accum=grad_accum, max_steps=max_steps, epochs=epochs,
                   warmup=int(warmup) if warmup >= 1 else warmup, max_length=max_length, precision=precision, seed=seed,
                   eval_every=eval_every, save_every=save_every, keep_checkpoints=keep_checkpoints,
                   weight_decay=weight_decay, max_grad_norm=max_grad_norm, base_dtype=base_dtype, quantize=quantize,
                   qat=qat, resume=resume, allow_pickle=allow_pickle, format=fmt,
                   force=force, progress=not (ctx.obj or {}).get("quiet"))
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if as_json:
        return emit_json(report)
    click.echo(f"trained a {variant} adapter for {report['steps']} steps: {_metrics(report['metrics'])} -> {out}")


@click.command(name="eval", context_settings=CONTEXT)
@click.argument("model")
@click.option("--adapter", "adapters", multiple=True, help="An adapter to put on MODEL, repeatable (active together).")
@click.option("--data", required=True, type=click.Path(dir_okay=False), help="Evaluation data (JSON lines).")
@click.option("--task", type=TASK, help="Task (default: the adapter's, else from the records).")
@click.option("--batch-size", type=POSITIVE, default=8, show_default=True, help="Examples per batch.")
@click.option("--max-length", type=POSITIVE, default=512, show_default=True, help="Truncate examples to this many tokens.")
@click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True)
@ALLOW_PICKLE
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON (task, loss, perplexity|accuracy, examples).")
@click.pass_context
def eval_cmd(ctx, model, adapters, data, task, batch_size, max_length, precision, allow_pickle, as_json):
    """Evaluate a model, or a model with adapters: loss and perplexity, or loss and accuracy.

    MODEL is a folder, org/name[@rev], 'minilm', or an adapter folder trained by `adaptkit train`
    (its base is read from it).

    \b
    Examples:
      adaptkit eval minilm --adapter sentiment/ --data test.jsonl
      adaptkit eval sentiment/ --data test.jsonl --json
    """
    from ..train.evaluation import evaluate

    result = evaluate(model, data, adapters, task=task, batch_size=batch_size, max_length=max_length,
                      precision=precision, allow_pickle=allow_pickle, progress=not (ctx.obj or {}).get("quiet"))
    if as_json:
        return emit_json(result)
    click.echo(f"{result['task']}: {_metrics(result)}  ({result['examples']} examples)")
