"""One consistent command line: every command walked from adaptkit.cli's click tree (new commands included).

- every command has -h/--help with an "Examples:" block;
- `-m` is only ever a model/adapter input (-m/--model);
- options that appear in several commands have the same name, type and help text: the unified table below
  names the decorator in adaptkit/cli/options.py each must come from; any other option in two commands
  must be the same too, unless DIFFERENT says why not;
- --quiet/-q and --debug work after every command as before it;
- renamed options keep their old spelling for one release: it warns once and gives the same value;
- text output shows what matters without --json (an adapter merge's per-module error, the --dry-run plan,
  a model's figures in `inspect`, long lists summarized).
"""
from __future__ import annotations

import json
import re
import statistics
import warnings

import click
import pytest
from click.testing import CliRunner

from adaptkit.cli import cli, options
from adaptkit.errors import AdaptkitError


def walk(group: click.Group = cli, prefix: tuple[str, ...] = ()):
    for name, cmd in group.commands.items():
        yield prefix + (name,), cmd
        if isinstance(cmd, click.Group):
            yield from walk(cmd, prefix + (name,))


COMMANDS = [pytest.param(path, cmd, id=" ".join(path)) for path, cmd in walk()]


def declared(decorator) -> click.Option:
    """The click.Option a decorator from options.py adds."""
    return decorator(lambda **kwargs: None).__click_params__[-1]


#: The unified table: each option, wherever it appears, is made by this decorator of adaptkit/cli/options.py.
UNIFIED = {
    "--out": options.OUT, "--force": options.FORCE, "--json": options.JSON, "--set": options.SET,
    "--seed": options.SEED, "--dtype": options.dtype_option(), "--base": options.base_option(),
    "--rank": options.RANK, "--energy": options.ENERGY, "--allow-pickle": options.ALLOW_PICKLE,
    "--task": options.TASK, "--data": options.DATA, "--eval": options.EVAL_DATA, "--dry-run": options.DRY_RUN,
    "--batch-size": options.BATCH_SIZE, "--precision": options.PRECISION, "--max-length": options.max_length_option(),
    "--plot": options.PLOT,
}
#: (command, option) pairs that keep the name but not the table's type or help, and why.
EXEMPT = {("plot", "--out"): "`adaptkit plot` writes one picture file, not an output folder",
          ("tokensurgeon", "--batch-size"): "tokens approximated at once (mergekit-tokensurgeon's option: default 512, "
                                            "-1 for all), not examples through a model"}
#: Options in several commands whose help may differ, and why (the name and its role stay the same).
DIFFERENT = {
    "--model": "each command says which input it is (a merge input, a soup ingredient, the fine-tuned model)",
    "--method": "the plugin of the command's kind: a merge method, a quantizer",
}


def signature(p: click.Option) -> tuple:
    """What must match: spellings, help, type (with its range or choices), flag, repeatable."""
    t = p.type
    attrs = {k: getattr(t, k, None) for k in ("choices", "min", "max", "min_open", "max_open", "file_okay", "dir_okay")}
    return tuple(p.opts), tuple(p.secondary_opts), p.help, type(t), repr(attrs), p.is_flag, p.multiple


def long_name(p: click.Option) -> str:
    return max(p.opts, key=len)


def user_options(cmd: click.Command) -> list[click.Option]:
    """The command's own options (not --help, nor the --debug/--quiet every command gets)."""
    return [p for p in cmd.params if isinstance(p, click.Option) and p.name not in ("debug_after", "quiet_after")
            and "--help" not in p.opts]


@pytest.mark.parametrize("path,cmd", COMMANDS)
def test_every_command_has_short_and_long_help_with_examples(path, cmd):
    for flag in ("-h", "--help"):
        result = CliRunner().invoke(cli, [*path, flag], prog_name="adaptkit")
        assert result.exit_code == 0, result.output
        assert "Examples:\n" in result.output, f"adaptkit {' '.join(path)} {flag}: no 'Examples:' block"
        examples = result.output.split("Examples:\n", 1)[1].split("\n\n", 1)[0]
        assert not re.search(r"\S {6,}--", examples), f"a line continuation swallowed in:\n{examples}"


