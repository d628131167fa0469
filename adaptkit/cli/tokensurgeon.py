"""`adaptkit tokensurgeon` (added to the root group in adaptkit/cli/__init__.py)."""
from __future__ import annotations

import click

from ..merge.token_keys import MATCHES, METHODS, SUBWORD_METHODS, WEIGHT_SCHEMES
from .boundary import heavy_imports
from .options import (ALLOW_PICKLE, CONTEXT, DEVICE, DRY_RUN, FORCE, JSON, NO_CARD, OUT, POSITIVE, SEED, SHARD_SIZE,
                      Finite, emit_json)



@click.command(context_settings=CONTEXT)
@click.argument("model")
@click.argument("donor")
@OUT
@click.option("--method", "-a", type=click.Choice(METHODS), default="omp", show_default=True,
              help="How rows of tokens the model lacks are made.")
@click.option("-k", "k", type=POSITIVE, default=64, show_default=True,
              help="Shared tokens per approximated token (omp, common_interpolation, stb, mp_rope).")
@click.option("--cosine-similarity/--no-cosine-similarity", "-c/-nc", "cosine", default=False, show_default=True,
              help="common_interpolation: nearest tokens by cosine instead of euclidean distance.")
@click.option("--weight-scheme", "-w", type=click.Choice(WEIGHT_SCHEMES),
              default="distance_proportional", show_default=True, help="common_interpolation: the neighbours' weights.")
@click.option("--subword-method", "-s", type=click.Choice(SUBWORD_METHODS),
              default="mean", show_default=True, help="subword: how the rows of the model's pieces of a token are combined.")
@click.option("--batch-size", type=click.IntRange(min=-1), default=512, show_default=True,
              help="Tokens approximated at once (-1 or 0: all at once).")
@click.option("--prefix-match", "-pm", type=click.Choice(MATCHES), default="no", show_default=True,
              help="Give a token its longest prefix's row where the model has that prefix (embed: in the input "
                   "embedding only; mergekit 0.1.5's embed and lm_head are swapped).")
@click.option("--byte-match", "-bm", type=click.Choice(MATCHES), default="no", show_default=True,
              help="Match one-byte characters and <0xNN> byte tokens to each other (embed, lm_head: as above).")
@click.option("--magikarp/--no-magikarp", default=False, show_default=True,
              help="Leave out tokens either model barely trained (and zero the donor's untrained ones).")
@click.option("--new-vocab-noise", "-nvn", "new_vocab_noise", type=Finite(0), default=None,
              help="Add N(0, σ²) noise of this σ to the approximated rows.")
@click.option("--new-vocab-scale", "-nvs", "new_vocab_scale", type=Finite(), default=None,
              help="Multiply the approximated rows by this (0 too: mergekit ignores a 0).")
@SEED
@DEVICE
@SHARD_SIZE
@NO_CARD
@FORCE
@DRY_RUN
@ALLOW_PICKLE
@JSON
@click.pass_context
def tokensurgeon(ctx, model, donor, out, method, k, cosine, weight_scheme, subword_method, batch_size, prefix_match,
                 byte_match, magikarp, new_vocab_noise, new_vocab_scale, seed, device, shard_size, no_card, force,
                 dry_run, allow_pickle, as_json):
    """Give MODEL the tokenizer of DONOR (mergekit-tokensurgeon; its short options work too).

    The output is MODEL with DONOR's vocabulary: its input embedding and LM head get one row per
    DONOR token, in DONOR's order, and every other tensor is MODEL's. A token both tokenizers have keeps
    MODEL's row (word-start markers ▁/Ġ and special tokens' roles compared, as mergekit does); the others
    are approximated from the tokens they share: omp (orthogonal matching pursuit, mergekit's default)
    writes the token's DONOR row as a sparse mix of k shared tokens' rows and takes the same mix of
    MODEL's rows. The same options give mergekit-tokensurgeon's numbers; --seed drives the random
    methods and --new-vocab-noise (mergekit's --random-seed gives the same draws). --device cuda runs
    the approximations on a GPU (random draws stay on the CPU; landmark_pca's small SVDs too).

    \b
    Examples:
      adaptkit tokensurgeon ./llama ./qwen -o llama-qwen-tok/
      adaptkit tokensurgeon ./llama ./qwen -o out/ --method common_interpolation -k 8 --weight-scheme barycentric
      adaptkit tokensurgeon ./llama ./qwen -o out/ --byte-match yes --prefix-match lm_head --magikarp
      adaptkit tokensurgeon ./llama ./qwen -o out/ --method subword --subword-method first_last --json
      adaptkit tokensurgeon ./llama ./qwen -o out/ --dry-run        # how many rows are kept, approximated
      adaptkit tokensurgeon ./llama ./qwen -o out/ --device cuda    # OMP on a GPU
    """
    with heavy_imports():
        from ..merge.tokensurgeon import SurgeryOptions, surgery

    options = SurgeryOptions(method=method, k=k, cosine=cosine, weight_scheme=weight_scheme,
                             subword_method=subword_method, batch_size=batch_size, prefix_match=prefix_match,
                             byte_match=byte_match, magikarp=magikarp, new_vocab_noise=new_vocab_noise,
                             new_vocab_scale=new_vocab_scale)
    report = surgery(model, donor, out, options, force=force, seed=seed, shard_size=shard_size,
                     allow_pickle=allow_pickle, progress=not ctx.obj["quiet"], card=not no_card, dry_run=dry_run,
                     device=device)
    if as_json:
        return emit_json(report)
    if dry_run:
        click.echo(f"{report['model']} with {report['donor']}'s {report['vocab_size']} tokens (it has "
                   f"{report['model_vocab_size']}):")
        for name, c in report["tensors"].items():
            click.echo(f"  {name}: {c['exact']} same token, {c['byte']} byte token, {c['prefix']} prefix, "
                       f"{c['approximated']} to approximate by {method}, {c['zeroed']} zero")
        return
    counts = next(iter(report["tensors"].values()))  # the input embedding's (the head's differ by --*-match only)
    kept = counts["exact"] + counts["byte"] + counts["prefix"]
    click.echo(f"wrote {report['model']} with {report['donor']}'s {report['vocab_size']} tokens into "
               f"{report['output']} ({kept} tokens kept the model's rows, {counts['approximated']} approximated by "
               f"{method}; {report['seconds']:.1f} s)")
