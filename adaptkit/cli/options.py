"""What the commands share: option types for numbers a user types (ranges checked, NaN and infinity
refused, so a bad value is a usage error in one line instead of a traceback or a silent default),
the context settings every command is made with, JSON output, and the options several commands have
(-o/--out, --force, --json, --set, --seed, --dtype, --base, --rank, --energy, --allow-pickle, ...):
each is made here once, so it has one name, one type and one help text wherever it appears
(tests/test_cli_consistency.py walks every command to check this). An option renamed for that keeps
its old spelling for one release through `Renamed`: it still works and warns once."""
from __future__ import annotations

import json
import math
import warnings

import click

from ..errors import AdaptkitError

#: Context settings of every command: -h as well as --help, and help text up to 100 columns wide.
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class Finite(click.FloatRange):
    """A finite float within [min, max] (either open with min_open/max_open); NaN and ±inf refused.
    click's FloatRange alone lets NaN through, since every comparison with NaN is false."""

    name = "number"

    def _describe_range(self) -> str:
        """--help's range; unbounded: "finite" (click's own reads "x<=None")."""
        return "finite" if self.min is None and self.max is None else super()._describe_range()

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return super().convert(number, param, ctx)


#: Counts that must be at least one (ranks, batch sizes, steps, threads).
POSITIVE = click.IntRange(min=1)
#: Counts where zero means "none" (warm-up steps, gradient clipping off).
NON_NEGATIVE = click.IntRange(min=0)

#: The one --allow-pickle, on every command that reads a checkpoint (one option, one meaning).
ALLOW_PICKLE = click.option("--allow-pickle", is_flag=True,
                            help="Read .bin/.pt/.ckpt pickle checkpoints (torch.load weights_only=True, no code run).")

#: The one --plot, on every command that draws its result (adaptkit/plots/): the format from the suffix, the
#: path checked (and matplotlib found) before any work, the file written atomically.
PLOT = click.option("--plot", type=click.Path(dir_okay=False), metavar="PATH",
                    help="Also draw the result into PATH (.png or .svg; needs pip install 'adaptkit[plot]').")


class Renamed(click.Option):
    """An option whose old spellings (`old=("-p", "--param")`) still work for one release: their values
    count as the option's own, and a command line that uses them gets one warning naming the new spelling.
    The old spellings are not in --help. For options that take a value (no renamed flag needs this)."""

    def __init__(self, *args, old: tuple[str, ...] = (), **kwargs):
        super().__init__(*args, **kwargs)
        if old and self.is_flag:
            raise TypeError("Renamed: old spellings are for options that take a value")
        self.old = tuple(old)

    def _old_dest(self) -> str:
        return f"{self.name} (old spelling)"

    def add_to_parser(self, parser, ctx) -> None:
        super().add_to_parser(parser, ctx)
        if self.old:  # parsed as the option itself, into a slot of their own so that their use shows
            parser.add_option(obj=self, opts=self.old, dest=self._old_dest(),
                              action="append" if self.multiple else "store", nargs=self.nargs)

    def handle_parse_result(self, ctx, opts, args):
        if self._old_dest() in opts:
            opts = dict(opts)
            given = opts.pop(self._old_dest())
            new = max(self.opts, key=len)
            if not ctx.resilient_parsing:  # shell completion parses too: it warns no one
                warnings.warn(f"'{'/'.join(self.old)}' is deprecated, use '{new}'; the old spelling goes in the "
                              "next release", FutureWarning, stacklevel=2)
            if self.multiple:  # the new spelling's values first, then the old one's
                opts[self.name] = [*opts.get(self.name, ()), *given]
            elif self.name in opts:
                raise click.BadParameter(f"give '{new}' once (it is also spelled '{'/'.join(self.old)}')",
                                         ctx=ctx, param=self)
            else:
                opts[self.name] = given
        return super().handle_parse_result(ctx, opts, args)


def option(*decls: str, old: tuple[str, ...] = (), **attrs):
    """click.option, with `old` spellings that still work for one release (`Renamed`)."""
    return click.option(*decls, cls=Renamed, old=old, **attrs)


