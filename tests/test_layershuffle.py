"""`adaptkit layershuffle`: random frankenmerges as mergekit-layershuffle draws them (its own script fails in
mergekit 0.1.5 before drawing: its architecture objects have no `num_layers`; the test below runs its code
with that one call supplied), the draws written out, the output's layers checked against the inputs', and
bad input in one line."""
from __future__ import annotations

import json
import random

import pytest
import torch
import yaml

from adaptkit.merge.layershuffle import shuffle_recipe
from builders import state, tiny_llama
from hostile import assert_one_line_error, run_cli


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    root = tmp_path_factory.mktemp("shuffle")
    for seed in range(3):
        tiny_llama(seed, num_hidden_layers=4).save_pretrained(root / f"m{seed}")
    return root


def expected_slices(paths, weights, layers, seed):
    """mergekit's draw written out: per layer position one model by random.choices, runs joined."""
    rng, slices = random.Random(seed), []
    for i in range(layers):
        model = rng.choices(paths, weights=weights, k=1)[0]
        if slices and slices[-1][0] == model:
            slices[-1][2] = i + 1
        else:
            slices.append([model, i, i + 1])
    return [{"sources": [{"model": m, "layer_range": [a, b]}]} for m, a, b in slices]


def test_the_draws_and_the_layers_they_give(trio, tmp_path):
    paths = [str(trio / f"m{i}") for i in range(3)]
    args = ["-m", f"{paths[0]}:2", "-m", paths[1], "-m", f"{paths[2]}:0.5"]
    result = run_cli("layershuffle", *args, "-o", tmp_path / "out", "--seed", 7, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["seed"] == 7 and report["recipe"]["slices"] == expected_slices(paths, [2, 1, 0.5], 4, 7)
    out, inputs = state(tmp_path / "out"), [state(trio / f"m{i}") for i in range(3)]
    for part in report["recipe"]["slices"]:
        source = inputs[paths.index(part["sources"][0]["model"])]
        for layer in range(*part["sources"][0]["layer_range"]):
            for name in [n for n in source if n.startswith(f"model.layers.{layer}.")]:
                assert torch.equal(out[name], source[name]), name
    assert torch.equal(out["model.embed_tokens.weight"], inputs[paths.index(
        report["recipe"]["slices"][0]["sources"][0]["model"])]["model.embed_tokens.weight"])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 4
    recipe = yaml.safe_load((tmp_path / "out" / "adaptkit_recipe.yml").read_text())
    assert recipe["slices"] == report["recipe"]["slices"]  # the card's recipe makes the same model again


def test_mergekits_code_draws_the_same_layers(trio, monkeypatch):
    """mergekit-layershuffle's main with the one call its 0.1.5 lacks supplied, its Python random seeded as
    random.Random(seed) is: the same slices as adaptkit's for that seed."""
    import mergekit.scripts.layershuffle as mk

    class Architecture:
        def num_layers(self, config):
            return config.num_hidden_layers

    captured = {}
    monkeypatch.setattr(mk, "arch_info_for_config", lambda config: Architecture())
    monkeypatch.setattr(mk, "run_merge", lambda config, out, options: captured.setdefault("config", config))
    paths = [str(trio / f"m{i}") for i in range(3)]
    random.seed(11)
    mk.main.main(["out", "-m", paths[0], "-w", "1", "-m", paths[1], "-w", "3", "-m", paths[2], "-w", "1"],
                 standalone_mode=False)
    theirs = [(str(s.sources[0].model), list(s.sources[0].layer_range)) for s in captured["config"].slices]
    ours = shuffle_recipe([(paths[0], 1.0), (paths[1], 3.0), (paths[2], 1.0)], [4, 4, 4], random.Random(11))
    # mergekit means to join runs of one model into a slice but compares a ModelReference with a str, so each
    # of its slices is one layer: the same layers, in the same order
    assert layers(ours["slices"]) == [(m, i) for m, (a, b) in theirs for i in range(a, b)]
    assert len(ours["slices"]) < len(theirs)


def layers(slices) -> list[tuple[str, int]]:
    return [(s["sources"][0]["model"], i) for s in slices for i in range(*s["sources"][0]["layer_range"])]


def test_full_random_draws_positions_from_every_layer():
    """--full-random: model m gives ⌊layers·weight⌋ layers, each a uniform draw from all of its layers (mergekit
    0.1.5 draws from the first ⌊layers·weight⌋ only), then one shuffle of them all."""
    recipe = shuffle_recipe([("a", 0.5), ("b", 1.0)], [8, 4], random.Random(3), full_random=True)
    rng = random.Random(3)
    drawn = [("a", rng.randrange(0, 8)) for _ in range(4)] + [("b", rng.randrange(0, 4)) for _ in range(4)]
    slices = [{"sources": [{"model": m, "layer_range": [i, i + 1]}]} for m, i in drawn]
    rng.shuffle(slices)
    assert recipe["slices"] == slices and recipe["merge_method"] == "passthrough"
    assert max(i for m, i in layers(recipe["slices"]) if m == "a") >= 4  # beyond a's first ⌊8·0.5⌋ layers


def test_dry_run_prints_the_recipe_and_write_yaml_keeps_it(trio, tmp_path):
    paths = [str(trio / f"m{i}") for i in range(2)]
    result = run_cli("layershuffle", "-m", paths[0], "-m", paths[1], "-o", tmp_path / "out", "--seed", 1, "--dry-run",
                     "--write-yaml", tmp_path / "r.yml", "--dtype", "float16")
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.stdout)
    assert printed == yaml.safe_load((tmp_path / "r.yml").read_text())
    assert printed["dtype"] == "float16" and printed["slices"] == expected_slices(paths, [1, 1], 4, 1)
    assert not (tmp_path / "out").exists()
    again = run_cli("merge", tmp_path / "r.yml", "-o", tmp_path / "merged")  # the kept recipe runs as it is
    assert again.exit_code == 0, again.output
    assert state(tmp_path / "merged")["model.norm.weight"].dtype == torch.float16


