"""The CLI boundary: every failure a user can meet ends as one line on stderr and exit 1.

AdaptkitError, click's usage errors, OS errors (disk full, permissions, a parent that is a file,
...), undecodable text, runaway nesting, memory exhaustion, Hub validation errors and a missing
optional dependency are each said in one line (`one_line`); --debug shows the traceback instead.
Anything else is a bug and keeps its traceback. `--debug` and `--quiet` are accepted after the
subcommand too: every command registered on a `Group` gets them. A command runs with the process's
malloc tuned for its work where that was measured to pay (`allocator.tuning`: the command owns the
process, a library call never changes it).
"""
from __future__ import annotations

import atexit
import contextlib
import gc
import os
import re
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import click

from .. import allocator
from ..errors import AdaptkitError
from . import mergekit_options

MERGEKIT_COMMANDS = tuple(mergekit_options.COMMANDS)  # the commands that read mergekit's files, whose users type its options


class Group(click.Group):
    """A click group whose commands end every user-facing failure in one line (the module docstring)."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.ClickException as e:  # a usage error before any command ran
            _fail(_usage_line(e))

    def invoke(self, ctx):
        try:
            with allocator.tuning():
                return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort):
            raise
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM while an output was written (cleaned up)
            if _debug(ctx):
                raise
            terminated = type(e).__name__ == "Terminated"
            _fail("terminated" if terminated else "interrupted", 143 if terminated else 130)
        except click.ClickException as e:
            if _debug(ctx):
                raise
            _fail(_usage_line(e))
        except Exception as e:  # noqa: BLE001 (sorted below: one line, or a bug's traceback)
            line = one_line(e)
            if line is None or _debug(ctx):
                raise
            _fail(line)

    def add_command(self, cmd, name=None):
        add_global_options(cmd)
        super().add_command(cmd, name)


def _debug(ctx) -> bool:
    return bool(ctx.find_root().obj and ctx.find_root().obj.get("debug"))


def _fail(line: str, code: int = 1):
    click.echo(f"error: {_printable(line)}", err=True)
    sys.exit(code)


def _printable(text: str, limit: int = 600) -> str:
    """One line of visible characters: control characters escaped, long text cut."""
    text = " ".join(str(text).split())
    text = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[:limit] + "…"


def _usage_line(e: click.ClickException) -> str:
    where = ""
    if isinstance(e, click.UsageError) and e.ctx is not None:
        where = f" (see '{e.ctx.command_path} --help')"
        if isinstance(e, click.NoSuchOption) and e.ctx.command.name in MERGEKIT_COMMANDS and (
                advice := mergekit_options.hint(e.option_name, e.ctx.command.name)):
            return f"no such option '{e.option_name}' (mergekit's): {advice}"
    return f"{_lower_first(e.format_message().rstrip('.'))}{where}"


def _lower_first(text: str) -> str:
    """'No such option' -> 'no such option', as our own messages read; 'I/O error' stays."""
    return text[:1].lower() + text[1:] if text[1:2].islower() else text


def one_line(e: BaseException) -> str | None:
    """The one line that says `e` to a user, or None when `e` is a bug (which keeps its traceback)."""
    if isinstance(e, AdaptkitError):
        return str(e)
    if isinstance(e, ModuleNotFoundError) and e.name:
        return missing_extra(e.name)
    if isinstance(e, OSError):
        what = _lower_first((e.strerror or str(e)).rstrip("."))
        paths = [str(p) for p in (e.filename, e.filename2) if p is not None]
        return f"{' -> '.join(paths)}: {what}" if paths else what
    if isinstance(e, UnicodeDecodeError):
        return f"input is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start})"
    if isinstance(e, RecursionError):
        return "input is nested too deeply to read"
    if isinstance(e, MemoryError):
        return "out of memory"
    if type(e).__name__ == "HFValidationError" and type(e).__module__.startswith("huggingface_hub"):
        return str(e).strip().splitlines()[0]
    return None


def missing_extra(module: str) -> str | None:
    """'pip install adaptkit[EXTRA]' advice when `module` is an optional dependency of adaptkit
    (read from the installed package's metadata, so no extra is named here)."""
    from importlib.metadata import PackageNotFoundError, requires

    def canonical(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    try:
        declared = requires("adaptkit") or ()
    except PackageNotFoundError:
        return None
    for line in declared:
        name, extra = re.match(r"\s*([A-Za-z0-9._-]+)", line), _EXTRA.search(line)
        if name and extra and canonical(name[1]) == canonical(module.split(".")[0]):
            return f"this needs the optional package '{name[1]}': pip install 'adaptkit[{extra[1]}]'"
    return None


_EXTRA = re.compile(r"extra\s*==\s*[\"']([^\"']+)[\"']")


def _set_debug(ctx, param, value):
    if value:
        ctx.find_root().obj["debug"] = True


def _set_quiet(ctx, param, value):
    if value:
        ctx.find_root().obj["quiet"] = True
        be_quiet(ctx)


def be_quiet(ctx) -> None:
    """No warnings and no progress bars, huggingface_hub's included, until the command ends."""
    warnings.simplefilter("ignore")
    before = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read by huggingface_hub when it is imported

    def restore():
        if before is None:
            os.environ.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
        else:
            os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = before

    ctx.find_root().call_on_close(restore)


def add_global_options(cmd: click.Command) -> None:
    """--debug and -q/--quiet after a subcommand mean what they mean before it. Eager: they take effect
    before the command's other options are read, so -q also silences a warning those give."""
    if any(p.name == "debug_after" for p in cmd.params):
        return
    cmd.params.append(click.Option(["--debug", "debug_after"], is_flag=True, expose_value=False, is_eager=True,
                                   callback=_set_debug, help="Show full tracebacks for errors."))
    cmd.params.append(click.Option(["-q", "--quiet", "quiet_after"], is_flag=True, expose_value=False, is_eager=True,
                                   callback=_set_quiet, help="No progress bars or warnings."))


def one_line_warning(message, category, filename, lineno, file=None, line=None):
    bars = sys.modules.get("tqdm")  # (a warning during a progress bar: the bar moved below it, not broken by it)
    with bars.tqdm.external_write_mode(file=sys.stderr) if bars else contextlib.nullcontext():
        click.echo(f"warning: {_printable(message)}", err=True)



@contextmanager
def heavy_imports() -> Iterator[None]:
    """Around a command's first import of torch and the library: the cyclic garbage collector paused
    while they import, and what exists then frozen (`gc.freeze`: left out of every later collection).

    Imports make long-lived objects only, so the collector's passes over them find nothing: on the
    2-core dev machine `import torch` and the merge engine took 1.05-1.07 s with it running and
    0.90-0.93 s paused, and a full collection after them 0.07 s against none once frozen (the one
    `end_process` makes is then over the command's own objects only)."""
    modules, was_enabled = len(sys.modules), gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
        if len(sys.modules) > modules:  # (a later command in the same process imports nothing: nothing frozen)
            gc.freeze()


def end_process(code) -> None:
    """Exit with `code` (as `sys.exit` reads it), skipping the interpreter's teardown once torch is loaded.

    Tearing down an interpreter that imported torch takes 0.3–0.45 s on the 2-core dev machine
    (`python -c "import torch"`: 1.60 s; 1.16 s ending in `os._exit`), a fifth of a small merge's
    wall time. Every command has closed and renamed its outputs by the time it returns; what the
    teardown would still do is done here first: cyclic garbage collected (finalizers run),
    atexit handlers run (temporary folders, multiprocessing, logging), streams flushed. A Python
    thread still running keeps the normal exit, which waits for it.
    """
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)  # CPython's; elsewhere the normal exit
    if run_exit_handlers is None or "torch" not in sys.modules or any(
            not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.exit(code)
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # sys.exit("message"): printed, status 1
        print(code, file=sys.stderr)
        status = 1
    gc.collect()
    run_exit_handlers()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`| head`) or stream: nothing more to say
            pass
    os._exit(status)


__all__ = ["Group", "add_global_options", "be_quiet", "end_process", "heavy_imports", "missing_extra", "one_line",
           "one_line_warning"]