def parse_settings(items: tuple[str, ...] | list[str], flag: str = "--set") -> dict:
    """KEY=VALUE pairs -> {key: value}, the one reading of --set everywhere: VALUE as JSON (so 1e-3 and
    NaN are numbers), else as YAML (`[q_proj, v_proj]`, `true`, `.inf`; bounded as recipes are). A value
    that reads as neither, an empty one, and a key given twice are errors: a setting is never guessed."""
    from ..io.readers import load_yaml

    settings: dict = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise AdaptkitError(f"{flag} expects key=value, got '{item}'")
        if key in settings:
            raise AdaptkitError(f"{flag} {key} is given twice")
        try:
            value = json.loads(text)
        except ValueError:
            value = load_yaml(text, f"{flag} {key}")
        if value is None and text.strip() not in ("null", "~", "Null", "NULL"):
            raise AdaptkitError(f"{flag} {key}={text}: no value (write {key}=null for none, or quote text)")
        settings[key] = value
    return settings


class DType(click.ParamType):
    """A floating dtype (float32, bfloat16, float16, float64, or an alias such as bf16) as its canonical
    name; checked as typed, before any work starts."""

    name = "dtype"

    def convert(self, value, param, ctx):
        from ..io.dtypes import TABLE

        floats = [d for d in TABLE if d.kind == "float"]
        for d in floats:
            if str(value).lower() in (d.name, *d.aliases):
                return d.name
        self.fail(f"{value!r} is not one of {', '.join(d.name for d in floats)}", param, ctx)


def settings_option(*old: str):
    """--set KEY=VALUE, repeatable, read by `parse_settings` into a dict named `settings`; `old`: the
    command's former spellings (merge's -p/--param)."""
    return option("--set", "settings", multiple=True, metavar="KEY=VALUE", old=old,
                  callback=lambda ctx, param, value: parse_settings(value),
                  help="A setting, repeatable; VALUE is read as JSON, else YAML (r=16, density=0.5, "
                       "target_modules='[q_proj, v_proj]'). The settings each command takes are in its text above.")


#: --set KEY=VALUE (see settings_option).
SET = settings_option()
#: -o/--out, the one output folder of every command that writes one.
OUT = click.option("-o", "--out", required=True, type=click.Path(file_okay=False),
                   help="Output folder (replacing an existing one takes --force).")
#: --force: replace an existing output, only once the new one is complete (io/outputs.py).
FORCE = click.option("--force", is_flag=True,
                     help="Replace an existing output folder (only once the new one is complete).")
#: --json: the result as JSON for scripts; the keys are in each command's help text or its Python function.
JSON = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON instead of text (for scripts).")
#: --seed: every random choice of the command follows it.
SEED = click.option("--seed", type=int,
                    help="Seed for everything random the command does; the same seed, the same result.")
#: --energy: rank chosen per module by the share of ΔW's energy kept.
ENERGY = click.option("--energy", type=Finite(0, 1, min_open=True),
                      help="Per module, the smallest rank keeping this share of Σσ² of ΔW (e.g. 0.9).")
#: --rank: the rank of every module of an output adapter.
RANK = click.option("--rank", type=POSITIVE,
                    help="Rank of every module of the output adapter (truncated SVD where ΔW is refactored).")


#: --task: what a model is trained or scored on.
TASK = click.option("--task", type=click.Choice(["causal-lm", "classification"]),
                    help="The task (default: an adapter's own, else classification when the records have a "
                         "'label', else causal-lm).")


#: --data, the examples a command trains on or scores, and --eval, the ones it evaluates (or scores soups) on.
DATA = click.option("--data", required=True, type=click.Path(dir_okay=False),
                    help='JSON lines of {"text"}, {"prompt", "completion"} or {"text", "label"} records.')
EVAL_DATA = click.option("--eval", "eval_data", type=click.Path(dir_okay=False),
                         help="Evaluation data, JSON lines as --data's: loss, and accuracy for classification.")
