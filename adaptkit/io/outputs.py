"""Outputs that appear whole or not at all, and nothing left behind by a killed run.

`atomic_output(out)` yields a temporary folder beside `out` and renames it into place only when
the block finishes; on any error (Ctrl-C, or SIGTERM, which raises `Terminated` meanwhile) the
temporary folder is removed and an existing `out` is left untouched. Every name it uses beside
`out` is fixed, so a later run finds what a killed one left:

    .NAME.adaptkit.tmp    the output being written
    .NAME.adaptkit.old    the old output, set aside while the new one is renamed in
    .NAME.adaptkit.lock   the lock file (flock) of the run writing NAME

The run holds the lock for its whole duration; the kernel releases a flock when its process dies,
even by SIGKILL, so a lock that can be taken means no live run owns these names. Under the lock a
run first recovers (`_recover`): a set-aside old output whose replacement never arrived is renamed
back, one whose replacement did arrive is removed, and a stale temporary folder is removed. A
second run that finds the lock taken fails in one line instead of replacing the output.

The lock file is removed by its holder, still locked, when the run ends, so a clean run leaves
nothing (a killed one leaves only the unlocked file, which the next run reuses). Removal has one
race: a run may open the file just before it is removed and then lock the orphaned inode. So a run
that gets the lock checks that the path still names the inode it locked, and otherwise starts over
with the file now at that path; at any time at most one run holds a lock on the file the path names.

An output must not be inside one of the run's inputs (it would nest a copy of itself on every
rerun), be an input, or hold one (replacing it would delete the input); `check_output` refuses
these before any work, and `atomic_output` again.
"""
from __future__ import annotations

import errno
import fcntl
import os
import secrets
import shutil
import signal
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import BinaryIO

from ..errors import AdaptkitError


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived while an output was being written; raised in the main thread so that the
    run cleans up and stops as after Ctrl-C."""


def beside(out: str | Path, what: str) -> Path:
    """The fixed name of `out`'s temporary folder ("tmp"), set-aside old output ("old") or lock file ("lock")."""
    out = Path(os.path.abspath(out))
    return out.parent / f".{out.name}.adaptkit.{what}"


def check_output(out: str | Path, *, force: bool = False, inputs: Iterable[str | Path | None] = ()) -> Path:
    """Refuse, before any work, an output this run must not write; returns `out` as an absolute path.

    `inputs` are the run's own input paths as given (names that are not local paths are skipped).
    The output may not be an input, lie inside an input folder, or hold an input or the current
    folder (--force would delete it); its parent must not be a file; without `force` it must not
    exist, counting an old output a killed run had set aside (which is put back first)."""
    out = Path(out)
    target = Path(os.path.abspath(out))
    if not target.name:
        raise AdaptkitError(f"{out}: the root folder cannot be an output; choose another output folder")
    place = target.parent.resolve() / target.name  # where it will be (a link at `out` is replaced, not followed)
    for given in inputs:
        path = Path(given).expanduser() if given is not None else None
        if path is None or not path.exists():
            continue
        real = path.resolve()
        if real == place:
            raise AdaptkitError(f"{out}: this is the input {given}; choose another output folder")
        if real in place.parents:
            raise AdaptkitError(f"{out}: inside the input {given} (every rerun would copy the output into "
                                "itself); choose an output folder outside it")
        if place in real.parents:
            raise AdaptkitError(f"{out}: holds the input {given} (replacing it would delete the input); choose "
                                "another output folder")
    if _exists(target) and place in _cwd_and_parents():
        raise AdaptkitError(f"{out}: holds the current folder (replacing it would delete it); choose another "
                            "output folder")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise AdaptkitError(f"{out}: {parent} is a file, not a folder")
            break
    recover_output(target)
    if not force and _exists(target):
        raise AdaptkitError(f"{out}: output already exists (pass --force to replace it)")
    return target


def _cwd_and_parents() -> list[Path]:
    try:
        cwd = Path.cwd().resolve()
    except OSError:  # the current folder was deleted
        return []
    return [cwd, *cwd.parents]


