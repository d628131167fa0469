"""Shared checks for the hostile-input tables.

Each table row is (input builder, command, expected one-line message fragment). A case passes
when the command exits 1 with exactly one line on stderr, `error: ...` containing the fragment,
and no exception escaped (click's runner would report an uncaught one as exit 1 too).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from adaptkit.cli import cli


def run_cli(*args, env: dict | None = None):
    """Run `adaptkit ARGS` in this process; stdout and stderr kept apart."""
    return CliRunner(env=env).invoke(cli, [str(a) for a in args], prog_name="adaptkit")


def run_process(*args, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `python -m adaptkit ARGS` as its own process (for signals, locks and exit codes)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "adaptkit", *map(str, args)], capture_output=True, text=True,
                          env=full_env, timeout=timeout)


def assert_one_line_error(result, fragment: str) -> str:
    """`result` (CliRunner result or CompletedProcess) failed with one clean line holding `fragment`."""
    code = getattr(result, "exit_code", getattr(result, "returncode", None))
    stderr = result.stderr
    exc = getattr(result, "exception", None)
    assert exc is None or isinstance(exc, SystemExit), f"uncaught {type(exc).__name__}: {exc}"
    assert code == 1, f"exit {code}; stderr: {stderr!r}"
    lines = stderr.strip().splitlines()
    errors = [line for line in lines if not line.startswith("warning: ")]
    assert len(errors) == 1, f"expected one line, got {len(errors)}: {stderr[:2000]!r}"
    assert errors[0].startswith("error: "), errors[0]
    assert "Traceback" not in stderr
    assert fragment in errors[0], f"{fragment!r} not in {errors[0]!r}"
    return errors[0]


def leftovers(folder: Path) -> list[str]:
    """Hidden temporary or set-aside folders an output left beside itself."""
    return sorted(p.name for p in Path(folder).iterdir() if p.name.startswith(".") and (".tmp" in p.name or ".old" in p.name))
