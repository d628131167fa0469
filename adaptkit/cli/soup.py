"""`adaptkit soup uniform|greedy|sweep` (the group is added to the root group in adaptkit/cli/__init__.py)."""
from __future__ import annotations

import click

from ..errors import AdaptkitError
from .boundary import Group, heavy_imports
from .options import ALLOW_PICKLE, CONTEXT, EVAL_DATA, FORCE, JSON, OUT, PLOT, TASK, emit_json


def _evaluator(eval_cmd: str | None, eval_py: str | None, eval_data: str | None = None, task: str | None = None):
    """A score function from a shell command template ({model} -> folder), a module:function, or
    evaluation data (JSON lines: −loss for causal LM, accuracy for classification)."""
    import importlib
    import shlex
    import subprocess

    if sum(map(bool, (eval_cmd, eval_py, eval_data))) != 1:
        raise AdaptkitError("give exactly one of --eval DATA.jsonl, --eval-cmd 'CMD {model}' or --eval-py module:function")
    if eval_data:
        from ..train.evaluation import scorer

        return scorer(eval_data, task=task)
    if eval_py:
        module, _, attr = eval_py.partition(":")
        try:
            function = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError, ValueError) as e:
            raise AdaptkitError(f"--eval-py {eval_py}: {e}") from None

        def run_function(model) -> float:
            try:
                return float(function(model))
            except Exception as e:  # noqa: BLE001 (the user's code: its failure is said in one line)
                raise AdaptkitError(f"--eval-py {eval_py} failed on {model}: {type(e).__name__}: {e}") from e

        return run_function

    def run_command(model) -> float:
        cmd = eval_cmd.replace("{model}", shlex.quote(str(model)))
        proc = subprocess.run(cmd, shell=True, capture_output=True, text=True)
        lines = proc.stdout.strip().splitlines()
        try:
            if proc.returncode != 0:
                raise ValueError(f"exit status {proc.returncode}")
            return float(lines[-1])
        except (ValueError, IndexError) as e:
            raise AdaptkitError(f"--eval-cmd must print a score as its last line ({e}): {cmd}") from None

    return run_command


@click.group(cls=Group, context_settings=CONTEXT)
def soup():
    """Model soups: uniform average, greedy soup, and an interpolation sweep.

    \b
    Examples:
      adaptkit soup uniform -m ft1 -m ft2 -m ft3 -o soup/
      adaptkit soup greedy -m ft1 -m ft2 -m ft3 --eval-cmd "python score.py {model}" -o soup/
      adaptkit soup greedy -m ft1 -m ft2 -m ft3 --eval dev.jsonl -o soup/
      adaptkit soup sweep zero-shot fine-tuned --alphas 0,0.25,0.5,0.75,1 --eval-py my_eval:score -o best/
    """


def _eval_options(f):
    f = TASK(f)
    f = click.option("--eval-py", help="module:function taking the model folder and returning a score.")(f)
    f = click.option("--eval-cmd", help="Shell command scoring {model} (a folder); its last output line is the score.")(f)
    return EVAL_DATA(f)


def _soup_options(f):
    f = ALLOW_PICKLE(f)
    return OUT(FORCE(JSON(f)))


@soup.command(context_settings=CONTEXT)
@click.option("-m", "--model", "models", multiple=True, required=True, help="An ingredient, repeatable.")
@_soup_options
def uniform(models, out, force, as_json, allow_pickle):
    """Average the models: θ = (1/k)·Σ θᵢ.

    \b
    Examples:
      adaptkit soup uniform -m ft1 -m ft2 -m ft3 -o soup/
    """
    with heavy_imports():
        from ..merge import soup as soups

    soups.uniform(models, out=out, force=force, allow_pickle=allow_pickle)
    if as_json:
        return emit_json({"ingredients": list(models), "output": out})
    click.echo(f"uniform soup of {len(models)} models in {out}")


@soup.command(context_settings=CONTEXT)
@click.option("-m", "--model", "models", multiple=True, required=True, help="A candidate, repeatable.")
@_eval_options
@_soup_options
@PLOT
def greedy(models, eval_data, eval_cmd, eval_py, task, out, force, as_json, allow_pickle, plot):
    """Greedy soup: rank candidates by score; add each only if the soup does not get worse.

    Higher scores are better (negate a loss); --eval DATA scores each soup on JSON lines: −loss
    (causal LM) or accuracy (classification).

    \b
    Examples:
      adaptkit soup greedy -m ft1 -m ft2 -m ft3 --eval-cmd "python score.py {model}" -o soup/
      adaptkit soup greedy -m ft1 -m ft2 -m ft3 --eval dev.jsonl -o soup/ --plot greedy.png
    """
    with heavy_imports():
        from ..merge import soup as soups
        from ..plots import check_target, draw, greedy_figure

    if plot:
        check_target(plot)
    result = soups.greedy(models, _evaluator(eval_cmd, eval_py, eval_data, task), out=out, force=force,
                          allow_pickle=allow_pickle)
    if plot:
        draw(greedy_figure(result.steps, result.scores), plot)
    if as_json:
        return emit_json({"ingredients": result.ingredients, "score": result.score, "scores": result.scores,
                          "steps": result.steps, "output": out, **({"plot": plot} if plot else {})})
    for step in result.steps:
        click.echo(f"  {'kept ' if step['kept'] else 'skip '} {step['added']}  score {step['score']:.6g}")
    click.echo(f"greedy soup of {len(result.ingredients)} models, score {result.score:.6g}, in {out}")
    if plot:
        click.echo(f"picture: {plot}")


@soup.command(context_settings=CONTEXT)
@click.argument("a")
@click.argument("b")
@click.option("--alphas", default="0,0.25,0.5,0.75,1", show_default=True, help="Comma-separated α values.")
@_eval_options
@_soup_options
@PLOT
def sweep(a, b, alphas, eval_data, eval_cmd, eval_py, task, out, force, as_json, allow_pickle, plot):
    """Score θ(α) = (1 − α)·A + α·B for each α and keep the best (WiSE-FT).

    \b
    Examples:
      adaptkit soup sweep zero-shot fine-tuned --alphas 0,0.5,1 --eval-cmd "python score.py {model}" -o best/
      adaptkit soup sweep zero-shot fine-tuned --eval dev.jsonl -o best/ --plot sweep.png
    """
    with heavy_imports():
        from ..merge import soup as soups
        from ..plots import check_target, draw, sweep_figure

    try:
        values = [float(x) for x in alphas.split(",") if x.strip()]
    except ValueError:
        raise AdaptkitError(f"--alphas must be numbers separated by commas, got '{alphas}'") from None
    if plot:
        check_target(plot)
    result = soups.sweep(a, b, values, _evaluator(eval_cmd, eval_py, eval_data, task), out=out, force=force,
                         allow_pickle=allow_pickle)
    if plot:
        draw(sweep_figure([s["alpha"] for s in result.steps], [s["score"] for s in result.steps]), plot)
    if as_json:
        return emit_json({"scores": result.scores, "score": result.score, "steps": result.steps, "output": out,
                          **({"plot": plot} if plot else {})})
    for step in result.steps:
        click.echo(f"  alpha {step['alpha']:<6g} score {step['score']:.6g}")
    best = max(result.steps, key=lambda s: s["score"])
    click.echo(f"best alpha {best['alpha']:g} (score {result.score:.6g}) in {out}")
    if plot:
        click.echo(f"picture: {plot}")
