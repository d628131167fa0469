"""`adaptkit convert` and `adaptkit extract` (added to the root group in adaptkit/cli/__init__.py)."""
from __future__ import annotations

import click

from .boundary import heavy_imports
from .options import ALLOW_PICKLE, CONTEXT, DEVICE, ENERGY, FORCE, JSON, OUT, RANK, base_option, emit_json


def _summary(report: dict) -> str:
    modules = report["modules"]
    exact = all(m["exact"] for m in modules.values())
    ranks = sorted({m["rank"] for m in modules.values()})
    error = "exact" if exact else f"max relative error {report['max_error']:.4g}, mean {report['mean_error']:.4g}"
    saved = f", {len(report['saved'])} whole tensor(s)" if report["saved"] else ""
    return f"{len(modules)} module(s), rank {'/'.join(map(str, ranks)) or '-'} ({error}){saved}"


@click.command(context_settings=CONTEXT)
@click.argument("adapter")
@click.option("--to", "to", required=True, help="Target format: peft (alias: lora) or another writable format "
              "plugin (see `adaptkit plugins --kind format`).")
@OUT
@RANK
@ENERGY
@base_option()
@FORCE
@ALLOW_PICKLE
@JSON
def convert(adapter, to, out, rank, energy, base, force, allow_pickle, as_json):
    """Convert an adapter to another format or variant, or resize its rank.

    Variants with an exact low-rank form (LoRA and the variants built from shared or scaled
    factors) convert exactly; others (ΔW depending on the base weight, whole-module fine-tunes)
    are factored by SVD at --rank/--energy with the error reported per module. --base is needed for
    variants whose ΔW depends on the base weight. The input format is detected; `adaptkit plugins
    --kind format` lists the formats.

    \b
    Examples:
      adaptkit convert my-adapter/ --to peft -o my-lora/
      adaptkit convert my-lora/ --to peft --rank 8 -o my-lora-r8/
      adaptkit convert sd-lora.safetensors --to peft -o sd-lora-peft/
      adaptkit convert my-lora/ --to FORMAT -o converted/
    """
    with heavy_imports():
        from .. import registry
        from ..files.convert import convert as run, writable_formats

    # The plain low-rank variant's name stands for the canonical format (`--to lora`).
    fmt = registry.default("format") if to == registry.default("variant") else to
    if fmt not in writable_formats():
        from ..errors import unknown_name

        raise unknown_name("target format", to, [*writable_formats(), registry.default("variant")])
    report = run(adapter, fmt, out, rank=rank, energy=energy, base=base, force=force, allow_pickle=allow_pickle)
    if as_json:
        return emit_json(report)
    click.echo(f"converted {report['from']} -> {fmt}: {_summary(report)} into {out}")


@click.command(context_settings=CONTEXT)
@click.option("-m", "--model", required=True, help="The fine-tuned model (folder or org/name[@rev]).")
@base_option(required=True)
@OUT
@RANK
@ENERGY
@click.option("--embed-lora", is_flag=True, help="Factor embeddings and the output head too (default: keep them whole).")
@DEVICE
@FORCE
@ALLOW_PICKLE
@JSON
@click.pass_context
def extract(ctx, model, base, out, rank, energy, embed_lora, device, force, allow_pickle, as_json):
    """Extract a LoRA (a PEFT folder) from a full fine-tune: ΔW = FT − base of each matrix, truncated SVD.

    A = √S·Vᵀ and B = U·√S per module (lora_alpha = rank, so the scale is 1); changed vectors
    (norms, biases) and, unless --embed-lora, embeddings and the output head are saved whole as
    modules_to_save. Works on GPT-2 Conv1D layers and on half-precision models. --device cuda factors
    on a GPU (mergekit-extract-lora's --device; its SVDs round otherwise than the CPU's).

    \b
    Examples:
      adaptkit extract --model my-finetune --base meta-llama/Llama-3.2-1B --rank 32 -o my-lora/
      adaptkit extract --model ft/ --base base/ --energy 0.9 -o lora/ --json
      adaptkit extract --model ft/ --base base/ --rank 64 -o lora/ --device cuda
    """
    with heavy_imports():
        from ..files.convert import extract as run

    report = run(model, base, out, rank=rank, energy=energy, embed_lora=embed_lora, force=force,
                 allow_pickle=allow_pickle, progress=not (ctx.obj or {}).get("quiet"), device=device)
    if as_json:
        return emit_json(report)
    click.echo(f"extracted {_summary(report)} into {out}")
