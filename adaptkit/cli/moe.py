"""`adaptkit moe` (added to the root group in adaptkit/cli/__init__.py)."""
from __future__ import annotations

from pathlib import Path

import click

from ..errors import AdaptkitError
from .boundary import heavy_imports
from .options import (ALLOW_PICKLE, CONTEXT, DEVICE, DRY_RUN, FORCE, JSON, NO_CARD, OUT, PLOT, SEED, SHARD_SIZE,
                      dtype_option, emit_json)


@click.command(context_settings=CONTEXT)
@click.argument("config", type=click.Path(dir_okay=False))
@OUT
@SEED
@dtype_option()
@DEVICE
@click.option("--load-in-4bit", "base_4bit", is_flag=True,
              help="Run the base for gate_mode hidden quantized to 4 bits by bitsandbytes (mergekit-moe's option).")
@click.option("--load-in-8bit", "base_8bit", is_flag=True,
              help="Run the base for gate_mode hidden quantized to 8 bits by bitsandbytes (mergekit-moe's option).")
@SHARD_SIZE
@click.option("--allow-same-experts", "--i-understand-this-is-not-useful-without-training", "allow_same", is_flag=True,
              help="Allow every expert to be the same model with prompt-based gates (e.g. to train the MoE further).")
@NO_CARD
@FORCE
@DRY_RUN
@ALLOW_PICKLE
@PLOT
@JSON
@click.pass_context
def moe(ctx, config, out, seed, dtype, device, base_4bit, base_8bit, shard_size, allow_same, no_card, force, dry_run,
        allow_pickle, plot, as_json):
    """Build a mixture of experts from dense models (mergekit-moe's YAML).

    Attention, norms and embeddings come from base_model; each expert's MLPs become one expert per
    layer; the routers come from gate_mode: hidden (the base's hidden states, run on --device, for each
    expert's positive_prompts), cheap_embed (the prompts' token embeddings) or random. The output is a Mixtral
    (Llama or Mistral inputs), a DeepSeek MoE or Qwen2-MoE (with shared_experts) or a Qwen3-MoE (Qwen3
    inputs), chosen as mergekit-moe chooses it or by `architecture:`. --seed drives random gates and
    expert noise (mergekit-moe's --random-seed gives the same numbers); --dtype overrides the config's
    dtype (also the output's). --plot draws the routers: how alike the experts' rows are (cosine,
    mean over layers) and each layer's condition number against the degenerate threshold.

    \b
    Examples:
      adaptkit moe clowncar.yml -o clowncar-moe/
      adaptkit moe clowncar.yml -o clowncar-moe/ --plot routers.png
      adaptkit moe upcycle.yml -o moe/ --seed 0 --dtype bfloat16   # gate_mode: random
      adaptkit moe clowncar.yml -o moe/ --device cuda --json
      adaptkit moe clowncar.yml -o moe/ --load-in-4bit       # the base's hidden pass in 4 bits
      adaptkit moe clowncar.yml -o moe/ --dry-run
    """
    with heavy_imports():
        from ..merge.moe import MoePlan, build_moe, check_base_bits, load_moe_config
        from .report import human_bytes
    from ..devices import compute_device

    compute_device(device)  # (a device this machine lacks: refused before any work, --dry-run too)
    if base_4bit and base_8bit:
        raise AdaptkitError("give --load-in-4bit or --load-in-8bit, not both")
    base_bits = 4 if base_4bit else 8 if base_8bit else None
    parsed = load_moe_config(config, allow_same=allow_same)
    check_base_bits(parsed, base_bits)
    if plot is not None:  # checked before any work
        if dry_run:
            raise AdaptkitError("--plot draws the routers the build computes; --dry-run computes none")
        from ..plots import check_target

        check_target(plot)
    if dry_run:
        summary = MoePlan(parsed, allow_pickle=allow_pickle, dtype=dtype).summary()
        if as_json:
            return emit_json(summary)
        click.echo(f"{_described(summary)}, {summary['layers']} layers: {summary['tensors']} tensors, "
                   f"{summary['parameters']:,} parameters, output {human_bytes(summary['output_bytes'])}")
        return
    report = build_moe(parsed, out, force=force, seed=seed, dtype=dtype, shard_size=shard_size, device=device,
                       base_bits=base_bits, allow_pickle=allow_pickle, progress=not ctx.obj["quiet"], card=not no_card)
    if plot is not None:
        _draw_routers(report, plot)
    if as_json:
        return emit_json(report)
    click.echo(f"wrote a {_described(report)} into {report['output']} ({len(report['files'])} file(s), "
               f"{report['seconds']:.1f} s)")


def _draw_routers(report: dict, plot: str) -> None:
    """--plot: the report's router similarity and conditions; rows past the experts are shared experts'."""
    from ..merge.moe_gates import DEGENERATE_CONDITION
    from ..plots import draw, routing_figure

    names = [f"{i}: {Path(e).name}" for i, e in enumerate(report["experts"])]
    shared = [f"shared: {Path(e).name}" for e in report["shared_experts"]]
    names += shared[:len(report["router_similarity"]) - len(names)]
    conditions = [float("inf") if c is None else c for c in report["router_conditions"]]
    draw(routing_figure(report["router_similarity"], conditions, names, DEGENERATE_CONDITION), plot)


def _described(summary: dict) -> str:
    """'Qwen MoE with 4 experts + 1 shared (2 per token, gates hidden)'."""
    shared = f" + {len(summary['shared_experts'])} shared" if summary["shared_experts"] else ""
    return (f"{summary['output_kind']} with {len(summary['experts'])} experts{shared} "
            f"({summary['experts_per_token']} per token, gates {summary['gate_mode']})")
