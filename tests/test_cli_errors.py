"""The CLI boundary: usage errors, OS faults, undecodable text, runaway nesting, memory, Hub id
validation and missing extras each end in one line with exit 1; --debug shows the traceback and,
with --quiet, may follow the subcommand."""
from __future__ import annotations

import errno
import subprocess
import sys
from pathlib import Path

import click
import pytest

from adaptkit.cli import cli
from adaptkit.cli.boundary import add_global_options, one_line
from adaptkit.errors import AdaptkitError
from adaptkit.io.outputs import Terminated
from hostile import assert_one_line_error, run_cli, run_process
from text_models import counting, llama_dir, write_jsonl


@pytest.fixture
def afile(tmp_path):
    (tmp_path / "afile").write_text("x")
    return tmp_path / "afile"


# -- usage errors: (id, args, fragment) ------------------------------------------------------------
USAGE = [
    ("missing -o", lambda d: ["merge", "-m", d / "a"], "missing option '-o' / '--out' (see 'adaptkit merge --help')"),
    ("-o is a file", lambda d: ["merge", "-m", d / "a", "-o", d / "afile"], "is a file"),
    ("unknown option", lambda d: ["--frobnicate"], "no such option '--frobnicate'"),
    ("unknown option after subcommand", lambda d: ["inspect", d, "--frobnicate"], "no such option"),
    ("unknown command", lambda d: ["mrege"], "no such command 'mrege'"),
    ("not an int", lambda d: ["merge", "-m", d / "a", "-o", d / "o", "--seed", "x"], "'x' is not a valid integer"),
    ("bad choice", lambda d: ["plugins", "--kind", "nope"], "'nope' is not one of"),
    ("extra argument", lambda d: ["inspect", d, d], "unexpected extra argument"),
    ("threads 0", lambda d: ["merge", "-m", d / "a", "-o", d / "o", "--threads", "0"], "'--threads': 0 is not in the range x>=1"),
    ("threads -1", lambda d: ["merge", "-m", d / "a", "-o", d / "o", "--threads", "-1"], "-1 is not in the range x>=1"),
    ("rank 0", lambda d: ["merge", "-m", d / "a", "-o", d / "o", "--rank", "0"], "'--rank': 0 is not in the range"),
    ("lr nan", lambda d: ["train", "--base", d, "--variant", "lora", "--data", d / "afile", "-o", d / "o", "--lr", "nan"],
     "'--lr': 'nan' is not a finite number"),
    ("lr 0", lambda d: ["train", "--base", d, "--variant", "lora", "--data", d / "afile", "-o", d / "o", "--lr", "0"],
     "'--lr': 0.0 is not in the range x>0"),
    ("batch size 0", lambda d: ["eval", d, "--data", d / "afile", "--batch-size", "0"], "'--batch-size': 0 is not in the range"),
    ("energy 0", lambda d: ["convert", d, "--to", "peft", "--energy", "0", "-o", d / "o"], "0.0 is not in the range 0<x<=1"),
    ("energy inf", lambda d: ["extract", "--model", d, "--base", d, "--energy", "inf", "-o", d / "o"],
     "'inf' is not a finite number"),
    ("set without key", lambda d: ["merge", "-m", d / "a", "-m", d / "b", "-o", d / "o", "--set", "=1"],
     "--set expects key=value, got '=1'"),
    ("set not YAML, old spelling -p", lambda d: ["merge", "-m", d / "a", "-m", d / "b", "-o", d / "o", "-p", "weight=[1,2"],
     "--set weight:1: not valid YAML"),
]


@pytest.mark.parametrize("args,fragment", [(a, f) for _, a, f in USAGE], ids=[i for i, _, _ in USAGE])
def test_usage_errors_are_one_line(tmp_path, afile, args, fragment):
    assert_one_line_error(run_cli(*args(tmp_path)), fragment)


def test_usage_error_in_a_real_process_is_one_line(tmp_path):
    proc = run_process("merge", "-m", tmp_path / "a")
    assert_one_line_error(proc, "missing option '-o'")


# -- OS faults at the boundary ---------------------------------------------------------------------
def test_output_under_a_file_names_the_path(tmp_path, afile, peft_lora_dir):
    line = assert_one_line_error(run_cli("convert", peft_lora_dir, "--to", "peft", "-o", afile / "out"), str(afile))
    assert "not a directory" in line or "not a folder" in line


