"""`adaptkit train` and `adaptkit eval` (added to the root group in adaptkit/cli/__init__.py)."""
from __future__ import annotations

import os

import click

from ..errors import AdaptkitError
from .boundary import heavy_imports
from .options import (ALLOW_PICKLE, BATCH_SIZE, CONTEXT, DATA, EVAL_DATA, FORCE, JSON, OUT, PLOT, POSITIVE, PRECISION,
                      SEED, SET, TASK, Finite, base_option, dtype_option, emit_json, max_length_option)


def _metrics(result: dict) -> str:
    keys = [k for k in ("loss", "perplexity", "accuracy", "eval_loss", "eval_perplexity", "eval_accuracy") if k in result]
    return "  ".join(f"{k} {result[k]:.4f}" for k in keys)


@click.command(name="train", context_settings=CONTEXT)
@base_option(required=True)
@click.option("--variant", required=True, help="Adapter variant (see `adaptkit plugins --kind variant`).")
@SET
@DATA
@EVAL_DATA
@TASK
@click.option("--lr", type=Finite(0, min_open=True), default=1e-4, show_default=True, help="Peak learning rate (AdamW).")
@BATCH_SIZE
@click.option("--grad-accum", type=POSITIVE, default=1, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--max-steps", type=POSITIVE, help="Optimizer steps (overrides --epochs).")
@click.option("--epochs", type=Finite(0, min_open=True), help="Passes over the data (default 1).")
@click.option("--warmup", type=Finite(0), default=0, show_default=True, help="Warm-up steps, or a fraction of all steps if < 1.")
@click.option("--weight-decay", type=Finite(0), default=0.0, show_default=True, help="AdamW weight decay.")
@click.option("--max-grad-norm", type=Finite(0), default=1.0, show_default=True, help="Gradient clipping (0: none).")
@max_length_option()
@PRECISION
@dtype_option("--base-dtype", default="float32", show_default=True)
@click.option("--quantize", metavar="METHOD", help="Keep the frozen base quantized with this quantizer (QLoRA: a 4-bit method; see `adaptkit plugins --kind quantizer`); "
              "the linear layers are unpacked one at a time as they run.")
@click.option("--qat", metavar="METHOD", help="Quantization-aware training: compute with the quantized W + ΔW "
              "(any quantizer plugin), so the merged model quantizes with less loss.")
@click.option("--strategy", type=click.Choice(["ddp", "fsdp"]), default="ddp", show_default=True,
              help="Under torchrun: ddp (a whole model per process) or fsdp (FSDP2: the base and the adapter "
              "sharded across the processes, one unit per block); one process ignores it.")
@click.option("--gradient-checkpointing", is_flag=True, help="Recompute each block's activations in the "
              "backward pass instead of keeping them (less memory, about a third more compute).")
@click.option("--format", "fmt", metavar="FORMAT", help="Write the adapter in this format (see `adaptkit plugins "
              "--kind format`; default: PEFT's folder) where it can hold the variant.")
@SEED
@click.option("--eval-every", type=POSITIVE, help="Evaluate every N steps (and at the end).")
@click.option("--save-every", type=POSITIVE, help="Checkpoint every N steps into OUT/checkpoints/step-N/.")
@click.option("--keep-checkpoints", type=POSITIVE, help="Keep only the last N checkpoints.")
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint (an interrupted run, or OUT).")
@FORCE
@ALLOW_PICKLE
@OUT
@click.option("--report-to", "report_to", multiple=True, metavar="tensorboard|wandb", help="Also log the "
              "metrics to TensorBoard (OUT/runs/NAME/) or W&B (WANDB_MODE, WANDB_PROJECT apply); repeatable or "
              "a comma list; nothing by default.")
@click.option("--run-name", help="The run's name in TensorBoard / W&B (default: OUT's folder name).")
@JSON
@PLOT
@click.pass_context
def train_cmd(ctx, base, variant, settings, data, eval_data, task, lr, batch_size, grad_accum, max_steps, epochs, warmup,
              weight_decay, max_grad_norm, max_length, precision, dtype, quantize, qat, strategy, gradient_checkpointing,
              fmt, seed, eval_every, save_every,
              keep_checkpoints, resume, force, allow_pickle, out, report_to, run_name, as_json, plot):
    """Train an adapter on JSON lines: {"text"}, {"prompt","completion"} or {"text","label"}.

    --base minilm is the packaged all-MiniLM-L6-v2. --set gives the variant's settings, as PEFT names
    them (r=16, lora_alpha=32, target_modules='[q_proj, v_proj]'; default targets: all-linear).
    --dtype is the frozen base's; --max-length defaults to min(512, the model's limit), --seed to 0.
    --json prints the training report (training.json).

    Several processes: run it under `torchrun --nproc_per_node N -m adaptkit train ...` (each process
    takes a shard of every global batch; `--strategy fsdp` also shards the model across them).

    \b
    Examples:
      adaptkit train --base minilm --variant lora --set r=8 --data train.jsonl --eval dev.jsonl -o sentiment/
      adaptkit train --base ./llama --variant lora --set r=16 --set lora_alpha=32 \\
          --data chat.jsonl --max-steps 1000 --precision bf16 --save-every 100 -o out/
      adaptkit train --base ./llama --variant lora --quantize METHOD --dtype bfloat16 \\
          --precision bf16 --data chat.jsonl -o qlora/      # QLoRA; the adapter loads on the bf16 base
      adaptkit train --base ./llama --variant lora --qat METHOD --data chat.jsonl -o qat/
      adaptkit train ... -o out/ --resume          # continue an interrupted run
      torchrun --nproc_per_node 2 -m adaptkit train ... --strategy fsdp --gradient-checkpointing -o out/
      adaptkit train ... -o out/ --report-to tensorboard   # then: tensorboard --logdir out/runs
      adaptkit train ... -o out/ --plot curves.png          # loss and evaluation curves (also: adaptkit plot)
    """
    with heavy_imports():
        from ..plots import check_target, draw, read_metrics, training_figure
        from ..train.loop import train

    if plot:
        check_target(plot)
    report = train(base, variant, data, out, settings=settings, eval_data=eval_data, task=task, lr=lr,
                   batch_size=batch_size, grad_accum=grad_accum, max_steps=max_steps, epochs=epochs,
                   warmup=int(warmup) if warmup >= 1 else warmup, max_length=max_length, precision=precision, seed=0 if seed is None else seed,
                   eval_every=eval_every, save_every=save_every, keep_checkpoints=keep_checkpoints,
                   weight_decay=weight_decay, max_grad_norm=max_grad_norm, base_dtype=dtype, quantize=quantize,
                   qat=qat, strategy=strategy, gradient_checkpointing=gradient_checkpointing, resume=resume,
                   allow_pickle=allow_pickle, format=fmt,
                   force=force, progress=not (ctx.obj or {}).get("quiet"), report_to=list(report_to), run_name=run_name)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if plot:  # from the log the run left in OUT, so a resumed run's curves start at its first step
        draw(training_figure(read_metrics(out)), plot)
    if as_json:
        return emit_json({**report, "plot": plot} if plot else report)
    click.echo(f"trained a {variant} adapter for {report['steps']} steps: {_metrics(report['metrics'])} -> {out}")
    if plot:
        click.echo(f"picture: {plot}")


@click.command(name="eval", context_settings=CONTEXT)
@click.argument("model")
@click.option("--adapter", "adapters", multiple=True, help="An adapter to put on MODEL, repeatable (active together).")
@click.option("--ensemble", "members", multiple=True, metavar="ADAPTER", help="An adapter of an ensemble on the "
              "base MODEL, repeatable: scores each one, their linear weight merge and their combined outputs.")
@click.option("--weights", metavar="W1,W2,...", help="Ensemble weights, one per --ensemble (normalized; default equal).")
@click.option("--combine", type=click.Choice(["logits", "probs", "vote"]), help="How the ensemble combines outputs: "
              "the weighted mean of logits (default), of probabilities, or a weighted majority vote (classification).")
@DATA
@TASK
@BATCH_SIZE
@max_length_option(512)
@PRECISION
@ALLOW_PICKLE
@JSON
@click.pass_context
def eval_cmd(ctx, model, adapters, members, weights, combine, data, task, batch_size, max_length, precision, allow_pickle,
             as_json):
    """Evaluate a model, or a model with adapters: loss and perplexity, or loss and accuracy.

    MODEL is a folder, org/name[@rev], 'minilm', or an adapter folder trained by `adaptkit train`
    (its base is read from it). --json keys: task, loss, perplexity or accuracy, examples.

    With --ensemble (two or more), MODEL is the base and the adapters run in one batched pass, each on its
    own copy of the batch; the table has a row per adapter, their linear weight merge and the ensemble.
    --json keys: task, combine, weights, examples, rows (model, name, weight, loss, accuracy|perplexity).

    \b
    Examples:
      adaptkit eval minilm --adapter sentiment/ --data test.jsonl
      adaptkit eval sentiment/ --data test.jsonl --json
      adaptkit eval minilm --ensemble seed1/ --ensemble seed2/ --weights 0.7,0.3 --combine probs --data test.jsonl
    """
    with heavy_imports():
        from ..train.evaluation import evaluate

    if members or weights or combine:
        return _ensemble(ctx, model, adapters, members, weights, combine or "logits", data, task=task,
                         batch_size=batch_size, max_length=max_length, precision=precision, allow_pickle=allow_pickle,
                         as_json=as_json)
    result = evaluate(model, data, adapters, task=task, batch_size=batch_size, max_length=max_length,
                      precision=precision, allow_pickle=allow_pickle, progress=not (ctx.obj or {}).get("quiet"))
    if as_json:
        return emit_json(result)
    click.echo(f"{result['task']}: {_metrics(result)}  ({result['examples']} examples)")


def _ensemble(ctx, model, adapters, members, weights, combine, data, *, as_json, **options) -> None:
    """`eval --ensemble`: the table of each adapter, their weight merge and their ensemble."""
    from ..train.ensembles import evaluate_ensemble

    if adapters:
        raise AdaptkitError("--adapter and --ensemble do not mix: give every adapter of the ensemble with --ensemble")
    if not members:
        raise AdaptkitError("--weights and --combine apply to an ensemble: give its adapters with --ensemble")
    result = evaluate_ensemble(model, data, members, weights=_weights(weights), combine=combine,
                               progress=not (ctx.obj or {}).get("quiet"), **options)
    if as_json:
        return emit_json(result)
    score = "accuracy" if result["task"] == "classification" else "perplexity"
    click.echo(f"{result['task']}: {len(members)} adapters, ensemble by {combine} ({result['examples']} examples)")
    click.echo(f"  {'model':<9} {'name':<24} {'weight':>6} {'loss':>8} {score:>10}")
    for row in result["rows"]:
        cells = [f"{row[k]:.4f}" if row[k] is not None else "-" for k in ("loss", score)]
        weight = "" if row["weight"] is None else f"{row['weight']:.3f}"
        click.echo(f"  {row['model']:<9} {row['name']:<24} {weight:>6} {cells[0]:>8} {cells[1]:>10}")
        if row.get("note"):
            click.echo(f"  {'':<9} {row['note']}")


def _weights(text: str | None) -> list[float] | None:
    """--weights 0.7,0.3 as numbers (their count and signs are checked with the adapters)."""
    if text is None:
        return None
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise AdaptkitError(f"--weights takes numbers separated by commas, got '{text}'") from None
