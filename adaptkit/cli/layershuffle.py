"""`adaptkit layershuffle` (added to the root group in adaptkit/cli/__init__.py)."""
from __future__ import annotations

import click

from .boundary import heavy_imports
from .options import (ALLOW_MIXED, ALLOW_PICKLE, CONTEXT, DRY_RUN, FORCE, JSON, NO_CARD, OUT, SEED, SHARD_SIZE,
                      THREADS, UNSAFE_TRUNCATE, dtype_option, emit_json, split_weight)


@click.command(context_settings=CONTEXT)
@click.option("-m", "--model", "models", multiple=True, metavar="PATH[:WEIGHT]",
              help="A model to draw layers from, repeatable; WEIGHT (default 1) its share of the draws.")
@OUT
@click.option("--full-random", is_flag=True,
              help="Draw each layer's position too: a model gives ⌊its layers × WEIGHT⌋ layers from anywhere in it, "
                   "all shuffled.")
@click.option("--write-yaml", type=click.Path(dir_okay=False), metavar="PATH", help="Also write the recipe to PATH.")
@SEED
@dtype_option()
@SHARD_SIZE
@THREADS
@ALLOW_MIXED
@UNSAFE_TRUNCATE
@NO_CARD
@FORCE
@DRY_RUN
@ALLOW_PICKLE
@JSON
@click.pass_context
def layershuffle(ctx, models, out, full_random, write_yaml, seed, dtype, shard_size, threads, allow_mixed_architectures,
                 unsafe_truncate_embeddings, no_card, force, dry_run, allow_pickle, as_json):
    """A random frankenmerge: each layer from a model drawn at random (mergekit-layershuffle).

    Each layer position of the first model comes from one of the models, drawn in proportion to their
    weights; with --full-random the positions are drawn too. The draws make a recipe of slices (each
    layer copied as it is) that `adaptkit merge` runs; --dry-run prints it, --write-yaml keeps it, and
    the output's card keeps it (adaptkit_recipe.yml), so `adaptkit merge` on that file gives the same
    model again. --seed makes the draws repeatable (without it, one is picked and reported).

    \b
    Examples:
      adaptkit layershuffle -m ./llama-a -m ./llama-b -o shuffled/ --seed 0
      adaptkit layershuffle -m ./llama-a:2 -m ./llama-b:1 -o shuffled/ --dry-run
      adaptkit layershuffle -m ./a:0.5 -m ./b:0.5 --full-random -o shuffled/ --write-yaml shuffle.yml --json
    """
    import yaml

    from ..io.outputs import atomic_file, check_file_target

    with heavy_imports():
        from ..merge.layershuffle import run_layershuffle

    if write_yaml:
        check_file_target(write_yaml, "recipe")
    report = run_layershuffle(list(map(_weighted, models)), out, seed=seed, full_random=full_random, dtype=dtype,
                              dry_run=dry_run, allow_pickle=allow_pickle, force=force, shard_size=shard_size,
                              threads=threads, allow_mixed_architectures=allow_mixed_architectures,
                              unsafe_truncate_embeddings=unsafe_truncate_embeddings, progress=not ctx.obj["quiet"],
                              card=not no_card)
    recipe, seed = report["recipe"], report["seed"]
    text = yaml.safe_dump(recipe, sort_keys=False)
    if write_yaml:  # (after the merge: a failed one leaves nothing)
        with atomic_file(write_yaml) as f:
            f.write(text.encode())
    if dry_run:
        return emit_json(report) if as_json else click.echo(text, nl=False)
    if as_json:
        return emit_json(report)
    count = sum(end - start for s in recipe["slices"] for start, end in [s["sources"][0]["layer_range"]])
    click.echo(f"shuffled {count} layers from {len(models)} models into {report['output']} in {len(recipe['slices'])} "
               f"slices (seed {seed}; {report['seconds']:.1f} s)")


def _weighted(spec: str) -> tuple[str, float]:
    path, weight = split_weight(spec)
    return path, 1.0 if weight is None else weight