@pytest.mark.parametrize("path,cmd", COMMANDS)
def test_dash_m_is_only_a_model_input(path, cmd):
    for p in user_options(cmd):
        if "-m" in p.opts:
            assert "--model" in p.opts, f"adaptkit {' '.join(path)}: -m is {p.opts}, not -m/--model"


@pytest.mark.parametrize("path,cmd", COMMANDS)
def test_shared_options_match_the_unified_table(path, cmd):
    for p in user_options(cmd):
        name = long_name(p)
        if name in UNIFIED and (path[-1], name) not in EXEMPT:
            assert signature(p) == signature(declared(UNIFIED[name])), \
                f"adaptkit {' '.join(path)} {name}: not the shared option of adaptkit/cli/options.py"


def test_an_option_in_several_commands_means_the_same_in_each():
    seen: dict[str, dict[tuple, list[str]]] = {}
    for path, cmd in walk():
        for p in user_options(cmd):
            name = long_name(p)
            if name not in UNIFIED and name not in DIFFERENT:
                seen.setdefault(name, {}).setdefault(signature(p), []).append(" ".join(path))
    mismatched = {name: list(kinds.values()) for name, kinds in seen.items() if len(kinds) > 1}
    assert not mismatched, f"same name, different option (make it one decorator in options.py): {mismatched}"


@pytest.mark.parametrize("path,cmd", COMMANDS)
def test_quiet_and_debug_work_after_every_command(path, cmd):
    """-q/--quiet and --debug after the subcommand set what they set before it (parsed up to --help)."""
    root = click.Context(cli, info_name="adaptkit", obj={"debug": False, "quiet": False})
    parent = root
    for name in path[:-1]:
        parent = click.Context(parent.command.commands[name], info_name=name, parent=parent)
    with warnings.catch_warnings(), root:  # -q silences warnings until the root context closes
        with pytest.raises(click.exceptions.Exit):
            cmd.make_context(path[-1], ["--debug", "-q", "--help"], parent=parent)
        assert root.obj == {"debug": True, "quiet": True}


def test_debug_after_the_command_shows_the_traceback(tmp_path):
    quiet = CliRunner().invoke(cli, ["inspect", str(tmp_path / "missing")])
    debug = CliRunner().invoke(cli, ["inspect", str(tmp_path / "missing"), "--debug"])
    assert quiet.exit_code == 1 and isinstance(quiet.exception, SystemExit)
    assert isinstance(debug.exception, AdaptkitError)


# -- old spellings -------------------------------------------------------------------------------------

RENAMED = [  # id, command, args with the old spelling, with the new one, the parameter, its value, the warning
    ("merge -p", ["merge"], ["-m", "a", "-o", "o", "-p", "density=0.5", "-p", "lambda=1e-3"],
     ["-m", "a", "-o", "o", "--set", "density=0.5", "--set", "lambda=1e-3"], "settings", {"density": 0.5, "lambda": 1e-3},
     "'-p/--param' is deprecated, use '--set'; the old spelling goes in the next release"),
    ("merge --param", ["merge"], ["-m", "a", "-o", "o", "--param", "density=0.5"],
     ["-m", "a", "-o", "o", "--set", "density=0.5"], "settings", {"density": 0.5},
     "'-p/--param' is deprecated, use '--set'; the old spelling goes in the next release"),
    ("quantize -m", ["quantize"], ["model", "-m", "nf4", "-o", "o"], ["model", "--method", "nf4", "-o", "o"],
     "method", "nf4", "'-m' is deprecated, use '--method'; the old spelling goes in the next release"),
    ("hub push -m", ["hub", "push"], ["dir", "me/repo", "-m", "rank 16"], ["dir", "me/repo", "--message", "rank 16"],
     "message", "rank 16", "'-m' is deprecated, use '--message'; the old spelling goes in the next release"),
    ("train --base-dtype", ["train"], ["--base", "b", "--variant", "lora", "--data", "d", "-o", "o", "--base-dtype", "bf16"],
     ["--base", "b", "--variant", "lora", "--data", "d", "-o", "o", "--dtype", "bf16"], "dtype", "bfloat16",
     "'--base-dtype' is deprecated, use '--dtype'; the old spelling goes in the next release"),
]