@pytest.mark.parametrize("exc,expected", [
    (OSError(errno.ENOSPC, "No space left on device", "out/model.safetensors"),
     "out/model.safetensors: no space left on device"),
    (PermissionError(errno.EACCES, "Permission denied", "/root/x"), "/root/x: permission denied"),
    (OSError(errno.EBUSY, "Device or resource busy", "/mnt/x"), "/mnt/x: device or resource busy"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "a/b"), "a/b: not a directory"),
    (OSError(errno.EXDEV, "Invalid cross-device link", "a", None, "b"), "a -> b: invalid cross-device link"),
    (UnicodeDecodeError("utf-8", b"ab\xff", 2, 3, "invalid start byte"), "input is not UTF-8 text (byte 0xff at offset 2)"),
    (RecursionError("maximum recursion depth exceeded"), "input is nested too deeply to read"),
    (MemoryError(), "out of memory"),
    (AdaptkitError("x: bad"), "x: bad"),
])
def test_one_line_for_each_fault_class(exc, expected):
    assert one_line(exc) == expected


def test_a_bug_keeps_its_traceback():
    assert one_line(ValueError("internal")) is None
    assert one_line(ModuleNotFoundError("No module named 'nonexistent_thing'", name="nonexistent_thing")) is None


def test_hub_validation_error_is_one_line():
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    with pytest.raises(HFValidationError) as info:
        validate_repo_id("a/b/c/d")
    line = one_line(info.value)
    assert line and "\n" not in line and "a/b/c/d" in line


def _failing_command(exc):
    @click.command("boom")
    def boom():
        """Raise.

        Example: adaptkit boom
        """
        raise exc
    add_global_options(boom)  # as cli.add_command does
    return boom


@pytest.mark.parametrize("exc,fragment", [
    (OSError(errno.ENOSPC, "No space left on device", "out/x.safetensors"), "out/x.safetensors: no space left"),
    (RecursionError(), "nested too deeply"),
    (AdaptkitError("bad\nname\x1b[31m"), "bad name\\x1b[31m"),  # one line, control characters shown escaped
])
def test_faults_raised_by_a_command_end_in_one_line(monkeypatch, exc, fragment):
    monkeypatch.setitem(cli.commands, "boom", _failing_command(exc))
    assert_one_line_error(run_cli("boom"), fragment)


def test_debug_and_quiet_after_the_subcommand(tmp_path, monkeypatch):
    monkeypatch.setitem(cli.commands, "boom", _failing_command(OSError(errno.EIO, "I/O error", "f")))
    assert isinstance(run_cli("boom", "--debug").exception, OSError)  # the traceback, not one line
    assert isinstance(run_cli("--debug", "boom").exception, OSError)
    assert_one_line_error(run_cli("boom", "-q"), "f: I/O error")
    proc = run_process("inspect", tmp_path / "missing", "--debug")
    assert proc.returncode == 1 and "Traceback" in proc.stderr
    proc = run_process("inspect", tmp_path / "missing", "-q")
    assert_one_line_error(proc, "no such file or folder")


# -- a missing optional extra ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    return llama_dir(root / "llama"), write_jsonl(root / "d.jsonl", counting(4))