def test_without_a_seed_one_is_picked_and_reported(trio, tmp_path):
    paths = [str(trio / f"m{i}") for i in range(3)]
    first = run_cli("layershuffle", "-m", paths[0], "-m", paths[1], "-m", paths[2], "-o", tmp_path / "o", "--dry-run",
                    "--json")
    report = json.loads(first.stdout)
    assert report["recipe"]["slices"] == expected_slices(paths, [1, 1, 1], 4, report["seed"])


@pytest.mark.parametrize("args,fragment", [
    (["-m", "{0}"], "give at least two models"),
    (["-m", "{0}:0", "-m", "{1}:0"], "weights must be at least 0 and not all 0"),
    (["-m", "{0}:-1", "-m", "{1}"], "weights must be at least 0"),
    (["-m", "{0}", "-m", "{1}", "--write-yaml", "{tmp}/missing/r.yml"], "does not exist"),
    (["-m", "{0}", "-m", "{1}", "-w", "1"], "no such option '-w' (mergekit's): here -m PATH:WEIGHT"),
    (["-m", "{0}", "-m", "{1}", "--fp16"], "here --dtype float16"),
    (["-m", "{0}:1", "-m", "{tmp}/nothing"], "nothing"),
    (["-m", "{0}", "-m", "{short}"], "has 2 layers, fewer than the 4 positions of"),
])
def test_bad_input_is_one_line(trio, tmp_path, args, fragment):
    if "{short}" in args:
        tiny_llama(5, num_hidden_layers=2).save_pretrained(tmp_path / "short")
    args = [a.format(str(trio / "m0"), str(trio / "m1"), tmp=tmp_path, short=tmp_path / "short") for a in args]
    assert_one_line_error(run_cli("layershuffle", *args, "-o", tmp_path / "out", "--seed", 0), fragment)
    assert not (tmp_path / "out").exists() and not (tmp_path / "missing").exists()


def test_the_python_api_gives_the_commands_merge(trio, tmp_path):
    from adaptkit.merge import run_layershuffle

    paths = [str(trio / f"m{i}") for i in range(2)]
    report = run_layershuffle([paths[0], (paths[1], 3)], tmp_path / "api", seed=4, progress=False, card=False)
    assert report["recipe"]["slices"] == expected_slices(paths, [1, 3], 4, 4)
    assert run_cli("layershuffle", "-m", paths[0], "-m", f"{paths[1]}:3", "-o", tmp_path / "cli", "--seed", 4,
                   "--no-card").exit_code == 0
    got, expected = state(tmp_path / "api"), state(tmp_path / "cli")
    assert all(torch.equal(got[n], expected[n]) for n in expected) and got.keys() == expected.keys()