def parse(path: list[str], args: list[str]) -> tuple[dict, list[str]]:
    """The command's parameters after parsing `args`, and the warnings parsing gave."""
    parent = click.Context(cli, info_name="adaptkit", obj={"debug": False, "quiet": False})
    for name in path[:-1]:
        parent = click.Context(parent.command.commands[name], info_name=name, parent=parent)
    cmd = parent.command.commands[path[-1]]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ctx = cmd.make_context(path[-1], list(args), parent=parent)
    return ctx.params, [str(w.message) for w in caught]


@pytest.mark.parametrize("path,old,new,param,value,message", [pytest.param(*case[1:], id=case[0]) for case in RENAMED])
def test_old_spellings_still_work_and_warn_once(path, old, new, param, value, message):
    old_params, old_warnings = parse(path, old)
    new_params, new_warnings = parse(path, new)
    assert old_params == new_params and old_params[param] == value
    assert old_warnings == [message] and new_warnings == []


@pytest.mark.parametrize("path,old", [pytest.param(case[1], case[2], id=case[0]) for case in RENAMED])
def test_old_spellings_are_not_in_help(path, old):
    text = CliRunner().invoke(cli, [*path, "--help"]).output
    flag = next(a for a in old if a in ("-p", "--param", "-m", "--base-dtype") and (a != "-m" or path[0] != "merge"))
    assert f"{flag} " not in text and f"{flag}," not in text


def test_old_and_new_spelling_of_one_value_together_is_a_usage_error():
    result = CliRunner().invoke(cli, ["quantize", "m", "-m", "nf4", "--method", "int8", "-o", "o"])
    assert result.exit_code == 1
    assert "give '--method' once (it is also spelled '-m')" in result.stderr


def test_old_spelling_end_to_end_prints_one_warning_line_and_the_same_plan(llama_dir, tmp_path):
    args = ["merge", "--method", "task_arithmetic", "--base", str(llama_dir), "-m", str(llama_dir), "-o",
            str(tmp_path / "o"), "--dry-run"]
    old = CliRunner().invoke(cli, [*args, "-p", "lambda=0.5"])
    new = CliRunner().invoke(cli, [*args, "--set", "lambda=0.5"])
    quiet = CliRunner().invoke(cli, [*args, "-p", "lambda=0.5", "-q"])
    assert old.exit_code == new.exit_code == quiet.exit_code == 0, old.output
    # (the estimate adds this process's peak so far, which may grow from one run to the next)
    plans = [re.sub(r"estimated peak [^)]*\)", "", r.stdout) for r in (old, new, quiet)]
    assert plans[0] == plans[1] == plans[2] and "lambda=0.5" in new.stdout
    assert old.stderr.splitlines() == [
        "warning: '-p/--param' is deprecated, use '--set'; the old spelling goes in the next release"]
    assert new.stderr == quiet.stderr == ""


# -- --set KEY=VALUE: one reading everywhere --------------------------------------------------------------

SETTINGS = [
    ("json numbers", ["r=8", "lora_alpha=1e1", "lr=1e-3"], {"r": 8, "lora_alpha": 10.0, "lr": 0.001}),
    ("json and yaml lists", ['a=["q", "v"]', "b=[q_proj, v_proj]"], {"a": ["q", "v"], "b": ["q_proj", "v_proj"]}),
    ("booleans, null, text", ["x=true", "y=null", "z=gaussian", "w=~"], {"x": True, "y": None, "z": "gaussian", "w": None}),
    ("yaml infinity", ["lambda=.inf"], {"lambda": float("inf")}),
    ("spaces around the key", [" density =0.5"], {"density": 0.5}),
]


@pytest.mark.parametrize("items,expected", [pytest.param(i, e, id=n) for n, i, e in SETTINGS])
def test_settings_are_read_as_json_then_yaml(items, expected):
    assert options.parse_settings(items) == expected


SETTING_ERRORS = [
    ("no equals", ["r"], "--set expects key=value, got 'r'"),
    ("no key", ["=1"], "--set expects key=value, got '=1'"),
    ("twice", ["r=1", "r=2"], "--set r is given twice"),
    ("empty value", ["r="], "--set r=: no value"),
    ("a comment only", ["r=#8"], "--set r=#8: no value"),
    ("not yaml", ["t=[q, v"], "--set t:1: not valid YAML"),
]