@pytest.mark.parametrize("args", [
    lambda m, d, o: ["train", "--base", m, "--variant", "lora", "--data", d, "-o", o],
    lambda m, d, o: ["eval", m, "--data", d],
    lambda m, d, o: ["soup", "greedy", "-m", m, "-m", m, "--eval", d, "-o", o],
], ids=["train", "eval", "soup greedy --eval"])
def test_without_the_train_extra_one_line_names_it(tiny_text, tmp_path, monkeypatch, args):
    """As after `pip install adaptkit` without extras: importing transformers fails."""
    for name in [m for m in sys.modules if m == "transformers" or m.startswith("transformers.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "transformers", None)  # import raises ModuleNotFoundError
    model, data = tiny_text
    result = run_cli(*args(model, data, tmp_path / "out"))
    assert_one_line_error(result, "this needs the optional package 'transformers': pip install 'adaptkit[train]'")
    assert not (tmp_path / "out").exists()


def test_eval_function_that_fails_is_one_line(tiny_text, tmp_path):
    model, _ = tiny_text
    result = run_cli("soup", "greedy", "-m", model, "-m", model, "--eval-py", "os:getcwd", "-o", tmp_path / "out")
    assert_one_line_error(result, f"--eval-py os:getcwd failed on {model}: TypeError:")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("exc,line,code", [(KeyboardInterrupt(), "error: interrupted", 130),
                                           (Terminated(), "error: terminated", 143)])
def test_interrupt_and_sigterm_are_one_line_with_the_shell_codes(monkeypatch, exc, line, code):
    monkeypatch.setitem(cli.commands, "boom", _failing_command(exc))
    result = run_cli("boom")
    assert result.exit_code == code and result.stderr.strip().splitlines() == [line]


# -- the end of the process --------------------------------------------------------------------------
END = """
import atexit, sys, tempfile
{imports}
from adaptkit.cli.boundary import end_process

class Noisy:  # a module global: finalized by the interpreter's teardown, not by gc.collect
    def __del__(self):
        print("teardown", flush=True)

noisy = Noisy()
folder = tempfile.TemporaryDirectory()  # removed by its finalizer, an atexit handler
print(folder.name)
atexit.register(print, "atexit ran")
sys.stdout.write("unflushed ")
end_process({code!r})
"""


@pytest.mark.parametrize("with_torch", [True, False], ids=["torch loaded: os._exit", "no torch: sys.exit"])
@pytest.mark.parametrize("code,status", [(None, 0), (0, 0), (3, 3), ("bye", 1)])
def test_end_process_keeps_the_status_output_and_exit_handlers(tmp_path, with_torch, code, status):
    script = END.format(imports="import torch" if with_torch else "", code=code)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == status, proc.stderr
    lines = proc.stdout.split("\n")
    assert "unflushed atexit ran" in proc.stdout and not Path(lines[0]).exists()
    assert ("teardown" in proc.stdout) is not with_torch  # torch's teardown (0.3-0.45 s) skipped
    assert proc.stderr.strip() == ("bye" if code == "bye" else "")


HEAVY = """
import gc
from adaptkit.cli.boundary import heavy_imports

assert gc.get_freeze_count() == 0
with heavy_imports():
    assert not gc.isenabled()
    import wave  # a module not loaded yet
assert gc.isenabled() and gc.get_freeze_count() > 0
frozen = gc.get_freeze_count()
with heavy_imports():
    import wave  # noqa: F811  (loaded: nothing new)
assert gc.get_freeze_count() == frozen
gc.disable()
with heavy_imports():
    import colorsys
assert not gc.isenabled() and gc.get_freeze_count() > frozen  # the collector left as found
print("ok")
"""


def test_heavy_imports_pause_the_collector_and_freeze_what_they_load():
    """A command's first import of torch and the library runs with the cyclic collector paused, and
    what exists after it is frozen (left out of later collections, the exit's included); a second
    command in the same process, which imports nothing new, freezes nothing."""
    proc = subprocess.run([sys.executable, "-c", HEAVY], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


@pytest.mark.parametrize("script,command", [("run_yaml", "merge"), ("multimerge", "merge"), ("merge_raw_pytorch", "merge"),
                                            ("legacy", "merge"), ("moe", "moe"), ("tokensurgeon", "tokensurgeon"),
                                            ("layershuffle", "layershuffle"), ("extract_lora", "extract")])
def test_every_mergekit_option_is_taken_or_answered(tmp_path, script, command):
    """Each command-line option of mergekit's script (read off its click command) is either one adaptkit's
    command takes, or refused in one line that says what adaptkit does instead, never click's guess by
    spelling (it offered --allow-pickle, which unpickles untrusted files, for --lazy-unpickle); an option
    such a line names ("here --seed") is one the command takes."""
    import importlib
    import re

    from adaptkit.cli import cli

    peer = importlib.import_module(f"mergekit.scripts.{script}").main
    ours = cli.commands[command]
    taken = {o for p in ours.params for o in (*p.opts, *p.secondary_opts)}
    answered = 0
    for option in (o for p in peer.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")):
        if option in taken:
            continue
        line = assert_one_line_error(run_cli(command, tmp_path / "recipe.yml", "-o", tmp_path / "out", option),
                                     f"no such option '{option}' (mergekit's): ")
        assert "did you mean" not in line.lower(), line
        for named in re.findall(r"here (--?[\w-]+)", line):
            assert named in taken, line
        answered += 1
    assert answered > 20 and not (tmp_path / "out").exists()
