"""`adaptkit generate`: text from a causal LM, its adapters and other models, one under the other
(added to the root group in adaptkit/cli/__init__.py; the work is adaptkit/train/generation.py)."""
from __future__ import annotations

import click

from ..errors import AdaptkitError
from .boundary import heavy_imports
from .options import ALLOW_PICKLE, CONTEXT, JSON, POSITIVE, SEED, Finite, emit_json


@click.command(name="generate", context_settings=CONTEXT)
@click.argument("model")
@click.option("--adapter", "adapters", multiple=True, help="An adapter to put on MODEL, repeatable (active together).")
@click.option("-m", "--model", "models", multiple=True, metavar="MODEL",
              help="Another model to generate from, repeatable: a folder (a merge), org/name[@rev] or an adapter "
                   "folder.")
@click.option("--prompt", "prompts", multiple=True, help="A prompt, repeatable.")
@click.option("--prompt-file", type=click.Path(dir_okay=False), help="Prompts, one per line (UTF-8).")
@click.option("--chat", is_flag=True, help="Wrap each prompt as a user turn in the tokenizer's chat template.")
@click.option("--compare", is_flag=True, help="The base alone, then with each adapter alone (and all together), "
              "then each -m model.")
@click.option("--max-new-tokens", type=POSITIVE, default=64, show_default=True, help="Tokens to generate at most.")
@click.option("--temperature", type=Finite(0), default=0.0, show_default=True, help="0: greedy; above: sample.")
@click.option("--top-p", type=Finite(0, 1, min_open=True), help="Sample from the smallest set of tokens with this "
              "probability (needs --temperature > 0; default: the model's generation config, else 1).")
@click.option("--top-k", type=click.IntRange(min=0), help="Sample from the k likeliest tokens, 0: all (needs "
              "--temperature > 0; default: the model's generation config, else 50 as transformers).")
@SEED
@ALLOW_PICKLE
@JSON
@click.pass_context
def generate_cmd(ctx, model, adapters, models, prompts, prompt_file, chat, compare, max_new_tokens, temperature, top_p,
                 top_k, seed, allow_pickle, as_json):
    """Generate text from a causal LM, with adapters, to check a merge or an adapter by eye.

    MODEL is a folder, org/name[@rev], or an adapter folder (its base is read from it). Each prompt
    runs alone; greedy unless --temperature > 0, and then every run samples from --seed (default 0).
    --json prints a list of {model, adapters, prompt, text, new_tokens}.

    \b
    Examples:
      adaptkit generate ./llama --adapter story/ --prompt "Once upon a time"
      adaptkit generate ./llama --adapter a/ --adapter b/ -m merged/ --compare --prompt "The capital of France is"
      adaptkit generate story/ --prompt-file prompts.txt --temperature 0.7 --top-p 0.9 --seed 1 --json
    """
    with heavy_imports():
        from ..train.generation import generate, read_prompts

    prompts = list(prompts) + (read_prompts(prompt_file) if prompt_file else [])
    if not prompts:
        raise AdaptkitError("give a prompt: --prompt TEXT (repeatable) or --prompt-file FILE")
    records = generate(model, prompts, adapters, models=models, compare=compare, max_new_tokens=max_new_tokens,
                       temperature=temperature, top_p=top_p, top_k=top_k, seed=0 if seed is None else seed, chat=chat,
                       allow_pickle=allow_pickle, progress=not (ctx.obj or {}).get("quiet"))
    if as_json:
        return emit_json(records)
    for record in records:
        click.echo(f"== {_header(record)}")
        click.echo(f"{record['prompt']}{record['text']}" if not chat else record["text"])
        click.echo()


def _header(record: dict) -> str:
    """'MODEL', or 'MODEL + A + B' for a model with adapters, and the count of new tokens."""
    count = record["new_tokens"]
    return " + ".join([record["model"], *record["adapters"]]) + f"  ({count} new token{'s' * (count != 1)})"