@contextmanager
def atomic_output(out: str | Path, *, force: bool = False,
                  inputs: Iterable[str | Path | None] = ()) -> Iterator[Path]:
    """Yield a temporary folder that becomes `out` when the block ends without error.

    `inputs` are the run's input paths, for `check_output`. The lock is held until the output is
    in place; a write that fails for lack of space (or any OS error on a file in the temporary
    folder) ends as one AdaptkitError naming `out`."""
    out = Path(out)
    target = check_output(out, force=force, inputs=inputs)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AdaptkitError(f"{out}: cannot create the output: {e.strerror or e}") from e
    with _sigterm_raises(), output_lock(out):
        tmp = beside(target, "tmp")
        try:
            _recover(target)
            if _exists(target) and not force:
                raise AdaptkitError(f"{out}: output already exists (pass --force to replace it)")
            try:
                tmp.mkdir()
            except OSError as e:
                raise AdaptkitError(f"{out}: cannot create the output: {e.strerror or e}") from e
            try:
                yield tmp
            except OSError as e:
                line = _write_failure(e, out, tmp)
                if line is None:
                    raise
                raise AdaptkitError(line) from e
            try:
                move_into_place(tmp, target)
            except OSError as e:
                raise AdaptkitError(f"{out}: cannot move the finished output into place: {e.strerror or e}") from e
        except BaseException:
            with suppress(OSError):  # the error that stopped the run is the one to report
                _recover(target)  # whenever it stopped (a signal too): the old output back, no temporary folder
            raise


def move_into_place(folder: Path, out: Path) -> None:
    """Rename `folder` to `out`. An old `out` is set aside first (as `.NAME.adaptkit.old`) and
    deleted only after the rename; if the rename fails it is put back."""
    old = beside(out, "old")
    if _exists(old) and _exists(out):  # an earlier replacement's leftover: its new output arrived
        _remove(old)
    if _exists(out):
        out.rename(old)  # else an `old` still there is the output being replaced: it stays set aside
    try:
        folder.rename(out)
    except BaseException:
        if _exists(old) and not _exists(out):
            old.rename(out)
        raise
    _remove(old)


def recover_output(path: str | Path) -> None:
    """Put back an output that a killed run had set aside but not yet replaced (see the module
    docstring). A no-op unless `.NAME.adaptkit.old` exists; left alone while another run writes `path`,
    or where the lock cannot be created (a read-only folder)."""
    if not _exists(beside(path, "old")):
        return
    try:
        with _sigterm_raises(), output_lock(Path(path)):
            _recover(Path(os.path.abspath(path)))
    except (AdaptkitError, OSError):
        return


def _recover(out: Path) -> None:
    """Under the lock: undo what a killed run left beside `out`."""
    old = beside(out, "old")
    if _exists(old):
        if _exists(out):
            _remove(old)
        else:
            old.rename(out)
    _remove(beside(out, "tmp"))


def _exists(path: Path) -> bool:
    return os.path.lexists(path)


def _remove(path: Path) -> None:
    """Remove a file, link or folder (a link is removed, never followed); missing is fine."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold the flock on `.NAME.adaptkit.lock` beside `out` (see the module docstring for why the
    inode is checked after locking and why the holder may remove the file)."""
    path = beside(out, "lock")
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise AdaptkitError(f"{out}: cannot create the output: {e.strerror or e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AdaptkitError(f"{out}: another adaptkit run is writing this output") from None
        except BaseException:
            os.close(fd)
            raise
        if _same_file(fd, path):
            break
        os.close(fd)  # locked a file another run had just removed: lock the one now at `path`
    try:
        yield
    finally:
        try:
            path.unlink(missing_ok=True)
        finally:
            os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino)


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While the block runs, SIGTERM raises `Terminated` in the main thread, so the output is
    cleaned up as after Ctrl-C; the previous handler is put back afterwards. Only the default
    handler is replaced (an application's own SIGTERM handling is kept), and only from the main
    thread (the only one that may set handlers; they run there)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def terminated(signum, frame):
        raise Terminated(f"terminated by signal {signum}")

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _write_failure(e: OSError, out: Path, tmp: Path) -> str | None:
    """One line naming `out` for an OS error on a file in its temporary folder, or for a full disk
    or quota (which come without a file name); None for anything else (e.g. an input that failed)."""
    if e.filename is None:
        return f"{out}: cannot write the output: {e.strerror}" if e.errno in (errno.ENOSPC, errno.EDQUOT) else None
    try:
        name = Path(os.fsdecode(e.filename)).relative_to(tmp)
    except (TypeError, ValueError):
        return None
    return f"{out}: cannot write {name}: {e.strerror or e}"




def check_file_target(path: str | Path, what: str = "file") -> Path:
    """A file `path` this run may write: not a folder, in a folder that exists (checked before any work)."""
    target = Path(path)
    if target.is_dir():
        raise AdaptkitError(f"{path} is a folder; give the {what}'s file name")
    if not target.parent.is_dir():
        raise AdaptkitError(f"{path}: the folder {target.parent} does not exist")
    return target


@contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """The single file `path`, written into a hidden file beside it and renamed into place only once the
    block ends without error: an error or a kill leaves no half-written file (and an older one stands).
    Created with the process's umask, as any file the user writes."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            yield f
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


__all__ = ["Terminated", "atomic_file", "atomic_output", "beside", "check_file_target", "check_output",
           "move_into_place", "output_lock", "recover_output"]
