"""Random frankenmerges (`adaptkit layershuffle`, mergekit-layershuffle's job): a recipe of `slices:`
whose layers come from models drawn at random, each copied as it is (the method registry.toml names
for the role, `[default.merge] layershuffle`: mergekit's passthrough), merged by the engine like any
recipe.

By default each layer position i of the first model keeps its place and comes from one model, drawn
with probability proportional to the models' weights (Python's `random.choices`); runs of layers from
the same model are one slice. With `full_random`, model m gives ⌊layers(m)·weight(m)⌋ layers, each a
uniform draw from all of its layers, and all of them are shuffled into one stack (mergekit 0.1.5 draws
only from the first ⌊layers·weight⌋ of a model's layers; its script fails before drawing, on a
`num_layers` its architecture objects lack). One `random.Random(seed)` makes every draw, in mergekit's
order, so a seed gives the same recipe each time; the recipe is what the output's card keeps.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from .. import registry
from ..errors import AdaptkitError
from .refs import Ref
from .slices import layer_count
from .sources import open_input


def layers_of(model: str, allow_pickle: bool = False) -> int:
    """The number of layers config.json gives `model`, or one clear error."""
    config = open_input(Ref.parse(model), allow_pickle=allow_pickle).config
    found = layer_count(config)
    if found is None or found[1] < 1:
        raise AdaptkitError(f"{model}: config.json gives no layer count (num_hidden_layers, n_layer, ...) to "
                            "shuffle layers by")
    return found[1]


def shuffle_recipe(models: list[tuple[str, float]], layers: list[int], rng: random.Random, *,
                   full_random: bool = False, dtype: str | None = None) -> dict[str, Any]:
    """The recipe of `models` ((path, weight) pairs, with `layers` layers each) the draws of
    `rng` give (module docstring)."""
    if not models:
        raise AdaptkitError("give the models to shuffle: -m PATH[:WEIGHT], at least two")
    if any(w < 0 for _, w in models) or not any(w > 0 for _, w in models):
        raise AdaptkitError("layershuffle's weights must be at least 0 and not all 0")
    slices: list[dict[str, Any]] = []
    if full_random:
        for (model, weight), count in zip(models, layers):
            for _ in range(int(count * weight)):
                start = rng.randrange(0, count)
                slices.append({"sources": [{"model": model, "layer_range": [start, start + 1]}]})
        rng.shuffle(slices)
        if not slices:
            raise AdaptkitError("no layer drawn: with --full-random a model gives ⌊its layers × its weight⌋ layers")
    else:
        paths, weights = [m for m, _ in models], [w for _, w in models]
        for i in range(layers[0]):
            model = rng.choices(paths, weights=weights, k=1)[0]
            last = slices[-1]["sources"][0] if slices else None
            if last is not None and last["model"] == model:
                last["layer_range"][1] = i + 1
            else:
                slices.append({"sources": [{"model": model, "layer_range": [i, i + 1]}]})
    recipe: dict[str, Any] = {"merge_method": registry.default("merge", "layershuffle"), "slices": slices}
    if dtype is not None:
        recipe["dtype"] = dtype
    return recipe


def run_layershuffle(models: list[str | tuple[str, float]], out: str | Path, *, seed: int | None = None,
                     full_random: bool = False, dtype: str | None = None, dry_run: bool = False,
                     allow_pickle: bool = False, **merge_options: Any) -> dict[str, Any]:
    """Draw a random frankenmerge of `models` (paths, or (path, weight) pairs; weight 1 by default) and merge
    it into `out` with `run_merge` (`merge_options`: its keywords); the report has the `seed` (drawn when not
    given) and the `recipe`. `dry_run`: only the draws ({"seed", "recipe"}), nothing read but the configs."""
    pairs = [(m, 1.0) if isinstance(m, str) else (m[0], float(m[1])) for m in models]
    if len(pairs) < 2:
        raise AdaptkitError("give at least two models to draw layers from: -m PATH[:WEIGHT] -m PATH[:WEIGHT]")
    seed = random.SystemRandom().randrange(2 ** 32) if seed is None else seed
    layers = [layers_of(path, allow_pickle) for path, _ in pairs]
    short = [(path, n) for (path, w), n in zip(pairs, layers) if w > 0 and n < layers[0]]
    if short and not full_random:
        raise AdaptkitError(f"{short[0][0]} has {short[0][1]} layers, fewer than the {layers[0]} positions of "
                            f"{pairs[0][0]} that each model may be drawn for: give models with as many layers, or "
                            "--full-random")
    recipe = shuffle_recipe(pairs, layers, random.Random(seed), full_random=full_random, dtype=dtype)
    if dry_run:
        return {"seed": seed, "recipe": recipe}
    from .engine import run_merge

    return {**run_merge(recipe, out, allow_pickle=allow_pickle, **merge_options), "seed": seed, "recipe": recipe}
