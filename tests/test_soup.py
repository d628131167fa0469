"""Soups: uniform, interpolation, greedy and sweep, through the Python API and the CLI."""
from __future__ import annotations

import json
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from adaptkit.merge import soup
from adaptkit.cli import cli
from adaptkit.errors import AdaptkitError


@pytest.fixture(scope="module")
def ingredients(tmp_path_factory):
    """Five one-tensor 'models' with known values; the target is 1.0 everywhere."""
    root = tmp_path_factory.mktemp("soup")
    values = {"good1": 1.2, "good2": 0.8, "meh": 1.6, "bad": 5.0, "zero": 0.0}
    for name, v in values.items():
        (root / name).mkdir()
        save_file({"w": torch.full((4, 4), v)}, root / name / "model.safetensors")
    return root


def score(folder) -> float:
    """Higher is better: minus the distance of the model's mean value to 1.0."""
    return -abs(load_file(f"{folder}/model.safetensors")["w"].mean().item() - 1.0)


def test_uniform_and_interpolate_formulas(ingredients):
    state = soup.uniform([ingredients / "good1", ingredients / "meh", ingredients / "zero"])
    torch.testing.assert_close(state["w"], torch.full((4, 4), (1.2 + 1.6 + 0.0) / 3))
    state = soup.interpolate(ingredients / "zero", ingredients / "bad", 0.3)
    torch.testing.assert_close(state["w"], torch.full((4, 4), 0.7 * 0.0 + 0.3 * 5.0))


def test_greedy_soup(ingredients, tmp_path):
    names = ["bad", "meh", "good2", "zero", "good1"]
    result = soup.greedy([ingredients / n for n in names], score, out=tmp_path / "soup")
    # Ranked: good1 (-0.2) = good2 (-0.2), meh (-0.6), zero (-1), bad (-4). good1+good2 -> mean 1.0 kept;
    # adding meh -> mean 1.2 (worse) skipped; zero -> 0.75 skipped; bad skipped.
    assert sorted(p.rsplit("/", 1)[-1] for p in result.ingredients) == ["good1", "good2"]
    assert result.score == pytest.approx(0.0, abs=1e-6)
    assert [s["kept"] for s in result.steps] == [True, True, False, False, False]
    assert score(tmp_path / "soup") == pytest.approx(0.0, abs=1e-6)


def test_sweep_picks_best_alpha(ingredients, tmp_path):
    result = soup.sweep(ingredients / "zero", ingredients / "bad", [0, 0.1, 0.2, 0.5], score, out=tmp_path / "best")
    assert [s["alpha"] for s in result.steps] == [0, 0.1, 0.2, 0.5]
    assert max(result.steps, key=lambda s: s["score"])["alpha"] == 0.2  # 0.2 * 5 = 1.0
    torch.testing.assert_close(load_file(tmp_path / "best/model.safetensors")["w"], torch.full((4, 4), 1.0))
    with pytest.raises(AdaptkitError, match="at least one alpha"):
        soup.sweep(ingredients / "zero", ingredients / "bad", [], score)


def test_cli_greedy_with_eval_command(ingredients, tmp_path):
    scorer = tmp_path / "score.py"
    scorer.write_text("import sys\nfrom safetensors.torch import load_file\n"
                      "print('evaluating...')\n"
                      "print(-abs(load_file(sys.argv[1] + '/model.safetensors')['w'].mean().item() - 1.0))\n")
    args = ["--quiet", "soup", "greedy", *[a for n in ("bad", "good1", "good2") for a in ("-m", str(ingredients / n))],
            "--eval-cmd", f"{sys.executable} {scorer} {{model}}", "-o", str(tmp_path / "out"), "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.output)["ingredients"]) == 2
    bad = CliRunner().invoke(cli, ["soup", "greedy", "-m", str(ingredients / "bad"), "--eval-cmd", "echo nope",
                                   "-o", str(tmp_path / "o2")])
    assert bad.exit_code == 1 and "must print a score as its last line" in bad.output


def test_cli_uniform_and_sweep(ingredients, tmp_path):
    r = CliRunner().invoke(cli, ["soup", "uniform", "-m", str(ingredients / "good1"), "-m", str(ingredients / "good2"),
                                 "-o", str(tmp_path / "u")])
    assert r.exit_code == 0 and score(tmp_path / "u") == pytest.approx(0.0, abs=1e-6)
    r = CliRunner().invoke(cli, ["soup", "sweep", str(ingredients / "zero"), str(ingredients / "bad"),
                                 "--alphas", "0,0.2,1", "--eval-py", "test_soup:score", "-o", str(tmp_path / "s")])
    assert r.exit_code == 0, r.output
    assert "best alpha 0.2" in r.output