@pytest.mark.parametrize("items,fragment", [pytest.param(i, f, id=n) for n, i, f in SETTING_ERRORS])
def test_a_setting_that_does_not_read_is_an_error(items, fragment):
    with pytest.raises(AdaptkitError) as err:
        options.parse_settings(items)
    assert fragment in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("value,expected", [("bf16", "bfloat16"), ("float16", "float16"), ("FP32", "float32")])
def test_dtype_names_are_read_once_for_every_command(value, expected):
    assert options.DType().convert(value, None, None) == expected


def test_an_unknown_dtype_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(cli, ["merge", "-m", "a", "-o", str(tmp_path / "o"), "--dtype", "int4"])
    assert result.exit_code == 1 and "'int4' is not one of float64, float32, float16, bfloat16" in result.stderr


# -- text output ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rank_merge(peft_lora_dir, tmp_path_factory):
    """A linear merge of the PEFT LoRA with itself scaled, re-factored to rank 2: text and --json."""
    out = tmp_path_factory.mktemp("merge")
    args = ["--quiet", "merge", "--method", "linear", "-m", f"{peft_lora_dir}:1", "-m", f"{peft_lora_dir}:0.5",
            "--rank", "2"]
    text = CliRunner().invoke(cli, [*args, "-o", str(out / "text")])
    report = CliRunner().invoke(cli, [*args, "-o", str(out / "json"), "--json"])
    assert text.exit_code == report.exit_code == 0, text.output + report.output
    return text.stdout, json.loads(report.stdout)


def test_adapter_merge_text_shows_the_median_and_worst_module_errors(rank_merge):
    text, report = rank_merge
    errors = report["errors"]
    worst = max(errors, key=errors.get)
    assert 0 < errors[worst] < 1 and min(errors.values()) < errors[worst]  # truncation costs somewhere, not everywhere
    assert (f"per module median {statistics.median(errors.values()):.3g}, max {max(errors.values()):.3g} "
            f"(worst: {worst} {errors[worst]:.3g}") in text


def test_dry_run_text_shows_the_resolved_inputs(llama_dir, tmp_path):
    result = CliRunner().invoke(cli, ["merge", "--method", "task_arithmetic", "--base", str(llama_dir), "-m",
                                      f"{llama_dir}:0.3", "-o", str(tmp_path / "o"), "--dry-run", "--seed", "4"])
    lines = result.stdout.splitlines()
    assert result.exit_code == 0
    assert f"  base   {llama_dir}" in lines and f"  input  {llama_dir}  (weight=0.3)" in lines
    assert "  seed   4" in lines and any(line.startswith("parameters by tensor") for line in lines)


def test_inspect_text_shows_a_models_figures(tmp_path):
    from builders import tiny_gpt2

    tiny_gpt2().save_pretrained(tmp_path)  # GPT-2 spells them n_embd and n_layer
    config = json.loads((tmp_path / "config.json").read_text())
    text = CliRunner().invoke(cli, ["inspect", str(tmp_path)]).stdout
    figures = {line[2:22].strip(): line[23:] for line in text.splitlines()[1:]}
    assert (figures["hidden size"], figures["layers"], figures["vocab size"]) == \
        (str(config["n_embd"]), str(config["n_layer"]), str(config["vocab_size"]))


SUMMARIES = [
    ("short list whole", ["q_proj", "v_proj"], "q_proj, v_proj"),
    ("a regex as it is", ".*(q|v)_proj", ".*(q|v)_proj"),
    ("long paths by name and layers", [f"model.layers.{i}.self_attn.{m}" for i in range(12)
                                       for m in ("q_proj", "k_proj", "v_proj", "o_proj")],
     "q_proj, k_proj, v_proj, o_proj (48 modules in 12 layers)"),
    ("many names cut", [f"m{i}" for i in range(9)], "m0, m1, m2, m3, m4, m5, … (9 modules)"),
]


@pytest.mark.parametrize("names,expected", [pytest.param(n, e, id=i) for i, n, e in SUMMARIES])
def test_long_module_lists_are_summarized(names, expected):
    from adaptkit.cli.report import summarize

    assert summarize(names) == expected