#: --dry-run: check everything and say what would be done; nothing written.
DRY_RUN = click.option("--dry-run", is_flag=True, help="Check the inputs and print the plan; write nothing.")
#: --no-card: the commands that write a model (merge, moe, tokensurgeon, layershuffle) write a card and a copy of
#: what they ran (tokensurgeon: its options, in the card).
NO_CARD = click.option("--no-card", is_flag=True, help="Write no model card (README.md) and no copy of the recipe "
                       "or config (adaptkit_recipe.yml, mergekit_moe_config.yml).")
#: mergekit's merge options of the commands that run a recipe (merge, layershuffle).
ALLOW_MIXED = click.option(
    "--allow-mixed-architectures", "--allow-crimes", "allow_mixed_architectures", is_flag=True,
    help="Merge models of different architectures (config.json's model_type) by tensor name and shape, as mergekit's "
         "--allow-crimes; the output's config.json is the base's, else the first model's.")
UNSAFE_TRUNCATE = click.option(
    "--unsafe-truncate-embeddings", is_flag=True,
    help="Without tokenizer settings, cut embeddings and LM heads whose rows differ in number to the fewest any "
         "input has (mergekit's option: it assumes the ids they share mean the same tokens); config.json's vocab_size "
         "follows.")
THREADS = click.option("--threads", type=POSITIVE, help="Tensors merged in parallel (default: 2 for elementwise methods "
                       "and those that merge faster side by side, e.g. ties, dare_*, della, sce, karcher, multislerp; else "
                       "1 using all cores).")
#: --shard-size of the commands that write a model (merge, moe, tokensurgeon, layershuffle).
DEVICE = click.option("--device", default="cpu", show_default=True,
                      help="Where the arithmetic runs: cpu, cuda, cuda:N or auto (a GPU where there is one); files are "
                           "read and written on the CPU.")
SHARD_SIZE = click.option("--shard-size", default="2GB", show_default=True, help="Largest output shard.")


def split_weight(spec: str) -> tuple[str, float | None]:
    """`-m PATH[:WEIGHT]` -> (PATH, WEIGHT or None); a tail after ':' that is no number stays in the path."""
    path, sep, weight = spec.rpartition(":")
    try:
        return (path, float(weight)) if sep else (spec, None)
    except ValueError:
        return spec, None


#: --batch-size, --precision and --max-length of the commands that run a model (train, eval, ...).
BATCH_SIZE = click.option("--batch-size", type=POSITIVE, default=8, show_default=True,
                          help="Examples per batch (training: per micro-batch and process).")
PRECISION = click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), default="fp32", show_default=True,
                         help="Compute precision: bf16 autocasts (CPU or GPU); fp16 autocasts (GPU only; training "
                              "scales the loss).")


def max_length_option(default: int | None = None):
    """--max-length; without a default the command picks one (train: min(512, the model's limit))."""
    return click.option("--max-length", type=POSITIVE, default=default, show_default=default is not None,
                        help="Truncate examples to this many tokens.")


def dtype_option(*old: str, **attrs):
    """--dtype: the dtype a model's weights are loaded and computed in (merge: mergekit's `dtype`, also the
    output's unless --out-dtype); `old`: the command's former spelling (train's --base-dtype)."""
    return option("--dtype", type=DType(), old=old, help="dtype the weights are loaded and computed in "
                  "(float32, bfloat16, float16).", **attrs)


def base_option(required: bool = False):
    """--base: the base model, wherever a command takes one."""
    return click.option("--base", required=required, help="Base model: a folder, org/name[@rev] or a lock name.")


def emit_json(data) -> None:
    """Print a command's result as JSON (what --json prints): indented, keys sorted, anything else as str."""
    click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))


__all__ = ["ALLOW_PICKLE", "BATCH_SIZE", "CONTEXT", "DATA", "DRY_RUN", "DType", "ENERGY", "EVAL_DATA", "FORCE",
           "Finite", "JSON", "NON_NEGATIVE", "OUT", "PLOT", "POSITIVE", "PRECISION", "RANK", "Renamed", "SEED", "SET",
           "TASK", "base_option", "dtype_option", "emit_json", "max_length_option", "option", "parse_settings",
           "settings_option"]
